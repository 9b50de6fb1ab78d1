"""vhost-user messages: header and payloads as Construct schemas, with their ``struct`` layouts.

Source: QEMU ``docs/interop/vhost-user.rst`` ("Message Specification"). A message is a 12-byte header
(``request``, ``flags``, ``size``) followed by ``size`` bytes of payload; numbers are in the machine's
byte order, which is little-endian on every host this library supports (x86-64, aarch64). File
descriptors travel as SCM_RIGHTS ancillary data with the message.

As for the rings, the schemas are the source of truth and the transport reads them through
:mod:`virtio_schema.layout`; :func:`describe` uses Construct itself to decode a message for the
trace (never on a hot path).

Captures. A raw recording of a conversation (``VhostUserServer(capture=FILE)``, the examples'
``--capture FILE``) is text, one message per line::

    CONN DIR NFDS HEX

``CONN`` names the connection (``vhost-user#1``), ``DIR`` is ``<-`` (front-end to back-end) or
``->`` (the back-end's reply), ``NFDS`` the number of file descriptors that came with the message
(they cannot be recorded), ``HEX`` the message bytes, header and payload. Blank lines and lines
starting with ``#`` are comments. :func:`format_capture` writes a line, :func:`parse_capture`
reads a file back, :func:`decode_capture` decodes it into trace lines.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from construct import Array, Bytes, Int32ul, Int64ul, Padding, Struct, this

from virtio_schema.errors import VirtioError
from virtio_schema.layout import Layout

__all__ = [
    "CAPTURE_IN",
    "CAPTURE_OUT",
    "CONFIG_HDR",
    "HEADER",
    "LOG_DESCRIPTION",
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD",
    "MEMORY_HDR",
    "MEM_REGION",
    "NOFD",
    "OWN_REPLIES",
    "SINGLE_MEM_REGION",
    "U64",
    "VERSION",
    "VRING_ADDR",
    "VRING_F_LOG",
    "VRING_INDEX_MASK",
    "VRING_STATE",
    "BackendRequest",
    "CaptureFormatError",
    "CapturedMessage",
    "ConfigHdr",
    "ConfigSpace",
    "Header",
    "HeaderFlags",
    "LogDescription",
    "MemoryHdr",
    "MemoryRegion",
    "MemoryTable",
    "ProtocolFeature",
    "Request",
    "SingleMemoryRegion",
    "U64Payload",
    "VringAddr",
    "VringState",
    "decode_capture",
    "decode_stream",
    "describe",
    "format_capture",
    "parse_capture",
]

VERSION = 0x1
"""The protocol version in the low two bits of ``flags``."""

MAX_FDS = 8
"""At most this many file descriptors accompany one message (8 memory regions)."""

MAX_CONFIG_SIZE = 256
"""Largest device configuration space a GET_CONFIG/SET_CONFIG may carry."""

MAX_PAYLOAD = 4096
"""Payload sizes above this are refused before reading (no legitimate message comes close)."""

VRING_INDEX_MASK = 0xFF
"""SET_VRING_KICK/CALL/ERR: the ring index in the low byte of the u64 payload."""
NOFD = 0x100
"""SET_VRING_KICK/CALL/ERR: bit 8 of the u64 payload, no fd comes with the message (for a kick:
the back-end polls the ring)."""


class Request(enum.IntEnum):
    """Front-end request types (``VHOST_USER_*``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the back-end request channel (SET_BACKEND_REQ_FD;
    ``VHOST_USER_BACKEND_*``, ``VHOST_USER_SLAVE_*`` in QEMU 7.2)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    """The device configuration space changed: the front-end reads it again (GET_CONFIG) and
    tells the driver. Header only, no payload."""
    VRING_HOST_NOTIFIER_MSG = 3


class HeaderFlags(enum.IntFlag):
    """``flags`` of the message header."""

    VERSION_MASK = 0x3
    REPLY = 0x4
    """Set on every reply from the back-end."""
    NEED_REPLY = 0x8
    """The front-end wants an acknowledgement (REPLY_ACK)."""


class ProtocolFeature(enum.IntFlag):
    """vhost-user protocol feature bits (``VHOST_USER_PROTOCOL_F_*``), as masks."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


# --- schemas -----------------------------------------------------------------------------------

Header = Struct(
    "request" / Int32ul,
    "flags" / Int32ul,
    "size" / Int32ul,
)
"""The 12-byte message header."""

U64Payload = Struct("u64" / Int64ul)
"""A single 64-bit integer (features, queue numbers, fd-message index and flags, acks)."""

VringState = Struct(
    "index" / Int32ul,
    "num" / Int32ul,
)
"""``struct vhost_vring_state``: a ring index and a number (size, base, enable)."""

VringAddr = Struct(
    "index" / Int32ul,
    "flags" / Int32ul,
    "descriptor" / Int64ul,
    "used" / Int64ul,
    "available" / Int64ul,
    "log" / Int64ul,
)
"""``struct vhost_vring_addr``: ring addresses in the front-end's address space (note the order:
descriptor, used, available)."""

MemoryRegion = Struct(
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "mmap_offset" / Int64ul,
)
"""One region of the memory table."""

MemoryHdr = Struct(
    "num_regions" / Int32ul,
    Padding(4),
)
"""The fixed part of the memory table (regions follow)."""

MemoryTable = Struct(
    "num_regions" / Int32ul,
    Padding(4),
    "regions" / Array(this.num_regions, MemoryRegion),
)
"""The whole SET_MEM_TABLE payload (for dissectors; the transport reads header and regions)."""

SingleMemoryRegion = Struct(
    Padding(8),
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "mmap_offset" / Int64ul,
)
"""The ADD_MEM_REG / REM_MEM_REG payload."""

LogDescription = Struct(
    "mmap_size" / Int64ul,
    "mmap_offset" / Int64ul,
)
"""The SET_LOG_BASE payload: where in the fd that comes with it the dirty log lies."""

VRING_F_LOG = 0x1
"""SET_VRING_ADDR ``flags``: ``log`` is the guest address to log used-ring writes at."""

ConfigHdr = Struct(
    "offset" / Int32ul,
    "size" / Int32ul,
    "flags" / Int32ul,
)
"""The fixed part of a GET_CONFIG / SET_CONFIG payload (``size`` bytes of config follow)."""

ConfigSpace = Struct(
    "offset" / Int32ul,
    "size" / Int32ul,
    "flags" / Int32ul,
    "payload" / Bytes(this.size),
)
"""A whole GET_CONFIG / SET_CONFIG payload (for dissectors)."""


# --- records and layouts -----------------------------------------------------------------------


class HeaderRec(NamedTuple):
    request: int
    flags: int
    size: int


class U64Rec(NamedTuple):
    u64: int


class VringStateRec(NamedTuple):
    # the spec's field name shadows tuple.index(); the record never needs that method
    index: int  # type: ignore[assignment]
    num: int


class VringAddrRec(NamedTuple):
    index: int  # type: ignore[assignment]
    flags: int
    descriptor: int
    used: int
    available: int
    log: int


class MemoryRegionRec(NamedTuple):
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


class MemoryHdrRec(NamedTuple):
    num_regions: int


class LogDescriptionRec(NamedTuple):
    mmap_size: int
    mmap_offset: int


class ConfigHdrRec(NamedTuple):
    offset: int
    size: int
    flags: int


HEADER: Layout[HeaderRec] = Layout(Header, HeaderRec, name="Header")
U64: Layout[U64Rec] = Layout(U64Payload, U64Rec, name="U64")
VRING_STATE: Layout[VringStateRec] = Layout(VringState, VringStateRec, name="VringState")
VRING_ADDR: Layout[VringAddrRec] = Layout(VringAddr, VringAddrRec, name="VringAddr")
MEM_REGION: Layout[MemoryRegionRec] = Layout(MemoryRegion, MemoryRegionRec, name="MemoryRegion")
MEMORY_HDR: Layout[MemoryHdrRec] = Layout(MemoryHdr, MemoryHdrRec, name="MemoryHdr")
SINGLE_MEM_REGION: Layout[MemoryRegionRec] = Layout(
    SingleMemoryRegion, MemoryRegionRec, name="SingleMemoryRegion"
)
CONFIG_HDR: Layout[ConfigHdrRec] = Layout(ConfigHdr, ConfigHdrRec, name="ConfigHdr")
LOG_DESCRIPTION: Layout[LogDescriptionRec] = Layout(
    LogDescription, LogDescriptionRec, name="LogDescription"
)

_U64_REQUESTS = {
    Request.GET_FEATURES,
    Request.SET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.SET_PROTOCOL_FEATURES,
    Request.GET_QUEUE_NUM,
    Request.SET_VRING_KICK,
    Request.SET_VRING_CALL,
    Request.SET_VRING_ERR,
    Request.SET_LOG_FD,
    Request.GET_MAX_MEM_SLOTS,
    Request.SET_STATUS,
    Request.GET_STATUS,
}
_STATE_REQUESTS = {
    Request.SET_VRING_NUM,
    Request.SET_VRING_BASE,
    Request.GET_VRING_BASE,
    Request.SET_VRING_ENABLE,
    Request.SET_VRING_ENDIAN,
}


OWN_REPLIES = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
        Request.GET_INFLIGHT_FD,
    }
)
"""Requests whose reply has its own payload; any other reply is an ack (u64)."""


def describe(request: int, flags: int, payload: bytes, nfds: int = 0) -> str:
    """A one-line decoding of a message for the trace (Construct parses it; errors are shown, not
    raised: the trace must never be the thing that fails)."""
    try:
        name = Request(request).name
    except ValueError:
        name = f"UNKNOWN({request})"
    bits = [n for n, v in (("REPLY", 0x4), ("NEED_REPLY", 0x8)) if flags & v]
    head = (
        f"{name} flags={flags:#x}{'[' + ','.join(bits) + ']' if bits else ''} size={len(payload)}"
    )
    if nfds:
        head += f" fds={nfds}"
    try:
        if flags & HeaderFlags.REPLY and request not in OWN_REPLIES and len(payload) == 8:
            body = f"u64={U64Payload.parse(payload).u64:#x}"  # a REPLY_ACK acknowledgement
        else:
            body = _describe_payload(request, payload)
    except Exception as exc:  # a dissector shows garbage, it does not die of it
        body = f"<undecodable: {type(exc).__name__}> {payload[:32].hex()}"
    return f"{head} {body}".rstrip()


def decode_stream(data: bytes) -> list[str]:
    """Decode a captured vhost-user byte stream (one direction of the socket, e.g. from a hex
    dump) into one :func:`describe` line per message. File descriptors travel out of band and are
    not in such a capture. A message cut short ends the list with a ``<truncated ...>`` line."""
    out: list[str] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < HEADER.size:
            out.append(f"<truncated header: {len(data) - pos} of {HEADER.size} bytes>")
            break
        hdr = HEADER.unpack_from(data, pos)
        body = data[pos + HEADER.size : pos + HEADER.size + hdr.size]
        if len(body) < hdr.size:
            line = describe(hdr.request, hdr.flags, body)
            out.append(f"{line} <truncated payload: {len(body)} of {hdr.size} bytes>")
            break
        out.append(describe(hdr.request, hdr.flags, body))
        pos += HEADER.size + hdr.size
    return out


def _describe_payload(request: int, payload: bytes) -> str:
    if not payload:
        return ""
    if request in _U64_REQUESTS and len(payload) == 8:
        value = U64Payload.parse(payload).u64
        if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            nofd = " nofd" if value & NOFD else ""
            return f"index={value & VRING_INDEX_MASK}{nofd}"
        return f"u64={value:#x}"
    if request in _STATE_REQUESTS and len(payload) == 8:
        s = VringState.parse(payload)
        return f"index={s.index} num={s.num}"
    if request == Request.SET_VRING_ADDR and len(payload) == VringAddr.sizeof():
        a = VringAddr.parse(payload)
        return (
            f"index={a.index} flags={a.flags:#x} desc={a.descriptor:#x} used={a.used:#x}"
            f" avail={a.available:#x} log={a.log:#x}"
        )
    if request == Request.SET_MEM_TABLE:
        t = MemoryTable.parse(payload)
        regs = " ".join(
            f"[gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} uva={r.userspace_addr:#x}"
            f" off={r.mmap_offset:#x}]"
            for r in t.regions
        )
        return f"regions={t.num_regions} {regs}"
    if (
        request in (Request.ADD_MEM_REG, Request.REM_MEM_REG)
        and len(payload) == SingleMemoryRegion.sizeof()
    ):
        r = SingleMemoryRegion.parse(payload)
        return (
            f"gpa={r.guest_phys_addr:#x} size={r.memory_size:#x} uva={r.userspace_addr:#x}"
            f" off={r.mmap_offset:#x}"
        )
    if request == Request.SET_LOG_BASE and len(payload) == LogDescription.sizeof():
        d = LogDescription.parse(payload)
        return f"mmap_size={d.mmap_size:#x} mmap_offset={d.mmap_offset:#x}"
    if request in (Request.GET_CONFIG, Request.SET_CONFIG):
        c = ConfigSpace.parse(payload)
        return f"offset={c.offset} size={c.size} flags={c.flags} data={bytes(c.payload)[:64].hex()}"
    return payload[:32].hex()


# --- captures ----------------------------------------------------------------------------------

CAPTURE_IN = "<-"
"""Direction mark of a message from the front-end (as in the trace)."""
CAPTURE_OUT = "->"
"""Direction mark of a message from the back-end (a reply)."""


class CaptureFormatError(VirtioError):
    """A capture line does not follow the format (named by its line number)."""


class CapturedMessage(NamedTuple):
    """One recorded message (see "Captures" in the module docstring)."""

    conn: str
    direction: str
    """:data:`CAPTURE_IN` or :data:`CAPTURE_OUT`."""
    nfds: int
    data: bytes
    """The whole message: header and payload, as on the socket."""


def format_capture(conn: str, direction: str, data: bytes, nfds: int = 0) -> str:
    """One capture line (without the newline) for a message of ``data`` bytes."""
    if direction not in (CAPTURE_IN, CAPTURE_OUT) or not conn or " " in conn:
        raise CaptureFormatError(f"bad capture record: conn {conn!r}, direction {direction!r}")
    return f"{conn} {direction} {nfds} {data.hex()}"


def parse_capture(text: str) -> list[CapturedMessage]:
    """The messages of a capture file's text, in order."""
    out: list[CapturedMessage] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 4 or parts[1] not in (CAPTURE_IN, CAPTURE_OUT):
            raise CaptureFormatError(f"capture line {lineno}: expected 'CONN DIR NFDS HEX'")
        try:
            nfds = int(parts[2])
            data = bytes.fromhex(parts[3])
        except ValueError:
            raise CaptureFormatError(
                f"capture line {lineno}: NFDS must be a number and HEX hexadecimal"
            ) from None
        out.append(CapturedMessage(parts[0], parts[1], nfds, data))
    return out


def decode_capture(text: str) -> list[str]:
    """A capture decoded into the lines ``--trace`` logs: ``CONN DIR`` and :func:`describe` of
    each record; a record shorter or longer than its header says is marked as such."""
    out = []
    for msg in parse_capture(text):
        if len(msg.data) < HEADER.size:
            line = f"<truncated header: {len(msg.data)} of {HEADER.size} bytes>"
        else:
            h = HEADER.unpack_from(msg.data)
            body = msg.data[HEADER.size :]
            line = describe(h.request, h.flags, body[: h.size], msg.nfds)
            if len(body) < h.size:
                line += f" <truncated payload: {len(body)} of {h.size} bytes>"
            elif len(body) > h.size:
                line += f" <{len(body) - h.size} bytes after the message>"
        out.append(f"{msg.conn} {msg.direction} {line}")
    return out
