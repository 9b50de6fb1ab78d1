"""A driver simulator for testing devices: fake guest memory, a fake driver, a one-call harness.

Theory of operation. :class:`FakeMemory` is identity driver memory: driver addresses are offsets in a
few bytearray regions, handed out by an allocator that asserts allocations never overlap.
:class:`FakeDriver` plays the driver's half of a split queue on it: it lays out the rings, publishes
chains (direct, indirect, mixed) exactly as a well-behaved driver would, reads used entries back with
the bytes the device wrote, and sets or reads the notification fields. For robustness tests it also
writes anything a hostile driver could: raw descriptors, bad ``next`` values, loops, readable after
writable, bad indirect tables, avail index jumps. The malformed chains a device test needs most
come from one call that is the same on both fake drivers, ``push_malformed(kind)`` (the kinds,
and what the device sees for each in each format: :class:`Malformed`), so one test body covers
both formats. :func:`make_queue` builds a device-side
:class:`~virtio_schema.queue.Queue` and its fake driver in one call (``packed=True``: a
:class:`~virtio_schema.queue.PackedQueue` and a :class:`FakePackedDriver`)::

    fq = make_queue(size=8)
    fq.driver.publish([b"ping"], [16])
    with fq.queue.next_chain() as chain:
        ...
    (used,) = fq.driver.used()

Nothing here is fast or hostile by default; everything here is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Literal, TypeVar, overload

from virtio_schema.errors import DeviceUsageError
from virtio_schema.fake_queue.malformed import Malformed, NotInThisFormat
from virtio_schema.fake_queue.memory import FakeMemory, FakeMemoryFull
from virtio_schema.fake_queue.packed import FakePackedDriver
from virtio_schema.fake_queue.split import FakeDriver, UsedChain
from virtio_schema.queue import PackedQueue, Queue, QueueState, VirtQueue, create_queue
from virtio_schema.schema import Feature
from virtio_schema.util import NotificationCounter

__all__ = [
    "AnyFakeQueue",
    "FakeDriver",
    "FakeMemory",
    "FakeMemoryFull",
    "FakePackedDriver",
    "FakeQueue",
    "Malformed",
    "NotInThisFormat",
    "PackedFakeQueue",
    "SplitFakeQueue",
    "UsedChain",
    "make_queue",
]


# Covariant (the fields are read-only): a queue of one format is also a queue of either format.
Q = TypeVar("Q", bound=VirtQueue, covariant=True)
D = TypeVar("D", bound=FakeDriver | FakePackedDriver, covariant=True)


@dataclass(frozen=True)
class FakeQueue(Generic[Q, D]):
    """A device-side queue wired to a fake driver (see :func:`make_queue`): ``queue`` is the
    device's half, ``driver`` the simulated driver's, ``notifier`` counts the device's
    notifications. Its type names both halves (:data:`SplitFakeQueue`, :data:`PackedFakeQueue`);
    :data:`AnyFakeQueue` accepts either."""

    queue: Q
    driver: D
    memory: FakeMemory
    notifier: NotificationCounter


SplitFakeQueue = FakeQueue[Queue, FakeDriver]
"""A split queue and its fake driver (``make_queue()``)."""
PackedFakeQueue = FakeQueue[PackedQueue, FakePackedDriver]
"""A packed queue and its fake driver (``make_queue(packed=True)``)."""
AnyFakeQueue = FakeQueue[VirtQueue, FakeDriver | FakePackedDriver]
"""Either format (``make_queue(packed=flag)``); a :data:`SplitFakeQueue` or a
:data:`PackedFakeQueue` is one too, so a helper that builds or takes both formats is typed with
it."""


@overload
def make_queue(
    size: int = ...,
    *,
    features: int = ...,
    packed: Literal[False] = ...,
    state: QueueState | None = ...,
    memory: FakeMemory | None = ...,
    index: int = ...,
) -> SplitFakeQueue: ...


@overload
def make_queue(
    size: int = ...,
    *,
    features: int = ...,
    packed: Literal[True],
    state: QueueState | None = ...,
    memory: FakeMemory | None = ...,
    index: int = ...,
) -> PackedFakeQueue: ...


@overload
def make_queue(
    size: int = ...,
    *,
    features: int = ...,
    packed: bool,
    state: QueueState | None = ...,
    memory: FakeMemory | None = ...,
    index: int = ...,
) -> AnyFakeQueue: ...


def make_queue(
    size: int = 16,
    *,
    features: int = 0,
    packed: bool = False,
    state: QueueState | None = None,
    memory: FakeMemory | None = None,
    index: int = 0,
) -> AnyFakeQueue:
    """Build fake memory, a fake driver and the device's queue on it, with a
    :class:`~virtio_schema.util.NotificationCounter` as the notifier. ``packed=True`` adds
    RING_PACKED to ``features`` and builds a :class:`~virtio_schema.queue.PackedQueue` with a
    :class:`FakePackedDriver`; the queue is made by :func:`~virtio_schema.queue.create_queue`, as a
    transport would.

    The result's type follows ``packed`` (overloads, so type checkers see the concrete types):

    - ``make_queue(...)`` or ``packed=False``: :data:`SplitFakeQueue`
      (``FakeQueue[Queue, FakeDriver]``);
    - ``packed=True``: :data:`PackedFakeQueue` (``FakeQueue[PackedQueue, FakePackedDriver]``);
    - ``packed=flag`` (a ``bool`` known only at run time): :data:`AnyFakeQueue`
      (``FakeQueue[VirtQueue, FakeDriver | FakePackedDriver]``)."""
    if bool(features & Feature.RING_PACKED) and not packed:
        raise DeviceUsageError("features has RING_PACKED: pass packed=True")
    mem = memory or FakeMemory()
    start = state or QueueState()
    driver: FakeDriver | FakePackedDriver
    if packed:
        features |= Feature.RING_PACKED
        driver = FakePackedDriver(mem, size, int(features), start)
    else:
        driver = FakeDriver(mem, size, features, start)
    notifier = NotificationCounter()
    queue = create_queue(
        driver.queue_memory(),
        size,
        mem,
        features=int(features),
        notify=notifier,
        state=start,
        index=index,
    )
    return FakeQueue(queue, driver, mem, notifier)
