"""The virtqueue state machine, device side: take chains, return them, decide notifications.

``Queue`` (split ring) and ``PackedQueue`` (packed ring) hand out the same :class:`DescChain`, so
the layers above never ask which format they serve. The validation catalogue is in
:mod:`virtio_schema.queue.errors` and is checked in one place, :mod:`virtio_schema.queue.walk`;
``check_chain`` runs it on a chain without taking it (for dissectors).

Imports: :mod:`virtio_schema.ring`, :mod:`virtio_schema.mem`, :mod:`virtio_schema.schema`.
"""

from virtio_schema.mem import DriverMem
from virtio_schema.queue.base import QueueBase
from virtio_schema.queue.desc_chain import ChainDescriptor, DescChain
from virtio_schema.queue.errors import (
    AvailIndexJump,
    BufferAddressOverflow,
    BufferIdOutOfRange,
    ChainAlreadyReturned,
    ChainError,
    ChainLengthOverflow,
    ChainNeverEnds,
    ChainTooLong,
    DescIndexOutOfRange,
    HeadOutOfRange,
    IndirectNotNegotiated,
    IndirectTableTooLarge,
    IndirectWithNext,
    InvalidIndirectLength,
    InvalidQueueState,
    NestedIndirect,
    OutOfOrderReturn,
    QueueBroken,
    ReadableAfterWritable,
    RingError,
    UnmappedBuffer,
    UnmappedIndirectTable,
    WrittenTooMuch,
)
from virtio_schema.queue.packed import PackedQueue
from virtio_schema.queue.split import Queue
from virtio_schema.queue.state import DriverNotify, QueueMemory, QueueState, vring_need_event
from virtio_schema.queue.walk import ChainBuffers, CheckedChain
from virtio_schema.schema import Feature

VirtQueue = Queue | PackedQueue
"""Either queue format: what transports build and devices are handed."""


def create_queue(
    memory: QueueMemory,
    size: int,
    driver_mem: DriverMem,
    *,
    features: int,
    notify: DriverNotify,
    state: QueueState | None = None,
    index: int = 0,
) -> VirtQueue:
    """The queue of the negotiated format: :class:`PackedQueue` if ``features`` has RING_PACKED,
    else :class:`Queue`. Device code never asks which it got."""
    cls = PackedQueue if features & Feature.RING_PACKED else Queue
    return cls(memory, size, driver_mem, features=features, notify=notify, state=state, index=index)


__all__ = [
    "AvailIndexJump",
    "BufferAddressOverflow",
    "BufferIdOutOfRange",
    "ChainAlreadyReturned",
    "ChainBuffers",
    "ChainDescriptor",
    "ChainError",
    "ChainLengthOverflow",
    "ChainNeverEnds",
    "ChainTooLong",
    "CheckedChain",
    "DescChain",
    "DescIndexOutOfRange",
    "DriverNotify",
    "HeadOutOfRange",
    "IndirectNotNegotiated",
    "IndirectTableTooLarge",
    "IndirectWithNext",
    "InvalidIndirectLength",
    "InvalidQueueState",
    "NestedIndirect",
    "OutOfOrderReturn",
    "PackedQueue",
    "Queue",
    "QueueBase",
    "QueueBroken",
    "QueueMemory",
    "QueueState",
    "ReadableAfterWritable",
    "RingError",
    "UnmappedBuffer",
    "UnmappedIndirectTable",
    "VirtQueue",
    "WrittenTooMuch",
    "create_queue",
    "vring_need_event",
]
