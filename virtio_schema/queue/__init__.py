"""The virtqueue state machine, device side: take chains, return them, decide notifications.

``Queue`` (split ring) hands out :class:`DescChain` objects; later ring formats hand out the same
type, so the layers above never ask which format they serve. The validation catalogue is in
:mod:`virtio_schema.queue.errors`.

Imports: :mod:`virtio_schema.ring`, :mod:`virtio_schema.mem`, :mod:`virtio_schema.schema`.
"""

from virtio_schema.queue.desc_chain import ChainDescriptor, DescChain
from virtio_schema.queue.errors import (
    AvailIndexJump,
    BufferAddressOverflow,
    ChainAlreadyReturned,
    ChainError,
    ChainLengthOverflow,
    ChainTooLong,
    DescIndexOutOfRange,
    HeadOutOfRange,
    IndirectNotNegotiated,
    IndirectTableTooLarge,
    IndirectWithNext,
    InvalidIndirectLength,
    NestedIndirect,
    QueueBroken,
    ReadableAfterWritable,
    RingError,
    UnmappedBuffer,
    UnmappedIndirectTable,
    WrittenTooMuch,
)
from virtio_schema.queue.split import Queue
from virtio_schema.queue.state import DriverNotify, QueueMemory, QueueState, vring_need_event

__all__ = [
    "AvailIndexJump",
    "BufferAddressOverflow",
    "ChainAlreadyReturned",
    "ChainDescriptor",
    "ChainError",
    "ChainLengthOverflow",
    "ChainTooLong",
    "DescChain",
    "DescIndexOutOfRange",
    "DriverNotify",
    "HeadOutOfRange",
    "IndirectNotNegotiated",
    "IndirectTableTooLarge",
    "IndirectWithNext",
    "InvalidIndirectLength",
    "NestedIndirect",
    "Queue",
    "QueueBroken",
    "QueueMemory",
    "QueueState",
    "ReadableAfterWritable",
    "RingError",
    "UnmappedBuffer",
    "UnmappedIndirectTable",
    "WrittenTooMuch",
    "vring_need_event",
]
