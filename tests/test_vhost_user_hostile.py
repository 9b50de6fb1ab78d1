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

The image is 1 MiB of a seeded pseudo-random pattern, so a read from the wrong sector shows.
"""

from __future__ import annotations

import fcntl
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, Self

import pytest

from virtio_schema.records import BLK_CONFIG, BLK_REQ_HDR, BlkReqHdr
from virtio_schema.schema import BlkStatus, BlkType, Feature
from virtio_schema.testing.frontend import (
    Frontend,
    GuestRam,
    SplitRingDriver,
    kick,
    make_eventfd,
    wait_for,
    wait_signalled,
)
from virtio_schema.testing.process import BackendProcess
from virtio_schema.vhost_user.messages import (
    CONFIG_HDR,
    HEADER,
    MEM_REGION,
    U64,
    VERSION,
    ConfigHdrRec,
    HeaderFlags,
    HeaderRec,
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

    def start_ring(self, *, kick_fd: int | None = None, polled: bool = False) -> None:
        """The per-start ring sequence QEMU sends (NUM, BASE 0, ADDR, CALL, KICK, ENABLE 1);
        ``polled``: KICK with the NOFD flag and no fd."""
        fe = self.fe
        fe.set_vring_num(0, self.ring.size)
        fe.set_vring_base(0, 0)
        fe.set_vring_addr(self.ring.vring_addr(0))
        fe.set_vring_call(0, self.call_fd)
        fe.set_vring_kick(0, None if polled else self.kick_fd if kick_fd is None else kick_fd)
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


def negotiate(fe: Frontend) -> int:
    """Feature negotiation as QEMU does it (with REPLY_ACK and CONFIG); the acked features."""
    offered = fe.get_features()
    protocol = fe.get_protocol_features() & PROTOCOL
    assert protocol & ProtocolFeature.REPLY_ACK
    assert protocol & ProtocolFeature.CONFIG
    fe.set_protocol_features(protocol)
    fe.set_owner()
    fe.set_features(offered & WANTED)
    return offered & WANTED


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
