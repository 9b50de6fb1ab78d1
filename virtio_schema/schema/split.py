"""Split virtqueue layouts (virtio 1.2, 2.7): descriptor table, available ring, used ring.

One Construct declaration per structure, spec field names, one line per field. The ring factories take
the queue size ``n`` and are cached, so ``avail_ring(256) is avail_ring(256)``.

Offsets (little-endian), for queue size ``n``:

* descriptor: ``addr`` u64 @0, ``len`` u32 @8, ``flags`` u16 @12, ``next`` u16 @14 (16 bytes,
  table aligned to 16, ``16 * n`` bytes);
* available ring: ``flags`` u16 @0, ``idx`` u16 @2, ``ring[i]`` u16 @4+2i, ``used_event`` u16
  @4+2n (aligned to 2, ``6 + 2 * n`` bytes);
* used ring: ``flags`` u16 @0, ``idx`` u16 @2, ``ring[i]`` = {``id`` u32, ``len`` u32} @4+8i,
  ``avail_event`` u16 @4+8n (aligned to 4, ``6 + 8 * n`` bytes).
"""

from __future__ import annotations

import functools

from construct import Array, Int16ul, Int32ul, Int64ul, Struct

from virtio_schema.errors import InvalidQueueSize

__all__ = [
    "AVAIL_ALIGN",
    "DESC_ALIGN",
    "MAX_QUEUE_SIZE",
    "USED_ALIGN",
    "Descriptor",
    "UsedElem",
    "avail_ring",
    "check_split_queue_size",
    "descriptor_table",
    "used_ring",
]

MAX_QUEUE_SIZE = 32768
"""Largest queue size of either ring format (virtio 1.2, 2.7 and 2.8)."""

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

Descriptor = Struct(
    "addr" / Int64ul,
    "len" / Int32ul,
    "flags" / Int16ul,
    "next" / Int16ul,
)
"""``struct virtq_desc``: one buffer of a chain."""

UsedElem = Struct(
    "id" / Int32ul,
    "len" / Int32ul,
)
"""``struct virtq_used_elem``: head index of a returned chain and the bytes written into it."""


def check_split_queue_size(n: int) -> None:
    """Raise :class:`~virtio_schema.errors.InvalidQueueSize` unless ``n`` is a power of two in
    1..32768 (virtio 1.2, 2.7)."""
    if not 1 <= n <= MAX_QUEUE_SIZE:
        raise InvalidQueueSize(n, f"a split queue holds 1..{MAX_QUEUE_SIZE} descriptors")
    if n & (n - 1):
        raise InvalidQueueSize(n, "a split queue size must be a power of two")


@functools.cache
def descriptor_table(n: int) -> Array:
    """The descriptor table of a split queue of size ``n``: ``n`` :data:`Descriptor` entries."""
    check_split_queue_size(n)
    return Array(n, Descriptor)


@functools.cache
def avail_ring(n: int) -> Struct:
    """``struct virtq_avail`` for a queue of size ``n``, with its trailing ``used_event``."""
    check_split_queue_size(n)
    return Struct(
        "flags" / Int16ul,
        "idx" / Int16ul,
        "ring" / Array(n, Int16ul),
        "used_event" / Int16ul,
    )


@functools.cache
def used_ring(n: int) -> Struct:
    """``struct virtq_used`` for a queue of size ``n``, with its trailing ``avail_event``."""
    check_split_queue_size(n)
    return Struct(
        "flags" / Int16ul,
        "idx" / Int16ul,
        "ring" / Array(n, UsedElem),
        "avail_event" / Int16ul,
    )
