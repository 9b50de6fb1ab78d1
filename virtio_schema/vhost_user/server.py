"""The vhost-user back-end server: the one I/O driver around the protocol core.

Theory of operation. :class:`VhostUserServer` listens on a unix socket (the front-end, e.g. QEMU with
``-chardev socket,path=...``, connects as the client). Each connection gets its own
:class:`~virtio_schema.vhost_user.backend.Backend` (the sans-I/O protocol core) and device (from the
factory). One thread runs one loop over non-blocking sockets and fds with ``selectors`` (a device
may ask for a thread per ring besides: "Worker threads" below):

* a readable connection's bytes and fds go to its
  :class:`~virtio_schema.vhost_user.framing.MessageReader`; each whole message goes to the core,
  whose reply joins the connection's output queue, written as the socket takes it;
* a readable kick fd is drained and its ring gets a *turn*: the device's ``handle`` with a budget of
  chains (the queue size by default), after which the used index is published and the driver
  notified; a ring whose budget ran out goes to the back of the line of turns;
* a device with sockets of its own (``events_fd``, e.g. an epoll fd over them) has that fd
  watched too: when readable, the device's ``on_events`` runs, like a poll;
* every round serves each ring in the line once, after looking at every socket and fd again: no
  queue and no connection waits for another's work to finish;
* with ``busy_poll`` (seconds), a kicked ring whose turn found work is *busy-polled*: the driver
  is asked not to kick it (:meth:`~virtio_schema.vhost_user.backend.Backend.pause_kicks`), and
  every round looks at its ring (:meth:`~virtio_schema.vhost_user.backend.Backend.has_work`, no
  device code) and gives it a turn when a chain is there, until ``busy_poll`` seconds pass
  without a turn that finds work; then it goes back to kicks
  (:meth:`~virtio_schema.vhost_user.backend.Backend.resume_kicks`, which re-checks the ring: what
  arrived meanwhile gets a turn at once). The polling adapts to the traffic: a ring spins while
  its driver keeps it busy (no kick and no wake-up per burst, as DPDK's and Linux's vhost
  back-ends poll) and costs nothing once it is idle. Polling rounds still look at every socket
  and fd first, so nobody else waits for a spinning ring.

Worker threads. A device that sets
:attr:`~virtio_schema.vhost_user.device.VhostUserDevice.worker_threads` has its rings served on
threads of their own, one per ring, as DPDK gives each queue a core (threads, not processes: the
guest memory, the rings and every fd are mapped and open in this process already, and the work
that gains, waiting on a disk or a socket, releases the GIL; see docs/operations.rst):

* each started and enabled ring with a kick fd gets a *worker*, which owns that kick fd from then
  on: it waits on it (and on an eventfd of its own, ``wake``, by which the loop pokes or stops
  it), gives the ring its turns (the device's ``handle``, through
  :meth:`~virtio_schema.vhost_user.backend.Backend.serve`) and signals the ring's call fd itself
  after each (:meth:`~virtio_schema.vhost_user.backend.Backend.take_ring_calls`); a spent budget
  gives it another turn at once. The loop no longer watches that kick fd;
* the loop keeps the rest: the socket and every message, the hooks, the device's poll, the
  back-end channel, the rings without a kick fd (polled) and the kick fds of disabled rings (a
  turn of those serves nothing). Busy polling does not apply to the workers' rings;
* the connection's *gate* says who may touch its core: its workers, several at once, each for a
  turn of its own ring; or the loop alone. Before anything that touches the core (a message, a
  turn or poll of its own, a stop, the teardown) the loop *quiesces* the connection: it waits for
  the turns in progress to end and holds the workers off until it is done. So a hook, a message,
  or GET_VRING_BASE serving the ring a last time (the loop then serves it itself), never runs
  beside a turn, and no worker can starve the loop (a waiting loop goes first);
* a worker ends when its ring stops, is disabled or gets a new kick fd, or the connection ends:
  always by the loop, the connection quiesced, and joined before its kick fd is closed (no
  thread waits on a number the kernel may reuse). A device error in a worker's turn, or its kick
  pipe at end-of-file, is reported to the loop (a deque and a pipe), which ends the connection or
  stops the ring, as after a turn of its own.

Rules of this module:

1. No peer can hold the server. A message must be whole within ``io_timeout`` seconds of its first
   byte (a deadline per message, not per read); a connection whose unread replies exceed
   ``max_output`` bytes is dropped; ``accept()`` running out of fds backs off and the existing
   connections go on; at most ``max_clients`` connections at once. With worker threads a slow
   turn holds only its own ring; quiescing a connection waits for at most the turns in progress,
   one per ring at most, which a budget bounds as it bounds the loop's own (the loop waits
   meanwhile, as it would have while serving them itself).
2. A malformed message, a refused request without an ack, a short read, an oversized payload,
   truncated ancillary data or any error from the core or the device ends that connection only
   (an error on a worker too: the loop ends the connection on its report): its fds, mappings and
   workers are released and the server goes on serving the others. A kick pipe at end-of-file
   stops that ring only.
3. Every fd is classified (:func:`~virtio_schema.vhost_user.host.classify`) before the core sees
   it, and closed through the connection's host, which forgets a watched kick fd first, or ends
   and joins the worker that waits on it.
4. With ``trace=True`` every message in and out is logged decoded (logger
   ``virtio_schema.vhost_user.trace``). With ``capture=FILE`` every message in and out is also
   appended to FILE raw, one line each, flushed at once: a recording of a real conversation to
   decode later or elsewhere (the format and
   :func:`~virtio_schema.vhost_user.messages.decode_capture` are in
   :mod:`~virtio_schema.vhost_user.messages`, "Captures").
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import functools
import logging
import os
import select
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import NamedTuple, Self, TextIO

from virtio_schema.errors import DeviceUsageError
from virtio_schema.vhost_user.backend import Backend, Turn, check_budget
from virtio_schema.vhost_user.device import VhostUserDevice
from virtio_schema.vhost_user.errors import FrontendError
from virtio_schema.vhost_user.framing import Message, MessageReader
from virtio_schema.vhost_user.host import MemoryPolicy, OsHost, classify, signal
from virtio_schema.vhost_user.messages import (
    CAPTURE_IN,
    CAPTURE_OUT,
    HEADER,
    MAX_FDS,
    HeaderRec,
    describe,
    format_capture,
)

__all__ = ["NotAFactory", "ServerAddressInUse", "VhostUserServer"]

log = logging.getLogger(__name__)
trace_log = logging.getLogger("virtio_schema.vhost_user.trace")

_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_MESSAGES_PER_READ = 8  # messages taken from one connection before the others get a look
_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_BACKOFF = (0.05, 1.0)  # seconds: first and longest pause after accept() ran out of fds
_POLL_BACKOFF = (0.001, 0.05)  # seconds: polled (NOFD) rings, busy and idle


class ServerAddressInUse(OSError):
    """Another server is listening on the socket path (it is left alone)."""


class NotAFactory(DeviceUsageError, TypeError):
    """``device_factory`` is a device, or not callable: the server makes a device per
    connection."""


class _Conn:
    """One front-end connection: its socket, core, framing, output queue, watched kick fds."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.backend: Backend | None = None
        self.reader = MessageReader()
        self.out = bytearray()
        self.started: float | None = None  # when the first byte of a partial message came
        self.kicks: dict[int, int] = {}  # watched kick fd -> ring index
        self.polls: dict[int, tuple[float, float]] = {}  # polled ring -> (next turn, interval)
        self.queued: set[int] = set()  # rings waiting for a turn in the server's line
        self.spin: dict[int, float] = {}  # busy-polled ring -> when it goes back to kicks
        self.channel: int | None = None  # the watched back-end channel (SET_BACKEND_REQ_FD)
        self.channel_out = bytearray()  # back-end messages the channel has not taken yet
        self.events: int | None = None  # the device's watched events fd (events_fd())
        self.next_poll = 0.0
        self.alive = True
        self.gate: _Gate | None = None  # the device has worker threads (see _Gate)
        self.workers: dict[int, _Worker] = {}  # ring index -> the worker that serves it

    @property
    def core(self) -> Backend:
        assert self.backend is not None
        return self.backend


class _Gate:
    """Who may touch a worker connection's core (the module's theory of operation): its workers,
    several at once, each for a turn of its own ring (:meth:`enter`, :meth:`leave`); or the loop
    alone (:meth:`held`: it waits for the turns in progress, and holds the workers off until it
    releases the gate; it may hold it again inside, and a waiting loop goes before any worker)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held = 0  # how deep the loop holds the gate
        self._turns = 0  # workers in a turn

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._cond:
            self._held += 1
            while self._turns:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                if not self._held:
                    self._cond.notify_all()

    def enter(self, worker: _Worker) -> bool:
        """Begin a turn of ``worker``'s ring once the loop does not hold the gate; ``False`` (no
        turn) once the worker is told to stop."""
        with self._cond:
            while self._held and not worker.stopping:
                self._cond.wait()
            if worker.stopping:
                return False
            self._turns += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._turns -= 1
            if not self._turns:
                self._cond.notify_all()

    def wake(self) -> None:
        """Wake the workers waiting to enter (one of them was told to stop)."""
        with self._cond:
            self._cond.notify_all()


class _Report(NamedTuple):
    """A worker's news for the loop: the connection ends (``fatal``), or the ring stops."""

    conn: _Conn
    worker: _Worker
    reason: str
    fatal: bool


class _Worker:
    """Ring ``index`` of a worker connection, served on a thread of its own (the module's theory of
    operation, "Worker threads"). The loop makes, pokes and stops it; the thread waits on the
    ring's kick fd and on ``wake``, and gives the ring its turns through the connection's gate."""

    def __init__(self, server: VhostUserServer, conn: _Conn, index: int, kick_fd: int) -> None:
        assert conn.gate is not None
        self.server = server
        self.conn = conn
        self.gate = conn.gate
        self.index = index
        self.kick_fd = kick_fd
        self.due = True  # a first turn: what the driver made available before the worker began
        self.stopping = False
        self.thread = threading.Thread(
            target=self._run, name=f"{conn.name} ring {index}", daemon=True
        )
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # closed by stop()

    def start(self) -> None:
        try:
            self.thread.start()
        except BaseException:
            os.close(self.wake)
            raise

    def poke(self) -> None:
        """Loop: give the ring a turn soon (a wake-up, a spent budget)."""
        self.due = True
        signal(self.wake)

    def stop(self) -> None:
        """Loop, the gate held (so the worker is between turns): end the thread, wait for it,
        close ``wake``. The kick fd is the ring's: the core closes it, after this."""
        self.stopping = True
        self.gate.wake()
        signal(self.wake)
        self.thread.join()
        os.close(self.wake)

    def _run(self) -> None:
        try:
            poller = select.poll()
            poller.register(self.kick_fd, select.POLLIN)
            poller.register(self.wake, select.POLLIN)
            while not self.stopping:
                if self.due:
                    self.due = False
                    if not self._turn():
                        return
                elif not self._wait(poller):
                    return
        except Exception as exc:  # a bug of ours: the connection ends, never silently the ring
            log.exception("%s: ring %d: worker", self.conn.name, self.index)
            self._report(f"worker of ring {self.index}: {type(exc).__name__}: {exc}", fatal=True)

    def _wait(self, poller: select.poll) -> bool:
        """Wait for a kick or a poke; ``False`` if the kick fd failed (reported: the ring stops)."""
        for fd, _ in poller.poll():
            if fd == self.wake:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    os.read(self.wake, 8)
                continue
            kicked = _read_kick(fd)
            if isinstance(kicked, str):
                self._report(kicked, fatal=False)
                return False
            self.due = self.due or kicked
        return True

    def _turn(self) -> bool:
        """One turn of the ring inside the gate, then its calls; ``False`` if the worker ends
        (told to stop, or the device raised: reported, the connection ends)."""
        if not self.gate.enter(self):
            return False
        core = self.conn.core
        error = None
        again = False
        try:
            again = self.index in core.serve(self.index).again
            for fd in core.take_ring_calls(self.index):
                signal(fd)
        except Exception as exc:
            log.exception("%s: device error on ring %d", self.conn.name, self.index)
            error = f"device error on ring {self.index}: {type(exc).__name__}: {exc}"
        finally:
            self.gate.leave()
        if error is not None:
            self._report(error, fatal=True)
            return False
        self.due = self.due or again
        return True

    def _report(self, reason: str, *, fatal: bool) -> None:
        self.server._report(_Report(self.conn, self, reason, fatal))


class VhostUserServer:
    """Serve devices made by ``device_factory`` on the unix socket ``path``.

    ``serve_forever()`` runs the loop in the calling thread until :meth:`stop` (thread-safe) or, if
    ``max_connections`` is given, until that many connections have come and gone. As a context
    manager it listens on entry and closes everything on exit.

    ``io_timeout``: seconds a message may take from its first byte to its last. ``budget``: chains
    one turn of a ring may take (default and maximum: the queue size). ``max_output``: bytes of
    replies a connection may leave unread. ``max_clients``: connections at once (more are closed
    at once). ``memory_policy``: what to do with guest memory that cannot be sealed against
    shrinking (:class:`~virtio_schema.vhost_user.host.MemoryPolicy`). ``busy_poll``: seconds a
    kicked ring keeps being polled, kicks off, after its last turn that found work (0: never; see
    the module's theory of operation). Polling spends the CPU the server runs on: give it a core
    of its own (a few hundred microseconds cover the gaps of a driver that streams).

    A device with :attr:`~virtio_schema.vhost_user.device.VhostUserDevice.worker_threads` has its
    rings served on worker threads (the module's theory of operation, "Worker threads").
    """

    def __init__(
        self,
        path: str,
        device_factory: Callable[[], VhostUserDevice],
        *,
        trace: bool = False,
        capture: str | None = None,
        io_timeout: float = 5.0,
        budget: int | None = None,
        max_output: int = 1 << 16,
        max_clients: int = 64,
        memory_policy: MemoryPolicy = MemoryPolicy.TRUST,
        busy_poll: float = 0.0,
    ) -> None:
        if isinstance(device_factory, VhostUserDevice) or not callable(device_factory):
            raise NotAFactory(
                f"device_factory must make a device per connection (e.g. lambda: MyDevice()),"
                f" not {type(device_factory).__name__}"
            )
        check_budget(budget)
        if not 0.0 <= busy_poll <= 1.0:
            raise DeviceUsageError(f"busy_poll {busy_poll} s outside 0..1 s")
        self.path = path
        self.device_factory = device_factory
        self.trace = trace
        self.capture = capture
        """File every message is appended to, raw (see the module's rule 4), or ``None``."""
        self._capture: TextIO | None = None
        self.io_timeout = io_timeout
        self.budget = budget
        self.max_output = max_output
        self.max_clients = max_clients
        self.memory_policy = memory_policy
        self.busy_poll = busy_poll
        self._sel = selectors.DefaultSelector()
        self._stop_r, self._stop_w = os.pipe()
        self._report_r, self._report_w = os.pipe()  # workers wake the loop: _report
        for fd in (self._stop_r, self._stop_w, self._report_r, self._report_w):
            os.set_blocking(fd, False)
        self._reports: collections.deque[_Report] = collections.deque()
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None  # our socket file, the only one we unlink
        self._accept_at: float | None = None  # accept() paused until then (out of fds)
        self._accept_pause = _ACCEPT_BACKOFF[0]
        self._conns: dict[socket.socket, _Conn] = {}
        self._ready: collections.deque[tuple[_Conn, int]] = collections.deque()
        self._timed: set[_Conn] = set()  # connections with a clock running (_retime)
        self._spinning: set[_Conn] = set()  # connections with busy-polled rings
        self._served = 0
        self._seq = 0
        self.errors: list[str] = []
        """Messages of the errors that ended connections or stopped rings (newest last)."""
        self.refusals: list[str] = []
        """Requests refused with a non-zero ack; their connections went on (newest last)."""
        self.ready = threading.Event()
        """Set once the socket is listening."""

    # --- lifecycle -----------------------------------------------------------------------------

    def listen(self) -> None:
        """Bind and listen (``serve_forever`` does it if needed). A stale socket file is replaced;
        a live server's socket, or any other file, is not (:class:`ServerAddressInUse`)."""
        self._clear_path()
        # bound under a temporary name and renamed once listening: whoever sees the path can
        # connect (a front-end started as soon as the file exists is never refused)
        staging = self.path + "~"
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(staging).st_mode):
                os.unlink(staging)
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lst.bind(staging)
            st = os.stat(staging)
            lst.listen(16)
            lst.setblocking(False)
            os.rename(staging, self.path)
        except BaseException:
            lst.close()
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise
        self._inode = (st.st_dev, st.st_ino)
        self._listener = lst
        self._sel.register(lst, selectors.EVENT_READ, ("listen", None))
        self._sel.register(self._stop_r, selectors.EVENT_READ, ("stop", None))
        self._sel.register(self._report_r, selectors.EVENT_READ, ("reports", None))
        if self.capture is not None and self._capture is None:
            self._capture = open(self.capture, "a", encoding="ascii")  # noqa: SIM115 - close()
        self.ready.set()

    def _clear_path(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ServerAddressInUse(errno.EEXIST, f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except OSError:  # nobody listens: a socket file left behind
            os.unlink(self.path)
            return
        finally:
            probe.close()
        raise ServerAddressInUse(errno.EADDRINUSE, f"a server is listening on {self.path}")

    def stop(self) -> None:
        """Ask ``serve_forever`` to return (safe from any thread or a signal handler)."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def __enter__(self) -> Self:
        if self._listener is None:
            self.listen()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def serve_forever(self, *, max_connections: int | None = None) -> None:
        if self._listener is None:
            self.listen()
        try:
            while max_connections is None or self._served < max_connections:
                for key, mask in self._sel.select(self._timeout()):
                    kind, conn = key.data
                    if kind == "stop":
                        return
                    if kind == "listen":
                        self._accept()
                    elif kind == "reports":
                        self._on_reports()
                    elif not conn.alive:
                        continue
                    elif kind == "conn":
                        if mask & selectors.EVENT_WRITE:
                            self._flush(conn)
                        if mask & selectors.EVENT_READ and conn.alive:
                            self._on_readable(conn)
                    elif kind == "channel":
                        self._on_channel(conn, mask)
                    elif kind == "events":
                        self._on_device_events(conn)
                    else:
                        self._on_kick(conn, key.fd)
                if self._timed or self._accept_at is not None:
                    self._on_timers(time.monotonic())
                self._run_turns()
                if self._spinning:
                    self._spin_round(time.monotonic())
        finally:
            self.close()

    def _timeout(self) -> float | None:
        """Until the next deadline, poll or turn (``None``: only an event can wake us); 0 while
        rings wait for a turn or are busy-polled."""
        if self._ready or self._spinning:
            return 0.0
        if not self._timed and self._accept_at is None:
            return None
        times = [] if self._accept_at is None else [self._accept_at]
        for c in self._timed:
            if c.started is not None:
                times.append(c.started + self.io_timeout)
            if c.core.device.poll_interval is not None:
                times.append(c.next_poll)
            times.extend(at for at, _ in c.polls.values())
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _retime(self, conn: _Conn) -> None:
        """Keep ``conn`` among the connections with a clock running (a partial message, a
        device that polls, polled rings) exactly while it has one: the loop looks at no other."""
        if conn.alive and (
            conn.started is not None or conn.polls or conn.core.device.poll_interval is not None
        ):
            self._timed.add(conn)
        else:
            self._timed.discard(conn)

    def _on_timers(self, now: float) -> None:
        """Whatever is due: message deadlines, paused accepts, device polls, polled rings."""
        if self._accept_at is not None and now >= self._accept_at:
            self._resume_accept()
        for conn in list(self._timed):
            if conn.started is not None and now - conn.started > self.io_timeout:
                got, want = conn.reader.progress()
                self._drop(
                    conn, f"message cut short: {got} of {want} bytes in {self.io_timeout:g} s"
                )
                continue
            interval = conn.core.device.poll_interval
            if interval is not None and now >= conn.next_poll:
                conn.next_poll = now + interval
                self._poll_device(conn)
            if conn.polls and conn.alive:
                self._poll_rings(conn, now)

    def close(self) -> None:
        """Close every connection and the listening socket, remove our socket file."""
        for conn in list(self._conns.values()):
            self._drop(conn, None)
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:  # another server's: leave it
                    os.unlink(self.path)
        for fd in (self._stop_r, self._stop_w, self._report_r, self._report_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stop_r = self._stop_w = self._report_r = self._report_w = -1
        self._sel.close()
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    # --- connections ---------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in _ACCEPT_ERRORS:  # out of fds or memory: pause accepting, go on
                log.error("accept: %s; pausing %.2f s", exc, self._accept_pause)
                self._sel.unregister(self._listener)
                self._accept_at = time.monotonic() + self._accept_pause
                self._accept_pause = min(2 * self._accept_pause, _ACCEPT_BACKOFF[1])
            else:
                log.warning("accept: %s", exc)
            return
        self._accept_pause = _ACCEPT_BACKOFF[0]
        if len(self._conns) >= self.max_clients:
            log.warning("connection refused: %d connections already", len(self._conns))
            sock.close()
            return
        self._seq += 1
        conn = _Conn(sock, f"vhost-user#{self._seq}")
        try:
            device = self.device_factory()
            host = OsHost(policy=self.memory_policy, name=conn.name,
                          on_close=lambda fd: self._unwatch(conn, fd))  # fmt: skip
            conn.backend = Backend(device, host=host, name=conn.name, budget=self.budget)
            if device.worker_threads:
                conn.gate = _Gate()
        except Exception as exc:
            log.exception("%s: the device factory failed", conn.name)
            self.errors.append(f"device factory: {type(exc).__name__}: {exc}")
            sock.close()
            return
        events_fd = device.events_fd()
        if events_fd is not None:
            try:
                self._sel.register(events_fd, selectors.EVENT_READ, ("events", conn))
            except (OSError, ValueError, KeyError) as exc:  # another connection's device has it
                log.error(
                    "%s: cannot watch the device's events fd %d: %s", conn.name, events_fd, exc
                )
                self.errors.append(f"device events fd: {type(exc).__name__}: {exc}")
                sock.close()  # the core holds nothing yet: the device's other connection is
                # left alone (closing this core would tell the device its front-end went)
                return
            conn.events = events_fd
        sock.setblocking(False)
        self._conns[sock] = conn
        self._sel.register(sock, selectors.EVENT_READ, ("conn", conn))
        self._retime(conn)
        log.info("%s: front-end connected", conn.name)

    def _resume_accept(self) -> None:
        self._accept_at = None
        if self._listener is not None:
            self._sel.register(self._listener, selectors.EVENT_READ, ("listen", None))

    def _drop(self, conn: _Conn, error: str | None) -> None:
        if not conn.alive:
            return
        conn.alive = False
        if error is not None:
            log.error("%s: %s; closing the connection", conn.name, error)
            self.errors.append(error)
        else:
            log.info("%s: front-end disconnected", conn.name)
        with self._quiet(conn):
            for index in list(conn.workers):
                self._end_worker(conn, index)
            for fd in list(conn.kicks):
                self._unwatch(conn, fd)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
            if conn.events is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(conn.events)
                conn.events = None
            for fd in conn.reader.discard():
                with contextlib.suppress(OSError):
                    os.close(fd)
            if conn.backend is not None:
                try:
                    conn.backend.close()
                except Exception as exc:  # teardown must finish whatever happened
                    log.error("%s: teardown: %s", conn.name, exc)
        conn.sock.close()
        self._conns.pop(conn.sock, None)
        self._timed.discard(conn)
        self._spinning.discard(conn)
        self._served += 1

    # --- messages ------------------------------------------------------------------------------

    def _on_readable(self, conn: _Conn) -> None:
        """Read what the socket has, a part (header or payload) at a time, for a few messages at
        most: the other connections get their look before this one gets another."""
        for _ in range(2 * _MESSAGES_PER_READ):
            try:
                data, anc, msg_flags, _ = conn.sock.recvmsg(conn.reader.want(), _FD_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                error: str | None = str(exc)
            else:
                error = self._take(conn, data, _fds_of(anc), msg_flags)
            # dropped outside any except block: a live traceback would keep the old queues (and
            # through them the guest memory mappings) alive while the connection is torn down
            if error is not None:
                self._drop(conn, error or None)
                return
            if not conn.alive:
                return

    def _take(self, conn: _Conn, data: bytes, fds: list[int], msg_flags: int) -> str | None:
        """Feed one read to the framing, and act on a whole message. ``None`` if the connection
        goes on, ``""`` on a clean disconnect, else the error that ends it."""
        if msg_flags & socket.MSG_CTRUNC:
            _close_all(fds)
            return "ancillary data truncated (more than 8 fds)"
        if not data:
            _close_all(fds)
            if conn.reader.partial:
                got, want = conn.reader.progress()
                return f"connection closed mid-message ({got} of {want} bytes)"
            return ""
        if not conn.reader.partial:
            conn.started = time.monotonic()
            self._timed.add(conn)
        try:
            message = conn.reader.feed(data, fds)
        except FrontendError as exc:
            return str(exc)
        if message is None:
            return None
        conn.started = None
        self._retime(conn)
        return self._act(conn, message)

    def _act(self, conn: _Conn, message: Message) -> str | None:
        if conn.gate is None:
            return self._act_now(conn, message)
        with conn.gate.held():  # every message quiesces a worker connection
            return self._act_now(conn, message)

    def _act_now(self, conn: _Conn, message: Message) -> str | None:
        request, flags, payload, raw_fds = message
        if self._capture is not None:
            raw = HEADER.pack(HeaderRec(request, flags, len(payload))) + payload
            self._record(conn, CAPTURE_IN, raw, len(raw_fds))
        if self.trace:
            trace_log.info("%s <- %s", conn.name, describe(request, flags, payload, len(raw_fds)))
        try:
            reply = conn.core.handle(request, flags, payload, [classify(fd) for fd in raw_fds])
        except FrontendError as exc:
            return str(exc)
        except Exception as exc:  # a bug of ours or of the device: never take the server down
            log.exception("%s: internal error", conn.name)
            return f"internal error: {type(exc).__name__}: {exc}"
        finally:
            self.refusals.extend(conn.core.refusals)
            conn.core.refusals.clear()
        # chains a request served (GET_VRING_BASE and a disable serve what is available) are
        # signalled BEFORE its reply: QEMU tears the guest notifiers down once it has the reply,
        # and a call that comes after is lost (the guest would wait for it forever)
        _signal_calls(conn.core)
        fds = conn.core.take_reply_fds()
        if reply is not None:
            if self.trace:
                h = HEADER.unpack_from(reply)
                trace_log.info(
                    "%s -> %s", conn.name,
                    describe(h.request, h.flags, reply[HEADER.size :], len(fds)),
                )  # fmt: skip
            if self._capture is not None:
                self._record(conn, CAPTURE_OUT, reply, len(fds))
            error = self._send_fds(conn, reply, fds) if fds else None
            if error is not None:
                return error
            if not fds:
                conn.out += reply
            if len(conn.out) > self.max_output:
                return f"the front-end does not read its replies ({len(conn.out)} bytes queued)"
            self._flush(conn)
            if not conn.alive:  # the send failed: dropped already
                return None
        else:
            _close_all(fds)
        self._after(conn)
        return None

    def _send_fds(self, conn: _Conn, reply: bytes, fds: list[int]) -> str | None:
        """Send a reply that carries fds (they go with its first byte; the rest joins the output
        queue), then close our copies. The replies before it must be gone: the fds would
        otherwise arrive with the wrong message."""
        try:
            self._flush(conn)
            if conn.out:
                return f"a reply with fds behind {len(conn.out)} unsent bytes"
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            try:
                sent = conn.sock.sendmsg([reply], anc)
            except (BlockingIOError, InterruptedError):
                return "the front-end does not read its replies (a reply with fds)"
            except OSError as exc:
                return f"sending a reply: {exc}"
            conn.out += reply[sent:]
            return None
        finally:
            _close_all(fds)

    def _flush(self, conn: _Conn) -> None:
        """Write what the socket takes of the output queue; watch for room if some is left."""
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._drop(conn, f"sending a reply: {exc}")
                return
            del conn.out[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        if self._sel.get_key(conn.sock).events != events:
            self._sel.modify(conn.sock, events, ("conn", conn))

    def _record(self, conn: _Conn, direction: str, data: bytes, nfds: int) -> None:
        assert self._capture is not None
        self._capture.write(format_capture(conn.name, direction, data, nfds) + "\n")
        self._capture.flush()

    def _after(self, conn: _Conn) -> None:
        """What the core wants done after a message: watch new kick fds, start polling rings,
        signal call fds, give woken rings a turn."""
        core = conn.core
        if conn.gate is not None:
            self._place_workers(conn)
        for fd, index in core.kick_fds().items():
            if conn.kicks.get(fd) == index or _owner(conn, index, fd) is not None:
                continue
            try:
                self._sel.register(fd, selectors.EVENT_READ, ("kick", conn))
            except (OSError, ValueError, KeyError) as exc:
                self._kick_failed(conn, index, f"cannot watch its kick fd: {exc}")
                continue
            conn.kicks[fd] = index
        polled = core.polled_rings()
        for index in list(conn.polls):
            if index not in polled:
                del conn.polls[index]
        for index in polled:
            conn.polls.setdefault(index, (0.0, _POLL_BACKOFF[0]))
        self._retime(conn)
        self._deliver(conn)
        for index in core.take_wakeups():
            self._enqueue(conn, index)

    def _unwatch(self, conn: _Conn, fd: int) -> None:
        owners = [index for index, worker in conn.workers.items() if worker.kick_fd == fd]
        for index in owners:  # about to be closed: its worker ends first
            self._end_worker(conn, index)
        if conn.kicks.pop(fd, None) is not None or fd == conn.channel:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)
        if fd == conn.channel:
            conn.channel = None
            conn.channel_out.clear()

    # --- worker threads ------------------------------------------------------------------------

    def _quiet(self, conn: _Conn) -> contextlib.AbstractContextManager[None]:
        """The connection quiesced while the block runs (its workers between turns, held off)."""
        return contextlib.nullcontext() if conn.gate is None else conn.gate.held()

    def _place_workers(self, conn: _Conn) -> None:
        """After a message (quiesced): each ring that runs with a kick fd gets a worker, which
        takes the kick fd from the loop; the workers of rings that no longer run end."""
        core = conn.core
        running = {index: fd for fd, index in core.kick_fds().items() if core.running(index)}
        for index, worker in list(conn.workers.items()):
            if running.get(index) != worker.kick_fd:
                self._end_worker(conn, index)
        for index, fd in running.items():
            if index in conn.workers:
                continue
            if conn.kicks.pop(fd, None) is not None:  # the loop watched it while disabled
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(fd)
            try:
                worker = _Worker(self, conn, index, fd)
                worker.start()
            except (OSError, RuntimeError) as exc:  # out of fds or threads: that ring stops
                self._kick_failed(conn, index, f"cannot start its worker thread: {exc}")
                continue
            conn.workers[index] = worker

    def _end_worker(self, conn: _Conn, index: int) -> None:
        """Stop ring ``index``'s worker and wait for it (quiesced: it is between turns)."""
        conn.workers.pop(index).stop()

    def _report(self, report: _Report) -> None:
        """A worker's news for the loop (any thread): queued, then the loop is woken."""
        self._reports.append(report)
        with contextlib.suppress(OSError):  # full: the loop is woken already
            os.write(self._report_w, b"r")

    def _on_reports(self) -> None:
        """End the connections whose workers failed; stop the rings whose kick fds did (unless
        the worker that reported is gone already: the ring was stopped or given a new fd)."""
        with contextlib.suppress(OSError):
            os.read(self._report_r, 4096)
        while self._reports:
            conn, worker, reason, fatal = self._reports.popleft()
            if not conn.alive:
                continue
            if fatal:
                self._drop(conn, reason)
            elif conn.workers.get(worker.index) is worker:
                self._kick_failed(conn, worker.index, reason)

    # --- what goes to the front-end besides replies --------------------------------------------

    def _deliver(self, conn: _Conn) -> None:
        """After a message, a turn or a poll: signal the call fds the queues asked for, and send
        what the core queued for the back-end channel."""
        core = conn.core
        _signal_calls(core)
        fd = core.backend_req_fd
        if fd is not None and fd != conn.channel:  # new (the old one was closed via the host)
            try:
                self._sel.register(fd, selectors.EVENT_READ, ("channel", conn))
            except (OSError, ValueError, KeyError) as exc:
                core.backend_channel_failed(f"cannot watch it: {exc}")
                return
            conn.channel = fd
        conn.channel_out += core.take_backend_messages()
        if conn.channel_out:
            self._flush_channel(conn)

    def _flush_channel(self, conn: _Conn) -> None:
        """Write what the channel takes now; a front-end that lets ``max_output`` bytes pile up
        loses its channel (never the server's time)."""
        assert conn.channel is not None
        try:
            sent = os.write(conn.channel, conn.channel_out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._channel_failed(conn, f"writing: {exc}")
            return
        del conn.channel_out[:sent]
        if len(conn.channel_out) > self.max_output:
            self._channel_failed(conn, f"the front-end does not read it ({len(conn.channel_out)}"
                                       " bytes queued)")  # fmt: skip
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.channel_out else 0)
        if self._sel.get_key(conn.channel).events != events:
            self._sel.modify(conn.channel, events, ("channel", conn))

    def _on_channel(self, conn: _Conn, mask: int) -> None:
        """The back-end channel is writable (send the rest) or readable: replies come only to
        requests with NEED_REPLY, which this back-end never sets, so anything read is dropped;
        end-of-file closes the channel."""
        if conn.channel is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush_channel(conn)
        if not mask & selectors.EVENT_READ or conn.channel is None:
            return
        try:
            data = os.read(conn.channel, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._channel_failed(conn, f"reading: {exc}")
            return
        if not data:
            self._channel_failed(conn, "closed by the front-end")
        else:
            log.debug("%s: back-end channel: %d unexpected bytes dropped", conn.name, len(data))

    def _channel_failed(self, conn: _Conn, reason: str) -> None:
        with self._quiet(conn):
            conn.core.backend_channel_failed(reason)  # closes it through the host: _unwatch

    # --- kicks and turns -----------------------------------------------------------------------

    def _on_kick(self, conn: _Conn, fd: int) -> None:
        index = conn.kicks.get(fd)
        if index is None:
            return
        kicked = _read_kick(fd)
        if isinstance(kicked, str):
            self._kick_failed(conn, index, kicked)
        elif kicked:
            self._enqueue(conn, index)

    def _kick_failed(self, conn: _Conn, index: int, reason: str) -> None:
        self.errors.append(f"ring {index}: {reason}")
        with self._quiet(conn):
            conn.core.kick_failed(index, reason)

    def _enqueue(self, conn: _Conn, index: int) -> None:
        worker = conn.workers.get(index)
        if worker is not None:  # the ring's turns are its worker's
            worker.poke()
        elif index not in conn.queued:
            conn.queued.add(index)
            self._ready.append((conn, index))

    def _run_turns(self) -> None:
        """One turn for each ring in line now; rings with work left line up again behind. A
        kicked ring whose turn found work is busy-polled from now on (or for longer)."""
        for _ in range(len(self._ready)):
            conn, index = self._ready.popleft()
            conn.queued.discard(index)
            worker = conn.workers.get(index)
            if worker is not None:  # lined up before the ring got its worker
                worker.poke()
                continue
            if not conn.alive or self._turn(conn, index) <= 0:
                continue
            # (a NOFD ring is polled anyway; a worker connection's kicked rings are its workers')
            if self.busy_poll and index not in conn.polls and conn.gate is None:
                if index not in conn.spin:
                    conn.core.pause_kicks(index)
                    self._spinning.add(conn)
                conn.spin[index] = time.monotonic() + self.busy_poll

    def _spin_round(self, now: float) -> None:
        """Line up the busy-polled rings that have a chain for the next round; give back to
        kicks those idle for ``busy_poll`` seconds (a ring that has chains by then gets a turn
        all the same). An error ends that connection only, as in a turn."""
        for conn in list(self._spinning):
            spin = functools.partial(self._spin_rings, conn, now)
            if self._guarded(conn, "busy polling", spin) and not conn.spin:
                self._spinning.discard(conn)

    def _spin_rings(self, conn: _Conn, now: float) -> None:
        for index, until in list(conn.spin.items()):
            if now < until:
                if conn.core.has_work(index):
                    self._enqueue(conn, index)
                continue
            del conn.spin[index]
            if conn.core.resume_kicks(index):
                self._enqueue(conn, index)

    def _turn(self, conn: _Conn, index: int) -> int:
        """Serve ring ``index`` once; the chains it took (-1 if the connection was dropped)."""
        if conn.gate is None:
            return self._turn_now(conn, index)
        with conn.gate.held():
            return self._turn_now(conn, index)

    def _turn_now(self, conn: _Conn, index: int) -> int:
        turns: list[Turn] = []
        if not self._guarded(
            conn, f"device error on ring {index}", lambda: turns.append(conn.core.serve(index))
        ):
            return -1
        for again in turns[0].again:
            self._enqueue(conn, again)
        self._deliver(conn)
        return turns[0].taken

    def _poll_rings(self, conn: _Conn, now: float) -> None:
        """Rings started without a kick fd: a turn when due, sooner while they have work."""
        for index, (at, interval) in list(conn.polls.items()):
            if now < at:
                continue
            taken = self._turn(conn, index)
            if taken < 0:
                return
            interval = _POLL_BACKOFF[0] if taken else min(2 * interval, _POLL_BACKOFF[1])
            conn.polls[index] = (now + interval, interval)

    def _poll_device(self, conn: _Conn) -> None:
        with self._quiet(conn):
            self._poll_device_now(conn)

    def _poll_device_now(self, conn: _Conn) -> None:
        self._turn_device(conn, "device error in poll", conn.core.poll)

    def _turn_device(self, conn: _Conn, what: str, call: Callable[[], Turn]) -> None:
        """Device code outside a ring's turn (``poll``, ``on_events``): the rings whose budget it
        spent get a turn, the calls it raised are signalled."""
        turns: list[Turn] = []
        if not self._guarded(conn, what, lambda: turns.append(call())):
            return
        for index in turns[0].again:
            self._enqueue(conn, index)
        self._deliver(conn)

    def _on_device_events(self, conn: _Conn) -> None:
        """The device's events fd is readable: its ``on_events``, then what that queued."""
        with self._quiet(conn):
            self._turn_device(conn, "device error in on_events", conn.core.on_events)

    def _guarded(self, conn: _Conn, what: str, action: Callable[[], None]) -> bool:
        """Run ``action`` (device code, or the core on a ring the driver may have broken); an
        exception ends ``conn`` only, logged and recorded as ``what: Type: message``."""
        error = None
        try:
            action()
        except Exception as exc:
            log.exception("%s: %s", conn.name, what)
            error = f"{what}: {type(exc).__name__}: {exc}"
        if error is None:
            return True
        self._drop(conn, error)  # outside the except block (see _on_readable)
        return False


def _owner(conn: _Conn, index: int, fd: int) -> _Worker | None:
    """The worker that owns kick fd ``fd`` of ring ``index``, if any."""
    worker = conn.workers.get(index)
    return worker if worker is not None and worker.kick_fd == fd else None


def _read_kick(fd: int) -> bool | str:
    """Drain kick fd ``fd``: whether the driver kicked, or why the fd is of no more use (a pipe
    at end-of-file, a read error: the ring stops)."""
    try:
        data = os.read(fd, 4096)  # an eventfd gives its 8-byte counter, a pipe what it has
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as exc:
        return f"reading its kick fd: {exc}"
    return True if data else "its kick pipe is at end-of-file"


def _signal_calls(core: Backend) -> None:
    """Signal the call fds of the queues that notified (after a message, a turn or a poll)."""
    for fd in core.take_calls():
        signal(fd)


def _fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
