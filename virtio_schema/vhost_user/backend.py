"""The vhost-user back-end state machine for one front-end connection.

Theory of operation. The server reads a message (header, payload, file descriptors) and hands it to
:meth:`Backend.handle`, which validates it completely before acting, updates the connection's state
(features, memory table, per-ring size/addresses/base/eventfds/enable), builds a
:class:`~virtio_schema.queue.Queue` from :class:`~virtio_schema.queue.QueueState` when a ring
starts, and returns the reply bytes (or ``None``). Kicks arrive through :meth:`Backend.kick`.

Rules of this module:

1. The front-end is a peer, not a friend: every size, count, index, address and fd set is checked;
   anything malformed or unexpected raises :class:`FrontendError`, and the server disconnects
   cleanly. Nothing is written to guest memory on behalf of a message.
2. Every fd received is either kept (and closed on teardown) or closed at once.
3. Ring state follows the specification's three states: stopped, started-but-disabled, started and
   enabled (vhost-user.rst, "Ring states"). The device's ``handle`` runs only for the last.
4. A new SET_MEM_TABLE stops using the old mapping before unmapping it: running queues are rebuilt
   on the new memory at the position they had reached.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from virtio_schema.errors import DriverError, VirtioError
from virtio_schema.mem import DriverRange, GuestMemory
from virtio_schema.queue import QueueBroken, QueueMemory, QueueState, VirtQueue, create_queue
from virtio_schema.schema import (
    Feature,
    avail_ring,
    check_packed_queue_size,
    check_split_queue_size,
    used_ring,
)
from virtio_schema.vhost_user.device import VhostUserDevice
from virtio_schema.vhost_user.messages import (
    CONFIG_HDR,
    HEADER,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MEM_REGION,
    MEMORY_HDR,
    U64,
    VRING_ADDR,
    VRING_STATE,
    ConfigHdrRec,
    HeaderFlags,
    HeaderRec,
    ProtocolFeature,
    Request,
    U64Rec,
    VringAddrRec,
    VringStateRec,
)

__all__ = [
    "DPDK_PACKED_BASE",
    "OFFERED_PROTOCOL_FEATURES",
    "Backend",
    "EventfdNotify",
    "FrontendError",
    "decode_vring_base",
    "encode_vring_base",
]

log = logging.getLogger(__name__)

OFFERED_PROTOCOL_FEATURES = int(
    ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
)
"""Protocol features this back-end implements."""

_NOFD = 0x100  # SET_VRING_KICK/CALL/ERR: "no fd" (polling) flag in the u64 payload
_FD_REQUESTS = {Request.SET_MEM_TABLE, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                Request.SET_VRING_ERR}  # fmt: skip


DPDK_PACKED_BASE = 0x8000
"""The SET_VRING_BASE number DPDK's (and SPDK's) virtio-user always sends for a packed ring: avail
position 0 with wrap counter 1 and nothing in the used half ("no reservation"). Read as QEMU's
layout it would say used position 0 with wrap counter 0, a ring whose every entry is in flight; it
means a fresh ring, used = avail."""


def decode_vring_base(num: int, *, packed: bool) -> QueueState:
    """SET_VRING_BASE's number as a queue state. Split: the next avail index (the used index
    follows it). Packed, QEMU's layout (``virtio_queue_packed_get_last_avail_idx``): bits 0-14 the
    avail position, bit 15 its wrap counter, bits 16-30 the used position, bit 31 its wrap
    counter; :data:`DPDK_PACKED_BASE` alone is read as a fresh ring."""
    if not packed:
        return QueueState(next_avail=num, next_used=num)
    if num == DPDK_PACKED_BASE:
        return QueueState()  # a fresh ring: both positions 0, both wrap counters 1
    avail, used = num & 0xFFFF, num >> 16
    return QueueState(avail & 0x7FFF, used & 0x7FFF, bool(avail >> 15), bool(used >> 15))


def encode_vring_base(state: QueueState, *, packed: bool) -> int:
    """GET_VRING_BASE's number for ``state``, in the layout :func:`decode_vring_base` reads."""
    if not packed:
        return state.next_avail
    avail = state.next_avail | (state.avail_wrap << 15)
    used = state.next_used | (state.used_wrap << 15)
    return avail | (used << 16)


class FrontendError(DriverError):
    """The front-end sent a malformed or unexpected message (the connection is closed)."""


class EventfdNotify:
    """A :class:`~virtio_schema.queue.DriverNotify` that signals a call eventfd."""

    __slots__ = ("fd",)

    _ONE = (1).to_bytes(8, "little")

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def notify(self) -> None:
        if self.fd is not None:
            try:  # noqa: SIM105 - hot path: a plain try is cheaper than contextlib.suppress
                os.write(self.fd, self._ONE)
            except BlockingIOError:  # the counter is saturated: the front-end is signalled anyway
                pass


@dataclass
class _Region:
    gpa: int
    size: int
    uva: int
    mm: mmap.mmap
    view: memoryview


@dataclass
class _Vring:
    index: int
    size: int | None = None
    addr: VringAddrRec | None = None
    base: QueueState = field(default_factory=QueueState)
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False
    queue: VirtQueue | None = None
    notify: EventfdNotify | None = None
    broken_logged: bool = False
    gpas: tuple[int, ...] = ()  # guest addresses of the three ring areas


class Backend:
    """One vhost-user connection's state. ``handle`` one message at a time; ``kick`` when a kick
    fd is readable; ``close`` on disconnect (releases every fd and mapping)."""

    def __init__(
        self,
        device: VhostUserDevice,
        *,
        name: str = "vhost-user",
        unwatch: Callable[[int], None] | None = None,
    ) -> None:
        """``unwatch(fd)`` is called before a kick fd is closed, so a poller can forget it first
        (the front-end holds the same eventfd: closing ours does not remove it from epoll)."""
        self.device = device
        self.name = name
        self._unwatch = unwatch
        self.acked_features = 0
        self.protocol_features = 0
        self.owner = False
        self.memory: GuestMemory | None = None
        self._regions: list[_Region] = []
        self.vrings = [_Vring(i) for i in range(device.num_queues)]
        self._handlers: dict[int, Callable[[int, bytes, list[int]], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_fd,
            Request.SET_VRING_CALL: self._set_vring_fd,
            Request.SET_VRING_ERR: self._set_vring_fd,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
        }

    # --- the message entry point ---------------------------------------------------------------

    def handle(self, request: int, flags: int, payload: bytes, fds: list[int]) -> bytes | None:
        """Act on one message; returns the reply to send, if any. Takes ownership of ``fds``.

        Raises :class:`FrontendError` for anything malformed or unexpected (after closing the fds
        it did not keep); the caller closes the connection.
        """
        kept = False
        try:
            if flags & HeaderFlags.VERSION_MASK != 1:
                raise FrontendError(f"{self.name}: protocol version {flags & 3}, expected 1")
            if len(fds) > MAX_FDS:
                raise FrontendError(f"{self.name}: {len(fds)} fds with one message")
            if fds and request not in _FD_REQUESTS:
                raise FrontendError(f"{self.name}: request {request} does not carry fds")
            handler = self._handlers.get(request)
            if handler is None:
                raise FrontendError(f"{self.name}: unexpected request {_name(request)}")
            reply = handler(request, payload, fds)
            kept = True
        finally:
            if not kept:
                _close_all(fds)
        if reply is not None:
            return reply
        if flags & HeaderFlags.NEED_REPLY and self.protocol_features & ProtocolFeature.REPLY_ACK:
            return _reply(request, U64.pack(U64Rec(0)))
        return None

    # --- negotiation ---------------------------------------------------------------------------

    def offered_protocol_features(self) -> int:
        """What this back-end implements, less what the device opts out of."""
        return OFFERED_PROTOCOL_FEATURES & int(self.device.protocol_features())

    def offered_features(self) -> int:
        return int(self.device.device_features()) | int(Feature.PROTOCOL_FEATURES)

    def _get_features(self, request: int, payload: bytes, fds: list[int]) -> bytes:
        _expect_size(request, payload, 0)
        return _reply(request, U64.pack(U64Rec(self.offered_features())))

    def _set_features(self, request: int, payload: bytes, fds: list[int]) -> None:
        value = _u64(request, payload)
        extra = value & ~self.offered_features()
        if extra:
            raise FrontendError(f"{self.name}: SET_FEATURES acks unoffered bits {extra:#x}")
        self.acked_features = value
        log.info("%s: features acked %#x", self.name, value)
        if not value & Feature.PROTOCOL_FEATURES:
            for vr in self.vrings:  # without protocol features, rings start enabled
                vr.enabled = True
        return None

    def _set_owner(self, request: int, payload: bytes, fds: list[int]) -> None:
        _expect_size(request, payload, 0)
        self.owner = True
        return None

    def _reset_owner(self, request: int, payload: bytes, fds: list[int]) -> None:
        self._stop_all()
        self.owner = False
        return None

    def _get_protocol_features(self, request: int, payload: bytes, fds: list[int]) -> bytes:
        _expect_size(request, payload, 0)
        return _reply(request, U64.pack(U64Rec(self.offered_protocol_features())))

    def _set_protocol_features(self, request: int, payload: bytes, fds: list[int]) -> None:
        value = _u64(request, payload)
        extra = value & ~self.offered_protocol_features()
        if extra:
            raise FrontendError(f"{self.name}: SET_PROTOCOL_FEATURES acks unoffered {extra:#x}")
        self.protocol_features = value
        return None

    def _get_queue_num(self, request: int, payload: bytes, fds: list[int]) -> bytes:
        _expect_size(request, payload, 0)
        return _reply(request, U64.pack(U64Rec(self.device.num_queues)))

    # --- memory --------------------------------------------------------------------------------

    def _set_mem_table(self, request: int, payload: bytes, fds: list[int]) -> None:
        if len(payload) < MEMORY_HDR.size:
            raise FrontendError(f"{self.name}: SET_MEM_TABLE payload of {len(payload)} bytes")
        (n,) = MEMORY_HDR.unpack_from(payload)
        if not 1 <= n <= MAX_FDS:
            raise FrontendError(f"{self.name}: SET_MEM_TABLE with {n} regions (1..{MAX_FDS})")
        _expect_size(request, payload, MEMORY_HDR.size + n * MEM_REGION.size)
        if len(fds) != n:
            raise FrontendError(f"{self.name}: SET_MEM_TABLE: {n} regions but {len(fds)} fds")
        regions: list[_Region] = []
        try:
            for k in range(n):
                rec = MEM_REGION.unpack_from(payload, MEMORY_HDR.size + k * MEM_REGION.size)
                regions.append(self._map_region(k, rec.guest_phys_addr, rec.memory_size,
                                                rec.userspace_addr, rec.mmap_offset, fds[k]))  # fmt: skip
            try:
                memory = GuestMemory([(r.gpa, r.view) for r in regions])
            except VirtioError as exc:
                raise FrontendError(f"{self.name}: SET_MEM_TABLE: {exc}") from None
            for a in regions:
                for b in regions:
                    if a is not b and a.uva < b.uva + b.size and b.uva < a.uva + a.size:
                        memory.close()
                        raise FrontendError(f"{self.name}: SET_MEM_TABLE: user ranges overlap")
        except BaseException:
            _unmap(regions)
            raise
        finally:
            _close_all(fds)  # the mappings keep what they need
        running = self._suspend_queues()
        self._release_memory()
        self.memory = memory
        self._regions = regions
        self._resume_queues(running)
        return None

    def _map_region(self, k: int, gpa: int, size: int, uva: int, offset: int, fd: int) -> _Region:
        if size == 0 or gpa + size > 1 << 64 or uva + size > 1 << 64 or offset + size > 1 << 63:
            raise FrontendError(
                f"{self.name}: region {k}: gpa={gpa:#x} size={size:#x} uva={uva:#x}"
                f" offset={offset:#x} is not a valid range"
            )
        try:
            mm = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise FrontendError(f"{self.name}: region {k}: cannot map fd {fd}: {exc}") from None
        return _Region(gpa, size, uva, mm, memoryview(mm)[offset : offset + size])

    def _release_memory(self) -> None:
        if self.memory is not None:
            try:
                self.memory.close()
            except VirtioError as exc:  # the device kept a view: leave that mapping to the GC
                log.error("%s: old guest memory still in use: %s", self.name, exc)
            self.memory = None
        _unmap(self._regions)
        self._regions = []

    def uva_to_gpa(self, uva: int, length: int) -> int | None:
        """The guest address of front-end address ``uva`` if ``length`` bytes there lie in one
        region."""
        for r in self._regions:
            if r.uva <= uva and uva + length <= r.uva + r.size:
                return r.gpa + (uva - r.uva)
        return None

    # --- rings ---------------------------------------------------------------------------------

    @property
    def packed(self) -> bool:
        """The driver negotiated packed rings (sizes, areas and bases follow)."""
        return bool(self.acked_features & Feature.RING_PACKED)

    def _decode_base(self, num: int) -> QueueState:
        return decode_vring_base(num, packed=self.packed)

    def _encode_base(self, state: QueueState) -> int:
        return encode_vring_base(state, packed=self.packed)

    def _vring(self, request: int, index: int) -> _Vring:
        if not 0 <= index < len(self.vrings):
            raise FrontendError(
                f"{self.name}: {_name(request)} for ring {index}, the device has {len(self.vrings)}"
            )
        return self.vrings[index]

    def _state(self, request: int, payload: bytes) -> VringStateRec:
        _expect_size(request, payload, VRING_STATE.size)
        return VRING_STATE.unpack(payload)

    def _set_vring_num(self, request: int, payload: bytes, fds: list[int]) -> None:
        s = self._state(request, payload)
        vr = self._vring(request, s.index)
        try:
            if self.packed:
                check_packed_queue_size(s.num)
            else:
                check_split_queue_size(s.num)
        except VirtioError as exc:
            raise FrontendError(f"{self.name}: SET_VRING_NUM ring {s.index}: {exc}") from None
        if vr.started:
            raise FrontendError(f"{self.name}: SET_VRING_NUM on running ring {s.index}")
        vr.size = s.num
        return None

    def _set_vring_addr(self, request: int, payload: bytes, fds: list[int]) -> None:
        _expect_size(request, payload, VRING_ADDR.size)
        a = VRING_ADDR.unpack(payload)
        vr = self._vring(request, a.index)
        vr.addr = a
        if vr.started and vr.queue is not None:  # moved while running: rebuild at the same place
            state = vr.queue.state()
            vr.queue = None
            self._build_queue(vr, state)
        return None

    def _set_vring_base(self, request: int, payload: bytes, fds: list[int]) -> None:
        s = self._state(request, payload)
        vr = self._vring(request, s.index)
        if s.num > 0xFFFF and not self.packed:
            raise FrontendError(f"{self.name}: SET_VRING_BASE ring {s.index}: base {s.num}")
        if vr.started:
            raise FrontendError(f"{self.name}: SET_VRING_BASE on running ring {s.index}")
        vr.base = self._decode_base(s.num)
        return None

    def _get_vring_base(self, request: int, payload: bytes, fds: list[int]) -> bytes:
        s = self._state(request, payload)
        vr = self._vring(request, s.index)
        if vr.queue is not None and vr.enabled:
            # serve what the driver made available before it asked us to stop, so a stop loses
            # no request the driver already handed over
            self.kick(s.index, drain=False)
        state = vr.queue.state() if vr.queue is not None else vr.base
        self._stop(vr)
        vr.base = state
        return _reply(request, VRING_STATE.pack(VringStateRec(s.index, self._encode_base(state))))

    def _set_vring_fd(self, request: int, payload: bytes, fds: list[int]) -> None:
        value = _u64(request, payload)
        index, nofd = value & 0xFF, bool(value & _NOFD)
        if value & ~0x1FF:
            raise FrontendError(f"{self.name}: {_name(request)} payload {value:#x}")
        vr = self._vring(request, index)
        if nofd != (not fds) or len(fds) > 1:
            raise FrontendError(
                f"{self.name}: {_name(request)} ring {index}: {len(fds)} fds, nofd={nofd}"
            )
        fd = fds[0] if fds else None
        fds.clear()  # owned by the ring from here on
        if fd is not None and request != Request.SET_VRING_KICK:
            # never block the server on a saturated call/err eventfd (QEMU's and DPDK's eventfds
            # are non-blocking already; this only protects against a hostile front-end)
            os.set_blocking(fd, False)
        if request == Request.SET_VRING_KICK:
            self._close_kick(vr)
            vr.kick_fd = fd
            self._start(vr)
        elif request == Request.SET_VRING_CALL:
            _close(vr.call_fd)
            vr.call_fd = fd
            if vr.notify is not None:
                vr.notify.fd = fd
        else:
            _close(vr.err_fd)
            vr.err_fd = fd
        return None

    def _set_vring_enable(self, request: int, payload: bytes, fds: list[int]) -> None:
        s = self._state(request, payload)
        vr = self._vring(request, s.index)
        if s.num not in (0, 1):
            raise FrontendError(f"{self.name}: SET_VRING_ENABLE ring {s.index} num={s.num}")
        vr.enabled = bool(s.num)
        if vr.enabled:
            self.kick(s.index, drain=False)  # serve what arrived while disabled
        return None

    def _start(self, vr: _Vring) -> None:
        """SET_VRING_KICK: the ring starts (vhost-user.rst, "Ring states")."""
        if vr.size is None or vr.addr is None or self.memory is None:
            raise FrontendError(
                f"{self.name}: SET_VRING_KICK ring {vr.index} before its size, addresses"
                " and the memory table"
            )
        if vr.queue is not None:  # a new kick fd for a running ring
            return
        self._build_queue(vr, vr.base)
        vr.started = True
        areas = vr.gpas
        log.info(
            "%s: ring %d started (size %d, avail %d%s)",
            self.name, vr.index, vr.size, vr.base.next_avail,
            "".join(f", {k} {v:#x}" for k, v in zip(("desc", "avail", "used"), areas, strict=False)),
        )  # fmt: skip

    def _build_queue(self, vr: _Vring, state: QueueState) -> None:
        assert vr.size is not None
        assert vr.addr is not None
        assert self.memory is not None
        n = vr.size
        areas = []
        gpas: list[int] = []  # the rings' guest addresses, logged (what an inspector needs)
        for what, uva, length in (
            ("descriptor table", vr.addr.descriptor, 16 * n),
            ("available ring", vr.addr.available, 4 if self.packed else avail_ring(n).sizeof()),
            ("used ring", vr.addr.used, 4 if self.packed else used_ring(n).sizeof()),
        ):
            gpa = self.uva_to_gpa(uva, length)
            dr = (
                None
                if gpa is None
                else self.memory.translate(DriverRange.from_addr_len(gpa, length))
            )
            if dr is None or gpa is None:
                raise FrontendError(
                    f"{self.name}: ring {vr.index}: {what} at {uva:#x}+{length:#x} is not in"
                    " the memory table"
                )
            areas.append(dr)
            gpas.append(gpa)
        if vr.notify is None:
            vr.notify = EventfdNotify(vr.call_fd)
        try:
            vr.queue = create_queue(
                QueueMemory(areas[0], areas[1], areas[2]),
                n,
                self.memory,
                features=self.acked_features,
                notify=vr.notify,
                state=state,
                index=vr.index,
            )
        except VirtioError as exc:
            raise FrontendError(f"{self.name}: ring {vr.index}: {exc}") from None
        vr.broken_logged = False
        vr.gpas = tuple(gpas)
        self.device.started(vr.index, vr.queue)

    def _stop(self, vr: _Vring) -> None:
        was = vr.started
        vr.queue = None
        vr.started = False
        self._close_kick(vr)
        if was:
            log.info("%s: ring %d stopped", self.name, vr.index)
            self.device.stopped(vr.index)

    def _close_kick(self, vr: _Vring) -> None:
        if vr.kick_fd is not None:
            if self._unwatch is not None:
                self._unwatch(vr.kick_fd)
            _close(vr.kick_fd)
            vr.kick_fd = None

    def _stop_all(self) -> None:
        for vr in self.vrings:
            self._stop(vr)

    def _suspend_queues(self) -> list[tuple[_Vring, QueueState]]:
        """Take the running queues off the old memory; the device drops them (``stopped``)."""
        running = [(vr, vr.queue.state()) for vr in self.vrings if vr.queue is not None]
        for vr, _ in running:
            vr.queue = None
            self.device.stopped(vr.index)
        return running

    def _resume_queues(self, running: list[tuple[_Vring, QueueState]]) -> None:
        for vr, state in running:
            self._build_queue(vr, state)

    # --- config --------------------------------------------------------------------------------

    def _config_hdr(self, request: int, payload: bytes) -> ConfigHdrRec:
        if len(payload) < CONFIG_HDR.size:
            raise FrontendError(f"{self.name}: {_name(request)} payload of {len(payload)} bytes")
        c = CONFIG_HDR.unpack_from(payload)
        if c.size > MAX_CONFIG_SIZE or c.offset + c.size > MAX_CONFIG_SIZE:
            raise FrontendError(
                f"{self.name}: {_name(request)} offset={c.offset} size={c.size} exceeds"
                f" {MAX_CONFIG_SIZE}"
            )
        _expect_size(request, payload, CONFIG_HDR.size + c.size)
        return c

    def _get_config(self, request: int, payload: bytes, fds: list[int]) -> bytes:
        if not self.protocol_features & ProtocolFeature.CONFIG:
            raise FrontendError(f"{self.name}: GET_CONFIG without the CONFIG protocol feature")
        c = self._config_hdr(request, payload)
        space = self.device.config()
        data = space[c.offset : c.offset + c.size].ljust(c.size, b"\0")
        return _reply(request, CONFIG_HDR.pack(c) + data)

    def _set_config(self, request: int, payload: bytes, fds: list[int]) -> None:
        if not self.protocol_features & ProtocolFeature.CONFIG:
            raise FrontendError(f"{self.name}: SET_CONFIG without the CONFIG protocol feature")
        c = self._config_hdr(request, payload)
        self.device.set_config(c.offset, payload[CONFIG_HDR.size :])
        return None

    # --- kicks ---------------------------------------------------------------------------------

    def kick_fds(self) -> dict[int, int]:
        """``{kick fd: ring index}`` of the started rings (the server polls these)."""
        return {vr.kick_fd: vr.index for vr in self.vrings if vr.kick_fd is not None and vr.started}

    def kick(self, index: int, *, drain: bool = True) -> None:
        """Ring ``index`` was kicked: read the eventfd (``drain``) and let the device serve the
        queue if the ring is started and enabled. Driver errors are logged, never raised."""
        vr = self.vrings[index]
        if drain and vr.kick_fd is not None:
            with contextlib.suppress(BlockingIOError):
                os.read(vr.kick_fd, 8)
        queue = vr.queue
        if queue is None or not vr.enabled:
            return
        try:
            with queue.batch():  # one used-index update and at most one call per kick
                self.device.handle(index, queue)
        except QueueBroken as exc:
            if not vr.broken_logged:
                log.error("%s: %s", self.name, exc)
                vr.broken_logged = True
        except DriverError as exc:
            log.warning("%s: ring %d: %s", self.name, index, exc)

    def poll(self) -> None:
        """The device's periodic poll (for devices that produce without being kicked)."""
        try:
            self.device.poll()
        except DriverError as exc:
            log.warning("%s: poll: %s", self.name, exc)

    # --- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every ring, close every fd, unmap the memory."""
        for vr in self.vrings:
            self._stop(vr)
            _close(vr.call_fd)
            _close(vr.err_fd)
            vr.call_fd = vr.err_fd = None
            vr.notify = None
        self._release_memory()


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def _reply(request: int, payload: bytes) -> bytes:
    flags = 1 | HeaderFlags.REPLY
    return HEADER.pack(HeaderRec(request, int(flags), len(payload))) + payload


def _expect_size(request: int, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise FrontendError(f"{_name(request)}: payload of {len(payload)} bytes, expected {size}")


def _u64(request: int, payload: bytes) -> int:
    _expect_size(request, payload, U64.size)
    return U64.unpack(payload).u64


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        _close(fd)
    fds.clear()


def _unmap(regions: list[_Region]) -> None:
    for r in regions:
        r.view.release()
        try:
            r.mm.close()
        except BufferError as exc:
            log.error("guest memory region at %#x still exported: %s", r.gpa, exc)
