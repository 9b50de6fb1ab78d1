"""A small QMP client: QEMU's own view of its virtio devices, for the inspector.

QMP (``-qmp unix:SOCK,server=on,wait=off``) is JSON text over a unix socket, one document per line.
On connect QEMU sends a greeting (``{"QMP": {"version": ...}}``); the client answers
``qmp_capabilities`` and may then send commands (``{"execute": NAME, "arguments": {...}, "id": N}``)
and receives, for each, ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` carrying
the same ``id``. Asynchronous events (``{"event": "STOP", ...}``) can arrive between them; they
are kept in :attr:`QMPClient.events`.

Rules of this module:

1. Standard library only, and the only I/O is this one socket. It sits beside
   :mod:`virtio_schema.inspect` (a dissector's helper, never imported by the device layers).
2. Nothing waits forever: every reply must arrive within ``timeout`` seconds or
   :class:`QMPError` is raised; a reply line longer than :data:`MAX_LINE` is refused.
3. The typed accessors (:meth:`~QMPClient.queue_status`, :meth:`~QMPClient.virtio_status`,
   :meth:`~QMPClient.queue_element`) read the ``x-query-virtio*`` answers as QEMU 7.2 shapes them
   (the ``x-`` commands are unstable: a field that is missing or of the wrong type raises
   :class:`QMPError` naming it, never a ``KeyError``).

What QEMU 7.2 answers, in short: ``x-query-virtio-queue-status`` gives the ring addresses
(``vring-desc``, ``vring-avail``, ``vring-used``: guest-physical; for a packed ring the descriptor
ring and the driver and device event areas) and ``vring-num``; ``x-query-virtio-status`` gives the
negotiated features only as names with a description (``"VIRTIO_F_RING_PACKED: ..."``) split into
``transports`` and ``dev-features``, plus the bits it has no name for as a number
(``unknown-dev-features``); ``x-query-virtio-queue-element`` decodes the chain whose head sits in
avail slot ``index % vring-num``, listing its descriptors in reverse chain order.

A trap with vhost devices: while the device's vhost back-end runs (``vhost-started`` in
``x-query-virtio-status``), QEMU 7.2 answers ``x-query-virtio-queue-status`` by sending
GET_VRING_BASE to the back-end, which STOPS the ring in a vhost-user back-end (the guest's queue
then hangs), and reports that call's return code (0) as ``last-avail-idx``. For such a device ask
``x-query-virtio-vhost-queue-status`` (:meth:`QMPClient.vhost_queue_status`) instead: it only reads
QEMU's copy of the ring addresses. Both the ``x-query-virtio-queue-element`` reads and QEMU's own
``stop`` are harmless (the latter stops the rings on purpose).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeAlias

from virtio_schema.errors import VirtioError

__all__ = [
    "JSON",
    "MAX_LINE",
    "QMPClient",
    "QMPCommandError",
    "QMPError",
    "QueueElement",
    "QueueStatus",
    "RingDesc",
    "VhostQueueStatus",
    "VirtioDeviceInfo",
    "VirtioStatus",
]

JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None
"""A JSON value as :func:`json.loads` returns it."""

MAX_LINE = 16 << 20
"""Longest reply line accepted (bytes); QEMU's virtio answers are a few KiB."""


class QMPError(VirtioError):
    """The QMP conversation failed: no socket, no or bad greeting, a timeout, a closed connection,
    a reply that is not JSON or lacks a field the accessor needs."""


class QMPCommandError(QMPError):
    """QEMU answered a command with an error (``{"error": {"class": ..., "desc": ...}}``)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"{command}: {error_class}: {desc}")


@dataclass(frozen=True)
class VirtioDeviceInfo:
    """One entry of ``x-query-virtio``."""

    name: str
    path: str
    """The QOM path the other commands take (e.g. ``/machine/peripheral/ID/virtio-backend``)."""


@dataclass(frozen=True)
class VirtioStatus:
    """The parts of ``x-query-virtio-status`` the inspector uses."""

    name: str
    device_id: int
    started: bool
    broken: bool
    vhost_started: bool
    """A vhost back-end runs the device's rings now (see the module docstring for the trap)."""
    guest_features: frozenset[str]
    """The negotiated features QEMU has names for (``VIRTIO_F_VERSION_1``, ...), both lists."""
    unknown_guest_features: int
    """Negotiated bits QEMU 7.2 has no name for, as a mask (e.g. ``1 << 40``, RING_RESET)."""

    @property
    def packed(self) -> bool:
        """The driver negotiated the packed ring layout (``VIRTIO_F_RING_PACKED``)."""
        return "VIRTIO_F_RING_PACKED" in self.guest_features


@dataclass(frozen=True)
class QueueStatus:
    """``x-query-virtio-queue-status``: where the ring is and QEMU's indices for it."""

    name: str
    queue_index: int
    desc: int
    """Descriptor table (packed: descriptor ring), guest-physical."""
    avail: int
    """Available ring (packed: driver event area), guest-physical."""
    used: int
    """Used ring (packed: device event area), guest-physical."""
    num: int
    """The queue size the driver set."""
    num_default: int
    align: int
    last_avail_idx: int
    """QEMU's next avail index to take; for a vhost device, the back-end's as of the last time
    it was stopped (0, a return code, while it runs: see the module docstring)."""
    shadow_avail_idx: int | None
    """QEMU's last read of ``avail.idx``; absent while a vhost back-end runs the ring."""
    used_idx: int
    inuse: int
    """Chains QEMU has taken and not yet returned."""


@dataclass(frozen=True)
class VhostQueueStatus:
    """``x-query-virtio-vhost-queue-status``: QEMU's copy of the ring a vhost back-end runs (no
    message to the back-end)."""

    name: str
    desc: int
    """Descriptor table, guest-physical (``desc-phys``)."""
    avail: int
    """Available ring (packed: driver event area), guest-physical (``avail-phys``)."""
    used: int
    """Used ring (packed: device event area), guest-physical (``used-phys``)."""
    num: int
    desc_size: int
    avail_size: int
    used_size: int


@dataclass(frozen=True)
class RingDesc:
    """One descriptor of ``x-query-virtio-queue-element``."""

    addr: int
    len: int
    flags: frozenset[str]
    """Lower-case names: ``next``, ``write``, ``indirect`` (and ``avail``/``used`` bits)."""


@dataclass(frozen=True)
class QueueElement:
    """``x-query-virtio-queue-element``: the chain whose head sits in one avail slot."""

    head: int
    """The descriptor index in the avail slot (QEMU calls it ``index``)."""
    descs: tuple[RingDesc, ...]
    """As QEMU lists them: REVERSE chain order; for an indirect head, the table's entries."""
    avail_idx: int
    avail_flags: int
    used_idx: int
    used_flags: int

    def chain_order(self) -> tuple[RingDesc, ...]:
        """The descriptors in chain order (the order a device walks them)."""
        return self.descs[::-1]


def _field(obj: JSON, key: str, kind: type, what: str) -> JSON:
    if not isinstance(obj, dict):
        raise QMPError(f"{what}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise QMPError(f"{what}: no field {key!r} in the reply")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise QMPError(f"{what}: field {key!r} is {value!r}, not {kind.__name__}")
    return value


def _int(obj: JSON, key: str, what: str) -> int:
    value = _field(obj, key, int, what)
    assert isinstance(value, int)
    return value


def _str(obj: JSON, key: str, what: str) -> str:
    value = _field(obj, key, str, what)
    assert isinstance(value, str)
    return value


def _bool(obj: JSON, key: str, what: str) -> bool:
    value = _field(obj, key, bool, what)
    assert isinstance(value, bool)
    return value


def _dict(obj: JSON, key: str, what: str) -> dict[str, JSON]:
    value = _field(obj, key, dict, what)
    assert isinstance(value, dict)
    return value


def _list(obj: JSON, key: str, what: str) -> list[JSON]:
    value = _field(obj, key, list, what)
    assert isinstance(value, list)
    return value


def _names(described: list[JSON], what: str) -> set[str]:
    """``"VIRTIO_F_VERSION_1: Device compliant ..."`` -> ``VIRTIO_F_VERSION_1``."""
    out = set()
    for item in described:
        if not isinstance(item, str):
            raise QMPError(f"{what}: feature {item!r} is not a string")
        out.add(item.split(":", 1)[0].strip())
    return out


class QMPClient:
    """A QMP connection to one QEMU, ready for commands once constructed.

    ``timeout`` bounds the connect and every reply (seconds). Use it as a context manager or call
    :meth:`close`.
    """

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[JSON] = []
        """Asynchronous events received so far, oldest first."""
        self._buf = bytearray()
        self._id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            try:
                self._sock.connect(path)
            except OSError as exc:
                raise QMPError(f"cannot connect to the QMP socket {path}: {exc}") from None
            self.greeting = self._read()
            """The greeting QEMU sent (``{"QMP": {"version": ..., "capabilities": ...}}``)."""
            qmp = _dict(self.greeting, "QMP", "QMP greeting")
            version = _dict(qmp, "version", "QMP greeting")
            qemu = _dict(version, "qemu", "QMP greeting")
            self.version = (
                _int(qemu, "major", "QMP greeting"),
                _int(qemu, "minor", "QMP greeting"),
                _int(qemu, "micro", "QMP greeting"),
            )
            """QEMU's version as ``(major, minor, micro)``."""
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    # --- the conversation ------------------------------------------------------------------------

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _read(self) -> JSON:
        """The next JSON line, within ``timeout`` seconds."""
        deadline = time.monotonic() + self.timeout
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > MAX_LINE:
                raise QMPError(f"QMP reply longer than {MAX_LINE} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError(f"no reply from QEMU within {self.timeout} s ({self.path})")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue  # the loop reports it with the deadline
            except OSError as exc:
                raise QMPError(f"QMP socket {self.path}: {exc}") from None
            if not chunk:
                raise QMPError(f"QEMU closed the QMP connection ({self.path})")
            self._buf += chunk
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        try:
            value: JSON = json.loads(line)
        except ValueError:
            raise QMPError(f"QMP reply is not JSON: {line[:200]!r}") from None
        return value

    def execute(self, command: str, arguments: Mapping[str, JSON] | None = None) -> JSON:
        """Run ``command`` and return its ``return`` value; raises :class:`QMPCommandError` if
        QEMU answers with an error, :class:`QMPError` on a timeout or a broken connection."""
        self._id += 1
        request: dict[str, JSON] = {"execute": command, "id": self._id}
        if arguments is not None:
            request["arguments"] = dict(arguments)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            raise QMPError(f"QMP socket {self.path}: {exc}") from None
        while True:
            reply = self._read()
            if not isinstance(reply, dict):
                raise QMPError(f"{command}: reply is not an object: {reply!r}")
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id", self._id) != self._id:
                continue  # an answer to an earlier command that timed out
            if "error" in reply:
                err = reply["error"]
                raise QMPCommandError(
                    command, _str(err, "class", command), _str(err, "desc", command)
                )
            if "return" not in reply:
                raise QMPError(f"{command}: reply has neither 'return' nor 'error': {reply!r}")
            return reply["return"]

    # --- typed virtio queries --------------------------------------------------------------------

    def virtio_devices(self) -> list[VirtioDeviceInfo]:
        """``x-query-virtio``: the realized virtio devices and their QOM paths."""
        what = "x-query-virtio"
        reply = self.execute(what)
        if not isinstance(reply, list):
            raise QMPError(f"{what}: expected a list, got {reply!r}")
        return [VirtioDeviceInfo(_str(d, "name", what), _str(d, "path", what)) for d in reply]

    def virtio_status(self, path: str) -> VirtioStatus:
        """``x-query-virtio-status``: the device's state and negotiated (guest) features."""
        what = "x-query-virtio-status"
        r = self.execute(what, {"path": path})
        feats = _dict(r, "guest-features", what)
        names = _names(_list(feats, "transports", what), what)
        if "dev-features" in feats:  # absent for device types QEMU has no feature table for
            names |= _names(_list(feats, "dev-features", what), what)
        unknown = (
            _int(feats, "unknown-dev-features", what) if "unknown-dev-features" in feats else 0
        )
        return VirtioStatus(
            name=_str(r, "name", what),
            device_id=_int(r, "device-id", what),
            started=_bool(r, "started", what),
            broken=_bool(r, "broken", what),
            vhost_started=_bool(r, "vhost-started", what),
            guest_features=frozenset(names),
            unknown_guest_features=unknown,
        )

    def queue_status(self, path: str, queue: int) -> QueueStatus:
        """``x-query-virtio-queue-status``: the ring's addresses, size and QEMU's indices.

        Not while a vhost back-end runs the device: QEMU would stop its ring (module docstring);
        use :meth:`vhost_queue_status` then."""
        what = "x-query-virtio-queue-status"
        r = self.execute(what, {"path": path, "queue": queue})
        return QueueStatus(
            name=_str(r, "name", what),
            queue_index=_int(r, "queue-index", what),
            desc=_int(r, "vring-desc", what),
            avail=_int(r, "vring-avail", what),
            used=_int(r, "vring-used", what),
            num=_int(r, "vring-num", what),
            num_default=_int(r, "vring-num-default", what),
            align=_int(r, "vring-align", what),
            last_avail_idx=_int(r, "last-avail-idx", what),
            shadow_avail_idx=(
                _int(r, "shadow-avail-idx", what)
                if isinstance(r, dict) and "shadow-avail-idx" in r
                else None
            ),
            used_idx=_int(r, "used-idx", what),
            inuse=_int(r, "inuse", what),
        )

    def vhost_queue_status(self, path: str, queue: int) -> VhostQueueStatus:
        """``x-query-virtio-vhost-queue-status``: where the ring a vhost back-end runs is (an
        error while the back-end is stopped)."""
        what = "x-query-virtio-vhost-queue-status"
        r = self.execute(what, {"path": path, "queue": queue})
        return VhostQueueStatus(
            name=_str(r, "name", what),
            desc=_int(r, "desc-phys", what),
            avail=_int(r, "avail-phys", what),
            used=_int(r, "used-phys", what),
            num=_int(r, "num", what),
            desc_size=_int(r, "desc-size", what),
            avail_size=_int(r, "avail-size", what),
            used_size=_int(r, "used-size", what),
        )

    def queue_element(self, path: str, queue: int, index: int | None = None) -> QueueElement:
        """``x-query-virtio-queue-element``: the chain whose head is in avail slot
        ``index % num`` (QEMU's next one, ``last-avail-idx``, without ``index``). Split rings
        only in QEMU 7.2."""
        what = "x-query-virtio-queue-element"
        args: dict[str, JSON] = {"path": path, "queue": queue}
        if index is not None:
            args["index"] = index
        r = self.execute(what, args)
        descs = []
        for d in _list(r, "descs", what):
            flags = _list(d, "flags", what)
            if not all(isinstance(f, str) for f in flags):
                raise QMPError(f"{what}: descriptor flags {flags!r} are not names")
            descs.append(
                RingDesc(
                    _int(d, "addr", what),
                    _int(d, "len", what),
                    frozenset(f for f in flags if isinstance(f, str)),
                )
            )
        avail = _dict(r, "avail", what)
        used = _dict(r, "used", what)
        return QueueElement(
            head=_int(r, "index", what),
            descs=tuple(descs),
            avail_idx=_int(avail, "idx", what),
            avail_flags=_int(avail, "flags", what),
            used_idx=_int(used, "idx", what),
            used_flags=_int(used, "flags", what),
        )
