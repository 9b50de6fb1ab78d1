"""The exceptions of virtio_schema: one root, two families.

Rules of this module:

* Every exception the public API raises on purpose is a :class:`VirtioError`. Bare ``struct.error``,
  ``IndexError``, ``ValueError`` or construct exceptions never escape a public call.
* The class says whose fault it is (after h11's Local/Remote split):

  - :class:`DriverError`: the driver (the guest) broke the virtio rules. Its input is untrusted, so these
    are normal events for a device: log them, return the chain, carry on. :class:`ChainError` is a bad
    chain (the queue still works); :class:`RingError` is a bad ring (the queue latches broken).
  - :class:`DeviceUsageError`: the device code (the caller of this library) misused the API, e.g. returned
    a chain twice or claimed more written bytes than the chain offers. These are bugs to fix.

* Every message names the offending value (queue, descriptor index, address, length, field) so a log
  line is enough to find the cause.

Concrete classes for the queue, chain and transport layers live next to the code that raises them, but
all derive from the families here, so ``except DriverError`` works across the library.
"""

from __future__ import annotations

__all__ = [
    "AddressOverflow",
    "DeviceUsageError",
    "DriverError",
    "InvalidMemoryTable",
    "InvalidQueueSize",
    "LayoutError",
    "LayoutValueError",
    "MemoryClosed",
    "MemoryInUse",
    "VirtioError",
]


class VirtioError(Exception):
    """Root of every exception raised on purpose by virtio_schema."""


class DriverError(VirtioError):
    """The driver broke the virtio rules (untrusted input; never a reason to crash the device)."""


class DeviceUsageError(VirtioError):
    """The device code misused the library's API (a bug in the caller)."""


class AddressOverflow(DriverError):
    """A driver address range ``addr + len`` does not fit below 2**64, or is negative."""

    def __init__(self, addr: int, length: int) -> None:
        self.addr = addr
        self.length = length
        super().__init__(
            f"driver range addr={addr:#x} len={length:#x} does not fit in the 64-bit address space"
        )


class InvalidQueueSize(DeviceUsageError):
    """A queue size outside what the ring format allows (split: power of two, 1..32768)."""

    def __init__(self, size: int, reason: str) -> None:
        self.size = size
        super().__init__(f"invalid queue size {size}: {reason}")


class LayoutError(DeviceUsageError):
    """A Construct schema cannot be mapped exactly onto a ``struct`` layout, or a record type disagrees
    with its schema. Raised at import time of the module that declares the layout."""

    def __init__(self, schema_name: str, field: str | None, reason: str) -> None:
        self.schema_name = schema_name
        self.field = field
        where = f"{schema_name}.{field}" if field is not None else schema_name
        super().__init__(f"cannot map {where}: {reason}")


class LayoutValueError(DeviceUsageError):
    """A value given to a layout does not fit its field (refused, never truncated)."""

    def __init__(self, schema_name: str, field: str, value: object, reason: str) -> None:
        self.schema_name = schema_name
        self.field = field
        self.value = value
        super().__init__(f"{schema_name}.{field} = {value!r}: {reason}")


class InvalidMemoryTable(DeviceUsageError):
    """Guest memory regions that overlap, wrap past 2**64 or are not writable buffers."""


class MemoryClosed(DeviceUsageError):
    """Guest memory was used after :meth:`GuestMemory.close`."""


class MemoryInUse(DeviceUsageError):
    """Guest memory could not release a buffer because views derived from it are still alive."""
