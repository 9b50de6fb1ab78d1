"""An example virtio-vsock device (virtio 1.2, 5.10), served over vhost-user: guest sockets
(``AF_VSOCK``) bridged to host unix sockets.

    python -m virtio_schema.examples.vsock --vhost-user SOCKET --guest-cid CID --uds PATH
        [--buf-alloc BYTES] [--max-streams N] [--connect-timeout SECONDS]

and QEMU connects to it::

    qemu-system-x86_64 -m 256M \\
        -object memory-backend-memfd,id=mem,size=256M,share=on -machine pc,memory-backend=mem \\
        -chardev socket,id=vs0,path=SOCKET -device vhost-user-vsock-pci,chardev=vs0 ...

Linux's ``vmw_vsock_virtio_transport`` makes it the guest's vsock transport: the guest has context
id (CID) ``CID`` (the configuration space), the host is CID 2.

The host side ("hybrid vsock", the convention of Firecracker and Cloud Hypervisor, which
rust-vmm's vhost-device-vsock follows):

* **host to guest**: a host program connects to the unix socket ``PATH`` and writes
  ``CONNECT <port>\\n``; once the guest accepted the connection on vsock port ``<port>`` it reads
  ``OK <host_port>\\n`` (the host port the guest sees), then the unix socket is a byte stream to
  the guest's socket. If the guest refuses (nobody listens), the unix socket is closed without a
  word; so is a malformed line, or no line within ``--connect-timeout``;
* **guest to host**: a guest connection to the host (CID 2) on port ``P`` is forwarded to the
  unix socket ``PATH_P`` (``PATH``, an underscore, the port in decimal), which a host program
  listens on. Nobody listening: the guest's ``connect()`` fails (``ECONNRESET``).

A session (the host program is ``socat``; the guest listens on port 1234, and a host program
listens on ``PATH_5000``)::

    $ socat - UNIX-CONNECT:/tmp/vsock.sock
    CONNECT 1234
    OK 1073741824
    hello guest                      <- read by the guest's accepted socket
    $ socat UNIX-LISTEN:/tmp/vsock.sock_5000 -    # the guest connects to 2:5000

Theory of operation. Three queues: **rx** (queue 0, device-writable: packets to the guest),
**tx** (queue 1, device-readable: packets from the guest), **event** (queue 2: the transport
reset). A packet is a 44-byte :data:`~virtio_schema.schema.VirtioVsockHdr` and, for ``RW``,
``len`` bytes of payload. Each connection (*stream*) is named by its host port and its guest port
and lives in one :class:`Stream`:

* **Opening.** A guest REQUEST makes the device connect to ``PATH_P`` (a non-blocking unix
  connect, which succeeds or fails at once): RESPONSE, or RST. A host ``CONNECT`` makes a stream
  with a fresh host port (counting up from 2**30) and a REQUEST to the guest; its RESPONSE makes
  the device write the ``OK`` line, its RST (or no answer within ``--connect-timeout``) closes the
  unix socket.
* **Credit (both directions).** Every packet carries its sender's ``buf_alloc`` (bytes it buffers
  for the stream) and ``fwd_cnt`` (bytes it has consumed): a sender may have at most
  ``buf_alloc - (sent - fwd_cnt)`` bytes in flight. The device sends the guest no more than the
  guest's credit allows (and reads from the host socket no more than it can send); it advertises
  ``--buf-alloc`` per stream and counts the guest's bytes it has written to the host socket
  (``fwd_cnt``), with a CREDIT_UPDATE when the guest's view of the free space fell below half and
  the host took more (and one whenever the guest sends a CREDIT_REQUEST). Host bytes waiting on
  a guest that gave no credit make it send a CREDIT_REQUEST, once until the guest speaks again. A host program that stops reading therefore stops its own stream's credit,
  and nothing else.
* **Shutdown.** A guest SHUTDOWN with ``SEND`` becomes ``shutdown(SHUT_WR)`` of the host socket
  once the guest's bytes are written; end of file from the host socket becomes a SHUTDOWN with
  ``SEND`` to the guest once the host's bytes are sent (the half-close, both ways). A guest
  SHUTDOWN with both flags (its ``close()``) closes the host socket after the guest's bytes and
  is answered RST; both sides done sending closes the stream (a SHUTDOWN with both flags: the
  guest then answers RST). A host socket that fails (``EPIPE``) ends the stream with RST; a guest
  RST closes the host socket.
* **Output.** Packets to the guest are produced only when an rx buffer is there: per stream, in
  order, the REQUEST or RESPONSE, data, a credit update, a SHUTDOWN, an RST; streams take turns
  (one packet each per round). Host bytes are read into a per-stream stage of at most
  ``max_stage`` bytes only when the stage is empty and the guest has credit.
* **The host sockets** sit in an epoll selector of the device's own, which the vhost-user server
  watches (:meth:`~virtio_schema.vhost_user.VhostUserDevice.events_fd`); a socket is in it only
  while the device can serve it (readable: the stage is empty and the guest has credit, or has
  not yet been asked for it; writable: guest bytes wait for it), so the server is never woken for what cannot be served.
* **Transport reset.** The first time the event queue is enabled in a process (and after a
  front-end reconnects), the device writes ``VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`` into an event
  buffer: a guest that had connections through a previous device process learns that they are
  gone (Linux resets every connected socket) and reads the CID again. QEMU 7.2's
  ``vhost-user-vsock`` keeps the event queue to itself (only rx and tx reach the back-end: it
  sends the event after a migration); with a front-end that hands the device all three queues,
  the device sends it.

Limits (:class:`Limits`, the command line's options), against a guest that ignores them:

* a guest that sends beyond its credit (``buf_alloc``) gets its stream reset (RST), counted in
  :attr:`VsockStats.credit_violations`: the device never buffers more than ``buf_alloc`` bytes of
  a stream;
* at most ``max_streams`` streams (both directions together): a REQUEST beyond is refused (RST)
  and a host connection waits in the listen backlog;
* a packet that is malformed (a header cut short, ``len`` beyond the chain or over 64 KiB, a
  payload on anything but RW, a wrong CID or socket type) is dropped and counted
  (:attr:`VsockStats.bad_packets`), its stream reset; packets for streams that do not exist are
  answered RST, at most ``max_strays`` waiting at once (more are dropped, counted);
* per stream the device holds at most ``buf_alloc`` guest bytes and ``max_stage`` host bytes: the
  whole device at most ``max_streams * (buf_alloc + max_stage)`` bytes of data.

Nothing on the guest's side can block another stream: packets are read as the tx queue offers
them, host sockets are non-blocking, and a stream that cannot move waits without holding
anything else.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import logging
import os
import selectors
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from virtio_schema._cli import parser
from virtio_schema.chain import ReadableChain, WritableChain
from virtio_schema.errors import DriverError
from virtio_schema.examples.serving import add_server_arguments, make_server
from virtio_schema.queue import QueueBroken, VirtQueue
from virtio_schema.records import (
    VSOCK_CONFIG,
    VSOCK_EVENT,
    VSOCK_HDR,
    VsockConfig,
    VsockEvent,
    VsockHdr,
)
from virtio_schema.schema import VsockEventId, VsockOp, VsockShutdown, VsockType
from virtio_schema.vhost_user import VhostUserDevice

__all__ = [
    "EVENTQ",
    "HOST_CID",
    "MAX_PAYLOAD",
    "RXQ",
    "TXQ",
    "Limits",
    "Stream",
    "StreamState",
    "VsockDevice",
    "VsockStats",
    "main",
]

log = logging.getLogger(__name__)

RXQ = 0
"""The receive queue's index: packets to the guest (device-writable buffers)."""
TXQ = 1
"""The transmit queue's index: packets from the guest."""
EVENTQ = 2
"""The event queue's index: the transport reset event."""
HOST_CID = 2
"""The host's context id (``VMADDR_CID_HOST``)."""
MAX_PAYLOAD = 64 * 1024
"""The largest RW payload accepted or sent (Linux's ``VIRTIO_VSOCK_MAX_PKT_BUF_SIZE``)."""
FIRST_HOST_PORT = 1 << 30
"""Host ports of host-initiated streams count up from here (as Firecracker's do)."""
HDR = VSOCK_HDR.size
U32 = 0xFFFF_FFFF
BOTH = VsockShutdown.RCV | VsockShutdown.SEND
_COMPLAINTS = 20  # malformed packets logged one by one, then every _COMPLAINT_EVERY-th
_COMPLAINT_EVERY = 1000


@dataclass(frozen=True)
class Limits:
    """What one device may hold, whatever the guest or the host programs do (module docstring,
    "Limits")."""

    buf_alloc: int = 256 * 1024
    """Bytes of a stream's guest data the device buffers (advertised to the guest as
    ``buf_alloc``): the guest's credit."""
    max_streams: int = 256
    """Streams at once, both directions together."""
    max_stage: int = 64 * 1024
    """Host bytes a stream reads ahead of the guest's rx buffers."""
    max_strays: int = 64
    """RSTs for packets of unknown streams waiting at once."""
    connect_timeout: float = 5.0
    """Seconds for a host program's ``CONNECT`` line, for the guest's answer to a REQUEST, and
    for the guest's RST after the device closed a stream."""
    max_line: int = 64
    """The longest ``CONNECT`` line."""

    def __post_init__(self) -> None:
        for name in ("buf_alloc", "max_streams", "max_stage", "max_line"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1")
        if self.buf_alloc > U32:
            raise ValueError("Limits.buf_alloc must fit in 32 bits")
        if self.max_strays < 0 or self.connect_timeout <= 0:
            raise ValueError("Limits.max_strays must be >= 0 and connect_timeout > 0")


@dataclass
class VsockStats:
    """Counters of a :class:`VsockDevice` (all since it was made)."""

    streams: int = 0
    """Streams established."""
    refused: int = 0
    """Connections refused: guest REQUESTs answered RST, host connections closed before OK."""
    to_host: int = 0
    """Guest bytes written to host sockets."""
    to_guest: int = 0
    """Host bytes written into rx buffers."""
    bad_packets: int = 0
    """Malformed packets from the guest (dropped)."""
    bad_buffers: int = 0
    """rx buffers returned unused (malformed, or too short for a header)."""
    credit_violations: int = 0
    """Streams reset because the guest sent beyond its credit."""
    strays_dropped: int = 0
    """RST answers dropped because ``max_strays`` were already waiting."""
    resets_sent: int = 0
    """Transport reset events written."""


class StreamState(enum.Enum):
    """Where a :class:`Stream` is."""

    LINE = "waiting for the host program's CONNECT line"
    CONNECTING = "REQUEST sent, waiting for the guest's RESPONSE"
    ESTABLISHED = "established"
    CLOSING = "both sides done sending, waiting for the guest's RST"


_SETTLING = (StreamState.ESTABLISHED, StreamState.CLOSING)


@dataclass(eq=False)
class Stream:
    """One connection: its ports, host socket, credit counters in both directions and the
    packets it owes the guest."""

    sock: socket.socket
    host_port: int
    guest_port: int
    state: StreamState
    deadline: float | None = None
    """When a LINE, CONNECTING or CLOSING stream gives up (``time.monotonic()``)."""
    # the guest's credit (host -> guest)
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0
    """Host bytes sent to the guest (mod 2**32)."""
    stage: bytes = b""
    """Host bytes read and not yet sent, from ``stage_at``."""
    stage_at: int = 0
    host_eof: bool = False
    # the device's credit (guest -> host)
    rx_cnt: int = 0
    """Guest bytes received (mod 2**32)."""
    fwd_cnt: int = 0
    """Guest bytes written to the host socket (mod 2**32)."""
    told_fwd_cnt: int = 0
    """The ``fwd_cnt`` the guest last heard."""
    to_host: bytearray = field(default_factory=bytearray)
    """Bytes for the host socket: the ``OK`` line (``prefix`` bytes), then the guest's."""
    prefix: int = 0
    guest_shut: int = 0
    """The guest's SHUTDOWN flags so far."""
    host_wr_shut: bool = False
    # packets owed to the guest
    send_request: bool = False
    send_response: bool = False
    send_credit: bool = False
    ask_credit: bool = False
    """Host bytes wait and the guest gave no credit: a CREDIT_REQUEST is owed."""
    credit_asked: bool = False
    """A CREDIT_REQUEST went out since the guest last told its credit."""
    send_shutdown: int = 0
    sent_shutdown: int = 0
    send_rst: bool = False
    line: bytes = b""
    queued: bool = False
    """In the device's line of streams with packets to send."""
    mask: int = 0
    """What the device's selector watches the socket for."""
    closed: bool = False

    def credit(self) -> int:
        """Bytes the guest can take now (its ``buf_alloc`` minus what is in flight)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def staged(self) -> int:
        return len(self.stage) - self.stage_at


class VsockDevice(VhostUserDevice):
    """The virtio-vsock device of the module docstring. ``uds`` is the host side's unix socket
    path (made and listened on here; a stale socket file there is replaced). Call
    :meth:`close` when done."""

    num_queues = 3
    poll_interval = 0.25
    """Deadlines (``connect_timeout``) are checked this often."""

    def __init__(self, guest_cid: int, uds: str, limits: Limits | None = None) -> None:
        if not 3 <= guest_cid < U32:
            raise ValueError(f"guest CID {guest_cid}: must be 3 .. 2**32 - 2 (0-2 are reserved)")
        self.guest_cid = guest_cid
        self.uds = uds
        self.limits = limits or Limits()
        self.stats = VsockStats()
        self.streams: dict[tuple[int, int], Stream] = {}
        """Streams by (host port, guest port)."""
        self.lines: set[Stream] = set()
        """Host connections that have not sent their ``CONNECT`` line yet."""
        self._sel = selectors.EpollSelector()
        self._listener = _listen(uds)
        self._listening = False
        self._out: collections.deque[Stream] = collections.deque()
        self._strays: collections.deque[VsockHdr] = collections.deque()
        self._rxq: VirtQueue | None = None
        self._txq_running = False
        self._next_port = FIRST_HOST_PORT
        self._announce = True
        self._complaints = 0
        self._config = VSOCK_CONFIG.pack(VsockConfig(guest_cid))

    def close(self) -> None:
        """Close every stream, the listener (removing its socket file) and the selector."""
        self._drop_all()
        self._unlisten()
        self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.uds)
        self._sel.close()

    # --- the transport's hooks ------------------------------------------------------------------

    def config(self) -> bytes:
        return self._config

    def events_fd(self) -> int | None:
        return self._sel.fileno()

    def enabled(self, index: int, queue: VirtQueue) -> None:
        if index == RXQ:
            self._rxq = queue
        elif index == TXQ:
            self._txq_running = True
        elif index == EVENTQ:
            self._announce_reset(queue)
        self._relisten()
        self._fill_rx()

    def disabled(self, index: int) -> None:
        if index == RXQ:
            self._rxq = None
        elif index == TXQ:
            self._txq_running = False
        self._relisten()

    def reset(self) -> None:
        """The driver reset the device: every stream is gone on its side."""
        self._drop_all()

    def closed(self) -> None:
        """The front-end went: the guest cannot be reached; the next one hears of a reset."""
        self._drop_all()
        self._rxq = None
        self._txq_running = False
        self._announce = True
        self._relisten()

    def handle(self, index: int, queue: VirtQueue) -> None:
        if index == TXQ:
            self._drain_tx(queue)
        elif index == RXQ:
            self._rxq = queue if queue.broken is None else None
        elif index == EVENTQ:
            self._announce_reset(queue)
        self._fill_rx()

    def on_events(self) -> None:
        for key, mask in self._sel.select(0):
            stream = key.data
            if stream is None:
                self._accept()
                continue
            assert isinstance(stream, Stream)
            if stream.closed:
                continue
            if mask & selectors.EVENT_WRITE:
                self._push(stream)
            if mask & selectors.EVENT_READ and not stream.closed:
                if stream.state is StreamState.LINE:
                    self._read_line(stream)
                else:
                    self._pull(stream)
            self._update(stream)
        self._fill_rx()

    def poll(self) -> None:
        now = time.monotonic()
        for stream in [*self.streams.values(), *self.lines]:
            if stream.deadline is not None and now >= stream.deadline and not stream.closed:
                log.info("vsock: %s: timed out (%s)", _name(stream), stream.state.value)
                if stream.state is StreamState.LINE:
                    self._close(stream)
                    continue
                if stream.state is StreamState.CONNECTING:
                    self.stats.refused += 1
                self._reset(stream)
        self._fill_rx()

    # --- the event queue ------------------------------------------------------------------------

    def _announce_reset(self, queue: VirtQueue) -> None:
        if not self._announce or queue.broken is not None:
            return
        try:
            chain = queue.next_chain()
            if chain is None:
                return
            with chain:
                try:
                    WritableChain(chain).write_record(
                        VSOCK_EVENT, VsockEvent(VsockEventId.TRANSPORT_RESET)
                    )
                except DriverError as exc:
                    self.stats.bad_buffers += 1
                    log.warning("vsock: event buffer returned unused: %s", exc)
                    return
        except QueueBroken as exc:
            log.error("vsock: event queue: %s", exc)
            return
        self._announce = False
        self.stats.resets_sent += 1
        log.info("vsock: transport reset event sent")

    # --- packets from the guest -----------------------------------------------------------------

    def _drain_tx(self, queue: VirtQueue) -> None:
        while (chain := queue.next_chain()) is not None:
            with chain:  # returned on leaving (nothing written)
                try:
                    reader = ReadableChain(chain)
                    hdr = reader.read_record(VSOCK_HDR)
                except DriverError as exc:
                    self._bad(f"tx chain {chain.head}: {exc}", None)
                    continue
                self._on_packet(hdr, reader)

    def _on_packet(self, hdr: VsockHdr, reader: ReadableChain) -> None:
        """One packet from the guest: checked, then given to its stream."""
        problem = self._malformed(hdr, reader)
        key = (hdr.dst_port, hdr.src_port)
        stream = self.streams.get(key)
        if problem is not None:
            self._bad(f"{_describe(hdr)}: {problem}", stream)
            return
        if stream is not None and stream.send_rst:  # reset here: only its RST is awaited
            if hdr.op == VsockOp.RST:
                self._close(stream)
            return
        if stream is None:
            if hdr.op == VsockOp.REQUEST:
                self._connect_host(hdr)
            elif hdr.op != VsockOp.RST:  # nothing answers an RST
                self._stray(hdr)
            return
        stream.peer_buf_alloc = hdr.buf_alloc
        stream.peer_fwd_cnt = hdr.fwd_cnt
        stream.credit_asked = False
        op = hdr.op
        if op == VsockOp.RST:
            if stream.state is StreamState.CONNECTING:
                self.stats.refused += 1
                log.info("vsock: %s: the guest refused", _name(stream))
            self._close(stream)
            return
        if op == VsockOp.REQUEST:  # a second REQUEST for a live stream: both are gone
            self._bad(f"{_describe(hdr)}: REQUEST for an open stream", stream)
            return
        if op == VsockOp.RESPONSE:
            self._on_response(stream, hdr)
        elif stream.state not in _SETTLING:
            self._bad(f"{_describe(hdr)}: before the stream was established", stream)
            return
        elif op == VsockOp.RW:
            self._on_rw(stream, hdr, reader)
        elif op == VsockOp.SHUTDOWN:
            stream.guest_shut |= hdr.flags & BOTH
        elif op == VsockOp.CREDIT_REQUEST:
            stream.send_credit = True
        self._update(stream)  # CREDIT_UPDATE: the new credit, taken above

    def _malformed(self, hdr: VsockHdr, reader: ReadableChain) -> str | None:
        """Why the packet cannot be taken, or ``None``."""
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != HOST_CID:
            return f"from CID {hdr.src_cid} to {hdr.dst_cid}, not {self.guest_cid} to {HOST_CID}"
        if hdr.type != VsockType.STREAM:
            return f"socket type {hdr.type} (only STREAM is offered)"
        if not VsockOp.REQUEST <= hdr.op <= VsockOp.CREDIT_REQUEST:
            return f"op {hdr.op}"
        if hdr.op != VsockOp.RW and hdr.len:
            return f"len {hdr.len} on {VsockOp(hdr.op).name}"
        if hdr.len > MAX_PAYLOAD:
            return f"len {hdr.len} > {MAX_PAYLOAD}"
        have = reader.remaining().bytes
        if hdr.len > have:
            return f"len {hdr.len} but {have} bytes follow the header"
        return None

    def _bad(self, what: str, stream: Stream | None) -> None:
        """A malformed packet: counted, logged, its stream reset."""
        self.stats.bad_packets += 1
        self._complain(f"bad packet dropped ({self.stats.bad_packets} so far): {what}")
        if stream is not None:
            self._reset(stream)

    def _complain(self, what: str, level: int = logging.WARNING) -> None:
        """Log what the guest did (wrong, or refused): one by one at first, then sparingly (a
        guest can make a flood of it)."""
        self._complaints += 1
        n = self._complaints
        if n <= _COMPLAINTS or n % _COMPLAINT_EVERY == 0:
            log.log(level, "vsock: %s", what)

    def _stray(self, hdr: VsockHdr) -> None:
        """Answer RST to a packet of a stream that does not exist (bounded: ``max_strays``)."""
        if len(self._strays) >= self.limits.max_strays:
            self.stats.strays_dropped += 1
            return
        self._strays.append(hdr)

    def _connect_host(self, hdr: VsockHdr) -> None:
        """A guest REQUEST: connect to ``PATH_<port>``; RESPONSE, or RST."""
        if self._count() >= self.limits.max_streams:
            self._complain(f"REQUEST to port {hdr.dst_port} refused: {self._count()} streams")
            self.stats.refused += 1
            self._stray(hdr)
            return
        path = f"{self.uds}_{hdr.dst_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as exc:  # nobody listens, the backlog is full, a path too long
            sock.close()
            self._complain(f"guest port {hdr.src_port} -> {path} refused: {exc}", logging.INFO)
            self.stats.refused += 1
            self._stray(hdr)
            return
        stream = Stream(sock, hdr.dst_port, hdr.src_port, StreamState.ESTABLISHED)
        stream.peer_buf_alloc, stream.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        stream.send_response = True
        self.streams[(stream.host_port, stream.guest_port)] = stream
        self.stats.streams += 1
        log.info("vsock: %s: guest connected to %s", _name(stream), path)
        self._update(stream)

    def _on_response(self, stream: Stream, hdr: VsockHdr) -> None:
        if stream.state is not StreamState.CONNECTING:
            self._bad(f"{_describe(hdr)}: RESPONSE to no REQUEST", stream)
            return
        stream.state = StreamState.ESTABLISHED
        stream.deadline = None
        ok = f"OK {stream.host_port}\n".encode()
        stream.to_host[:0] = ok
        stream.prefix = len(ok)
        self.stats.streams += 1
        log.info("vsock: %s: the guest accepted", _name(stream))
        self._push(stream)

    def _on_rw(self, stream: Stream, hdr: VsockHdr, reader: ReadableChain) -> None:
        n = hdr.len
        if stream.guest_shut & VsockShutdown.SEND or stream.state is StreamState.CLOSING:
            self._bad(f"{_describe(hdr)}: data after the guest's SHUTDOWN", stream)
            return
        held = len(stream.to_host) - stream.prefix
        if held + n > self.limits.buf_alloc:
            self.stats.credit_violations += 1
            self._bad(f"{_describe(hdr)}: beyond the credit ({held} bytes held)", stream)
            return
        stream.rx_cnt = (stream.rx_cnt + n) & U32
        try:
            if not stream.to_host:  # the host socket may take it straight from guest memory
                n -= reader.read_to(_sender(stream), n)
                self._forwarded(stream, hdr.len - n)
            if n:
                stream.to_host += reader.read(n)
        except DriverError as exc:  # the payload's buffers are not guest memory
            self._bad(f"{_describe(hdr)}: {exc}", stream)
        except OSError as exc:
            log.info("vsock: %s: host socket: %s", _name(stream), exc)
            self._reset(stream)

    # --- the host side --------------------------------------------------------------------------

    def _accept(self) -> None:
        self._relisten()  # streams the guest opened since may have used the last place
        if not self._listening:
            return
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:  # out of fds: the listener waits until a stream goes
            log.error("vsock: accept: %s", exc)
            self._unlisten()
            return
        sock.setblocking(False)
        deadline = time.monotonic() + self.limits.connect_timeout
        stream = Stream(sock, 0, 0, StreamState.LINE, deadline=deadline)
        self.lines.add(stream)  # no ports until its CONNECT line
        self._relisten()
        self._update(stream)

    def _read_line(self, stream: Stream) -> None:
        """The host program's ``CONNECT <port>\\n``; what follows it is the stream's first data."""
        try:
            data = stream.sock.recv(self.limits.max_line)
        except BlockingIOError:
            return
        except OSError as exc:
            log.info("vsock: host connection failed before CONNECT: %s", exc)
            self._close(stream)
            return
        line = stream.line + data
        end = line.find(b"\n")
        if end < 0:
            if not data or len(line) >= self.limits.max_line:
                log.info("vsock: host connection closed: no CONNECT line (%r)", line[:80])
                self._close(stream)
            else:
                stream.line = line
            return
        port = _connect_port(line[:end])
        if port is None:
            log.info("vsock: host connection closed: malformed line %r", line[:end][:80])
            self._close(stream)
            return
        self.lines.discard(stream)
        stream.host_port = self._free_port(port)
        stream.guest_port = port
        stream.state = StreamState.CONNECTING
        stream.deadline = time.monotonic() + self.limits.connect_timeout
        stream.stage, stream.line = line[end + 1 :], b""
        stream.send_request = True
        self.streams[(stream.host_port, port)] = stream

    def _free_port(self, guest_port: int) -> int:
        while (port := self._next_port, guest_port) in self.streams:
            self._next_port = _next(self._next_port)
        self._next_port = _next(port)
        return port

    def _pull(self, stream: Stream) -> None:
        """Read host bytes into the empty stage, as many as the guest may take (the socket is
        readable: with no credit, ask the guest for it instead)."""
        want = min(self.limits.max_stage, stream.credit())
        if not want and not stream.credit_asked:
            stream.ask_credit = True
        if stream.staged() or not want:
            return
        try:
            data = stream.sock.recv(want)
        except BlockingIOError:
            return
        except OSError as exc:
            log.info("vsock: %s: host socket: %s", _name(stream), exc)
            self._reset(stream)
            return
        if data:
            stream.stage, stream.stage_at = data, 0
        else:
            stream.host_eof = True

    def _push(self, stream: Stream) -> None:
        """Write what waits for the host socket."""
        try:
            sent = stream.sock.send(stream.to_host)
        except BlockingIOError:
            return
        except OSError as exc:
            log.info("vsock: %s: host socket: %s", _name(stream), exc)
            self._reset(stream)
            return
        del stream.to_host[:sent]
        ours = min(sent, stream.prefix)
        stream.prefix -= ours
        self._forwarded(stream, sent - ours)

    def _forwarded(self, stream: Stream, n: int) -> None:
        """``n`` guest bytes reached the host socket: the credit the guest gets back."""
        if not n:
            return
        self.stats.to_host += n
        stream.fwd_cnt = (stream.fwd_cnt + n) & U32
        unheard = (stream.rx_cnt - stream.told_fwd_cnt) & U32
        if self.limits.buf_alloc - unheard < self.limits.buf_alloc // 2:
            stream.send_credit = True

    # --- stream bookkeeping ---------------------------------------------------------------------

    def _update(self, stream: Stream) -> None:
        """After anything happened to ``stream``: what follows from its state (shutdowns, the
        end), what its socket is watched for, whether it has packets to send."""
        if stream.closed:
            return
        if not stream.send_rst and stream.state in _SETTLING:
            self._settle(stream)
        if stream.send_rst:  # its socket is closed: only the RST is left to send
            self._queue(stream)
            return
        mask = 0
        if stream.state is StreamState.LINE or self._can_pull(stream):
            mask |= selectors.EVENT_READ
        if stream.to_host:
            mask |= selectors.EVENT_WRITE
        if mask != stream.mask:
            if not stream.mask:
                self._sel.register(stream.sock, mask, stream)
            elif not mask:
                self._sel.unregister(stream.sock)
            else:
                self._sel.modify(stream.sock, mask, stream)
            stream.mask = mask
        if self._next_op(stream) is not None:
            self._queue(stream)

    def _queue(self, stream: Stream) -> None:
        """Put ``stream`` in the line of streams with packets to send (once)."""
        if not stream.queued:
            stream.queued = True
            self._out.append(stream)

    def _settle(self, stream: Stream) -> None:
        """An established stream's shutdowns, once the bytes before them are through."""
        flushed = not stream.to_host
        if stream.guest_shut & VsockShutdown.SEND and flushed and not stream.host_wr_shut:
            stream.host_wr_shut = True
            with contextlib.suppress(OSError):
                stream.sock.shutdown(socket.SHUT_WR)
        if stream.guest_shut == BOTH and flushed:  # the guest closed: RST closes it here too
            self._reset(stream)
            return
        if stream.host_eof and not stream.staged():
            done = (
                BOTH if stream.guest_shut & VsockShutdown.SEND and flushed else VsockShutdown.SEND
            )
            stream.send_shutdown = int(done) if done & ~stream.sent_shutdown else 0

    def _can_pull(self, stream: Stream) -> bool:
        """Whether the host socket is watched for reading: to fill the empty stage while the
        guest has credit, or, with none, to learn that bytes wait (once per CREDIT_REQUEST)."""
        return (
            stream.state is StreamState.ESTABLISHED
            and not stream.host_eof
            and not stream.guest_shut & VsockShutdown.RCV
            and not stream.staged()
            and (stream.credit() > 0 or not (stream.credit_asked or stream.ask_credit))
        )

    def _reset(self, stream: Stream) -> None:
        """End ``stream`` with an RST to the guest (a host connection that never sent its line
        just closes). Its socket closes now; the stream goes once the RST is written."""
        if stream.state is StreamState.LINE:
            self._close(stream)
            return
        self._forget_socket(stream)
        stream.send_rst = True
        stream.stage, stream.stage_at = b"", 0
        stream.to_host.clear()
        self._queue(stream)

    def _close(self, stream: Stream) -> None:
        """Forget ``stream`` without a word to the guest (it sent RST, or never heard of it)."""
        self._forget_socket(stream)
        stream.closed = True
        self.lines.discard(stream)
        key = (stream.host_port, stream.guest_port)
        if self.streams.get(key) is stream:
            del self.streams[key]
        self._relisten()

    def _forget_socket(self, stream: Stream) -> None:
        if stream.mask:
            self._sel.unregister(stream.sock)
            stream.mask = 0
        stream.sock.close()

    def _count(self) -> int:
        """Streams and host connections still to send their line: what ``max_streams`` bounds."""
        return len(self.streams) + len(self.lines)

    def _drop_all(self) -> None:
        for stream in [*self.streams.values(), *self.lines]:
            self._close(stream)
        self._out.clear()
        self._strays.clear()

    def _relisten(self) -> None:
        """Accept host connections while the guest can be reached and a stream is free."""
        want = (
            self._rxq is not None and self._txq_running and self._count() < self.limits.max_streams
        )
        if want and not self._listening:
            self._sel.register(self._listener, selectors.EVENT_READ, None)
        elif not want and self._listening:
            self._sel.unregister(self._listener)
        self._listening = want

    def _unlisten(self) -> None:
        if self._listening:
            self._sel.unregister(self._listener)
            self._listening = False

    # --- packets to the guest -------------------------------------------------------------------

    def _next_op(self, stream: Stream) -> VsockOp | None:
        """The next packet ``stream`` owes the guest and can send now, or ``None``."""
        if stream.send_rst:
            return VsockOp.RST
        if stream.closed:
            return None
        if stream.send_request:
            return VsockOp.REQUEST
        if stream.send_response:
            return VsockOp.RESPONSE
        if stream.state is not StreamState.ESTABLISHED:
            return None
        if stream.staged() and stream.credit() and not stream.guest_shut & VsockShutdown.RCV:
            return VsockOp.RW
        if stream.ask_credit:
            return VsockOp.CREDIT_REQUEST
        if stream.send_credit:
            return VsockOp.CREDIT_UPDATE
        if stream.send_shutdown and not stream.staged():
            return VsockOp.SHUTDOWN
        return None

    def _fill_rx(self) -> None:
        """Write owed packets into rx buffers, streams taking turns, until either runs out."""
        queue = self._rxq
        if queue is None or not (self._out or self._strays):
            return
        try:
            with queue.batch():  # one used-index update and at most one notification
                while self._strays or self._out:
                    chain = queue.next_chain()
                    if chain is None:
                        return
                    with chain:  # returned on leaving, with the bytes written
                        try:
                            writer = WritableChain(chain)
                            room = writer.remaining().bytes - HDR
                            if room < 0:
                                raise DriverError(f"rx buffer of {room + HDR} bytes < header")
                        except DriverError as exc:
                            self.stats.bad_buffers += 1
                            log.warning("vsock: rx buffer returned unused: %s", exc)
                            continue
                        self._write_next(writer, room)
        except QueueBroken as exc:
            log.error("vsock: %s; the rx queue is not served until it restarts", exc)
            self._rxq = None

    def _write_next(self, writer: WritableChain, room: int) -> None:
        if self._strays:
            hdr = self._strays.popleft()
            writer.write_record(VSOCK_HDR, self._header(hdr.dst_port, hdr.src_port, VsockOp.RST))
            return
        while self._out:
            stream = self._out.popleft()
            op = self._next_op(stream)
            if op is None:
                stream.queued = False
                continue
            self._write_packet(stream, op, writer, room)
            if self._next_op(stream) is not None:
                self._out.append(stream)
            else:
                stream.queued = False
            self._update(stream)
            return

    def _write_packet(self, stream: Stream, op: VsockOp, writer: WritableChain, room: int) -> None:
        flags = n = 0
        if op is VsockOp.RST:
            stream.send_rst = False
            self._close(stream)
        elif op is VsockOp.REQUEST:
            stream.send_request = False
        elif op is VsockOp.RESPONSE:
            stream.send_response = False
        elif op is VsockOp.CREDIT_REQUEST:
            stream.ask_credit, stream.credit_asked = False, True
        elif op is VsockOp.RW:
            n = min(stream.staged(), stream.credit(), room)
            if not n:  # an rx buffer with room for a header only: tell the credit instead
                op = VsockOp.CREDIT_UPDATE
        elif op is VsockOp.SHUTDOWN:
            flags = stream.send_shutdown
            stream.sent_shutdown |= flags
            stream.send_shutdown = 0
            if stream.sent_shutdown == BOTH:  # the guest answers RST (or closes it itself)
                stream.state = StreamState.CLOSING
                stream.deadline = time.monotonic() + self.limits.connect_timeout
        hdr = self._header(stream.host_port, stream.guest_port, op, stream, flags=flags, n=n)
        writer.write_record(VSOCK_HDR, hdr)
        if n:
            at = stream.stage_at
            writer.write_all(memoryview(stream.stage)[at : at + n])
            stream.stage_at += n
            stream.tx_cnt = (stream.tx_cnt + n) & U32
            self.stats.to_guest += n
        stream.told_fwd_cnt = stream.fwd_cnt
        stream.send_credit = False

    def _header(
        self,
        host_port: int,
        guest_port: int,
        op: VsockOp,
        stream: Stream | None = None,
        *,
        flags: int = 0,
        n: int = 0,
    ) -> VsockHdr:
        fwd_cnt = 0 if stream is None else stream.fwd_cnt
        return VsockHdr(
            HOST_CID, self.guest_cid, host_port, guest_port, n,
            VsockType.STREAM, op, flags, self.limits.buf_alloc, fwd_cnt,
        )  # fmt: skip


def _listen(path: str) -> socket.socket:
    """A non-blocking unix listener on ``path`` (a stale socket file there is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _sender(stream: Stream) -> Callable[[memoryview], int]:
    """``sock.send`` of the stream's socket that takes what it can (0 when it is full)."""

    def send(view: memoryview) -> int:
        try:
            return stream.sock.send(view)
        except BlockingIOError:
            return 0

    return send


def _connect_port(line: bytes) -> int | None:
    """The port of a ``CONNECT <port>`` line, or ``None``."""
    parts = line.strip().split(b" ")
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port < U32 else None


def _next(port: int) -> int:
    return port + 1 if port + 1 < U32 else FIRST_HOST_PORT


def _name(stream: Stream) -> str:
    return f"host port {stream.host_port} <-> guest port {stream.guest_port}"


def _describe(hdr: VsockHdr) -> str:
    try:
        op = VsockOp(hdr.op).name
    except ValueError:
        op = f"op {hdr.op}"
    return f"{op} {hdr.src_cid}:{hdr.src_port} -> {hdr.dst_cid}:{hdr.dst_port} len {hdr.len}"


DESCRIPTION = """\
Serve a virtio-vsock device to a vhost-user front-end (QEMU's
vhost-user-vsock-pci): guest AF_VSOCK streams bridged to host unix sockets.
A host program connects to PATH and writes "CONNECT <port>\\n" to reach the
guest's port (answer "OK <host_port>\\n"); a guest connection to the host
(CID 2) port P reaches the unix socket PATH_P."""

EPILOG = """\
example: the device, then QEMU connecting to it (guest memory must be
shareable: a memfd with share=on):

  %(prog)s --vhost-user /tmp/vsock-vu.sock --guest-cid 3 --uds /tmp/vsock.sock
  qemu-system-x86_64 -accel tcg -m 256M \\
      -object memory-backend-memfd,id=mem,size=256M,share=on \\
      -machine pc,memory-backend=mem \\
      -chardev socket,id=vs0,path=/tmp/vsock-vu.sock \\
      -device vhost-user-vsock-pci,chardev=vs0 \\
      -kernel vmlinuz -initrd initrd -append console=ttyS0 -nographic

then, on the host: socat - UNIX-CONNECT:/tmp/vsock.sock and type CONNECT 1234."""


def main(argv: list[str] | None = None) -> int:
    """The command line: ``--help`` describes it."""
    p = parser("virtio_schema.examples.vsock", DESCRIPTION, EPILOG)
    add_server_arguments(p)
    p.set_defaults(max_clients=1)  # one guest per device: its streams are that guest's
    d = Limits()
    p.add_argument(
        "--guest-cid", type=int, default=3, metavar="CID", help="the guest's CID (default 3)"
    )
    p.add_argument("--uds", required=True, metavar="PATH", help="the host side's unix socket")
    p.add_argument(
        "--buf-alloc",
        type=int,
        default=d.buf_alloc,
        metavar="BYTES",
        help=f"guest bytes buffered per stream: the guest's credit (default {d.buf_alloc})",
    )
    p.add_argument(
        "--max-streams",
        type=int,
        default=d.max_streams,
        metavar="N",
        help=f"streams at once, both directions (default {d.max_streams})",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=d.connect_timeout,
        metavar="SECONDS",
        help="for a CONNECT line, the guest's answer, a closing stream's RST"
        f" (default {d.connect_timeout:g})",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        limits = Limits(
            buf_alloc=args.buf_alloc,
            max_streams=args.max_streams,
            connect_timeout=args.connect_timeout,
        )
        device = VsockDevice(args.guest_cid, args.uds, limits)
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    server = make_server(args, lambda: device)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    try:
        server.serve_forever(max_connections=args.max_connections)
    finally:
        device.close()
    log.info("vsock: %s", device.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
