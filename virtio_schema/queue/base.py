"""What both queue formats share: identity, the broken latch, generations, orphans, save/restore.

Rules of this module:

1. The state every format keeps is here and nowhere else: the chain generation (chains from before a
   reset/restore are stale and returning them does nothing), the broken latch (after a ring
   violation nothing touches guest memory until reset/restore), the orphan list (chains
   garbage-collected on another thread), the notification bookkeeping.
2. Formats implement ``_start_format``, ``_publish_used``, ``next_chain``, the notification
   methods and ``state``; they never re-implement the rules above.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from virtio_schema.errors import DeviceUsageError
from virtio_schema.queue.errors import OutOfOrderReturn, QueueBroken, RingError
from virtio_schema.queue.state import DriverNotify, QueueState, WriteLog
from virtio_schema.schema import Feature

if TYPE_CHECKING:
    from virtio_schema.mem import DriverMem, Locate
    from virtio_schema.queue.desc_chain import DescChain

__all__ = ["QueueBase"]


class QueueBase:
    """The format-independent half of a virtqueue (see :class:`~virtio_schema.queue.Queue` and
    :class:`~virtio_schema.queue.PackedQueue`)."""

    size: int
    features: int
    notifier: DriverNotify
    index: int

    def __init__(
        self, size: int, driver_mem: DriverMem, features: int, notify: DriverNotify, index: int
    ) -> None:
        self.size = size
        self._driver_mem = driver_mem
        self.features = features
        self.notifier = notify
        self.index = index
        self._orphans: collections.deque[tuple[int, int, int]] = collections.deque()
        self._generation = 0
        self._broken: RingError | None = None
        self._in_order = bool(features & Feature.IN_ORDER)
        self._indirect = bool(features & Feature.INDIRECT_DESC)
        self._outstanding: collections.deque[int] = collections.deque()  # IN_ORDER: pop order
        self._batch: list[tuple[int, int, int]] | None = None
        self._resubmit: collections.deque[DescChain] = collections.deque()  # handed out first
        self._dirty: WriteLog | None = None
        self._dirty_areas: tuple[tuple[int, int], ...] = ()
        self._budget = -1  # chains next_chain may still hand out this turn; negative: no limit
        locate = getattr(driver_mem, "locate", None)  # the optional fast path (mem.Locate)
        self._locate: Locate | None = locate if callable(locate) else None

    @property
    def driver_mem(self) -> DriverMem:
        """The memory buffer and indirect-table addresses are translated through (fixed for the
        queue's life: a transport whose memory table changes builds new queues)."""
        return self._driver_mem

    # --- state ---------------------------------------------------------------------------------

    def _start(self, state: QueueState) -> None:
        self._check_state(state)  # refuse before changing anything
        self._generation += 1
        self._broken = None
        self._signalled_valid = False
        self._notify_enabled = True
        self._orphans.clear()
        self._outstanding.clear()
        self._resubmit.clear()
        self._batch = None
        self._start_format(state)

    def _check_state(self, state: QueueState) -> None:
        """Raise :class:`InvalidQueueState` if ``state`` does not fit this queue."""

    def _start_format(self, state: QueueState) -> None:
        raise NotImplementedError

    def state(self) -> QueueState:
        raise NotImplementedError

    def restore(self, state: QueueState) -> None:
        """Continue from ``state``; clears a broken latch. Chains still held from before are
        stale: returning them does nothing."""
        self._start(state)

    def reset(self) -> None:
        """Back to the device-reset state (indices 0, wrap counters 1, not broken, notifications
        enabled)."""
        self._start(QueueState())

    @property
    def broken(self) -> RingError | None:
        """The ring violation that broke the queue, or ``None``."""
        return self._broken

    def _break(self, error: RingError) -> QueueBroken:
        self._broken = error
        return QueueBroken(self.index, error)

    # --- turns ---------------------------------------------------------------------------------

    def set_budget(self, chains: int | None) -> None:
        """Let :meth:`next_chain` hand out at most ``chains`` more chains (``None``: no limit),
        then answer ``None`` as if the ring were empty until the budget is set again.

        A transport gives each queue a budget per turn so that a driver that keeps publishing
        cannot keep one device handler running forever (the vhost-user server: the queue size
        per turn, then the other queues and connections get theirs). Returning chains is never
        limited."""
        if chains is not None and chains < 0:
            raise DeviceUsageError(f"queue {self.index}: budget {chains} < 0")
        self._budget = -1 if chains is None else chains

    @property
    def budget(self) -> int | None:
        """Chains :meth:`next_chain` may still hand out before :meth:`set_budget` is called again
        (``None``: no limit; 0: the budget is spent, and work may remain)."""
        return None if self._budget < 0 else self._budget

    # --- returning chains ----------------------------------------------------------------------

    @property
    def in_order(self) -> bool:
        """IN_ORDER was negotiated: chains must be returned in the order they were taken."""
        return self._in_order

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Publish every chain returned inside the block at its end, at once: one used-index
        update (split) and one notification decision; under IN_ORDER, runs of chains are
        completed with a single used entry where the specification allows it. Transports wrap a
        device's kick handling in it; device code does not change. Nested blocks join the outer."""
        if self._batch is not None:
            yield
            return
        self._batch = []
        try:
            yield
        finally:
            items, self._batch = self._batch, None
            if items and self._broken is not None:
                items = []
            if items:
                self._publish_batch(items)

    def _check_return(self, chain: DescChain) -> None:
        """Called before a chain is marked returned: refuse an out-of-order return under
        IN_ORDER (a device-usage error; the chain stays held)."""
        if self._in_order and chain._gen == self._generation and self._outstanding:
            first = self._outstanding[0]
            if chain.head != first:
                raise OutOfOrderReturn(self.index, chain.head, first)

    # --- the dirty log (live migration) ---------------------------------------------------------

    def set_dirty_log(self, log: WriteLog | None, rings: Sequence[tuple[int, int]] = ()) -> None:
        """Mark in ``log`` every byte the device writes from now on (``None``: stop): the bytes
        each returned chain's ``written`` count covers, in its device-writable buffers (whatever
        wrote them: the chain writers, the fd transfers, the device through views), and the
        ``rings`` areas, ``(driver address, length)`` each, that the queue writes (the used ring;
        the packed descriptor ring and device event area), each time it publishes."""
        self._dirty = log
        self._dirty_areas = tuple(rings)
        if log is not None:
            self.log_rings()  # what the queue wrote there before (avail_event, flags)

    def log_rings(self) -> None:
        """Mark the ring areas the queue writes (after a publish; a transport also calls it when
        it stops the ring, the last moment a front-end can learn of them)."""
        log = self._dirty
        if log is not None:
            for addr, length in self._dirty_areas:
                log.mark(addr, length)

    def _log_written(self, chain: DescChain, written: int) -> None:
        """The first ``written`` bytes of the chain's writable buffers were written."""
        assert self._dirty is not None
        buffers = chain.buffers
        addrs, lens = buffers.addrs, buffers.lens
        for k in range(buffers.n_readable, len(addrs)):
            n = lens[k] if lens[k] < written else written
            self._dirty.mark(addrs[k], n)
            written -= n
            if written <= 0:
                return

    def _return_chain(self, chain: DescChain, written: int) -> None:
        if self._dirty is not None and written:  # written even if never published (stale)
            self._log_written(chain, written)
        if self._in_order and chain._gen == self._generation:
            self._forget(chain.head)  # also when broken: the next-oldest can then be returned
        if chain._gen != self._generation or self._broken is not None:
            return  # from before a reset/restore, or the queue is broken: leave the ring alone
        if self._batch is not None:
            self._batch.append((chain.head, written, chain._slots))
        else:
            self._publish_used(chain.head, written, chain._slots)

    def _forget(self, head: int) -> None:
        """Drop ``head`` from the IN_ORDER bookkeeping (normally the oldest; a chain collected by
        the GC may not be, and then IN_ORDER is already broken by the device)."""
        outstanding = self._outstanding
        if outstanding and outstanding[0] == head:  # the normal, in-order case: O(1)
            outstanding.popleft()
            return
        with contextlib.suppress(ValueError):
            outstanding.remove(head)

    def _publish_batch(self, items: list[tuple[int, int, int]]) -> None:
        raise NotImplementedError

    def _take_resubmitted(self) -> DescChain:
        """The next chain a restarted device takes again (see ``track_inflight``): before any
        chain from the ring, in the order they were first taken."""
        chain = self._resubmit.popleft()
        if self._in_order:
            self._outstanding.append(chain.head)
        self._budget -= 1
        return chain

    def _orphan(self, chain: DescChain) -> None:
        self._orphans.append((chain._gen, chain.head, chain._slots))

    def _return_orphans(self) -> None:
        while self._orphans:
            gen, head, slots = self._orphans.popleft()
            if gen == self._generation and self._broken is None:
                if self._in_order:
                    self._forget(head)
                self._publish_used(head, 0, slots)

    def _publish_used(self, head: int, written: int, slots: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        state = f"broken: {self._broken}" if self._broken else "ok"
        return (
            f"{type(self).__name__}(index={self.index}, size={self.size}, {self.state()}, {state})"
        )
