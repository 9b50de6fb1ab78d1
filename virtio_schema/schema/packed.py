"""Packed virtqueue layouts (virtio 1.2, 2.8): the packed descriptor and the event suppression area.

* packed descriptor: ``addr`` u64 @0, ``len`` u32 @8, ``id`` u16 @12, ``flags`` u16 @14 (16 bytes;
  the ring is ``16 * n`` bytes aligned to 16, ``n`` in 1..32768, not necessarily a power of two);
* event suppression (driver and device areas alike): ``off_wrap`` u16 @0 (ring offset in bits 0-14,
  wrap counter in bit 15), ``flags`` u16 @2 (see :class:`~virtio_schema.schema.flags.EventFlags`);
  4 bytes aligned to 4.
"""

from __future__ import annotations

import functools

from construct import Array, Int16ul, Int32ul, Int64ul, Struct

from virtio_schema.errors import InvalidQueueSize
from virtio_schema.schema.split import MAX_QUEUE_SIZE

__all__ = [
    "EVENT_SUPPRESSION_ALIGN",
    "PACKED_RING_ALIGN",
    "EventSuppression",
    "PackedDescriptor",
    "check_packed_queue_size",
    "packed_ring",
]

PACKED_RING_ALIGN = 16
EVENT_SUPPRESSION_ALIGN = 4

PackedDescriptor = Struct(
    "addr" / Int64ul,
    "len" / Int32ul,
    "id" / Int16ul,
    "flags" / Int16ul,
)
"""``struct pvirtq_desc``: a slot of the packed ring, written by the driver and by the device."""

EventSuppression = Struct(
    "off_wrap" / Int16ul,
    "flags" / Int16ul,
)
"""``struct pvirtq_event_suppress``: the driver's or the device's event suppression area."""


def check_packed_queue_size(n: int) -> None:
    """Raise :class:`~virtio_schema.errors.InvalidQueueSize` unless ``n`` is in 1..32768."""
    if not 1 <= n <= MAX_QUEUE_SIZE:
        raise InvalidQueueSize(n, f"a packed queue holds 1..{MAX_QUEUE_SIZE} descriptors")


@functools.cache
def packed_ring(n: int) -> Array:
    """The descriptor ring of a packed queue of size ``n``."""
    check_packed_queue_size(n)
    return Array(n, PackedDescriptor)
