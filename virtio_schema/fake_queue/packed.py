"""The driver's half of a packed queue, for tests (see :mod:`virtio_schema.fake_queue`).

It behaves like Linux's packed-ring driver (virtio 1.2, 2.8.13 and 2.8.21): a chain occupies
consecutive slots from the driver's avail position, wrapping at the ring's end; each descriptor's
``AVAIL``/``USED`` bits carry the wrap counter of the lap its slot is on; the buffer id is written in
the last descriptor; the first descriptor's flags are written last, after a write barrier, which makes
the whole chain available at once. Used descriptors are read back at the driver's used position,
which advances by the slots each returned chain took.

Positions are reported like vhost-user and QEMU pack them: ``position | wrap_counter << 15``.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field

from virtio_schema.errors import DeviceUsageError
from virtio_schema.fake_queue.malformed import (
    Malformed,
    check_features,
    check_format,
    malformed_chain,
)
from virtio_schema.fake_queue.memory import FakeMemory, check_chain_length
from virtio_schema.fake_queue.split import UsedChain
from virtio_schema.mem import DeviceRange, DriverRange, write_barrier
from virtio_schema.queue import QueueMemory, QueueState, vring_need_event
from virtio_schema.ring import PACKED_DESC, EventArea, PackedDesc, PackedRing
from virtio_schema.schema import (
    EVENT_SUPPRESSION_ALIGN,
    PACKED_RING_ALIGN,
    EventFlags,
    Feature,
    PackedDescFlags,
)

__all__ = ["FakePackedDriver"]

_AVAIL = int(PackedDescFlags.AVAIL)
_USED = int(PackedDescFlags.USED)
_NEXT = int(PackedDescFlags.NEXT)
_WRITE = int(PackedDescFlags.WRITE)
_INDIRECT = int(PackedDescFlags.INDIRECT)


@dataclass
class _Chain:
    slots: int
    buffers: list[int]
    writable: list[tuple[int, int]]
    table: int | None = None


@dataclass
class FakePackedDriver:
    """The driver's half of a packed queue on :class:`~virtio_schema.fake_queue.FakeMemory`.

    The same calls as :class:`~virtio_schema.fake_queue.FakeDriver` where the formats agree
    (``publish``, ``push_malformed``, ``used``, ``alloc_buffer``, ``set_no_interrupt``,
    ``no_notify``, ``kick_needed``, ``avail_idx``), plus packed-specific raw access (``push_raw``,
    ``write_slot``, ``set_driver_event``).
    """

    memory: FakeMemory
    size: int
    features: int = int(Feature.RING_PACKED)
    start: QueueState = field(default_factory=QueueState)

    def __post_init__(self) -> None:
        n = self.size
        m = self.memory
        self.ring_addr = m.alloc(PACKED_DESC.size * n, PACKED_RING_ALIGN)
        self.driver_event_addr = m.alloc(4, EVENT_SUPPRESSION_ALIGN)
        self.device_event_addr = m.alloc(4, EVENT_SUPPRESSION_ALIGN)
        self.ring = PackedRing(self._range(self.ring_addr, PACKED_DESC.size * n), n)
        self.driver_event = EventArea(self._range(self.driver_event_addr, 4), "driver event area")
        self.device_event = EventArea(self._range(self.device_event_addr, 4), "device event area")
        self.avail_pos = self.start.next_avail
        self.avail_wrap = self.start.avail_wrap
        self.used_pos = self.start.next_used
        self.used_wrap = self.start.used_wrap
        self._free_ids: list[int] = list(range(n - 1, -1, -1))
        self._free_slots = n
        self._chains: dict[int, _Chain] = {}
        self._raw_slots: dict[int, int] = {}
        self._order: collections.deque[int] = collections.deque()  # buffer ids, publish order
        if self.avail_pos or not self.avail_wrap:
            # a resumed ring: mark every slot as used on the previous lap, so nothing looks available
            for i in range(n):
                lap = self.avail_wrap if i < self.avail_pos else not self.avail_wrap
                bits = (_AVAIL | _USED) if lap else 0
                self.ring.set(i, PackedDesc(0, 0, 0, bits))

    def _range(self, addr: int, length: int) -> DeviceRange:
        dr = self.memory.translate(DriverRange.from_addr_len(addr, length))
        assert dr is not None
        return dr

    def queue_memory(self) -> QueueMemory:
        """Descriptor ring, driver event area, device event area, for the device's queue."""
        return QueueMemory(
            desc=self._range(self.ring_addr, PACKED_DESC.size * self.size),
            avail=self._range(self.driver_event_addr, 4),
            used=self._range(self.device_event_addr, 4),
        )

    # --- positions -----------------------------------------------------------------------------

    @property
    def avail_idx(self) -> int:
        """The driver's avail position and wrap counter, ``pos | wrap << 15``."""
        return self.avail_pos | (self.avail_wrap << 15)

    @property
    def used_idx(self) -> int:
        """The driver's used position and wrap counter, ``pos | wrap << 15``."""
        return self.used_pos | (self.used_wrap << 15)

    @property
    def free_descriptors(self) -> int:
        return self._free_slots

    @property
    def in_flight(self) -> int:
        return len(self._chains) + len(self._raw_slots)

    def _avail_bits(self, wrap: bool) -> int:
        return _AVAIL if wrap else _USED

    def _advance(self, slots: int) -> list[tuple[int, bool]]:
        """The (slot, lap) of ``slots`` consecutive slots from the avail position; advances it."""
        out = []
        for _ in range(slots):
            out.append((self.avail_pos, self.avail_wrap))
            self.avail_pos += 1
            if self.avail_pos == self.size:
                self.avail_pos = 0
                self.avail_wrap = not self.avail_wrap
        return out

    # --- well-formed chains --------------------------------------------------------------------

    def publish(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
    ) -> int | None:
        """Publish a chain; returns its buffer id, or ``None`` if the ring has no room."""
        count = len(readable) + len(writable)
        check_chain_length(count, self.size)
        slots = 1 if indirect else count
        if slots > self._free_slots or not self._free_ids:
            return None
        if indirect and not self.features & Feature.INDIRECT_DESC:
            raise DeviceUsageError("publish(indirect=True) needs INDIRECT_DESC in features")
        buf_id = self._free_ids.pop()
        entries = self.memory.alloc_chain(readable, writable)
        chain = _Chain(
            slots, [addr for addr, _, _ in entries], [(a, n) for a, n, flags in entries if flags]
        )
        if indirect:
            table = self.memory.alloc_table(
                PACKED_DESC, [PackedDesc(addr, length, 0, flags) for addr, length, flags in entries]
            )
            chain.table = table
            entries = [(table, PACKED_DESC.size * count, _INDIRECT)]
        self._chains[buf_id] = chain
        self._order.append(buf_id)
        self._free_slots -= slots
        self._write_chain(
            [
                PackedDesc(addr, length, buf_id, flags | (_NEXT if k + 1 < len(entries) else 0))
                for k, (addr, length, flags) in enumerate(entries)
            ]
        )
        return buf_id

    def _write_chain(self, descs: Sequence[PackedDesc], *, raw_flags: bool = False) -> int:
        """Write ``descs`` at the avail position, the head's flags last; returns the head slot."""
        places = self._advance(len(descs))
        for k in range(len(descs) - 1, -1, -1):
            slot, lap = places[k]
            d = descs[k]
            flags = d.flags if raw_flags else (d.flags | self._avail_bits(lap))
            if k == 0:
                self.ring.set(slot, PackedDesc(d.addr, d.len, d.id, self.ring.flags(slot)))
                write_barrier()  # the chain before the head's flags that publish it
                self.ring.set_flags(slot, flags)
            else:
                self.ring.set(slot, PackedDesc(d.addr, d.len, d.id, flags))
        return places[0][0]

    # --- raw access for hostile tests ----------------------------------------------------------

    def push_raw(self, descs: Sequence[PackedDesc], *, raw_flags: bool = False) -> int:
        """Make ``descs`` available as one chain at the avail position, as given (``next``-style
        NEXT flags, ids, lengths untouched). The AVAIL/USED bits are set for each slot's lap
        unless ``raw_flags``. Returns the head slot. Used entries for it are reported raw."""
        if descs:
            self._raw_slots[descs[-1].id] = len(descs)
            self._order.append(descs[-1].id)
        return self._write_chain(descs, raw_flags=raw_flags)

    def write_slot(self, index: int, addr: int, length: int, flags: int, buffer_id: int) -> None:
        """Write slot ``index`` as given (no availability logic at all)."""
        self.ring.set(index, PackedDesc(addr, length, buffer_id, flags))

    def alloc_buffer(self, data: bytes | int) -> int:
        """Allocate a buffer holding ``data`` (or ``data`` zero bytes); returns its address."""
        return self.memory.alloc_buffer(data)

    def write_indirect_table(self, entries: Sequence[PackedDesc]) -> int:
        """Allocate and fill an indirect table with raw entries; returns its address."""
        return self.memory.alloc_table(PACKED_DESC, entries)

    # --- malformed chains, the same calls as FakeDriver ----------------------------------------

    def push_malformed(self, kind: Malformed) -> int:
        """Publish a malformed chain of ``kind`` at the avail position (see
        :class:`~virtio_schema.fake_queue.Malformed` for what the device sees, per format);
        returns its buffer id, what the used descriptor will name (for ID_OUT_OF_RANGE: the id
        written, the queue size). When the device returns the chain, :meth:`used` reports
        ``UsedChain(buffer_id, len, ())`` and frees its slots, id and buffers. Raises
        :class:`~virtio_schema.fake_queue.NotInThisFormat` for NEXT_OUT_OF_RANGE (a packed
        chain has no ``next``) and :class:`~virtio_schema.errors.DeviceUsageError` if the features
        do not fit the kind or the ring has no room (LOOP needs it empty), in both cases writing
        nothing.

        >>> from virtio_schema.fake_queue import Malformed, UsedChain, make_queue
        >>> from virtio_schema.schema import Feature
        >>> fq = make_queue(8, packed=True, features=Feature.INDIRECT_DESC)
        >>> buffer_id = fq.driver.push_malformed(Malformed.NESTED_INDIRECT)
        >>> chain = fq.queue.next_chain()
        >>> type(chain.error).__name__
        'NestedIndirect'
        >>> chain.return_written(0)
        >>> fq.driver.used() == [UsedChain(buffer_id, 0, ())]
        True
        """
        check_format(kind, packed=True)
        check_features(kind, self.features)
        if kind is Malformed.LOOP or kind is Malformed.ID_OUT_OF_RANGE:
            # LOOP: NEXT on every slot, so no slot ends the chain and holds its id (virtio 1.2,
            # 2.8.6); ID_OUT_OF_RANGE: one descriptor whose id is not below the size. Either way
            # the chain cannot come back (the queue breaks): its slots (and LOOP's id) stay taken.
            slots = self.size if kind is Malformed.LOOP else 1
            self._check_room(kind, slots)
            buf = self.memory.alloc_buffer(bytes(range(16)))
            buf_id = self._free_ids.pop() if kind is Malformed.LOOP else self.size
            flags = _NEXT if kind is Malformed.LOOP else 0
            self._free_slots -= slots
            self._write_chain([PackedDesc(buf, 16, buf_id, flags)] * slots)
            return buf_id
        chain = malformed_chain(kind, self.memory, self.size, self._pack_table)
        try:
            self._check_room(kind, len(chain.entries))
        except DeviceUsageError:
            chain.release(self.memory)
            raise
        buf_id = self._free_ids.pop()
        self._chains[buf_id] = _Chain(len(chain.entries), chain.allocations, [])
        self._order.append(buf_id)
        self._free_slots -= len(chain.entries)
        last = len(chain.entries) - 1
        self._write_chain(
            [
                PackedDesc(addr, length, buf_id, flags | (_NEXT if k < last else 0))
                for k, (addr, length, flags) in enumerate(chain.entries)
            ]
        )
        return buf_id

    def _check_room(self, kind: Malformed, slots: int) -> None:
        if kind is Malformed.LOOP and self._free_slots < self.size:
            raise DeviceUsageError(
                f"{kind} takes the whole ring: wait for every chain to come back"
            )
        if slots > self._free_slots or not self._free_ids:
            raise DeviceUsageError(
                f"no room for {kind}: it takes {slots} slots and an id, {self._free_slots} slots"
                f" and {len(self._free_ids)} ids are free"
            )

    def _pack_table(self, entries: Sequence[tuple[int, int, int]]) -> int:
        return self.memory.alloc_table(
            PACKED_DESC, [PackedDesc(addr, length, 0, flags) for addr, length, flags in entries]
        )

    # --- reading back --------------------------------------------------------------------------

    def used(self) -> list[UsedChain]:
        """Every used descriptor the device wrote since the last call, in ring order."""
        out: list[UsedChain] = []
        for _ in range(self.size):
            flags = self.ring.flags(self.used_pos)
            wrap = self.used_wrap
            if bool(flags & _AVAIL) != wrap or bool(flags & _USED) != wrap:
                break
            d = self.ring.get(self.used_pos)
            if self.features & Feature.IN_ORDER and d.id in self._order:
                # virtio 1.2, 2.8.20: one used descriptor may complete every chain up to its id
                while self._order:
                    first = self._order.popleft()
                    out.append(self._take_back(first, d.len if first == d.id else 0))
                    if first == d.id:
                        break
                continue
            if d.id in self._order:
                self._order.remove(d.id)
            out.append(self._take_back(d.id, d.len))
        return out

    def _take_back(self, buf_id: int, length: int) -> UsedChain:
        chain = self._chains.pop(buf_id, None)
        if chain is None:
            slots = self._raw_slots.pop(buf_id, 1)
            self._step_used(slots)
            return UsedChain(buf_id, length, ())
        self._step_used(chain.slots)
        written = self.memory.read_written(chain.writable, length)
        for addr in chain.buffers:
            self.memory.free(addr)
        if chain.table is not None:
            self.memory.free(chain.table)
        self._free_slots += chain.slots
        self._free_ids.append(buf_id)
        return UsedChain(buf_id, length, written)

    def _step_used(self, slots: int) -> None:
        self.used_pos += slots
        if self.used_pos >= self.size:
            self.used_pos -= self.size
            self.used_wrap = not self.used_wrap

    # --- notification fields -------------------------------------------------------------------

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        """Write the driver event suppression area as given."""
        self.driver_event.set(off_wrap & 0xFFFF, flags & 0xFFFF)

    def set_no_interrupt(self, on: bool) -> None:
        """DISABLE or ENABLE used-buffer notifications."""
        off_wrap = self.driver_event.off_wrap()
        self.set_driver_event(off_wrap, EventFlags.DISABLE if on else EventFlags.ENABLE)

    def set_used_event(self, value: int) -> None:
        """Ask to be notified when the device's used position passes ``value`` (``pos | wrap << 15``;
        DESC mode, meaningful with EVENT_IDX)."""
        self.set_driver_event(value, EventFlags.DESC)

    @property
    def no_notify(self) -> bool:
        """The device asked not to be kicked (device event area DISABLE)."""
        return self.device_event.flags() == EventFlags.DISABLE

    @property
    def avail_event(self) -> int:
        """The device event area's ``off_wrap``."""
        return self.device_event.off_wrap()

    def kick_needed(self, old_avail_idx: int) -> bool:
        """Whether a driver that moved its avail position from ``old_avail_idx`` (``pos | wrap <<
        15``) to now must kick (Linux ``virtqueue_kick_prepare_packed``)."""
        flags = self.device_event.flags()
        if flags != EventFlags.DESC or not self.features & Feature.EVENT_IDX:
            return flags != EventFlags.DISABLE
        off_wrap = self.device_event.off_wrap()
        event = off_wrap & 0x7FFF
        if bool(off_wrap >> 15) != self.avail_wrap:
            event -= self.size
        return vring_need_event(event & 0xFFFF, self.avail_pos, old_avail_idx & 0x7FFF)
