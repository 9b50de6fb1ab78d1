"""The vhost-user back-end's message handling under arbitrary input: it answers or refuses with a
:class:`FrontendError`, never raises anything else, and keeps no fd it was not meant to keep."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_schema.errors import VirtioError
from virtio_schema.queue import VirtQueue
from virtio_schema.vhost_user import Backend, FrontendError, VhostUserDevice
from virtio_schema.vhost_user.host import OsHost, classify
from virtio_schema.vhost_user.messages import Request


class Dummy(VhostUserDevice):
    num_queues = 2

    def config(self) -> bytes:
        return bytes(range(32))

    def handle(self, index: int, queue: VirtQueue) -> None:
        raise AssertionError("no ring can start without a valid memory table")


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


requests = st.one_of(st.sampled_from([int(r) for r in Request]), st.integers(0, 2**32 - 1))
flags = st.one_of(st.sampled_from([1, 1 | 8, 1 | 4, 0, 2, 3]), st.integers(0, 2**32 - 1))


def _payload_for(request: int) -> st.SearchStrategy[bytes]:
    sizes = st.sampled_from([0, 4, 8, 12, 40, 8 + 32, 8 + 64, 12 + 16, 300])
    return sizes.flatmap(lambda n: st.binary(min_size=n, max_size=n)) | st.binary(max_size=64)


@settings(max_examples=400)
@given(
    st.lists(
        st.tuples(requests, flags).flatmap(
            lambda rf: st.tuples(st.just(rf[0]), st.just(rf[1]), _payload_for(rf[0]))
        ),
        max_size=12,
    )
)
def test_any_message_sequence_is_answered_or_refused_with_a_frontend_error(
    messages: list[tuple[int, int, bytes]],
) -> None:
    backend = Backend(Dummy(), host=OsHost())
    try:
        for request, fl, payload in messages:
            try:
                reply = backend.handle(request, fl, payload, [])
            except FrontendError:
                break  # the server would disconnect here
            if reply is not None:
                assert len(reply) >= 12
                req, rflags, size = struct.unpack_from("<III", reply)
                assert req == request
                assert rflags & 0x4  # REPLY
                assert size == len(reply) - 12
    finally:
        backend.close()


@settings(max_examples=150)
@given(
    request=requests,
    fl=flags,
    payload=st.binary(max_size=300),
    kinds=st.lists(st.sampled_from(["pipe", "eventfd", "memfd", "devnull"]), max_size=9),
)
def test_fds_with_any_message_are_kept_by_a_ring_or_closed(
    request: int, fl: int, payload: bytes, kinds: list[str]
) -> None:
    before = _open_fds()
    fds: list[int] = []
    extra: list[int] = []  # the other ends we must close ourselves
    for kind in kinds:
        if kind == "pipe":
            r, w = os.pipe()
            fds.append(r)
            extra.append(w)
        elif kind == "eventfd":
            fds.append(os.eventfd(0))
        elif kind == "memfd":
            fd = os.memfd_create("t")
            os.ftruncate(fd, 4096)
            fds.append(fd)
        else:
            fds.append(os.open(os.devnull, os.O_RDWR))
    backend = Backend(Dummy(), host=OsHost())
    try:
        with contextlib.suppress(FrontendError):
            backend.handle(request, fl, payload, [classify(fd) for fd in fds])
    finally:
        backend.close()
        for fd in extra:
            os.close(fd)
    assert _open_fds() <= before, "the back-end leaked a file descriptor"


def test_memory_table_regions_out_of_range_are_refused() -> None:
    backend = Backend(Dummy(), host=OsHost())
    fd = os.memfd_create("t")
    os.ftruncate(fd, 4096)
    try:
        backend.handle(int(Request.SET_FEATURES), 1, struct.pack("<Q", 1 << 32), [])
        bad = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 2**64 - 4096, 8192, 0, 0)
        with pytest.raises(FrontendError, match="not a valid range"):
            backend.handle(int(Request.SET_MEM_TABLE), 1, bad, [classify(fd)])
    finally:
        backend.close()


def test_frontend_error_is_a_virtio_error() -> None:
    assert issubclass(FrontendError, VirtioError)
