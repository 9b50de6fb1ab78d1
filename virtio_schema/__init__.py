"""virtio_schema: the device side of virtio in Python.

Layers, bottom to top (imports only go downward): :mod:`~virtio_schema.schema` (Construct layouts),
:mod:`~virtio_schema.layout` (``struct`` accessors derived from them), :mod:`~virtio_schema.mem`
(driver ranges, guest memory, barriers). See ``docs/overview.rst``.

The names re-exported here are the stable public surface; everything else is reached through its
module.
"""

from virtio_schema.errors import (
    AddressOverflow,
    DeviceUsageError,
    DriverError,
    InvalidMemoryTable,
    InvalidQueueSize,
    LayoutError,
    LayoutValueError,
    MemoryClosed,
    MemoryInUse,
    VirtioError,
)
from virtio_schema.layout import IntField, Layout
from virtio_schema.mem import (
    DeviceRange,
    DriverMem,
    DriverRange,
    GuestMemory,
    UnmappedRange,
    full_barrier,
    read_barrier,
    write_barrier,
)

__version__ = "0.1.0"

__all__ = [
    "AddressOverflow",
    "DeviceRange",
    "DeviceUsageError",
    "DriverError",
    "DriverMem",
    "DriverRange",
    "GuestMemory",
    "IntField",
    "InvalidMemoryTable",
    "InvalidQueueSize",
    "Layout",
    "LayoutError",
    "LayoutValueError",
    "MemoryClosed",
    "MemoryInUse",
    "UnmappedRange",
    "VirtioError",
    "__version__",
    "full_barrier",
    "read_barrier",
    "write_barrier",
]
