"""Device headers: the first bytes of a request as device code (and dissectors) read them.

* virtio-net: ``struct virtio_net_hdr`` with ``num_buffers`` (virtio 1.2, 5.1.6), 12 bytes;
* virtio-blk: ``struct virtio_blk_req`` header (type, reserved/ioprio, sector; virtio 1.2, 5.2.6),
  16 bytes, its request types and status values, and the device configuration layout (5.2.4);
* virtio-vsock: ``struct virtio_vsock_hdr`` (virtio 1.2, 5.10.6), 44 bytes, its types, operations
  and shutdown flags, the configuration layout (5.10.4: the guest's CID) and the event
  (5.10.6.5: the transport reset);
* virtio-input: ``struct virtio_input_event`` (virtio 1.2, 5.8.6), 8 bytes, the configuration layout
  (5.8.4: ``select``, ``subsel``, ``size`` and a 128-byte union) and the union's structured members.

All little-endian (VERSION_1 devices). Fields keep the spec's names; flag-like fields stay integers.
"""

from __future__ import annotations

import enum

from construct import Bytes, Int8ul, Int16ul, Int32sl, Int32ul, Int64ul, Padding, Struct

__all__ = [
    "BLK_ID_BYTES",
    "BLK_SECTOR_SIZE",
    "INPUT_CONFIG_UNION_BYTES",
    "BlkFeature",
    "BlkStatus",
    "BlkType",
    "InputConfigSelect",
    "InputEventType",
    "NetFeature",
    "NetGsoType",
    "NetHdrFlags",
    "NetStatus",
    "VirtioBlkConfig",
    "VirtioBlkReqHdr",
    "VirtioInputAbsInfo",
    "VirtioInputConfig",
    "VirtioInputDevids",
    "VirtioInputEvent",
    "VirtioNetConfig",
    "VirtioNetHdr",
    "VirtioVsockConfig",
    "VirtioVsockEvent",
    "VirtioVsockHdr",
    "VsockEventId",
    "VsockFeature",
    "VsockOp",
    "VsockShutdown",
    "VsockType",
]

# --- virtio-net --------------------------------------------------------------------------------

VirtioNetHdr = Struct(
    "flags" / Int8ul,
    "gso_type" / Int8ul,
    "hdr_len" / Int16ul,
    "gso_size" / Int16ul,
    "csum_start" / Int16ul,
    "csum_offset" / Int16ul,
    "num_buffers" / Int16ul,
)
"""``struct virtio_net_hdr`` as used with VERSION_1 or MRG_RXBUF (12 bytes, ``num_buffers`` last)."""


class NetHdrFlags(enum.IntFlag):
    """``virtio_net_hdr.flags``."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


VirtioNetConfig = Struct(
    "mac" / Bytes(6),
    "status" / Int16ul,
    "max_virtqueue_pairs" / Int16ul,
    "mtu" / Int16ul,
)
"""``struct virtio_net_config`` up to ``mtu`` (10 bytes; virtio 1.2, 5.1.4)."""


class NetStatus(enum.IntFlag):
    """``virtio_net_config.status``."""

    LINK_UP = 1
    ANNOUNCE = 2


class NetFeature(enum.IntFlag):
    """virtio-net feature bits (virtio 1.2, 5.1.3), as masks."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23


class NetGsoType(enum.IntEnum):
    """``virtio_net_hdr.gso_type`` (without the ECN bit 0x80)."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5


# --- virtio-blk --------------------------------------------------------------------------------

BLK_SECTOR_SIZE = 512
"""``sector`` counts 512-byte units whatever the device's ``blk_size``."""

BLK_ID_BYTES = 20
"""Length of the identification string a GET_ID request reads."""

VirtioBlkReqHdr = Struct(
    "type" / Int32ul,
    "ioprio" / Int32ul,
    "sector" / Int64ul,
)
"""The device-readable header of a virtio-blk request (the spec's ``reserved`` is Linux's ``ioprio``)."""


class BlkType(enum.IntEnum):
    """virtio-blk request types (``VIRTIO_BLK_T_*``)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(enum.IntEnum):
    """The status byte a virtio-blk device writes last (``VIRTIO_BLK_S_*``)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


class BlkFeature(enum.IntFlag):
    """virtio-blk feature bits (virtio 1.2, 5.2.3), as masks."""

    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


VirtioBlkConfig = Struct(
    "capacity" / Int64ul,
    "size_max" / Int32ul,
    "seg_max" / Int32ul,
    "cylinders" / Int16ul,  # struct virtio_blk_geometry, flattened
    "heads" / Int8ul,
    "sectors" / Int8ul,
    "blk_size" / Int32ul,
    "physical_block_exp" / Int8ul,  # struct virtio_blk_topology, flattened
    "alignment_offset" / Int8ul,
    "min_io_size" / Int16ul,
    "opt_io_size" / Int32ul,
    "writeback" / Int8ul,
    "unused0" / Int8ul,
    "num_queues" / Int16ul,
    "max_discard_sectors" / Int32ul,
    "max_discard_seg" / Int32ul,
    "discard_sector_alignment" / Int32ul,
    "max_write_zeroes_sectors" / Int32ul,
    "max_write_zeroes_seg" / Int32ul,
    "write_zeroes_may_unmap" / Int8ul,
    Padding(3),
)
"""``struct virtio_blk_config`` up to ``write_zeroes_may_unmap`` (60 bytes)."""

# --- virtio-vsock ------------------------------------------------------------------------------

VirtioVsockHdr = Struct(
    "src_cid" / Int64ul,
    "dst_cid" / Int64ul,
    "src_port" / Int32ul,
    "dst_port" / Int32ul,
    "len" / Int32ul,
    "type" / Int16ul,
    "op" / Int16ul,
    "flags" / Int32ul,
    "buf_alloc" / Int32ul,
    "fwd_cnt" / Int32ul,
)
"""``struct virtio_vsock_hdr`` (44 bytes, packed)."""


class VsockType(enum.IntEnum):
    """``virtio_vsock_hdr.type`` (``VIRTIO_VSOCK_TYPE_*``)."""

    STREAM = 1
    SEQPACKET = 2


class VsockOp(enum.IntEnum):
    """``virtio_vsock_hdr.op`` (``VIRTIO_VSOCK_OP_*``)."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class VsockShutdown(enum.IntFlag):
    """``virtio_vsock_hdr.flags`` of a SHUTDOWN (``VIRTIO_VSOCK_SHUTDOWN_*``): what the sender
    will no longer do."""

    RCV = 1
    """The sender will receive no more data."""
    SEND = 2
    """The sender will send no more data."""


class VsockFeature(enum.IntFlag):
    """virtio-vsock feature bits (virtio 1.2, 5.10.3)."""

    STREAM = 1 << 0
    """Stream sockets (implied when no socket-type bit is offered: Linux 6.1 knows no such bit)."""
    SEQPACKET = 1 << 1


class VsockEventId(enum.IntEnum):
    """``virtio_vsock_event.id`` (``VIRTIO_VSOCK_EVENT_*``)."""

    TRANSPORT_RESET = 0
    """Every connection is gone; read the guest CID again (after a migration or a restart)."""


VirtioVsockConfig = Struct("guest_cid" / Int64ul)
"""``struct virtio_vsock_config`` (8 bytes): the guest's context id (only its low 32 bits are
used: virtio 1.2, 5.10.4)."""

VirtioVsockEvent = Struct("id" / Int32ul)
"""``struct virtio_vsock_event`` (4 bytes), one per event-queue buffer."""


# --- virtio-input ------------------------------------------------------------------------------

VirtioInputEvent = Struct(
    "type" / Int16ul,
    "code" / Int16ul,
    "value" / Int32sl,
)
"""``struct virtio_input_event`` (8 bytes; virtio 1.2, 5.8.6): one evdev event, on both queues.
``value`` is the spec's ``le32`` read as evdev's ``__s32`` (a relative axis moves both ways); the
bytes are the same."""


class InputEventType(enum.IntEnum):
    """``virtio_input_event.type``: the evdev event types (Linux ``input-event-codes.h``,
    ``EV_*``), which are also the ``subsel`` of an ``EV_BITS`` query."""

    SYN = 0x00
    KEY = 0x01
    REL = 0x02
    ABS = 0x03
    MSC = 0x04
    SW = 0x05
    LED = 0x11
    SND = 0x12
    REP = 0x14
    FF = 0x15


class InputConfigSelect(enum.IntEnum):
    """``virtio_input_config.select`` (``VIRTIO_INPUT_CFG_*``): what the union holds."""

    UNSET = 0x00
    ID_NAME = 0x01
    ID_SERIAL = 0x02
    ID_DEVIDS = 0x03
    PROP_BITS = 0x10
    EV_BITS = 0x11
    ABS_INFO = 0x12


INPUT_CONFIG_UNION_BYTES = 128
"""Size of the configuration's union ``u`` (a string, a bitmap, ``abs`` or ``ids``)."""

VirtioInputConfig = Struct(
    "select" / Int8ul,  # written by the driver
    "subsel" / Int8ul,  # written by the driver
    "size" / Int8ul,  # bytes of ``u`` that answer select/subsel (0: none)
    Padding(5),  # reserved[5]
    "u" / Bytes(INPUT_CONFIG_UNION_BYTES),
)
"""``struct virtio_input_config`` (136 bytes; virtio 1.2, 5.8.4). The driver writes ``select``
and ``subsel``, then reads ``size`` and the union: a string (no NUL terminator), a bitmap (bit
``n`` is bit ``n % 8`` of byte ``n // 8``), :data:`VirtioInputAbsInfo` or
:data:`VirtioInputDevids`."""

VirtioInputAbsInfo = Struct(
    "min" / Int32sl,
    "max" / Int32sl,
    "fuzz" / Int32sl,
    "flat" / Int32sl,
    "res" / Int32sl,
)
"""``struct virtio_input_absinfo`` (20 bytes), the union for ``ABS_INFO``: the spec's ``le32``
fields read as evdev's signed ones, in the spec's order (``res`` last)."""

VirtioInputDevids = Struct(
    "bustype" / Int16ul,
    "vendor" / Int16ul,
    "product" / Int16ul,
    "version" / Int16ul,
)
"""``struct virtio_input_devids`` (8 bytes), the union for ``ID_DEVIDS``."""
