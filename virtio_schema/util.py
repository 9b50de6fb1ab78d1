"""Helpers around a queue: notification coalescing and counting, and an asyncio chain stream.

* :class:`BufferedNotify` wraps a :class:`~virtio_schema.queue.DriverNotify` and turns any number of
  ``notify()`` calls into one on :meth:`~BufferedNotify.flush` (or on leaving a ``with`` block): a
  device that returns a batch of chains interrupts the driver once.
* :class:`NotificationCounter` is a ``DriverNotify`` that counts (tests, polling transports).
* :class:`DescChainStream` is an async iterator of chains for one queue, woken by
  :meth:`~DescChainStream.kick`, which the transport calls when the driver notifies; ``kick`` is safe
  from any thread.

This module does no I/O of its own; the asyncio loop belongs to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Self

from virtio_schema.queue import DescChain, DriverNotify, VirtQueue

__all__ = ["BufferedNotify", "DescChainStream", "NotificationCounter"]


class NotificationCounter:
    """A :class:`~virtio_schema.queue.DriverNotify` that counts notifications (thread-safe)."""

    __slots__ = ("_count", "_lock")

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def notify(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        """Notifications so far."""
        return self._count

    def take(self) -> int:
        """Notifications since the last ``take()`` (and reset the count)."""
        with self._lock:
            n, self._count = self._count, 0
        return n


class BufferedNotify:
    """Coalesce notifications: ``notify()`` only records that one is owed; :meth:`flush` sends one
    to the wrapped notifier if any was owed. Leaving a ``with`` block flushes.

    Pass it as the queue's notifier, then flush after each batch::

        notify = BufferedNotify(eventfd_notifier)
        queue = Queue(..., notify=notify)
        with notify:
            while (chain := queue.next_chain()) is not None:
                serve(chain)               # each return may "notify"
        # one notification here, if any return asked for one
    """

    __slots__ = ("_owed", "inner")

    def __init__(self, inner: DriverNotify) -> None:
        self.inner = inner
        self._owed = False

    def notify(self) -> None:
        self._owed = True

    @property
    def owed(self) -> bool:
        """A notification is waiting for :meth:`flush`."""
        return self._owed

    def flush(self) -> bool:
        """Send the owed notification, if any; returns whether one was sent."""
        if not self._owed:
            return False
        self._owed = False
        self.inner.notify()
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.flush()


class DescChainStream:
    """``async for chain in DescChainStream(queue)``: chains as the driver makes them available.

    The transport calls :meth:`kick` whenever the driver notifies the queue, from any thread. No
    wake-up is lost: the stream clears its event *before* looking at the ring, so a kick that races
    with an empty check leaves the event set and the next wait returns at once. Iteration ends with
    :class:`~virtio_schema.queue.QueueBroken` when the ring breaks, and with ``StopAsyncIteration``
    after :meth:`close`.
    """

    def __init__(self, queue: VirtQueue) -> None:
        self.queue = queue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._closed = False
        self._lock = threading.Lock()

    def kick(self) -> None:
        """The driver notified the queue. Safe from any thread, including the loop's."""
        with self._lock:
            loop, event = self._loop, self._event
        if loop is None or event is None:
            return  # not iterating yet: the first __anext__ looks at the ring anyway
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(event.set)

    def close(self) -> None:
        """End the iteration (the waiting ``__anext__`` raises ``StopAsyncIteration``)."""
        self._closed = True
        self.kick()

    def __aiter__(self) -> DescChainStream:
        return self

    async def __anext__(self) -> DescChain:
        loop = asyncio.get_running_loop()
        if self._event is None or self._loop is not loop:  # first use, or a new event loop
            with self._lock:
                self._loop = loop
                self._event = asyncio.Event()
        event = self._event
        assert event is not None
        while True:
            if self._closed:
                raise StopAsyncIteration
            event.clear()
            chain = self.queue.next_chain()
            if chain is not None:
                return chain
            await event.wait()
