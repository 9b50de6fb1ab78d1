"""The sans-I/O vhost-user protocol core (:class:`~virtio_schema.vhost_user.backend.Backend`), with
no socket, no eventfd and no mmap.

The operating system is a :class:`FakeHost`: its "files" are bytearrays keyed by fake fd numbers
(1000 and up), :meth:`FakeHost.map` hands out memoryviews of them, and :meth:`FakeHost.close`
records every close. Guest RAM is one such bytearray at a guest address and a different front-end
("userspace") address; the guest's driver is the library's fake driver
(:class:`~virtio_schema.fake_queue.FakeDriver`) laying a split ring in it. Messages are handed to
:meth:`Backend.handle` as the server would after framing them.

Every test ends with the core's promises about resources checked (:meth:`Harness.finish`): each fd
handed to ``handle`` was closed exactly once, during ``handle`` or by :meth:`Backend.close`, and
every mapping was closed.
"""

from __future__ import annotations

import ast
import collections
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_schema.chain import WritableChain
from virtio_schema.errors import DeviceUsageError, DriverError
from virtio_schema.fake_queue import FakeDriver, FakeMemory
from virtio_schema.queue import VirtQueue
from virtio_schema.schema import DescFlags, Feature
from virtio_schema.vhost_user import backend as backend_module
from virtio_schema.vhost_user.backend import (
    LOG_ALL,
    MAX_MEM_SLOTS,
    Backend,
    Fd,
    FdKind,
    Mapping,
    MemoryRefused,
    Turn,
)
from virtio_schema.vhost_user.device import VhostUserDevice
from virtio_schema.vhost_user.errors import FrontendError, RequestRefused
from virtio_schema.vhost_user.inflight import (
    INFLIGHT,
    SPLIT_DESC_STATE,
    SPLIT_QUEUE_REGION,
    InflightRec,
    region_size,
)
from virtio_schema.vhost_user.messages import (
    CONFIG_HDR,
    HEADER,
    LOG_DESCRIPTION,
    MEM_REGION,
    MEMORY_HDR,
    NOFD,
    SINGLE_MEM_REGION,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_F_LOG,
    VRING_STATE,
    BackendRequest,
    ConfigHdrRec,
    HeaderFlags,
    HeaderRec,
    LogDescriptionRec,
    MemoryHdrRec,
    MemoryRegionRec,
    ProtocolFeature,
    Request,
    U64Rec,
    VringAddrRec,
    VringStateRec,
)

GPA = 0x4000_0000
"""Guest-physical base of the RAM (what descriptors carry)."""
UVA = 0x7F00_0000_0000
"""The front-end's address of that RAM (what SET_VRING_ADDR carries)."""
RAM_SIZE = 1 << 16
QUEUE_SIZE = 16
PROTOCOL = int(
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)
WANTED = int(Feature.VERSION_1 | Feature.PROTOCOL_FEATURES)
"""What the test front-end acks: split ring, no EVENT_IDX (every used batch is notified)."""
NEED_REPLY = int(HeaderFlags.NEED_REPLY)
REPLY_DATA = b"done"
"""What the test device writes into every chain it takes."""
CONFIG = bytes(range(0x40, 0x50))
"""The test device's 16-byte configuration space; bytes 4..7 are writable."""
WRITABLE = range(4, 8)


# --- the fake operating system ---------------------------------------------------------------------


@dataclass
class FakeMapping:
    """A "mapped" region: a memoryview of the fd's bytearray."""

    fd: int
    view: memoryview
    closed: bool = False

    def close(self) -> None:
        assert not self.closed, f"mapping of fd {self.fd} closed twice"
        self.view.release()
        self.closed = True


class FakeHost:
    """The core's :class:`~virtio_schema.vhost_user.backend.Host`: files are bytearrays, closes
    are recorded."""

    def __init__(self) -> None:
        self.files: dict[int, bytearray] = {}
        self.refuse: set[int] = set()
        """fd numbers whose :meth:`map` raises :class:`MemoryRefused`."""
        self.mappings: list[FakeMapping] = []
        self.closed: list[int] = []
        self.next_fd = 5000
        self.created: list[int] = []
        """fds :meth:`create_shared` made (the back-end sends and closes them)."""

    def map(self, fd: Fd, offset: int, size: int) -> Mapping:
        if fd.num in self.refuse:
            raise MemoryRefused(f"fd {fd.num} refused by the test")
        buf = self.files.get(fd.num)
        if buf is None or offset + size > len(buf):
            raise MemoryRefused(f"fd {fd.num} does not cover {offset:#x}+{size:#x}")
        mapping = FakeMapping(fd.num, memoryview(buf)[offset : offset + size])
        self.mappings.append(mapping)
        return mapping

    def create_shared(self, size: int) -> tuple[int, Mapping]:
        """A "memfd": a new fd number whose file is ``size`` zero bytes, mapped."""
        fd = self.next_fd
        self.next_fd += 1
        self.files[fd] = bytearray(size)
        self.created.append(fd)
        mapping = FakeMapping(fd, memoryview(self.files[fd]))
        self.mappings.append(mapping)
        return fd, mapping

    def close(self, fd: int) -> None:
        self.closed.append(fd)

    def live_mappings(self) -> list[FakeMapping]:
        return [m for m in self.mappings if not m.closed]


# --- the device ------------------------------------------------------------------------------------


class RecordingDevice(VhostUserDevice):
    """Two queues; records every hook; ``handle`` takes every chain it is given and returns it
    with :data:`REPLY_DATA` written. ``after_return`` (if set) runs after each return."""

    num_queues = 2
    writable_config = (WRITABLE,)

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.kept: dict[int, VirtQueue] = {}
        self.taken: list[int] = []
        """Chains taken in each call of :meth:`handle`."""
        self.config_writes: list[tuple[int, bytes]] = []
        self.after_return: Callable[[], None] | None = None
        self.inflight = False
        """Opt in to INFLIGHT_SHMFD (the inflight tests)."""

    def protocol_features(self) -> int:
        extra = int(ProtocolFeature.INFLIGHT_SHMFD) if self.inflight else 0
        return super().protocol_features() | extra

    def config(self) -> bytes:
        return CONFIG

    def set_config(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, bytes(data)))

    def started(self, index: int, queue: VirtQueue) -> None:
        self.calls.append(("started", index))
        self.kept[index] = queue

    def enabled(self, index: int, queue: VirtQueue) -> None:
        self.calls.append(("enabled", index))

    def disabled(self, index: int) -> None:
        self.calls.append(("disabled", index))

    def stopped(self, index: int) -> None:
        self.calls.append(("stopped", index))

    def reset(self) -> None:
        self.calls.append(("reset", -1))

    def handle(self, index: int, queue: VirtQueue) -> None:
        taken = 0
        while (chain := queue.next_chain()) is not None:
            taken += 1
            with chain:
                WritableChain(chain).write(REPLY_DATA)
            if self.after_return is not None:
                self.after_return()
        self.taken.append(taken)


# --- one connection --------------------------------------------------------------------------------


def _split_reply(reply: bytes | None) -> tuple[HeaderRec, bytes]:
    assert reply is not None, "no reply"
    hdr = HEADER.unpack(reply[: HEADER.size])
    assert hdr.flags == VERSION | HeaderFlags.REPLY, f"reply flags {hdr.flags:#x}"
    payload = reply[HEADER.size :]
    assert hdr.size == len(payload)
    return hdr, payload


def _u64(value: int) -> bytes:
    return U64.pack(U64Rec(value))


def _state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(VringStateRec(index, num))


def _config(offset: int, data: bytes, flags: int = 0) -> bytes:
    return CONFIG_HDR.pack(ConfigHdrRec(offset, len(data), flags)) + data


def _mem_table(*regions: MemoryRegionRec) -> bytes:
    return MEMORY_HDR.pack(MemoryHdrRec(len(regions))) + b"".join(
        MEM_REGION.pack(r) for r in regions
    )


@dataclass
class Harness:
    """A :class:`Backend` on a :class:`FakeHost`, the guest's RAM and ring 0's driver."""

    host: FakeHost
    device: RecordingDevice
    backend: Backend
    ram: bytearray
    memory: FakeMemory
    driver: FakeDriver
    given: list[int] = field(default_factory=list)
    """Every fd number handed to ``handle``."""
    driver_memories: list[FakeMemory] = field(default_factory=list)
    _numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1000))
    kick_fd: int | None = None
    call_fd: int | None = None

    # messages

    def fd(self, kind: FdKind = FdKind.EVENTFD) -> Fd:
        return Fd(next(self._numbers), kind)

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[Fd] = (),
        *,
        flags: int = VERSION,
        need_reply: bool = False,
    ) -> bytes | None:
        self.given.extend(fd.num for fd in fds)
        if need_reply:
            flags |= NEED_REPLY
        return self.backend.handle(request, flags, payload, fds)

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[Fd] = ()) -> int:
        """Send with NEED_REPLY; the u64 of the ack."""
        hdr, body = _split_reply(self.send(request, payload, fds, need_reply=True))
        assert hdr.request == request
        return U64.unpack(body).u64

    def get_u64(self, request: int) -> int:
        hdr, body = _split_reply(self.send(request))
        assert hdr.request == request
        return U64.unpack(body).u64

    def get_vring_base(self, index: int = 0) -> VringStateRec:
        _, body = _split_reply(self.send(Request.GET_VRING_BASE, _state(index, 0)))
        return VRING_STATE.unpack(body)

    # the QEMU sequence, in pieces

    def negotiate(self, features: int = WANTED) -> None:
        offered = self.get_u64(Request.GET_FEATURES)
        assert self.get_u64(Request.GET_PROTOCOL_FEATURES) == PROTOCOL
        self.send(Request.SET_PROTOCOL_FEATURES, _u64(PROTOCOL))
        self.send(Request.SET_OWNER)
        assert self.ack(Request.SET_FEATURES, _u64(offered & features)) == 0

    def region(self, fd: Fd | None = None, **changes: int) -> tuple[bytes, Fd]:
        """A one-region SET_MEM_TABLE payload for the RAM and its (new) FILE fd."""
        if fd is None:
            fd = self.fd(FdKind.FILE)
            self.host.files[fd.num] = self.ram
        rec = MemoryRegionRec(GPA, RAM_SIZE, UVA, 0)._replace(**changes)
        return _mem_table(rec), fd

    def set_mem_table(self) -> int:
        payload, fd = self.region()
        return self.ack(Request.SET_MEM_TABLE, payload, [fd])

    def vring_addr(self, index: int = 0) -> bytes:
        d = self.driver
        rec = VringAddrRec(
            index,
            0,
            descriptor=d.desc_addr - GPA + UVA,
            used=d.used_addr - GPA + UVA,
            available=d.avail_addr - GPA + UVA,
            log=0,
        )
        return VRING_ADDR.pack(rec)

    def start_ring(self, *, enable: bool = True, base: int = 0, nofd: bool = False) -> None:
        """NUM, BASE, ADDR, CALL, KICK (ENABLE 1) for ring 0, each acked 0."""
        assert self.ack(Request.SET_VRING_NUM, _state(0, QUEUE_SIZE)) == 0
        assert self.ack(Request.SET_VRING_BASE, _state(0, base)) == 0
        assert self.ack(Request.SET_VRING_ADDR, self.vring_addr()) == 0
        call = self.fd()
        assert self.ack(Request.SET_VRING_CALL, _u64(0), [call]) == 0
        self.call_fd = call.num
        if nofd:
            assert self.ack(Request.SET_VRING_KICK, _u64(NOFD)) == 0
            self.kick_fd = None
        else:
            kick = self.fd()
            assert self.ack(Request.SET_VRING_KICK, _u64(0), [kick]) == 0
            self.kick_fd = kick.num
        if enable:
            assert self.ack(Request.SET_VRING_ENABLE, _state(0, 1)) == 0

    def running(self) -> None:
        """Negotiated, memory table set, ring 0 started and enabled; hooks and wake-ups
        forgotten."""
        self.negotiate()
        assert self.set_mem_table() == 0
        self.start_ring()
        self.device.calls.clear()
        self.backend.take_wakeups()

    # the guest's side

    def publish(self, n: int) -> list[int]:
        """Make ``n`` chains available, each one writable buffer (one descriptor)."""
        heads = [self.driver.publish((), [len(REPLY_DATA)]) for _ in range(n)]
        assert None not in heads, "the test ring is full"
        return [h for h in heads if h is not None]

    def used_idx_in(self, ram: bytearray | None = None) -> int:
        """``used.idx`` of ring 0, read from the bytes of ``ram`` (default: the current RAM)."""
        ram = self.ram if ram is None else ram
        at = self.driver.used_addr - GPA + 2  # flags (le16), then idx (le16)
        return int.from_bytes(ram[at : at + 2], "little")

    # the end

    def finish(self) -> None:
        """Close the back-end and check that it released everything it was given."""
        self.backend.close()
        counts = collections.Counter(self.host.closed)
        twice = sorted(fd for fd, n in counts.items() if n > 1)
        assert not twice, f"fds closed more than once: {twice}"
        assert sorted(counts) == sorted(self.given), (
            f"given {sorted(self.given)}, closed {sorted(counts)}"
        )
        assert self.host.live_mappings() == [], "mappings left open"

    def release_driver(self) -> None:
        for m in [self.memory, *self.driver_memories]:
            m.close()


def _harness(budget: int | None = None) -> Harness:
    host = FakeHost()
    device = RecordingDevice()
    backend = Backend(device, host=host, name="test", budget=budget)
    ram = bytearray(RAM_SIZE)
    memory = FakeMemory.over([(GPA, ram)])
    driver = FakeDriver(memory, QUEUE_SIZE)
    return Harness(host, device, backend, ram, memory, driver)


@pytest.fixture
def connect() -> Iterator[Callable[..., Harness]]:
    """Make connections (``budget=``); each is closed and checked at the end of the test."""
    made: list[Harness] = []

    def make(*, budget: int | None = None) -> Harness:
        h = _harness(budget)
        made.append(h)
        return h

    yield make
    try:
        for h in made:
            h.finish()
    finally:
        for h in made:
            h.release_driver()


@pytest.fixture
def conn(connect: Callable[..., Harness]) -> Harness:
    return connect()


# --- the core does no I/O ----------------------------------------------------------------------------

_CORE = ("backend.py", "rings.py", "framing.py")


@pytest.mark.parametrize("module", _CORE)
def test_core_module_imports_no_os_mmap_socket_or_selectors(module: str) -> None:
    path = Path(backend_module.__file__).with_name(module)
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported.isdisjoint({"os", "mmap", "socket", "selectors"}), sorted(imported)


# --- a QEMU-like session -----------------------------------------------------------------------------


def test_qemu_sequence_calls_hooks_in_order_serves_turns_and_reports_calls_and_wakeups(
    conn: Harness,
) -> None:
    offered = conn.get_u64(Request.GET_FEATURES)
    assert offered == conn.device.device_features() | Feature.PROTOCOL_FEATURES | LOG_ALL
    assert conn.get_u64(Request.GET_PROTOCOL_FEATURES) == PROTOCOL
    # REPLY_ACK is not in force yet when this message arrives: no ack, though it asks for one
    assert conn.send(Request.SET_PROTOCOL_FEATURES, _u64(PROTOCOL), need_reply=True) is None
    assert conn.ack(Request.SET_OWNER) == 0
    assert conn.ack(Request.SET_FEATURES, _u64(offered & WANTED)) == 0
    assert conn.backend.acked_features == offered & WANTED
    assert conn.set_mem_table() == 0
    assert conn.device.calls == []
    conn.start_ring(enable=False)
    assert conn.device.calls == [("started", 0)]
    assert conn.backend.take_wakeups() == []  # started but disabled: nothing to serve yet
    assert conn.backend.kick_fds() == {conn.kick_fd: 0}
    assert conn.ack(Request.SET_VRING_ENABLE, _state(0, 1)) == 0
    assert conn.device.calls == [("started", 0), ("enabled", 0)]
    assert conn.backend.take_wakeups() == [0]
    assert conn.backend.take_wakeups() == []

    heads = conn.publish(3)
    assert conn.backend.serve(0) == Turn(3, ())
    assert conn.backend.take_calls() == [conn.call_fd]
    assert conn.backend.take_calls() == []
    used = conn.driver.used()
    assert [u.head for u in used] == heads
    assert [u.data for u in used] == [REPLY_DATA] * 3
    assert conn.used_idx_in() == 3

    assert conn.backend.serve(0) == Turn(0, ())  # nothing available: no chains, no call
    assert conn.backend.take_calls() == []

    assert conn.get_vring_base(0) == VringStateRec(0, 3)
    assert conn.device.calls[2:] == [("disabled", 0), ("stopped", 0)]
    assert conn.kick_fd in conn.host.closed
    assert conn.backend.kick_fds() == {}


def test_a_ring_restarted_at_its_base_continues_in_the_next_used_slot(conn: Harness) -> None:
    conn.running()
    conn.publish(2)
    conn.backend.serve(0)
    conn.driver.used()
    assert conn.get_vring_base(0) == VringStateRec(0, 2)
    conn.start_ring(base=2)
    (head,) = conn.publish(1)
    assert conn.backend.serve(0) == Turn(1, ())
    assert conn.driver.used_ring.elem(2).id == head
    assert conn.used_idx_in() == 3


# --- budget ----------------------------------------------------------------------------------------


def test_a_turn_takes_at_most_the_budget_and_reports_the_ring_again(
    connect: Callable[..., Harness],
) -> None:
    h = connect(budget=4)
    h.running()
    h.publish(10)
    assert h.backend.serve(0) == Turn(4, (0,))
    assert h.used_idx_in() == 4
    assert h.backend.serve(0) == Turn(4, (0,))
    assert h.backend.serve(0) == Turn(2, ())
    assert h.device.taken == [4, 4, 2]
    assert h.used_idx_in() == 10
    assert [u.data for u in h.driver.used()] == [REPLY_DATA] * 10


def test_used_index_is_published_once_at_the_end_of_the_turn(
    connect: Callable[..., Harness],
) -> None:
    h = connect(budget=4)
    h.running()
    h.publish(10)
    seen: list[int] = []
    h.device.after_return = lambda: seen.append(h.used_idx_in())
    h.backend.serve(0)
    assert seen == [0, 0, 0, 0]  # returned chains wait in the batch
    assert h.used_idx_in() == 4
    assert h.backend.take_calls() == [h.call_fd]  # one notification for the turn


@given(budget=st.integers(1, QUEUE_SIZE), chains=st.integers(0, QUEUE_SIZE))
def test_pending_returns_of_a_turn_never_exceed_the_budget(budget: int, chains: int) -> None:
    h = _harness(budget)
    try:
        h.running()
        h.publish(chains)
        before = 0
        again: tuple[int, ...] = (0,)
        while again:
            taken, again = h.backend.serve(0)
            after = h.used_idx_in()
            assert after - before == taken <= budget  # published together, at the turn's end
            assert again == ((0,) if taken == budget else ())
            before = after
        assert before == chains
        assert h.backend.serve(0) == Turn(0, ())
        h.finish()
    finally:
        h.release_driver()


def test_budget_above_the_queue_size_is_capped_at_the_queue_size(
    connect: Callable[..., Harness],
) -> None:
    h = connect(budget=1000)
    h.running()
    h.publish(QUEUE_SIZE)
    assert h.backend.serve(0) == Turn(QUEUE_SIZE, (0,))


def test_budget_below_one_is_refused() -> None:
    with pytest.raises(DeviceUsageError, match="budget 0"):
        Backend(RecordingDevice(), host=FakeHost(), budget=0)


# --- device status (VHOST_USER_PROTOCOL_F_STATUS) ----------------------------------------------------


def test_the_device_status_is_recorded_and_answered(conn: Harness) -> None:
    conn.negotiate()
    assert conn.get_u64(Request.GET_STATUS) == 0
    assert conn.ack(Request.SET_STATUS, _u64(0x0B)) == 0  # ACKNOWLEDGE | DRIVER | FEATURES_OK
    assert conn.get_u64(Request.GET_STATUS) == 0x0B
    assert conn.backend.status == 0x0B


def test_status_0_before_get_vring_base_keeps_the_rings_position(conn: Harness) -> None:
    """QEMU 7.2 stops a device with SET_STATUS 0 *before* GET_VRING_BASE: the answer must still
    be where the ring got to, and the ring must still stop cleanly."""
    conn.running()
    conn.publish(3)
    assert conn.backend.serve(0).taken == 3
    assert conn.ack(Request.SET_STATUS, _u64(0x0F)) == 0
    assert conn.ack(Request.SET_STATUS, _u64(0)) == 0
    assert conn.ack(Request.SET_VRING_ENABLE, _state(0, 0)) == 0
    assert conn.get_vring_base().num == 3
    assert conn.get_u64(Request.GET_STATUS) == 0


def test_a_status_beyond_a_byte_ends_the_connection(conn: Harness) -> None:
    conn.negotiate()
    with pytest.raises(FrontendError, match="not a status byte"):
        conn.send(Request.SET_STATUS, _u64(0x100))


@pytest.mark.parametrize("request_", [Request.SET_STATUS, Request.GET_STATUS])
def test_status_requests_without_the_protocol_feature_end_the_connection(
    conn: Harness, request_: Request
) -> None:
    offered = conn.get_u64(Request.GET_FEATURES)
    conn.send(Request.SET_PROTOCOL_FEATURES, _u64(PROTOCOL & ~int(ProtocolFeature.STATUS)))
    conn.send(Request.SET_OWNER)
    assert conn.ack(Request.SET_FEATURES, _u64(offered & WANTED)) == 0
    payload = _u64(1) if request_ == Request.SET_STATUS else b""
    with pytest.raises(FrontendError, match="STATUS without the STATUS protocol feature"):
        conn.send(request_, payload, need_reply=True)
    assert conn.backend.status == 0


# --- RESET_DEVICE and the back-end channel ---------------------------------------------------------


def test_reset_device_stops_the_rings_closes_their_fds_and_forgets_the_setup(conn: Harness) -> None:
    conn.running()
    conn.publish(2)
    assert conn.ack(Request.RESET_DEVICE) == 0
    assert conn.device.calls == [("disabled", 0), ("stopped", 0), ("reset", -1)]
    assert conn.kick_fd in conn.host.closed
    assert conn.call_fd in conn.host.closed
    assert conn.host.live_mappings() == []  # the memory table is gone with the rest
    assert conn.backend.acked_features == 0
    assert conn.backend.status == 0
    assert conn.backend.owner  # ownership stays (vhost-user.rst, RESET_DEVICE)
    assert conn.get_vring_base().num == 0  # not where the ring got to: a fresh device
    with pytest.raises(FrontendError, match="before its size, addresses and the memory table"):
        conn.send(Request.SET_VRING_KICK, _u64(0), [conn.fd()])


def test_a_reset_device_is_set_up_again_and_serves_from_the_start(conn: Harness) -> None:
    conn.running()
    conn.publish(2)
    assert conn.backend.serve(0).taken == 2
    assert conn.ack(Request.RESET_DEVICE) == 0
    conn.driver = FakeDriver(conn.memory, QUEUE_SIZE)  # the driver's new ring after its reset
    assert conn.ack(Request.SET_FEATURES, _u64(WANTED)) == 0
    assert conn.set_mem_table() == 0
    conn.start_ring()
    conn.publish(1)
    assert conn.backend.serve(0).taken == 1
    assert conn.used_idx_in() == 1


@pytest.mark.parametrize(
    ("payload", "match"),
    [(b"", "RESET_DEVICE without the RESET_DEVICE protocol feature"), (b"x", "payload of 1")],
)
def test_a_reset_device_without_the_feature_or_with_a_payload_ends_the_connection(
    conn: Harness, payload: bytes, match: str
) -> None:
    offered = conn.get_u64(Request.GET_FEATURES)
    protocol = PROTOCOL if payload else PROTOCOL & ~int(ProtocolFeature.RESET_DEVICE)
    conn.send(Request.SET_PROTOCOL_FEATURES, _u64(protocol))
    assert conn.ack(Request.SET_FEATURES, _u64(offered & WANTED)) == 0
    with pytest.raises(FrontendError, match=match):
        conn.send(Request.RESET_DEVICE, payload)
    assert conn.backend.acked_features != 0  # nothing was reset


CONFIG_CHANGE = HEADER.pack(HeaderRec(BackendRequest.CONFIG_CHANGE_MSG, VERSION, 0))
"""The notification on the back-end channel: a header, no payload, no NEED_REPLY."""


def test_a_config_change_is_sent_on_the_backend_channel_once_a_ring_started(
    conn: Harness,
) -> None:
    conn.negotiate()
    channel = conn.fd(FdKind.SOCKET)
    assert conn.ack(Request.SET_BACKEND_REQ_FD, b"", [channel]) == 0
    assert conn.backend.backend_req_fd == channel.num
    conn.device.config_changed()  # before the device runs: QEMU 7.2 would drop it
    assert conn.backend.take_backend_messages() == b""
    assert conn.set_mem_table() == 0
    conn.start_ring()
    assert conn.backend.take_backend_messages() == CONFIG_CHANGE  # sent once it started
    conn.device.config_changed()
    conn.device.config_changed()
    assert conn.backend.take_backend_messages() == CONFIG_CHANGE * 2
    assert conn.backend.take_backend_messages() == b""


def test_a_config_change_without_a_backend_channel_is_not_sent(conn: Harness) -> None:
    conn.running()
    conn.device.config_changed()
    assert conn.backend.take_backend_messages() == b""


def test_a_new_backend_channel_replaces_and_closes_the_old_one(conn: Harness) -> None:
    conn.running()
    first, second = conn.fd(FdKind.SOCKET), conn.fd(FdKind.SOCKET)
    conn.send(Request.SET_BACKEND_REQ_FD, b"", [first])
    conn.send(Request.SET_BACKEND_REQ_FD, b"", [second])
    assert first.num in conn.host.closed
    assert second.num not in conn.host.closed
    conn.backend.backend_channel_failed("closed by the test")
    assert second.num in conn.host.closed
    assert conn.backend.backend_req_fd is None
    conn.device.config_changed()
    assert conn.backend.take_backend_messages() == b""


@pytest.mark.parametrize(
    ("kinds", "payload", "match"),
    [
        ((), b"", "0 fds, not one socket"),
        ((FdKind.EVENTFD,), b"", "is an eventfd, not one socket"),
        ((FdKind.SOCKET, FdKind.SOCKET), b"", "2 fds, not one socket"),
        ((FdKind.SOCKET,), _u64(0), "payload of 8 bytes, expected 0"),
    ],
)
def test_a_malformed_set_backend_req_fd_ends_the_connection_and_its_fds_are_closed(
    conn: Harness, kinds: tuple[FdKind, ...], payload: bytes, match: str
) -> None:
    conn.negotiate()
    fds = [conn.fd(kind) for kind in kinds]
    with pytest.raises(FrontendError, match=match):
        conn.send(Request.SET_BACKEND_REQ_FD, payload, fds)
    assert all(fd.num in conn.host.closed for fd in fds)
    assert conn.backend.backend_req_fd is None


def test_set_backend_req_fd_without_the_protocol_feature_ends_the_connection(
    conn: Harness,
) -> None:
    conn.send(Request.SET_PROTOCOL_FEATURES, _u64(PROTOCOL & ~int(ProtocolFeature.BACKEND_REQ)))
    channel = conn.fd(FdKind.SOCKET)
    with pytest.raises(FrontendError, match="without the BACKEND_REQ protocol feature"):
        conn.send(Request.SET_BACKEND_REQ_FD, b"", [channel])
    assert channel.num in conn.host.closed


# --- memory added and removed one region at a time (CONFIGURE_MEM_SLOTS) ---------------------------

GPA2, UVA2 = GPA + 0x10_0000, UVA + 0x10_0000
"""Where the test's second RAM (hot-added) lives."""


def _add_region(conn: Harness, ram: bytearray, gpa: int, uva: int) -> tuple[bytes, Fd]:
    """An ADD_MEM_REG / REM_MEM_REG payload for ``ram`` and a new FILE fd of it."""
    fd = conn.fd(FdKind.FILE)
    conn.host.files[fd.num] = ram
    return SINGLE_MEM_REGION.pack(MemoryRegionRec(gpa, len(ram), uva, 0)), fd


def _raw_writable_chain(conn: Harness, addr: int, length: int) -> int:
    """A one-descriptor writable chain at any address (the fake driver's raw calls)."""
    head = conn.driver.take_descriptor()
    conn.driver.write_desc(head, addr, length, DescFlags.WRITE, 0)
    conn.driver.push_head(head)
    return head


def test_get_max_mem_slots_answers_the_slots_a_front_end_may_fill(conn: Harness) -> None:
    conn.negotiate()
    assert conn.get_u64(Request.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS


def test_memory_added_region_by_region_serves_rings_without_any_mem_table(conn: Harness) -> None:
    """QEMU 7.2 with CONFIGURE_MEM_SLOTS sends no SET_MEM_TABLE at all, only ADD_MEM_REG."""
    conn.negotiate()
    payload, fd = _add_region(conn, conn.ram, GPA, UVA)
    assert conn.ack(Request.ADD_MEM_REG, payload, [fd]) == 0
    conn.start_ring()
    conn.publish(2)
    assert conn.backend.serve(0).taken == 2
    assert conn.used_idx_in() == 2


def test_a_region_added_while_a_ring_runs_is_reached_by_the_next_chain(conn: Harness) -> None:
    conn.running()
    ram2 = bytearray(RAM_SIZE)
    _raw_writable_chain(conn, GPA2 + 0x100, len(REPLY_DATA))
    assert conn.backend.serve(0).taken == 1  # not in memory yet: a driver error, returned
    assert conn.driver.used()[0].len == 0
    payload, fd = _add_region(conn, ram2, GPA2, UVA2)
    assert conn.ack(Request.ADD_MEM_REG, payload, [fd]) == 0
    _raw_writable_chain(conn, GPA2 + 0x100, len(REPLY_DATA))
    assert conn.backend.serve(0).taken == 1
    assert conn.driver.used()[0].len == len(REPLY_DATA)
    assert ram2[0x100 : 0x100 + len(REPLY_DATA)] == REPLY_DATA
    assert conn.device.calls == []  # the ring was never stopped or rebuilt


def test_the_same_region_added_again_is_ignored_and_its_fd_closed(conn: Harness) -> None:
    """QEMU 7.2 sends each ADD once per queue pair of a multi-queue vhost-user-net device."""
    conn.running()
    ram2 = bytearray(RAM_SIZE)
    for _ in range(2):
        payload, fd = _add_region(conn, ram2, GPA2, UVA2)
        assert conn.ack(Request.ADD_MEM_REG, payload, [fd]) == 0
        assert fd.num in conn.host.closed  # the mapping keeps what it needs
    assert len([m for m in conn.host.live_mappings() if m.view.obj is ram2]) == 1


def test_a_removed_region_is_unmapped_and_a_held_chain_there_gets_a_driver_error(
    conn: Harness,
) -> None:
    conn.running()
    ram2 = bytearray(RAM_SIZE)
    payload, fd = _add_region(conn, ram2, GPA2, UVA2)
    assert conn.ack(Request.ADD_MEM_REG, payload, [fd]) == 0
    head = _raw_writable_chain(conn, GPA2 + 0x100, len(REPLY_DATA))
    queue = conn.device.kept[0]
    chain = queue.next_chain()  # the device holds it across the removal
    assert chain is not None
    assert chain.head == head
    assert conn.ack(Request.REM_MEM_REG, payload) == 0
    assert [m for m in conn.host.live_mappings() if m.view.obj is ram2] == []
    with pytest.raises(DriverError), chain:  # never written past what is mapped
        WritableChain(chain).write(REPLY_DATA)
    assert conn.backend.serve(0).taken == 0  # the turn publishes the returned chain
    (used,) = conn.driver.used()
    assert (used.head, used.len) == (head, 0)  # returned: no slot lost
    assert ram2[0x100 : 0x100 + len(REPLY_DATA)] == bytes(len(REPLY_DATA))
    conn.publish(1)  # the ring goes on in the memory that stayed
    assert conn.backend.serve(0).taken == 1


def test_removing_the_region_of_a_running_ring_stops_that_ring(conn: Harness) -> None:
    conn.negotiate()
    payload, fd = _add_region(conn, conn.ram, GPA, UVA)
    assert conn.ack(Request.ADD_MEM_REG, payload, [fd]) == 0
    conn.start_ring()
    conn.device.calls.clear()
    assert conn.ack(Request.REM_MEM_REG, payload) == 0
    assert conn.device.calls == [("disabled", 0), ("stopped", 0)]
    assert conn.host.live_mappings() == []


@pytest.mark.parametrize(
    ("request_", "payload", "nfds", "match"),
    [
        (Request.ADD_MEM_REG, "region", 0, "ADD_MEM_REG with 0 fds, expected 1"),
        (Request.ADD_MEM_REG, "region", 2, "ADD_MEM_REG with 2 fds, expected 1"),
        (Request.ADD_MEM_REG, "short", 1, "payload of 32 bytes, expected 40"),
        (Request.ADD_MEM_REG, "empty", 1, "is not a valid range"),
        (Request.ADD_MEM_REG, "gpa-overlap", 1, "overlap"),
        (Request.ADD_MEM_REG, "uva-overlap", 1, "user range .* overlaps"),
        (Request.REM_MEM_REG, "short", 0, "payload of 32 bytes, expected 40"),
    ],
)
def test_malformed_region_messages_end_the_connection_and_change_nothing(
    conn: Harness, request_: Request, payload: str, nfds: int, match: str
) -> None:
    conn.running()
    ram2 = bytearray(RAM_SIZE)
    rec = MemoryRegionRec(GPA2, RAM_SIZE, UVA2, 0)
    rec = {
        "region": rec,
        "short": rec,
        "empty": rec._replace(memory_size=0),
        "gpa-overlap": rec._replace(guest_phys_addr=GPA + 0x1000),
        "uva-overlap": rec._replace(userspace_addr=UVA + 0x1000),
    }[payload]
    body = SINGLE_MEM_REGION.pack(rec)[: 32 if payload == "short" else None]
    fds = [_add_region(conn, ram2, GPA2, UVA2)[1] for _ in range(nfds)]
    with pytest.raises(FrontendError, match=match):
        conn.send(request_, body, fds)
    assert all(fd.num in conn.host.closed for fd in fds)
    assert len(conn.host.live_mappings()) == 1  # the first RAM only
    conn.publish(1)
    assert conn.backend.serve(0).taken == 1


def test_removing_a_region_that_is_not_there_is_refused(conn: Harness) -> None:
    conn.running()
    payload = SINGLE_MEM_REGION.pack(MemoryRegionRec(GPA2, RAM_SIZE, UVA2, 0))
    assert conn.ack(Request.REM_MEM_REG, payload) == 1
    assert "REM_MEM_REG: no region at gpa" in conn.backend.refusals[-1]


def test_a_stray_fd_with_rem_mem_reg_is_closed(conn: Harness) -> None:
    conn.running()
    ram2 = bytearray(RAM_SIZE)
    payload, fd = _add_region(conn, ram2, GPA2, UVA2)
    assert conn.ack(Request.ADD_MEM_REG, payload, [fd]) == 0
    stray = conn.fd(FdKind.FILE)
    assert conn.ack(Request.REM_MEM_REG, payload, [stray]) == 0
    assert stray.num in conn.host.closed


def test_adding_beyond_the_slots_is_refused(conn: Harness) -> None:
    conn.running()
    rams = [bytearray(0x1000) for _ in range(MAX_MEM_SLOTS)]
    acks = []
    for k, ram in enumerate(rams):
        payload, fd = _add_region(conn, ram, GPA2 + k * 0x1000, UVA2 + k * 0x1000)
        acks.append(conn.ack(Request.ADD_MEM_REG, payload, [fd]))
    assert acks[:-1] == [0] * (MAX_MEM_SLOTS - 1)  # the first RAM holds one slot
    assert acks[-1] == 1
    assert f"all {MAX_MEM_SLOTS} slots in use" in conn.backend.refusals[-1]


@pytest.mark.parametrize(
    "request_", [Request.GET_MAX_MEM_SLOTS, Request.ADD_MEM_REG, Request.REM_MEM_REG]
)
def test_memory_slot_requests_without_the_protocol_feature_end_the_connection(
    conn: Harness, request_: Request
) -> None:
    mask = ~int(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    conn.send(Request.SET_PROTOCOL_FEATURES, _u64(PROTOCOL & mask))
    payload = b"" if request_ == Request.GET_MAX_MEM_SLOTS else bytes(SINGLE_MEM_REGION.size)
    with pytest.raises(FrontendError, match="without the CONFIGURE_MEM_SLOTS protocol feature"):
        conn.send(request_, payload)


# --- inflight I/O tracking (GET/SET_INFLIGHT_FD) ----------------------------------------------------


def _inflight(num_queues: int = 1, queue_size: int = QUEUE_SIZE, size: int = 0) -> bytes:
    return INFLIGHT.pack(InflightRec(size, 0, num_queues, queue_size))


def _negotiate_inflight(conn: Harness) -> None:
    conn.device.inflight = True
    offered = conn.get_u64(Request.GET_FEATURES)
    protocol = PROTOCOL | int(ProtocolFeature.INFLIGHT_SHMFD)
    assert conn.get_u64(Request.GET_PROTOCOL_FEATURES) == protocol
    conn.send(Request.SET_PROTOCOL_FEATURES, _u64(protocol))
    assert conn.ack(Request.SET_FEATURES, _u64(offered & WANTED)) == 0


def _get_region(conn: Harness, num_queues: int = 1) -> tuple[InflightRec, Fd]:
    """GET_INFLIGHT_FD; the reply and the region's fd (taken as the server would send it)."""
    hdr, body = _split_reply(conn.send(Request.GET_INFLIGHT_FD, _inflight(num_queues)))
    assert hdr.request == Request.GET_INFLIGHT_FD
    (fd,) = conn.backend.take_reply_fds()
    return INFLIGHT.unpack(body), Fd(fd, FdKind.FILE)


def test_get_inflight_fd_answers_a_new_zeroed_region_and_its_fd(conn: Harness) -> None:
    _negotiate_inflight(conn)
    rec, fd = _get_region(conn, 2)
    assert rec == InflightRec(region_size(2, QUEUE_SIZE, packed=False), 0, 2, QUEUE_SIZE)
    assert fd.num in conn.host.created
    assert conn.host.files[fd.num] == bytes(rec.mmap_size)


def test_a_ring_started_with_an_inflight_region_records_its_chains_there(conn: Harness) -> None:
    _negotiate_inflight(conn)
    _, fd = _get_region(conn)
    region = conn.host.files[fd.num]
    assert conn.set_mem_table() == 0
    conn.start_ring()
    heads = conn.publish(2)
    assert conn.backend.serve(0).taken == 2  # taken and completed in one batch
    hdr = SPLIT_QUEUE_REGION.unpack_from(region)
    assert (hdr.version, hdr.desc_num, hdr.used_idx) == (1, QUEUE_SIZE, 2)
    entries = [
        SPLIT_DESC_STATE.unpack_from(region, SPLIT_QUEUE_REGION.size + 16 * h) for h in heads
    ]
    assert [e.counter for e in entries] == [0, 1]
    assert [e.inflight for e in entries] == [0, 0]  # completed


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_inflight(num_queues=0), "for 0 queues, the device has 2"),
        (_inflight(num_queues=3), "for 3 queues, the device has 2"),
        (_inflight(queue_size=0), "queue_size 0"),
        (_inflight()[:20], "payload of 20 bytes, expected 24"),
    ],
)
def test_a_malformed_get_inflight_fd_ends_the_connection(
    conn: Harness, payload: bytes, match: str
) -> None:
    _negotiate_inflight(conn)
    with pytest.raises(FrontendError, match=match):
        conn.send(Request.GET_INFLIGHT_FD, payload)
    assert conn.host.created == []


@pytest.mark.parametrize(
    ("size", "kind", "match"),
    [
        (64, FdKind.FILE, "inflight region of 64 bytes, 1 split queues of 16 entries need 320"),
        (320, FdKind.EVENTFD, "is an eventfd, not one file"),
    ],
)
def test_a_malformed_set_inflight_fd_ends_the_connection_and_closes_its_fd(
    conn: Harness, size: int, kind: FdKind, match: str
) -> None:
    _negotiate_inflight(conn)
    fd = conn.fd(kind)
    conn.host.files[fd.num] = bytearray(size)
    with pytest.raises(FrontendError, match=match):
        conn.send(Request.SET_INFLIGHT_FD, _inflight(size=size), [fd])
    assert fd.num in conn.host.closed


def test_inflight_requests_without_the_protocol_feature_end_the_connection(
    conn: Harness,
) -> None:
    conn.negotiate()  # the device does not opt in: INFLIGHT_SHMFD is not offered
    with pytest.raises(FrontendError, match="without the INFLIGHT_SHMFD protocol feature"):
        conn.send(Request.GET_INFLIGHT_FD, _inflight())


def test_set_inflight_fd_while_a_ring_runs_is_refused(conn: Harness) -> None:
    _negotiate_inflight(conn)
    assert conn.set_mem_table() == 0
    conn.start_ring()
    fd = conn.fd(FdKind.FILE)
    conn.host.files[fd.num] = bytearray(320)
    assert conn.ack(Request.SET_INFLIGHT_FD, _inflight(size=320), [fd]) == 1
    assert "SET_INFLIGHT_FD while rings run" in conn.backend.refusals[-1]


def test_a_hostile_inflight_region_refuses_the_ring_start_and_closes_its_kick_fd(
    conn: Harness,
) -> None:
    """What the front-end hands over is checked when the ring starts: a region whose header
    does not match the queue (here desc_num) ends the connection, the ring does not start."""
    _negotiate_inflight(conn)
    fd = conn.fd(FdKind.FILE)
    region = bytearray(320)
    region[: SPLIT_QUEUE_REGION.size] = SPLIT_QUEUE_REGION.pack(
        SPLIT_QUEUE_REGION.record(features=0, version=1, desc_num=99, last_batch_head=0, used_idx=0)
    )
    conn.host.files[fd.num] = region
    conn.send(Request.SET_INFLIGHT_FD, _inflight(size=320), [fd])
    assert conn.set_mem_table() == 0
    assert conn.ack(Request.SET_VRING_NUM, _state(0, QUEUE_SIZE)) == 0
    assert conn.ack(Request.SET_VRING_ADDR, conn.vring_addr()) == 0
    kick = conn.fd()
    with pytest.raises(FrontendError, match="desc_num 99, the queue size is 16"):
        conn.send(Request.SET_VRING_KICK, _u64(0), [kick])
    assert kick.num in conn.host.closed
    assert conn.device.calls == []
    assert not conn.backend.vrings[0].state.started


# --- the dirty log (SET_LOG_BASE, LOG_ALL) ------------------------------------------------------------

LOG_BYTES = (GPA + RAM_SIZE) // 4096 // 8 + 1
"""A log that covers the test RAM (one bit per 4 KiB page from guest-physical 0)."""


def _log_base(conn: Harness, size: int = LOG_BYTES) -> tuple[bytes | None, bytearray]:
    """SET_LOG_BASE with a new log "file" of ``size`` bytes: the reply and the log."""
    fd = conn.fd(FdKind.FILE)
    log = bytearray(size)
    conn.host.files[fd.num] = log
    payload = LOG_DESCRIPTION.pack(LogDescriptionRec(size, 0))
    return conn.send(Request.SET_LOG_BASE, payload, [fd]), log


def _pages(log: bytearray) -> set[int]:
    return {p for p in range(8 * len(log)) if log[p >> 3] >> (p & 7) & 1}


def test_set_log_base_is_always_answered_and_the_queues_mark_while_log_all_is_on(
    conn: Harness,
) -> None:
    conn.running()
    reply, log = _log_base(conn)  # no NEED_REPLY: QEMU waits for the answer all the same
    hdr, body = _split_reply(reply)
    assert (hdr.request, U64.unpack(body).u64) == (Request.SET_LOG_BASE, 0)
    conn.publish(1)
    assert conn.backend.serve(0).taken == 1
    assert _pages(log) == set()  # LOG_ALL is off: nothing marked
    features = conn.backend.acked_features
    assert conn.ack(Request.SET_FEATURES, _u64(features | LOG_ALL)) == 0
    used_page = conn.driver.used_addr // 4096
    assert used_page in _pages(log)  # turning it on marks the rings (what was written before)
    log[:] = bytes(len(log))
    (head,) = conn.publish(1)
    buffer_page = conn.driver.desc_table.get(head).addr // 4096
    assert conn.backend.serve(0).taken == 1
    assert {used_page, buffer_page} <= _pages(log)  # the used ring and the chain's buffer
    log[:] = bytes(len(log))
    assert conn.ack(Request.SET_FEATURES, _u64(features)) == 0  # migration over
    conn.publish(1)
    assert conn.backend.serve(0).taken == 1
    assert _pages(log) == set()


def test_a_log_address_given_with_vring_f_log_is_where_used_ring_writes_are_marked(
    conn: Harness,
) -> None:
    """QEMU turns logging on for a running ring with SET_VRING_ADDR(VHOST_VRING_F_LOG): the
    ring is not rebuilt (the device keeps its queue) and its used-ring marks go to ``log``."""
    conn.running()
    _, log = _log_base(conn)
    assert conn.ack(Request.SET_FEATURES, _u64(conn.backend.acked_features | LOG_ALL)) == 0
    elsewhere = GPA + 0x8000  # not the used ring's page: proves the log address is used
    rec = VRING_ADDR.unpack(conn.vring_addr())._replace(flags=VRING_F_LOG, log=elsewhere)
    assert conn.ack(Request.SET_VRING_ADDR, VRING_ADDR.pack(rec)) == 0
    assert conn.device.calls == []  # no rebuild: no hooks
    log[:] = bytes(len(log))
    conn.publish(1)
    assert conn.backend.serve(0).taken == 1
    marked = _pages(log)
    assert elsewhere // 4096 in marked


def test_a_log_too_small_for_the_memory_is_refused(conn: Harness) -> None:
    conn.running()
    fd = conn.fd(FdKind.FILE)
    conn.host.files[fd.num] = bytearray(16)
    payload = LOG_DESCRIPTION.pack(LogDescriptionRec(16, 0))
    assert conn.ack(Request.SET_LOG_BASE, payload, [fd]) == 1
    assert "covers 128 pages, the memory ends at 0x40010000" in conn.backend.refusals[-1]
    assert conn.backend.dirty_log is None


@pytest.mark.parametrize(
    ("kinds", "payload", "match"),
    [
        ((), LOG_DESCRIPTION.pack(LogDescriptionRec(LOG_BYTES, 0)), "0 fds, not one file"),
        ((FdKind.EVENTFD,), LOG_DESCRIPTION.pack(LogDescriptionRec(LOG_BYTES, 0)), "eventfd"),
        ((FdKind.FILE,), LOG_DESCRIPTION.pack(LogDescriptionRec(0, 0)), "size 0x0"),
        ((FdKind.FILE,), bytes(8), "payload of 8 bytes, expected 16"),
    ],
)
def test_a_malformed_set_log_base_ends_the_connection_and_closes_its_fds(
    conn: Harness, kinds: tuple[FdKind, ...], payload: bytes, match: str
) -> None:
    conn.running()
    fds = [conn.fd(kind) for kind in kinds]
    with pytest.raises(FrontendError, match=match):
        conn.send(Request.SET_LOG_BASE, payload, fds)
    assert all(fd.num in conn.host.closed for fd in fds)


def test_vring_addr_flags_other_than_log_end_the_connection(conn: Harness) -> None:
    conn.running()
    rec = VRING_ADDR.unpack(conn.vring_addr())._replace(flags=0x2)
    with pytest.raises(FrontendError, match="flags 0x2"):
        conn.send(Request.SET_VRING_ADDR, VRING_ADDR.pack(rec))


# --- busy polling: kicks paused and resumed --------------------------------------------------------


def test_paused_kicks_ask_the_driver_not_to_kick_and_resuming_re_checks_the_ring(
    conn: Harness,
) -> None:
    conn.running()
    conn.publish(2)
    assert conn.backend.serve(0).taken == 2
    assert kicks_wanted(conn)
    conn.backend.pause_kicks(0)
    assert not kicks_wanted(conn)  # used.flags NO_NOTIFY (no EVENT_IDX here)
    assert conn.backend.resume_kicks(0) is False  # nothing arrived meanwhile
    assert kicks_wanted(conn)
    conn.backend.pause_kicks(0)
    conn.publish(1)  # the driver published without kicking, as asked
    assert conn.backend.has_work(0)  # what a polling server looks at, every round
    assert conn.backend.resume_kicks(0) is True  # the server must give the ring a turn
    assert kicks_wanted(conn)
    assert conn.backend.serve(0).taken == 1
    assert not conn.backend.has_work(0)


def kicks_wanted(h: Harness) -> bool:
    """The device has not set ``used.flags`` NO_NOTIFY (a function: mypy narrows properties)."""
    return not h.driver.no_notify


def test_paused_kicks_with_event_idx_freeze_avail_event(conn: Harness) -> None:
    conn.negotiate(WANTED | int(Feature.EVENT_IDX))
    assert conn.set_mem_table() == 0
    conn.start_ring()
    conn.publish(1)
    conn.backend.serve(0)
    assert conn.driver.avail_event == 1  # following the taken index: the next chain kicks
    conn.backend.pause_kicks(0)
    conn.publish(3)
    assert conn.backend.serve(0).taken == 3
    assert conn.driver.avail_event == 1  # left behind: publishing past index 4 wants no kick
    assert conn.backend.resume_kicks(0) is False
    assert conn.driver.avail_event == 4  # following again: the next chain kicks


def test_pausing_and_resuming_a_ring_that_is_not_served_does_nothing(conn: Harness) -> None:
    conn.negotiate()
    assert conn.set_mem_table() == 0
    conn.backend.pause_kicks(0)  # not started
    assert conn.backend.resume_kicks(0) is False
    assert not conn.backend.has_work(0)
    conn.start_ring(enable=False)
    conn.publish(1)
    conn.backend.pause_kicks(0)  # started, disabled: no chain for anyone
    assert kicks_wanted(conn)
    assert not conn.backend.has_work(0)
    assert conn.backend.resume_kicks(0) is False
    assert conn.backend.serve(0) == Turn(0, ())


def test_a_disabled_ring_hands_out_no_chains_even_to_a_device_that_kept_its_queue(
    conn: Harness,
) -> None:
    conn.negotiate()
    assert conn.set_mem_table() == 0
    conn.start_ring(enable=False)
    kept = conn.device.kept[0]
    conn.publish(3)
    assert kept.budget == 0
    assert kept.next_chain() is None
    assert conn.backend.serve(0) == Turn(0, ())
    assert conn.device.taken == []  # handle never ran
    # enabled, then disabled again: what was published while it was enabled is served as the
    # ring is disabled (like a stop), then the same queue is closed to the device again
    assert conn.ack(Request.SET_VRING_ENABLE, _state(0, 1)) == 0
    assert conn.ack(Request.SET_VRING_ENABLE, _state(0, 0)) == 0
    assert conn.device.taken == [3]
    assert conn.used_idx_in() == 3
    assert conn.backend.take_calls() == [conn.call_fd]
    conn.publish(2)
    assert kept.budget == 0
    assert kept.next_chain() is None
    assert conn.backend.serve(0) == Turn(0, ())
    assert conn.used_idx_in() == 3
    assert conn.backend.take_calls() == []


def test_disabling_a_ring_serves_what_was_published_while_it_was_enabled(
    conn: Harness,
) -> None:
    """A kick read in the same round as SET_VRING_ENABLE 0 must not lose its turn: the frames
    a driver sent just before disabling (DPDK's stop) are taken first."""
    conn.running()
    heads = conn.publish(4)
    assert conn.ack(Request.SET_VRING_ENABLE, _state(0, 0)) == 0
    assert conn.device.calls == [("disabled", 0)]
    assert conn.device.taken == [4]
    assert [u.head for u in conn.driver.used()] == heads


# --- REPLY_ACK ---------------------------------------------------------------------------------------


def test_refused_request_with_need_reply_is_acked_1_and_changes_nothing(conn: Harness) -> None:
    conn.running()
    features = conn.backend.acked_features
    assert conn.ack(Request.SET_FEATURES, _u64(features | 1 << 50)) == 1  # never offered
    assert conn.backend.acked_features == features
    assert conn.ack(Request.SET_VRING_NUM, _state(0, 8)) == 1  # the ring runs
    assert conn.ack(Request.SET_VRING_BASE, _state(0, 5)) == 1
    assert len(conn.backend.refusals) == 3
    conn.publish(1)
    assert conn.backend.serve(0) == Turn(1, ())
    assert conn.get_vring_base(0) == VringStateRec(0, 1)  # size and position unchanged


def test_refused_request_without_need_reply_raises_request_refused(conn: Harness) -> None:
    conn.negotiate()
    features = conn.backend.acked_features
    with pytest.raises(RequestRefused, match="unoffered"):
        conn.send(Request.SET_FEATURES, _u64(features | 1 << 50))
    assert conn.backend.acked_features == features
    assert conn.backend.refusals == []


def test_need_reply_without_reply_ack_negotiated_gets_no_ack_and_a_refusal_raises(
    conn: Harness,
) -> None:
    assert conn.send(Request.SET_OWNER, need_reply=True) is None
    with pytest.raises(RequestRefused):
        conn.send(Request.SET_FEATURES, _u64(1 << 50), need_reply=True)


def test_successful_request_with_need_reply_is_acked_0(conn: Harness) -> None:
    conn.negotiate()
    assert conn.ack(Request.SET_OWNER) == 0
    assert conn.ack(Request.SET_VRING_NUM, _state(1, 8)) == 0
    assert conn.send(Request.SET_VRING_NUM, _state(1, 8)) is None  # no NEED_REPLY: no reply


def test_request_the_core_does_not_know_is_refused_with_ack_1_when_asked(conn: Harness) -> None:
    conn.negotiate()
    assert conn.ack(Request.SEND_RARP, bytes(8)) == 1


# --- header flags ----------------------------------------------------------------------------------


def test_request_with_the_reply_flag_is_a_frontend_error_and_its_fd_is_closed(
    conn: Harness,
) -> None:
    call = conn.fd()
    with pytest.raises(FrontendError, match="REPLY flag"):
        conn.send(Request.SET_VRING_CALL, _u64(0), [call], flags=VERSION | HeaderFlags.REPLY)
    assert conn.host.closed == [call.num]


@pytest.mark.parametrize("bit", [0x10, 0x20, 0x100, 0x8000, 0x80000000])
def test_reserved_header_flag_is_a_frontend_error(conn: Harness, bit: int) -> None:
    call = conn.fd()
    with pytest.raises(FrontendError, match="reserved flags"):
        conn.send(Request.SET_VRING_CALL, _u64(0), [call], flags=VERSION | bit)
    assert conn.host.closed == [call.num]
    with pytest.raises(FrontendError, match="reserved flags"):
        conn.send(Request.GET_FEATURES, flags=VERSION | NEED_REPLY | bit)


@pytest.mark.parametrize("version", [0, 2, 3])
def test_protocol_version_other_than_1_is_a_frontend_error(conn: Harness, version: int) -> None:
    with pytest.raises(FrontendError, match=f"protocol version {version}, expected 1"):
        conn.send(Request.GET_FEATURES, flags=version)


def test_fds_with_a_request_that_carries_none_are_a_frontend_error_and_closed(
    conn: Harness,
) -> None:
    fd = conn.fd()
    with pytest.raises(FrontendError, match="does not carry fds"):
        conn.send(Request.SET_OWNER, b"", [fd])
    assert conn.host.closed == [fd.num]


# --- payload sizes ---------------------------------------------------------------------------------

_FIXED_SIZES: dict[Request, int] = {
    Request.GET_FEATURES: 0,
    Request.SET_FEATURES: U64.size,
    Request.SET_OWNER: 0,
    Request.RESET_OWNER: 0,
    Request.GET_PROTOCOL_FEATURES: 0,
    Request.SET_PROTOCOL_FEATURES: U64.size,
    Request.GET_QUEUE_NUM: 0,
    Request.SET_VRING_NUM: VRING_STATE.size,
    Request.SET_VRING_ADDR: VRING_ADDR.size,
    Request.SET_VRING_BASE: VRING_STATE.size,
    Request.GET_VRING_BASE: VRING_STATE.size,
    Request.SET_VRING_KICK: U64.size,
    Request.SET_VRING_CALL: U64.size,
    Request.SET_VRING_ERR: U64.size,
    Request.SET_VRING_ENABLE: VRING_STATE.size,
}
_FIXED_CASES = [
    (request, length)
    for request, size in _FIXED_SIZES.items()
    for length in (size - 1, size + 1, size + 8)
    if length >= 0
]


@pytest.mark.parametrize(
    ("request_", "length"), _FIXED_CASES, ids=[f"{r.name}-{n}" for r, n in _FIXED_CASES]
)
def test_fixed_size_request_with_a_wrong_payload_size_is_a_frontend_error_naming_the_sizes(
    conn: Harness, request_: Request, length: int
) -> None:
    conn.negotiate()
    expected = _FIXED_SIZES[request_]
    with pytest.raises(FrontendError, match=f"payload of {length} bytes, expected {expected}"):
        conn.send(request_, bytes(length))


@pytest.mark.parametrize("request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL])
def test_fd_of_a_message_with_a_wrong_payload_size_is_closed(
    conn: Harness, request_: Request
) -> None:
    fd = conn.fd()
    with pytest.raises(FrontendError, match="payload of 9 bytes, expected 8"):
        conn.send(request_, bytes(9), [fd])
    assert conn.host.closed == [fd.num]


def test_mem_table_shorter_than_its_header_is_a_frontend_error_naming_the_size(
    conn: Harness,
) -> None:
    fd = conn.fd(FdKind.FILE)
    with pytest.raises(FrontendError, match="payload of 4 bytes"):
        conn.send(Request.SET_MEM_TABLE, bytes(4), [fd])
    assert conn.host.closed == [fd.num]


@pytest.mark.parametrize("delta", [-1, 1, MEM_REGION.size])
def test_mem_table_whose_size_does_not_match_its_regions_is_a_frontend_error_naming_the_sizes(
    conn: Harness, delta: int
) -> None:
    payload, fd = conn.region()
    size = len(payload)
    bad = payload[:-1] if delta < 0 else payload + bytes(delta)
    with pytest.raises(FrontendError, match=f"payload of {size + delta} bytes, expected {size}"):
        conn.send(Request.SET_MEM_TABLE, bad, [fd])
    assert conn.host.closed == [fd.num]
    assert conn.host.mappings == []


@pytest.mark.parametrize("request_", [Request.GET_CONFIG, Request.SET_CONFIG])
@pytest.mark.parametrize("delta", [-1, 1])
def test_config_message_with_a_wrong_payload_size_is_a_frontend_error_naming_the_sizes(
    conn: Harness, request_: Request, delta: int
) -> None:
    conn.negotiate()
    payload = _config(4, bytes(4))
    bad = payload[:delta] if delta < 0 else payload + bytes(delta)
    with pytest.raises(
        FrontendError, match=f"payload of {len(bad)} bytes, expected {len(payload)}"
    ):
        conn.send(request_, bad)
    assert conn.device.config_writes == []


@pytest.mark.parametrize("request_", [Request.GET_CONFIG, Request.SET_CONFIG])
def test_config_message_shorter_than_its_header_is_a_frontend_error_naming_the_size(
    conn: Harness, request_: Request
) -> None:
    conn.negotiate()
    with pytest.raises(FrontendError, match=f"payload of {CONFIG_HDR.size - 1} bytes"):
        conn.send(request_, bytes(CONFIG_HDR.size - 1))


# --- SET_FEATURES while a ring runs ----------------------------------------------------------------


def test_set_features_while_a_ring_runs_with_the_same_value_is_accepted(conn: Harness) -> None:
    conn.running()
    features = conn.backend.acked_features
    assert conn.ack(Request.SET_FEATURES, _u64(features)) == 0
    assert conn.backend.acked_features == features
    assert conn.device.calls == []  # the ring was not disturbed


@pytest.mark.parametrize(
    "bit", [Feature.EVENT_IDX, Feature.RING_PACKED, Feature.INDIRECT_DESC, Feature.VERSION_1]
)
def test_set_features_changing_a_bit_while_a_ring_runs_is_refused(
    conn: Harness, bit: Feature
) -> None:
    conn.running()
    features = conn.backend.acked_features
    assert conn.ack(Request.SET_FEATURES, _u64(features ^ bit)) != 0
    assert conn.backend.acked_features == features
    assert "while ring(s) [0] run" in conn.backend.refusals[-1]
    conn.publish(1)
    assert conn.backend.serve(0) == Turn(1, ())  # still served as a split ring


def test_set_features_may_turn_log_all_on_and_off_while_a_ring_runs(conn: Harness) -> None:
    conn.running()
    features = conn.backend.acked_features
    assert conn.ack(Request.SET_FEATURES, _u64(features | LOG_ALL)) == 0
    assert conn.ack(Request.SET_FEATURES, _u64(features)) == 0
    conn.publish(1)
    assert conn.backend.serve(0) == Turn(1, ())


def test_log_all_is_not_offered_to_a_device_without_the_dirty_log(conn: Harness) -> None:
    conn.device.protocol_features = lambda: int(ProtocolFeature.REPLY_ACK)  # type: ignore[method-assign]
    offered = conn.get_u64(Request.GET_FEATURES)
    assert not offered & LOG_ALL
    conn.send(Request.SET_PROTOCOL_FEATURES, _u64(int(ProtocolFeature.REPLY_ACK)))
    assert conn.ack(Request.SET_FEATURES, _u64(offered | LOG_ALL)) != 0
    assert "unoffered" in conn.backend.refusals[-1]


def test_set_features_may_change_bits_again_once_the_ring_stopped(conn: Harness) -> None:
    conn.running()
    conn.get_vring_base(0)
    features = conn.backend.acked_features | Feature.EVENT_IDX
    assert conn.ack(Request.SET_FEATURES, _u64(features)) == 0
    assert conn.backend.acked_features == features


# --- config space ----------------------------------------------------------------------------------


def test_set_config_inside_a_writable_range_reaches_the_device(conn: Harness) -> None:
    conn.negotiate()
    assert conn.ack(Request.SET_CONFIG, _config(4, b"\x01\x02\x03\x04")) == 0
    assert conn.ack(Request.SET_CONFIG, _config(5, b"\x09")) == 0
    assert conn.device.config_writes == [(4, b"\x01\x02\x03\x04"), (5, b"\x09")]


@pytest.mark.parametrize(("offset", "size"), [(0, 4), (2, 4), (6, 4), (8, 1), (0, 16)])
def test_set_config_of_a_read_only_field_is_refused(conn: Harness, offset: int, size: int) -> None:
    conn.negotiate()
    assert conn.ack(Request.SET_CONFIG, _config(offset, bytes(size))) != 0
    assert conn.device.config_writes == []
    assert "not a writable field" in conn.backend.refusals[-1]


@pytest.mark.parametrize(("offset", "size"), [(0, 4), (0, 16), (10, 6), (15, 1)])
def test_set_config_with_the_migration_flag_writes_any_field(
    conn: Harness, offset: int, size: int
) -> None:
    conn.negotiate()
    data = bytes(range(size))
    assert conn.ack(Request.SET_CONFIG, _config(offset, data, flags=1)) == 0
    assert conn.device.config_writes == [(offset, data)]


@pytest.mark.parametrize("flags", [2, 3, 0x100])
def test_set_config_with_unknown_flags_is_a_frontend_error(conn: Harness, flags: int) -> None:
    conn.negotiate()
    with pytest.raises(FrontendError, match="SET_CONFIG flags"):
        conn.send(Request.SET_CONFIG, _config(4, bytes(4), flags=flags), need_reply=True)
    assert conn.device.config_writes == []


@pytest.mark.parametrize("flags", [0, 1])
@pytest.mark.parametrize(("offset", "size"), [(12, 8), (16, 1), (4, 13)])
def test_set_config_past_the_config_space_is_refused(
    conn: Harness, flags: int, offset: int, size: int
) -> None:
    conn.negotiate()
    assert conn.ack(Request.SET_CONFIG, _config(offset, bytes(size), flags=flags)) != 0
    assert conn.device.config_writes == []
    assert "outside the 16-byte config space" in conn.backend.refusals[-1]


def test_get_config_inside_the_space_returns_the_bytes(conn: Harness) -> None:
    conn.negotiate()
    hdr, body = _split_reply(conn.send(Request.GET_CONFIG, _config(2, bytes(4))))
    assert hdr.request == Request.GET_CONFIG
    assert CONFIG_HDR.unpack(body[: CONFIG_HDR.size]) == ConfigHdrRec(2, 4, 0)
    assert body[CONFIG_HDR.size :] == CONFIG[2:6]


@pytest.mark.parametrize(("offset", "size"), [(12, 8), (16, 1), (0, 17)])
def test_get_config_past_the_end_returns_an_empty_payload(
    conn: Harness, offset: int, size: int
) -> None:
    conn.negotiate()
    reply = conn.send(Request.GET_CONFIG, _config(offset, bytes(size)))
    hdr, body = _split_reply(reply)
    assert hdr == HeaderRec(Request.GET_CONFIG, VERSION | HeaderFlags.REPLY, 0)
    assert body == b""


def test_config_messages_without_the_config_protocol_feature_are_frontend_errors(
    conn: Harness,
) -> None:
    with pytest.raises(FrontendError, match="without the CONFIG protocol feature"):
        conn.send(Request.GET_CONFIG, _config(0, bytes(4)))


# --- fd kinds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_", [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]
)
@pytest.mark.parametrize("kind", [FdKind.FILE, FdKind.OTHER])
def test_notification_fd_that_is_not_an_eventfd_or_pipe_is_a_frontend_error_and_closed(
    conn: Harness, request_: Request, kind: FdKind
) -> None:
    conn.negotiate()
    assert conn.set_mem_table() == 0
    assert conn.ack(Request.SET_VRING_NUM, _state(0, QUEUE_SIZE)) == 0
    assert conn.ack(Request.SET_VRING_ADDR, conn.vring_addr()) == 0
    fd = conn.fd(kind)
    with pytest.raises(FrontendError, match=f"{kind.value}, not an eventfd or a pipe"):
        conn.send(request_, _u64(0), [fd], need_reply=True)
    assert fd.num in conn.host.closed
    assert conn.device.calls == []  # a kick of the wrong kind starts nothing
    assert conn.backend.kick_fds() == {}


@pytest.mark.parametrize("kind", [FdKind.PIPE, FdKind.EVENTFD])
def test_notification_fd_that_is_a_pipe_or_eventfd_is_kept(conn: Harness, kind: FdKind) -> None:
    fd = conn.fd(kind)
    assert conn.send(Request.SET_VRING_CALL, _u64(0), [fd]) is None
    assert conn.host.closed == []  # kept by the ring until the connection closes


@pytest.mark.parametrize("kind", [FdKind.EVENTFD, FdKind.PIPE, FdKind.OTHER])
def test_memory_fd_that_is_not_a_file_is_a_frontend_error_and_nothing_is_mapped(
    conn: Harness, kind: FdKind
) -> None:
    conn.negotiate()
    fd = conn.fd(kind)
    conn.host.files[fd.num] = conn.ram
    payload, _ = conn.region(fd)
    with pytest.raises(FrontendError, match=f"{kind.value}, not a file"):
        conn.send(Request.SET_MEM_TABLE, payload, [fd], need_reply=True)
    assert conn.host.closed == [fd.num]
    assert conn.host.mappings == []
    assert conn.backend.memory is None


def test_memory_the_host_refuses_is_acked_1_and_no_mapping_remains(conn: Harness) -> None:
    conn.negotiate()
    first, second = conn.fd(FdKind.FILE), conn.fd(FdKind.FILE)
    conn.host.files[first.num] = conn.ram
    conn.host.files[second.num] = bytearray(RAM_SIZE)
    conn.host.refuse.add(second.num)
    payload = _mem_table(
        MemoryRegionRec(GPA, RAM_SIZE, UVA, 0),
        MemoryRegionRec(GPA + RAM_SIZE, RAM_SIZE, UVA + RAM_SIZE, 0),
    )
    assert conn.ack(Request.SET_MEM_TABLE, payload, [first, second]) == 1
    assert "refused by the test" in conn.backend.refusals[-1]
    assert len(conn.host.mappings) == 1  # the first region was mapped ...
    assert conn.host.live_mappings() == []  # ... and unmapped again
    assert sorted(conn.host.closed) == [first.num, second.num]
    assert conn.backend.memory is None


def test_memory_the_host_refuses_without_need_reply_raises_request_refused(
    conn: Harness,
) -> None:
    conn.negotiate()
    payload, fd = conn.region()
    conn.host.refuse.add(fd.num)
    with pytest.raises(RequestRefused, match="refused by the test"):
        conn.send(Request.SET_MEM_TABLE, payload, [fd])
    assert conn.host.closed == [fd.num]
    assert conn.host.live_mappings() == []


def test_refused_new_memory_table_keeps_the_running_ring_on_the_old_one(conn: Harness) -> None:
    conn.running()
    (old,) = conn.host.mappings
    payload, fd = conn.region()
    conn.host.refuse.add(fd.num)
    assert conn.ack(Request.SET_MEM_TABLE, payload, [fd]) == 1
    assert not old.closed
    assert conn.device.calls == []
    conn.publish(1)
    assert conn.backend.serve(0) == Turn(1, ())


# --- polling (NOFD kick) ---------------------------------------------------------------------------


def test_kick_without_fd_starts_a_polled_ring(conn: Harness) -> None:
    conn.negotiate()
    assert conn.set_mem_table() == 0
    conn.start_ring(nofd=True)
    assert conn.device.calls == [("started", 0), ("enabled", 0)]
    assert conn.backend.polled_rings() == [0]
    assert conn.backend.kick_fds() == {}
    conn.publish(2)
    assert conn.backend.serve(0) == Turn(2, ())


def test_a_later_kick_with_an_fd_moves_a_polled_ring_off_polling(conn: Harness) -> None:
    conn.negotiate()
    assert conn.set_mem_table() == 0
    conn.start_ring(nofd=True)
    kick = conn.fd()
    assert conn.ack(Request.SET_VRING_KICK, _u64(0), [kick]) == 0
    assert conn.backend.polled_rings() == []
    assert conn.backend.kick_fds() == {kick.num: 0}
    assert conn.device.calls == [("started", 0), ("enabled", 0)]  # the ring never stopped


def test_a_kick_without_fd_replaces_a_kick_fd_and_closes_it(conn: Harness) -> None:
    conn.running()
    assert conn.ack(Request.SET_VRING_KICK, _u64(NOFD)) == 0
    assert conn.kick_fd in conn.host.closed
    assert conn.backend.polled_rings() == [0]
    assert conn.backend.kick_fds() == {}


def test_nofd_flag_with_an_fd_is_a_frontend_error_and_the_fd_is_closed(conn: Harness) -> None:
    conn.negotiate()
    assert conn.set_mem_table() == 0
    assert conn.ack(Request.SET_VRING_NUM, _state(0, QUEUE_SIZE)) == 0
    assert conn.ack(Request.SET_VRING_ADDR, conn.vring_addr()) == 0
    kick = conn.fd()
    with pytest.raises(FrontendError, match="nofd=True"):
        conn.send(Request.SET_VRING_KICK, _u64(NOFD), [kick])
    assert conn.host.closed.count(kick.num) == 1
    assert conn.device.calls == []


# --- a kick fd that failed -------------------------------------------------------------------------


def test_kick_failed_stops_the_ring_closes_its_kick_fd_and_keeps_its_position(
    conn: Harness,
) -> None:
    conn.running()
    conn.publish(3)
    assert conn.backend.serve(0) == Turn(3, ())
    conn.backend.kick_failed(0, "kick pipe is at end-of-file")
    assert conn.device.calls == [("disabled", 0), ("stopped", 0)]
    assert conn.kick_fd is not None
    assert conn.host.closed.count(conn.kick_fd) == 1
    assert conn.backend.kick_fds() == {}
    assert conn.backend.serve(0) == Turn(0, ())
    assert conn.get_vring_base(0) == VringStateRec(0, 3)
    assert conn.device.calls == [("disabled", 0), ("stopped", 0)]  # nothing more to stop


# --- a new memory table while running --------------------------------------------------------------


def test_new_memory_table_while_running_moves_the_queue_and_releases_the_old_mapping(
    conn: Harness,
) -> None:
    conn.running()
    conn.publish(2)
    assert conn.backend.serve(0) == Turn(2, ())
    conn.driver.used()
    (old_mapping,) = conn.host.mappings
    old_ram = conn.ram

    # the front-end moves guest RAM to a new file: same addresses, a copy of the contents
    new_ram = bytearray(old_ram)
    new_memory = FakeMemory.over([(GPA, new_ram)])
    new_memory.copy_allocations(conn.memory)
    conn.driver_memories.append(new_memory)
    conn.driver.remap(new_memory)
    conn.ram = new_ram
    assert conn.set_mem_table() == 0

    assert conn.device.calls == [("disabled", 0), ("stopped", 0), ("started", 0), ("enabled", 0)]
    assert old_mapping.closed
    assert len(conn.host.live_mappings()) == 1
    (head,) = conn.publish(1)
    assert conn.backend.serve(0) == Turn(1, ())
    assert conn.used_idx_in(new_ram) == 3  # continued at its position, in the new memory
    assert conn.used_idx_in(old_ram) == 2  # the old memory is no longer written
    assert conn.driver.used_ring.elem(2).id == head
    assert [u.data for u in conn.driver.used()] == [REPLY_DATA]
    assert conn.get_vring_base(0) == VringStateRec(0, 3)


# --- teardown ----------------------------------------------------------------------------------------


def test_close_stops_running_rings_and_releases_every_fd_and_mapping(conn: Harness) -> None:
    conn.running()
    err = conn.fd()
    assert conn.ack(Request.SET_VRING_ERR, _u64(0), [err]) == 0
    conn.backend.close()
    assert conn.device.calls == [("disabled", 0), ("stopped", 0)]
    assert sorted(conn.host.closed) == sorted(conn.given)
    assert conn.host.live_mappings() == []
    assert conn.backend.memory is None


def test_reset_owner_stops_every_ring(conn: Harness) -> None:
    conn.running()
    assert conn.ack(Request.RESET_OWNER) == 0
    assert conn.device.calls == [("disabled", 0), ("stopped", 0)]
    assert conn.backend.kick_fds() == {}
    assert conn.kick_fd in conn.host.closed
    assert not conn.backend.owner


def test_request_for_a_ring_the_device_lacks_is_a_frontend_error_naming_the_connection(
    conn: Harness,
) -> None:
    with pytest.raises(FrontendError, match=re.escape("test: ")):
        conn.send(Request.SET_VRING_ENABLE, _state(5, 1))


def test_close_releases_every_fd_and_mapping_even_when_a_device_hook_raises(
    conn: Harness,
) -> None:
    conn.running()

    def broken(index: int) -> None:
        raise RuntimeError("device bug in stopped")

    conn.device.stopped = broken  # type: ignore[method-assign]  # a device bug, for the test
    with pytest.raises(RuntimeError, match="device bug in stopped"):
        conn.backend.close()
    assert sorted(conn.host.closed) == sorted(conn.given)  # the kick fd included
    assert conn.host.live_mappings() == []
    conn.device.stopped = lambda index: None  # type: ignore[method-assign]  # fixed again
