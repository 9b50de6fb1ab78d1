"""A driver simulator for testing devices: fake guest memory, a fake driver, a one-call harness.

Theory of operation. :class:`FakeMemory` is identity driver memory: driver addresses are offsets in a
few bytearray regions, handed out by an allocator that asserts allocations never overlap.
:class:`FakeDriver` plays the driver's half of a split queue on it: it lays out the rings, publishes
chains (direct, indirect, mixed) exactly as a well-behaved driver would, reads used entries back with
the bytes the device wrote, and sets or reads the notification fields. For robustness tests it also
writes anything a hostile driver could: raw descriptors, bad ``next`` values, loops, readable after
writable, bad indirect tables, avail index jumps. :func:`make_queue` builds a device-side
:class:`~virtio_schema.queue.Queue` and its fake driver in one call::

    fq = make_queue(size=8)
    fq.driver.publish([b"ping"], [16])
    with fq.queue.next_chain() as chain:
        ...
    (used,) = fq.driver.used()

Nothing here is fast or hostile by default; everything here is deterministic.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from virtio_schema.errors import DeviceUsageError
from virtio_schema.mem import DeviceRange, DriverRange, GuestMemory, write_barrier
from virtio_schema.queue import Queue, QueueMemory, QueueState, vring_need_event
from virtio_schema.ring import DESC, AvailRing, Desc, DescTable, UsedRing
from virtio_schema.schema import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    AvailFlags,
    DescFlags,
    Feature,
    UsedFlags,
    avail_ring,
    used_ring,
)
from virtio_schema.util import NotificationCounter

__all__ = [
    "FakeDriver",
    "FakeMemory",
    "FakeMemoryFull",
    "FakeQueue",
    "UsedChain",
    "make_queue",
]


class FakeMemoryFull(DeviceUsageError):
    """The fake memory has no free block of the requested size (make it bigger in the test)."""


class _Region:
    __slots__ = ("allocs", "end", "free", "start")

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.end = start + size
        self.free: list[tuple[int, int]] = [(start, self.end)]  # sorted, coalesced [start, end)
        self.allocs: dict[int, int] = {}


class FakeMemory:
    """Identity driver memory for tests: :class:`~virtio_schema.mem.GuestMemory` over bytearray
    regions plus an allocator. It is a :class:`~virtio_schema.mem.DriverMem` itself.

    ``regions`` lists ``(driver address, size)`` pairs; by default one region of ``size`` bytes at
    ``base``. Regions given adjacent make buffers that cross a region boundary possible
    (see :meth:`alloc_at`).
    """

    def __init__(
        self,
        size: int = 1 << 22,
        *,
        base: int = 0x10000,
        regions: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        spec = list(regions) if regions is not None else [(base, size)]
        self.buffers = [bytearray(n) for _, n in spec]
        self.memory = GuestMemory([(a, b) for (a, _), b in zip(spec, self.buffers, strict=True)])
        self._regions = sorted((_Region(a, n) for a, n in spec), key=lambda r: r.start)
        self._pieces: dict[int, list[int]] = {}  # alloc_at start -> piece starts, one per region

    # DriverMem
    def translate(self, driver_range: DriverRange) -> DeviceRange | None:
        return self.memory.translate(driver_range)

    def _region_of(self, addr: int) -> _Region:
        for r in self._regions:
            if r.start <= addr < r.end:
                return r
        raise DeviceUsageError(f"{addr:#x} is not in fake memory")

    def alloc(self, size: int, align: int = 16, *, region: int = 0) -> int:
        """A fresh block of ``size`` bytes (at least 1 is reserved), aligned to ``align``, zeroed."""
        r = self._regions[region]
        need = max(size, 1)
        for k, (fs, fe) in enumerate(r.free):
            start = -(-fs // align) * align
            if start + need <= fe:
                rest = [(fs, start)] if start > fs else []
                if start + need < fe:
                    rest.append((start + need, fe))
                r.free[k : k + 1] = rest
                r.allocs[start] = need
                self.write(start, bytes(size))
                return start
        raise FakeMemoryFull(f"no free block of {size} bytes (align {align}) in region {region}")

    def alloc_at(self, addr: int, size: int) -> int:
        """Reserve ``[addr, addr+size)`` exactly (it may span adjacent regions)."""
        end = addr + max(size, 1)
        pos = addr
        pieces: list[int] = []
        try:
            self._reserve(pos, end, pieces)
        except BaseException:
            for p in pieces:
                self._free_piece(p)
            raise
        self._pieces[addr] = pieces
        return addr

    def _reserve(self, pos: int, end: int, pieces: list[int]) -> None:
        while pos < end:
            r = self._region_of(pos)
            stop = min(end, r.end)
            for k, (fs, fe) in enumerate(r.free):
                if fs <= pos and stop <= fe:
                    rest = [(fs, pos)] if pos > fs else []
                    if stop < fe:
                        rest.append((stop, fe))
                    r.free[k : k + 1] = rest
                    r.allocs[pos] = stop - pos
                    pieces.append(pos)
                    break
            else:
                raise DeviceUsageError(f"[{pos:#x}, {stop:#x}) overlaps an allocation")
            pos = stop

    def free(self, addr: int) -> None:
        """Give back a block from :meth:`alloc` or :meth:`alloc_at`."""
        for piece in self._pieces.pop(addr, [addr]):
            self._free_piece(piece)

    def _free_piece(self, addr: int) -> None:
        r = self._region_of(addr)
        size = r.allocs.pop(addr, None)
        if size is None:
            raise DeviceUsageError(f"{addr:#x} was not allocated")
        k = bisect.bisect_left(r.free, (addr, addr))
        r.free.insert(k, (addr, addr + size))
        merged: list[tuple[int, int]] = []
        for fs, fe in r.free:
            if merged and merged[-1][1] == fs:
                merged[-1] = (merged[-1][0], fe)
            else:
                merged.append((fs, fe))
        r.free = merged

    @property
    def allocated(self) -> int:
        """Bytes currently allocated (for leak checks)."""
        return sum(n for r in self._regions for n in r.allocs.values())

    def read(self, addr: int, length: int) -> bytes:
        """Bytes at ``addr``; may span adjacent regions."""
        out = bytearray()
        pos, end = addr, addr + length
        while pos < end:
            r = self._region_of(pos)
            stop = min(end, r.end)
            out += self.memory.read(pos, stop - pos)
            pos = stop
        return bytes(out)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``addr``; may span adjacent regions."""
        src = memoryview(data).cast("B")
        pos, end = addr, addr + len(src)
        while pos < end:
            r = self._region_of(pos)
            stop = min(end, r.end)
            self.memory.write(pos, src[pos - addr : stop - addr])
            pos = stop

    def close(self) -> None:
        self.memory.close()


class UsedChain(NamedTuple):
    """A used entry as the driver sees it."""

    head: int
    """The ``id`` of the used element (the chain's head)."""
    len: int
    """The used length the device reported."""
    written: tuple[bytes, ...]
    """For a chain published with :meth:`FakeDriver.publish`: the bytes of each writable buffer,
    cut to the used length (in order). Empty for raw chains."""

    @property
    def data(self) -> bytes:
        """All written bytes, concatenated."""
        return b"".join(self.written)


@dataclass
class _Published:
    descs: list[int]
    buffers: list[int]
    writable: list[tuple[int, int]]  # (addr, len) of writable buffers, in order
    table: int | None = None


@dataclass
class FakeDriver:
    """The driver's half of a split queue, on :class:`FakeMemory`.

    ``features`` are the negotiated features the driver honours (INDIRECT_DESC for
    ``publish(indirect=True)``, EVENT_IDX for :meth:`kick_needed`). ``start`` sets the initial ring
    indices (both the driver's and, in the used ring, the device's), like a queue that resumes.
    """

    memory: FakeMemory
    size: int
    features: int = 0
    start: QueueState = field(default_factory=QueueState)

    def __post_init__(self) -> None:
        n = self.size
        m = self.memory
        self.desc_addr = m.alloc(DESC.size * n, DESC_ALIGN)
        self.avail_addr = m.alloc(avail_ring(n).sizeof(), AVAIL_ALIGN)
        self.used_addr = m.alloc(used_ring(n).sizeof(), USED_ALIGN)
        self.desc_table = DescTable(self._range(self.desc_addr, DESC.size * n), n)
        self.avail = AvailRing(self._range(self.avail_addr, avail_ring(n).sizeof()), n)
        self.used_ring = UsedRing(self._range(self.used_addr, used_ring(n).sizeof()), n)
        self._free: list[int] = list(range(n - 1, -1, -1))  # a stack: 0 is taken first
        self._published: dict[int, _Published] = {}
        self.avail_idx = self.start.next_avail
        self.last_used = self.start.next_used
        self.avail.set_idx(self.avail_idx)
        self.used_ring.set_idx(self.start.next_used)

    def _range(self, addr: int, length: int) -> DeviceRange:
        dr = self.memory.translate(DriverRange.from_addr_len(addr, length))
        assert dr is not None
        return dr

    def queue_memory(self) -> QueueMemory:
        """The three ring areas, translated, for building the device's queue."""
        n = self.size
        return QueueMemory(
            desc=self._range(self.desc_addr, DESC.size * n),
            avail=self._range(self.avail_addr, avail_ring(n).sizeof()),
            used=self._range(self.used_addr, used_ring(n).sizeof()),
        )

    # --- well-formed chains --------------------------------------------------------------------

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains published and not yet seen in the used ring."""
        return (self.avail_idx - self.last_used) & 0xFFFF

    def publish(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
    ) -> int | None:
        """Publish a chain of readable buffers (their contents) then writable buffers (their
        lengths); with ``indirect`` all of them sit in one indirect table. Returns the head, or
        ``None`` if the ring has no room (no free descriptors, or ``size`` chains in flight)."""
        count = len(readable) + len(writable)
        if count == 0:
            raise DeviceUsageError("a chain needs at least one buffer")
        need = 1 if indirect else count
        if need > len(self._free) or self.in_flight >= self.size:
            return None
        if indirect and not self.features & Feature.INDIRECT_DESC:
            raise DeviceUsageError("publish(indirect=True) needs INDIRECT_DESC in features")
        buffers: list[int] = []
        entries: list[tuple[int, int, int]] = []  # addr, len, flags
        wbufs: list[tuple[int, int]] = []
        for data in readable:
            addr = self.memory.alloc(len(data), 8)
            self.memory.write(addr, data)
            buffers.append(addr)
            entries.append((addr, len(data), 0))
        for length in writable:
            addr = self.memory.alloc(length, 8)
            buffers.append(addr)
            wbufs.append((addr, length))
            entries.append((addr, length, DescFlags.WRITE))
        pub = _Published([], buffers, wbufs)
        if indirect:
            table = self.memory.alloc(DESC.size * count, 16)
            for k, (addr, length, flags) in enumerate(entries):
                more = k + 1 < count
                rec = Desc(
                    addr, length, flags | (DescFlags.NEXT if more else 0), k + 1 if more else 0
                )
                self.memory.write(table + DESC.size * k, DESC.pack(rec))
            pub.table = table
            head = self._free.pop()
            pub.descs.append(head)
            self.desc_table.set(head, Desc(table, DESC.size * count, DescFlags.INDIRECT, 0))
        else:
            idx = [self._free.pop() for _ in range(count)]
            pub.descs = idx
            for k, (addr, length, flags) in enumerate(entries):
                more = k + 1 < count
                nxt = idx[k + 1] if more else 0
                self.desc_table.set(
                    idx[k], Desc(addr, length, flags | (DescFlags.NEXT if more else 0), nxt)
                )
            head = idx[0]
        self._published[head] = pub
        self.push_head(head)
        return head

    # --- raw access for hostile tests ----------------------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, next: int) -> None:
        """Write descriptor ``index`` as given, no checks on the values."""
        self.desc_table.set(index, Desc(addr, length, flags, next))

    def take_descriptor(self) -> int:
        """Reserve a descriptor index for raw use (it is never freed by :meth:`used`)."""
        return self._free.pop()

    def alloc_buffer(self, data: bytes | int) -> int:
        """Allocate a buffer holding ``data`` (or ``data`` zero bytes); returns its address."""
        if isinstance(data, int):
            return self.memory.alloc(data, 8)
        addr = self.memory.alloc(len(data), 8)
        self.memory.write(addr, data)
        return addr

    def write_indirect_table(self, entries: Sequence[Desc]) -> int:
        """Allocate and fill an indirect table with raw entries; returns its address."""
        table = self.memory.alloc(DESC.size * max(len(entries), 1), 16)
        for k, rec in enumerate(entries):
            self.memory.write(table + DESC.size * k, DESC.pack(rec))
        return table

    def push_head(self, head: int) -> None:
        """Put ``head`` (any u16) in the next avail slot and publish it (idx + 1)."""
        self.avail.set_ring(self.avail_idx % self.size, head)
        write_barrier()
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.avail.set_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Write ``avail.idx`` directly (e.g. a jump past the queue size)."""
        self.avail_idx = value & 0xFFFF
        self.avail.set_idx(self.avail_idx)

    # --- reading back --------------------------------------------------------------------------

    @property
    def used_idx(self) -> int:
        return self.used_ring.idx()

    def used(self) -> list[UsedChain]:
        """Every used entry the device published since the last call, in order. Chains published
        with :meth:`publish` are taken apart (descriptors and buffers freed)."""
        out: list[UsedChain] = []
        end = self.used_ring.idx()
        while self.last_used != end:
            slot = self.last_used % self.size
            elem = self.used_ring.elem(slot)
            self.last_used = (self.last_used + 1) & 0xFFFF
            out.append(self._take_back(elem.id, elem.len))
        return out

    def _take_back(self, head: int, length: int) -> UsedChain:
        pub = self._published.pop(head, None)
        if pub is None:
            return UsedChain(head, length, ())
        written: list[bytes] = []
        left = length
        for addr, blen in pub.writable:
            n = min(left, blen)
            written.append(self.memory.read(addr, n))
            left -= n
        for addr in pub.buffers:
            self.memory.free(addr)
        if pub.table is not None:
            self.memory.free(pub.table)
        self._free.extend(reversed(pub.descs))
        return UsedChain(head, length, tuple(written))

    # --- notification fields -------------------------------------------------------------------

    def set_no_interrupt(self, on: bool) -> None:
        """Set or clear ``avail.flags`` NO_INTERRUPT (other bits are kept)."""
        flags = self.avail.flags()
        bit = int(AvailFlags.NO_INTERRUPT)
        self.avail.set_flags((flags | bit) if on else (flags & ~bit & 0xFFFF))

    def set_avail_flags(self, value: int) -> None:
        self.avail.set_flags(value)

    def set_used_event(self, value: int) -> None:
        self.avail.set_used_event(value & 0xFFFF)

    @property
    def no_notify(self) -> bool:
        """The device set ``used.flags`` NO_NOTIFY."""
        return bool(self.used_ring.flags() & UsedFlags.NO_NOTIFY)

    @property
    def avail_event(self) -> int:
        return self.used_ring.avail_event()

    def kick_needed(self, old_avail_idx: int) -> bool:
        """Whether a driver that moved ``avail.idx`` from ``old_avail_idx`` to now must kick."""
        if self.features & Feature.EVENT_IDX:
            return vring_need_event(self.avail_event, self.avail_idx, old_avail_idx)
        return not self.no_notify


@dataclass
class FakeQueue:
    """A device-side queue wired to a fake driver (see :func:`make_queue`)."""

    queue: Queue
    driver: FakeDriver
    memory: FakeMemory
    notifier: NotificationCounter


def make_queue(
    size: int = 16,
    *,
    features: int = 0,
    state: QueueState | None = None,
    memory: FakeMemory | None = None,
    index: int = 0,
) -> FakeQueue:
    """Build fake memory, a fake driver and the device's :class:`~virtio_schema.queue.Queue` on
    it, with a :class:`~virtio_schema.util.NotificationCounter` as the notifier."""
    mem = memory or FakeMemory()
    start = state or QueueState()
    driver = FakeDriver(mem, size, features, start)
    notifier = NotificationCounter()
    queue = Queue(
        driver.queue_memory(),
        size,
        mem,
        features=features,
        notify=notifier,
        state=start,
        index=index,
    )
    return FakeQueue(queue, driver, mem, notifier)
