"""The example virtio-vsock device (:mod:`virtio_schema.examples.vsock`) against the fake driver.

A :class:`Guest` plays Linux's side of the three queues with fake drivers (both ring formats):
it sends packets on the tx queue, posts rx buffers and reads the packets the device wrote. The
host side is real: unix sockets in a temporary directory, the device's selector served by
:meth:`Guest.pump`. Covered: the configuration space; streams opened both ways (the ``CONNECT``
convention), data both ways with checksums, credit both ways, half-close both ways, close, RST,
refused connections; and the hostile cases of the issue: credit ignored, payload beyond
``buf_alloc``, REQUEST floods, bad lengths and types, thousands of connections, a host peer that
stops reading (only its own stream stalls).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_vhost_user import serving

from virtio_schema.examples.vsock import (
    EVENTQ,
    FIRST_HOST_PORT,
    HOST_CID,
    MAX_PAYLOAD,
    RXQ,
    TXQ,
    Limits,
    VsockDevice,
)
from virtio_schema.fake_queue import make_queue
from virtio_schema.records import VSOCK_CONFIG, VSOCK_EVENT, VSOCK_HDR, VsockHdr
from virtio_schema.schema import VsockEventId, VsockOp, VsockShutdown, VsockType
from virtio_schema.testing.frontend import Frontend, wait_for
from virtio_schema.vhost_user import VhostUserDevice

CID = 3
HDR = VSOCK_HDR.size
RX_BUF = 4096
GUEST_BUF = 256 * 1024
OP = VsockOp


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


class Guest:
    """The driver's side: queues, the guest's credit, and helpers to speak the protocol."""

    def __init__(self, tmp: Path, packed: bool, limits: Limits | None = None) -> None:
        self.uds = str(tmp / "v.sock")
        self.dev = VsockDevice(CID, self.uds, limits)
        self.rx = make_queue(256, packed=packed, index=RXQ)
        self.tx = make_queue(256, packed=packed, index=TXQ)
        self.ev = make_queue(8, packed=packed, index=EVENTQ)
        self.dev.enabled(RXQ, self.rx.queue)
        self.dev.enabled(TXQ, self.tx.queue)
        self.fwd: dict[int, int] = {}  # guest port -> bytes the guest consumed
        self.socks: list[socket.socket] = []  # the host programs' sockets, closed at the end

    def close(self) -> None:
        self.dev.close()
        for s in self.socks:
            s.close()

    def sock(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socks.append(s)
        return s

    def send(
        self,
        op: int,
        guest_port: int,
        host_port: int,
        payload: bytes = b"",
        *,
        flags: int = 0,
        buf_alloc: int = GUEST_BUF,
        length: int | None = None,
        src_cid: int = CID,
        type_: int = VsockType.STREAM,
    ) -> None:
        hdr = VsockHdr(
            src_cid, HOST_CID, guest_port, host_port, len(payload) if length is None else length,
            type_, op, flags, buf_alloc, self.fwd.get(guest_port, 0),
        )  # fmt: skip
        assert self.tx.driver.publish([VSOCK_HDR.pack(hdr) + payload]) is not None
        self.dev.handle(TXQ, self.tx.queue)
        assert [u.len for u in self.tx.driver.used()] == [0]  # taken and returned at once

    def post_rx(self, n: int = 8, size: int = RX_BUF) -> None:
        """Post up to ``n`` rx buffers (as Linux 6.1 lays them out: the header's, the
        payload's), as many as the ring has room for, and kick."""
        for _ in range(n):
            if self.rx.driver.publish(writable=[HDR, size]) is None:
                break
        self.dev.handle(RXQ, self.rx.queue)

    def packets(self, consume: bool = True) -> list[tuple[VsockHdr, bytes]]:
        """The packets the device wrote, in order; RW payloads count as consumed."""
        out = []
        for used in self.rx.driver.used():
            data = used.data
            hdr = VSOCK_HDR.unpack(data[:HDR])
            payload = data[HDR : HDR + hdr.len]
            assert len(payload) == hdr.len
            if consume and hdr.op == OP.RW:
                self.fwd[hdr.dst_port] = self.fwd.get(hdr.dst_port, 0) + hdr.len
            out.append((hdr, payload))
        return out

    def pump(self, timeout: float = 0.05) -> None:
        """Serve the device's host sockets once they are ready (or after ``timeout``)."""
        fd = self.dev.events_fd()
        assert fd is not None
        select.select([fd], [], [], timeout)
        self.dev.on_events()

    def host_listen(self, port: int) -> socket.socket:
        lst = self.sock()
        lst.bind(f"{self.uds}_{port}")
        lst.listen(16)
        return lst

    def connect_from_guest(
        self, lst: socket.socket, guest_port: int, host_port: int
    ) -> socket.socket:
        self.post_rx(4)
        self.send(OP.REQUEST, guest_port, host_port)
        ((hdr, _),) = self.packets()
        assert (hdr.op, hdr.src_port, hdr.dst_port) == (OP.RESPONSE, host_port, guest_port)
        peer, _ = lst.accept()
        self.socks.append(peer)
        return peer

    def connect_from_host(self, guest_port: int) -> tuple[socket.socket, int]:
        c = self.sock()
        c.connect(self.uds)
        c.sendall(f"CONNECT {guest_port}\n".encode())
        self.post_rx(4)
        hdr = self.wait_packet()
        assert (hdr.op, hdr.dst_port, hdr.type) == (OP.REQUEST, guest_port, VsockType.STREAM)
        self.send(OP.RESPONSE, guest_port, hdr.src_port)
        c.settimeout(2)
        assert _readline(c) == f"OK {hdr.src_port}\n".encode()
        return c, hdr.src_port

    def wait_packet(self, tries: int = 40) -> VsockHdr:
        for _ in range(tries):
            self.pump()
            got = self.packets()
            if got:
                assert len(got) == 1, got
                return got[0][0]
        raise AssertionError("no packet from the device")

    def drain_to_guest(self, guest_port: int, want: int, tries: int = 400) -> bytes:
        """RW payloads to ``guest_port`` until ``want`` bytes came, credit updates sent back."""
        data = bytearray()
        for _ in range(tries):
            if len(data) >= want:
                break
            self.post_rx(8)
            self.pump(0.01)
            for hdr, payload in self.packets():
                if hdr.op == OP.RW and hdr.dst_port == guest_port:
                    data += payload
            host = next(iter(k[0] for k in self.dev.streams if k[1] == guest_port))
            self.send(OP.CREDIT_UPDATE, guest_port, host)
        return bytes(data)


def _closed(sock: socket.socket) -> bool:
    """The other end closed ``sock`` without a word (end of file, or reset: it left our bytes
    unread)."""
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def _readline(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        b = sock.recv(1)
        if not b:
            break
        line += b
    return line


@pytest.fixture
def guest(tmp_path: Path, packed: bool) -> Iterator[Guest]:
    g = Guest(tmp_path, packed)
    yield g
    g.close()


def test_config_space_is_the_guest_cid(guest: Guest) -> None:
    assert VSOCK_CONFIG.unpack(guest.dev.config()).guest_cid == CID
    assert guest.dev.num_queues == 3


@pytest.mark.parametrize("cid", [0, 1, 2, 2**32 - 1, 2**40])
def test_reserved_or_oversized_cids_are_refused(tmp_path: Path, cid: int) -> None:
    with pytest.raises(ValueError, match="CID"):
        VsockDevice(cid, str(tmp_path / "v.sock"))


def test_the_event_queue_gets_one_transport_reset(guest: Guest) -> None:
    for _ in range(3):
        guest.ev.driver.publish(writable=[VSOCK_EVENT.size])
    guest.dev.enabled(EVENTQ, guest.ev.queue)
    guest.dev.handle(EVENTQ, guest.ev.queue)
    used = guest.ev.driver.used()
    assert [VSOCK_EVENT.unpack(u.data).id for u in used] == [VsockEventId.TRANSPORT_RESET]
    guest.dev.closed()  # a new front-end: the guest hears of it again
    guest.dev.enabled(EVENTQ, guest.ev.queue)
    assert len(guest.ev.driver.used()) == 1
    assert guest.dev.stats.resets_sent == 2


def test_guest_to_host_stream_with_half_close(guest: Guest) -> None:
    lst = guest.host_listen(5000)
    peer = guest.connect_from_guest(lst, 1024, 5000)
    data = os.urandom(200_000)
    for at in range(0, len(data), MAX_PAYLOAD):
        guest.send(OP.RW, 1024, 5000, data[at : at + MAX_PAYLOAD])
        guest.pump(0)
    guest.send(OP.SHUTDOWN, 1024, 5000, flags=VsockShutdown.SEND)
    got = bytearray()
    peer.settimeout(0.05)
    for _ in range(200):
        guest.pump(0)
        try:
            chunk = peer.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        got += chunk
    assert bytes(got) == data  # then end of file: the guest's SHUTDOWN SEND
    # the host answers after the guest's half-close; then closes: SHUTDOWN both to the guest
    peer.sendall(b"thanks")
    peer.close()
    reply = guest.drain_to_guest(1024, 6)
    assert reply == b"thanks"
    for _ in range(20):
        guest.post_rx(2)
        guest.pump()
        shut = [h for h, _ in guest.packets() if h.op == OP.SHUTDOWN]
        if shut:
            assert shut[0].flags == VsockShutdown.RCV | VsockShutdown.SEND
            break
    else:
        raise AssertionError("no SHUTDOWN")
    assert guest.dev.stats.to_host == len(data)
    guest.send(OP.RST, 1024, 5000)  # Linux answers a full SHUTDOWN with RST
    assert not guest.dev.streams


def test_host_to_guest_stream_with_credit(guest: Guest) -> None:
    c, host_port = guest.connect_from_host(1234)
    assert host_port == FIRST_HOST_PORT
    data = os.urandom(1_000_000)
    threading.Thread(target=c.sendall, args=(data,), daemon=True).start()
    got = guest.drain_to_guest(1234, len(data), tries=2000)
    assert got == data
    assert guest.dev.stats.to_guest == len(data)


def test_guest_close_flushes_then_resets(guest: Guest) -> None:
    lst = guest.host_listen(5001)
    peer = guest.connect_from_guest(lst, 2000, 5001)
    guest.send(OP.RW, 2000, 5001, b"last words")
    guest.send(OP.SHUTDOWN, 2000, 5001, flags=VsockShutdown.RCV | VsockShutdown.SEND)
    guest.post_rx(2)
    guest.pump()
    ops = [h.op for h, _ in guest.packets()]
    assert OP.RST in ops
    peer.settimeout(2)
    assert peer.recv(100) == b"last words"
    assert peer.recv(100) == b""
    assert not guest.dev.streams


def test_refused_both_ways(guest: Guest) -> None:
    guest.post_rx(2)
    guest.send(OP.REQUEST, 1500, 7777)  # nobody listens on uds_7777
    ((hdr, _),) = guest.packets()
    assert (hdr.op, hdr.src_port, hdr.dst_port) == (OP.RST, 7777, 1500)
    c = guest.sock()
    c.connect(guest.uds)
    c.sendall(b"CONNECT 99\n")
    req = guest.wait_packet()
    guest.send(OP.RST, 99, req.src_port)
    c.settimeout(2)
    assert c.recv(100) == b""  # closed without OK
    assert guest.dev.stats.refused == 2
    assert not guest.dev.streams


# --- hostile guests ------------------------------------------------------------------------------


def test_a_guest_that_ignores_credit_gets_its_stream_reset(guest: Guest) -> None:
    lst = guest.host_listen(5100)
    peer = guest.connect_from_guest(lst, 3000, 5100)  # the host program never reads
    stream = guest.dev.streams[(5100, 3000)]
    chunk = b"x" * MAX_PAYLOAD
    sent = 0
    for _ in range(100):  # the host socket's buffer fills, then the device's, then beyond
        guest.send(OP.RW, 3000, 5100, chunk)
        sent += len(chunk)
        assert len(stream.to_host) <= GUEST_BUF  # never more held than the credit given
        if guest.dev.stats.credit_violations:
            break
    assert guest.dev.stats.credit_violations == 1
    assert sent > GUEST_BUF + stream.fwd_cnt  # the guest did send beyond its credit
    guest.post_rx(4)
    assert (OP.RST, 3000) in [(h.op, h.dst_port) for h, _ in guest.packets()]
    assert not guest.dev.streams
    peer.settimeout(2)
    got = 0
    while chunk_ := peer.recv(1 << 20):
        got += len(chunk_)
    assert got == stream.fwd_cnt  # what reached the host is what the device counted forwarded


def test_a_host_peer_that_stops_reading_stalls_only_its_own_stream(guest: Guest) -> None:
    lst = guest.host_listen(5200)
    stuck = guest.connect_from_guest(lst, 3100, 5200)  # never read
    live = guest.connect_from_guest(lst, 3101, 5200)
    chunk = os.urandom(MAX_PAYLOAD)
    for _ in range(GUEST_BUF // MAX_PAYLOAD):
        guest.send(OP.RW, 3100, 5200, chunk)
    stream = guest.dev.streams[(5200, 3100)]
    assert len(stream.to_host) > 0  # the stuck host holds up its own bytes...
    live.settimeout(2)
    for i in range(20):  # ...and the other stream flows
        guest.send(OP.RW, 3101, 5200, chunk)
        guest.pump(0)
        got = b""
        while len(got) < len(chunk):
            got += live.recv(len(chunk) - len(got))
        assert got == chunk, i
    guest.post_rx(16)
    credit = [h for h, _ in guest.packets() if h.dst_port == 3100 and h.op == OP.CREDIT_UPDATE]
    assert all(h.fwd_cnt < GUEST_BUF for h in credit)  # no credit back for the stuck stream
    assert stuck.fileno() >= 0


@pytest.mark.parametrize(
    ("what", "kwargs"),
    [
        ("len beyond the chain", {"length": 5000, "payload": b"short"}),
        ("len over 64 KiB", {"length": MAX_PAYLOAD + 1, "payload": b"z" * (MAX_PAYLOAD + 1)}),
        ("payload on a control op", {"op": OP.CREDIT_REQUEST, "payload": b"junk"}),
        ("unknown op", {"op": 99}),
        ("op INVALID", {"op": OP.INVALID}),
        ("SEQPACKET, not offered", {"type_": 2}),
        ("unknown type", {"type_": 7}),
        ("another guest's CID", {"src_cid": 4}),
    ],
)
def test_malformed_packets_are_dropped_and_their_stream_reset(
    guest: Guest, what: str, kwargs: dict[str, object]
) -> None:
    lst = guest.host_listen(5300)
    peer = guest.connect_from_guest(lst, 3200, 5300)
    kwargs = dict(kwargs)  # shared by both formats' runs
    op = kwargs.pop("op", OP.RW)
    payload = kwargs.pop("payload", b"")
    assert isinstance(op, int)
    assert isinstance(payload, bytes)
    guest.send(op, 3200, 5300, payload, **kwargs)  # type: ignore[arg-type]
    assert guest.dev.stats.bad_packets == 1, what
    guest.post_rx(2)
    assert [(h.op, h.dst_port) for h, _ in guest.packets()] == [(OP.RST, 3200)], what
    peer.settimeout(2)
    assert peer.recv(10) == b"", what  # the host side of the stream is closed too, nothing sent
    assert not guest.dev.streams


def test_a_header_cut_short_is_dropped(guest: Guest) -> None:
    assert guest.tx.driver.publish([b"\x01" * (HDR - 1)]) is not None
    guest.dev.handle(TXQ, guest.tx.queue)
    assert guest.dev.stats.bad_packets == 1
    assert [u.len for u in guest.tx.driver.used()] == [0]  # returned, nothing held


def test_a_request_flood_is_bounded(tmp_path: Path, packed: bool) -> None:
    g = Guest(tmp_path, packed, Limits(max_streams=50, max_strays=10))
    try:
        lst = g.host_listen(5400)
        lst.listen(4096)
        for port in range(2000, 2300):  # 300 REQUESTs, no rx buffers: nothing can be answered
            g.send(OP.REQUEST, port, 5400)
        assert len(g.dev.streams) == 50  # the rest refused...
        assert g.dev.stats.refused == 250
        assert len(g.dev._strays) == 10  # ...their RSTs bounded, the rest dropped and counted
        assert g.dev.stats.strays_dropped == 240
        g.post_rx(100)
        ops = [h.op for h, _ in g.packets()]
        assert ops.count(OP.RST) == 10
        assert ops.count(OP.RESPONSE) == 50
    finally:
        g.close()


def test_thousands_of_connections_stay_within_max_streams(tmp_path: Path) -> None:
    g = Guest(tmp_path, False, Limits(max_streams=64))
    try:
        lst = g.host_listen(5500)
        lst.listen(4096)
        g.post_rx(100)
        for port in range(10_000, 13_000):
            g.send(OP.REQUEST, port, 5500)
            if port % 100 == 0:
                g.packets()
                g.post_rx(100)
        assert len(g.dev.streams) == 64
        assert g.dev.stats.streams == 64
        assert g.dev.stats.refused == 3000 - 64
        # the host side: connections beyond max_streams wait in the listen backlog
        clients = [g.sock() for _ in range(10)]
        for c in clients:
            c.connect(g.uds)
            c.sendall(b"CONNECT 1\n")
        g.pump()
        assert not g.dev.lines
    finally:
        g.close()


def test_packets_of_unknown_streams_are_answered_rst_but_not_an_rst(guest: Guest) -> None:
    guest.post_rx(4)
    guest.send(OP.RW, 4000, 6000, b"hello")
    guest.send(OP.RST, 4001, 6000)
    guest.send(OP.SHUTDOWN, 4002, 6000, flags=3)
    assert [(h.op, h.dst_port) for h, _ in guest.packets()] == [(OP.RST, 4000), (OP.RST, 4002)]


@pytest.mark.parametrize(
    "line",
    [b"CONNECT\n", b"CONNECT x\n", b"connect 5\n", b"CONNECT 5 6\n", b"CONNECT 4294967295\n",
     b"A" * 200, b""],
)  # fmt: skip
def test_a_bad_connect_line_closes_the_host_connection(guest: Guest, line: bytes) -> None:
    c = guest.sock()
    c.connect(guest.uds)
    if line:
        c.sendall(line)
    else:
        c.shutdown(socket.SHUT_WR)
    c.settimeout(2)
    for _ in range(10):
        guest.pump()
    assert _closed(c)
    assert not guest.dev.lines
    assert not guest.dev.streams
    guest.post_rx(2)
    assert guest.packets() == []  # the guest heard nothing


def test_a_silent_host_connection_and_a_silent_guest_time_out(tmp_path: Path) -> None:
    g = Guest(tmp_path, False, Limits(connect_timeout=0.2))
    try:
        quiet = g.sock()
        quiet.connect(g.uds)  # never sends its line
        waiting = g.sock()
        waiting.connect(g.uds)
        waiting.sendall(b"CONNECT 77\n")  # the guest never answers the REQUEST
        g.post_rx(4)
        for _ in range(10):
            g.pump()
        time.sleep(0.3)
        g.dev.poll()
        quiet.settimeout(2)
        waiting.settimeout(2)
        assert _closed(quiet)
        assert _closed(waiting)
        ops = [h.op for h, _ in g.packets()]
        assert ops == [OP.REQUEST, OP.RST]  # the request withdrawn
        assert g.dev.stats.refused == 1
        assert not g.dev.lines
        assert not g.dev.streams
    finally:
        g.close()


def test_rx_buffers_that_cannot_hold_a_packet_are_returned_unused(guest: Guest) -> None:
    guest.send(OP.RW, 4100, 6100, b"?")  # an RST is owed
    assert guest.rx.driver.publish(writable=[HDR - 1]) is not None
    assert guest.rx.driver.publish([b"readable only"]) is not None
    guest.dev.handle(RXQ, guest.rx.queue)
    assert [u.len for u in guest.rx.driver.used()] == [0, 0]
    assert guest.dev.stats.bad_buffers == 2
    guest.post_rx(1)
    assert [h.op for h, _ in guest.packets()] == [OP.RST]  # still owed, then written


def test_a_guest_that_never_posts_rx_buffers_holds_nothing_unbounded(guest: Guest) -> None:
    c, port = guest.connect_from_host(1234)
    c.setblocking(False)
    offered = 0
    for _ in range(50):  # the host has plenty; the guest takes nothing
        with contextlib.suppress(BlockingIOError):
            offered += c.send(os.urandom(1 << 16))
        guest.pump(0.01)
    stream = guest.dev.streams[(port, 1234)]
    assert 0 < stream.staged() <= guest.dev.limits.max_stage
    assert offered > 4 * guest.dev.limits.max_stage  # the rest waits in the host's socket


# --- the server watches a device's own fd --------------------------------------------------------


class _PipeDevice(VhostUserDevice):
    """A device whose events fd is a pipe: each byte written is an event."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.events: list[bytes] = []
        self.closed_calls = 0

    def events_fd(self) -> int | None:
        return self.r

    def on_events(self) -> None:
        self.events.append(os.read(self.r, 100))

    def closed(self) -> None:
        self.closed_calls += 1


def test_the_server_serves_a_devices_events_fd_while_a_front_end_is_connected(
    tmp_path: Path,
) -> None:
    dev = _PipeDevice()
    path = tmp_path / "vu.sock"
    try:
        with serving(path, lambda: dev) as server:
            fe = Frontend(str(path))
            fe.get_features()  # the connection is set up
            os.write(dev.w, b"a")
            assert wait_for(lambda: dev.events == [b"a"])
            second = Frontend(str(path))  # the same device: its events fd is taken
            assert second.wait_closed() == b""
            assert any("events fd" in e for e in server.errors)
            assert dev.closed_calls == 0  # the first connection's device was not disturbed
            os.write(dev.w, b"c")
            assert wait_for(lambda: dev.events == [b"a", b"c"])
            second.close()
            fe.close()
            assert wait_for(lambda: dev.closed_calls == 1)  # the hook, once the front-end went
            os.write(dev.w, b"b")  # not watched any more: nobody reads it
            time.sleep(0.2)
            assert dev.events == [b"a", b"c"]
            fe = Frontend(str(path))  # a new front-end: watched again
            fe.get_features()
            assert wait_for(lambda: dev.events == [b"a", b"c", b"b"])
            fe.close()
    finally:
        os.close(dev.r)
        os.close(dev.w)


def test_a_stream_stalled_on_the_guests_credit_asks_for_it_once(guest: Guest) -> None:
    c = guest.sock()
    c.connect(guest.uds)
    c.sendall(b"CONNECT 1300\n")
    guest.post_rx(1)
    req = guest.wait_packet()
    guest.send(OP.RESPONSE, 1300, req.src_port, buf_alloc=8192)  # a small receive buffer
    c.settimeout(2)
    assert _readline(c) == f"OK {req.src_port}\n".encode()
    c.sendall(os.urandom(20_000))
    got = []
    for _ in range(20):
        guest.post_rx(4)
        guest.pump(0.02)
        got += guest.packets(consume=False)  # the guest reads nothing: no credit comes back
    rw = sum(h.len for h, _ in got if h.op == OP.RW)
    assert rw == 8192  # exactly the credit, then nothing more
    assert [h.op for h, _ in got if h.op != OP.RW] == [OP.CREDIT_REQUEST]  # asked once
    guest.fwd[1300] = 8192  # the guest consumed it all and says so
    guest.send(OP.CREDIT_UPDATE, 1300, req.src_port, buf_alloc=8192)
    more = guest.drain_to_guest(1300, 1)
    assert more  # the stream moves again
