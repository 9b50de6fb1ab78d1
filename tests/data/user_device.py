"""A user's own device, written against the installed ``virtio_schema`` as a user would write it.

A small key-value device: the driver sends a request header (its own Construct schema) and, for a
PUT, the value; the device answers with a response header and, for a GET, the value. The module
declares the schemas, derives typed ``Layout`` accessors from them, serves a queue, and tests the
device on the fake driver of both ring formats. Run it (``python user_device.py``) to run the tests.

``tests/test_wheel.py`` installs the built wheel in a fresh virtual environment and runs
``mypy --strict`` on this file there, with nothing of the repository on the path: the types come
from the wheel (``virtio_schema``'s ``py.typed`` and the ``construct-stubs`` stub package). It
then breaks lines of it on purpose and checks that mypy reports each one. The project's own
``mypy --strict`` checks it too, and ``docs/typing.rst`` shows it.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, assert_type

from construct import Int8ul, Int16ul, Int32ul, Padding, Struct

from virtio_schema import Layout
from virtio_schema.chain import ReadableChain
from virtio_schema.errors import DriverError
from virtio_schema.fake_queue import (
    AnyFakeQueue,
    FakePackedDriver,
    PackedFakeQueue,
    SplitFakeQueue,
    make_queue,
)
from virtio_schema.queue import Queue, VirtQueue

# --- the wire format: declared once, as Construct schemas -----------------------------------------


class Op(enum.IntEnum):
    GET = 0
    PUT = 1


class Status(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    UNSUPPORTED = 2


KV_REQ_SCHEMA = Struct(
    "op" / Int16ul,
    "flags" / Int16ul,
    "key" / Int32ul,
)
KV_RESP_SCHEMA = Struct(
    "status" / Int8ul,
    Padding(3),
    "len" / Int32ul,
)


# --- typed records, proved against the schemas when the layouts are built ----------------------


class KvReq(NamedTuple):
    op: int
    flags: int
    key: int


class KvResp(NamedTuple):
    status: int
    len: int


KV_REQ = Layout(KV_REQ_SCHEMA, KvReq, name="KvReq")
KV_RESP = Layout(KV_RESP_SCHEMA, KvResp, name="KvResp")


# --- the device -----------------------------------------------------------------------------------


class KvDevice:
    """Serves GET and PUT requests from a queue of either ring format."""

    def __init__(self) -> None:
        self.store: dict[int, bytes] = {}
        self.bad_chains: list[str] = []

    def serve(self, queue: VirtQueue) -> int:
        """Serve every chain the driver published; how many were served."""
        served = 0
        while (chain := queue.next_chain()) is not None:
            with chain:  # returned to the driver on exit, exactly once
                try:
                    reader = ReadableChain(chain)
                    req = reader.read_record(KV_REQ)
                    value = reader.read()  # a PUT's value; nothing for a GET
                    writer = reader.into_writable()
                    if req.op == Op.PUT:
                        self.store[req.key] = value
                        writer.write_record(KV_RESP, KvResp(status=Status.OK, len=0))
                    elif req.op == Op.GET and req.key in self.store:
                        data = self.store[req.key]
                        writer.write_record(KV_RESP, KvResp(status=Status.OK, len=len(data)))
                        writer.write_all(data)
                    elif req.op == Op.GET:
                        writer.write_record(KV_RESP, KvResp(status=Status.NOT_FOUND, len=0))
                    else:
                        writer.write_record(KV_RESP, KvResp(status=Status.UNSUPPORTED, len=0))
                except DriverError as exc:  # the driver broke the rules: note it, go on
                    self.bad_chains.append(str(exc))
            served += 1
        return served


# --- the driver's side, on the fake driver --------------------------------------------------------


def request(op: Op, key: int, value: bytes = b"") -> bytes:
    """The bytes a driver puts in a request's readable buffer."""
    return KV_REQ.pack(KvReq(op=op, flags=0, key=key)) + value


def response(data: bytes) -> tuple[KvResp, bytes]:
    """A used chain's bytes, as the response header and the value after it."""
    return KV_RESP.unpack(data[: KV_RESP.size]), data[KV_RESP.size :]


def rig(packed: bool) -> AnyFakeQueue:
    """A queue of either format and its fake driver."""
    return make_queue(8, packed=packed)


def check_put_then_get(fq: AnyFakeQueue) -> None:
    device = KvDevice()
    room = KV_RESP.size + 64
    fq.driver.publish([request(Op.PUT, 7, b"virtio")], [room])
    fq.driver.publish([request(Op.GET, 7)], [room])
    fq.driver.publish([request(Op.GET, 8)], [room])
    assert device.serve(fq.queue) == 3
    answers = [response(used.data) for used in fq.driver.used()]
    assert answers == [
        (KvResp(Status.OK, 0), b""),
        (KvResp(Status.OK, 6), b"virtio"),
        (KvResp(Status.NOT_FOUND, 0), b""),
    ]
    assert device.bad_chains == []


def check_a_short_request_goes_back_empty(fq: AnyFakeQueue) -> None:
    device = KvDevice()
    fq.driver.publish([b"\x01"], [16])  # shorter than a request header
    assert device.serve(fq.queue) == 1
    (used,) = fq.driver.used()
    assert used.len == 0
    assert len(device.bad_chains) == 1


def test_both_formats() -> None:
    for packed in (False, True):
        check_put_then_get(rig(packed))
        check_a_short_request_goes_back_empty(rig(packed))


def test_the_concrete_types_of_each_format() -> None:
    split: SplitFakeQueue = make_queue(8)
    packed: PackedFakeQueue = make_queue(8, packed=True)
    assert_type(split.queue, Queue)
    assert_type(packed.driver, FakePackedDriver)
    either: list[AnyFakeQueue] = [split, packed]  # one format is also either format
    for fq in either:
        check_put_then_get(fq)


def test_the_schema_is_the_source_of_truth() -> None:
    raw = request(Op.PUT, 0x1234)
    assert_type(raw, bytes)
    assert KV_REQ_SCHEMA.sizeof() == KV_REQ.size == len(raw) == 8
    parsed = KV_REQ_SCHEMA.parse(raw)  # a dissector's view of the same bytes
    assert (parsed.op, parsed.key) == (Op.PUT, 0x1234)
    assert KV_RESP_SCHEMA.build({"status": Status.OK, "len": 6}) == KV_RESP.pack(KvResp(0, 6))


def main() -> None:
    test_both_formats()
    test_the_concrete_types_of_each_format()
    test_the_schema_is_the_source_of_truth()
    print("user_device: ok")


if __name__ == "__main__":
    main()
