"""vhost-user framing (:mod:`virtio_schema.vhost_user.framing`): messages out of a stream that
arrives in any pieces, with the fds that came along, and the limits checked before reading on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_schema.errors import DeviceUsageError
from virtio_schema.vhost_user.errors import FrontendError
from virtio_schema.vhost_user.framing import Message, MessageReader
from virtio_schema.vhost_user.messages import HEADER, MAX_FDS, MAX_PAYLOAD, HeaderRec, Request


def raw(request: int, payload: bytes = b"", flags: int = 1) -> bytes:
    return HEADER.pack(HeaderRec(request, flags, len(payload))) + payload


def read_all(reader: MessageReader, stream: bytes, cuts: list[int]) -> list[Message]:
    """Feed ``stream`` as a server would: never more than ``want()`` bytes, cut where ``cuts``
    says (a cut is how many of the wanted bytes arrive in one read)."""
    out: list[Message] = []
    at = 0
    k = 0
    while at < len(stream):
        n = min(reader.want(), len(stream) - at)
        if cuts:
            n = max(1, min(n, cuts[k % len(cuts)]))
            k += 1
        msg = reader.feed(stream[at : at + n], [])
        at += n
        if msg is not None:
            out.append(msg)
    return out


@given(
    st.lists(st.tuples(st.integers(0, 60), st.binary(max_size=100)), min_size=1, max_size=6),
    st.lists(st.integers(1, 20), max_size=8),
)
def test_messages_come_out_whole_and_in_order_however_the_stream_is_cut(
    messages: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(raw(r, p) for r, p in messages)
    reader = MessageReader()
    got = read_all(reader, stream, cuts)
    assert [(m.request, m.payload) for m in got] == messages
    assert not reader.partial


def test_a_header_without_payload_is_a_message_at_once() -> None:
    reader = MessageReader()
    assert reader.want() == HEADER.size
    msg = reader.feed(raw(Request.GET_FEATURES), [])
    assert msg == Message(Request.GET_FEATURES, 1, b"", [])


def test_fds_belong_to_the_message_being_assembled() -> None:
    reader = MessageReader()
    data = raw(Request.SET_VRING_KICK, bytes(8))
    assert reader.feed(data[:4], [7]) is None  # the fd comes with the first bytes
    assert reader.partial
    assert reader.progress() == (4, HEADER.size)
    assert reader.feed(data[4:12], []) is None
    assert reader.progress() == (0, 8)
    msg = reader.feed(data[12:], [])
    assert msg is not None
    assert msg.fds == [7]
    assert reader.feed(raw(Request.GET_FEATURES), []) == Message(Request.GET_FEATURES, 1, b"", [])


def test_an_oversized_payload_is_refused_before_it_is_read() -> None:
    reader = MessageReader()
    with pytest.raises(FrontendError, match=rf"payload size {MAX_PAYLOAD + 1} .* too large"):
        reader.feed(HEADER.pack(HeaderRec(Request.SET_MEM_TABLE, 1, MAX_PAYLOAD + 1)), [3])
    assert reader.discard() == [3]  # the fds of the refused message, for the server to close


def test_more_fds_than_one_message_may_carry_are_refused() -> None:
    reader = MessageReader()
    reader.feed(b"\x05", list(range(MAX_FDS)))
    with pytest.raises(FrontendError, match=f"{MAX_FDS + 1} fds with one message"):
        reader.feed(b"\x00", [99])
    assert reader.discard() == [*range(MAX_FDS), 99]
    assert not reader.partial


def test_feeding_more_than_wanted_is_a_usage_error() -> None:
    reader = MessageReader()
    with pytest.raises(DeviceUsageError, match="want 12"):
        reader.feed(raw(Request.GET_FEATURES) + b"x", [])
