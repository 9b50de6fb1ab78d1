"""The vhost-user transport, driven by a test front-end over a real unix socket.

The server runs :meth:`~virtio_schema.vhost_user.VhostUserServer.serve_forever` in a thread; the
front-end (:mod:`virtio_schema.testing.frontend`) plays QEMU: it sends the messages QEMU 7.2 sends, in the
order it sends them, shares guest memory as a memfd and notifies through eventfds, and plays the
guest driver on rings laid out in that shared memory. Hostile front-ends check that a bad peer costs
only its own connection: no fd leaked, the server goes on serving everyone else.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from virtio_schema.chain import WritableChain
from virtio_schema.errors import DeviceUsageError
from virtio_schema.examples.blk import BlkDevice, VhostUserBlk
from virtio_schema.examples.rng import RngDevice
from virtio_schema.mem import DriverRange
from virtio_schema.queue import DescChain, VirtQueue
from virtio_schema.records import BLK_CONFIG, BLK_REQ_HDR, BlkReqHdr
from virtio_schema.schema import BlkStatus, BlkType, DescFlags, Feature
from virtio_schema.testing.frontend import (
    GPA_BASE,
    NOFD,
    UVA_BASE,
    Frontend,
    GuestRam,
    SplitRingDriver,
    UsedChain,
    fd_count,
    is_readable,
    kick,
    make_eventfd,
    wait_for,
    wait_signalled,
)
from virtio_schema.vhost_user import ServerAddressInUse, VhostUserDevice, VhostUserServer
from virtio_schema.vhost_user.backend import LOG_ALL, Backend
from virtio_schema.vhost_user.device import OFFERED_PROTOCOL_FEATURES
from virtio_schema.vhost_user.inflight import queue_region_size
from virtio_schema.vhost_user.messages import (
    CONFIG_HDR,
    HEADER,
    MAX_CONFIG_SIZE,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_STATE,
    BackendRequest,
    ConfigHdrRec,
    HeaderRec,
    ProtocolFeature,
    Request,
    U64Rec,
    VringStateRec,
    decode_capture,
    describe,
    parse_capture,
)
from virtio_schema.vhost_user.server import NotAFactory

SECTORS = 64
SECTOR = 512
QUEUE_SIZE = 16
PROTOCOL = int(
    ProtocolFeature.MQ
    | ProtocolFeature.LOG_SHMFD
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.BACKEND_REQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.RESET_DEVICE
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS
)
"""What the back-end offers and QEMU's vhost-user-blk accepts of it."""
WANTED = int(
    Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX | Feature.PROTOCOL_FEATURES
)
"""The virtio features the test driver negotiates (split ring, indirect tables, EVENT_IDX)."""
TRACE_LOGGER = "virtio_schema.vhost_user.trace"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Iterator[io.FileIO]:
    """A disk image whose sectors all differ (a read from the wrong sector shows)."""
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(7).randbytes(SECTORS * SECTOR))
    with open(path, "r+b", buffering=0) as f:
        yield f


def _image_bytes(image: io.FileIO, sector: int, length: int) -> bytes:
    return os.pread(image.fileno(), length, sector * SECTOR)


@contextmanager
def serving(
    path: Path,
    factory: Callable[[], VhostUserDevice],
    *,
    trace: bool = False,
    capture: Path | None = None,
    io_timeout: float = 0.5,
    busy_poll: float = 0.0,
) -> Iterator[VhostUserServer]:
    """A server listening on ``path``, its loop in a daemon thread; stopped and joined on exit."""
    assert len(str(path)) < 100, f"unix socket path too long: {path}"
    server = VhostUserServer(
        str(path),
        factory,
        trace=trace,
        capture=None if capture is None else str(capture),
        io_timeout=io_timeout,
        busy_poll=busy_poll,
    )
    server.listen()
    thread = threading.Thread(target=server.serve_forever, name="vhost-user-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the server loop did not stop"


@pytest.fixture
def blk(image: io.FileIO) -> BlkDevice:
    return BlkDevice(image)


@pytest.fixture
def blk_server(tmp_path: Path, blk: BlkDevice) -> Iterator[VhostUserServer]:
    with serving(tmp_path / "vu.sock", lambda: VhostUserBlk(blk)) as server:
        yield server


# --- a QEMU-like session -----------------------------------------------------------------------


@dataclass
class Session:
    """A front-end with its RAM, one ring and its eventfds (all closed with the session)."""

    fe: Frontend
    ram: GuestRam
    ring: SplitRingDriver
    kick_fd: int
    call_fd: int
    stack: ExitStack = field(repr=False)

    def eventfd(self) -> int:
        fd = make_eventfd()
        self.stack.callback(os.close, fd)
        return fd


@contextmanager
def session(path: str, *, ram_name: str = "vu-ram", start: bool = True) -> Iterator[Session]:
    """Connect; with ``start`` negotiate as QEMU does and start ring 0 (enabled)."""
    with ExitStack() as stack:
        fe = stack.enter_context(Frontend(path))
        ram = stack.enter_context(GuestRam(name=ram_name))
        kick_fd, call_fd = make_eventfd(), make_eventfd()
        stack.callback(os.close, kick_fd)
        stack.callback(os.close, call_fd)
        s = Session(fe, ram, SplitRingDriver(ram, QUEUE_SIZE), kick_fd, call_fd, stack)
        if start:
            negotiate(fe)
            assert fe.use_ram(ram, need_reply=True) == 0
            start_ring(s, enable=True)
        yield s


def negotiate(fe: Frontend, *, protocol: bool = True) -> int:
    """Feature negotiation as QEMU does it; returns the acked virtio features."""
    offered = fe.get_features()
    wanted = WANTED if protocol else WANTED & ~Feature.PROTOCOL_FEATURES
    if protocol:
        offered_protocol = fe.get_protocol_features()
        # INFLIGHT_SHMFD: only the devices that opt in (blk does, rng does not)
        assert offered_protocol in (PROTOCOL, PROTOCOL & ~int(ProtocolFeature.INFLIGHT_SHMFD))
        fe.set_protocol_features(offered_protocol)
    fe.set_owner()
    fe.set_features(offered & wanted)
    return offered & wanted


def start_ring(s: Session, *, enable: bool, base: int = 0, kick_fd: int | None = None) -> None:
    """The per-start ring sequence QEMU sends (NUM, BASE, ADDR, CALL, KICK, ENABLE)."""
    s.fe.set_vring_num(0, QUEUE_SIZE)
    s.fe.set_vring_base(0, base)
    s.fe.set_vring_addr(s.ring.vring_addr(0))
    s.fe.set_vring_call(0, s.call_fd)
    s.fe.set_vring_kick(0, s.kick_fd if kick_fd is None else kick_fd)
    if enable:
        s.fe.set_vring_enable(0, 1)


def publish_blk_read(ring: SplitRingDriver, sector: int, length: int) -> int:
    """A virtio-blk IN request: header, ``length`` data bytes, status byte."""
    hdr = BLK_REQ_HDR.pack(BlkReqHdr(BlkType.IN, 0, sector))
    return ring.publish([hdr], [length, 1])


def check_blk_read(used: UsedChain, image: io.FileIO, sector: int, length: int) -> None:
    assert used.len == length + 1
    assert used.data[:length] == _image_bytes(image, sector, length)
    assert used.data[length] == BlkStatus.OK


def serve_blk_read(s: Session, image: io.FileIO, sector: int, length: int = SECTOR) -> UsedChain:
    """Publish a read, kick, wait for the call, check the data against the image."""
    head = publish_blk_read(s.ring, sector, length)
    kick(s.kick_fd)
    assert wait_signalled(s.call_fd), "no used-buffer notification"
    (used,) = s.ring.used()
    assert used.head == head
    check_blk_read(used, image, sector, length)
    return used


def roundtrip(fe: Frontend) -> None:
    """A request with a reply: everything sent before it has been handled."""
    fe.get_queue_num()


# --- the front-end's driver ---------------------------------------------------------------------


def test_front_end_driver_keeps_used_event_at_the_last_used_entry_and_refuses_a_full_ring() -> None:
    with GuestRam(name="vu-driver") as ram:
        ring = SplitRingDriver(ram, 2)
        heads = [ring.publish([b"req"]), ring.publish(writable=[2])]
        with pytest.raises(DeviceUsageError, match="no room"):
            ring.publish([b"one too many"])
        ring.used_ring.set_elem(0, heads[1], 2)  # the device's part, by hand
        ring.used_ring.set_idx(1)
        assert [u.head for u in ring.used()] == [heads[1]]
        assert ring.avail.used_event() == 1  # notify me when used entry 1 is written
        assert ring.publish([b"again"]) == heads[1]  # its descriptor was freed


# --- the QEMU sequence -------------------------------------------------------------------------


def test_qemu_sequence_negotiates_serves_stops_and_restarts_at_the_base(
    blk_server: VhostUserServer, blk: BlkDevice, image: io.FileIO
) -> None:
    with session(blk_server.path, start=False) as s:
        fe, ring = s.fe, s.ring
        err_fd = s.eventfd()
        # init: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
        # SET_OWNER, GET_FEATURES, SET_VRING_CALL, SET_VRING_ERR, GET_CONFIG
        offered = fe.get_features()
        assert offered == blk.features | Feature.PROTOCOL_FEATURES | LOG_ALL
        assert offered & (1 << 30)
        assert fe.get_protocol_features() == PROTOCOL
        fe.set_protocol_features(PROTOCOL)
        assert fe.get_queue_num() == 1
        fe.set_owner()
        assert fe.get_features() == offered
        fe.set_vring_call(0, s.call_fd)
        fe.set_vring_err(0, err_fd)
        assert fe.get_config(0, BLK_CONFIG.size, 0) == (
            ConfigHdrRec(0, BLK_CONFIG.size, 0),
            blk.config(),
        )
        assert BLK_CONFIG.unpack(blk.config()).capacity == SECTORS
        # start: SET_FEATURES, SET_VRING_CALL, SET_FEATURES, SET_MEM_TABLE (NEED_REPLY),
        # SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_ENABLE 1
        acked = offered & WANTED
        fe.set_features(acked)
        fe.set_vring_call(0, s.call_fd)
        fe.set_features(acked)
        assert fe.use_ram(s.ram, need_reply=True) == 0
        start_ring(s, enable=True)

        serve_blk_read(s, image, 3, 2 * SECTOR)
        serve_blk_read(s, image, 0, SECTOR)  # EVENT_IDX: notified again for the second batch
        assert ring.used_idx == 2

        # stop: SET_VRING_ENABLE 0, GET_VRING_BASE -> the avail position the device reached
        fe.set_vring_enable(0, 0)
        assert fe.get_vring_base(0) == (0, 2)
        assert blk.requests == 2

        # restart at that base with a new kick eventfd
        new_kick = s.eventfd()
        start_ring(s, enable=True, base=2, kick_fd=new_kick)
        head = publish_blk_read(ring, 5, SECTOR)
        kick(new_kick)
        assert wait_signalled(s.call_fd)
        (used,) = ring.used()
        assert used.head == head
        check_blk_read(used, image, 5, SECTOR)
        assert ring.used_idx == 3
        assert ring.used_ring.elem(2).id == head  # slot 2: where base 2 said to continue

        # the old kick fd is no longer watched: a kick on it is neither drained nor served
        assert wait_for(lambda: not is_readable(new_kick))
        roundtrip(fe)  # (a kick still being handled could serve the next request)
        publish_blk_read(ring, 6, SECTOR)
        kick(s.kick_fd)
        roundtrip(fe)
        roundtrip(fe)
        assert is_readable(s.kick_fd)
        assert ring.used_idx == 3
        kick(new_kick)
        assert wait_signalled(s.call_fd)
        (used,) = ring.used()
        check_blk_read(used, image, 6, SECTOR)
        assert fe.get_vring_base(0) == (0, 4)


def test_get_config_returns_the_requested_window(
    blk_server: VhostUserServer, blk: BlkDevice
) -> None:
    with Frontend(blk_server.path) as fe:
        negotiate(fe)
        assert fe.get_config(8, 8, 0) == (ConfigHdrRec(8, 8, 0), blk.config()[8:16])
        # past the end of the blk config: the failed GET_CONFIG of vhost-user.rst, an empty
        # payload (QEMU reports it), and the connection goes on
        end = len(blk.config())
        assert fe.get_config(end - 4, 8, 0) is None
        assert fe.get_config(MAX_CONFIG_SIZE - 4, 4, 0) is None
        assert fe.get_config(0, MAX_CONFIG_SIZE + 1, 0) is None
        assert fe.get_config(end - 4, 4, 0) == (ConfigHdrRec(end - 4, 4, 0), blk.config()[-4:])


def test_restart_at_new_ring_addresses_and_base_0_like_firmware_then_linux(
    blk_server: VhostUserServer, image: io.FileIO
) -> None:
    with session(blk_server.path) as s:
        serve_blk_read(s, image, 1)
        s.fe.set_vring_enable(0, 0)
        assert s.fe.get_vring_base(0) == (0, 1)
        s.ring = SplitRingDriver(s.ram, QUEUE_SIZE)  # Linux lays out new rings elsewhere
        kick_fd = s.eventfd()
        start_ring(s, enable=True, base=0, kick_fd=kick_fd)
        s.kick_fd = kick_fd
        serve_blk_read(s, image, 2)
        assert s.ring.used_idx == 1


def test_set_vring_addr_on_a_running_ring_keeps_its_position(
    blk_server: VhostUserServer, image: io.FileIO
) -> None:
    with session(blk_server.path) as s:
        serve_blk_read(s, image, 1)
        serve_blk_read(s, image, 2)
        # QEMU resends the addresses of a running ring to toggle dirty logging (flags)
        assert s.fe.set_vring_addr(s.ring.vring_addr(0), need_reply=True) == 0
        serve_blk_read(s, image, 3)
        assert s.ring.used_idx == 3
        assert s.fe.get_vring_base(0) == (0, 3)


def test_a_ring_the_driver_broke_is_not_served_and_a_restart_recovers_it(
    blk_server: VhostUserServer, image: io.FileIO, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="virtio_schema.vhost_user")
    with session(blk_server.path) as s:
        s.ring.avail.set_idx(QUEUE_SIZE + 1)  # more chains "available" than the ring holds
        for _ in range(2):
            kick(s.kick_fd)
            assert wait_for(lambda: not is_readable(s.kick_fd))
            roundtrip(s.fe)  # the connection is still served
        assert s.ring.used_idx == 0
        broken = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(broken) == 1, broken  # latched: logged once, not on every kick
        assert blk_server.errors == []
        s.fe.set_vring_enable(0, 0)
        assert s.fe.get_vring_base(0) == (0, 0)
        s.ring.avail.set_idx(s.ring.avail_idx)  # the driver resets its ring
        kick_fd = s.eventfd()
        start_ring(s, enable=True, kick_fd=kick_fd)
        s.kick_fd = kick_fd
        serve_blk_read(s, image, 4)


# --- ring enable states ------------------------------------------------------------------------


def test_rings_start_disabled_with_protocol_features_and_enable_serves_pending(
    blk_server: VhostUserServer, image: io.FileIO
) -> None:
    with session(blk_server.path, start=False) as s:
        negotiate(s.fe)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        start_ring(s, enable=False)
        head = publish_blk_read(s.ring, 4, SECTOR)
        kick(s.kick_fd)
        assert wait_for(lambda: not is_readable(s.kick_fd)), "the kick was never read"
        roundtrip(s.fe)  # the kick handler has finished
        assert s.ring.used_idx == 0
        assert not is_readable(s.call_fd)
        assert s.fe.set_vring_enable(0, 1, need_reply=True) == 0
        # enabling gives the ring a turn (no kick is owed for what was published before)
        assert wait_for(lambda: s.ring.used_idx == 1)
        assert wait_signalled(s.call_fd)
        (used,) = s.ring.used()
        assert used.head == head
        check_blk_read(used, image, 4, SECTOR)


def test_rings_start_enabled_without_protocol_features(
    blk_server: VhostUserServer, image: io.FileIO
) -> None:
    with session(blk_server.path, start=False) as s:
        acked = negotiate(s.fe, protocol=False)
        assert not acked & Feature.PROTOCOL_FEATURES
        s.fe.use_ram(s.ram)
        start_ring(s, enable=False)  # no SET_VRING_ENABLE: a legacy front-end never sends it
        serve_blk_read(s, image, 7)


# --- memory table --------------------------------------------------------------------------------


def test_new_mem_table_while_running_releases_the_old_mapping_and_keeps_serving(
    blk_server: VhostUserServer, image: io.FileIO
) -> None:
    with session(blk_server.path, ram_name="vu-old") as s:
        serve_blk_read(s, image, 1)
        assert s.ram.mappings() == 2  # ours and the back-end's
        with s.ram.clone("vu-new") as new:
            assert s.fe.use_ram(new, need_reply=True) == 0
            assert s.ram.mappings() == 1, "the back-end kept the old mapping"
            assert new.mappings() == 2
            s.ring.attach(new)
            s.ram.close()  # (the session closes it again: a no-op)
            used = serve_blk_read(s, image, 9)
            assert s.ring.used_idx == 2
            assert s.ring.used_ring.elem(1).id == used.head
            s.fe.close()
        assert wait_for(lambda: new.mappings() == 0), "the back-end kept the new mapping"


class QueueKeepingBlk(VhostUserBlk):
    """virtio-blk that keeps each queue from ``started`` until ``stopped``, as a device that
    produces buffers on its own schedule (net receive, console input) has to."""

    def __init__(self, blk: BlkDevice) -> None:
        super().__init__(blk)
        self.queues: dict[int, VirtQueue] = {}

    def started(self, index: int, queue: VirtQueue) -> None:
        self.queues[index] = queue

    def stopped(self, index: int) -> None:
        del self.queues[index]


def test_new_mem_table_unmaps_the_old_memory_even_when_the_device_keeps_its_queue(
    tmp_path: Path, blk: BlkDevice, image: io.FileIO, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="virtio_schema.vhost_user")
    devices: list[QueueKeepingBlk] = []

    def factory() -> QueueKeepingBlk:
        devices.append(QueueKeepingBlk(blk))
        return devices[-1]

    with (
        serving(tmp_path / "kq.sock", factory) as server,
        session(server.path, ram_name="vu-kept-old") as s,
    ):
        serve_blk_read(s, image, 1)
        (device,) = devices
        old_queue = device.queues[0]  # held, so a new queue cannot reuse its id
        with s.ram.clone("vu-kept-new") as new:
            assert s.fe.use_ram(new, need_reply=True) == 0
            assert device.queues[0] is not old_queue  # started() again, on the new memory
            complaints = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert complaints == [], "the old memory could not be unmapped"
            s.ring.attach(new)
            s.ram.close()
            assert s.ram.mappings() == 0, "the back-end kept the old guest memory mapped"
            serve_blk_read(s, image, 2)


# --- virtio-rng --------------------------------------------------------------------------------


def test_a_grown_image_is_announced_on_the_backend_channel_and_get_config_shows_it(
    tmp_path: Path, image: io.FileIO
) -> None:
    blk = BlkDevice(image)
    with (
        serving(tmp_path / "vu.sock", lambda: VhostUserBlk(blk, watch=0.01)),
        session(str(tmp_path / "vu.sock"), start=False) as s,
    ):
        negotiate(s.fe)
        assert s.fe.set_backend_req_fd(need_reply=True) == 0
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        start_ring(s, enable=True)
        os.ftruncate(image.fileno(), (SECTORS + 8) * SECTOR)
        assert s.fe.backend_request() == HeaderRec(BackendRequest.CONFIG_CHANGE_MSG, VERSION, 0)
        got = s.fe.get_config(0, BLK_CONFIG.size)
        assert got is not None
        assert BLK_CONFIG.unpack(got[1]).capacity == SECTORS + 8
        hdr = BLK_REQ_HDR.pack(BlkReqHdr(BlkType.IN, 0, SECTORS + 7))  # in the new sectors
        s.ring.publish([hdr], [SECTOR, 1])
        kick(s.kick_fd)
        assert wait_signalled(s.call_fd)
        (used,) = s.ring.used()
        assert used.data[SECTOR] == BlkStatus.OK
        with pytest.raises(TimeoutError):  # one change, one notification
            s.fe.backend_request(timeout=0.1)


def test_a_backend_channel_the_front_end_closes_is_dropped_and_the_connection_goes_on(
    tmp_path: Path, image: io.FileIO
) -> None:
    blk = BlkDevice(image)
    with (
        serving(tmp_path / "vu.sock", lambda: VhostUserBlk(blk, watch=0.01)) as server,
        session(str(tmp_path / "vu.sock")) as s,
    ):
        assert s.fe.set_backend_req_fd(need_reply=True) == 0
        assert s.fe.channel is not None
        s.fe.channel.close()
        s.fe.channel = None
        os.ftruncate(image.fileno(), (SECTORS + 8) * SECTOR)  # a notification to a closed channel
        wait_for(lambda: blk.capacity == SECTORS + 8)
        serve_blk_read(s, image, SECTORS + 7)
        assert server.errors == []


class KeepingBlk(VhostUserBlk):
    """The blk device, keeping its queue where the test can reach it."""

    queue: VirtQueue | None = None

    def enabled(self, index: int, queue: VirtQueue) -> None:
        self.queue = queue


def test_hot_added_memory_is_served_and_removed_memory_is_unmapped_once_no_view_is_alive(
    tmp_path: Path, image: io.FileIO
) -> None:
    """ADD_MEM_REG / REM_MEM_REG over a real socket with memfds: a running ring reaches a
    region added after it started; a removed region a device view still reaches stays mapped
    under that view and is unmapped once the view is released."""
    blk = BlkDevice(image)
    devices: list[KeepingBlk] = []

    def factory() -> KeepingBlk:
        devices.append(KeepingBlk(blk))
        return devices[-1]

    with (
        serving(tmp_path / "vu.sock", factory),
        session(str(tmp_path / "vu.sock"), start=False) as s,
        GuestRam(1 << 16, gpa=GPA_BASE + (1 << 30), uva=UVA_BASE + (1 << 30), name="vu-hot") as hot,
    ):
        negotiate(s.fe)
        assert s.fe.get_max_mem_slots() == 32
        assert s.fe.add_mem_reg(s.ram, need_reply=True) == 0  # no SET_MEM_TABLE at all
        start_ring(s, enable=True)
        serve_blk_read(s, image, 3)
        assert s.fe.add_mem_reg(hot, need_reply=True) == 0
        assert hot.mappings() == 2  # ours and the back-end's
        # a read whose data buffer lies in the hot-added RAM
        hdr = s.ring.alloc_buffer(BLK_REQ_HDR.pack(BlkReqHdr(BlkType.IN, 0, 5)))
        status = s.ring.alloc_buffer(1)
        descs = [s.ring.take_descriptor() for _ in range(3)]
        w, more = DescFlags.WRITE, DescFlags.NEXT
        chain = [(hdr, BLK_REQ_HDR.size, more), (hot.gpa + 0x200, SECTOR, w | more), (status, 1, w)]
        for k, (addr, length, flags) in enumerate(chain):
            s.ring.write_desc(descs[k], addr, length, flags, descs[min(k + 1, 2)])
        s.ring.push_head(descs[0])
        kick(s.kick_fd)
        assert wait_signalled(s.call_fd)
        assert s.ring.used()[0].len == SECTOR + 1
        assert hot.read(hot.gpa + 0x200, SECTOR) == _image_bytes(image, 5, SECTOR)
        # a view the device keeps into the region keeps it mapped after REM_MEM_REG
        queue = devices[0].queue
        assert queue is not None
        view = queue.driver_mem.translate(DriverRange.from_addr_len(hot.gpa, 16))
        assert view is not None
        assert s.fe.rem_mem_reg(hot, need_reply=True) == 0
        assert hot.mappings() == 2
        view.view[:4] = b"kept"  # still mapped: nothing was unmapped under the view
        assert hot.read(hot.gpa, 4) == b"kept"
        view.release()
        roundtrip(s.fe)  # the next message unmaps what is no longer in use
        assert hot.mappings() == 1
        serve_blk_read(s, image, 7)  # the ring goes on in the memory that stayed


class HoldingDevice(VhostUserDevice):
    """Takes every chain; keeps the first ``hold`` (a request in progress when the process
    dies), completes the others with b"done". Opts in to inflight tracking."""

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.held: list[DescChain] = []
        self.seen: list[int] = []
        self.queue: VirtQueue | None = None

    def protocol_features(self) -> int:
        return OFFERED_PROTOCOL_FEATURES

    def stopped(self, index: int) -> None:
        """The connection went: the requests in progress are abandoned (as by a process that
        dies; the next back-end takes them again from the inflight region)."""
        if self.queue is not None:
            self.queue.reset()  # the held chains are stale now: returning them touches no ring
        for chain in self.held:
            with chain:
                pass
        self.held.clear()

    def handle(self, index: int, queue: VirtQueue) -> None:
        self.queue = queue
        while (chain := queue.next_chain()) is not None:
            self.seen.append(chain.head)
            if len(self.held) < self.hold:
                self.held.append(chain)
                continue
            with chain:
                WritableChain(chain).write(b"done")


def test_requests_in_flight_when_the_back_end_goes_are_taken_again_by_the_next_one(
    tmp_path: Path,
) -> None:
    """The inflight region over a real socket: GET_INFLIGHT_FD gives the front-end a memfd, the
    first connection's device holds two requests and goes away; the next connection gets the
    same region (SET_INFLIGHT_FD, as QEMU after a reconnect) and its device is handed the two
    again, first, then the new one; each completes once."""
    devices = [HoldingDevice(hold=2), HoldingDevice(hold=0)]
    made = iter(devices)
    with (
        serving(tmp_path / "vu.sock", lambda: next(made)),
        GuestRam(name="vu-inflight") as ram,
        ExitStack() as stack,
    ):
        kick_fd, call_fd = make_eventfd(), make_eventfd()
        stack.callback(os.close, kick_fd)
        stack.callback(os.close, call_fd)
        ring = SplitRingDriver(ram, QUEUE_SIZE)
        with Frontend(str(tmp_path / "vu.sock")) as fe:
            negotiate(fe)
            rec, region_fd = fe.get_inflight_fd(1, QUEUE_SIZE)
            assert region_fd is not None
            stack.callback(os.close, region_fd)
            assert rec.mmap_size == queue_region_size(QUEUE_SIZE, packed=False)
            assert fe.set_inflight_fd(rec, region_fd, need_reply=True) == 0
            s = Session(fe, ram, ring, kick_fd, call_fd, stack)
            assert fe.use_ram(ram, need_reply=True) == 0
            start_ring(s, enable=True)
            heads = [ring.publish([], [4]) for _ in range(3)]
            kick(kick_fd)
            assert wait_signalled(call_fd)
            assert [u.head for u in ring.used()] == heads[2:]
        with Frontend(str(tmp_path / "vu.sock")) as fe:  # the front-end reconnects
            negotiate(fe)
            assert fe.set_inflight_fd(rec, region_fd, need_reply=True) == 0
            s = Session(fe, ram, ring, kick_fd, call_fd, stack)
            assert fe.use_ram(ram, need_reply=True) == 0
            start_ring(s, enable=True, base=ring.used_idx)  # QEMU: the used index after a crash
            heads.append(ring.publish([], [4]))
            kick(kick_fd)
            assert wait_signalled(call_fd)
            wait_for(lambda: len(devices[1].seen) == 3)
            assert devices[1].seen == [*heads[:2], heads[3]]  # the two again, first
            used = ring.used()
            assert sorted(u.head for u in used) == sorted([*heads[:2], heads[3]])
            assert all(u.data == b"done" for u in used)


def test_rng_fills_writable_chains_with_the_seeded_generator_stream(tmp_path: Path) -> None:
    seed = 20240607
    device = RngDevice(seed=seed)
    with serving(tmp_path / "rng.sock", lambda: device) as server, session(server.path) as s:
        assert s.fe.get_features() & Feature.INDIRECT_DESC
        lengths = [64, 64, 100]
        heads = [
            s.ring.publish(writable=[64]),
            s.ring.publish(writable=[16, 48]),
            s.ring.publish(writable=[30, 70], indirect=True),
        ]
        kick(s.kick_fd)
        assert wait_for(lambda: s.ring.used_idx == 3)
        assert wait_signalled(s.call_fd)
        used = s.ring.used()
        expected = random.Random(seed)
        assert [u.head for u in used] == heads
        assert [u.len for u in used] == lengths
        assert [u.data for u in used] == [expected.randbytes(n) for n in lengths]
        assert device.produced == sum(lengths)


# --- hostile front-ends --------------------------------------------------------------------------


@dataclass
class Hostile:
    fe: Frontend
    ram: GuestRam
    ring: SplitRingDriver
    stack: ExitStack

    def eventfd(self) -> int:
        fd = make_eventfd()
        self.stack.callback(os.close, fd)
        return fd

    def pipe(self) -> int:
        r, w = os.pipe()
        self.stack.callback(os.close, r)
        self.stack.callback(os.close, w)
        return r

    def negotiated(self) -> Hostile:
        negotiate(self.fe)
        return self

    def with_memory(self) -> Hostile:
        self.negotiated()
        assert self.fe.use_ram(self.ram, need_reply=True) == 0
        return self

    def running(self) -> Hostile:
        self.with_memory()
        self.fe.set_vring_num(0, QUEUE_SIZE)
        self.fe.set_vring_addr(self.ring.vring_addr(0))
        self.fe.set_vring_kick(0, self.eventfd())
        assert self.fe.set_vring_enable(0, 1, need_reply=True) == 0
        return self


@dataclass(frozen=True)
class Case:
    id: str
    act: Callable[[Hostile], object]
    error: str
    """A regular expression the error recorded by the server must match."""
    closes: bool = False
    """The front-end closes the connection itself (it cannot wait for the back-end to)."""


def _u64(value: int) -> bytes:
    return U64.pack(U64Rec(value))


def _half_header_then_close(h: Hostile) -> None:
    h.fe.send_raw(HEADER.pack(HeaderRec(Request.GET_FEATURES, VERSION, 0))[:6])
    h.fe.close()


def _payload_cut_then_close(h: Hostile) -> None:
    h.fe.send(Request.SET_VRING_ADDR, bytes(10), size=40)
    h.fe.close()


def _addr(h: Hostile, **changes: int) -> Hostile:
    """Memory, size, then SET_VRING_ADDR with ``changes``, then the KICK that starts the ring."""
    h.with_memory()
    h.fe.set_vring_num(0, QUEUE_SIZE)
    h.fe.set_vring_addr(h.ring.vring_addr(0)._replace(**changes))
    h.fe.set_vring_kick(0, h.eventfd())
    return h


def _guest_physical_addrs(h: Hostile) -> object:
    ring = h.ring
    return _addr(h, descriptor=ring.desc_addr, used=ring.used_addr, available=ring.avail_addr)


def _vring_num(num: int) -> Callable[[Hostile], object]:
    return lambda h: h.fe.set_vring_num(0, num)


def _get_config(fe: Frontend, offset: int, size: int) -> None:
    """GET_CONFIG without waiting for a reply (the back-end is expected to refuse it)."""
    fe.send(Request.GET_CONFIG, CONFIG_HDR.pack(ConfigHdrRec(offset, size, 0)) + bytes(size))


RAM_END_UVA = UVA_BASE + (1 << 20)

CASES = [
    Case("unknown-request", lambda h: h.fe.send(999), r"unexpected request request 999"),
    Case("request-0", lambda h: h.fe.send(0, _u64(0)), r"unexpected request request 0"),
    Case(
        "unimplemented-POSTCOPY_ADVISE",
        lambda h: h.fe.send(Request.POSTCOPY_ADVISE),
        r"unexpected request POSTCOPY_ADVISE",
    ),
    Case(
        "SET_LOG_BASE-without-LOG_SHMFD",
        lambda h: h.fe.send(Request.SET_LOG_BASE, bytes(16)),
        r"SET_LOG_BASE without the LOG_SHMFD protocol feature",
    ),
    Case(
        "SET_FEATURES-4-bytes",
        lambda h: h.fe.send(Request.SET_FEATURES, bytes(4)),
        r"SET_FEATURES: payload of 4 bytes, expected 8",
    ),
    Case(
        "GET_FEATURES-with-payload",
        lambda h: h.fe.send(Request.GET_FEATURES, bytes(8)),
        r"GET_FEATURES: payload of 8 bytes, expected 0",
    ),
    Case(
        "SET_VRING_NUM-4-bytes",
        lambda h: h.fe.send(Request.SET_VRING_NUM, bytes(4)),
        r"SET_VRING_NUM: payload of 4 bytes, expected 8",
    ),
    Case(
        "SET_VRING_ADDR-short",
        lambda h: h.fe.send(Request.SET_VRING_ADDR, bytes(VRING_ADDR.size - 1)),
        r"SET_VRING_ADDR: payload of 39 bytes, expected 40",
    ),
    Case(
        "header-size-4097",
        lambda h: h.fe.send(Request.GET_FEATURES, size=4097),
        r"payload size 4097 .* too large",
    ),
    Case(
        "header-size-u32-max",
        lambda h: h.fe.send(Request.SET_MEM_TABLE, bytes(8), size=0xFFFFFFFF),
        r"payload size 4294967295 .* too large",
    ),
    Case(
        "version-0",
        lambda h: h.fe.send(Request.GET_FEATURES, flags=0),
        r"protocol version 0, expected 1",
    ),
    Case(
        "version-2",
        lambda h: h.fe.send(Request.GET_FEATURES, flags=2),
        r"protocol version 2, expected 1",
    ),
    Case(
        "version-3-need-reply",
        lambda h: h.fe.send(Request.SET_OWNER, flags=3, need_reply=True),
        r"protocol version 3, expected 1",
    ),
    Case(
        "unoffered-feature",
        lambda h: h.fe.set_features(h.fe.get_features() | Feature.ACCESS_PLATFORM),
        r"SET_FEATURES acks unoffered bits 0x200000000",
    ),
    Case(
        "unoffered-protocol-feature",
        lambda h: h.fe.set_protocol_features(PROTOCOL | ProtocolFeature.PAGEFAULT),
        r"SET_PROTOCOL_FEATURES acks unoffered 0x100",
    ),
    Case(
        "fd-on-SET_FEATURES",
        lambda h: h.fe.send(Request.SET_FEATURES, _u64(0), fds=[h.eventfd()]),
        r"request 2 does not carry fds",
    ),
    Case(
        "fd-on-GET_VRING_BASE",
        lambda h: h.fe.send(Request.GET_VRING_BASE, bytes(8), fds=[h.eventfd()]),
        r"request 11 does not carry fds",
    ),
    Case(
        "mem-table-0-regions",
        lambda h: h.fe.set_mem_table([], [h.ram.fd]),
        r"SET_MEM_TABLE with 0 regions",
    ),
    Case(
        "mem-table-9-regions",
        lambda h: h.fe.set_mem_table([h.ram.region()] * 9, [h.ram.fd]),
        r"SET_MEM_TABLE with 9 regions",
    ),
    Case(
        "mem-table-9-regions-9-fds",
        lambda h: h.fe.set_mem_table([h.ram.region()] * 9, [h.ram.fd] * 9),
        r"ancillary data truncated",
    ),
    Case(
        "mem-table-count-beyond-payload",
        lambda h: h.fe.set_mem_table([], [h.ram.fd], num_regions=1),
        r"SET_MEM_TABLE: payload of 8 bytes, expected 40",
    ),
    Case(
        "mem-table-2-regions-1-fd",
        lambda h: h.fe.set_mem_table(
            [h.ram.region(), h.ram.region(guest_phys_addr=0, userspace_addr=0x1000_0000)],
            [h.ram.fd],
        ),
        r"2 regions but 1 fds",
    ),
    Case(
        "mem-table-1-region-2-fds",
        lambda h: h.fe.set_mem_table([h.ram.region()], [h.ram.fd, h.eventfd()]),
        r"1 regions but 2 fds",
    ),
    Case(
        "mem-table-no-fd",
        lambda h: h.fe.set_mem_table([h.ram.region()], []),
        r"1 regions but 0 fds",
    ),
    Case(
        "mem-table-pipe-fd",
        lambda h: h.fe.set_mem_table([h.ram.region()], [h.pipe()]),
        r"region 0: fd \d+ is a pipe, not a file",
    ),
    Case(
        "mem-table-eventfd",
        lambda h: h.fe.set_mem_table([h.ram.region()], [h.eventfd()]),
        r"region 0: fd \d+ is an eventfd, not a file",
    ),
    Case(
        "mem-table-size-0",
        lambda h: h.fe.set_mem_table([h.ram.region(memory_size=0)], [h.ram.fd]),
        r"region 0: .* is not a valid range",
    ),
    Case(
        "mem-table-size-past-file",
        lambda h: h.fe.set_mem_table([h.ram.region(memory_size=2 << 20)], [h.ram.fd]),
        r"region 0: offset 0x0 \+ size 0x200000 is past the end of the file \(0x100000\)",
    ),
    Case(
        "mem-table-offset-past-file",
        lambda h: h.fe.set_mem_table([h.ram.region(mmap_offset=1 << 20)], [h.ram.fd]),
        r"region 0: offset 0x100000 \+ size 0x100000 is past the end of the file",
    ),
    Case(
        "mem-table-gpa-wraps",
        lambda h: h.fe.set_mem_table([h.ram.region(guest_phys_addr=(1 << 64) - 4096)], [h.ram.fd]),
        r"region 0: .* is not a valid range",
    ),
    Case(
        "mem-table-overlapping-guest-ranges",
        lambda h: h.fe.set_mem_table(
            [h.ram.region(), h.ram.region(userspace_addr=0x1000_0000)], [h.ram.fd, h.ram.fd]
        ),
        r"SET_MEM_TABLE: .*overlap",
    ),
    Case(
        "mem-table-overlapping-user-ranges",
        lambda h: h.fe.set_mem_table(
            [h.ram.region(), h.ram.region(guest_phys_addr=0)], [h.ram.fd, h.ram.fd]
        ),
        r"SET_MEM_TABLE: user ranges overlap",
    ),
    Case(
        "SET_VRING_NUM-ring-1",
        lambda h: h.fe.set_vring_num(1, QUEUE_SIZE),
        r"SET_VRING_NUM for ring 1, the device has 1",
    ),
    Case(
        "SET_VRING_KICK-ring-5-with-fd",
        lambda h: h.fe.set_vring_kick(5, h.eventfd()),
        r"SET_VRING_KICK for ring 5, the device has 1",
    ),
    Case(
        "GET_VRING_BASE-ring-255",
        lambda h: h.fe.send(Request.GET_VRING_BASE, VRING_STATE.pack(VringStateRec(255, 0))),
        r"GET_VRING_BASE for ring 255",
    ),
    Case(
        "SET_VRING_ENABLE-ring-2",
        lambda h: h.fe.set_vring_enable(2, 1),
        r"SET_VRING_ENABLE for ring 2",
    ),
    *(
        Case(f"SET_VRING_NUM-{num}", _vring_num(num), r"SET_VRING_NUM ring 0: ")
        for num in (0, 3, 48, 65536, 0xFFFF_FFFF)
    ),
    Case(
        "SET_VRING_BASE-65536",
        lambda h: h.fe.set_vring_base(0, 65536),
        r"SET_VRING_BASE ring 0: base 65536",
    ),
    Case(
        "SET_VRING_ENABLE-2",
        lambda h: h.fe.set_vring_enable(0, 2),
        r"SET_VRING_ENABLE ring 0 num=2",
    ),
    Case(
        "KICK-before-mem-table",
        lambda h: (
            h.negotiated().fe.set_vring_num(0, QUEUE_SIZE),
            h.fe.set_vring_addr(h.ring.vring_addr(0)),
            h.fe.set_vring_kick(0, h.eventfd()),
        ),
        r"SET_VRING_KICK ring 0 before its size, addresses and the memory table",
    ),
    Case(
        "KICK-before-size",
        lambda h: (
            h.with_memory().fe.set_vring_addr(h.ring.vring_addr(0)),
            h.fe.set_vring_kick(0, h.eventfd()),
        ),
        r"SET_VRING_KICK ring 0 before its size",
    ),
    Case(
        "KICK-before-addresses",
        lambda h: (
            h.with_memory().fe.set_vring_num(0, QUEUE_SIZE),
            h.fe.set_vring_kick(0, h.eventfd()),
        ),
        r"SET_VRING_KICK ring 0 before its size",
    ),
    Case(
        "ring-desc-outside-memory",
        lambda h: _addr(h, descriptor=RAM_END_UVA),
        rf"ring 0: descriptor table at {RAM_END_UVA:#x}\+0x100 is not in the memory table",
    ),
    Case(
        "ring-used-straddles-the-end",
        lambda h: _addr(h, used=RAM_END_UVA - 64),
        rf"ring 0: used ring at {RAM_END_UVA - 64:#x}\+0x86 is not in the memory table",
    ),
    Case(
        "ring-avail-below-memory",
        lambda h: _addr(h, available=UVA_BASE - 2),
        r"ring 0: available ring at .* is not in the memory table",
    ),
    Case(
        "ring-addresses-guest-physical",
        _guest_physical_addrs,
        rf"ring 0: descriptor table at {GPA_BASE:#x}\+0x100 is not in the memory table",
    ),
    Case(
        "ring-desc-misaligned",
        lambda h: _addr(h, descriptor=h.ring.vring_addr(0).descriptor + 8),
        r"ring 0: descriptor table at 0x40000008 is not 16-byte aligned",
    ),
    Case(
        "KICK-nofd-flag-with-fd",
        lambda h: h.fe.set_u64(Request.SET_VRING_KICK, NOFD, fds=[h.eventfd()]),
        r"SET_VRING_KICK ring 0: 1 fds, nofd=True",
    ),
    Case(
        "KICK-no-fd-without-nofd-flag",
        lambda h: h.fe.set_u64(Request.SET_VRING_KICK, 0),
        r"SET_VRING_KICK ring 0: 0 fds, nofd=False",
    ),
    Case(
        "CALL-2-fds",
        lambda h: h.fe.set_u64(Request.SET_VRING_CALL, 0, fds=[h.eventfd(), h.eventfd()]),
        r"SET_VRING_CALL ring 0: 2 fds, nofd=False",
    ),
    Case(
        "ERR-payload-high-bits",
        lambda h: h.fe.set_u64(Request.SET_VRING_ERR, 0x200, fds=[h.eventfd()]),
        r"SET_VRING_ERR payload 0x200",
    ),
    Case(
        "GET_CONFIG-without-CONFIG-protocol-feature",
        lambda h: _get_config(h.fe, 0, 8),
        r"GET_CONFIG without the CONFIG protocol feature",
    ),
    Case(
        "GET_CONFIG-short-payload",
        lambda h: h.negotiated().fe.send(
            Request.GET_CONFIG, CONFIG_HDR.pack(ConfigHdrRec(0, 60, 0))
        ),
        r"GET_CONFIG: payload of 12 bytes, expected 72",
    ),
    Case(
        "SET_VRING_NUM-while-running",
        lambda h: h.running().fe.set_vring_num(0, QUEUE_SIZE),
        r"SET_VRING_NUM on running ring 0",
    ),
    Case(
        "SET_VRING_BASE-while-running",
        lambda h: h.running().fe.set_vring_base(0, 0),
        r"SET_VRING_BASE on running ring 0",
    ),
    Case(
        "half-header-then-close",
        _half_header_then_close,
        r"connection closed mid-message \(6 of 12 bytes\)",
        closes=True,
    ),
    Case(
        "payload-cut-short-then-close",
        _payload_cut_then_close,
        r"connection closed mid-message \(10 of 40 bytes\)",
        closes=True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_front_end_is_dropped_alone_without_leaking_fds(
    case: Case, blk_server: VhostUserServer, image: io.FileIO
) -> None:
    with session(blk_server.path, ram_name="vu-bystander") as bystander:
        serve_blk_read(bystander, image, 1)
        errors = len(blk_server.errors)
        baseline = fd_count()
        with ExitStack() as stack:
            fe = stack.enter_context(Frontend(blk_server.path))
            ram = stack.enter_context(GuestRam(name="vu-hostile"))
            case.act(Hostile(fe, ram, SplitRingDriver(ram, QUEUE_SIZE), stack))
            if not case.closes:
                assert fe.wait_closed() == b"", "the back-end answered instead of disconnecting"
        assert wait_for(lambda: len(blk_server.errors) > errors), "no error recorded"
        assert len(blk_server.errors) == errors + 1, blk_server.errors[errors:]
        assert re.search(case.error, blk_server.errors[-1]), blk_server.errors[-1]
        # The back-end closes the socket last, after every fd and mapping of the connection: once
        # the count is back, nothing is left behind. No tolerance: client and server are this
        # process, and the client closed all it opened.
        assert wait_for(lambda: fd_count() == baseline), (fd_count(), baseline)
        assert ram.mappings() == 0, "the back-end kept the hostile front-end's memory mapped"
        serve_blk_read(bystander, image, 2)  # the other connection never noticed
    with session(blk_server.path) as fresh:  # and a new front-end is served end to end
        serve_blk_read(fresh, image, 3)
        assert blk_server.errors[errors:] == [blk_server.errors[-1]]


def test_stalled_message_is_dropped_after_the_io_timeout(
    blk_server: VhostUserServer, image: io.FileIO
) -> None:
    baseline = fd_count()
    with Frontend(blk_server.path) as fe:
        fe.send(Request.SET_VRING_ADDR, bytes(10), size=40)
        t0 = time.monotonic()
        assert fe.wait_closed(timeout=5) == b""
        waited = time.monotonic() - t0
    assert 0.4 <= waited < 3, f"dropped after {waited:.2f} s with io_timeout=0.5"
    assert re.search(r"message cut short: 10 of 40 bytes", blk_server.errors[-1])
    assert wait_for(lambda: fd_count() == baseline)
    with session(blk_server.path) as s:
        serve_blk_read(s, image, 0)


def test_a_normal_disconnect_releases_everything(
    blk_server: VhostUserServer, image: io.FileIO
) -> None:
    baseline = fd_count()
    with session(blk_server.path, ram_name="vu-bye") as s:
        serve_blk_read(s, image, 0)
        ram = s.ram
    assert wait_for(lambda: fd_count() == baseline), (fd_count(), baseline)
    assert ram.mappings() == 0
    assert blk_server.errors == []


class FaultyBlk(VhostUserBlk):
    """virtio-blk with a bug switched on by the test: ``handle`` or ``config`` raises."""

    def __init__(self, blk: BlkDevice) -> None:
        super().__init__(blk)
        self.fail: str | None = None

    def handle(self, index: int, queue: VirtQueue) -> None:
        if self.fail == "handle":
            raise RuntimeError("device bug in handle")
        super().handle(index, queue)

    def config(self) -> bytes:
        if self.fail == "config":
            raise RuntimeError("device bug in config")
        return super().config()


def test_a_device_error_ends_that_connection_not_the_server(
    tmp_path: Path, blk: BlkDevice, image: io.FileIO, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="virtio_schema.vhost_user.backend")
    devices: list[FaultyBlk] = []

    def factory() -> FaultyBlk:
        devices.append(FaultyBlk(blk))
        return devices[-1]

    with (
        serving(tmp_path / "fb.sock", factory) as server,
        session(server.path, ram_name="vu-bystander") as bystander,
    ):
        serve_blk_read(bystander, image, 1)
        baseline = fd_count()
        with session(server.path) as s:
            roundtrip(s.fe)  # SET_VRING_ENABLE (which serves the ring too) is behind us
            devices[-1].fail = "handle"
            publish_blk_read(s.ring, 2, SECTOR)
            kick(s.kick_fd)
            assert s.fe.wait_closed() == b""
        assert re.search(
            r"device error on ring 0: RuntimeError: device bug in handle", server.errors[-1]
        )
        with Frontend(server.path) as fe:
            negotiate(fe)
            devices[-1].fail = "config"
            _get_config(fe, 0, 8)
            assert fe.wait_closed() == b""
        assert re.search(r"internal error: RuntimeError: device bug in config", server.errors[-1])
        assert len(server.errors) == 2
        teardown = [r.getMessage() for r in caplog.records if r.name.endswith(".backend")]
        assert teardown == [], "the dropped connection's memory could not be unmapped"
        assert wait_for(lambda: fd_count() == baseline, timeout=1), (fd_count(), baseline)
        serve_blk_read(bystander, image, 3)


def test_a_saturated_blocking_call_eventfd_does_not_hang_the_server(
    blk_server: VhostUserServer, image: io.FileIO
) -> None:
    """The call eventfd is the front-end's: a hostile one passes a blocking eventfd and fills its
    counter, so a plain ``write`` of 1 by the back-end would block its only thread forever."""
    with session(blk_server.path, start=False) as s:
        call = os.eventfd(0, os.EFD_CLOEXEC)  # blocking
        s.stack.callback(os.close, call)
        s.call_fd = call
        negotiate(s.fe)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        start_ring(s, enable=True)
        os.eventfd_write(call, 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum
        try:
            publish_blk_read(s.ring, 1, SECTOR)
            kick(s.kick_fd)
            assert wait_for(lambda: s.ring.used_idx == 1)
            with Frontend(blk_server.path, timeout=2) as other:
                try:
                    queues = other.get_queue_num()
                except TimeoutError:
                    pytest.fail("the server hangs writing to a saturated blocking call eventfd")
                assert queues == 1
        finally:
            os.eventfd_read(call)  # unblocks a server stuck in that write, for the teardown


def test_a_front_end_that_never_reads_its_replies_is_dropped_when_its_output_queue_is_full(
    blk_server: VhostUserServer, image: io.FileIO
) -> None:
    request = HEADER.pack(HeaderRec(Request.GET_FEATURES, VERSION, 0))
    with session(blk_server.path, ram_name="vu-bystander") as bystander:
        with Frontend(blk_server.path) as fe:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for _ in range(200):  # 10000 requests; the replies fill the back-end's buffer
                    fe.sock.sendall(request * 50)
            assert fe.wait_closed() != b""  # (some replies did get through)
        assert re.search(
            r"the front-end does not read its replies \(\d+ bytes queued\)", blk_server.errors[-1]
        ), blk_server.errors
        serve_blk_read(bystander, image, 1)


# --- trace -------------------------------------------------------------------------------------


def _trace_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == TRACE_LOGGER]


def _short_conversation(s: Session) -> int:
    """The conversation the trace and capture tests record: GET_FEATURES, SET_PROTOCOL_FEATURES,
    SET_MEM_TABLE (acked), SET_VRING_CALL, then an unknown request 999 that ends the connection.
    Returns the features the back-end offered."""
    offered = s.fe.get_features()
    s.fe.set_protocol_features(PROTOCOL)
    assert s.fe.use_ram(s.ram, need_reply=True) == 0
    s.fe.set_vring_call(0, s.call_fd)
    s.fe.send(999, b"\xde\xad\xbe\xef")
    assert s.fe.wait_closed() == b""
    return offered


def test_trace_logs_every_message_in_and_out_decoded(
    tmp_path: Path, blk: BlkDevice, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TRACE_LOGGER)
    with (
        serving(tmp_path / "tr.sock", lambda: VhostUserBlk(blk), trace=True) as server,
        session(server.path, start=False) as s,
    ):
        offered = _short_conversation(s)
    lines = _trace_lines(caplog)
    parsed = [re.match(r"vhost-user#\d+ (<-|->) (\S+)", line) for line in lines]
    assert all(parsed), lines
    assert [(m.group(1), m.group(2)) for m in parsed if m] == [
        ("<-", "GET_FEATURES"),
        ("->", "GET_FEATURES"),
        ("<-", "SET_PROTOCOL_FEATURES"),
        ("<-", "SET_MEM_TABLE"),
        ("->", "SET_MEM_TABLE"),
        ("<-", "SET_VRING_CALL"),
        ("<-", "UNKNOWN(999)"),
    ]
    assert f"u64={offered:#x}" in lines[1]
    assert "[REPLY]" in lines[1]
    assert f"u64={PROTOCOL:#x}" in lines[2]
    assert "[NEED_REPLY]" in lines[3]
    assert "fds=1" in lines[3]
    assert f"gpa={GPA_BASE:#x} size={1 << 20:#x} uva={UVA_BASE:#x} off=0x0" in lines[3]
    assert "fds=1 index=0" in lines[5]
    assert lines[6].endswith("size=4 deadbeef")
    # the REPLY_ACK to SET_MEM_TABLE is a u64 (0: success), not a memory table
    assert "u64=0x0" in lines[4]


def test_capture_records_every_message_raw_both_ways_as_the_trace_decodes_it(
    tmp_path: Path, blk: BlkDevice, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TRACE_LOGGER)
    capture = tmp_path / "conversation.trace"
    with (
        serving(
            tmp_path / "cap.sock", lambda: VhostUserBlk(blk), trace=True, capture=capture
        ) as server,
        session(server.path, start=False) as s,
    ):
        offered = _short_conversation(s)
    records = parse_capture(capture.read_text())
    assert [(r.direction, r.nfds) for r in records] == [
        ("<-", 0), ("->", 0), ("<-", 0), ("<-", 1), ("->", 0), ("<-", 1), ("<-", 0),
    ]  # fmt: skip
    assert records[1].data[HEADER.size :] == offered.to_bytes(8, "little")  # the reply, raw
    # exactly the bytes sent: request 999, flags 1 (version), size 4, payload
    assert records[-1].data == bytes.fromhex("e70300000100000004000000deadbeef")
    # decoded, a capture reads like the trace of the same conversation
    assert decode_capture(capture.read_text()) == _trace_lines(caplog)


def test_no_trace_unless_asked(
    blk_server: VhostUserServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=TRACE_LOGGER)
    with Frontend(blk_server.path) as fe:
        fe.get_features()
    assert _trace_lines(caplog) == []


_PAYLOADS = st.one_of(
    st.binary(max_size=300),
    st.binary(min_size=8, max_size=8),
    st.binary(min_size=40, max_size=40),
    st.binary(min_size=12, max_size=12).map(lambda b: b + bytes(64)),
)


@example(Request.SET_VRING_ADDR, 1, bytes(40), 0)
@example(Request.GET_VRING_BASE, 5, bytes(8), 0)
@example(Request.SET_CONFIG, 1, (4).to_bytes(4, "little") * 2 + bytes(8), 0)
@example(Request.SET_MEM_TABLE, 1, b"\xff" * 8, 1)  # 2**32-1 regions announced, none there
@example(Request.GET_CONFIG, 5, (0xFFFFFFFF).to_bytes(4, "little") * 3, 0)
@example(Request.SET_VRING_KICK, 0xFFFFFFFF, (0x1FF).to_bytes(8, "little"), 8)
@given(
    request=st.one_of(st.sampled_from(Request), st.integers(0, 2**32 - 1)),
    flags=st.integers(0, 2**32 - 1),
    payload=_PAYLOADS,
    nfds=st.integers(0, 8),
)
def test_describe_is_one_line_and_never_raises_on_garbage(
    request: int, flags: int, payload: bytes, nfds: int
) -> None:
    line = describe(request, flags, payload, nfds)
    assert "\n" not in line
    try:
        name = Request(request).name
    except ValueError:
        name = f"UNKNOWN({request})"
    assert line.startswith(f"{name} flags={flags:#x}")
    assert f"size={len(payload)}" in line


# --- the server's own lifecycle -----------------------------------------------------------------


def test_a_server_refuses_the_path_of_a_live_server_and_leaves_its_socket(
    blk_server: VhostUserServer, blk: BlkDevice, image: io.FileIO
) -> None:
    intruder = VhostUserServer(blk_server.path, lambda: VhostUserBlk(blk))
    with pytest.raises(ServerAddressInUse, match="a server is listening on"):
        intruder.listen()
    intruder.close()
    assert os.path.exists(blk_server.path), "the other server's socket was unlinked"
    with session(blk_server.path) as s:  # and the live server still serves
        serve_blk_read(s, image, 1)


def test_a_server_replaces_a_stale_socket_file(tmp_path: Path, blk: BlkDevice) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
        crashed.bind(str(path))
        crashed.listen()
    assert path.is_socket()  # a crashed server: its socket file stays, nobody listens
    with serving(path, lambda: VhostUserBlk(blk)) as server, Frontend(server.path) as fe:
        assert fe.get_queue_num() == 1


def test_a_server_refuses_a_path_that_is_not_a_socket(tmp_path: Path, blk: BlkDevice) -> None:
    path = tmp_path / "precious.img"
    path.write_bytes(b"data")
    server = VhostUserServer(str(path), lambda: VhostUserBlk(blk))
    with pytest.raises(ServerAddressInUse, match="exists and is not a socket"):
        server.listen()
    server.close()
    assert path.read_bytes() == b"data"


def test_closing_a_server_unlinks_only_its_own_socket(tmp_path: Path, blk: BlkDevice) -> None:
    path = tmp_path / "shared.sock"
    first = VhostUserServer(str(path), lambda: VhostUserBlk(blk))
    first.listen()
    os.unlink(path)  # someone removed it; a second server now owns the path
    with serving(path, lambda: VhostUserBlk(blk)) as second:
        first.close()
        assert path.exists(), "closing the first server unlinked the second one's socket"
        with Frontend(second.path) as fe:
            assert fe.get_queue_num() == 1
    assert not path.exists()  # the second removed its own


def test_a_device_instance_where_a_factory_is_expected_is_refused_at_construction(
    tmp_path: Path, blk: BlkDevice
) -> None:
    device = VhostUserBlk(blk)
    with pytest.raises(NotAFactory, match="device_factory must make a device per connection"):
        # the mistake under test: mypy flags it too, and the server must refuse it at run time
        VhostUserServer(str(tmp_path / "x.sock"), device)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="device_factory"):
        VhostUserServer(str(tmp_path / "x.sock"), 42)  # type: ignore[arg-type]
    assert not (tmp_path / "x.sock").exists()


def test_a_factory_that_fails_ends_only_that_connection(
    tmp_path: Path, blk: BlkDevice, image: io.FileIO
) -> None:
    made: list[int] = []

    def factory() -> VhostUserBlk:
        made.append(1)
        if len(made) == 2:
            raise RuntimeError("no more devices today")
        return VhostUserBlk(blk)

    with serving(tmp_path / "ff.sock", factory) as server:
        with session(server.path) as s:
            with Frontend(server.path) as fe:
                assert fe.wait_closed() == b""
            assert any("no more devices today" in e for e in server.errors)
            serve_blk_read(s, image, 1)
        with session(server.path) as fresh:
            serve_blk_read(fresh, image, 2)


def test_the_server_is_a_context_manager_that_listens_and_cleans_up(
    tmp_path: Path, blk: BlkDevice, image: io.FileIO
) -> None:
    path = tmp_path / "cm.sock"
    baseline = fd_count()
    with VhostUserServer(str(path), lambda: VhostUserBlk(blk)) as server:
        assert path.exists()
        assert server.ready.is_set()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        with session(server.path) as s:
            serve_blk_read(s, image, 1)
        server.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert not path.exists()
    assert fd_count() == baseline


def test_connections_beyond_max_clients_are_closed_and_the_others_go_on(
    tmp_path: Path, blk: BlkDevice, image: io.FileIO
) -> None:
    server = VhostUserServer(str(tmp_path / "mc.sock"), lambda: VhostUserBlk(blk), max_clients=2)
    server.listen()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with session(server.path) as a, Frontend(server.path) as b:
            assert b.get_queue_num() == 1
            with Frontend(server.path) as c:
                assert c.wait_closed() == b""  # the third is closed at once
            serve_blk_read(a, image, 1)
            assert b.get_queue_num() == 1
        with session(server.path) as d:  # room again
            serve_blk_read(d, image, 2)
    finally:
        server.stop()
        thread.join(timeout=10)


def test_a_message_sent_in_pieces_is_assembled(blk_server: VhostUserServer) -> None:
    """Non-blocking reads keep a partial message: a header in three pieces, then its payload."""
    with Frontend(blk_server.path) as fe:
        fe.set_protocol_features(PROTOCOL)  # REPLY_ACK
        features = fe.get_features() & WANTED
        msg = HEADER.pack(HeaderRec(Request.SET_FEATURES, VERSION | 8, 8)) + _u64(features)
        for piece in (msg[:5], msg[5:11], msg[11:14], msg[14:]):
            fe.send_raw(piece)
            time.sleep(0.02)
        assert U64.unpack(fe.reply(Request.SET_FEATURES)).u64 == 0
        assert fe.get_queue_num() == 1
    assert blk_server.errors == []


def test_a_dribbling_front_end_stalls_no_one_and_is_dropped_at_the_message_deadline(
    blk_server: VhostUserServer, image: io.FileIO
) -> None:
    """The deadline is per message (io_timeout=0.5 here), not per read: a byte every 0.1 s keeps
    every read short, yet the message is never whole in time."""
    msg = HEADER.pack(HeaderRec(Request.SET_VRING_ADDR, VERSION, VRING_ADDR.size)) + bytes(40)
    with session(blk_server.path, ram_name="vu-bystander") as bystander:
        with Frontend(blk_server.path) as dribbler:
            t0 = time.monotonic()
            closed = False
            for k, byte in enumerate(msg):
                try:
                    dribbler.send_raw(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                if k % 3 == 0:
                    serve_blk_read(bystander, image, k % SECTORS)  # served meanwhile
                time.sleep(0.1)
            assert closed or dribbler.wait_closed() == b""
            assert time.monotonic() - t0 < 3
        assert re.search(r"message cut short: \d+ of \d+ bytes in 0.5 s", blk_server.errors[-1])
        serve_blk_read(bystander, image, 5)


# --- busy polling --------------------------------------------------------------------------------


def publish_unkicked_read(s: Session, sector: int) -> int:
    """Publish a read and do not kick: only a polling back-end serves it."""
    return publish_blk_read(s.ring, sector, SECTOR)


def test_a_busy_polled_ring_is_served_without_kicks_until_idle_then_waits_for_kicks(
    tmp_path: Path, blk: BlkDevice, image: io.FileIO
) -> None:
    with (
        serving(tmp_path / "vu.sock", lambda: VhostUserBlk(blk), busy_poll=0.5) as server,
        session(server.path) as s,
    ):
        serve_blk_read(s, image, 1)  # a kick, a turn with work: the ring is polled from now on
        for sector in (2, 3, 4):
            head = publish_unkicked_read(s, sector)
            assert wait_signalled(s.call_fd), "a polled ring was not served without a kick"
            (used,) = s.ring.used()
            assert used.head == head
            check_blk_read(used, image, sector, SECTOR)
        # kicks off meanwhile: avail_event (EVENT_IDX) stayed behind the chains taken
        assert s.ring.avail_event != s.ring.avail_idx
        # idle for busy_poll seconds: back to kicks, avail_event follows the ring again
        assert wait_for(lambda: s.ring.avail_event == s.ring.avail_idx, timeout=5)
        head = publish_unkicked_read(s, 5)
        assert not wait_signalled(s.call_fd, timeout=0.3), "served without a kick while idle"
        kick(s.kick_fd)
        assert wait_signalled(s.call_fd)
        assert [u.head for u in s.ring.used()] == [head]
    assert server.errors == []


def test_without_busy_poll_a_ring_is_served_only_when_kicked(
    blk_server: VhostUserServer, image: io.FileIO
) -> None:
    with session(blk_server.path) as s:
        serve_blk_read(s, image, 1)
        # the read may have been served by the turn of the ring's enabling: wait until the server
        # took the kick, then for a reply to a later message (the kick's turn is over by then)
        assert wait_for(lambda: not is_readable(s.kick_fd))
        roundtrip(s.fe)
        assert s.ring.avail_event == s.ring.avail_idx  # kicks stay wanted
        head = publish_unkicked_read(s, 2)
        assert not wait_signalled(s.call_fd, timeout=0.3), "served without a kick"
        kick(s.kick_fd)
        assert wait_signalled(s.call_fd)
        assert [u.head for u in s.ring.used()] == [head]


def test_a_busy_polled_ring_stalls_no_other_connection_and_may_go_away(
    tmp_path: Path, blk: BlkDevice, image: io.FileIO
) -> None:
    """A driver that keeps its ring busy (a read every 10 ms, never a kick) keeps it polled; a
    second front-end connects, negotiates and is served meanwhile; the busy one disconnects while
    polled and the server goes on."""
    with serving(tmp_path / "vu.sock", lambda: VhostUserBlk(blk), busy_poll=1.0) as server:
        stop = threading.Event()
        served: list[int] = []
        failures: list[BaseException] = []
        with session(server.path, ram_name="vu-busy") as busy:
            serve_blk_read(busy, image, 1)

            def stream() -> None:
                try:
                    while not stop.is_set():
                        publish_unkicked_read(busy, len(served) % SECTORS)
                        if not wait_signalled(busy.call_fd):
                            raise AssertionError("the polled ring stopped being served")
                        served.extend(u.head for u in busy.ring.used())
                        time.sleep(0.01)
                except BaseException as exc:
                    failures.append(exc)

            streamer = threading.Thread(target=stream, daemon=True)
            streamer.start()
            try:
                with session(server.path, ram_name="vu-other") as other:
                    for sector in range(1000):  # both go on side by side
                        serve_blk_read(other, image, sector % SECTORS)
                        if len(served) >= 10 or failures:
                            break
            finally:
                stop.set()
                streamer.join(timeout=10)
            assert not streamer.is_alive()
            assert failures == []
            assert len(served) >= 10
        with session(server.path, ram_name="vu-after") as after:
            serve_blk_read(after, image, 7)
    assert server.errors == []


def test_an_error_while_busy_polling_ends_that_connection_only(
    tmp_path: Path, blk: BlkDevice, image: io.FileIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Backend, index: int) -> bool:
        raise RuntimeError("the ring cannot be looked at")

    with serving(tmp_path / "vu.sock", lambda: VhostUserBlk(blk), busy_poll=0.5) as server:
        with session(server.path, ram_name="vu-first") as s:
            monkeypatch.setattr(Backend, "has_work", broken)
            serve_blk_read(s, image, 1)  # the turn found work: the next round polls, and fails
            assert s.fe.wait_closed() == b""
        assert wait_for(lambda: any("busy polling: RuntimeError" in e for e in server.errors))
        monkeypatch.undo()
        with session(server.path, ram_name="vu-second") as after:
            serve_blk_read(after, image, 2)


@pytest.mark.parametrize("busy_poll", [-0.001, 1.5])
def test_a_busy_poll_outside_0_to_1_second_is_refused(tmp_path: Path, busy_poll: float) -> None:
    with pytest.raises(DeviceUsageError, match="busy_poll"):
        VhostUserServer(str(tmp_path / "vu.sock"), RngDevice, busy_poll=busy_poll)


def test_a_front_end_waits_for_a_full_listen_backlog_instead_of_failing(tmp_path: Path) -> None:
    """A unix connect with a timeout fails at once with EAGAIN while the server's backlog is full
    (a busy server, one that paused accepting): the front-end retries until its timeout."""
    path = str(tmp_path / "busy.sock")
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        listener.bind(path)
        listener.listen(0)
        for _ in range(8):  # fill the backlog
            waiting = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            waiting.setblocking(False)
            try:
                waiting.connect(path)
            except BlockingIOError:
                break
        else:
            pytest.fail("the listen backlog never filled")

        def accept_later() -> None:
            time.sleep(0.3)
            listener.settimeout(1)
            with contextlib.suppress(TimeoutError):
                while True:  # everything that waits, the front-end's connection included
                    conn, _ = listener.accept()
                    stack.callback(conn.close)

        accepting = threading.Thread(target=accept_later, daemon=True)
        accepting.start()
        with Frontend(path, timeout=5):  # connected once the server accepted: no EAGAIN
            pass
        accepting.join(timeout=10)
