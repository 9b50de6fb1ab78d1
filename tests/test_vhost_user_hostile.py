"""Hostile front-ends against the example virtio-blk back-end running as its own process.

Each test starts ``python -m virtio_schema.examples.blk --vhost-user SOCK IMAGE`` (through
:class:`~virtio_schema.testing.process.BackendProcess`, killed by PID at the latest after
:data:`HARD_TIMEOUT`), attacks it over real unix sockets with a front-end
(:mod:`virtio_schema.testing.frontend`), and then checks what a user of the back-end relies on:

* the process is alive;
* its open fds, threads and guest-memory (memfd) mappings are back to what they were before the
  attack, once the attacker has gone;
* a FRESH well-behaved front-end reads a sector and gets the image's bytes.

Some attacks run while a second, well-behaved front-end works: a connection that dribbles a
message a byte at a time, one that never reads its replies, a guest that publishes requests
forever. That front-end must complete its requests within :data:`BOUND` seconds, far below what
the attacker would hold a back-end without the defence (the checks are functional: nothing here
measures speed).

The messages of the later protocol features (issue #20) are attacked the same way: malformed and
garbage inflight regions (SET_INFLIGHT_FD), dirty logs too small for the memory or of the wrong
kind (SET_LOG_BASE, SET_LOG_FD), memory regions removed while a ring or a request uses them
(ADD_MEM_REG, REM_MEM_REG), and a restart: a back-end SIGKILLed while it holds a request, the
chain corrupted by the guest before the next back-end takes it again from the inflight region.

The image is 1 MiB of a seeded pseudo-random pattern, so a read from the wrong sector shows.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple, Protocol, Self

import pytest

from virtio_schema.records import BLK_CONFIG, BLK_REQ_HDR, BlkReqHdr
from virtio_schema.ring import Desc
from virtio_schema.schema import BlkStatus, BlkType, DescFlags, Feature, used_ring
from virtio_schema.testing.frontend import (
    GPA_BASE,
    UVA_BASE,
    Frontend,
    GuestRam,
    SplitRingDriver,
    kick,
    make_eventfd,
    wait_for,
    wait_signalled,
)
from virtio_schema.testing.process import BackendProcess
from virtio_schema.vhost_user.backend import LOG_ALL
from virtio_schema.vhost_user.dirty_log import PAGE_SIZE
from virtio_schema.vhost_user.inflight import (
    INFLIGHT,
    SPLIT_DESC_STATE,
    SPLIT_QUEUE_REGION,
    DescStateSplitRec,
    InflightRec,
    QueueRegionSplitRec,
    region_size,
)
from virtio_schema.vhost_user.messages import (
    CONFIG_HDR,
    HEADER,
    LOG_DESCRIPTION,
    MEM_REGION,
    SINGLE_MEM_REGION,
    U64,
    VERSION,
    VRING_F_LOG,
    ConfigHdrRec,
    HeaderFlags,
    HeaderRec,
    LogDescriptionRec,
    ProtocolFeature,
    Request,
    U64Rec,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not hasattr(os, "memfd_create")
    or not hasattr(os, "eventfd"),
    reason="needs Linux: memfd_create, eventfd, /proc/PID and SCM_RIGHTS over unix sockets",
)

SECTOR = 512
IMAGE = random.Random(18).randbytes(1 << 20)
"""The disk's contents: 2048 sectors that all differ."""
QUEUE_SIZE = 16
FLOOD_RING = 4096
"""Size of the flooding guest's ring: half of it published ahead of the device is milliseconds of
work, so a flood outlasts the flooder's own pauses (a shared machine deschedules it now and
then)."""
PROTOCOL = int(
    ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG | ProtocolFeature.STATUS
)
"""The protocol features the front-end wants (QEMU's vhost-user-blk: these, of what is offered)."""
WANTED = int(
    Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX | Feature.PROTOCOL_FEATURES
)
"""The virtio features the front-end's driver negotiates (split ring, EVENT_IDX)."""
HARD_TIMEOUT = 120.0
"""Seconds after which a back-end is killed whatever the test is doing."""
IO_TIMEOUT = 1.0
"""``--io-timeout`` of the back-ends here: the time a whole message may take from its first byte."""
BOUND = 10.0
"""Seconds the well-behaved front-end gets for its requests while an attack goes on."""
REQUESTS = 20
"""Requests the well-behaved front-end completes while an attack goes on."""
SETTLE = 10.0
"""Seconds the back-end gets to release what a closed connection held."""
BLK = "virtio_schema.examples.blk"
LIMITED_NOFILE = 64
"""RLIMIT_NOFILE of the back-end that runs out of fds."""

# the back-end module run with a low fd limit (``python -c`` takes the CLI's arguments after it)
LIMITED = f"""
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMITED_NOFILE}, {LIMITED_NOFILE}))
runpy.run_module({BLK!r}, run_name="__main__", alter_sys=True)
"""

# a guest that publishes forever: avail.idx kept half a ring ahead of where the device is
# (avail_event, EVENT_IDX); every avail slot already holds the head of one valid request
FLOODER = """
import mmap, os, sys, time
fd, size, idx_at, event_at, ahead, kick_fd = map(int, sys.argv[1:7])
mm = mmap.mmap(fd, size)
words = memoryview(mm).cast("H")  # 16-bit loads and stores (struct.pack_into zeroes first)
idx, event = idx_at // 2, event_at // 2
end = time.monotonic() + 60
n = 0
while n & 0xFFFF or time.monotonic() < end:
    n += 1
    words[idx] = (words[event] + ahead) & 0xFFFF
    if not n & 0x3FF:  # and kicks now and then, in case the device caught up
        os.eventfd_write(kick_fd, 1)
"""


# --- the back-end process and what it holds ----------------------------------------------------


class Usage(NamedTuple):
    """What a back-end process holds: open fds, threads, mappings of memfds (guest memory)."""

    fds: int
    threads: int
    memfd_maps: int


def usage(pid: int) -> Usage:
    with open(f"/proc/{pid}/maps") as f:
        memfd_maps = sum(1 for line in f if "/memfd:" in line)
    return Usage(
        len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")), memfd_maps
    )


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used (``/proc/PID/stat`` utime, stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StartBackend(Protocol):
    def __call__(self, *options: str, nofile_limited: bool = False) -> BackendProcess: ...


@pytest.fixture
def start_backend(short_tmp: Path) -> Iterator[StartBackend]:
    """Starts the example blk back-end on a fresh copy of :data:`IMAGE` with ``--io-timeout``
    :data:`IO_TIMEOUT` and ``options``; every one started is stopped at the end."""
    started: list[BackendProcess] = []

    def start(*options: str, nofile_limited: bool = False) -> BackendProcess:
        n = len(started)
        image = short_tmp / f"disk{n}.img"
        image.write_bytes(IMAGE)
        sock = short_tmp / f"blk{n}.sock"
        cli = ["--vhost-user", str(sock), "--io-timeout", str(IO_TIMEOUT), *options, str(image)]
        args = ["-c", LIMITED, *cli] if nofile_limited else ["-m", BLK, *cli]
        be = BackendProcess(args, sock, short_tmp / f"blk{n}.log", timeout=HARD_TIMEOUT)
        started.append(be)  # the socket file appears once the server listens
        return be

    yield start
    for be in started:
        be.stop()


@pytest.fixture
def backend(start_backend: StartBackend) -> BackendProcess:
    return start_backend()


@contextmanager
def attacked(be: BackendProcess, *, fresh_sector: int = 9) -> Iterator[None]:
    """Around an attack: afterwards the back-end is alive, holds what it held before (the
    attacker's fds, threads and mappings released), and serves a fresh front-end."""
    before = usage(be.pid)
    yield
    assert be.proc.poll() is None, f"the back-end died:\n{be.log()}"
    assert wait_for(lambda: usage(be.pid) == before, timeout=SETTLE), (usage(be.pid), before)
    with session(str(be.sock), ram_name="vu-fresh") as fresh:
        read_sector(fresh, fresh_sector)
    assert wait_for(lambda: usage(be.pid) == before, timeout=SETTLE), (usage(be.pid), before)
    assert be.proc.poll() is None, f"the back-end died:\n{be.log()}"


# --- a well-behaved front-end ------------------------------------------------------------------


def seals(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS)


@dataclass
class Session:
    """A front-end with its RAM, one ring and its eventfds (all closed with the session)."""

    fe: Frontend
    ram: GuestRam
    ring: SplitRingDriver
    kick_fd: int
    call_fd: int
    stack: ExitStack = field(repr=False)

    def start_ring(
        self, *, kick_fd: int | None = None, polled: bool = False, base: int = 0
    ) -> None:
        """The per-start ring sequence QEMU sends (NUM, BASE, ADDR, CALL, KICK, ENABLE 1);
        ``polled``: KICK with the NOFD flag and no fd."""
        start_ring(
            self.fe, self.ring, None if polled else self.kick_fd if kick_fd is None else kick_fd,
            self.call_fd, base=base,
        )  # fmt: skip


def start_ring(
    fe: Frontend, ring: SplitRingDriver, kick_fd: int | None, call_fd: int, *, base: int = 0
) -> None:
    """Start ring 0 on ``ring`` (wherever its RAM is) as QEMU does: NUM, BASE ``base``, ADDR,
    CALL, KICK (``None``: NOFD, polled), ENABLE 1."""
    fe.set_vring_num(0, ring.size)
    fe.set_vring_base(0, base)
    fe.set_vring_addr(ring.vring_addr(0))
    fe.set_vring_call(0, call_fd)
    fe.set_vring_kick(0, kick_fd)
    assert fe.set_vring_enable(0, 1, need_reply=True) == 0


@contextmanager
def session(
    path: str,
    *,
    ram: GuestRam | None = None,
    ram_name: str = "vu-good",
    start: bool = True,
    ring_size: int = QUEUE_SIZE,
) -> Iterator[Session]:
    """Connect (the session owns ``ram`` if given); with ``start`` negotiate as QEMU does, share
    the memory and start ring 0."""
    with ExitStack() as stack:
        if ram is None:
            ram = GuestRam(name=ram_name)
        stack.enter_context(ram)
        fe = stack.enter_context(Frontend(path))
        kick_fd, call_fd = make_eventfd(), make_eventfd()
        stack.callback(os.close, kick_fd)
        stack.callback(os.close, call_fd)
        s = Session(fe, ram, SplitRingDriver(ram, ring_size), kick_fd, call_fd, stack)
        if start:
            negotiate(fe)
            assert fe.use_ram(ram, need_reply=True) == 0
            s.start_ring()
        yield s


def negotiate(fe: Frontend, *, protocol: int = PROTOCOL, features: int = WANTED) -> int:
    """Feature negotiation as QEMU does it (with REPLY_ACK and CONFIG, and the other
    ``protocol`` features, all of which the back-end must offer); the acked features."""
    offered = fe.get_features()
    agreed = fe.get_protocol_features() & protocol
    assert agreed == protocol, f"protocol features {protocol & ~agreed:#x} not offered"
    assert agreed & ProtocolFeature.REPLY_ACK
    assert agreed & ProtocolFeature.CONFIG
    fe.set_protocol_features(agreed)
    fe.set_owner()
    fe.set_features(offered & features)
    return offered & features


def publish_read(ring: SplitRingDriver, sector: int) -> int:
    """A virtio-blk IN request for one sector: header, 512 data bytes, status byte."""
    return ring.publish([BLK_REQ_HDR.pack(BlkReqHdr(BlkType.IN, 0, sector))], [SECTOR, 1])


def check_read(s: Session, head: int, sector: int) -> None:
    (used,) = s.ring.used()
    assert used.head == head
    assert used.len == SECTOR + 1
    assert used.data[:SECTOR] == IMAGE[sector * SECTOR : (sector + 1) * SECTOR], "wrong bytes"
    assert used.data[SECTOR] == BlkStatus.OK


def read_sector(s: Session, sector: int) -> None:
    """Publish a read, kick, wait for the used-buffer notification, check the bytes."""
    head = publish_read(s.ring, sector)
    kick(s.kick_fd)
    assert wait_signalled(s.call_fd), "no used-buffer notification"
    check_read(s, head, sector)


def read_sectors_within_bound(s: Session) -> float:
    """:data:`REQUESTS` reads, each checked; the seconds they took (asserted below BOUND)."""
    t0 = time.monotonic()
    for i in range(REQUESTS):
        read_sector(s, 100 + i)
    took = time.monotonic() - t0
    assert took < BOUND, f"{REQUESTS} requests took {took:.1f} s during the attack"
    return took


def header(request: int, size: int, flags: int = VERSION) -> bytes:
    return HEADER.pack(HeaderRec(request, flags, size))


def closed_by_peer(sock: socket.socket) -> bool:
    """The back-end closed ``sock`` (EOF or reset seen now, without waiting; unread replies
    before the EOF are skipped)."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                return True
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
    return False


def wait_dropped(sock: socket.socket, timeout: float) -> bool:
    """Read and discard until the back-end closes ``sock`` (EOF or reset); ``False`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(1 << 16):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            break
    return False


# --- guest memory ------------------------------------------------------------------------------


def test_guest_memory_is_sealed_against_shrinking_once_the_back_end_maps_it(
    backend: BackendProcess,
) -> None:
    ram = GuestRam(name="vu-sealable", sealable=True)
    with attacked(backend), session(str(backend.sock), ram=ram, start=False) as s:
        negotiate(s.fe)
        assert not seals(ram.fd) & fcntl.F_SEAL_SHRINK
        assert s.fe.use_ram(ram, need_reply=True) == 0
        assert seals(ram.fd) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(ram.fd, ram.size // 2)  # would SIGBUS the back-end on its next access
        assert os.fstat(ram.fd).st_size == ram.size
        s.start_ring()
        read_sector(s, 5)


def test_unsealable_guest_memory_is_served_with_a_logged_warning_by_default(
    backend: BackendProcess,
) -> None:
    with attacked(backend):
        log_at = len(backend.log())
        ram = GuestRam(name="vu-unsealable", sealable=False)
        with session(str(backend.sock), ram=ram, start=False) as s:
            assert seals(ram.fd) & fcntl.F_SEAL_SEAL
            negotiate(s.fe)
            assert s.fe.use_ram(ram, need_reply=True) == 0
            s.start_ring()
            read_sector(s, 6)
        assert backend.wait_for_log(r"(?i)seal|trust", timeout=5, after=log_at), backend.log()


def test_unsealable_guest_memory_is_refused_with_an_ack_under_the_sealed_policy(
    start_backend: StartBackend,
) -> None:
    be = start_backend("--memory-policy", "sealed")
    ram = GuestRam(name="vu-unsealable", sealable=False)
    with attacked(be), session(str(be.sock), ram=ram, start=False) as s:
        negotiate(s.fe)
        ack = s.fe.use_ram(ram, need_reply=True)
        assert ack is not None
        assert ack != 0, "unsealable memory accepted under --memory-policy sealed"
        assert s.fe.get_features() & Feature.VERSION_1  # the connection goes on
        with GuestRam(name="vu-sealable", sealable=True) as sealable:  # and takes sealable memory
            assert s.fe.use_ram(sealable, need_reply=True) == 0
            assert seals(sealable.fd) & fcntl.F_SEAL_SHRINK


# --- fds of the wrong kind ---------------------------------------------------------------------


def test_a_regular_file_as_kick_fd_closes_that_connection_only(
    backend: BackendProcess, short_tmp: Path
) -> None:
    path = str(backend.sock)
    with attacked(backend), session(path, ram_name="vu-bystander") as bystander:
        read_sector(bystander, 1)
        with (
            session(path, ram_name="vu-hostile", start=False) as s,
            open(short_tmp / "not-an-eventfd", "w+b") as regular,
        ):
            negotiate(s.fe)
            assert s.fe.use_ram(s.ram, need_reply=True) == 0
            s.fe.set_vring_num(0, QUEUE_SIZE)
            s.fe.set_vring_addr(s.ring.vring_addr(0))
            s.fe.set_vring_kick(0, regular.fileno())
            assert s.fe.wait_closed() == b"", "the back-end answered instead of disconnecting"
        read_sector(bystander, 2)  # the other connection never noticed


def test_a_kick_pipe_at_end_of_file_stops_its_ring_without_spinning(
    backend: BackendProcess,
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        r, w = os.pipe()
        os.close(w)  # nobody will ever write: the read end is at end-of-file for good
        try:
            s.start_ring(kick_fd=r)
        finally:
            os.close(r)
        cpu = cpu_seconds(backend.pid)
        time.sleep(2)
        spent = cpu_seconds(backend.pid) - cpu
        assert spent < 0.5, f"the back-end used {spent:.2f} s of CPU in 2 s: a busy loop"
        assert backend.wait_for_log(r"kick pipe is at end-of-file", timeout=5), backend.log()
        assert s.fe.get_features() & Feature.VERSION_1  # the connection goes on
        head = publish_read(s.ring, 3)
        s.start_ring()  # started again, with an eventfd: served from where it stopped
        kick(s.kick_fd)
        assert wait_signalled(s.call_fd)
        check_read(s, head, 3)


# --- running out of fds ------------------------------------------------------------------------


def test_running_out_of_fds_on_accept_pauses_accepting_and_keeps_serving(
    start_backend: StartBackend,
) -> None:
    be = start_backend(nofile_limited=True)
    path = str(be.sock)
    with attacked(be), session(path) as established, ExitStack() as flood:
        read_sector(established, 1)
        deadline = time.monotonic() + BOUND
        while "Too many open files" not in be.log():  # connect until accept() fails
            assert time.monotonic() < deadline, f"the back-end never ran out of fds:\n{be.log()}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(0.5)
            try:
                sock.connect(path)
            except OSError:  # the listen backlog is full: let the back-end accept
                sock.close()
                time.sleep(0.02)
                continue
            flood.callback(sock.close)
        for sector in range(10, 15):  # the established front-end is still served
            read_sector(established, sector)
        assert be.proc.poll() is None


# --- peers that hold the server ----------------------------------------------------------------


class Dribbler(threading.Thread):
    """Sends ``message`` one byte every ``interval`` seconds on a connection of its own, until
    the back-end drops it (``dropped`` is set) or :meth:`stop`."""

    def __init__(self, path: str, message: bytes, interval: float) -> None:
        super().__init__(name="dribbler", daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.message = message
        self.interval = interval
        self.sent = 0
        self.first_byte = 0.0
        self.dropped_after: float | None = None
        """Seconds from the first byte to the drop being seen."""
        self.dropped = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        for i in range(len(self.message)):
            try:
                self.sock.send(self.message[i : i + 1])
            except OSError:  # EPIPE or ECONNRESET: dropped
                break
            if i == 0:
                self.first_byte = time.monotonic()
            self.sent += 1
            if self._halt.wait(self.interval):
                return
            if closed_by_peer(self.sock):
                break
        else:
            return  # all sent, never dropped
        self.dropped_after = time.monotonic() - self.first_byte
        self.dropped.set()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.sock.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def test_a_dribbling_connection_neither_holds_another_nor_outlives_the_io_timeout(
    backend: BackendProcess,
) -> None:
    # SET_MEM_TABLE announcing 8 regions: 276 bytes, 83 s at 0.3 s a byte
    message = header(Request.SET_MEM_TABLE, 8 + 8 * MEM_REGION.size)
    message += bytes(8 + 8 * MEM_REGION.size)
    path = str(backend.sock)
    with attacked(backend), session(path) as good:
        read_sector(good, 0)
        with Dribbler(path, message, 0.3) as dribbler:
            assert wait_for(lambda: dribbler.sent >= 2, timeout=5)
            read_sectors_within_bound(good)
            assert dribbler.dropped.wait(IO_TIMEOUT + 5), "the dribbler was never dropped"
            assert dribbler.dropped_after is not None
            assert dribbler.dropped_after >= 0.9 * IO_TIMEOUT, dribbler.dropped_after
            assert dribbler.sent < len(message)


def test_a_connection_that_never_reads_is_dropped_and_holds_nobody(
    backend: BackendProcess,
) -> None:
    batch = header(Request.GET_FEATURES, 0) * 100
    cap = 2000  # batches: 200000 requests, 2.4 MB (the back-end drops it long before)
    sent = [0]
    outcome: list[str] = []
    path = str(backend.sock)

    def flood(fe: Frontend) -> None:
        try:
            while sent[0] < cap:
                fe.sock.sendall(batch)
                sent[0] += 1
        except (BrokenPipeError, ConnectionResetError):
            outcome.append("dropped")
        except OSError as exc:
            outcome.append(repr(exc))
        else:
            outcome.append("all sent")

    with attacked(backend), session(path) as good, Frontend(path, timeout=BOUND) as flooder:
        read_sector(good, 0)
        thread = threading.Thread(target=flood, args=(flooder,), name="flooder", daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: sent[0] >= 20 or bool(outcome), timeout=5)
            read_sectors_within_bound(good)
        finally:
            thread.join(timeout=2 * BOUND)
        assert not thread.is_alive()
        # the flooder sees its connection closed (after whatever replies got through)
        assert wait_dropped(flooder.sock, BOUND), "the flooder was never dropped"
        assert outcome in (["dropped"], ["all sent"]), outcome
        assert backend.wait_for_log(r"does not read", timeout=5), backend.log()
        read_sector(good, 1)


def test_a_guest_that_publishes_forever_does_not_starve_another_front_end(
    backend: BackendProcess,
) -> None:
    path = str(backend.sock)
    with attacked(backend), session(path) as good:
        read_sector(good, 0)
        flood_ram = GuestRam(4 << 20, name="vu-flood")
        with session(path, ram=flood_ram, ring_size=FLOOD_RING) as flooded:
            ring = flooded.ring

            def flood_served() -> bool:
                """The device took more than 64 chains of the flood in 0.2 s."""
                first = ring.avail_event
                time.sleep(0.2)
                return (ring.avail_event - first) & 0xFFFF > 4 * QUEUE_SIZE

            guest = flooding_guest(flooded)
            try:
                assert wait_for(flood_served, timeout=5), "the flood never got going"
                read_sectors_within_bound(good)
                assert guest.poll() is None
                assert flood_served(), "the flood stopped being served"
            finally:
                guest.kill()
                guest.wait(timeout=10)
            read_sector(good, 1)


def flooding_guest(s: Session) -> subprocess.Popen[bytes]:
    """The guest's flood (:data:`FLOODER`) in a process of its own, on the session's memfd and
    kick eventfd, over ring 0 with every avail slot holding one valid request."""
    ring, ram = s.ring, s.ram
    head = publish_read(ring, 7)
    for slot in range(ring.size):
        ring.avail.set_ring(slot, head)
    idx_at = ring.avail_addr - ram.gpa + ring.avail.idx_offset
    event_at = ring.used_addr - ram.gpa + ring.used_ring.avail_event_offset
    args = [ram.fd, ram.size, idx_at, event_at, ring.size // 2, s.kick_fd]
    return subprocess.Popen(
        [sys.executable, "-c", FLOODER, *map(str, args)],
        pass_fds=(ram.fd, s.kick_fd),
        stdin=subprocess.DEVNULL,
    )


# --- the specification's rules -----------------------------------------------------------------


def test_set_config_of_a_read_only_field_is_refused_with_an_ack_and_changes_nothing(
    backend: BackendProcess,
) -> None:
    with attacked(backend), Frontend(str(backend.sock)) as fe:
        negotiate(fe)
        capacity = (len(IMAGE) // SECTOR).to_bytes(8, "little")
        assert fe.get_config(0, 8) == (ConfigHdrRec(0, 8, 0), capacity)
        payload = CONFIG_HDR.pack(ConfigHdrRec(0, 8, 0)) + (1).to_bytes(8, "little")
        fe.send(Request.SET_CONFIG, payload, need_reply=True)
        assert fe.ack(Request.SET_CONFIG) != 0
        assert fe.get_config(0, 8) == (ConfigHdrRec(0, 8, 0), capacity)


def test_get_config_past_the_config_space_gets_an_empty_reply(backend: BackendProcess) -> None:
    with attacked(backend), Frontend(str(backend.sock)) as fe:
        negotiate(fe)
        past = CONFIG_HDR.pack(ConfigHdrRec(BLK_CONFIG.size - 4, 8, 0)) + bytes(8)
        fe.send(Request.GET_CONFIG, past)
        assert fe.reply(Request.GET_CONFIG) == b""
        assert fe.get_features() & Feature.VERSION_1  # the connection goes on


def test_set_features_changing_a_bit_while_a_ring_runs_is_refused_with_an_ack(
    backend: BackendProcess,
) -> None:
    with attacked(backend), session(str(backend.sock)) as s:
        read_sector(s, 1)
        acked = WANTED & s.fe.get_features()
        refused = s.fe.set_u64(Request.SET_FEATURES, acked & ~Feature.EVENT_IDX, need_reply=True)
        assert refused is not None
        assert refused != 0
        read_sector(s, 2)  # still served with EVENT_IDX


def test_a_ring_started_without_a_kick_fd_is_served_by_polling(backend: BackendProcess) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        s.start_ring(polled=True)
        for sector in (4, 5):
            head = publish_read(s.ring, sector)  # and no kick
            assert wait_for(lambda: s.ring.used_idx != s.ring.last_used), "not polled"
            check_read(s, head, sector)


def _u64(value: int) -> bytes:
    return U64.pack(U64Rec(value))


CLOSING = {
    "REPLY-flag-on-a-request": (Request.GET_FEATURES, b"", VERSION | HeaderFlags.REPLY),
    "reserved-flag": (Request.GET_FEATURES, b"", VERSION | 0x10),
    "reserved-high-flag": (Request.SET_OWNER, b"", VERSION | 0x8000_0000),
    "RESET_OWNER-with-8-bytes": (Request.RESET_OWNER, _u64(0), VERSION),
}


@pytest.mark.parametrize(("request_", "payload", "flags"), CLOSING.values(), ids=CLOSING.keys())
def test_a_malformed_header_or_payload_closes_the_connection(
    backend: BackendProcess, request_: int, payload: bytes, flags: int
) -> None:
    with attacked(backend), Frontend(str(backend.sock)) as fe:
        negotiate(fe)
        fe.send(request_, payload, flags=int(flags))
        assert fe.wait_closed() == b"", "the back-end answered instead of disconnecting"


# --- the messages of issue #20: shared helpers -------------------------------------------------

INFLIGHT_PROTOCOL = PROTOCOL | int(ProtocolFeature.INFLIGHT_SHMFD)
LOG_PROTOCOL = PROTOCOL | int(ProtocolFeature.LOG_SHMFD)
SLOTS_PROTOCOL = PROTOCOL | int(ProtocolFeature.CONFIGURE_MEM_SLOTS)
DEVICE_QUEUES = 8
"""Queues the example blk device has (its ``--max-queues`` default)."""
REGION_SIZE = region_size(1, QUEUE_SIZE, packed=False)
"""The inflight region of one split queue of :data:`QUEUE_SIZE` (320 bytes)."""
LOG_BYTES = -(-(GPA_BASE + (1 << 20)) // PAGE_SIZE // 8)
"""A dirty log that covers the default 1 MiB of RAM at :data:`GPA_BASE` (a bit per 4 KiB page
from guest-physical 0)."""
HOT_GPA = GPA_BASE + (256 << 20)
HOT_UVA = UVA_BASE + (256 << 20)
"""Where the region added with ADD_MEM_REG lies (far from the default RAM in both spaces)."""
INFLIGHT_MEMFD = "virtio-schema-inflight"
"""The name of the back-end's own inflight memfd (GET_INFLIGHT_FD)."""


def backend_maps(be: BackendProcess, name: str) -> int:
    """How many mappings of the memfd ``name`` the back-end process has."""
    tag = f"/memfd:{name} "
    with open(f"/proc/{be.pid}/maps") as f:
        return sum(1 for line in f if tag in line)


def shared_file(stack: ExitStack, data: bytes | int, name: str = "vu-shared") -> int:
    """A sealable memfd holding ``data`` (or that many zero bytes), closed with ``stack``."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    stack.callback(os.close, fd)
    if isinstance(data, int):
        os.ftruncate(fd, data)
    else:
        os.ftruncate(fd, len(data))
        os.pwrite(fd, data, 0)
    return fd


def other_fd(stack: ExitStack, kind: str) -> int:
    """An fd of ``kind`` (``pipe``, ``socket``, ``eventfd``), closed with ``stack``."""
    if kind == "pipe":
        r, w = os.pipe()
        stack.callback(os.close, w)
        stack.callback(os.close, r)
        return r
    if kind == "socket":
        a, b = socket.socketpair()
        stack.callback(b.close)
        stack.callback(a.close)
        return a.fileno()
    assert kind == "eventfd", kind
    fd = make_eventfd()
    stack.callback(os.close, fd)
    return fd


def closed_because(be: BackendProcess, fe: Frontend, reason: str, *, after: int) -> None:
    """The back-end closed ``fe``'s connection, and its log says why (``reason``, verbatim)."""
    assert fe.wait_closed() == b"", "the back-end answered instead of disconnecting"
    pattern = re.escape(reason) + r"[^\n]*; closing the connection"
    assert be.wait_for_log(pattern, timeout=5, after=after), be.log()[after:]


def refused_because(be: BackendProcess, reason: str, *, after: int) -> None:
    """The back-end logged a refusal (a non-zero ack) saying ``reason``."""
    pattern = r"refused: [^\n]*" + re.escape(reason)
    assert be.wait_for_log(pattern, timeout=5, after=after), be.log()[after:]


def chain_descs(ring: SplitRingDriver, head: int) -> list[tuple[int, Desc]]:
    """The descriptors of the chain at ``head`` as the table holds them, first to last."""
    out = [(head, ring.desc_table.get(head))]
    while out[-1][1].flags & DescFlags.NEXT and len(out) <= ring.size:
        index = out[-1][1].next
        out.append((index, ring.desc_table.get(index)))
    return out


def writable_ranges(ring: SplitRingDriver, head: int) -> list[tuple[int, int]]:
    """``(gpa, length)`` of the chain's device-writable buffers."""
    return [(d.addr, d.len) for _, d in chain_descs(ring, head) if d.flags & DescFlags.WRITE]


def changed_outside(
    before: bytes, after: bytes, base: int, allowed: Sequence[tuple[int, int]]
) -> list[int]:
    """Guest addresses (RAM at ``base``) whose byte changed from ``before`` to ``after`` and lies
    in none of the ``allowed`` ``(gpa, length)`` ranges (at most 16 of them listed)."""
    out: list[int] = []
    step = 4096
    for at in range(0, len(before), step):
        if before[at : at + step] == after[at : at + step]:
            continue
        for k in range(at, min(at + step, len(before))):
            gpa = base + k
            if before[k] != after[k] and not any(a <= gpa < a + n for a, n in allowed):
                out.append(gpa)
                if len(out) == 16:
                    return out
    return out


# --- inflight regions (GET_INFLIGHT_FD, SET_INFLIGHT_FD) ---------------------------------------


def split_region(
    queue_size: int = QUEUE_SIZE,
    *,
    version: int = 1,
    desc_num: int | None = None,
    last_batch_head: int = 0,
    used_idx: int = 0,
    entries: Mapping[int, DescStateSplitRec] = MappingProxyType({}),
) -> bytes:
    """A split queue region laid out by hand (vhost-user.rst, "Inflight I/O tracking")."""
    buf = bytearray(region_size(1, queue_size, packed=False))
    hdr = QueueRegionSplitRec(
        0, version, queue_size if desc_num is None else desc_num, last_batch_head, used_idx
    )
    SPLIT_QUEUE_REGION.pack_into(buf, 0, hdr)
    for i, entry in entries.items():
        SPLIT_DESC_STATE.pack_into(buf, SPLIT_QUEUE_REGION.size + i * SPLIT_DESC_STATE.size, entry)
    return bytes(buf)


def in_flight(region: mmap.mmap, queue_size: int = QUEUE_SIZE) -> list[int]:
    """The heads the region says are in flight."""
    at = SPLIT_QUEUE_REGION.size
    step = SPLIT_DESC_STATE.size
    return [
        i for i in range(queue_size) if SPLIT_DESC_STATE.unpack_from(region, at + i * step).inflight
    ]


def test_get_inflight_fd_hands_over_a_sealed_region_that_the_ring_records_in(
    backend: BackendProcess,
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=INFLIGHT_PROTOCOL)
        rec, fd = s.fe.get_inflight_fd(1, QUEUE_SIZE)
        assert fd is not None, "no region fd with the reply"
        s.stack.callback(os.close, fd)
        assert rec == InflightRec(REGION_SIZE, 0, 1, QUEUE_SIZE)
        assert os.fstat(fd).st_size == REGION_SIZE
        sealed = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        assert seals(fd) & sealed == sealed
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # the back-end maps it: it cannot be cut under its feet
        assert backend_maps(backend, INFLIGHT_MEMFD) == 1
        region = mmap.mmap(fd, REGION_SIZE)
        s.stack.callback(region.close)
        assert bytes(region) == bytes(REGION_SIZE)
        assert s.fe.set_inflight_fd(rec, fd, need_reply=True) == 0  # QEMU: its copy, at start
        assert backend_maps(backend, INFLIGHT_MEMFD) == 1  # the new mapping replaced the old
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        s.start_ring()
        head = publish_read(s.ring, 3)
        kick(s.kick_fd)
        assert wait_signalled(s.call_fd)
        check_read(s, head, 3)
        hdr = SPLIT_QUEUE_REGION.unpack_from(region)
        assert (hdr.version, hdr.desc_num, hdr.used_idx) == (1, QUEUE_SIZE, 1)
        assert in_flight(region) == []  # taken, recorded, completed
        entry = SPLIT_DESC_STATE.unpack_from(region, SPLIT_QUEUE_REGION.size + 16 * head)
        assert entry.counter == 0


def test_inflight_regions_asked_for_and_never_mapped_hold_one_mapping_in_the_back_end(
    backend: BackendProcess,
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=INFLIGHT_PROTOCOL)
        for _ in range(20):  # a front-end that asks again and again and maps none of them
            rec, fd = s.fe.get_inflight_fd(DEVICE_QUEUES, QUEUE_SIZE)
            assert fd is not None
            os.close(fd)
            assert rec.mmap_size == region_size(DEVICE_QUEUES, QUEUE_SIZE, packed=False)
        assert backend_maps(backend, INFLIGHT_MEMFD) == 1  # each replaced the one before
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        s.start_ring()  # and the ring records in the last one, which only the back-end maps
        read_sector(s, 4)
        read_sector(s, 5)


MALFORMED_INFLIGHT = {
    "too-small-for-its-queues": (
        InflightRec(64, 0, 1, QUEUE_SIZE), None,
        "SET_INFLIGHT_FD: inflight region of 64 bytes, 1 split queues of 16 entries need 320",
    ),
    "more-queues-than-the-device": (
        InflightRec(REGION_SIZE * 9, 0, 9, QUEUE_SIZE), None,
        "SET_INFLIGHT_FD for 9 queues, the device has 8",
    ),
    "no-queues": (
        InflightRec(REGION_SIZE, 0, 0, QUEUE_SIZE), None,
        "SET_INFLIGHT_FD for 0 queues, the device has 8",
    ),
    "queue-size-0": (
        InflightRec(REGION_SIZE, 0, 1, 0), None,
        "SET_INFLIGHT_FD: inflight region: queue_size 0 (1..32768)",
    ),
    "queue-size-over-32768": (
        InflightRec(REGION_SIZE, 0, 1, 40000), None,
        "SET_INFLIGHT_FD: inflight region: queue_size 40000 (1..32768)",
    ),
    "a-pipe": (InflightRec(REGION_SIZE, 0, 1, QUEUE_SIZE), "pipe", "is a pipe, not one file"),
    "a-socket": (
        InflightRec(REGION_SIZE, 0, 1, QUEUE_SIZE), "socket", "is a socket, not one file",
    ),
    "an-eventfd": (
        InflightRec(REGION_SIZE, 0, 1, QUEUE_SIZE), "eventfd", "is an eventfd, not one file",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("rec", "kind", "reason"), MALFORMED_INFLIGHT.values(), ids=MALFORMED_INFLIGHT.keys()
)
def test_a_malformed_set_inflight_fd_closes_the_connection_with_its_reason(
    backend: BackendProcess, rec: InflightRec, kind: str | None, reason: str
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=INFLIGHT_PROTOCOL)
        fd = shared_file(s.stack, REGION_SIZE) if kind is None else other_fd(s.stack, kind)
        log_at = len(backend.log())
        s.fe.set_inflight_fd(rec, fd)
        closed_because(backend, s.fe, reason, after=log_at)


SHORT_INFLIGHT = {
    "offset-past-the-file": (
        InflightRec(REGION_SIZE, 4096, 1, QUEUE_SIZE),
        "offset 0x1000 + size 0x140 is past the end of the file (0x140)",
    ),
    "size-past-the-file": (
        InflightRec(1 << 40, 0, 1, QUEUE_SIZE),
        "offset 0x0 + size 0x10000000000 is past the end of the file (0x140)",
    ),
    "size-and-offset-near-2**64": (
        InflightRec((1 << 63) - 1, (1 << 63) + 1, 1, QUEUE_SIZE),
        "offset 0x8000000000000001 + size 0x7fffffffffffffff is past the end of the file (0x140)",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("rec", "reason"), SHORT_INFLIGHT.values(), ids=SHORT_INFLIGHT.keys())
def test_an_inflight_fd_shorter_than_the_region_it_claims_is_refused_with_an_ack(
    backend: BackendProcess, rec: InflightRec, reason: str
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=INFLIGHT_PROTOCOL)
        fd = shared_file(s.stack, REGION_SIZE, "vu-inflight")
        log_at = len(backend.log())
        assert s.fe.set_inflight_fd(rec, fd, need_reply=True) == 1
        refused_because(backend, f"SET_INFLIGHT_FD: {reason}", after=log_at)
        assert backend_maps(backend, "vu-inflight") == 0
        assert s.fe.use_ram(s.ram, need_reply=True) == 0  # the connection goes on, untracked
        s.start_ring()
        read_sector(s, 6)


def _entry(inflight: int, counter: int = 0, next_: int = 0) -> DescStateSplitRec:
    return DescStateSplitRec(inflight, next_, counter)


GARBAGE_REGIONS = {
    "desc_num-not-the-queue-size": (
        QUEUE_SIZE, split_region(desc_num=99), "desc_num 99, the queue size is 16",
    ),
    "unknown-version": (QUEUE_SIZE, split_region(version=7), "version 7, expected 0 or 1"),
    "entry-past-the-ring": (
        32, split_region(32, entries={20: _entry(1)}),
        "head 20 in flight, the ring has 16 descriptors",
    ),
    "used_idx-far-ahead-of-the-guest": (
        QUEUE_SIZE, split_region(used_idx=100),
        "used_idx 100, the guest's used idx 0: a last batch of 65436 heads",
    ),
    "inflight-flag-2": (
        QUEUE_SIZE, split_region(entries={3: _entry(2)}), "entry 3 has inflight 2 (0 or 1)",
    ),
    "last_batch_head-outside-the-queue": (
        QUEUE_SIZE, split_region(last_batch_head=16), "last_batch_head 16 outside 0..15",
    ),
    "last-batch-list-loops": (
        QUEUE_SIZE,
        split_region(used_idx=0xFFFE, last_batch_head=3, entries={3: _entry(1, next_=3)}),
        "the last batch list loops back to head 3 after 1 of 2 heads",
    ),
    "two-entries-with-one-counter": (
        QUEUE_SIZE, split_region(entries={1: _entry(1, 5), 2: _entry(1, 5)}),
        "entries 1 and 2 are in flight with the same counter 5",
    ),
    "queue-size-below-the-ring": (
        8, split_region(8, version=0), "ring of 16 descriptors, the region tracks queues of 8",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("queue_size", "contents", "reason"), GARBAGE_REGIONS.values(), ids=GARBAGE_REGIONS.keys()
)
def test_a_garbage_inflight_region_ends_the_ring_start_and_is_left_as_it_was(
    backend: BackendProcess, queue_size: int, contents: bytes, reason: str
) -> None:
    """SET_INFLIGHT_FD maps the region; its contents are checked when the ring starts (KICK):
    the connection ends there, nothing is served and the region is not written."""
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=INFLIGHT_PROTOCOL)
        fd = shared_file(s.stack, contents, "vu-inflight")
        rec = InflightRec(len(contents), 0, 1, queue_size)
        assert s.fe.set_inflight_fd(rec, fd, need_reply=True) == 0
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        head = publish_read(s.ring, 7)  # waiting in the ring: it must not be served
        log_at = len(backend.log())
        s.fe.set_vring_num(0, QUEUE_SIZE)
        s.fe.set_vring_base(0, 0)
        s.fe.set_vring_addr(s.ring.vring_addr(0))
        s.fe.set_vring_call(0, s.call_fd)
        s.fe.set_vring_kick(0, s.kick_fd)
        closed_because(backend, s.fe, f"inflight region: {reason}", after=log_at)
        assert os.pread(fd, len(contents) + 1, 0) == contents, "the region was written"
        assert s.ring.used_idx == 0
        assert s.ram.read(writable_ranges(s.ring, head)[0][0], SECTOR) == bytes(SECTOR)


# --- the dirty log (SET_LOG_BASE, SET_LOG_FD) ----------------------------------------------------


def set_log_base(
    fe: Frontend, fd: int, size: int, offset: int = 0, *, need_reply: bool = True
) -> None:
    """Send SET_LOG_BASE (the answer is read by the caller: :meth:`Frontend.ack`)."""
    payload = LOG_DESCRIPTION.pack(LogDescriptionRec(size, offset))
    fe.send(Request.SET_LOG_BASE, payload, fds=[fd], need_reply=need_reply)


def marked_pages(log: mmap.mmap) -> set[int]:
    """The pages whose bit is set in the dirty log."""
    data = bytes(log)
    return {8 * i + b for i, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1}


def pages_of(ranges: Sequence[tuple[int, int]]) -> set[int]:
    return {p for a, n in ranges for p in range(a // PAGE_SIZE, (a + n - 1) // PAGE_SIZE + 1)}


@pytest.mark.parametrize("need_reply", [True, False], ids=["with-an-ack", "without"])
def test_a_log_too_small_for_the_memory_is_refused_with_an_ack_or_ends_the_connection(
    backend: BackendProcess, need_reply: bool
) -> None:
    """A log must have a bit for every page of the memory table. SET_LOG_BASE is answered with
    the ack's failure when the front-end asked for one (the connection goes on, no log);
    without NEED_REPLY the connection ends (the front-end would believe it logs)."""
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=LOG_PROTOCOL)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        s.start_ring()
        fd = shared_file(s.stack, PAGE_SIZE, "vu-log")
        log_at = len(backend.log())
        set_log_base(s.fe, fd, PAGE_SIZE, need_reply=need_reply)
        reason = "a log of 4096 bytes covers 32768 pages, the memory ends at 0x40100000"
        if not need_reply:
            closed_because(backend, s.fe, reason, after=log_at)
            return
        assert s.fe.ack(Request.SET_LOG_BASE) == 1
        refused_because(backend, reason, after=log_at)
        assert backend_maps(backend, "vu-log") == 0
        read_sector(s, 8)  # the ring goes on


def test_a_log_fd_shorter_than_its_claimed_size_is_refused_with_an_ack(
    backend: BackendProcess,
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=LOG_PROTOCOL)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        fd = shared_file(s.stack, PAGE_SIZE, "vu-log")
        log_at = len(backend.log())
        set_log_base(s.fe, fd, LOG_BYTES)
        assert s.fe.ack(Request.SET_LOG_BASE) == 1
        refused_because(backend, f"size {LOG_BYTES:#x} is past the end of the file", after=log_at)
        set_log_base(s.fe, fd, 64, offset=PAGE_SIZE)  # an offset at the end of the file
        assert s.fe.ack(Request.SET_LOG_BASE) == 1
        refused_because(backend, "offset 0x1000 + size 0x40 is past the end", after=log_at)
        s.start_ring()
        read_sector(s, 9)


MALFORMED_LOG = {
    "zero-size": (0, None, "SET_LOG_BASE size 0x0 offset 0x0"),
    "a-pipe": (LOG_BYTES, "pipe", "is a pipe, not one file"),
    "a-socket": (LOG_BYTES, "socket", "is a socket, not one file"),
    "an-eventfd": (LOG_BYTES, "eventfd", "is an eventfd, not one file"),
}


@pytest.mark.parametrize(
    ("size", "kind", "reason"), MALFORMED_LOG.values(), ids=MALFORMED_LOG.keys()
)
def test_a_malformed_set_log_base_closes_the_connection_with_its_reason(
    backend: BackendProcess, size: int, kind: str | None, reason: str
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=LOG_PROTOCOL)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        fd = shared_file(s.stack, LOG_BYTES) if kind is None else other_fd(s.stack, kind)
        log_at = len(backend.log())
        set_log_base(s.fe, fd, size)
        closed_because(backend, s.fe, reason, after=log_at)


def test_a_served_request_marks_its_buffers_and_the_used_ring_at_its_log_address(
    backend: BackendProcess,
) -> None:
    """Migration as QEMU runs it on a running ring: SET_LOG_BASE, SET_LOG_FD, LOG_ALL acked with
    SET_FEATURES, SET_VRING_ADDR with VHOST_VRING_F_LOG. A request served then marks the pages
    of its writable buffers and the used ring's pages at the LOG ADDRESS (a page of its own
    here), nothing else; the log eventfd is signalled; LOG_ALL off, nothing is marked."""
    with attacked(backend), session(str(backend.sock), start=False) as s:
        acked = negotiate(s.fe, protocol=LOG_PROTOCOL)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        s.start_ring()
        read_sector(s, 10)  # served before logging starts
        fd = shared_file(s.stack, LOG_BYTES, "vu-log")
        set_log_base(s.fe, fd, LOG_BYTES, need_reply=False)  # QEMU waits for the answer anyway
        assert s.fe.ack(Request.SET_LOG_BASE) == 0
        log = mmap.mmap(fd, LOG_BYTES)
        s.stack.callback(log.close)
        log_efd = other_fd(s.stack, "eventfd")
        s.fe.send(Request.SET_LOG_FD, fds=[log_efd])
        assert s.fe.set_u64(Request.SET_FEATURES, acked | LOG_ALL, need_reply=True) == 0
        log_gpa = s.ram.alloc(PAGE_SIZE, PAGE_SIZE)  # the used ring's log address: its own page
        addr = s.ring.vring_addr(0)._replace(flags=VRING_F_LOG, log=log_gpa)
        assert s.fe.set_vring_addr(addr, need_reply=True) == 0
        # the request's buffers on pages of their own: the data on one, the status on the next
        at = s.ram.memory.alloc_at(s.ram.gpa + 8 * PAGE_SIZE, 2 * PAGE_SIZE)
        log[:] = bytes(LOG_BYTES)  # what the start of logging marked (the rings) is copied
        while wait_signalled(log_efd, timeout=0.2):
            pass
        head = publish_raw_read(s.ring, 11, at + 0x200, hdr=at, status=at + PAGE_SIZE)
        kick(s.kick_fd)
        assert wait_signalled(s.call_fd)
        (used,) = s.ring.used()
        assert (used.head, used.len) == (head, SECTOR + 1)
        assert s.ram.read(at + 0x200, SECTOR) == IMAGE[11 * SECTOR : 12 * SECTOR]
        used_pages = pages_of([(log_gpa, used_ring(QUEUE_SIZE).sizeof())])
        assert marked_pages(log) == {at // PAGE_SIZE, at // PAGE_SIZE + 1} | used_pages
        assert s.ring.used_addr // PAGE_SIZE not in marked_pages(log)  # the log address is used
        assert wait_signalled(log_efd), "the log eventfd was not signalled"
        assert s.fe.set_u64(Request.SET_FEATURES, acked, need_reply=True) == 0  # migration over
        log[:] = bytes(LOG_BYTES)
        read_sector(s, 12)
        assert marked_pages(log) == set()


@pytest.mark.parametrize("kind", ["file", "socket"])
def test_set_log_fd_that_is_not_an_eventfd_closes_the_connection(
    backend: BackendProcess, kind: str
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=LOG_PROTOCOL)
        fd = shared_file(s.stack, 8) if kind == "file" else other_fd(s.stack, kind)
        log_at = len(backend.log())
        s.fe.send(Request.SET_LOG_FD, fds=[fd])
        closed_because(backend, s.fe, "SET_LOG_FD without one eventfd", after=log_at)


def test_a_log_the_memory_outgrew_is_never_written_past_its_end(backend: BackendProcess) -> None:
    """A log set before the memory table (so it "covers" it) and then outgrown by it: the marks
    past its end are dropped, never written past ``mmap_size`` (the file goes on beyond it)."""
    with attacked(backend), session(str(backend.sock), start=False) as s:
        acked = negotiate(s.fe, protocol=LOG_PROTOCOL, features=WANTED | LOG_ALL)
        assert acked & LOG_ALL
        fd = shared_file(s.stack, 2 * PAGE_SIZE, "vu-log")
        set_log_base(s.fe, fd, PAGE_SIZE)  # 32768 pages: 128 MiB, and the RAM is at 1 GiB
        assert s.fe.ack(Request.SET_LOG_BASE) == 0
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        s.start_ring()
        for sector in (13, 14):
            read_sector(s, sector)
        assert os.pread(fd, 2 * PAGE_SIZE, 0) == bytes(2 * PAGE_SIZE)


# --- memory regions added and removed (ADD_MEM_REG, REM_MEM_REG) --------------------------------


def hot_ram(stack: ExitStack, size: int = 64 << 10, name: str = "vu-hot") -> GuestRam:
    """A second RAM region for ADD_MEM_REG at :data:`HOT_GPA`, filled with a pattern."""
    ram = stack.enter_context(GuestRam(size, gpa=HOT_GPA, uva=HOT_UVA, name=name))
    ram.mm[:] = random.Random(20).randbytes(size)
    return ram


def publish_raw_read(
    ring: SplitRingDriver,
    sector: int,
    data: int,
    *,
    hdr: int | None = None,
    status: int | None = None,
) -> int:
    """A read request whose 512-byte data buffer is at guest address ``data`` (anywhere, e.g. in
    another region), its header and status byte at ``hdr`` and ``status`` (already reserved) or
    allocated in the ring's RAM. Raw descriptors (never freed): the test reads the bytes back."""
    if hdr is None:
        hdr = ring.alloc_buffer(BLK_REQ_HDR.size)
    ring.memory.write(hdr, BLK_REQ_HDR.pack(BlkReqHdr(BlkType.IN, 0, sector)))
    if status is None:
        status = ring.alloc_buffer(1)
    d0, d1, d2 = (ring.take_descriptor() for _ in range(3))
    ring.write_desc(d0, hdr, BLK_REQ_HDR.size, DescFlags.NEXT, d1)
    ring.write_desc(d1, data, SECTOR, DescFlags.WRITE | DescFlags.NEXT, d2)
    ring.write_desc(d2, status, 1, DescFlags.WRITE, 0)
    ring.push_head(d0)
    return d0


def test_removing_the_region_that_holds_a_ring_stops_that_ring_and_unmaps_it(
    backend: BackendProcess,
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=SLOTS_PROTOCOL)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        hot = hot_ram(s.stack)
        assert s.fe.add_mem_reg(hot, need_reply=True) == 0
        hot_ring = SplitRingDriver(hot, QUEUE_SIZE)  # all three areas in the added region
        start_ring(s.fe, hot_ring, s.kick_fd, s.call_fd)
        head = publish_read(hot_ring, 15)
        kick(s.kick_fd)
        assert wait_signalled(s.call_fd)
        (used,) = hot_ring.used()
        assert (used.head, used.data[:SECTOR]) == (head, IMAGE[15 * SECTOR : 16 * SECTOR])
        assert backend_maps(backend, "vu-hot") == 1
        log_at = len(backend.log())
        publish_read(hot_ring, 16)  # waiting, unkicked, when the region goes
        assert s.fe.rem_mem_reg(hot, need_reply=True) == 0
        assert backend.wait_for_log("ring 0 lost its memory; the ring stops", 5, after=log_at)
        assert backend_maps(backend, "vu-hot") == 0  # unmapped at once: nothing holds it
        before = bytes(hot.mm)
        kick(s.kick_fd)  # a kick fd the stopped ring no longer has
        time.sleep(0.3)
        assert bytes(hot.mm) == before, "the back-end wrote to a removed region"
        assert s.fe.get_features() & Feature.VERSION_1  # the connection goes on
        s.start_ring()  # ring 0 started again, in the RAM that stayed
        read_sector(s, 17)


def test_a_region_removed_under_an_outstanding_request_is_unmapped_after_it(
    start_backend: StartBackend,
) -> None:
    """The device holds a request whose data buffer is in an added region (``--latency``) when
    REM_MEM_REG arrives: that request completes with the right bytes (the region was offered
    when it was taken; the server serves one thing at a time), the region is unmapped after it,
    and a request published there afterwards comes back unwritten (length 0)."""
    be = start_backend("--latency", "1")
    with attacked(be), session(str(be.sock), start=False) as s:
        negotiate(s.fe, protocol=SLOTS_PROTOCOL)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        hot = hot_ram(s.stack)
        assert s.fe.add_mem_reg(hot, need_reply=True) == 0
        s.start_ring()
        first = publish_raw_read(s.ring, 18, hot.gpa + 0x1000)
        kick(s.kick_fd)
        assert wait_for(lambda: s.ring.avail_event == 1), "the request was not taken"
        assert s.fe.rem_mem_reg(hot, need_reply=True) == 0  # answered once it completed
        assert backend_maps(be, "vu-hot") == 0
        assert wait_signalled(s.call_fd)
        (done,) = s.ring.used()
        assert (done.head, done.len) == (first, SECTOR + 1)
        assert hot.read(hot.gpa + 0x1000, SECTOR) == IMAGE[18 * SECTOR : 19 * SECTOR]
        before = bytes(hot.mm)
        log_at = len(be.log())
        late = publish_raw_read(s.ring, 19, hot.gpa + 0x2000)  # in memory no longer offered
        kick(s.kick_fd)
        assert wait_signalled(s.call_fd)
        (returned,) = s.ring.used()
        assert (returned.head, returned.len) == (late, 0)
        assert bytes(hot.mm) == before, "the back-end wrote to a removed region"
        assert be.wait_for_log(r"bad request", timeout=5, after=log_at), be.log()[log_at:]
        read_sector(s, 20)  # the ring goes on


def test_rem_mem_reg_of_a_region_never_added_is_refused_with_an_ack(
    backend: BackendProcess,
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=SLOTS_PROTOCOL)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        s.start_ring()
        hot = hot_ram(s.stack)
        log_at = len(backend.log())
        assert s.fe.rem_mem_reg(hot, need_reply=True) == 1
        refused_because(backend, f"REM_MEM_REG: no region at gpa {HOT_GPA:#x}", after=log_at)
        # the RAM in use, with the wrong size: not that region either
        assert s.fe.rem_mem_reg(s.ram, need_reply=True, memory_size=PAGE_SIZE) == 1
        read_sector(s, 21)


def test_add_mem_reg_beyond_get_max_mem_slots_is_refused_with_an_ack(
    backend: BackendProcess,
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=SLOTS_PROTOCOL)
        slots = s.fe.get_max_mem_slots()
        assert slots == 32
        assert s.fe.use_ram(s.ram, need_reply=True) == 0  # one slot
        many = hot_ram(s.stack, slots * PAGE_SIZE, "vu-slots")

        def add(k: int) -> int | None:
            return s.fe.add_mem_reg(
                many, need_reply=True, guest_phys_addr=HOT_GPA + k * 0x10000,
                userspace_addr=HOT_UVA + k * 0x10000, memory_size=PAGE_SIZE,
                mmap_offset=k * PAGE_SIZE,
            )  # fmt: skip

        for k in range(slots - 1):
            assert add(k) == 0, k
        assert backend_maps(backend, "vu-slots") == slots - 1
        log_at = len(backend.log())
        assert add(slots - 1) == 1
        refused_because(backend, f"ADD_MEM_REG: all {slots} slots in use", after=log_at)
        assert backend_maps(backend, "vu-slots") == slots - 1
        s.start_ring()
        read_sector(s, 22)


MALFORMED_ADD = {
    "user-range-overlaps": (
        {"userspace_addr": UVA_BASE + 0x1000}, None, "overlaps the region at 0x7f0000000000",
    ),
    "guest-range-overlaps": (
        {"guest_phys_addr": GPA_BASE + 0x1000}, None,
        "ADD_MEM_REG: regions MemoryRegion(0x40000000..0x40100000) and"
        " MemoryRegion(0x40001000..0x40011000) overlap",
    ),
    "zero-size": ({"memory_size": 0}, None, "is not a valid range"),
    "size-past-2**64": (
        {"memory_size": 1 << 63, "guest_phys_addr": 3 << 62}, None, "is not a valid range",
    ),
    "a-pipe": ({}, "pipe", "is a pipe, not a file"),
    "a-socket": ({}, "socket", "is a socket, not a file"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "kind", "reason"), MALFORMED_ADD.values(), ids=MALFORMED_ADD.keys()
)
def test_an_overlapping_or_malformed_add_mem_reg_closes_the_connection(
    backend: BackendProcess, changes: dict[str, int], kind: str | None, reason: str
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=SLOTS_PROTOCOL)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        hot = hot_ram(s.stack)
        rec = hot.region(**changes)
        fd = hot.fd if kind is None else other_fd(s.stack, kind)
        log_at = len(backend.log())
        s.fe.send(Request.ADD_MEM_REG, SINGLE_MEM_REGION.pack(rec), fds=[fd], need_reply=True)
        closed_because(backend, s.fe, reason, after=log_at)


def test_an_added_region_larger_than_its_fd_is_refused_with_an_ack(
    backend: BackendProcess,
) -> None:
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=SLOTS_PROTOCOL)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        hot = hot_ram(s.stack)
        log_at = len(backend.log())
        assert s.fe.add_mem_reg(hot, need_reply=True, memory_size=2 * hot.size) == 1
        refused_because(backend, "is past the end of the file", after=log_at)
        assert s.fe.add_mem_reg(hot, need_reply=True, mmap_offset=PAGE_SIZE) == 1
        assert backend_maps(backend, "vu-hot") == 0
        s.start_ring()
        read_sector(s, 23)


# --- a restart: what the dead back-end had in flight, taken again ------------------------------


def point_data_outside_memory(ring: SplitRingDriver, head: int) -> None:
    """The data buffer at a guest address no region holds."""
    (_, _), (i, data), _ = chain_descs(ring, head)
    ring.write_desc(i, 0x1000, data.len, data.flags, data.next)


def loop_the_chain(ring: SplitRingDriver, head: int) -> None:
    """The status descriptor leads back to the data one: a loop."""
    _, (i, _), (j, status) = chain_descs(ring, head)
    ring.write_desc(j, status.addr, status.len, status.flags | DescFlags.NEXT, i)


def data_over_the_end_of_memory(ring: SplitRingDriver, head: int) -> None:
    """The data buffer starts in RAM and runs past its end."""
    (_, _), (i, data), _ = chain_descs(ring, head)
    ring.write_desc(i, ring.ram.gpa + ring.ram.size - 100, data.len, data.flags, data.next)


CORRUPTIONS = {
    "data-buffer-outside-memory": point_data_outside_memory,
    "data-buffer-over-the-end-of-memory": data_over_the_end_of_memory,
    "a-loop": loop_the_chain,
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_chain_corrupted_after_the_back_end_died_is_returned_unwritten_by_the_next_one(
    start_backend: StartBackend, corrupt: Callable[[SplitRingDriver, int], None]
) -> None:
    """The back-end is SIGKILLed while it holds a request (``--latency``: taken, recorded in the
    inflight region, not yet served); the guest then rewrites that chain's descriptors. The next
    back-end, handed the same region (SET_INFLIGHT_FD) and the used index (SET_VRING_BASE, as
    QEMU after a reconnect), takes the chain again, finds it malformed and returns it with
    length 0: no byte of guest RAM changes but the used ring and the buffers of the requests it
    serves after it, correctly."""
    first = start_backend("--latency", "10")
    with ExitStack() as stack:
        ram = stack.enter_context(GuestRam(name="vu-restart"))
        ram.mm[:] = random.Random(21).randbytes(ram.size)  # the pattern; rings and buffers are
        ring = SplitRingDriver(ram, QUEUE_SIZE)  # zeroed as they are allocated
        kick_fd, call_fd = make_eventfd(), make_eventfd()
        stack.callback(os.close, kick_fd)
        stack.callback(os.close, call_fd)
        with Frontend(str(first.sock)) as fe:
            negotiate(fe, protocol=INFLIGHT_PROTOCOL)
            rec, region_fd = fe.get_inflight_fd(1, QUEUE_SIZE)
            assert region_fd is not None
            stack.callback(os.close, region_fd)
            region = mmap.mmap(region_fd, rec.mmap_size)
            stack.callback(region.close)
            assert fe.set_inflight_fd(rec, region_fd, need_reply=True) == 0
            assert fe.use_ram(ram, need_reply=True) == 0
            start_ring(fe, ring, kick_fd, call_fd)
            held = publish_read(ring, 24)
            waiting = publish_read(ring, 25)  # not taken yet when the back-end dies
            kick(kick_fd)
            assert wait_for(lambda: in_flight(region) == [held]), "the request was not taken"
            assert first.stop(grace=0, sig=signal.SIGKILL) == -signal.SIGKILL
        assert ring.used_idx == 0
        corrupt(ring, held)
        later = publish_read(ring, 26)
        allowed = [
            (ring.used_addr, used_ring(QUEUE_SIZE).sizeof()),
            *writable_ranges(ring, waiting),
            *writable_ranges(ring, later),
        ]
        snapshot = bytes(ram.mm)
        second = start_backend()
        with attacked(second), Frontend(str(second.sock)) as fe:
            negotiate(fe, protocol=INFLIGHT_PROTOCOL)
            assert fe.set_inflight_fd(rec, region_fd, need_reply=True) == 0  # the same region
            assert fe.use_ram(ram, need_reply=True) == 0
            start_ring(fe, ring, kick_fd, call_fd, base=ring.used_idx)
            kick(kick_fd)
            assert wait_for(lambda: ring.used_idx == 3), f"used idx {ring.used_idx}"
            after = bytes(ram.mm)  # before the driver takes the used entries (it writes too)
            assert wait_signalled(call_fd)
            returned, *served = ring.used()
            assert (returned.head, returned.len) == (held, 0)
            assert [(u.head, u.len) for u in served] == [(waiting, SECTOR + 1), (later, SECTOR + 1)]
            for used, sector in zip(served, (25, 26), strict=True):
                assert used.data[:SECTOR] == IMAGE[sector * SECTOR : (sector + 1) * SECTOR]
                assert used.data[SECTOR] == BlkStatus.OK
            assert changed_outside(snapshot, after, ram.gpa, allowed) == []
            assert in_flight(region) == []
            read_sector(Session(fe, ram, ring, kick_fd, call_fd, stack), 27)  # and goes on
        log = second.log()
        assert "ring 0: 1 requests in flight taken again" in log, log
        assert "bad request" in log, log


# --- the device's state: RESET_DEVICE, SET_STATUS, SET_BACKEND_REQ_FD ----------------------------


def test_reset_device_releases_the_guest_memory_and_the_inflight_region_at_once(
    backend: BackendProcess,
) -> None:
    protocol = INFLIGHT_PROTOCOL | int(ProtocolFeature.RESET_DEVICE)
    with attacked(backend), session(str(backend.sock), start=False) as s:
        negotiate(s.fe, protocol=protocol)
        _, fd = s.fe.get_inflight_fd(1, QUEUE_SIZE)
        assert fd is not None
        os.close(fd)
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        s.start_ring()
        read_sector(s, 28)
        assert s.fe.set_u64(Request.SET_STATUS, 0x0F, need_reply=True) == 0
        assert s.fe.get_u64(Request.GET_STATUS) == 0x0F
        s.fe.reset_device()
        assert s.fe.get_u64(Request.GET_STATUS) == 0  # (and the reset has been handled)
        assert backend_maps(backend, s.ram.name) == 0
        assert backend_maps(backend, INFLIGHT_MEMFD) == 0
        s.fe.set_features(s.fe.get_features() & WANTED)  # set up again from the start
        assert s.fe.use_ram(s.ram, need_reply=True) == 0
        s.ring = SplitRingDriver(s.ram, QUEUE_SIZE)  # the driver's new ring, from index 0
        s.start_ring()
        read_sector(s, 29)


CLOSING_STATE = {
    "SET_STATUS-beyond-a-byte": (Request.SET_STATUS, _u64(0x100), None, "is not a status byte"),
    "GET_STATUS-with-a-payload": (
        Request.GET_STATUS, _u64(0), None, "GET_STATUS: payload of 8 bytes, expected 0",
    ),
    "SET_BACKEND_REQ_FD-with-a-pipe": (
        Request.SET_BACKEND_REQ_FD, b"", "pipe", "is a pipe, not one socket",
    ),
    "SET_BACKEND_REQ_FD-without-an-fd": (
        Request.SET_BACKEND_REQ_FD, b"", None, "SET_BACKEND_REQ_FD: 0 fds, not one socket",
    ),
    "RESET_DEVICE-not-negotiated": (
        Request.RESET_DEVICE, b"", None, "without the RESET_DEVICE protocol feature",
    ),
    "GET_INFLIGHT_FD-not-negotiated": (
        Request.GET_INFLIGHT_FD, INFLIGHT.pack(InflightRec(0, 0, 1, QUEUE_SIZE)), None,
        "without the INFLIGHT_SHMFD protocol feature",
    ),
    "ADD_MEM_REG-not-negotiated": (
        Request.ADD_MEM_REG, bytes(SINGLE_MEM_REGION.size), None,
        "without the CONFIGURE_MEM_SLOTS protocol feature",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("request_", "payload", "kind", "reason"), CLOSING_STATE.values(), ids=CLOSING_STATE.keys()
)
def test_a_malformed_or_unnegotiated_state_message_closes_the_connection(
    backend: BackendProcess, request_: int, payload: bytes, kind: str | None, reason: str
) -> None:
    with attacked(backend), Frontend(str(backend.sock)) as fe, ExitStack() as stack:
        negotiate(fe, protocol=PROTOCOL | int(ProtocolFeature.BACKEND_REQ))
        fds = [] if kind is None else [other_fd(stack, kind)]
        log_at = len(backend.log())
        fe.send(request_, payload, fds=fds)
        closed_because(backend, fe, reason, after=log_at)
