"""The vhost-user protocol core for one front-end connection. It does no I/O.

Theory of operation. In the manner of h11, :class:`Backend` is a state machine that the server
feeds and drains; it never touches a socket, a file descriptor or a mapping itself:

* :meth:`Backend.handle` takes one decoded message: request, flags, payload and the file
  descriptors that came with it, each already classified by the server (:class:`Fd`). It validates
  the whole message before acting, updates the connection's state (features, the memory table, each
  ring's size, addresses, base, fds and :mod:`~virtio_schema.vhost_user.rings` state), builds a
  :class:`~virtio_schema.queue.Queue` from a :class:`~virtio_schema.queue.QueueState` when a ring
  starts, and returns the reply bytes (or ``None``).
* Memory is mapped, and fds are closed, through the :class:`Host` the server passes in: the one
  door to the operating system, which a test replaces with buffers and counters.
* The server asks what to do next: which fds to watch for kicks (:meth:`~Backend.kick_fds`),
  which rings to poll (:meth:`~Backend.polled_rings`), which call fds to signal
  (:meth:`~Backend.take_calls`), which rings want a turn now (:meth:`~Backend.take_wakeups`);
  and it gives each ring its turns (:meth:`~Backend.serve`).

Rules of this module:

1. The front-end is a peer, not a friend: every size, count, index, address, flag and fd is
   checked. A malformed message raises :class:`FrontendError` (the server closes the connection).
   A well-formed request the back-end does not honour raises :class:`RequestRefused`, which
   changes nothing: with REPLY_ACK and NEED_REPLY it is answered with a non-zero ack and the
   connection goes on; otherwise it ends the connection like any other error (the front-end would
   go on believing it succeeded).
2. Every fd received is either kept (and closed through the host on teardown) or closed through
   the host before :meth:`~Backend.handle` returns, whatever happens.
3. Ring states change only through :data:`~virtio_schema.vhost_user.rings.TRANSITIONS`; the device
   hears every change through its hooks (``started``, ``enabled``, ``disabled``, ``stopped``), and
   its ``handle`` runs only for a started and enabled ring. A queue that is not enabled hands out
   no chain (its budget is 0), even to a device that kept it.
4. A turn serves one ring with a budget of chains (the queue size by default) inside one batch:
   one used-index update and at most one notification per turn. While the server busy-polls a
   ring (:meth:`~Backend.pause_kicks`, :meth:`~Backend.resume_kicks`) the driver is asked not to
   kick it; giving it back to kicks re-checks the ring.
5. A new SET_MEM_TABLE takes the running queues off the old mapping before releasing it; they are
   rebuilt on the new memory at the position they had reached.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from virtio_schema.errors import DeviceUsageError, DriverError, VirtioError
from virtio_schema.mem import DriverRange, GuestMemory, MemoryRegion
from virtio_schema.queue import (
    Queue,
    QueueBroken,
    QueueMemory,
    QueueState,
    VirtQueue,
    create_queue,
)
from virtio_schema.schema import (
    Feature,
    avail_ring,
    check_packed_queue_size,
    check_split_queue_size,
    used_ring,
)
from virtio_schema.vhost_user.device import OFFERED_PROTOCOL_FEATURES, VhostUserDevice
from virtio_schema.vhost_user.dirty_log import DirtyLog
from virtio_schema.vhost_user.errors import FrontendError, RequestRefused
from virtio_schema.vhost_user.inflight import (
    INFLIGHT,
    InflightRec,
    PackedInflight,
    SplitInflight,
    check_region,
    queue_region_size,
    region_size,
)
from virtio_schema.vhost_user.messages import (
    CONFIG_HDR,
    HEADER,
    LOG_DESCRIPTION,
    MAX_FDS,
    MEM_REGION,
    MEMORY_HDR,
    NOFD,
    OWN_REPLIES,
    SINGLE_MEM_REGION,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_STATE,
    BackendRequest,
    ConfigHdrRec,
    HeaderFlags,
    HeaderRec,
    MemoryRegionRec,
    ProtocolFeature,
    Request,
    U64Rec,
    VringAddrRec,
    VringStateRec,
)
from virtio_schema.vhost_user.rings import RingEvent, RingState, hooks, transition

__all__ = [
    "DPDK_PACKED_BASE",
    "LOG_ALL",
    "MAX_MEM_SLOTS",
    "OFFERED_PROTOCOL_FEATURES",
    "Backend",
    "Fd",
    "FdKind",
    "Host",
    "Mapping",
    "MemoryRefused",
    "Turn",
    "check_budget",
    "decode_vring_base",
    "encode_vring_base",
]

log = logging.getLogger(__name__)

LOG_ALL = 1 << 26
"""``VHOST_F_LOG_ALL``: the one feature bit a front-end may change while rings run (QEMU toggles it
for migration)."""

# (REM_MEM_REG carries none, but a stray one is closed, as vhost-user.rst asks)
_FD_REQUESTS = {Request.SET_MEM_TABLE, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                Request.SET_VRING_ERR, Request.SET_BACKEND_REQ_FD, Request.ADD_MEM_REG,
                Request.REM_MEM_REG, Request.SET_INFLIGHT_FD, Request.SET_LOG_BASE,
                Request.SET_LOG_FD}  # fmt: skip
_KNOWN_FLAGS = int(HeaderFlags.VERSION_MASK | HeaderFlags.NEED_REPLY)  # int: ~ flips every bit
_CONFIG_FRONTEND, _CONFIG_MIGRATION = 0, 1  # SET_CONFIG flags (vhost-user.rst, config space)


MAX_MEM_SLOTS = 32
"""Memory regions a front-end may have at once when it adds them one at a time
(CONFIGURE_MEM_SLOTS; GET_MAX_MEM_SLOTS answers it; libvhost-user's figure too)."""

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


class MemoryRefused(Exception):
    """Raised by :meth:`Host.map` when a memory region cannot be used (the reason is the
    message); the back-end refuses the memory table."""


# --- what the server gives the core ----------------------------------------------------------------


class FdKind(enum.Enum):
    """What a received file descriptor is (the server looks with ``fstat``)."""

    EVENTFD = "an eventfd"
    PIPE = "a pipe"
    FILE = "a file"
    """A regular file or a memfd: something guest memory can be mapped from."""
    SOCKET = "a socket"
    OTHER = "something else"


@dataclass(frozen=True)
class Fd:
    """A file descriptor that came with a message, and what it is."""

    num: int
    kind: FdKind


class Mapping(Protocol):
    """One mapped region of guest memory, as :meth:`Host.map` returns it."""

    @property
    def view(self) -> memoryview:
        """The region's bytes (writable)."""
        ...

    def close(self) -> None:
        """Release the view and unmap (views derived from it must be gone)."""
        ...


class Host(Protocol):
    """The operating system, as the core sees it: the server's implementation maps with ``mmap``
    (after checking and sealing the file) and closes with ``os.close``."""

    def map(self, fd: Fd, offset: int, size: int) -> Mapping:
        """Map ``size`` bytes of ``fd`` from ``offset``, shared and writable. Raises
        :class:`MemoryRefused`. The caller closes ``fd`` afterwards either way."""
        ...

    def close(self, fd: int) -> None:
        """Close ``fd`` (a descriptor the core owns)."""
        ...

    def create_shared(self, size: int) -> tuple[int, Mapping]:
        """A new zero-filled shared memory file of ``size`` bytes, sealed against resizing, and
        its mapping: the fd (the core's, to send and close) and the mapping. Raises
        :class:`MemoryRefused`."""
        ...


class Turn(NamedTuple):
    """What one call of :meth:`Backend.serve` (or :meth:`Backend.poll`) did."""

    taken: int
    """Chains the served ring handed out."""
    again: tuple[int, ...]
    """Enabled rings whose budget is spent: work may remain, give them another turn."""


def check_budget(budget: int | None) -> None:
    """Refuse a turn budget below one chain (``None``: the queue size)."""
    if budget is not None and budget < 1:
        raise DeviceUsageError(f"budget {budget} < 1")


class _CallNotify:
    """The queues' :class:`~virtio_schema.queue.DriverNotify`: remembers that the driver is owed a
    notification; the server signals the call fd after the turn (:meth:`Backend.take_calls`)."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = False

    def notify(self) -> None:
        self.pending = True


@dataclass
class _Region:
    gpa: int
    size: int
    uva: int
    mapping: Mapping
    region: MemoryRegion | None = None  # its part of the GuestMemory

    def same(self, rec: MemoryRegionRec) -> bool:
        """Whether ``rec`` names this region (vhost-user.rst: by guest address, user address
        and size; the mmap offset is not compared)."""
        return (self.gpa, self.uva, self.size) == (
            rec.guest_phys_addr, rec.userspace_addr, rec.memory_size
        )  # fmt: skip


@dataclass
class _Vring:
    index: int
    size: int | None = None
    addr: VringAddrRec | None = None
    base: QueueState = field(default_factory=QueueState)
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    state: RingState = RingState.STOPPED
    polled: bool = False  # started with NOFD: no kick fd, the server polls the ring
    queue: VirtQueue | None = None
    notify: _CallNotify = field(default_factory=_CallNotify)
    broken_logged: bool = False
    gpas: tuple[int, ...] = ()  # guest addresses of the three ring areas
    inflight: SplitInflight | PackedInflight | None = None  # its part of the inflight region


@dataclass
class _InflightRegion:
    """The inflight region (GET/SET_INFLIGHT_FD) and its geometry."""

    mapping: Mapping
    num_queues: int
    queue_size: int
    packed: bool


_Handler = Callable[[int, bytes, list[Fd]], bytes | None]


class Backend:
    """One vhost-user connection's state (see the module's theory of operation).

    ``host`` maps memory and closes fds for it; ``budget`` caps the chains one turn of a ring
    hands out (default and maximum: the queue size).
    """

    def __init__(
        self,
        device: VhostUserDevice,
        *,
        host: Host,
        name: str = "vhost-user",
        budget: int | None = None,
    ) -> None:
        check_budget(budget)
        self.device = device
        self.host = host
        self.name = name
        self.budget = budget
        self.acked_features = 0
        self.protocol_features = 0
        self.owner = False
        self.status = 0
        """The virtio device status byte the front-end last set (SET_STATUS; 0 until then)."""
        self.backend_req_fd: int | None = None
        """The back-end request channel (SET_BACKEND_REQ_FD), a socket the server writes
        :meth:`take_backend_messages` to."""
        self._backend_out = bytearray()
        self._config_change_pending = False
        device.config_notifier = self.config_changed
        self._reply_fds: list[int] = []
        self._inflight: _InflightRegion | None = None
        self.dirty_log: DirtyLog | None = None
        """The live-migration log (SET_LOG_BASE); the queues mark it while LOG_ALL is acked."""
        self._log_mapping: Mapping | None = None
        self.log_fd: int | None = None  # SET_LOG_FD: signalled after a turn that logged
        self._log_marks = 0
        self.memory: GuestMemory | None = None
        self.refusals: list[str] = []
        """Requests answered with a non-zero ack (newest last): the connection went on."""
        self._regions: list[_Region] = []
        self._retired: list[Mapping] = []  # removed regions still in use: unmapped when free
        self._wakeups: set[int] = set()
        self.vrings = [_Vring(i) for i in range(device.num_queues)]
        self._handlers: dict[int, _Handler] = {
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
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
            Request.RESET_DEVICE: self._reset_device,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
        }

    # --- the message entry point ---------------------------------------------------------------

    def handle(self, request: int, flags: int, payload: bytes, fds: Sequence[Fd]) -> bytes | None:
        """Act on one message; returns the reply to send, if any. Takes ownership of ``fds``.

        Raises :class:`FrontendError` for anything malformed or unexpected, and
        :class:`RequestRefused` for a refused request the front-end did not ask an ack for; the
        caller closes the connection.
        """
        left = list(fds)  # handlers remove the fds they keep
        if self._retired:
            self._unmap_retired()
        # whether to ack is decided by the protocol features in force when the message arrives
        # (a SET_PROTOCOL_FEATURES that turns REPLY_ACK on or off does not change its own answer)
        acks = bool(
            flags & HeaderFlags.NEED_REPLY and self.protocol_features & ProtocolFeature.REPLY_ACK
        )
        try:
            self._check_header(request, flags, left)
            try:
                handler = self._handlers.get(request)
                if handler is None:
                    raise RequestRefused(f"{self.name}: unexpected request {_name(request)}")
                reply = handler(request, payload, left)
            except RequestRefused as exc:
                if not acks or request in OWN_REPLIES:  # an ack is not their reply
                    raise
                log.warning("%s: refused: %s", self.name, exc)
                self.refusals.append(str(exc))
                return _reply(request, U64.pack(U64Rec(1)))
        finally:
            for fd in left:
                self.host.close(fd.num)
        self._send_config_change()  # a ring may have started
        if reply is not None:
            return reply
        return _reply(request, U64.pack(U64Rec(0))) if acks else None

    def _check_header(self, request: int, flags: int, fds: list[Fd]) -> None:
        if flags & HeaderFlags.VERSION_MASK != 1:
            raise FrontendError(f"{self.name}: protocol version {flags & 3}, expected 1")
        if flags & HeaderFlags.REPLY:
            raise FrontendError(f"{self.name}: {_name(request)} has the REPLY flag of a reply")
        if flags & ~_KNOWN_FLAGS:
            raise FrontendError(f"{self.name}: {_name(request)} has reserved flags {flags:#x}")
        if len(fds) > MAX_FDS:
            raise FrontendError(f"{self.name}: {len(fds)} fds with one message")
        if fds and request not in _FD_REQUESTS:
            raise FrontendError(f"{self.name}: request {request} does not carry fds")

    # --- negotiation ---------------------------------------------------------------------------

    def offered_protocol_features(self) -> int:
        """What this back-end implements, less what the device opts out of."""
        return OFFERED_PROTOCOL_FEATURES & int(self.device.protocol_features())

    def offered_features(self) -> int:
        """The device's features, PROTOCOL_FEATURES, and LOG_ALL where the dirty log is offered
        (LOG_SHMFD: QEMU refuses to migrate a device without both)."""
        logs = self.offered_protocol_features() & ProtocolFeature.LOG_SHMFD
        return (
            int(self.device.device_features())
            | int(Feature.PROTOCOL_FEATURES)
            | (LOG_ALL if logs else 0)
        )

    def _get_features(self, request: int, payload: bytes, fds: list[Fd]) -> bytes:
        _expect_size(request, payload, 0)
        return _reply(request, U64.pack(U64Rec(self.offered_features())))

    def _set_features(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        value = _u64(request, payload)
        extra = value & ~self.offered_features()
        if extra:
            raise RequestRefused(f"{self.name}: SET_FEATURES acks unoffered bits {extra:#x}")
        changed = (value ^ self.acked_features) & ~LOG_ALL
        running = [vr.index for vr in self.vrings if vr.state.started]
        if changed and running:
            raise RequestRefused(
                f"{self.name}: SET_FEATURES changes bits {changed:#x} while ring(s)"
                f" {running} run (only VHOST_F_LOG_ALL may change)"
            )
        logging_changed = (value ^ self.acked_features) & LOG_ALL
        self.acked_features = value
        log.info("%s: features acked %#x", self.name, value)
        if logging_changed:
            log.info("%s: dirty logging %s", self.name, "on" if value & LOG_ALL else "off")
            self._apply_dirty_log()
        if not value & Feature.PROTOCOL_FEATURES:
            for vr in self.vrings:  # without protocol features, rings are enabled
                self._apply(vr, RingEvent.ENABLE)
        return None

    def _set_owner(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        _expect_size(request, payload, 0)
        self.owner = True
        return None

    def _reset_owner(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        _expect_size(request, payload, 0)
        for vr in self.vrings:
            self._stop(vr)
        self.owner = False
        return None

    def _reset_device(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        """RESET_DEVICE (VHOST_USER_PROTOCOL_F_RESET_DEVICE): every ring stops and forgets its
        setup, the features and status go back to 0, the memory and the inflight region are
        released and the device resets its own state; ownership, protocol features, the
        back-end channel and the dirty log stay. (QEMU
        7.2 sends it only for vhost-user-scsi; a blk reset comes as stops and a new start.)"""
        self._need_protocol(request, ProtocolFeature.RESET_DEVICE)
        _expect_size(request, payload, 0)
        for vr in self.vrings:
            self._stop(vr)
            self._close(vr.call_fd)
            self._close(vr.err_fd)
        self.vrings = [_Vring(i) for i in range(len(self.vrings))]
        self._release_memory()
        self._install_inflight(None)  # what was in flight belonged to the driver before the reset
        self.acked_features = 0
        self.status = 0
        self._config_change_pending = False
        log.info("%s: device reset", self.name)
        self.device.reset()
        return None

    def _set_backend_req_fd(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        """The back-end request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): one end of a
        stream socket pair; a new one replaces the old (what was queued for it is dropped)."""
        self._need_protocol(request, ProtocolFeature.BACKEND_REQ)
        _expect_size(request, payload, 0)
        if len(fds) != 1 or fds[0].kind is not FdKind.SOCKET:
            what = f"{len(fds)} fds" if len(fds) != 1 else f"fd {fds[0].num} is {fds[0].kind.value}"
            raise FrontendError(f"{self.name}: SET_BACKEND_REQ_FD: {what}, not one socket")
        self._close(self.backend_req_fd)
        self.backend_req_fd = fds.pop().num
        self._backend_out.clear()
        return None

    def config_changed(self) -> None:
        """The device's configuration space changed: notify the front-end (CONFIG_CHANGE_MSG on
        the back-end channel) once a ring has started; QEMU 7.2 drops the notification of a
        device that has not (and reads the space only at start-up otherwise)."""
        self._config_change_pending = True
        self._send_config_change()

    def _send_config_change(self) -> None:
        if not (
            self._config_change_pending
            and self.backend_req_fd is not None
            and any(vr.state.started for vr in self.vrings)
        ):
            return
        self._config_change_pending = False
        # no NEED_REPLY: QEMU answers it only after a GET_CONFIG of its own on the main socket,
        # and the server never waits for a front-end (vhost-user.rst, back-end communication)
        header = HeaderRec(BackendRequest.CONFIG_CHANGE_MSG, VERSION, 0)
        self._backend_out += HEADER.pack(header)
        log.info("%s: configuration change sent to the front-end", self.name)

    def take_backend_messages(self) -> bytes:
        """Bytes the server must write to the back-end channel (``b""`` if none)."""
        out = bytes(self._backend_out)
        self._backend_out.clear()
        return out

    def backend_channel_failed(self, reason: str) -> None:
        """The back-end channel cannot be used any more (closed by the front-end, full): it is
        closed; the connection goes on without it."""
        log.warning("%s: back-end channel: %s; closed", self.name, reason)
        self._close(self.backend_req_fd)
        self.backend_req_fd = None
        self._backend_out.clear()

    def _get_protocol_features(self, request: int, payload: bytes, fds: list[Fd]) -> bytes:
        _expect_size(request, payload, 0)
        return _reply(request, U64.pack(U64Rec(self.offered_protocol_features())))

    def _set_protocol_features(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        value = _u64(request, payload)
        extra = value & ~self.offered_protocol_features()
        if extra:
            raise RequestRefused(f"{self.name}: SET_PROTOCOL_FEATURES acks unoffered {extra:#x}")
        self.protocol_features = value
        return None

    def _get_queue_num(self, request: int, payload: bytes, fds: list[Fd]) -> bytes:
        _expect_size(request, payload, 0)
        return _reply(request, U64.pack(U64Rec(self.device.num_queues)))

    def _set_status(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        """Record the device status (VHOST_USER_PROTOCOL_F_STATUS). Nothing else changes: QEMU
        7.2 sends status 0 when it stops the device *before* GET_VRING_BASE, whose answer must
        still be the rings' positions, so a reset of the rings is left to the ring messages."""
        self._need_protocol(request, ProtocolFeature.STATUS)
        value = _u64(request, payload)
        if value > 0xFF:
            raise FrontendError(f"{self.name}: SET_STATUS {value:#x} is not a status byte")
        if value != self.status:
            log.info("%s: device status %#04x", self.name, value)
        self.status = value
        return None

    def _get_status(self, request: int, payload: bytes, fds: list[Fd]) -> bytes:
        self._need_protocol(request, ProtocolFeature.STATUS)
        _expect_size(request, payload, 0)
        return _reply(request, U64.pack(U64Rec(self.status)))

    def _need_protocol(self, request: int, feature: ProtocolFeature) -> None:
        """``request`` belongs to protocol ``feature``: a front-end that did not negotiate it
        does not speak the protocol we agreed on (the connection ends)."""
        if not self.protocol_features & feature:
            raise FrontendError(
                f"{self.name}: {_name(request)} without the {feature.name} protocol feature"
            )

    # --- memory --------------------------------------------------------------------------------

    def _set_mem_table(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        if len(payload) < MEMORY_HDR.size:
            raise FrontendError(
                f"{self.name}: SET_MEM_TABLE payload of {len(payload)} bytes, expected at least"
                f" {MEMORY_HDR.size}"
            )
        (n,) = MEMORY_HDR.unpack_from(payload)
        if not 1 <= n <= MAX_FDS:
            raise FrontendError(f"{self.name}: SET_MEM_TABLE with {n} regions (1..{MAX_FDS})")
        _expect_size(request, payload, MEMORY_HDR.size + n * MEM_REGION.size)
        if len(fds) != n:
            raise FrontendError(f"{self.name}: SET_MEM_TABLE: {n} regions but {len(fds)} fds")
        records = [
            MEM_REGION.unpack_from(payload, MEMORY_HDR.size + k * MEM_REGION.size) for k in range(n)
        ]
        for k, (rec, fd) in enumerate(zip(records, fds, strict=True)):
            self._check_region(k, rec.guest_phys_addr, rec.memory_size, rec.userspace_addr,
                               rec.mmap_offset, fd)  # fmt: skip
        for a in records:
            for b in records:
                if (
                    a is not b
                    and a.userspace_addr < b.userspace_addr + b.memory_size
                    and (b.userspace_addr < a.userspace_addr + a.memory_size)
                ):
                    raise FrontendError(f"{self.name}: SET_MEM_TABLE: user ranges overlap")
        regions: list[_Region] = []
        try:
            for k, (rec, fd) in enumerate(zip(records, fds, strict=True)):
                try:
                    mapping = self.host.map(fd, rec.mmap_offset, rec.memory_size)
                except MemoryRefused as exc:
                    raise RequestRefused(f"{self.name}: region {k}: {exc}") from None
                regions.append(
                    _Region(rec.guest_phys_addr, rec.memory_size, rec.userspace_addr, mapping)
                )
            try:
                memory = GuestMemory([(r.gpa, r.mapping.view) for r in regions])
            except VirtioError as exc:
                raise FrontendError(f"{self.name}: SET_MEM_TABLE: {exc}") from None
        except BaseException:
            _unmap(regions)
            raise
        for r in regions:
            r.region = next(m for m in memory.regions if m.start == r.gpa)
        running = self._suspend_queues()
        self._release_memory()
        self.memory = memory
        self._regions = regions
        self._resume_queues(running)
        return None  # the fds are closed by handle: the mappings keep what they need

    def _check_region(self, k: int, gpa: int, size: int, uva: int, offset: int, fd: Fd) -> None:
        if size == 0 or gpa + size > 1 << 64 or uva + size > 1 << 64 or offset + size > 1 << 63:
            raise FrontendError(
                f"{self.name}: region {k}: gpa={gpa:#x} size={size:#x} uva={uva:#x}"
                f" offset={offset:#x} is not a valid range"
            )
        if fd.kind is not FdKind.FILE:
            raise FrontendError(
                f"{self.name}: region {k}: fd {fd.num} is {fd.kind.value}, not a file"
            )

    def _get_max_mem_slots(self, request: int, payload: bytes, fds: list[Fd]) -> bytes:
        self._need_protocol(request, ProtocolFeature.CONFIGURE_MEM_SLOTS)
        _expect_size(request, payload, 0)
        return _reply(request, U64.pack(U64Rec(MAX_MEM_SLOTS)))

    def _one_region(self, request: int, payload: bytes) -> MemoryRegionRec:
        self._need_protocol(request, ProtocolFeature.CONFIGURE_MEM_SLOTS)
        _expect_size(request, payload, SINGLE_MEM_REGION.size)
        return SINGLE_MEM_REGION.unpack(payload)

    def _add_mem_reg(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        """ADD_MEM_REG (CONFIGURE_MEM_SLOTS): one region more, while the rings run on the
        others. The same region again is accepted and ignored (QEMU 7.2 sends each one once per
        queue pair of a multi-queue vhost-user-net device)."""
        rec = self._one_region(request, payload)
        if len(fds) != 1:
            raise FrontendError(f"{self.name}: ADD_MEM_REG with {len(fds)} fds, expected 1")
        gpa, size, uva = rec.guest_phys_addr, rec.memory_size, rec.userspace_addr
        self._check_region(len(self._regions), gpa, size, uva, rec.mmap_offset, fds[0])
        if any(r.same(rec) for r in self._regions):
            log.info("%s: memory region at %#x added again: ignored", self.name, gpa)
            return None
        for r in self._regions:
            if uva < r.uva + r.size and r.uva < uva + size:
                raise FrontendError(
                    f"{self.name}: ADD_MEM_REG: user range {uva:#x}+{size:#x} overlaps the"
                    f" region at {r.uva:#x}+{r.size:#x}"
                )
        if len(self._regions) >= MAX_MEM_SLOTS:
            raise RequestRefused(f"{self.name}: ADD_MEM_REG: all {MAX_MEM_SLOTS} slots in use")
        try:
            mapping = self.host.map(fds[0], rec.mmap_offset, size)
        except MemoryRefused as exc:
            raise RequestRefused(f"{self.name}: ADD_MEM_REG at {gpa:#x}: {exc}") from None
        try:
            if self.memory is None:
                self.memory = GuestMemory()
            region = self.memory.add_region(gpa, mapping.view)
        except BaseException as exc:
            mapping.close()
            if isinstance(exc, VirtioError):
                raise FrontendError(f"{self.name}: ADD_MEM_REG: {exc}") from None
            raise
        self._regions.append(_Region(gpa, size, uva, mapping, region))
        log.info("%s: memory region added: gpa %#x size %#x", self.name, gpa, size)
        return None

    def _rem_mem_reg(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        """REM_MEM_REG (CONFIGURE_MEM_SLOTS): the region leaves the table at once (a chain
        still holding buffers there gets a driver error when it reaches them, and is returned
        as any other); its mapping is unmapped as soon as no view of it is in use. A ring
        whose areas were in it stops."""
        rec = self._one_region(request, payload)
        found = [r for r in self._regions if r.same(rec)]
        if not found:
            raise RequestRefused(
                f"{self.name}: REM_MEM_REG: no region at gpa {rec.guest_phys_addr:#x} user"
                f" {rec.userspace_addr:#x} size {rec.memory_size:#x}"
            )
        for r in found:
            for vr in self.vrings:
                if vr.queue is not None and any(r.gpa <= g < r.gpa + r.size for g in vr.gpas):
                    log.error("%s: ring %d lost its memory; the ring stops", self.name, vr.index)
                    self._stop(vr)
            self._regions.remove(r)
            assert self.memory is not None
            assert r.region is not None
            self.memory.remove_region(r.region)
            self._retired.append(r.mapping)
            log.info("%s: memory region removed: gpa %#x size %#x", self.name, r.gpa, r.size)
        self._unmap_retired()
        return None

    def _unmap_retired(self) -> None:
        """Unmap the removed regions nobody uses any more (a view of one kept by the device,
        or a copy on another thread, keeps it mapped until it is released)."""
        busy = []
        for mapping in self._retired:
            try:
                mapping.close()
            except BufferError:
                busy.append(mapping)
        if busy and len(busy) != len(self._retired):
            log.info("%s: %d removed regions still in use", self.name, len(busy))
        self._retired = busy

    def _release_memory(self) -> None:
        if self.memory is not None:
            try:
                self.memory.close()
            except VirtioError as exc:  # the device kept a view: leave that mapping to the GC
                log.error("%s: old guest memory still in use: %s", self.name, exc)
            self.memory = None
        _unmap(self._regions)
        self._regions = []
        self._unmap_retired()  # the memory released its views of them too
        for r in self._retired:
            log.error("%s: removed memory region still exported: %r", self.name, r)
        self._retired = []

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

    def _set_vring_num(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        s = self._state(request, payload)
        vr = self._vring(request, s.index)
        try:
            if self.packed:
                check_packed_queue_size(s.num)
            else:
                check_split_queue_size(s.num)
        except VirtioError as exc:
            raise FrontendError(f"{self.name}: SET_VRING_NUM ring {s.index}: {exc}") from None
        if vr.state.started:
            raise RequestRefused(f"{self.name}: SET_VRING_NUM on running ring {s.index}")
        vr.size = s.num
        return None

    def _set_vring_addr(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        _expect_size(request, payload, VRING_ADDR.size)
        a = VRING_ADDR.unpack(payload)
        vr = self._vring(request, a.index)
        if a.flags & ~VRING_F_LOG:
            raise FrontendError(f"{self.name}: SET_VRING_ADDR ring {a.index} flags {a.flags:#x}")
        if vr.queue is None:
            vr.addr = a
            return None
        old = vr.addr
        if old is not None and (old.descriptor, old.available, old.used) == (
            a.descriptor, a.available, a.used
        ):  # fmt: skip
            vr.addr = a  # only the log address or flag (migration starts or ends): no rebuild
            self._apply_dirty_log()
            return None
        # moved while running: rebuild at the same place, or keep the old one if it does not fit
        old, state = vr.addr, vr.queue.state()
        self._leave(vr)
        vr.addr = a
        try:
            self._build_queue(vr, state)
        except FrontendError:
            vr.addr = old
            self._build_queue(vr, state)
            raise
        finally:
            self._enter(vr)
        return None

    def _set_vring_base(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        s = self._state(request, payload)
        vr = self._vring(request, s.index)
        if s.num > 0xFFFF and not self.packed:
            raise FrontendError(f"{self.name}: SET_VRING_BASE ring {s.index}: base {s.num}")
        if vr.state.started:
            raise RequestRefused(f"{self.name}: SET_VRING_BASE on running ring {s.index}")
        vr.base = self._decode_base(s.num)
        return None

    def _get_vring_base(self, request: int, payload: bytes, fds: list[Fd]) -> bytes:
        s = self._state(request, payload)
        vr = self._vring(request, s.index)
        # serve what the driver made available before it asked us to stop (one turn: at most a
        # ring's worth), so a stop loses no request the driver already handed over
        self.serve(s.index)
        self._stop(vr)
        return _reply(request, VRING_STATE.pack(VringStateRec(s.index, self._encode_base(vr.base))))

    def _set_vring_fd(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        value = _u64(request, payload)
        index, nofd = value & VRING_INDEX_MASK, bool(value & NOFD)
        if value & ~(VRING_INDEX_MASK | NOFD):
            raise FrontendError(f"{self.name}: {_name(request)} payload {value:#x}")
        vr = self._vring(request, index)
        if nofd != (not fds) or len(fds) > 1:
            raise FrontendError(
                f"{self.name}: {_name(request)} ring {index}: {len(fds)} fds, nofd={nofd}"
            )
        fd = fds[0].num if fds else None
        if fds and fds[0].kind not in (FdKind.EVENTFD, FdKind.PIPE):
            raise FrontendError(
                f"{self.name}: {_name(request)} ring {index}: fd {fds[0].num} is"
                f" {fds[0].kind.value}, not an eventfd or a pipe"
            )
        if request == Request.SET_VRING_KICK:
            self._start(vr)  # refuses before anything changes
            self._close_kick(vr)
            vr.kick_fd, vr.polled = fd, fd is None
        elif request == Request.SET_VRING_CALL:
            self._close(vr.call_fd)
            vr.call_fd = fd
        else:
            self._close(vr.err_fd)
            vr.err_fd = fd
        fds.clear()  # kept by the ring
        return None

    def _set_vring_enable(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        s = self._state(request, payload)
        vr = self._vring(request, s.index)
        if s.num not in (0, 1):
            raise FrontendError(f"{self.name}: SET_VRING_ENABLE ring {s.index} num={s.num}")
        if not s.num:
            # as for a stop: serve what the driver made available while the ring was enabled (a
            # kick read in the same round as this message would otherwise never get its turn)
            self.serve(s.index)
        self._apply(vr, RingEvent.ENABLE if s.num else RingEvent.DISABLE)
        return None

    def _start(self, vr: _Vring) -> None:
        """SET_VRING_KICK: the ring starts (vhost-user.rst, "Ring states")."""
        if vr.size is None or vr.addr is None or self.memory is None:
            raise FrontendError(
                f"{self.name}: SET_VRING_KICK ring {vr.index} before its size, addresses"
                " and the memory table"
            )
        if vr.queue is not None:  # a new kick fd (or polling) for a running ring
            return
        self._build_queue(vr, vr.base)
        try:
            self._recover(vr)
        except BaseException:
            self._untrack(vr)
            vr.queue = None
            raise
        log.info(
            "%s: ring %d started (size %d, avail %d%s)",
            self.name, vr.index, vr.size, vr.base.next_avail,
            "".join(f", {k} {v:#x}" for k, v in zip(("desc", "avail", "used"), vr.gpas, strict=False)),
        )  # fmt: skip
        self._apply(vr, RingEvent.START)

    def _build_queue(self, vr: _Vring, state: QueueState) -> None:
        """The ring's queue on the current memory at ``state``; raises :class:`RequestRefused`
        (nothing changed) if its areas are not in the memory table."""
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
                raise RequestRefused(
                    f"{self.name}: ring {vr.index}: {what} at {uva:#x}+{length:#x} is not in"
                    " the memory table"
                )
            areas.append(dr)
            gpas.append(gpa)
        try:
            queue = create_queue(
                QueueMemory(areas[0], areas[1], areas[2]),
                n,
                self.memory,
                features=self.acked_features,
                notify=vr.notify,
                state=state,
                index=vr.index,
            )
        except VirtioError as exc:
            raise RequestRefused(f"{self.name}: ring {vr.index}: {exc}") from None
        queue.set_budget(0)  # no chain until the ring is enabled (rule 3)
        # a rebuilt queue goes on recording in the same region
        tracker = vr.inflight
        if isinstance(queue, Queue):
            if isinstance(tracker, SplitInflight):
                queue.track_inflight(tracker)
        elif isinstance(tracker, PackedInflight):
            queue.track_inflight(tracker)
        vr.queue = queue
        vr.broken_logged = False
        vr.gpas = tuple(gpas)
        self._apply_dirty_log()

    def _apply(self, vr: _Vring, event: RingEvent) -> None:
        """Move ring ``vr`` by ``event`` (the table) and tell the device."""
        old, new = vr.state, transition(vr.state, event)
        vr.state = new
        if new is RingState.STARTED_ENABLED and old is not RingState.STARTED_ENABLED:
            self._wakeups.add(vr.index)  # serve what arrived before (no kick is owed for it)
        self._hooks(vr, hooks(old, new))

    def _hooks(self, vr: _Vring, names: tuple[str, ...]) -> None:
        queue = vr.queue
        for name in names:
            if name == "stopped":
                self.device.stopped(vr.index)
            elif name == "disabled":
                if queue is not None:
                    queue.set_budget(0)
                self.device.disabled(vr.index)
            else:
                assert queue is not None
                if name == "started":
                    self.device.started(vr.index, queue)
                else:
                    queue.set_budget(self._budget_of(queue))
                    self.device.enabled(vr.index, queue)

    def _leave(self, vr: _Vring) -> None:
        """The device lets go of the ring's queue (it is about to be replaced)."""
        self._hooks(vr, hooks(vr.state, RingState.STOPPED))
        vr.queue = None

    def _enter(self, vr: _Vring) -> None:
        """The device is handed the ring's (new) queue."""
        self._hooks(vr, hooks(RingState.STOPPED, vr.state))

    def _stop(self, vr: _Vring, *, let_go: bool = False) -> None:
        """The ring stops and keeps its position (GET_VRING_BASE reports it, a start resumes
        there). ``let_go``: the device let go of its queue already (no hooks)."""
        if vr.queue is not None:
            vr.base = vr.queue.state()
            vr.queue.log_rings()  # the last marks before the front-end's final pass
        if vr.state.started:
            log.info(
                "%s: ring %d stopped (avail %d, used %d)",
                self.name, vr.index, vr.base.next_avail, vr.base.next_used,
            )  # fmt: skip
        try:
            if let_go:
                vr.state = transition(vr.state, RingEvent.STOP)
            else:
                self._apply(vr, RingEvent.STOP)
        finally:  # a device hook that raised does not keep the ring's kick fd open
            self._untrack(vr)
            vr.queue = None
            vr.polled = False
            self._close_kick(vr)

    def _close_kick(self, vr: _Vring) -> None:
        self._close(vr.kick_fd)
        vr.kick_fd = None

    def _close(self, fd: int | None) -> None:
        if fd is not None:
            self.host.close(fd)

    def _suspend_queues(self) -> list[tuple[_Vring, QueueState]]:
        """Take the running queues off the old memory (the device lets go of them)."""
        running = [(vr, vr.queue.state()) for vr in self.vrings if vr.queue is not None]
        for vr, _ in running:
            self._leave(vr)
        return running

    def _resume_queues(self, running: list[tuple[_Vring, QueueState]]) -> None:
        for vr, state in running:
            try:
                self._build_queue(vr, state)
            except RequestRefused as exc:  # the new table lost the ring: it stops
                log.error("%s: %s; ring %d stopped", self.name, exc, vr.index)
                vr.base = state
                self._stop(vr, let_go=True)
                continue
            self._enter(vr)

    # --- the dirty log (live migration) ---------------------------------------------------------

    def _set_log_base(self, request: int, payload: bytes, fds: list[Fd]) -> bytes:
        """SET_LOG_BASE (LOG_SHMFD): the bitmap to mark, in the fd that comes with it. Always
        answered (QEMU waits for the reply whatever the flags). A log that does not cover the
        memory table is refused: a mark past its end would be lost."""
        self._need_protocol(request, ProtocolFeature.LOG_SHMFD)
        _expect_size(request, payload, LOG_DESCRIPTION.size)
        d = LOG_DESCRIPTION.unpack(payload)
        if len(fds) != 1 or fds[0].kind is not FdKind.FILE:
            what = f"{len(fds)} fds" if len(fds) != 1 else f"fd {fds[0].num} is {fds[0].kind.value}"
            raise FrontendError(f"{self.name}: SET_LOG_BASE: {what}, not one file")
        if d.mmap_size == 0 or d.mmap_size + d.mmap_offset > 1 << 63:
            raise FrontendError(
                f"{self.name}: SET_LOG_BASE size {d.mmap_size:#x} offset {d.mmap_offset:#x}"
            )
        try:
            mapping = self.host.map(fds[0], d.mmap_offset, d.mmap_size)
        except MemoryRefused as exc:
            raise RequestRefused(f"{self.name}: SET_LOG_BASE: {exc}") from None
        dirty = DirtyLog(mapping.view)
        end = max((r.gpa + r.size for r in self._regions), default=0)
        if not dirty.covers(end):
            dirty.release()
            _unmap_one(mapping)
            raise RequestRefused(
                f"{self.name}: SET_LOG_BASE: a log of {d.mmap_size} bytes covers"
                f" {dirty.pages} pages, the memory ends at {end:#x}"
            )
        old, old_mapping = self.dirty_log, self._log_mapping
        self.dirty_log, self._log_mapping = dirty, mapping  # the new one before the old goes
        self._apply_dirty_log()
        if old is not None and old_mapping is not None:
            old.release()
            _unmap_one(old_mapping)
        log.info("%s: dirty log of %d pages", self.name, dirty.pages)
        return _reply(request, U64.pack(U64Rec(0)))

    def _set_log_fd(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        """SET_LOG_FD: an eventfd signalled after a turn that logged (QEMU 7.2 sends none)."""
        self._need_protocol(request, ProtocolFeature.LOG_SHMFD)
        if len(payload) not in (0, U64.size):
            _expect_size(request, payload, 0)
        if len(fds) != 1 or fds[0].kind not in (FdKind.EVENTFD, FdKind.PIPE):
            raise FrontendError(f"{self.name}: SET_LOG_FD without one eventfd")
        self._close(self.log_fd)
        self.log_fd = fds.pop().num
        return None

    def _apply_dirty_log(self) -> None:
        """Give each queue the log while LOG_ALL is acked and a log is set, with the ring areas
        it writes (the used ring at its log address when SET_VRING_ADDR gave one)."""
        on = self.dirty_log if self.acked_features & LOG_ALL else None
        for vr in self.vrings:
            if vr.queue is None or vr.addr is None or vr.size is None:
                continue
            rings: list[tuple[int, int]] = []
            if on is not None and len(vr.gpas) == 3:
                logged = vr.addr.log if vr.addr.flags & VRING_F_LOG else vr.gpas[2]
                if self.packed:
                    rings = [(vr.gpas[0], 16 * vr.size), (logged, 4)]
                else:
                    rings = [(logged, used_ring(vr.size).sizeof())]
            vr.queue.set_dirty_log(on, rings)

    # --- inflight I/O tracking ------------------------------------------------------------------

    def _inflight_message(self, request: int, payload: bytes) -> InflightRec:
        self._need_protocol(request, ProtocolFeature.INFLIGHT_SHMFD)
        _expect_size(request, payload, INFLIGHT.size)
        rec = INFLIGHT.unpack(payload)
        if not 1 <= rec.num_queues <= len(self.vrings):
            raise FrontendError(
                f"{self.name}: {_name(request)} for {rec.num_queues} queues, the device has"
                f" {len(self.vrings)}"
            )
        if any(vr.state.started for vr in self.vrings):
            raise RequestRefused(f"{self.name}: {_name(request)} while rings run")
        return rec

    def _get_inflight_fd(self, request: int, payload: bytes, fds: list[Fd]) -> bytes:
        """GET_INFLIGHT_FD: a new, zeroed region for ``num_queues`` queues of ``queue_size``
        (vhost-user.rst, "Inflight I/O tracking"); its fd goes with the reply. A region that
        cannot be made is answered with size 0 (the front-end then tracks nothing)."""
        rec = self._inflight_message(request, payload)
        size = region_size(rec.num_queues, rec.queue_size, packed=self.packed)
        check_region(size, rec.num_queues, rec.queue_size, packed=self.packed)  # the counts
        try:
            fd, mapping = self.host.create_shared(size)
        except MemoryRefused as exc:
            log.error("%s: no inflight region: %s", self.name, exc)
            return _reply(request, INFLIGHT.pack(rec._replace(mmap_size=0, mmap_offset=0)))
        self._install_inflight(
            _InflightRegion(mapping, rec.num_queues, rec.queue_size, self.packed)
        )
        self._reply_fds.append(fd)
        return _reply(request, INFLIGHT.pack(rec._replace(mmap_size=size, mmap_offset=0)))

    def _set_inflight_fd(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        """SET_INFLIGHT_FD: the region the rings record in (the front-end's copy of the one we
        made, also after we were restarted: then it holds what our predecessor had in flight,
        resubmitted when each ring starts)."""
        rec = self._inflight_message(request, payload)
        if len(fds) != 1 or fds[0].kind is not FdKind.FILE:
            what = f"{len(fds)} fds" if len(fds) != 1 else f"fd {fds[0].num} is {fds[0].kind.value}"
            raise FrontendError(f"{self.name}: SET_INFLIGHT_FD: {what}, not one file")
        try:
            check_region(rec.mmap_size, rec.num_queues, rec.queue_size, packed=self.packed)
        except FrontendError as exc:
            raise FrontendError(f"{self.name}: SET_INFLIGHT_FD: {exc}") from None
        try:
            mapping = self.host.map(fds[0], rec.mmap_offset, rec.mmap_size)
        except MemoryRefused as exc:
            raise RequestRefused(f"{self.name}: SET_INFLIGHT_FD: {exc}") from None
        self._install_inflight(
            _InflightRegion(mapping, rec.num_queues, rec.queue_size, self.packed)
        )
        log.info("%s: inflight region: %d queues of %d", self.name, rec.num_queues, rec.queue_size)
        return None

    def _install_inflight(self, region: _InflightRegion | None) -> None:
        old, self._inflight = self._inflight, region
        if old is not None:
            _unmap_one(old.mapping)

    def _recover(self, vr: _Vring) -> None:
        """At a ring's start, with an inflight region: record in it from now on, and first
        take again what a previous back-end left in flight (vhost-user.rst: the chains in flight,
        in the order they were taken; the last batch rolled back if it was published)."""
        region, queue = self._inflight, vr.queue
        if region is None or vr.index >= region.num_queues or queue is None:
            return
        assert vr.size is not None
        if region.packed != self.packed:
            raise FrontendError(f"{self.name}: the inflight region was made for another format")
        stride = queue_region_size(region.queue_size, packed=region.packed)
        # the trackers keep views of their own: this slice is let go of whatever happens (a
        # frame kept alive by an error's traceback would otherwise pin the region's mapping)
        with region.mapping.view[vr.index * stride : (vr.index + 1) * stride] as view:
            self._recover_from(vr, queue, view, region.queue_size)

    def _recover_from(
        self, vr: _Vring, queue: VirtQueue, view: memoryview, queue_size: int
    ) -> None:
        """:meth:`_recover` on ``view``, the ring's part of the region."""
        assert vr.size is not None
        name = f"{self.name}: ring {vr.index}: inflight region"
        if isinstance(queue, Queue):
            split = SplitInflight(view, queue_size, name=name)
            vr.inflight = split
            used = queue.used_ring.idx()
            rec = split.recover(used, ring_size=vr.size)
            # a fresh region knows nothing: the ring starts where SET_VRING_BASE said
            state = None if rec.fresh else QueueState(rec.next_avail, used)
            queue.track_inflight(split, state=state, resubmit=rec.heads)
            again = len(rec.heads)
        else:
            packed = PackedInflight(view, queue_size, name=name)
            vr.inflight = packed
            base = vr.base
            prec = packed.recover(
                queue.ring.flags, ring_size=vr.size, used_idx=base.next_used,
                used_wrap=int(base.used_wrap),
            )  # fmt: skip
            packed_state = (
                None
                if prec.fresh
                else QueueState(
                    prec.next_avail, prec.next_used, bool(prec.avail_wrap), bool(prec.used_wrap)
                )
            )
            chains = [(c.entry, c.descs) for c in prec.chains]
            queue.track_inflight(packed, state=packed_state, resubmit=chains)
            again = len(prec.chains)
        if again:
            log.info("%s: ring %d: %d requests in flight taken again", self.name, vr.index, again)

    def _untrack(self, vr: _Vring) -> None:
        """The ring stops recording (its queue and the region's views let go)."""
        if vr.inflight is None:
            return
        if vr.queue is not None:
            vr.queue.track_inflight(None)
        vr.inflight.release()
        vr.inflight = None

    def take_reply_fds(self) -> list[int]:
        """The fds to send with the last reply (GET_INFLIGHT_FD's region); the server sends
        them and closes them."""
        fds, self._reply_fds = self._reply_fds, []
        return fds

    # --- config --------------------------------------------------------------------------------

    def _config_hdr(self, request: int, payload: bytes) -> ConfigHdrRec:
        self._need_protocol(request, ProtocolFeature.CONFIG)
        if len(payload) < CONFIG_HDR.size:
            raise FrontendError(
                f"{self.name}: {_name(request)} payload of {len(payload)} bytes, expected at"
                f" least {CONFIG_HDR.size}"
            )
        c = CONFIG_HDR.unpack_from(payload)
        _expect_size(request, payload, CONFIG_HDR.size + c.size)
        return c

    def _get_config(self, request: int, payload: bytes, fds: list[Fd]) -> bytes:
        c = self._config_hdr(request, payload)
        space = self.device.config()
        if c.offset + c.size > len(space):
            # vhost-user.rst, GET_CONFIG: "zero length of payload to indicate an error"
            log.warning(
                "%s: GET_CONFIG offset=%d size=%d outside the %d-byte config space",
                self.name, c.offset, c.size, len(space),
            )  # fmt: skip
            return _reply(request, b"")
        return _reply(request, CONFIG_HDR.pack(c) + space[c.offset : c.offset + c.size])

    def _set_config(self, request: int, payload: bytes, fds: list[Fd]) -> None:
        c = self._config_hdr(request, payload)
        if c.flags not in (_CONFIG_FRONTEND, _CONFIG_MIGRATION):
            raise FrontendError(f"{self.name}: SET_CONFIG flags {c.flags:#x}")
        end = c.offset + c.size
        space = len(self.device.config())
        if end > space:
            raise RequestRefused(
                f"{self.name}: SET_CONFIG offset={c.offset} size={c.size} outside the"
                f" {space}-byte config space"
            )
        # vhost-user.rst, SET_CONFIG: "back-ends MUST NOT accept SET_CONFIG for read-only
        # configuration space fields unless the live migration bit is set"
        writable = any(c.offset in r and end - 1 in r for r in self.device.writable_config)
        if c.flags == _CONFIG_FRONTEND and c.size and not writable:
            raise RequestRefused(
                f"{self.name}: SET_CONFIG offset={c.offset} size={c.size}: not a writable field"
            )
        self.device.set_config(c.offset, payload[CONFIG_HDR.size :])
        return None

    # --- turns ---------------------------------------------------------------------------------

    def _budget_of(self, queue: VirtQueue) -> int:
        return queue.size if self.budget is None else min(self.budget, queue.size)

    def kick_fds(self) -> dict[int, int]:
        """``{kick fd: ring index}`` of the started rings (the server watches these)."""
        return {
            vr.kick_fd: vr.index
            for vr in self.vrings
            if vr.kick_fd is not None and vr.state.started
        }

    def polled_rings(self) -> list[int]:
        """Started rings without a kick fd (SET_VRING_KICK with NOFD): the server polls them."""
        return [vr.index for vr in self.vrings if vr.polled and vr.state.started]

    def take_wakeups(self) -> list[int]:
        """Rings that became started and enabled since the last call: give each a turn (what the
        driver published before needs no kick)."""
        woken, self._wakeups = sorted(self._wakeups), set()
        return woken

    def take_calls(self) -> list[int]:
        """Call fds the server must signal now (the queues notified since the last call; the
        SET_LOG_FD eventfd if pages were logged)."""
        calls = self._take_log_call()
        for vr in self.vrings:
            calls.extend(_take_call(vr))
        return calls

    def take_ring_calls(self, index: int) -> list[int]:
        """:meth:`take_calls` for ring ``index`` alone: a server that serves rings on worker
        threads calls it on the ring's worker after each turn, while other workers serve their
        rings: it touches no other ring. (Two workers may both see the log's count move and
        signal the log fd twice; never not at all after a mark: whoever stored the count it
        finds read it after that mark, and signals.)"""
        return self._take_log_call() + _take_call(self.vrings[index])

    def _take_log_call(self) -> list[int]:
        """The SET_LOG_FD eventfd if pages were logged since the last look."""
        dirty = self.dirty_log
        if dirty is None or self.log_fd is None:
            return []
        marks = dirty.marks
        if marks == self._log_marks:
            return []
        self._log_marks = marks
        return [self.log_fd]

    def serve(self, index: int) -> Turn:
        """One turn of ring ``index`` (after a kick, a wake-up, a poll or a spent budget): the
        device's ``handle`` with the queue's budget renewed, in one batch. Driver errors are
        logged, never raised; the device's own exceptions propagate."""
        queue = self._running(index)
        if queue is None:
            return Turn(0, ())
        vr = self.vrings[index]
        budget = self._budget_of(queue)
        queue.set_budget(budget)
        try:
            with queue.batch():  # one used-index update and at most one call per turn
                self.device.handle(index, queue)
        except QueueBroken as exc:
            if not vr.broken_logged:
                log.error("%s: %s", self.name, exc)
                vr.broken_logged = True
        except DriverError as exc:
            log.warning("%s: ring %d: %s", self.name, index, exc)
        return Turn(budget - (queue.budget or 0), self._spent())

    def pause_kicks(self, index: int) -> None:
        """The server polls ring ``index`` for a while (busy polling after a turn with work):
        ask the driver not to kick it meanwhile (virtio 1.2, 2.7.10; 2.8.21 packed)."""
        queue = self._running(index)
        if queue is not None:
            with contextlib.suppress(QueueBroken):  # a broken ring is not served: nothing to do
                queue.disable_notifications()

    def resume_kicks(self, index: int) -> bool:
        """The server stops polling ring ``index``: ask the driver to kick again. ``True`` if
        chains arrived before the request was visible (give the ring a turn, or they wait for a
        kick that never comes)."""
        queue = self._running(index)
        if queue is None:
            return False
        try:
            return queue.enable_notifications()
        except QueueBroken:
            return False

    def has_work(self, index: int) -> bool:
        """Whether ring ``index`` is served and has a chain available: what a busy-polling
        server looks at before it gives the ring a turn (one read of the ring, no device code).
        ``True`` for a ring the driver just broke, so that a turn reports it."""
        queue = self._running(index)
        if queue is None:
            return False
        try:
            return queue.pending() > 0
        except QueueBroken:
            return True

    def running(self, index: int) -> bool:
        """Whether ring ``index`` is started and enabled: its device serves it (what a server
        that gives such rings worker threads asks)."""
        return self._running(index) is not None

    def _running(self, index: int) -> VirtQueue | None:
        """The queue of ring ``index`` if it is started and enabled (the device serves it)."""
        vr = self.vrings[index]
        return vr.queue if vr.state is RingState.STARTED_ENABLED else None

    def poll(self) -> Turn:
        """The device's periodic poll (for devices that produce without being kicked)."""
        return self._outside_turns("poll", self.device.poll)

    def on_events(self) -> Turn:
        """The device's :meth:`~virtio_schema.vhost_user.device.VhostUserDevice.events_fd` is
        readable: its :meth:`~virtio_schema.vhost_user.device.VhostUserDevice.on_events`."""
        return self._outside_turns("on_events", self.device.on_events)

    def _outside_turns(self, what: str, call: Callable[[], None]) -> Turn:
        """Device code outside a ring's turn: a driver error it lets through is logged; the
        rings whose budget it spent are reported for another turn."""
        try:
            call()
        except DriverError as exc:
            log.warning("%s: %s: %s", self.name, what, exc)
        return Turn(0, self._spent())

    def _spent(self) -> tuple[int, ...]:
        spent = [
            vr.index
            for vr in self.vrings
            if vr.queue is not None
            and vr.queue.budget == 0
            and vr.state is RingState.STARTED_ENABLED
        ]
        return tuple(spent) if spent else ()

    def kick_failed(self, index: int, reason: str) -> None:
        """The kick fd of ring ``index`` cannot be used any more (a pipe at end-of-file): a
        front-end error for that ring, which stops (the front-end may start it again)."""
        vr = self.vrings[index]
        log.error("%s: ring %d: %s; the ring is stopped", self.name, index, reason)
        self._stop(vr)

    # --- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every ring, close every fd, unmap the memory. A device hook that raises does not
        stop the teardown: its exception is raised at the end."""
        failure: Exception | None = None
        for vr in self.vrings:
            try:
                self._stop(vr)
            except Exception as exc:
                failure = failure or exc
            self._close(vr.call_fd)
            self._close(vr.err_fd)
            vr.call_fd = vr.err_fd = None
        self._close(self.backend_req_fd)
        self.backend_req_fd = None
        self._install_inflight(None)
        for fd in self.take_reply_fds():
            self.host.close(fd)
        if self.dirty_log is not None and self._log_mapping is not None:
            self.dirty_log.release()
            _unmap_one(self._log_mapping)
        self.dirty_log = self._log_mapping = None
        self._close(self.log_fd)
        self.log_fd = None
        self._release_memory()
        try:
            self.device.closed()
        except Exception as exc:
            failure = failure or exc
        if failure is not None:
            raise failure


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def _take_call(vr: _Vring) -> list[int]:
    """Ring ``vr``'s call fd if its queue notified since the last look."""
    if not vr.notify.pending:
        return []
    vr.notify.pending = False
    return [] if vr.call_fd is None else [vr.call_fd]


def _reply(request: int, payload: bytes) -> bytes:
    flags = 1 | HeaderFlags.REPLY
    return HEADER.pack(HeaderRec(request, int(flags), len(payload))) + payload


def _expect_size(request: int, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise FrontendError(f"{_name(request)}: payload of {len(payload)} bytes, expected {size}")


def _u64(request: int, payload: bytes) -> int:
    _expect_size(request, payload, U64.size)
    return U64.unpack(payload).u64


def _unmap(regions: list[_Region]) -> None:
    for r in regions:
        try:
            r.mapping.close()
        except BufferError as exc:
            log.error("guest memory region at %#x still exported: %s", r.gpa, exc)


def _unmap_one(mapping: Mapping) -> None:
    try:
        mapping.close()
    except BufferError as exc:
        log.error("inflight region still exported: %s", exc)
