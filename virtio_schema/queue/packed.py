"""The packed virtqueue state machine, device side (virtio 1.2, 2.8).

Theory of operation. The ring is one array of ``size`` descriptors shared by both sides. The driver
makes a chain available by writing its descriptors in consecutive slots (wrapping at ``size``) and,
last, the first descriptor's flags with ``AVAIL`` equal to its wrap counter and ``USED`` the
opposite. ``next_chain()`` reads that first descriptor's flags; if the slot is available it reads
each descriptor of the chain once as a whole record, follows at most one indirect table, takes the
buffer id from the last descriptor and advances its avail position by the slots the chain took.
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

from virtio_schema.mem import STRONG_ORDER, DriverMem, full_barrier, read_barrier, write_barrier
from virtio_schema.queue.base import (
    ADDR_END,
    MAX_TABLE_LEN,
    MAX_TOTAL_LEN,
    QueueBase,
    sequential_table,
)
from virtio_schema.queue.desc_chain import ChainDescriptor, DescChain
from virtio_schema.queue.errors import (
    BufferAddressOverflow,
    BufferIdOutOfRange,
    ChainError,
    ChainLengthOverflow,
    ChainNeverEnds,
    ChainTooLong,
    IndirectNotNegotiated,
    IndirectWithNext,
    InvalidQueueState,
    NestedIndirect,
    QueueBroken,
    ReadableAfterWritable,
)
from virtio_schema.queue.state import DriverNotify, QueueMemory, QueueState, vring_need_event
from virtio_schema.ring import PACKED_DESC, EventArea, PackedRing
from virtio_schema.schema import EventFlags, Feature, PackedDescFlags

__all__ = ["PackedQueue"]

_NEXT = int(PackedDescFlags.NEXT)
_WRITE = int(PackedDescFlags.WRITE)
_INDIRECT = int(PackedDescFlags.INDIRECT)
_AVAIL = int(PackedDescFlags.AVAIL)
_USED = int(PackedDescFlags.USED)
_ENABLE = int(EventFlags.ENABLE)
_DISABLE = int(EventFlags.DISABLE)
_DESC = int(EventFlags.DESC)
_new_desc = tuple.__new__


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
        self._unpack_desc = PACKED_DESC.struct.unpack_from
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
        return int(self._available(self._next_avail))

    def next_chain(self) -> DescChain | None:
        """The next available chain, or ``None`` (see :meth:`Queue.next_chain`)."""
        if self._orphans:
            self._return_orphans()
        if self._broken is not None:
            raise QueueBroken(self.index, self._broken)
        if self._budget == 0:  # this turn's chains are taken (set_budget)
            return None
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
        size = self.size
        unpack = self._unpack_desc
        ring = self._ring_view
        pos = start = self._next_avail
        addr, length, buf_id, flags = unpack(ring, 16 * pos)
        error: ChainError | None = None
        indirect = False
        # one indirect descriptor, a sequential table (QueueBase._lone_table); else the general
        # walk, which names any error
        whole = None
        if flags & (_INDIRECT | _NEXT) == _INDIRECT:
            whole = self._lone_table(addr, length, False)
        addrs: list[int] | tuple[int, ...]
        lens: list[int] | tuple[int, ...]
        if whole is not None:
            addrs, lens, n_readable, rlen, wlen = whole
            slots = 1
            indirect = True
        else:
            addrs = []
            lens = []
            n_readable = rlen = wlen = count = slots = 0
            while True:
                slots += 1
                if error is None:
                    try:
                        if flags & _INDIRECT:
                            # the rules (virtio 1.2, 2.8.19) in one test; the call names the
                            # broken one
                            if (
                                slots > 1
                                or flags & _NEXT
                                or not self._indirect
                                or length & 15
                                or not 0 < length <= MAX_TABLE_LEN
                                or addr + length > ADDR_END
                            ):
                                self._check_indirect(start, pos, addr, length, flags, slots)
                            indirect = True
                            n_readable, rlen, wlen, count = self._walk_indirect(
                                start, pos, addr, length, addrs, lens, n_readable, rlen, wlen,
                                count,
                            )  # fmt: skip
                        else:
                            count += 1
                            if count > size:
                                raise ChainTooLong(self.index, start, size)
                            if addr + length > ADDR_END:
                                raise BufferAddressOverflow(self.index, start, pos, addr, length)
                            if flags & _WRITE:
                                wlen += length
                            else:
                                if len(addrs) > n_readable:
                                    raise ReadableAfterWritable(self.index, start, pos)
                                rlen += length
                                n_readable += 1
                            addrs.append(addr)
                            lens.append(length)
                    except ChainError as exc:
                        error = exc  # keep walking: the chain's end and buffer id are still needed
                if not flags & _NEXT:
                    break
                if slots >= size:
                    raise self._break(ChainNeverEnds(self.index, start, size))
                pos += 1
                if pos == size:
                    pos = 0
                addr, length, buf_id, flags = unpack(ring, 16 * pos)
        if buf_id >= size:
            raise self._break(BufferIdOutOfRange(self.index, start, buf_id, size))
        if error is None and rlen + wlen > MAX_TOTAL_LEN:
            error = ChainLengthOverflow(self.index, start, rlen + wlen)
        nxt = start + slots
        if nxt >= size:
            nxt -= size
            self._avail_wrap = not self._avail_wrap
        self._next_avail = nxt
        if self._event_idx and self._notify_enabled:
            self._write_device_event()
        if error is not None:
            return DescChain(self, buf_id, [], [], 0, 0, 0, error, slots)
        table_at = 0 if indirect else -1
        return DescChain(
            self, buf_id, addrs, lens, n_readable, rlen, wlen, None, slots, start, table_at
        )

    def _describe(self, chain: DescChain) -> tuple[ChainDescriptor, ...]:
        """The public view of a chain's buffers (slot positions; table indices if indirect)."""
        out = []
        n_readable = chain._n_readable
        indirect = chain._table_at >= 0
        for k, (addr, length) in enumerate(zip(chain._addrs, chain._lens, strict=True)):
            index = k if indirect else (chain._first + k) % self.size
            out.append(_new_desc(ChainDescriptor, (addr, length, k >= n_readable, index, indirect)))
        return tuple(out)

    def _check_indirect(
        self, head: int, pos: int, addr: int, length: int, flags: int, slots: int
    ) -> None:
        """virtio 1.2, 2.8.19: an indirect descriptor is alone in its chain, never with NEXT."""
        if not self._indirect:
            raise IndirectNotNegotiated(self.index, head, pos)
        if flags & _NEXT:
            raise IndirectWithNext(self.index, head, pos)
        if slots > 1:
            raise IndirectWithNext(self.index, head, pos, "is INDIRECT after other descriptors")
        self._check_indirect_table(head, pos, addr, length)

    def _walk_indirect(
        self,
        head: int,
        slot: int,
        addr: int,
        length: int,
        addrs: list[int],
        lens: list[int],
        n_readable: int,
        rlen: int,
        wlen: int,
        count: int,
    ) -> tuple[int, int, int, int]:
        """The entries of a packed indirect table: all ``len/16`` of them, in order; only WRITE
        (and INDIRECT, which is refused) is meaningful, NEXT is ignored (virtio 1.2, 2.8.19)."""
        locate = self._locate
        found = locate(addr, length) if locate is not None else None
        table, at = found or self._indirect_table(head, slot, addr, length)
        size = self.size
        n = length >> 4
        # the common table in one snapshot (base.sequential_table), unless _lone_table tried it
        if count + n <= size and locate is None:
            whole = sequential_table(table, at, n, split=False)
            if whole is not None and (not whole[2] or len(addrs) == n_readable):
                a, lengths, readable, r, w = whole
                addrs += a
                lens += lengths
                return n_readable + readable, rlen + r, wlen + w, count + n
        unpack = self._unpack_desc
        for i in range(n):
            baddr, blen, _id, bflags = unpack(table, at + 16 * i)
            if bflags & _INDIRECT:
                raise NestedIndirect(self.index, head, i)
            count += 1
            if count > size:
                raise ChainTooLong(self.index, head, size)
            if baddr + blen > ADDR_END:
                raise BufferAddressOverflow(self.index, head, i, baddr, blen)
            if bflags & _WRITE:
                wlen += blen
            else:
                if len(addrs) > n_readable:
                    raise ReadableAfterWritable(self.index, head, i)
                rlen += blen
                n_readable += 1
            addrs.append(baddr)
            lens.append(blen)
        return n_readable, rlen, wlen, count

    # --- returning chains ----------------------------------------------------------------------

    def _publish_batch(self, items: list[tuple[int, int, int]]) -> None:
        """Publish a batch of returns with one notification decision. Under IN_ORDER, a run of
        chains that wrote nothing followed by one chain is published as ONE used descriptor (the
        last chain's id and length) at the run's first position, the used position advancing by
        all the slots of the run (virtio 1.2, 2.8.20)."""
        if self._in_order:
            run_slots = 0
            for k, (head, written, slots) in enumerate(items):
                run_slots += slots
                if written or k == len(items) - 1:
                    self._publish_used(head, written, run_slots, False)
                    run_slots = 0
        else:
            for head, written, slots in items:
                self._publish_used(head, written, slots, False)
        if self._should_notify(self._next_used):
            self.notifier.notify()

    def _publish_used(self, head: int, written: int, slots: int = 1, decide: bool = True) -> None:
        """Write one used descriptor at the used position and advance it by ``slots``; then,
        unless ``decide`` is false (a batch decides once), notify if the driver asks for it."""
        w16 = self._ring_w16
        pos = self._next_used
        w16[8 * pos + self._id_w] = head
        self._ring_w32[4 * pos + self._len_w] = written
        flags = (_AVAIL | _USED) if self._used_wrap else 0
        if written:
            flags |= _WRITE
        if not STRONG_ORDER:
            write_barrier()  # id and len before the flags that publish them (virtio 1.2, 2.8.21)
        w16[8 * pos + self._flags_w] = flags
        pos += slots
        if pos >= self.size:
            pos -= self.size
            self._used_wrap = not self._used_wrap
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
