"""Fake guest memory for tests: identity driver addresses over bytearray regions, with an allocator.

:class:`FakeMemory` is a :class:`~virtio_schema.mem.DriverMem`: driver addresses are offsets in a few
bytearray regions, handed out by an allocator that asserts allocations never overlap. Regions given
adjacent make buffers that cross a region boundary possible (:meth:`FakeMemory.alloc_at`).
:meth:`FakeMemory.over` puts the same allocator on buffers someone else owns (the ``mmap`` of a
memfd the vhost-user test front-end shares with a back-end process), and
:meth:`FakeMemory.copy_allocations` carries the allocations over to a copy of such memory.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from virtio_schema.errors import DeviceUsageError
from virtio_schema.layout import Layout
from virtio_schema.mem import DeviceRange, DriverRange, GuestMemory, Locate

if TYPE_CHECKING:
    from virtio_schema._buffers import WriteBuffer

__all__ = ["FakeMemory", "FakeMemoryFull"]

_R = TypeVar("_R", bound=tuple[Any, ...])


class FakeMemoryFull(DeviceUsageError):
    """The fake memory has no free block of the requested size (make it bigger in the test)."""


_WRITE = 2  # the WRITE flag: bit 1 in both ring formats (DescFlags.WRITE, PackedDescFlags.WRITE)


def check_chain_length(count: int, size: int) -> None:
    """The fake drivers' rule for a chain they publish: at least one buffer, and no more than the
    queue size, also in an indirect table (virtio 1.2, 2.7.5.3.1 for split, 2.8.19 for packed)."""
    if count == 0:
        raise DeviceUsageError("a chain needs at least one buffer")
    if count > size:
        raise DeviceUsageError(
            f"a chain of {count} buffers is longer than the queue size {size}; a well-behaved"
            " driver never makes one (write a hostile one with the raw methods)"
        )


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
    (see :meth:`alloc_at`). ``buffers`` holds the bytearrays made for the regions, in ``regions``
    order (none for a memory made by :meth:`over`: its buffers are their owner's).
    """

    buffers: list[bytearray]

    def __init__(
        self,
        size: int = 1 << 22,
        *,
        base: int = 0x10000,
        regions: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        spec = list(regions) if regions is not None else [(base, size)]
        self.buffers = [bytearray(n) for _, n in spec]
        self._build([(a, b) for (a, _), b in zip(spec, self.buffers, strict=True)])

    @classmethod
    def over(cls, regions: Sequence[tuple[int, WriteBuffer]]) -> FakeMemory:
        """Fake memory whose regions are ``(driver address, buffer)`` pairs owned by the caller
        (an ``mmap`` shared with another process): the allocator serves them, and :meth:`close`
        releases the views it handed out but leaves the buffers to their owner."""
        mem = cls.__new__(cls)
        mem.buffers = []
        mem._build(regions)
        return mem

    def _build(self, regions: Sequence[tuple[int, WriteBuffer]]) -> None:
        self.memory = GuestMemory(regions)
        self._regions = [_Region(r.start, r.size) for r in self.memory.regions]  # sorted
        self._pieces: dict[int, list[int]] = {}  # alloc_at start -> piece starts, one per region
        self.locate: Locate = self.memory.locate  # the fast path of DriverMem, passed through

    def copy_allocations(self, source: FakeMemory) -> None:
        """Take over the allocations of ``source``, a memory with the same regions (a copy of its
        contents, e.g. guest RAM cloned into a new memfd), so that what was allocated there,
        buffers of chains in flight included, is allocated and can be freed here."""
        layout = [(r.start, r.end) for r in source._regions]
        if [(r.start, r.end) for r in self._regions] != layout:
            raise DeviceUsageError(f"copy_allocations from a memory with other regions: {layout}")
        for mine, theirs in zip(self._regions, source._regions, strict=True):
            mine.free = list(theirs.free)
            mine.allocs = dict(theirs.allocs)
        self._pieces = {addr: list(p) for addr, p in source._pieces.items()}

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

    def alloc_buffer(self, data: bytes | int) -> int:
        """A buffer holding ``data`` (or ``data`` zero bytes), 8-aligned; returns its address."""
        if isinstance(data, int):
            return self.alloc(data, 8)
        addr = self.alloc(len(data), 8)
        self.write(addr, data)
        return addr

    def alloc_chain(
        self, readable: Sequence[bytes], writable: Sequence[int]
    ) -> list[tuple[int, int, int]]:
        """The buffers of a chain a fake driver publishes, in chain order, as ``(addr, len,
        flags)``: the readable ones holding their contents, then the writable ones of the given
        lengths, with the WRITE flag (the same bit in both ring formats)."""
        entries = [(self.alloc_buffer(data), len(data), 0) for data in readable]
        entries += [(self.alloc_buffer(n), n, _WRITE) for n in writable]
        return entries

    def alloc_table(self, layout: Layout[_R], entries: Sequence[_R]) -> int:
        """A 16-aligned table of ``entries`` packed with ``layout`` (room for one record when
        ``entries`` is empty, so the address is still a real allocation); returns its address."""
        table = self.alloc(layout.size * max(len(entries), 1), 16)
        self.write(table, b"".join(map(layout.pack, entries)))
        return table

    def read_written(self, buffers: Sequence[tuple[int, int]], length: int) -> tuple[bytes, ...]:
        """What a device wrote into ``(addr, len)`` buffers, in order, cut to ``length`` bytes
        (the used length it reported)."""
        written: list[bytes] = []
        for addr, blen in buffers:
            n = min(length, blen)
            written.append(self.read(addr, n))
            length -= n
        return tuple(written)

    @property
    def end(self) -> int:
        """One past the highest driver address in memory (the end of the highest region): where
        a buffer that straddles the end of guest memory crosses it, and past which nothing is
        mapped."""
        return self._regions[-1].end

    @property
    def allocated(self) -> int:
        """Bytes currently allocated (for leak checks)."""
        return sum(n for r in self._regions for n in r.allocs.values())

    def read(self, addr: int, length: int) -> bytes:
        """Bytes at ``addr``; may span adjacent regions."""
        found = self.locate(addr, length) if length > 0 else None
        if found is not None:  # in one region: one copy (the test front-end's hot path)
            view, off = found
            return bytes(view[off : off + length])
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
        found = self.locate(addr, len(src)) if len(src) > 0 else None
        if found is not None:  # in one region: one copy
            view, off = found
            view[off : off + len(src)] = src
            return
        pos, end = addr, addr + len(src)
        while pos < end:
            r = self._region_of(pos)
            stop = min(end, r.end)
            self.memory.write(pos, src[pos - addr : stop - addr])
            pos = stop

    def close(self) -> None:
        self.memory.close()
