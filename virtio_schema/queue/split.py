"""The split virtqueue state machine, device side (virtio 1.2, 2.7).

Theory of operation. ``next_chain()`` reads ``avail.idx`` once; if an entry is pending it reads the
head from the available ring, then hands a :class:`SplitDescs` cursor (follow ``next`` from the
head, in the descriptor table or an indirect table) to the one validator,
:class:`~virtio_schema.queue.walk.Validator`, which reads each descriptor once as a whole record
and judges it. The result is a :class:`DescChain` holding the validated buffers.
``DescChain.return_written()`` comes back here: the used element is written, then ``used.idx``,
then the notification decision.

Rules of this module:

1. Every value read from guest memory is read once and validated before use (threat model: the
   driver may rewrite any ring byte at any moment).
2. Work per call is bounded: a chain reads at most ``size + 2`` descriptors in total (direct and
   indirect alike, the validator's limit), whatever the ring holds.
3. Ring-level violations latch the queue broken; after that no call reads or writes guest memory
   (returning a chain the device still holds only marks it returned) until :meth:`Queue.reset` or
   :meth:`Queue.restore`.
4. The memory-ordering points go through :func:`~virtio_schema.mem.read_barrier`,
   :func:`~virtio_schema.mem.write_barrier` and :func:`~virtio_schema.mem.full_barrier`.

A ``Queue`` is used from one thread at a time (the transport's); only chains garbage-collected on
another thread are handed back through a thread-safe side list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from virtio_schema.errors import DeviceUsageError
from virtio_schema.mem import (
    STRONG_ORDER,
    DriverMem,
    full_barrier,
    read_barrier,
    write_barrier,
)
from virtio_schema.queue.base import QueueBase
from virtio_schema.queue.desc_chain import DescChain
from virtio_schema.queue.errors import (
    AvailIndexJump,
    ChainError,
    DescIndexOutOfRange,
    HeadOutOfRange,
    QueueBroken,
)
from virtio_schema.queue.state import DriverNotify, QueueMemory, QueueState, SplitInflightLog
from virtio_schema.queue.walk import NEXT, ChainBuffers, CheckedChain, DescSource, Validator
from virtio_schema.ring import DESC, AvailRing, DescTable, UsedRing
from virtio_schema.schema import AvailFlags, Feature, UsedFlags

__all__ = ["Queue", "SplitDescs"]

_NO_NOTIFY: Final = int(UsedFlags.NO_NOTIFY)
_NO_INTERRUPT: Final = int(AvailFlags.NO_INTERRUPT)
_unpack_desc: Final = DESC.struct.unpack_from


class SplitDescs(DescSource):
    """The descriptors of a split chain: from the first one, following ``next`` while NEXT is
    set (virtio 1.2, 2.7.5), in the descriptor table or in an indirect table (whose entries link
    the same way, 2.7.5.3.2). A ``next`` at or past the table's end is
    :class:`~virtio_schema.queue.DescIndexOutOfRange`."""

    def __init__(self, queue: int) -> None:
        super().__init__()
        self.queue = queue
        self.view = memoryview(b"")
        self.offset = 0
        self.entries = 0
        self.head = 0
        self.next = 0
        self.indirect: SplitDescs | None = None  # the cursor for indirect tables, made once

    def start(self, view: memoryview, offset: int, entries: int, first: int, head: int) -> None:
        """Stand on (read) descriptor ``first`` (< entries) of the ``entries``-descriptor table
        at ``view[offset:]``, for a walk of the chain named ``head``."""
        self.view = view
        self.offset = offset
        self.entries = entries
        self.head = head
        self._read(first)

    def _read(self, index: int) -> None:
        self.at = index
        self.reads = self.reads + 1  # not += on an inherited attribute: mypyc 2.4 fails on it
        self.addr, self.length, self.flags, self.next = _unpack_desc(
            self.view, self.offset + DESC.size * index
        )

    def advance(self) -> bool:
        if not self.flags & NEXT:
            return False
        index = self.next
        if index >= self.entries:
            raise DescIndexOutOfRange(self.queue, self.head, self.at, index, self.entries)
        self.at = index  # _read, inlined: this is the walk's inner loop
        self.reads = self.reads + 1
        self.addr, self.length, self.flags, self.next = _unpack_desc(
            self.view, self.offset + DESC.size * index
        )
        return True

    def table(self, view: memoryview, offset: int, entries: int) -> DescSource:
        table = self.indirect
        if table is None:
            table = self.indirect = SplitDescs(self.queue)
        table.start(view, offset, entries, 0, self.head)
        return table


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
        self._descs = SplitDescs(index)
        self._validator = Validator(
            index, size, driver_mem, self._locate, indirect=self._indirect, indirect_alone=False
        )
        self._inflight: SplitInflightLog | None = None
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
    def descriptors_read(self) -> int:
        """Descriptors read from guest memory since the queue was made (each chain's, direct and
        indirect, each read once): what tests and fuzzers bound."""
        table = self._descs.indirect
        return self._descs.reads + (0 if table is None else table.reads)

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
        return n + len(self._resubmit)

    def next_chain(self) -> DescChain | None:
        """The next available chain, or ``None`` if the driver has made none available.

        A chain the walk finds malformed is returned as a :class:`DescChain` whose ``error`` is
        set (reading it raises the error; it goes back to the driver with length 0): a ``next``
        past its table, a loop or a chain over the size, readable after writable, ``addr + len``
        past 2**64, a total over 2**32 - 1, and the indirect rules (see :attr:`DescChain.error`
        for the classes). A buffer outside guest memory is not among them: the walk does not
        translate buffers, so its chain comes out with ``error`` ``None`` and the chain reader or
        writer raises :class:`~virtio_schema.queue.UnmappedBuffer` when the device reaches it
        (:attr:`DescChain.error` says why).

        Raises :class:`QueueBroken` when the ring itself is inconsistent (an avail index jump,
        :class:`~virtio_schema.queue.AvailIndexJump`; a head out of range,
        :class:`~virtio_schema.queue.HeadOutOfRange`), now and on every later call until
        reset/restore.
        """
        if self._orphans:
            self._return_orphans()
        if self._broken is not None:
            raise QueueBroken(self.index, self._broken)
        if self._budget == 0:  # this turn's chains are taken (set_budget)
            return None
        if self._resubmit:
            return self._take_resubmitted()
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
        if self._inflight is not None:
            self._inflight.taken(head)
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
        source = self._descs
        source.start(self._desc_view, 0, self.size, head, head)
        try:
            return DescChain(self, head, self._validator.walk(head, source))
        except ChainError as error:
            return DescChain(self, head, ChainBuffers(), error)

    def track_inflight(
        self,
        log: SplitInflightLog | None,
        *,
        state: QueueState | None = None,
        resubmit: Sequence[int] = (),
    ) -> None:
        """Record every chain taken and published in ``log`` from now on (``None``: stop). A
        restarted device first moves to ``state`` (its recovered position) and is handed the
        chains at the heads ``resubmit`` again, in that order, before any new one: each is read
        and validated again as the driver's ring holds it now."""
        if state is not None:
            self.restore(state)
        self._inflight = log
        for head in resubmit:
            if not 0 <= head < self.size:
                raise DeviceUsageError(f"queue {self.index}: head {head} is not below {self.size}")
            self._resubmit.append(self._walk(head))

    def check_chain(self, head: int) -> CheckedChain:
        """Validate the chain at descriptor ``head`` as :meth:`next_chain` would, without taking
        it: nothing is written and the queue's state does not change (for dissectors such as
        :mod:`virtio_schema.inspect`)."""
        if not 0 <= head < self.size:
            raise DeviceUsageError(f"queue {self.index}: head {head} is not below {self.size}")
        source = SplitDescs(self.index)
        source.start(self._desc_view, 0, self.size, head, head)
        try:
            return CheckedChain(head, self._validator.walk(head, source), None, 1)
        except ChainError as error:
            return CheckedChain(head, ChainBuffers(), error, 1)

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
        log = self._inflight
        heads = [head for head, _, _ in items] if log is not None else []
        if log is not None:
            log.completing(heads)
        write_barrier()  # the elements before the index that publishes them
        self._next_used = next_used = next_used & 0xFFFF
        self._used_words[self._used_idx_w] = next_used
        if log is not None:
            log.completed(heads, next_used)
        if self._dirty is not None:
            self.log_rings()
        if next_used != start and self._should_notify(next_used):
            self.notifier.notify()

    def _publish_used(self, head: int, written: int, slots: int = 1) -> None:
        next_used = self._next_used
        elems = self._used_elems
        at = self._used_elem_w + 2 * (next_used & (self.size - 1))
        elems[at] = head
        elems[at + 1] = written
        log = self._inflight
        if log is not None:
            log.completing((head,))
        if not STRONG_ORDER:
            write_barrier()  # the element before the index that publishes it (virtio 1.2, 2.7.14)
        self._next_used = next_used = (next_used + 1) & 0xFFFF
        self._used_words[self._used_idx_w] = next_used
        if log is not None:
            log.completed((head,), next_used)
        if self._dirty is not None:
            self.log_rings()
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
