"""The vhost-user trace decoder on captured byte streams: every request the back-end handles,
truncated messages and unknown requests, and a real conversation with QEMU 7.2 recorded by the
end-to-end tests (``tests/data/qemu72_vhost_user_blk.trace``)."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest

from virtio_schema.vhost_user.messages import (
    CAPTURE_IN,
    CAPTURE_OUT,
    CapturedMessage,
    CaptureFormatError,
    HeaderFlags,
    Request,
    decode_capture,
    decode_stream,
    describe,
    format_capture,
    parse_capture,
)


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


# --- a real conversation: QEMU 7.2 and our blk back-end --------------------------------------------

RECORDED = Path(__file__).parent / "data" / "qemu72_vhost_user_blk.trace"
"""Recorded by tests/test_e2e_inspect.py (``--capture``; ``VIRTIO_SCHEMA_UPDATE_DATA=1``)."""

R = Request
# Observed with QEMU 7.2 and a Linux 6.1 guest: the order QEMU sends in
PROBE = [R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
         R.SET_OWNER, R.GET_FEATURES, R.SET_VRING_CALL, R.SET_VRING_ERR, R.GET_CONFIG]  # fmt: skip
START = [R.SET_FEATURES, R.SET_VRING_CALL, R.SET_FEATURES, R.SET_MEM_TABLE, R.SET_VRING_NUM,
         R.SET_VRING_BASE, R.SET_VRING_ADDR, R.SET_VRING_KICK, R.SET_VRING_ENABLE]  # fmt: skip
STOP = [R.SET_VRING_ENABLE, R.GET_VRING_BASE]


def _recorded() -> list[CapturedMessage]:
    return parse_capture(RECORDED.read_text())


def _header(msg: CapturedMessage) -> tuple[int, int, bytes]:
    request, flags, size = struct.unpack_from("<III", msg.data)
    return request, flags, msg.data[12 : 12 + size]


def test_recorded_qemu_conversation_decodes_in_the_documented_order() -> None:
    msgs = _recorded()
    # one direction as a plain byte stream, through the public decoder
    lines = decode_stream(b"".join(m.data for m in msgs if m.direction == CAPTURE_IN))
    for line in lines:
        assert not line.startswith("UNKNOWN("), line
        assert "<truncated" not in line, line
        assert "<undecodable" not in line, line
    names = [line.split()[0] for line in lines]
    starts = (len(names) - len(PROBE)) // len(START + STOP)
    assert starts >= 2  # the firmware's start and stop, then Linux's (stopped over QMP)
    assert names == [r.name for r in PROBE + (START + STOP) * starts]
    enables = [line for line in lines if line.startswith("SET_VRING_ENABLE")]
    assert [line.rsplit("num=", 1)[1] for line in enables] == ["1", "0"] * starts
    mem_tables = [line for line in lines if line.startswith("SET_MEM_TABLE")]
    assert all("[NEED_REPLY]" in line for line in mem_tables)  # REPLY_ACK was accepted


def test_recorded_replies_answer_the_request_just_before_them() -> None:
    msgs = _recorded()
    for before, msg in itertools.pairwise(msgs):
        request, flags, _ = _header(msg)
        if msg.direction == CAPTURE_OUT:
            assert before.direction == CAPTURE_IN
            asked, asked_flags, _ = _header(before)
            assert request == asked
            assert flags & HeaderFlags.REPLY
            assert Request(asked).name.startswith("GET_") or asked_flags & HeaderFlags.NEED_REPLY
    for msg, after in zip(msgs, [*msgs[1:], None], strict=True):
        request, flags, _ = _header(msg)
        if msg.direction == CAPTURE_IN and (
            Request(request).name.startswith("GET_") or flags & HeaderFlags.NEED_REPLY
        ):
            assert after is not None, Request(request).name
            assert after.direction == CAPTURE_OUT, Request(request).name


def test_recorded_fds_come_with_the_messages_that_carry_them() -> None:
    for msg in _recorded():
        request, _, payload = _header(msg)
        if msg.direction == CAPTURE_OUT:
            assert msg.nfds == 0
        elif request == Request.SET_MEM_TABLE:
            assert msg.nfds == struct.unpack_from("<I", payload)[0]  # one fd per region
        elif request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            nofd = struct.unpack("<Q", payload)[0] & 0x100
            assert msg.nfds == (0 if nofd else 1)
        else:
            assert msg.nfds == 0, Request(request).name
    decoded = decode_capture(RECORDED.read_text())
    assert all("fds=1" in line for line in decoded if " <- SET_VRING_KICK " in line)


def test_recorded_ring_addresses_lie_in_the_memory_table_sent_before_them() -> None:
    regions: list[tuple[int, int]] = []
    checked = 0
    for msg in _recorded():
        request, _, payload = _header(msg)
        if msg.direction != CAPTURE_IN:
            continue
        if request == Request.SET_MEM_TABLE:
            (count,) = struct.unpack_from("<I", payload)
            regions = [
                struct.unpack_from("<QQQQ", payload, 8 + 32 * i)[1:3] for i in range(count)
            ]  # (size, userspace_addr)
        elif request == Request.SET_VRING_ADDR:
            _, _, desc, used, avail, _ = struct.unpack("<IIQQQQ", payload)
            for addr in (desc, used, avail):
                assert any(uva <= addr < uva + size for size, uva in regions), hex(addr)
            checked += 1
    assert checked >= 2


def test_capture_lines_round_trip_and_bad_lines_are_named() -> None:
    line = format_capture("vhost-user#3", CAPTURE_IN, _msg(Request.GET_FEATURES), 2)
    assert parse_capture(f"# comment\n\n{line}\n") == [
        CapturedMessage("vhost-user#3", CAPTURE_IN, 2, _msg(Request.GET_FEATURES))
    ]
    assert decode_capture(line) == ["vhost-user#3 <- GET_FEATURES flags=0x1 size=0 fds=2"]
    cut = format_capture("c", CAPTURE_IN, _msg(Request.SET_VRING_NUM, bytes(8))[:15])
    assert decode_capture(cut)[0].endswith("<truncated payload: 3 of 8 bytes>")
    with pytest.raises(CaptureFormatError, match="line 2"):
        parse_capture(f"{line}\nvhost-user#3 <- x 00\n")
    with pytest.raises(CaptureFormatError, match="line 1"):
        parse_capture("vhost-user#3 => 0 00\n")
