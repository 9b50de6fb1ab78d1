"""virtio_schema: the device side of virtio in Python.

Layers, bottom to top (imports only go downward): :mod:`~virtio_schema.schema` (Construct layouts),
:mod:`~virtio_schema.layout` (``struct`` accessors derived from them), :mod:`~virtio_schema.mem`
(driver ranges, guest memory, barriers). See ``docs/overview.rst``.

The names re-exported here are stable API; the other stable modules, and what stable promises, are
in ``docs/api.rst`` ("Which API is stable"). Everything else is reached through its module.

``COMPILED`` says whether the kernel that runs is the mypyc-compiled one (wheels built where a C
compiler is present) or the pure-Python source; ``VIRTIO_SCHEMA_PURE_PYTHON=1`` forces the source.
"""

from typing import TYPE_CHECKING

# First of the submodules: with VIRTIO_SCHEMA_PURE_PYTHON=1 it installs the finder that loads the
# kernel's .py source instead of its compiled modules (virtio_schema/_variant.py).
from virtio_schema import _variant
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

# The one place the version is written (the build reads it: [tool.hatch.version] in pyproject.toml)
__version__ = "0.1.0"

if TYPE_CHECKING:
    COMPILED: bool
else:

    def __getattr__(name):
        """``COMPILED``, computed on first use: it imports the whole kernel to say where it came from."""
        if name == "COMPILED":
            return _variant.compiled()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "COMPILED",
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
