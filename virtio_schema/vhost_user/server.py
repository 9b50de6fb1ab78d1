"""The vhost-user back-end server: a unix socket, SCM_RIGHTS, eventfds and one poll loop.

Theory of operation. :class:`VhostUserServer` listens on a unix socket (the front-end, e.g. QEMU with
``-chardev socket,path=...``, connects as the client). Each connection gets its own
:class:`~virtio_schema.vhost_user.backend.Backend` and device (from the factory). One thread polls
the listening socket, every connection and every started ring's kick eventfd with ``selectors``:
a readable connection yields one message (header, payload, fds) for the back-end; a readable kick fd
lets the device serve that queue.

Rules of this module:

1. A malformed message, a short read, an oversized payload, truncated ancillary data or any error
   from the back-end is logged and ends that connection only: its fds and mappings are released and
   the server goes on serving the others.
2. A front-end that stalls mid-message cannot hang the server: reads of the rest of a message time
   out (``io_timeout``), and the connection is dropped.
3. With ``trace=True`` every message in and out is logged decoded (logger
   ``virtio_schema.vhost_user.trace``). With ``capture=FILE`` every message in and out is also
   appended to FILE raw, one line each, flushed at once: a recording of a real conversation to
   decode later or elsewhere (the format and
   :func:`~virtio_schema.vhost_user.messages.decode_capture` are in
   :mod:`~virtio_schema.vhost_user.messages`, "Captures").
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from virtio_schema.vhost_user.backend import Backend, FrontendError
from virtio_schema.vhost_user.device import VhostUserDevice
from virtio_schema.vhost_user.messages import (
    CAPTURE_IN,
    CAPTURE_OUT,
    HEADER,
    MAX_FDS,
    MAX_PAYLOAD,
    HeaderRec,
    describe,
    format_capture,
)

__all__ = ["VhostUserServer"]

log = logging.getLogger(__name__)
trace_log = logging.getLogger("virtio_schema.vhost_user.trace")

_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


@dataclass
class _Conn:
    sock: socket.socket
    backend: Backend
    name: str
    kicks: dict[int, int] = field(default_factory=dict)  # registered kick fd -> ring index
    next_poll: float = 0.0


class _Disconnect(Exception):
    """The peer closed the connection (not an error)."""


class VhostUserServer:
    """Serve devices made by ``device_factory`` on the unix socket ``path``.

    ``serve_forever()`` runs the loop in the calling thread until :meth:`stop` (thread-safe) or, if
    ``max_connections`` is given, until that many connections have come and gone.
    """

    def __init__(
        self,
        path: str,
        device_factory: Callable[[], VhostUserDevice],
        *,
        trace: bool = False,
        capture: str | None = None,
        io_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self.device_factory = device_factory
        self.trace = trace
        self.capture = capture
        """File every message is appended to, raw (see the module's rule 3), or ``None``."""
        self._capture: TextIO | None = None
        self.io_timeout = io_timeout
        self._sel = selectors.DefaultSelector()
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_r, False)
        self._listener: socket.socket | None = None
        self._conns: dict[socket.socket, _Conn] = {}
        self._served = 0
        self._seq = 0
        self.errors: list[str] = []
        """Messages of the errors that ended connections (newest last)."""
        self.ready = threading.Event()
        """Set once the socket is listening."""

    # --- lifecycle -----------------------------------------------------------------------------

    def listen(self) -> None:
        """Bind and listen (``serve_forever`` does it if needed)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(self.path)
        lst.listen(4)
        lst.setblocking(False)
        self._listener = lst
        self._sel.register(lst, selectors.EVENT_READ, ("listen", None))
        self._sel.register(self._stop_r, selectors.EVENT_READ, ("stop", None))
        if self.capture is not None and self._capture is None:
            self._capture = open(self.capture, "a", encoding="ascii")  # noqa: SIM115 - close()
        self.ready.set()

    def stop(self) -> None:
        """Ask ``serve_forever`` to return (safe from any thread or a signal handler)."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def serve_forever(self, *, max_connections: int | None = None) -> None:
        if self._listener is None:
            self.listen()
        try:
            while True:
                if max_connections is not None and self._served >= max_connections:
                    return
                for key, _ in self._sel.select(self._poll_timeout()):
                    kind, conn = key.data
                    if kind == "stop":
                        return
                    if kind == "listen":
                        self._accept()
                    elif kind == "conn":
                        self._on_message(conn)
                    elif kind == "kick":
                        self._on_kick(conn, key.fd)
                self._poll_devices()
        finally:
            self.close()

    def _poll_timeout(self) -> float | None:
        """Wake up for the devices that asked to be polled (``VhostUserDevice.poll_interval``)."""
        intervals = [
            c.backend.device.poll_interval
            for c in self._conns.values()
            if c.backend.device.poll_interval is not None
        ]
        return min(intervals) if intervals else None

    def _poll_devices(self) -> None:
        now = time.monotonic()
        for conn in list(self._conns.values()):
            interval = conn.backend.device.poll_interval
            if interval is None or now < conn.next_poll:
                continue
            conn.next_poll = now + interval
            error = None
            try:
                conn.backend.poll()
            except Exception as exc:
                log.exception("%s: device poll", conn.name)
                error = f"device error in poll: {type(exc).__name__}: {exc}"
            if error is not None:  # outside the except block (see _on_message)
                self._drop(conn, error)

    def close(self) -> None:
        """Close every connection and the listening socket, remove the socket file."""
        for conn in list(self._conns.values()):
            self._drop(conn, None)
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stop_r = self._stop_w = -1
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
        self._seq += 1
        name = f"vhost-user#{self._seq}"
        sock.settimeout(self.io_timeout)
        conn = _Conn(sock, Backend(self.device_factory(), name=name), name)
        conn.backend._unwatch = lambda fd: self._unwatch(conn, fd)
        self._conns[sock] = conn
        self._sel.register(sock, selectors.EVENT_READ, ("conn", conn))
        log.info("%s: front-end connected", name)

    def _drop(self, conn: _Conn, error: str | None) -> None:
        if error is not None:
            log.error("%s: %s; closing the connection", conn.name, error)
            self.errors.append(error)
        else:
            log.info("%s: front-end disconnected", conn.name)
        for fd in list(conn.kicks):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)
        conn.kicks.clear()
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        try:
            conn.backend.close()
        except Exception as exc:  # teardown must finish whatever happened
            log.error("%s: teardown: %s", conn.name, exc)
        conn.sock.close()
        self._conns.pop(conn.sock, None)
        self._served += 1

    def _on_message(self, conn: _Conn) -> None:
        error = self._serve_message(conn)
        # dropped outside the except blocks: a live traceback would keep the old queues (and
        # through them the guest memory mappings) alive while the connection is torn down
        if error is not None:
            self._drop(conn, error or None)
        else:
            self._sync_kicks(conn)

    def _serve_message(self, conn: _Conn) -> str | None:
        """Read and act on one message; ``None`` if the connection goes on, ``""`` on a clean
        disconnect, else the error that ends it."""
        fds: list[int] = []
        try:
            request, flags, payload, fds = self._read_message(conn.sock)
            if self._capture is not None:
                raw = HEADER.pack(HeaderRec(request, flags, len(payload))) + payload
                self._record(conn, CAPTURE_IN, raw, len(fds))
            if self.trace:
                trace_log.info("%s <- %s", conn.name, describe(request, flags, payload, len(fds)))
            reply = conn.backend.handle(request, flags, payload, fds)
            fds = []  # the back-end owns them now
            if reply is not None:
                if self.trace:
                    h = HEADER.unpack_from(reply)
                    trace_log.info(
                        "%s -> %s", conn.name, describe(h.request, h.flags, reply[HEADER.size :])
                    )
                if self._capture is not None:
                    self._record(conn, CAPTURE_OUT, reply, 0)
                conn.sock.sendall(reply)
        except _Disconnect:
            return ""
        except (FrontendError, OSError) as exc:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            return str(exc)
        except Exception as exc:  # a bug of ours or of the device: never take the server down
            log.exception("%s: internal error", conn.name)
            return f"internal error: {type(exc).__name__}: {exc}"
        return None

    def _record(self, conn: _Conn, direction: str, data: bytes, nfds: int) -> None:
        assert self._capture is not None
        self._capture.write(format_capture(conn.name, direction, data, nfds) + "\n")
        self._capture.flush()

    def _read_message(self, sock: socket.socket) -> tuple[int, int, bytes, list[int]]:
        data, anc, msg_flags, _ = sock.recvmsg(HEADER.size, _FD_SPACE)
        fds: list[int] = []
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                fds.extend(arr)
        try:
            if msg_flags & socket.MSG_CTRUNC:
                raise FrontendError("ancillary data truncated (more than 8 fds)")
            if not data:
                if fds:
                    raise FrontendError("fds without a message")
                raise _Disconnect
            data += self._recv_exact(sock, HEADER.size - len(data))
            hdr = HEADER.unpack(data)
            if hdr.size > MAX_PAYLOAD:
                raise FrontendError(f"payload size {hdr.size} (request {hdr.request}) too large")
            payload = self._recv_exact(sock, hdr.size)
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        return hdr.request, hdr.flags, payload, fds

    @staticmethod
    def _recv_exact(sock: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = sock.recv(n - len(buf))
            except TimeoutError:
                raise FrontendError(f"message cut short: {len(buf)} of {n} bytes") from None
            if not chunk:
                raise FrontendError(f"connection closed mid-message ({len(buf)} of {n} bytes)")
            buf += chunk
        return bytes(buf)

    # --- kicks ---------------------------------------------------------------------------------

    def _sync_kicks(self, conn: _Conn) -> None:
        want = conn.backend.kick_fds()
        for fd in list(conn.kicks):
            if want.get(fd) != conn.kicks[fd]:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(fd)
                del conn.kicks[fd]
        for fd, index in want.items():
            if fd not in conn.kicks:
                os.set_blocking(fd, False)
                self._sel.register(fd, selectors.EVENT_READ, ("kick", conn))
                conn.kicks[fd] = index

    def _unwatch(self, conn: _Conn, fd: int) -> None:
        if conn.kicks.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)

    def _on_kick(self, conn: _Conn, fd: int) -> None:
        index = conn.kicks.get(fd)
        if index is None:
            return
        error = None
        try:
            conn.backend.kick(index)
        except Exception as exc:
            log.exception("%s: ring %d: device error", conn.name, index)
            error = f"device error on ring {index}: {type(exc).__name__}: {exc}"
        if error is not None:  # outside the except block (see _on_message)
            self._drop(conn, error)
