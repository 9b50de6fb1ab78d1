"""Buffer type aliases shared by the layers (typing only; nothing here runs on the hot path).

Python 3.11 has no ``collections.abc.Buffer``; typeshed's ``_typeshed`` aliases describe "anything
with the buffer protocol" exactly, so they are used under ``TYPE_CHECKING`` and spelled as strings at
run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    ReadBuffer: TypeAlias = ReadableBuffer
    """Any object with the buffer protocol (bytes, bytearray, memoryview, mmap, array ...)."""
    WriteBuffer: TypeAlias = WriteableBuffer
    """Any object with a writable buffer (bytearray, writable memoryview, mmap ...)."""
else:  # run-time stand-ins, only seen by introspection and the docs
    import mmap

    ReadBuffer = bytes | bytearray | memoryview | mmap.mmap
    WriteBuffer = bytearray | memoryview | mmap.mmap

__all__ = ["ReadBuffer", "WriteBuffer"]
