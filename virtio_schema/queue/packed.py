"""The packed virtqueue state machine, device side (virtio 1.2, 2.8).

Theory of operation. The ring is one array of ``size`` descriptors shared by both sides. The driver
makes a chain available by writing its descriptors in consecutive slots (wrapping at ``size``) and,
last, the first descriptor's flags with ``AVAIL`` equal to its wrap counter and ``USED`` the
opposite. ``next_chain()`` reads that first descriptor's flags; if the slot is available it hands a
:class:`PackedSlots` cursor (consecutive slots; a :class:`PackedTable` for an indirect table) to the
one validator, :class:`~virtio_schema.queue.walk.Validator`, which reads each descriptor once as a
whole record and judges it; then it takes the buffer id from the last descriptor and advances its
avail position by the slots the chain took.
Returning a chain writes ONE used descriptor at the device's used position: id and length first,
then, after the write barrier, flags with ``AVAIL`` = ``USED`` = the used wrap counter; the used
position advances by the slots the chain took (out-of-order returns are legal: each return takes the
next used position).

Rules of this module (and of :mod:`virtio_schema.queue.split`, whose rules apply here too):

1. Every value read from the ring is read once and validated; work per ``next_chain()`` is bounded
   by ``size`` slots, plus one indirect table whose entries count against the same limit.
2. What can be returned is returned: a chain whose extent and buffer id are known but whose contents
   break a rule is handed out with ``error`` set and goes back with length 0. A chain whose end
   cannot be found (``NEXT`` on ``size`` consecutive slots) or whose buffer id is not below the queue
   size cannot be returned: the queue latches broken.
3. Notifications: the driver event area says when to notify (ENABLE / DISABLE / DESC with an
   offset and wrap bit, EVENT_IDX only), the device event area is where this queue says when it wants
   kicks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from virtio_schema.errors import DeviceUsageError
from virtio_schema.mem import STRONG_ORDER, DriverMem, full_barrier, read_barrier, write_barrier
from virtio_schema.queue.base import QueueBase
from virtio_schema.queue.desc_chain import DescChain
from virtio_schema.queue.errors import (
    BufferIdOutOfRange,
    ChainError,
    ChainNeverEnds,
    InvalidQueueState,
    QueueBroken,
    RingError,
)
from virtio_schema.queue.state import (
    DriverNotify,
    PackedInflightLog,
    QueueMemory,
    QueueState,
    vring_need_event,
)
from virtio_schema.queue.walk import (
    NEXT,
    WRITE,
    ChainBuffers,
    CheckedChain,
    DescSource,
    Validator,
)
from virtio_schema.ring import PACKED_DESC, EventArea, PackedRing
from virtio_schema.schema import EventFlags, Feature, PackedDescFlags

__all__ = ["PackedQueue", "PackedSlots", "PackedTable"]

_AVAIL: Final = int(PackedDescFlags.AVAIL)
_USED: Final = int(PackedDescFlags.USED)
_ENABLE: Final = int(EventFlags.ENABLE)
_DISABLE: Final = int(EventFlags.DISABLE)
_DESC: Final = int(EventFlags.DESC)
_unpack_desc: Final = PACKED_DESC.struct.unpack_from


class PackedTable(DescSource):
    """The entries of a packed indirect table: all of them, in table order; NEXT means nothing
    there (virtio 1.2, 2.8.19)."""

    def __init__(self) -> None:
        super().__init__()
        self.view = memoryview(b"")
        self.offset = 0
        self.entries = 0

    def start(self, view: memoryview, offset: int, entries: int) -> None:
        """Stand on (read) the first entry of the ``entries``-descriptor table at
        ``view[offset:]``."""
        self.view = view
        self.offset = offset
        self.entries = entries
        self._read(0)

    def _read(self, index: int) -> None:
        self.at = index
        self.reads = self.reads + 1  # not += on an inherited attribute: mypyc 2.4 fails on it
        self.addr, self.length, _id, self.flags = _unpack_desc(
            self.view, self.offset + PACKED_DESC.size * index
        )

    def advance(self) -> bool:
        index = self.at + 1
        if index >= self.entries:
            return False
        self.at = index  # _read, inlined: this is the walk's inner loop
        self.reads = self.reads + 1
        self.addr, self.length, _id, self.flags = _unpack_desc(
            self.view, self.offset + PACKED_DESC.size * index
        )
        return True

    def table(self, view: memoryview, offset: int, entries: int) -> DescSource:
        raise AssertionError("the walk refuses an indirect descriptor inside a table")


class PackedSlots(DescSource):
    """The descriptors of a packed chain: consecutive ring slots from the avail position,
    wrapping at the ring's end, while NEXT is set (virtio 1.2, 2.8.6). ``taken`` counts the slots
    read; ``buffer_id`` is the id of the last one (the chain's, 2.8.6). A chain that does not end
    within ``size`` slots is :class:`~virtio_schema.queue.ChainNeverEnds` (a ring error)."""

    def __init__(self, queue: int, size: int) -> None:
        super().__init__()
        self.queue = queue
        self.size = size
        self.view = memoryview(b"")
        self.head = 0
        self.taken = 0
        self.buffer_id = 0
        self.indirect = PackedTable()

    def start(self, view: memoryview, head: int) -> None:
        """Stand on (read) slot ``head``, the first descriptor of a chain."""
        self.view = view
        self.head = head
        self.taken = 0
        self._read(head)

    def _read(self, pos: int) -> None:
        self.at = pos
        self.taken += 1
        self.reads = self.reads + 1  # not += on an inherited attribute: mypyc 2.4 fails on it
        self.addr, self.length, self.buffer_id, self.flags = _unpack_desc(
            self.view, PACKED_DESC.size * pos
        )

    def advance(self) -> bool:
        if not self.flags & NEXT:
            return False
        if self.taken >= self.size:
            raise ChainNeverEnds(self.queue, self.head, self.size)
        pos = self.at + 1 if self.at + 1 < self.size else 0
        self.at = pos  # _read, inlined: this is the walk's inner loop
        self.taken += 1
        self.reads = self.reads + 1
        self.addr, self.length, self.buffer_id, self.flags = _unpack_desc(
            self.view, PACKED_DESC.size * pos
        )
        return True

    def finish(self) -> None:
        """Read on to the chain's last slot (after a walk that stopped at an error)."""
        while self.advance():
            pass

    def table(self, view: memoryview, offset: int, entries: int) -> DescSource:
        self.indirect.start(view, offset, entries)
        return self.indirect


class PackedQueue(QueueBase):
    """A packed virtqueue, device side: the same contract as :class:`~virtio_schema.queue.Queue`.

    ``memory.desc`` is the descriptor ring, ``memory.avail`` the driver event suppression area
    (driver area), ``memory.used`` the device event suppression area (device area). ``size`` is any
    value in 1..32768. ``state`` carries ring positions (``0 <= next_avail, next_used < size``) and
    the wrap counters.
    """

    def __init__(
        self,
        memory: QueueMemory,
        size: int,
        driver_mem: DriverMem,
        *,
        features: int,
        notify: DriverNotify,
        state: QueueState | None = None,
        index: int = 0,
    ) -> None:
        self.ring = PackedRing(memory.desc, size)
        self.driver_event = EventArea(memory.avail, "driver event area")
        self.device_event = EventArea(memory.used, "device event area")
        super().__init__(size, driver_mem, features, notify, index)
        self._event_idx = bool(features & Feature.EVENT_IDX)
        self._ring_view = self.ring.view
        ring, drv, dev = self.ring, self.driver_event, self.device_event
        # what the driver polls (a descriptor's flags, the device event area) is stored as one
        # word each: pack_into would zero it first (see virtio_schema.mem, rule 3); what the
        # driver writes is read the same way; indices are byte offsets // width
        self._ring_w16 = ring.range.le16()
        self._ring_w32 = ring.range.le32()
        self._id_w = ring.id_offset >> 1  # descriptor k: + 8k in 16-bit words, + 4k in 32-bit
        self._len_w = ring.len_offset >> 2
        self._flags_w = ring.flags_offset >> 1
        self._dev_words = dev.range.le16()
        self._dev_off_wrap_w = dev.off_wrap_offset >> 1
        self._dev_flags_w = dev.flags_offset >> 1
        # the notification decision reads the driver's area whole, as one 32-bit word: its
        # flags and offset are then from the same moment (Linux reads the device's area so)
        self._drv_event = drv.range.le32()
        self._drv_off_wrap_shift = 8 * drv.off_wrap_offset
        self._drv_flags_shift = 8 * drv.flags_offset
        self._slots = PackedSlots(index, size)
        self._validator = Validator(
            index, size, driver_mem, self._locate, indirect=self._indirect, indirect_alone=True
        )
        self._inflight: PackedInflightLog | None = None
        self._entries: dict[int, int] = {}  # buffer id -> its entry in the inflight log
        self._start(state or QueueState())

    # --- state ---------------------------------------------------------------------------------

    def _check_state(self, state: QueueState) -> None:
        for name in ("next_avail", "next_used"):
            if getattr(state, name) >= self.size:
                raise InvalidQueueState(
                    f"QueueState.{name} = {getattr(state, name)} is not a ring position below"
                    f" {self.size}"
                )

    def _start_format(self, state: QueueState) -> None:
        self._next_avail = state.next_avail
        self._avail_wrap = state.avail_wrap
        self._next_used = state.next_used
        self._used_wrap = state.used_wrap
        self._signalled_used = state.next_used

    @property
    def next_avail(self) -> int:
        """The ring position of the next chain to take."""
        return self._next_avail

    @property
    def next_used(self) -> int:
        """The ring position the next used descriptor goes to."""
        return self._next_used

    @property
    def descriptors_read(self) -> int:
        """Descriptors read from guest memory since the queue was made (ring slots and indirect
        entries, each read once): what tests and fuzzers bound."""
        return self._slots.reads + self._slots.indirect.reads

    def state(self) -> QueueState:
        """Ring positions and wrap counters (vhost-user packs them as ``idx | wrap << 15``)."""
        return QueueState(self._next_avail, self._next_used, self._avail_wrap, self._used_wrap)

    # --- taking chains -------------------------------------------------------------------------

    def _available(self, pos: int) -> bool:
        flags = self._ring_w16[8 * pos + self._flags_w]
        wrap = self._avail_wrap
        return bool(flags & _AVAIL) == wrap and bool(flags & _USED) != wrap

    def pending(self) -> int:
        """1 if the next slot holds an available chain, else 0 (a packed ring has no index that
        counts them)."""
        if self._broken is not None:
            raise QueueBroken(self.index, self._broken)
        return int(bool(self._resubmit) or self._available(self._next_avail))

    def next_chain(self) -> DescChain | None:
        """The next available chain, or ``None`` if the slot at the avail position is not
        available.

        As :meth:`Queue.next_chain <virtio_schema.queue.Queue.next_chain>`: a chain the walk
        finds malformed comes out with ``error`` set and goes back with length 0 (the classes:
        :attr:`DescChain.error`; here also an indirect descriptor that is not alone in its chain,
        :class:`~virtio_schema.queue.IndirectWithNext`); a buffer outside guest memory leaves
        ``error`` ``None`` and raises :class:`~virtio_schema.queue.UnmappedBuffer` when the
        device's reader or writer reaches it. A chain whose extent or id cannot be known cannot
        go back, so it breaks the ring: :class:`QueueBroken` (cause
        :class:`~virtio_schema.queue.ChainNeverEnds`, NEXT on ``size`` consecutive slots, or
        :class:`~virtio_schema.queue.BufferIdOutOfRange`), now and on every later call until
        reset/restore."""
        if self._orphans:
            self._return_orphans()
        if self._broken is not None:
            raise QueueBroken(self.index, self._broken)
        if self._budget == 0:  # this turn's chains are taken (set_budget)
            return None
        if self._resubmit:
            return self._take_resubmitted()
        flags = self._ring_w16[8 * self._next_avail + self._flags_w]  # _available, inlined
        wrap = self._avail_wrap
        if bool(flags & _AVAIL) != wrap or bool(flags & _USED) == wrap:
            return None
        if not STRONG_ORDER:
            read_barrier()  # the AVAIL flag before the descriptor contents (virtio 1.2, 2.8.21)
        chain = self._walk()
        if self._in_order:
            self._outstanding.append(chain.head)
        self._budget -= 1  # a negative budget (no limit) never reaches 0
        return chain

    def _walk(self) -> DescChain:
        """Take the chain at the avail position and advance past its slots."""
        start = self._next_avail
        try:
            checked = self._check(self._slots, start)
        except RingError as exc:
            raise self._break(exc) from None
        if self._inflight is not None:
            self._record_taken(start, checked)
        nxt = start + checked.slots
        if nxt >= self.size:
            nxt -= self.size
            self._avail_wrap = not self._avail_wrap
        self._next_avail = nxt
        if self._event_idx and self._notify_enabled:
            self._write_device_event()
        return DescChain(self, checked.head, checked.buffers, checked.error, checked.slots)

    def _check(self, slots: PackedSlots, start: int) -> CheckedChain:
        """Validate the chain at ring slot ``start``. A chain that breaks a rule still has its
        extent and buffer id read, so that it can go back; one that has neither raises the
        :class:`~virtio_schema.queue.RingError` (never ends, buffer id out of range)."""
        slots.start(self._ring_view, start)
        return self._check_slots(slots, start)

    def _check_slots(self, slots: PackedSlots, start: int) -> CheckedChain:
        error: ChainError | None = None
        try:
            buffers = self._validator.walk(start, slots)
        except ChainError as exc:
            buffers = ChainBuffers()
            error = exc
        slots.finish()
        if slots.buffer_id >= self.size:
            raise BufferIdOutOfRange(self.index, start, slots.buffer_id, self.size)
        return CheckedChain(slots.buffer_id, buffers, error, slots.taken)

    def _record_taken(self, start: int, checked: CheckedChain) -> None:
        """Give the inflight log the chain's ring descriptors as they are now (a second read:
        only a restarted device uses the copy, and it validates it again)."""
        assert self._inflight is not None
        size = self.size
        view = self._ring_view
        descs = []
        for k in range(checked.slots):
            pos = start + k if start + k < size else start + k - size
            descs.append(_unpack_desc(view, PACKED_DESC.size * pos))
        self._entries[checked.head] = self._inflight.taken(descs)

    def track_inflight(
        self,
        log: PackedInflightLog | None,
        *,
        state: QueueState | None = None,
        resubmit: Sequence[tuple[int, Sequence[tuple[int, int, int, int]]]] = (),
    ) -> None:
        """Record every chain taken and published in ``log`` from now on (``None``: stop). A
        restarted device first moves to ``state`` (its recovered position) and is handed the
        chains ``resubmit`` again, in that order, before any new one: each is ``(entry, ring
        descriptors)`` as the log recorded them, read and validated again like a chain in the
        ring."""
        if state is not None:
            self.restore(state)
        self._inflight = log
        self._entries.clear()
        for entry, descs in resubmit:
            copy = bytearray(PACKED_DESC.size * len(descs))
            for k, (addr, length, buffer_id, flags) in enumerate(descs):
                PACKED_DESC.struct.pack_into(copy, PACKED_DESC.size * k, addr, length, buffer_id,
                                             flags)  # fmt: skip
            slots = PackedSlots(self.index, len(descs))
            slots.start(memoryview(copy), 0)
            try:
                checked = self._check_slots(slots, 0)
            except RingError as exc:
                raise self._break(exc) from None
            self._entries[checked.head] = entry
            self._resubmit.append(
                DescChain(self, checked.head, checked.buffers, checked.error, checked.slots)
            )

    def check_chain(self, slot: int) -> CheckedChain:
        """Validate the chain whose first descriptor is in ring ``slot`` as :meth:`next_chain`
        would, without taking it: nothing is written and the queue's state does not change (for
        dissectors such as :mod:`virtio_schema.inspect`). Raises the
        :class:`~virtio_schema.queue.RingError` for a chain that could not be returned."""
        if not 0 <= slot < self.size:
            raise DeviceUsageError(f"queue {self.index}: slot {slot} is not below {self.size}")
        return self._check(PackedSlots(self.index, self.size), slot)

    # --- returning chains ----------------------------------------------------------------------

    def _publish_batch(self, items: list[tuple[int, int, int]]) -> None:
        """Publish a batch of returns with one notification decision. Under IN_ORDER, a run of
        chains that wrote nothing followed by one chain is published as ONE used descriptor (the
        last chain's id and length) at the run's first position, the used position advancing by
        all the slots of the run (virtio 1.2, 2.8.20)."""
        if self._in_order:
            run_slots = 0
            run: list[int] = []
            for k, (head, written, slots) in enumerate(items):
                run_slots += slots
                run.append(head)
                if written or k == len(items) - 1:
                    self._publish_used(head, written, run_slots, False, run)
                    run_slots = 0
                    run = []
        else:
            for head, written, slots in items:
                self._publish_used(head, written, slots, False)
        if self._should_notify(self._next_used):
            self.notifier.notify()

    def _publish_used(
        self,
        head: int,
        written: int,
        slots: int = 1,
        decide: bool = True,
        run: Sequence[int] = (),
    ) -> None:
        """Write one used descriptor at the used position and advance it by ``slots``; then,
        unless ``decide`` is false (a batch decides once), notify if the driver asks for it.
        ``run``: the buffer ids this descriptor completes (an IN_ORDER run; default ``head``)."""
        w16 = self._ring_w16
        pos = self._next_used
        w16[8 * pos + self._id_w] = head
        self._ring_w32[4 * pos + self._len_w] = written
        flags = (_AVAIL | _USED) if self._used_wrap else 0
        if written:
            flags |= WRITE
        end, wrap = pos + slots, self._used_wrap
        if end >= self.size:
            end -= self.size
            wrap = not wrap
        log = self._inflight
        entries: list[int] = []
        if log is not None:
            for done in run or (head,):
                entry = self._entries.pop(done, None)  # None: an id the driver reused
                if entry is not None:
                    entries.append(entry)
            log.completing(entries, end, int(wrap))
        if not STRONG_ORDER:
            write_barrier()  # id and len before the flags that publish them (virtio 1.2, 2.8.21)
        w16[8 * pos + self._flags_w] = flags
        if log is not None:
            log.completed(entries)
        if self._dirty is not None:
            self.log_rings()
        pos = end
        self._used_wrap = wrap
        self._next_used = pos
        if decide and self._should_notify(pos):
            self.notifier.notify()

    def _should_notify(self, new_used: int) -> bool:
        """The used-buffer notification decision from the driver event area (virtio 1.2,
        2.8.10; the same arithmetic as QEMU's ``virtio_packed_should_notify``)."""
        full_barrier()  # the used descriptor before reading the driver's event area
        event = self._drv_event[0]  # off_wrap and flags in one load
        flags = (event >> self._drv_flags_shift) & 0xFFFF
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new_used
        self._signalled_valid = True
        if flags == _DISABLE:
            return False
        if flags != _DESC or not self._event_idx:
            return True  # ENABLE; DESC without EVENT_IDX or an unknown value: notify, to be safe
        if not valid:
            return True  # the first decision after a start always notifies (as QEMU)
        off_wrap = (event >> self._drv_off_wrap_shift) & 0xFFFF
        off = off_wrap & 0x7FFF
        if bool(off_wrap >> 15) != self._used_wrap:
            off -= self.size
        return vring_need_event(off & 0xFFFF, new_used, old)

    # --- kick suppression ----------------------------------------------------------------------

    def _write_device_event(self) -> None:
        off_wrap = self._next_avail | (self._avail_wrap << 15)
        self._dev_words[self._dev_off_wrap_w] = off_wrap
        self._dev_words[self._dev_flags_w] = _DESC

    def disable_notifications(self) -> None:
        """Ask the driver not to kick: the device event area says DISABLE."""
        self._notify_enabled = False
        if self._broken is not None:
            return
        self._dev_words[self._dev_flags_w] = _DISABLE

    def enable_notifications(self) -> bool:
        """Ask for kicks again (ENABLE, or DESC at the next avail position with EVENT_IDX), then
        re-check the ring; returns ``True`` if a chain is available (process it, or lose it),
        ``False`` when none is or this turn's budget is spent (see :meth:`Queue.enable_notifications`)."""
        self._notify_enabled = True
        if self._broken is not None:
            raise QueueBroken(self.index, self._broken)
        if self._event_idx:
            self._write_device_event()
        else:
            self._dev_words[self._dev_flags_w] = _ENABLE
        full_barrier()  # the request to kick before re-reading the ring
        return self._available(self._next_avail) and self._budget != 0
