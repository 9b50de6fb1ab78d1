"""The vhost-user trace decoder on captured byte streams: every request the back-end handles,
truncated messages and unknown requests."""

from __future__ import annotations

import struct

import pytest

from virtio_schema.vhost_user.messages import Request, decode_stream, describe


def _msg(request: int, payload: bytes = b"", flags: int = 1) -> bytes:
    return struct.pack("<III", request, flags, len(payload)) + payload


HANDLED = {
    Request.GET_FEATURES: b"",
    Request.SET_FEATURES: struct.pack("<Q", 1 << 32),
    Request.SET_OWNER: b"",
    Request.RESET_OWNER: b"",
    Request.GET_PROTOCOL_FEATURES: b"",
    Request.SET_PROTOCOL_FEATURES: struct.pack("<Q", 0x209),
    Request.GET_QUEUE_NUM: b"",
    Request.SET_MEM_TABLE: struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 1 << 28, 0x7F00, 0),
    Request.SET_VRING_NUM: struct.pack("<II", 0, 128),
    Request.SET_VRING_ADDR: struct.pack("<IIQQQQ", 0, 0, 0x1000, 0x3000, 0x2000, 0),
    Request.SET_VRING_BASE: struct.pack("<II", 0, 0),
    Request.GET_VRING_BASE: struct.pack("<II", 0, 0),
    Request.SET_VRING_KICK: struct.pack("<Q", 0),
    Request.SET_VRING_CALL: struct.pack("<Q", 1),
    Request.SET_VRING_ERR: struct.pack("<Q", 0x100),
    Request.SET_VRING_ENABLE: struct.pack("<II", 0, 1),
    Request.GET_CONFIG: struct.pack("<III", 0, 4, 0) + bytes(4),
    Request.SET_CONFIG: struct.pack("<III", 0, 4, 0) + b"\x01\x02\x03\x04",
}


def test_every_handled_request_decodes_by_name_with_its_fields() -> None:
    stream = b"".join(_msg(r, p) for r, p in HANDLED.items())
    lines = decode_stream(stream)
    assert [line.split()[0] for line in lines] == [r.name for r in HANDLED]
    text = "\n".join(lines)
    assert "u64=0x100000000" in text  # SET_FEATURES
    assert "index=0 num=128" in text  # SET_VRING_NUM
    assert "desc=0x1000 used=0x3000 avail=0x2000" in text
    assert "regions=1 [gpa=0x0 size=0x10000000 uva=0x7f00 off=0x0]" in text
    assert "index=0 nofd" in text  # SET_VRING_ERR without an fd
    assert "data=01020304" in text  # SET_CONFIG


def test_replies_are_decoded_as_replies() -> None:
    ack = describe(Request.SET_MEM_TABLE, 0x5, struct.pack("<Q", 0))
    assert ack.startswith("SET_MEM_TABLE flags=0x5[REPLY]")
    assert "u64=0x0" in ack
    base = describe(Request.GET_VRING_BASE, 0x5, struct.pack("<II", 1, 42))
    assert "index=1 num=42" in base


def test_unknown_requests_are_shown_as_such() -> None:
    (line,) = decode_stream(_msg(999, b"\xde\xad"))
    assert line.startswith("UNKNOWN(999)")
    assert "dead" in line


@pytest.mark.parametrize("cut", [3, 12, 12 + 7])
def test_a_truncated_stream_ends_with_a_truncation_line(cut: int) -> None:
    stream = _msg(Request.GET_FEATURES) + _msg(Request.SET_VRING_NUM, struct.pack("<II", 0, 8))
    lines = decode_stream(stream[: 12 + cut])
    assert lines[0].startswith("GET_FEATURES")
    assert "<truncated" in lines[-1]


def test_garbage_payloads_never_raise() -> None:
    line = describe(Request.SET_MEM_TABLE, 1, struct.pack("<II", 200, 0))
    assert "<undecodable" in line
