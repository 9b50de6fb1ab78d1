"""Typed records and ``struct`` layouts of the device headers, ready for ``read_record``.

Each record is a ``NamedTuple`` whose fields mirror a schema in :mod:`virtio_schema.schema.devices`;
each ``Layout`` is proved against its schema when this module is imported::

    hdr = ReadableChain(chain).read_record(BLK_REQ_HDR)     # -> BlkReqHdr
    if hdr.type == BlkType.IN: ...

Imports: :mod:`virtio_schema.schema`, :mod:`virtio_schema.layout`.
"""

from __future__ import annotations

from typing import NamedTuple

from virtio_schema.layout import Layout
from virtio_schema.schema import devices

__all__ = [
    "BLK_CONFIG",
    "BLK_REQ_HDR",
    "INPUT_ABSINFO",
    "INPUT_CONFIG",
    "INPUT_DEVIDS",
    "INPUT_EVENT",
    "NET_CONFIG",
    "NET_HDR",
    "VSOCK_CONFIG",
    "VSOCK_EVENT",
    "VSOCK_HDR",
    "BlkConfig",
    "BlkReqHdr",
    "InputAbsInfo",
    "InputConfig",
    "InputDevids",
    "InputEvent",
    "NetConfig",
    "NetHdr",
    "VsockConfig",
    "VsockEvent",
    "VsockHdr",
]


class BlkReqHdr(NamedTuple):
    """The device-readable header of a virtio-blk request."""

    type: int
    ioprio: int
    sector: int


class BlkConfig(NamedTuple):
    """``struct virtio_blk_config`` (geometry and topology flattened)."""

    capacity: int
    size_max: int
    seg_max: int
    cylinders: int
    heads: int
    sectors: int
    blk_size: int
    physical_block_exp: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int
    writeback: int
    unused0: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int


class NetHdr(NamedTuple):
    """``struct virtio_net_hdr`` with ``num_buffers``."""

    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int
    num_buffers: int


class NetConfig(NamedTuple):
    """``struct virtio_net_config`` up to ``mtu``."""

    mac: bytes
    status: int
    max_virtqueue_pairs: int
    mtu: int


class VsockHdr(NamedTuple):
    """``struct virtio_vsock_hdr``."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


class VsockConfig(NamedTuple):
    """``struct virtio_vsock_config``."""

    guest_cid: int


class VsockEvent(NamedTuple):
    """``struct virtio_vsock_event``."""

    id: int


class InputEvent(NamedTuple):
    """``struct virtio_input_event``: one evdev event (both virtio-input queues)."""

    type: int
    code: int
    value: int


class InputConfig(NamedTuple):
    """``struct virtio_input_config`` (``reserved`` left out: zero)."""

    select: int
    subsel: int
    size: int
    u: bytes


class InputAbsInfo(NamedTuple):
    """``struct virtio_input_absinfo``."""

    min: int
    max: int
    fuzz: int
    flat: int
    res: int


class InputDevids(NamedTuple):
    """``struct virtio_input_devids``."""

    bustype: int
    vendor: int
    product: int
    version: int


BLK_REQ_HDR: Layout[BlkReqHdr] = Layout(devices.VirtioBlkReqHdr, BlkReqHdr, name="VirtioBlkReqHdr")
BLK_CONFIG: Layout[BlkConfig] = Layout(devices.VirtioBlkConfig, BlkConfig, name="VirtioBlkConfig")
NET_HDR: Layout[NetHdr] = Layout(devices.VirtioNetHdr, NetHdr, name="VirtioNetHdr")
NET_CONFIG: Layout[NetConfig] = Layout(devices.VirtioNetConfig, NetConfig, name="VirtioNetConfig")
VSOCK_HDR: Layout[VsockHdr] = Layout(devices.VirtioVsockHdr, VsockHdr, name="VirtioVsockHdr")
#: The layout of ``struct virtio_vsock_config`` (:class:`VsockConfig`).
VSOCK_CONFIG: Layout[VsockConfig] = Layout(
    devices.VirtioVsockConfig, VsockConfig, name="VirtioVsockConfig"
)
#: The layout of ``struct virtio_vsock_event`` (:class:`VsockEvent`).
VSOCK_EVENT: Layout[VsockEvent] = Layout(
    devices.VirtioVsockEvent, VsockEvent, name="VirtioVsockEvent"
)
INPUT_EVENT: Layout[InputEvent] = Layout(
    devices.VirtioInputEvent, InputEvent, name="VirtioInputEvent"
)
INPUT_CONFIG: Layout[InputConfig] = Layout(
    devices.VirtioInputConfig, InputConfig, name="VirtioInputConfig"
)
INPUT_ABSINFO: Layout[InputAbsInfo] = Layout(
    devices.VirtioInputAbsInfo, InputAbsInfo, name="VirtioInputAbsInfo"
)
INPUT_DEVIDS: Layout[InputDevids] = Layout(
    devices.VirtioInputDevids, InputDevids, name="VirtioInputDevids"
)
