"""Declarative Construct layouts of the virtio wire formats: the single source of truth for every byte.

This package imports only ``construct`` (and :mod:`virtio_schema.errors`). It is usable on its own,
e.g. by a dissector::

    >>> from virtio_schema.schema import Descriptor
    >>> d = Descriptor.parse(bytes.fromhex("0010000000000000 00020000 0300 0100"))
    >>> (d.addr, d.len, d.flags, d.next)
    (4096, 512, 3, 1)

The device path never parses through Construct at run time: :mod:`virtio_schema.layout` derives
``struct`` accessors from these declarations once.
"""

from virtio_schema.schema.devices import (
    BLK_ID_BYTES,
    BLK_SECTOR_SIZE,
    INPUT_CONFIG_UNION_BYTES,
    BlkFeature,
    BlkStatus,
    BlkType,
    InputConfigSelect,
    InputEventType,
    NetFeature,
    NetGsoType,
    NetHdrFlags,
    NetStatus,
    VirtioBlkConfig,
    VirtioBlkReqHdr,
    VirtioInputAbsInfo,
    VirtioInputConfig,
    VirtioInputDevids,
    VirtioInputEvent,
    VirtioNetConfig,
    VirtioNetHdr,
    VirtioVsockHdr,
    VsockOp,
    VsockType,
)
from virtio_schema.schema.flags import (
    AvailFlags,
    DescFlags,
    EventFlags,
    Feature,
    PackedDescFlags,
    UsedFlags,
)
from virtio_schema.schema.packed import (
    EVENT_SUPPRESSION_ALIGN,
    PACKED_RING_ALIGN,
    EventSuppression,
    PackedDescriptor,
    check_packed_queue_size,
    packed_ring,
)
from virtio_schema.schema.split import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
    Descriptor,
    UsedElem,
    avail_ring,
    check_split_queue_size,
    descriptor_table,
    used_ring,
)

__all__ = [
    "AVAIL_ALIGN",
    "BLK_ID_BYTES",
    "BLK_SECTOR_SIZE",
    "DESC_ALIGN",
    "EVENT_SUPPRESSION_ALIGN",
    "INPUT_CONFIG_UNION_BYTES",
    "MAX_QUEUE_SIZE",
    "PACKED_RING_ALIGN",
    "USED_ALIGN",
    "AvailFlags",
    "BlkFeature",
    "BlkStatus",
    "BlkType",
    "DescFlags",
    "Descriptor",
    "EventFlags",
    "EventSuppression",
    "Feature",
    "InputConfigSelect",
    "InputEventType",
    "NetFeature",
    "NetGsoType",
    "NetHdrFlags",
    "NetStatus",
    "PackedDescFlags",
    "PackedDescriptor",
    "UsedElem",
    "UsedFlags",
    "VirtioBlkConfig",
    "VirtioBlkReqHdr",
    "VirtioInputAbsInfo",
    "VirtioInputConfig",
    "VirtioInputDevids",
    "VirtioInputEvent",
    "VirtioNetConfig",
    "VirtioNetHdr",
    "VirtioVsockHdr",
    "VsockOp",
    "VsockType",
    "avail_ring",
    "check_packed_queue_size",
    "check_split_queue_size",
    "descriptor_table",
    "packed_ring",
    "used_ring",
]
