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

import os
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

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

    def post_rx(self, n: int = 8, size: int = RX_BUF) -> None:
        for _ in range(n):
            assert self.rx.driver.publish(writable=[HDR, size]) is not None
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
