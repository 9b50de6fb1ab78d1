"""Driver addresses, device-accessible memory, and the memory-ordering helpers.

Theory of operation. The driver names buffers by *driver addresses* (guest-physical addresses for a
VM, I/O virtual addresses with ACCESS_PLATFORM). A :class:`DriverRange` is such a range, half-open and
checked against the 64-bit address space. The device reaches memory only through a :class:`DriverMem`
(a ``typing.Protocol``: anything with ``translate``), which turns a driver range into a
:class:`DeviceRange`, a writable ``memoryview`` slice plus the range it came from, or ``None`` if the
range is not wholly inside device-accessible memory. :class:`GuestMemory` is the standard
``DriverMem``: a table of non-overlapping regions (bytearray, mmap, any writable buffer).

Rules of this module:

1. A translation never spans two regions; callers that need it (the chain layer) split the range.
2. Every view :class:`GuestMemory` hands out is tracked, so :meth:`GuestMemory.close` can release them
   all and the owner can then ``mmap.close()`` and remap (Python refuses to close an mmap while a
   memoryview of it is alive). After ``close``, the memory refuses to translate, and old views raise
   ``ValueError`` on access, as released memoryviews do. Views the *caller* derives from a view (a
   slice of ``DeviceRange.view``) are the caller's to release; ``close`` reports them with
   :class:`~virtio_schema.errors.MemoryInUse` if it owns the buffer. The word views of
   :meth:`DeviceRange.le16` and :meth:`DeviceRange.le32` are tracked with their range.
3. A store the driver may watch while it happens (``used.idx``, ``used.flags``, ``avail_event``, a
   packed descriptor's flags, the device event area) is ONE machine store, made through those word
   views. ``struct.pack_into`` is not: it zeroes its target before writing the value, so a driver
   polling on another CPU can read 0 in between (``used.idx`` going back to 0 looks like 65535 new
   used elements to it). It is fine for bytes the driver does not look at until a later store
   publishes them (used elements, buffer contents).
4. The memory-ordering points the virtio specification requires are the three named helpers at the
   end of this module, and nowhere else. Code that needs a barrier calls one by name; a hot path
   may skip the call to a read or write barrier where :data:`STRONG_ORDER` says it does nothing.

Imports: the standard library and :mod:`virtio_schema.errors` only.
"""

from __future__ import annotations

import itertools
import mmap
import platform
import threading
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol, final

from virtio_schema._device_range import DeviceRange, Words
from virtio_schema.errors import (
    AddressOverflow,
    DeviceUsageError,
    DriverError,
    InvalidMemoryTable,
    MemoryClosed,
    MemoryInUse,
)

if TYPE_CHECKING:
    from virtio_schema._buffers import ReadBuffer


__all__ = [
    "ADDRESS_SPACE_END",
    "STRONG_ORDER",
    "DeviceRange",
    "DriverMem",
    "DriverRange",
    "GuestMemory",
    "Locate",
    "MemoryRegion",
    "UnmappedRange",
    "Words",
    "full_barrier",
    "read_barrier",
    "write_barrier",
]

ADDRESS_SPACE_END: Final = 1 << 64
"""One past the last driver address: ranges are half-open inside ``[0, 2**64]``."""


class UnmappedRange(DriverError):
    """A driver range that is not wholly inside device-accessible memory."""

    def __init__(self, start: int, length: int) -> None:
        self.start = start
        self.length = length
        super().__init__(f"driver range {start:#x}+{length:#x} is not in guest memory")


@final
class DriverRange:
    """A half-open range ``[start, end)`` of driver addresses, inside ``[0, 2**64]``.

    Build it from a descriptor's ``(addr, len)`` with :meth:`from_addr_len`, which refuses ranges that
    wrap past the top of the address space (:class:`~virtio_schema.errors.AddressOverflow`).
    """

    __slots__ = ("end", "start")

    start: int
    end: int

    def __init__(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= ADDRESS_SPACE_END:
            raise AddressOverflow(start, end - start)
        self.start = start
        self.end = end

    @classmethod
    def from_addr_len(cls, addr: int, length: int) -> DriverRange:
        """The range of ``length`` bytes at ``addr``; refused if ``addr + length > 2**64``."""
        end = addr + length
        if addr < 0 or length < 0 or end > ADDRESS_SPACE_END:
            raise AddressOverflow(addr, length)
        return DriverRange(addr, end)

    @property
    def len(self) -> int:
        """Number of bytes (may exceed ``sys.maxsize``, so this is not ``__len__``)."""
        return self.end - self.start

    def split_at(self, offset: int) -> tuple[DriverRange, DriverRange]:
        """``(first offset bytes, the rest)``; ``offset`` must be in ``0..len``."""
        if not 0 <= offset <= self.end - self.start:
            raise DeviceUsageError(f"split offset {offset} outside 0..{self.len} of {self!r}")
        mid = self.start + offset
        return DriverRange(self.start, mid), DriverRange(mid, self.end)

    def __contains__(self, other: object) -> bool:
        if isinstance(other, DriverRange):
            return self.start <= other.start and other.end <= self.end
        if isinstance(other, int):
            return self.start <= other < self.end
        return False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DriverRange):
            return NotImplemented
        return self.start == other.start and self.end == other.end

    def __hash__(self) -> int:
        return hash((self.start, self.end))

    def __repr__(self) -> str:
        return f"DriverRange({self.start:#x}, {self.end:#x})"


Locate = Callable[[int, int], "tuple[memoryview, int] | None"]
"""The optional fast path of a :class:`DriverMem`: ``locate(addr, length)`` gives the byte view of
the whole region holding ``[addr, addr+length)`` and the offset in it, or ``None``. Callers slice
that view for one copy and drop the slice at once (it is not tracked)."""


class DriverMem(Protocol):
    """What the queue and chain layers need from a transport: address translation."""

    def translate(self, driver_range: DriverRange) -> DeviceRange | None:
        """A view of ``driver_range`` if it lies wholly in device-accessible memory, else ``None``."""
        ...


@final
class MemoryRegion:
    """One region of a :class:`GuestMemory`: ``size`` bytes at driver address ``start``."""

    __slots__ = ("_base", "buffer", "end", "start")

    def __init__(self, start: int, buffer: ReadBuffer, base: memoryview) -> None:
        self.start = start
        self.end = start + len(base)
        self.buffer = buffer
        self._base = base

    @property
    def size(self) -> int:
        return self.end - self.start

    def release(self) -> bool:
        """Stop exporting the buffer (so that its owner may unmap it); ``False`` while a view
        derived from the region is still alive. Releasing again does nothing."""
        try:
            self._base.release()
        except BufferError:
            return False
        return True

    def __repr__(self) -> str:
        return f"MemoryRegion({self.start:#x}..{self.end:#x})"


@final
class GuestMemory:
    """Guest memory as a table of non-overlapping regions, each ``(driver address, buffer)``.

    ``buffer`` is a bytearray, an mmap or any object with a writable, C-contiguous buffer (read-only
    buffers are accepted with ``writable=False``, for dissectors). The memory only borrows the
    buffers; with ``close_buffers=True`` it also closes the mmaps among them on :meth:`close`.

    >>> mem = GuestMemory([(0x1000, bytearray(4096))])
    >>> dr = mem.translate(DriverRange.from_addr_len(0x1ff0, 16))
    >>> dr is not None and len(dr)
    16
    >>> mem.translate(DriverRange.from_addr_len(0x1ff0, 17)) is None   # crosses the region's end
    True
    >>> mem.close()
    """

    __slots__ = ("_close_buffers", "_closed", "_one", "_table", "_views", "writable")

    _table: tuple[list[int], tuple[MemoryRegion, ...]]
    """Region starts and regions, sorted, in one attribute (see :meth:`_set_table`)."""

    def __init__(
        self,
        regions: Iterable[tuple[int, ReadBuffer]] = (),
        *,
        writable: bool = True,
        close_buffers: bool = False,
    ) -> None:
        self.writable = writable
        self._close_buffers = close_buffers
        built: list[MemoryRegion] = []
        try:
            for start, buffer in regions:
                built.append(self._region(start, buffer, writable))
            built.sort(key=lambda r: r.start)
            for prev, cur in itertools.pairwise(built):
                if cur.start < prev.end:
                    raise InvalidMemoryTable(f"regions {prev!r} and {cur!r} overlap")
        except BaseException:
            for r in built:  # a refused table leaves no buffer exported
                r._base.release()
            raise
        self._closed = False
        self._set_table(built)
        self._views: weakref.WeakSet[DeviceRange] = weakref.WeakSet()

    def _set_table(self, regions: list[MemoryRegion]) -> None:
        """Install a sorted, checked region list. The table is ONE attribute (region starts and
        regions together), so a lookup on another thread sees the old table or the new one,
        never a mix."""
        self._table = ([r.start for r in regions], tuple(regions))
        # the common case, one region: locate() needs no search
        one = regions[0] if len(regions) == 1 and not self._closed else None
        self._one = None if one is None else (one.start, one.end, one._base)

    @staticmethod
    def _region(start: int, buffer: ReadBuffer, writable: bool) -> MemoryRegion:
        try:
            base = memoryview(buffer)
        except TypeError:
            raise InvalidMemoryTable(
                f"region at {start:#x}: {type(buffer).__name__} has no buffer interface"
            ) from None
        try:
            if writable and base.readonly:
                raise InvalidMemoryTable(f"region at {start:#x} is read-only")
            if not base.c_contiguous:
                raise InvalidMemoryTable(f"region at {start:#x} is not contiguous")
            if base.ndim != 1 or base.format != "B":
                flat = base.cast("B")
                base.release()
                base = flat
            size = len(base)
            if size == 0:
                raise InvalidMemoryTable(f"region at {start:#x} is empty")
            if start < 0 or start + size > ADDRESS_SPACE_END:
                raise InvalidMemoryTable(
                    f"region {start:#x}+{size:#x} does not fit in the 64-bit address space"
                )
        except BaseException:
            base.release()
            raise
        return MemoryRegion(start, buffer, base)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions, sorted by address."""
        return self._table[1]

    def add_region(self, start: int, buffer: ReadBuffer) -> MemoryRegion:
        """Add a region while the memory is in use (memory hotplug): translations see it from
        now on. Raises :class:`~virtio_schema.errors.InvalidMemoryTable` (nothing changed) if it
        overlaps a region or is not a usable buffer."""
        if self._closed:
            raise MemoryClosed("guest memory used after close()")
        region = self._region(start, buffer, self.writable)
        for other in self._table[1]:
            if region.start < other.end and other.start < region.end:
                region._base.release()
                raise InvalidMemoryTable(f"regions {other!r} and {region!r} overlap")
        self._set_table(sorted((*self._table[1], region), key=lambda r: r.start))
        return region

    def remove_region(self, region: MemoryRegion) -> None:
        """Take ``region`` out while the memory is in use (memory unplug): translations and
        lookups no longer reach it (an access gives :class:`UnmappedRange`, a driver error).
        Views handed out before stay valid until released, so the owner of the buffer can unmap
        it only then (``mmap.close()`` raises ``BufferError`` while one is alive)."""
        regions = [r for r in self._table[1] if r is not region]
        if len(regions) == len(self._table[1]):
            raise DeviceUsageError(f"{region!r} is not a region of this memory")
        self._set_table(regions)
        region.release()

    @property
    def closed(self) -> bool:
        return self._closed

    def translate(self, driver_range: DriverRange) -> DeviceRange | None:
        """A view of ``driver_range`` if it lies wholly inside one region, else ``None``.

        A zero-length range translates (to an empty view) when its address is inside a region or at
        its end.
        """
        if self._closed:
            raise MemoryClosed("guest memory used after close()")
        start = driver_range.start
        starts, regions = self._table
        i = bisect_right(starts, start) - 1
        if i < 0:
            return None
        region = regions[i]
        if driver_range.end > region.end:
            return None
        dr = DeviceRange(
            region._base[start - region.start : driver_range.end - region.start], driver_range
        )
        dr._owner = self._views
        self._views.add(dr)
        return dr

    def locate(self, addr: int, length: int) -> tuple[memoryview, int] | None:
        """``(region view, offset)`` if ``[addr, addr+length)`` lies in one region, else ``None``:
        the untracked fast path of :meth:`translate` for a copy done at once (see :data:`Locate`).
        ``length`` must be positive."""
        one = self._one
        if one is not None:
            start, end, base = one
            if start <= addr and addr + length <= end:
                return base, addr - start
            return None
        if self._closed:
            raise MemoryClosed("guest memory used after close()")
        starts, regions = self._table
        i = bisect_right(starts, addr) - 1
        if i < 0:
            return None
        region = regions[i]
        if addr + length <= region.end:
            return region._base, addr - region.start
        return None

    def read(self, addr: int, length: int) -> bytes:
        """A copy of ``length`` bytes at ``addr`` (:class:`UnmappedRange` if not in memory)."""
        dr = self.translate(DriverRange.from_addr_len(addr, length))
        if dr is None:
            raise UnmappedRange(addr, length)
        try:
            return bytes(dr.view)
        finally:
            dr.release()

    def write(self, addr: int, data: ReadBuffer) -> None:
        """Copy ``data`` to ``addr`` (:class:`UnmappedRange` if not in memory)."""
        if not self.writable:
            raise DeviceUsageError("write() to guest memory opened with writable=False")
        src = memoryview(data).cast("B")
        dr = self.translate(DriverRange.from_addr_len(addr, len(src)))
        if dr is None:
            raise UnmappedRange(addr, len(src))
        try:
            dr.view[:] = src
        finally:
            dr.release()

    def close(self) -> None:
        """Release every view handed out (and, with ``close_buffers``, close the mmaps).

        After the first call the memory refuses to translate. Raises
        :class:`~virtio_schema.errors.MemoryInUse` if something could not be released because the
        caller still holds an export of it (a slice of a view, a ``struct.iter_unpack`` over one);
        release those and call ``close()`` again to finish.
        """
        self._closed = True
        self._one = None  # locate() must see the close
        busy: list[str] = []
        for dr in list(self._views):
            try:
                dr.release()
            except BufferError:
                busy.append(repr(dr))
            else:
                self._views.discard(dr)
        for region in self._table[1]:
            if not region.release():  # pragma: no cover - our base views are never exported
                busy.append(repr(region))
        if self._close_buffers and not busy:
            for region in self._table[1]:
                if isinstance(region.buffer, mmap.mmap) and not region.buffer.closed:
                    try:
                        region.buffer.close()
                    except BufferError:
                        busy.append(repr(region))
        if busy:
            raise MemoryInUse(
                f"still exported by the caller: {', '.join(busy)}; release them and close again"
            )

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._table[1])} regions"
        return f"GuestMemory({state})"


# --- memory ordering ---------------------------------------------------------------------------
#
# virtio 1.2, 2.7.7 and 2.7.13: the device must not read ring entries before the avail index that
# published them (read barrier), must make used elements visible before the used index (write
# barrier), and must order its own store (avail_event, used idx) before a following load (used_event,
# avail idx) at the notification points (full barrier).
#
# Python has no fence primitive. What CPython gives: every guest-memory access here is a separate C
# call (struct.unpack_from / pack_into / a memoryview item or slice assignment) that the C compiler cannot
# reorder across, so compiler reordering is excluded. On x86-64 (TSO) the hardware keeps load->load
# and store->store order, so read and write barriers need nothing more; only store->load needs a
# locked instruction, and acquiring/releasing a lock executes one (LOCK CMPXCHG is a full fence). On
# weakly ordered CPUs every helper takes the lock: an acquire/release pair orders what precedes the
# release before what follows the acquire, and the full barrier does it twice to order store->load.

_FENCE_LOCK: Final = threading.Lock()
STRONG_ORDER: Final = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686", "x86"}
"""The CPU keeps load->load and store->store order (x86-64): :func:`read_barrier` and
:func:`write_barrier` do nothing, and the queues' hot paths skip the call (``if not
STRONG_ORDER: write_barrier()``: a Python call costs ten times the test)."""
# bound once: two C calls, about half the cost of a ``with`` block on the lock
_fence_acquire: Final = _FENCE_LOCK.acquire
_fence_release: Final = _FENCE_LOCK.release


def _lock_fence() -> None:
    _fence_acquire()
    _fence_release()


# Each helper is one plain function (mypyc compiles it to a direct call; interpreted, the hot paths
# skip the call on x86-64 with ``if not STRONG_ORDER``).


def read_barrier() -> None:
    """Order earlier loads from guest memory before later ones (after reading ``avail.idx``,
    before reading the entries it publishes; packed: after reading a descriptor's flags).
    x86-64 keeps load order: nothing to do there."""
    if not STRONG_ORDER:  # pragma: no cover - weakly ordered CPUs
        _lock_fence()


def write_barrier() -> None:
    """Order earlier stores to guest memory before later ones (used elements before
    ``used.idx``; packed: id/len before flags). x86-64 keeps store order: nothing to do there."""
    if not STRONG_ORDER:  # pragma: no cover - weakly ordered CPUs
        _lock_fence()


def full_barrier() -> None:
    """Order earlier stores before later loads (``used.idx`` before reading ``used_event`` /
    ``avail.flags``; ``avail_event`` before re-reading ``avail.idx``): one locked instruction,
    through the lock (acquiring it is a locked compare-and-swap); weakly ordered CPUs take two
    acquire/release pairs."""
    _lock_fence()
    if not STRONG_ORDER:  # pragma: no cover - weakly ordered CPUs
        _lock_fence()
