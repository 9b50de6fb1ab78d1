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
from typing import TYPE_CHECKING

from virtio_schema.queue.errors import QueueBroken, RingError
from virtio_schema.queue.state import DriverNotify, QueueState

if TYPE_CHECKING:
    from virtio_schema.mem import DriverMem
    from virtio_schema.queue.desc_chain import DescChain

__all__ = ["QueueBase"]


class QueueBase:
    """The format-independent half of a virtqueue (see :class:`~virtio_schema.queue.Queue` and
    :class:`~virtio_schema.queue.PackedQueue`)."""

    size: int
    driver_mem: DriverMem
    features: int
    notifier: DriverNotify
    index: int

    def __init__(
        self, size: int, driver_mem: DriverMem, features: int, notify: DriverNotify, index: int
    ) -> None:
        self.size = size
        self.driver_mem = driver_mem
        self.features = features
        self.notifier = notify
        self.index = index
        self._orphans: collections.deque[tuple[int, int, int]] = collections.deque()
        self._generation = 0
        self._broken: RingError | None = None

    # --- state ---------------------------------------------------------------------------------

    def _start(self, state: QueueState) -> None:
        self._generation += 1
        self._broken = None
        self._signalled_valid = False
        self._notify_enabled = True
        self._orphans.clear()
        self._start_format(state)

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

    # --- returning chains ----------------------------------------------------------------------

    def _return_chain(self, chain: DescChain, written: int) -> None:
        if chain._gen != self._generation or self._broken is not None:
            return  # from before a reset/restore, or the queue is broken: leave the ring alone
        self._publish_used(chain.head, written, chain._slots)

    def _orphan(self, chain: DescChain) -> None:
        self._orphans.append((chain._gen, chain.head, chain._slots))

    def _return_orphans(self) -> None:
        while self._orphans:
            gen, head, slots = self._orphans.popleft()
            if gen == self._generation and self._broken is None:
                self._publish_used(head, 0, slots)

    def _publish_used(self, head: int, written: int, slots: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        state = f"broken: {self._broken}" if self._broken else "ok"
        return (
            f"{type(self).__name__}(index={self.index}, size={self.size}, {self.state()}, {state})"
        )
