"""``DeviceRange``: device-accessible memory, a byte view plus the driver range it came from.

Re-exported by :mod:`virtio_schema.mem`, whose rules apply (rule 2: every range a
:class:`~virtio_schema.mem.GuestMemory` hands out is tracked, weakly, so that ``close`` can release
it; rule 3: the word views store a field the driver polls with one machine store).

This module stays interpreted where the kernel is compiled: :class:`~virtio_schema.mem.GuestMemory`
tracks ranges in a ``weakref.WeakSet``, and mypyc's native classes take no weak references. The
hot paths do not make ranges (they copy through :data:`~virtio_schema.mem.Locate`), so nothing is
lost.

Imports: the standard library and :mod:`virtio_schema.errors` only.
"""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Protocol, final

from virtio_schema.errors import DeviceUsageError

if TYPE_CHECKING:
    from virtio_schema.mem import DriverRange

__all__ = ["DeviceRange", "Words"]


class Words(Protocol):
    """Little-endian words of a :class:`DeviceRange` (from :meth:`DeviceRange.le16` or
    :meth:`DeviceRange.le32`): ``words[k]`` reads, and ``words[k] = v`` writes, the word at byte
    offset ``k * width`` with ONE machine access, never a zero in between. On a little-endian host
    this is the ``memoryview`` itself (``cast("H")`` or ``cast("I")``)."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...

    def release(self) -> None: ...


_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


class _SwappedWords:
    """:class:`Words` on a big-endian host: a native word view plus a byte swap per access."""

    __slots__ = ("_view", "_width")

    def __init__(self, view: memoryview, width: int) -> None:
        self._view = view
        self._width = width

    def __getitem__(self, index: int, /) -> int:
        value: int = self._view[index]
        return int.from_bytes(value.to_bytes(self._width, "big"), "little")

    def __setitem__(self, index: int, value: int, /) -> None:
        self._view[index] = int.from_bytes(value.to_bytes(self._width, "little"), "big")

    def release(self) -> None:
        self._view.release()


@final
class DeviceRange:
    """Device-accessible memory: a byte ``memoryview`` plus the driver range it came from (``None``
    for memory that has no driver address, e.g. a buffer in a test).

    ``view`` is writable unless the memory it came from is read-only. It aliases guest memory: a
    hostile driver may change the bytes at any moment, so copy what must not change under you.
    """

    __slots__ = ("__weakref__", "_owner", "_words", "driver_range", "view")

    view: memoryview
    driver_range: DriverRange | None

    def __init__(self, view: memoryview, driver_range: DriverRange | None = None) -> None:
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        self.view = view
        self.driver_range = driver_range
        self._owner: weakref.WeakSet[DeviceRange] | None = None
        self._words: list[Words] | None = None  # word views made by le16/le32 (rare: rings)

    def __len__(self) -> int:
        return len(self.view)

    def split_at(self, offset: int) -> tuple[DeviceRange, DeviceRange]:
        """``(first offset bytes, the rest)``, both tracked by the same memory as this range."""
        n = len(self.view)
        if not 0 <= offset <= n:
            raise DeviceUsageError(f"split offset {offset} outside 0..{n} of a {n}-byte range")
        if self.driver_range is None:
            d1 = d2 = None
        else:
            d1, d2 = self.driver_range.split_at(offset)
        a = DeviceRange(self.view[:offset], d1)
        b = DeviceRange(self.view[offset:], d2)
        owner = self._owner
        if owner is not None:
            a._owner = b._owner = owner
            owner.add(a)
            owner.add(b)
        return a, b

    def sub(self, offset: int, length: int) -> DeviceRange:
        """The ``length`` bytes at ``offset`` of this range, tracked by the same memory."""
        n = len(self.view)
        if offset < 0 or length < 0 or offset + length > n:
            raise DeviceUsageError(f"sub-range {offset}+{length} outside a {n}-byte range")
        if self.driver_range is None:
            d = None
        else:
            d = self.driver_range.split_at(offset)[1].split_at(length)[0]
        part = DeviceRange(self.view[offset : offset + length], d)
        owner = self._owner
        if owner is not None:
            part._owner = owner
            owner.add(part)
        return part

    def le16(self) -> Words:
        """The range as little-endian 16-bit words (``len // 2`` of them, ``words[k]`` at byte
        ``2 * k``), each read or written with one machine access: the way to store a field the
        driver may be polling (see rule 3 of this module). Released with the range."""
        return self._cast(2)

    def le32(self) -> Words:
        """The range as little-endian 32-bit words (``len // 4`` of them, ``words[k]`` at byte
        ``4 * k``), like :meth:`le16`."""
        return self._cast(4)

    def _cast(self, width: int) -> Words:
        n = len(self.view)
        whole = self.view[: n - n % width]
        try:
            native = whole.cast("H") if width == 2 else whole.cast("I")
        finally:
            whole.release()
        words: Words = native if _LITTLE_ENDIAN_HOST else _SwappedWords(native, width)
        if self._words is None:
            self._words = []
        self._words.append(words)
        return words

    def release(self) -> None:
        """Release the view and the word views made from it now (they raise ``ValueError`` on
        use afterwards)."""
        if self._words is not None:
            for words in self._words:
                words.release()
            self._words = None
        self.view.release()

    def __repr__(self) -> str:
        return f"DeviceRange({len(self.view)} bytes, from {self.driver_range!r})"
