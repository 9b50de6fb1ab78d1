"""The driver's half of a split queue, for tests (see :mod:`virtio_schema.fake_queue`)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from virtio_schema.errors import DeviceUsageError
from virtio_schema.fake_queue.malformed import (
    Malformed,
    check_features,
    check_format,
    malformed_chain,
)
from virtio_schema.fake_queue.memory import FakeMemory, check_chain_length
from virtio_schema.mem import DeviceRange, DriverRange, write_barrier
from virtio_schema.queue import QueueMemory, QueueState, vring_need_event
from virtio_schema.ring import DESC, AvailRing, Desc, DescTable, UsedRing, linked_descs
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

__all__ = ["FakeDriver", "UsedChain"]


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
        self.remap(m)
        self._free: list[int] = list(range(n - 1, -1, -1))  # a stack: 0 is taken first
        self._published: dict[int, _Published] = {}
        self._order: collections.deque[int] = collections.deque()  # heads, in publish order
        self.avail_idx = self.start.next_avail
        self.last_used = self.start.next_used
        self.avail.set_idx(self.avail_idx)
        self.used_ring.set_idx(self.start.next_used)

    def remap(self, memory: FakeMemory) -> None:
        """Drive the rings through ``memory`` from now on: the same driver addresses over new
        backing (what a vhost-user front-end does after a memory table change). The chains in
        flight carry over, so ``memory`` must hold their allocations
        (:meth:`FakeMemory.copy_allocations`)."""
        n = self.size
        self.memory = memory
        self.desc_table = DescTable(self._range(self.desc_addr, DESC.size * n), n)
        self.avail = AvailRing(self._range(self.avail_addr, avail_ring(n).sizeof()), n)
        self.used_ring = UsedRing(self._range(self.used_addr, used_ring(n).sizeof()), n)

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
        check_chain_length(count, self.size)
        need = 1 if indirect else count
        if need > len(self._free) or self.in_flight >= self.size:
            return None
        if indirect and not self.features & Feature.INDIRECT_DESC:
            raise DeviceUsageError("publish(indirect=True) needs INDIRECT_DESC in features")
        entries = self.memory.alloc_chain(readable, writable)
        pub = _Published(
            [], [addr for addr, _, _ in entries], [(a, n) for a, n, flags in entries if flags]
        )
        if indirect:
            pub.table = table = self.memory.alloc_table(DESC, linked_descs(entries, range(count)))
            head = self._free.pop()
            pub.descs.append(head)
            self.desc_table.set(head, Desc(table, DESC.size * count, DescFlags.INDIRECT, 0))
        else:
            pub.descs = idx = [self._free.pop() for _ in range(count)]
            for i, desc in zip(idx, linked_descs(entries, idx), strict=True):
                self.desc_table.set(i, desc)
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
        return self.memory.alloc_buffer(data)

    def write_indirect_table(self, entries: Sequence[Desc]) -> int:
        """Allocate and fill an indirect table with raw entries; returns its address."""
        return self.memory.alloc_table(DESC, entries)

    def push_head(self, head: int) -> None:
        """Put ``head`` (any u16) in the next avail slot and publish it (idx + 1)."""
        self._order.append(head)
        self.avail.set_ring(self.avail_idx % self.size, head)
        write_barrier()
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.avail.set_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Write ``avail.idx`` directly (e.g. a jump past the queue size)."""
        self.avail_idx = value & 0xFFFF
        self.avail.set_idx(self.avail_idx)

    # --- malformed chains, the same calls as FakePackedDriver ----------------------------------

    def push_malformed(self, kind: Malformed) -> int:
        """Publish a malformed chain of ``kind`` (see :class:`~virtio_schema.fake_queue.Malformed`
        for what the device sees, per format); returns its head, what the used entry will name
        (for ID_OUT_OF_RANGE: the head named in the available ring, the queue size). When the
        device returns the chain, :meth:`used` reports ``UsedChain(head, len, ())`` and frees its
        descriptors and buffers. Raises
        :class:`~virtio_schema.fake_queue.NotInThisFormat` for INDIRECT_NOT_ALONE (legal in a
        split ring) and :class:`~virtio_schema.errors.DeviceUsageError` if the features do not
        fit the kind or the ring has no room, in both cases writing nothing.

        >>> from virtio_schema.fake_queue import Malformed, UsedChain, make_queue
        >>> fq = make_queue(8)
        >>> head = fq.driver.push_malformed(Malformed.LOOP)
        >>> chain = fq.queue.next_chain()
        >>> type(chain.error).__name__
        'ChainTooLong'
        >>> chain.return_written(0)
        >>> fq.driver.used() == [UsedChain(head, 0, ())]
        True
        """
        check_format(kind, packed=False)
        check_features(kind, self.features)
        if self.in_flight >= self.size:
            raise DeviceUsageError(f"no room for {kind}: {self.size} chains in flight")
        if kind is Malformed.ID_OUT_OF_RANGE:
            self.push_head(self.size)
            return self.size
        if kind is Malformed.LOOP or kind is Malformed.NEXT_OUT_OF_RANGE:
            count = min(2, self.size) if kind is Malformed.LOOP else 1
            self._check_room(kind, count)
            buf = self.memory.alloc_buffer(bytes(range(16)))
            idx = [self._free.pop() for _ in range(count)]
            # a loop: each descriptor links the next, the last one back to the head; otherwise
            # one descriptor whose next is one past the table (virtio 1.2, 2.7.5.2)
            links = idx[1:] + idx[:1] if kind is Malformed.LOOP else [self.size]
            for i, nxt in zip(idx, links, strict=True):
                self.desc_table.set(i, Desc(buf, 16, DescFlags.NEXT, nxt))
            return self._push_malformed(idx, [buf])
        chain = malformed_chain(kind, self.memory, self.size, self._pack_table)
        try:
            self._check_room(kind, len(chain.entries))
        except DeviceUsageError:
            chain.release(self.memory)
            raise
        idx = [self._free.pop() for _ in chain.entries]
        for i, desc in zip(idx, linked_descs(chain.entries, idx), strict=True):
            self.desc_table.set(i, desc)
        return self._push_malformed(idx, chain.allocations)

    def _check_room(self, kind: Malformed, count: int) -> None:
        if count > len(self._free):
            raise DeviceUsageError(
                f"no room for {kind}: it takes {count} descriptors, {len(self._free)} are free"
            )

    def _pack_table(self, entries: Sequence[tuple[int, int, int]]) -> int:
        return self.memory.alloc_table(DESC, linked_descs(entries, range(len(entries))))

    def _push_malformed(self, descs: list[int], allocations: list[int]) -> int:
        head = descs[0]
        self._published[head] = _Published(descs, allocations, [])
        self.push_head(head)
        return head

    # --- reading back --------------------------------------------------------------------------

    @property
    def used_idx(self) -> int:
        return self.used_ring.idx()

    def used(self) -> list[UsedChain]:
        """Every used entry the device published since the last call, in order. Chains published
        with :meth:`publish` are taken apart (descriptors and buffers freed)."""
        out: list[UsedChain] = []
        end = self.used_ring.idx()
        in_order = bool(self.features & Feature.IN_ORDER)
        while self.last_used != end:
            slot = self.last_used % self.size
            elem = self.used_ring.elem(slot)
            self.last_used = (self.last_used + 1) & 0xFFFF
            if in_order and self._order:
                # virtio 1.2, 2.7.10.1: one element may complete a run of chains; the slots of
                # the run's other chains hold nothing (the fake poisons consumed slots so stale
                # ids cannot pass for a completion)
                head = self._order.popleft()
                length = elem.len if elem.id == head else 0
                self.used_ring.set_elem(slot, 0xFFFFFFFF, 0)
                out.append(self._take_back(head, length))
                continue
            if self._order and self._order[0] == elem.id:
                self._order.popleft()
            elif elem.id in self._order:
                self._order.remove(elem.id)
            out.append(self._take_back(elem.id, elem.len))
        return out

    def _take_back(self, head: int, length: int) -> UsedChain:
        pub = self._published.pop(head, None)
        if pub is None:
            return UsedChain(head, length, ())
        written = self.memory.read_written(pub.writable, length)
        for addr in pub.buffers:
            self.memory.free(addr)
        if pub.table is not None:
            self.memory.free(pub.table)
        self._free.extend(reversed(pub.descs))
        return UsedChain(head, length, written)

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
