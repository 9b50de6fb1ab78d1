"""The split virtqueue state machine, device side (virtio 1.2, 2.7).

Theory of operation. ``next_chain()`` reads ``avail.idx`` once; if an entry is pending it reads the
head from the available ring, then walks the chain, reading each descriptor once as a whole record
(``struct.unpack_from`` of 16 bytes), validating as it goes, following at most one indirect table.
The result is a :class:`DescChain` holding the validated buffers. ``DescChain.return_written()``
comes back here: the used element is written, then ``used.idx``, then the notification decision.

Rules of this module:

1. Every value read from guest memory is read once and validated before use (threat model: the
   driver may rewrite any ring byte at any moment).
2. Work per call is bounded: a chain reads at most ``size`` descriptors in total (direct and
   indirect alike) plus one indirect descriptor, whatever the ring holds.
3. Ring-level violations latch the queue broken; after that no call reads or writes guest memory
   (returning a chain the device still holds only marks it returned) until :meth:`Queue.reset` or
   :meth:`Queue.restore`.
4. The memory-ordering points go through :func:`~virtio_schema.mem.read_barrier`,
   :func:`~virtio_schema.mem.write_barrier` and :func:`~virtio_schema.mem.full_barrier`.

A ``Queue`` is used from one thread at a time (the transport's); only chains garbage-collected on
another thread are handed back through a thread-safe side list.
"""

from __future__ import annotations

from virtio_schema.mem import (
    STRONG_ORDER,
    DriverMem,
    full_barrier,
    read_barrier,
    write_barrier,
)
from virtio_schema.queue.base import (
    ADDR_END,
    MAX_TABLE_LEN,
    MAX_TOTAL_LEN,
    QueueBase,
    sequential_table,
)
from virtio_schema.queue.desc_chain import ChainDescriptor, DescChain
from virtio_schema.queue.errors import (
    AvailIndexJump,
    BufferAddressOverflow,
    ChainError,
    ChainLengthOverflow,
    ChainTooLong,
    DescIndexOutOfRange,
    HeadOutOfRange,
    IndirectNotNegotiated,
    IndirectWithNext,
    NestedIndirect,
    QueueBroken,
    ReadableAfterWritable,
)
from virtio_schema.queue.state import DriverNotify, QueueMemory, QueueState
from virtio_schema.ring import DESC, AvailRing, DescTable, UsedRing
from virtio_schema.schema import AvailFlags, DescFlags, Feature, UsedFlags

__all__ = ["Queue"]

_NEXT = int(DescFlags.NEXT)
_WRITE = int(DescFlags.WRITE)
_INDIRECT = int(DescFlags.INDIRECT)
_NO_NOTIFY = int(UsedFlags.NO_NOTIFY)
_NO_INTERRUPT = int(AvailFlags.NO_INTERRUPT)
_new_desc = tuple.__new__


class Queue(QueueBase):
    """A split virtqueue, device side.

    ``memory`` holds the translated descriptor table, available ring and used ring; ``size`` is the
    queue size the transport negotiated; ``driver_mem`` translates the buffer (and indirect table)
    addresses found in descriptors; ``features`` are the negotiated feature bits (only
    ``INDIRECT_DESC`` and ``EVENT_IDX`` change this class's behaviour); ``notify`` is called when the
    driver must be told about used buffers. ``state`` starts the queue at a saved position
    (vhost-user SET_VRING_BASE, migration); ``index`` names the queue in errors.
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
        self.desc_table = DescTable(memory.desc, size)
        self.avail_ring = AvailRing(memory.avail, size)
        self.used_ring = UsedRing(memory.used, size)
        super().__init__(size, driver_mem, features, notify, index)
        self._event_idx = bool(features & Feature.EVENT_IDX)
        # bound once: the hot path calls these directly
        self._desc_view = self.desc_table.view
        avail, used = self.avail_ring, self.used_ring
        # the fields the driver polls are stored as one word each (pack_into would zero them
        # first: see virtio_schema.mem, rule 3); what the driver writes is read the same way,
        # one word at a time (cheaper than a struct call); indices are byte offsets // width
        self._used_words = used.range.le16()
        self._used_idx_w = used.idx_offset >> 1
        self._used_flags_w = used.flags_offset >> 1
        self._avail_event_w = used.avail_event_offset >> 1
        self._used_elems = used.range.le32()  # element k: words e+2k (id) and e+2k+1 (len)
        self._used_elem_w = used.ring_offset >> 2
        self._avail_words = avail.range.le16()
        self._avail_idx_w = avail.idx_offset >> 1
        self._avail_flags_w = avail.flags_offset >> 1
        self._ring_w = avail.ring_offset >> 1
        self._used_event_w = avail.used_event_offset >> 1
        self._unpack_desc = DESC.struct.unpack_from
        self._start(state or QueueState())

    # --- state ---------------------------------------------------------------------------------

    def _start_format(self, state: QueueState) -> None:
        self._next_avail = state.next_avail
        self._next_used = state.next_used
        self._signalled_used = state.next_used

    def state(self) -> QueueState:
        """The position to save (vhost-user GET_VRING_BASE reports ``next_avail``)."""
        return QueueState(self._next_avail, self._next_used)

    @property
    def next_avail(self) -> int:
        return self._next_avail

    @property
    def next_used(self) -> int:
        return self._next_used

    # --- taking chains -------------------------------------------------------------------------

    def pending(self) -> int:
        """How many chains the driver has made available beyond those taken (reads avail.idx).
        Raises :class:`QueueBroken` on an index jump."""
        if self._broken is not None:
            raise QueueBroken(self.index, self._broken)
        avail_idx = self._avail_words[self._avail_idx_w]
        n = (avail_idx - self._next_avail) & 0xFFFF
        if n > self.size:
            raise self._break(AvailIndexJump(self.index, avail_idx, self._next_avail, self.size))
        return n

    def next_chain(self) -> DescChain | None:
        """The next available chain, or ``None`` if the driver has made none available.

        A malformed chain is returned as a :class:`DescChain` whose ``error`` is set (reading it
        raises the error; it goes back to the driver with length 0). Raises :class:`QueueBroken`
        when the ring itself is inconsistent, now and on every later call until reset/restore.
        """
        if self._orphans:
            self._return_orphans()
        if self._broken is not None:
            raise QueueBroken(self.index, self._broken)
        if self._budget == 0:  # this turn's chains are taken (set_budget)
            return None
        next_avail = self._next_avail
        avail_idx = self._avail_words[self._avail_idx_w]
        if avail_idx == next_avail:
            return None
        size = self.size
        if ((avail_idx - next_avail) & 0xFFFF) > size:
            raise self._break(AvailIndexJump(self.index, avail_idx, next_avail, size))
        if not STRONG_ORDER:
            read_barrier()  # avail.idx before the ring entry it publishes (virtio 1.2, 2.7.13)
        slot = next_avail & (size - 1)
        head = self._avail_words[self._ring_w + slot]
        if head >= size:
            raise self._break(HeadOutOfRange(self.index, slot, head, size))
        self._next_avail = next_avail = (next_avail + 1) & 0xFFFF
        if self._event_idx and self._notify_enabled:
            # ask for a kick when the driver publishes past what we have taken (virtio 1.2, 2.7.10)
            self._used_words[self._avail_event_w] = next_avail
        chain = self._walk(head)
        if self._in_order:
            self._outstanding.append(head)
        self._budget -= 1  # a negative budget (no limit) never reaches 0
        return chain

    def _walk(self, head: int) -> DescChain:
        """Read and validate the chain starting at descriptor ``head`` (< size)."""
        size = self.size
        unpack = self._unpack_desc
        table = self._desc_view
        addr, length, flags, nxt = unpack(table, 16 * head)
        whole = None
        if flags & (_INDIRECT | _NEXT) == _INDIRECT:  # one indirect descriptor
            whole = self._lone_table(addr, length, True)
        if whole is not None:  # ... and a sequential table
            a, n, readable, r, w = whole
            return DescChain(self, head, a, n, readable, r, w, None, 1, head, 0)
        # the general walk, from the head as read: each descriptor is read once, at the end of
        # the turn before the one that judges it
        locate = self._locate
        at = 0  # where the table being walked starts in ``table``
        limit = size  # entries of the table being walked
        addrs: list[int] = []
        lens: list[int] = []
        where: list[int] = []  # descriptor indices (a snapshot table's are implied: 0, 1, ...)
        n_readable = 0
        rlen = wlen = 0
        count = 0  # buffers read so far, against the chain length limit (the queue size)
        in_indirect = False
        table_at = -1
        i = head
        try:
            while True:
                if flags & _INDIRECT:
                    # the rules of virtio 1.2, 2.7.5.3 in one test; the call names the broken one
                    if (
                        in_indirect
                        or flags & _NEXT
                        or not self._indirect
                        or length & 15
                        or not 0 < length <= MAX_TABLE_LEN
                        or addr + length > ADDR_END
                    ):
                        self._check_indirect(head, i, addr, length, flags, in_indirect)
                    found = locate(addr, length) if locate is not None else None
                    table, at = found or self._indirect_table(head, i, addr, length)
                    limit = length >> 4
                    in_indirect = True
                    table_at = len(addrs)
                    i = 0
                    # the common table in one snapshot (base.sequential_table), where the walk
                    # below would reach the same outcome: the chain length stays within the
                    # queue size, and no readable entry follows a writable descriptor. (The
                    # head's own table was tried by _lone_table already, if it could locate it)
                    if count + limit <= size and (count or locate is None):
                        whole = sequential_table(table, at, limit, split=True)
                        if whole is not None and (not whole[2] or len(addrs) == n_readable):
                            a, n, readable, r, w = whole
                            addrs += a
                            lens += n
                            n_readable += readable
                            rlen += r
                            wlen += w
                            break
                    addr, length, flags, nxt = unpack(table, at)
                    continue
                count += 1  # at most size: the check before following NEXT below keeps it there
                if addr + length > ADDR_END:
                    raise BufferAddressOverflow(self.index, head, i, addr, length)
                if flags & _WRITE:
                    wlen += length
                else:
                    if len(addrs) > n_readable:
                        raise ReadableAfterWritable(self.index, head, i)
                    rlen += length
                    n_readable += 1
                addrs.append(addr)
                lens.append(length)
                where.append(i)
                if not flags & _NEXT:
                    break
                if count >= size:  # the next one would be one too many: do not even read it
                    raise ChainTooLong(self.index, head, size)
                if nxt >= limit:
                    raise DescIndexOutOfRange(self.index, head, i, nxt, limit)
                i = nxt
                addr, length, flags, nxt = unpack(table, at + 16 * i)
            if rlen + wlen > MAX_TOTAL_LEN:
                raise ChainLengthOverflow(self.index, head, rlen + wlen)
        except ChainError as error:
            return DescChain(self, head, [], [], 0, 0, 0, error)
        return DescChain(
            self, head, addrs, lens, n_readable, rlen, wlen, None, 1, head, table_at, where
        )

    def _describe(self, chain: DescChain) -> tuple[ChainDescriptor, ...]:
        """The public view of a chain's buffers (indices follow ``next`` from the head, and
        restart at 0 in an indirect table; a table read in one snapshot is in table order)."""
        where = chain._where or []
        table_at = chain._table_at
        n_readable = chain._n_readable
        return tuple(
            _new_desc(
                ChainDescriptor,
                (
                    addr,
                    length,
                    k >= n_readable,
                    where[k] if k < len(where) else k - table_at,
                    0 <= table_at <= k,
                ),
            )
            for k, (addr, length) in enumerate(zip(chain._addrs, chain._lens, strict=True))
        )

    def _check_indirect(
        self, head: int, i: int, addr: int, length: int, flags: int, in_indirect: bool
    ) -> None:
        """The rules for an INDIRECT descriptor (virtio 1.2, 2.7.5.3)."""
        if not self._indirect:
            raise IndirectNotNegotiated(self.index, head, i)
        if in_indirect:
            raise NestedIndirect(self.index, head, i)
        if flags & _NEXT:
            raise IndirectWithNext(self.index, head, i)
        self._check_indirect_table(head, i, addr, length)

    # --- returning chains ----------------------------------------------------------------------

    def _publish_batch(self, items: list[tuple[int, int, int]]) -> None:
        """Publish a batch of returns with one ``used.idx`` update and one notification
        decision. Under IN_ORDER, a run of chains that wrote nothing followed by one chain is
        published as ONE used element (the last chain's id and length) at the run's last slot,
        ``used.idx`` advancing by the run's length (virtio 1.2, 2.7.10.1)."""
        elems = self._used_elems
        first = self._used_elem_w
        mask = self.size - 1
        start = next_used = self._next_used
        if self._in_order:
            run = 0
            for k, (head, written, _slots) in enumerate(items):
                run += 1
                if written or k == len(items) - 1:
                    at = first + 2 * ((next_used + run - 1) & mask)
                    elems[at] = head
                    elems[at + 1] = written
                    next_used += run
                    run = 0
        else:
            for head, written, _slots in items:
                at = first + 2 * (next_used & mask)
                elems[at] = head
                elems[at + 1] = written
                next_used += 1
        write_barrier()  # the elements before the index that publishes them
        self._next_used = next_used = next_used & 0xFFFF
        self._used_words[self._used_idx_w] = next_used
        if next_used != start and self._should_notify(next_used):
            self.notifier.notify()

    def _publish_used(self, head: int, written: int, slots: int = 1) -> None:
        next_used = self._next_used
        elems = self._used_elems
        at = self._used_elem_w + 2 * (next_used & (self.size - 1))
        elems[at] = head
        elems[at + 1] = written
        if not STRONG_ORDER:
            write_barrier()  # the element before the index that publishes it (virtio 1.2, 2.7.14)
        self._next_used = next_used = (next_used + 1) & 0xFFFF
        self._used_words[self._used_idx_w] = next_used
        if self._should_notify(next_used):
            self.notifier.notify()

    def _should_notify(self, new_used: int) -> bool:
        """The used-buffer notification decision (virtio 1.2, 2.7.7.2 and 2.7.10)."""
        full_barrier()  # used.idx before reading used_event / avail.flags
        if self._event_idx:
            old = self._signalled_used
            valid = self._signalled_valid
            self._signalled_used = new_used
            self._signalled_valid = True
            used_event = self._avail_words[self._used_event_w]
            return not valid or ((new_used - used_event - 1) & 0xFFFF) < ((new_used - old) & 0xFFFF)
        return not self._avail_words[self._avail_flags_w] & _NO_INTERRUPT

    # --- kick suppression ----------------------------------------------------------------------

    def disable_notifications(self) -> None:
        """Ask the driver not to kick (while the device polls). Without EVENT_IDX this sets
        ``used.flags`` NO_NOTIFY; with it, ``avail_event`` stops following the taken index."""
        self._notify_enabled = False
        if self._broken is not None or self._event_idx:
            return
        words = self._used_words
        words[self._used_flags_w] = words[self._used_flags_w] | _NO_NOTIFY

    def enable_notifications(self) -> bool:
        """Ask the driver to kick again, then re-check the ring (virtio 1.2, 2.7.10: without the
        re-check a kick sent before the request was visible would be lost).

        Returns ``True`` if chains are available, which the device must then process (or it
        will not be kicked for them). ``False`` also when this turn's budget is spent
        (:meth:`set_budget`): the transport gives the ring another turn, and a device that
        drains until this returns ``False`` stops here instead of spinning.
        """
        self._notify_enabled = True
        if self._broken is not None:
            raise QueueBroken(self.index, self._broken)
        if self._event_idx:
            self._used_words[self._avail_event_w] = self._next_avail
        else:
            words = self._used_words
            words[self._used_flags_w] = words[self._used_flags_w] & ~_NO_NOTIFY & 0xFFFF
        full_barrier()  # the request to kick before re-reading avail.idx
        avail_idx = self._avail_words[self._avail_idx_w]
        return avail_idx != self._next_avail and self._budget != 0
