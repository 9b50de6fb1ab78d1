"""Queues on worker threads: a device with ``worker_threads`` has each ring served by a thread of
its own (:mod:`virtio_schema.vhost_user.server`, "Worker threads").

The server runs in a thread of the test process and the front-end
(:mod:`virtio_schema.testing.frontend`) drives it over a real unix socket, each ring in a guest RAM
of its own. What a device author relies on here:

* the rings of one connection are served at the same time, each on its worker; the hooks stay on
  the server's thread (the same device on the one-thread server is the control: there a ring waits
  for the other's turn);
* a message waits for the turn in progress: GET_VRING_BASE during a turn answers once it ended,
  with the position after it, and nothing the driver made available is lost;
* workers end with their ring (stop, disable) and with the connection: threads and fds come back;
* the dirty log keeps every mark when several threads mark bits of the same bytes;
* a device error on a worker ends that connection only, as on the server's thread; a kick pipe at
  end-of-file stops that ring only;
* rings without a kick fd are still served (polled by the server's thread);
* the blk example with ``threads`` serves two queues at once with exact counts and the right data,
  and the multi-queue benchmark (``bench/bench_multiqueue.py``) runs it as a separate process.

Every wait is bounded: a hang fails the test.
"""

from __future__ import annotations

import io
import os
import random
import re
import sys
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TypeAlias

import bench_multiqueue
import pytest
from test_vhost_user import negotiate, serving

from virtio_schema.chain import WritableChain
from virtio_schema.examples.blk import BlkDevice, VhostUserBlk
from virtio_schema.queue import DescChain, VirtQueue
from virtio_schema.records import BLK_REQ_HDR, BlkReqHdr
from virtio_schema.schema import BlkStatus, BlkType
from virtio_schema.testing.frontend import (
    GPA_BASE,
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
from virtio_schema.vhost_user import VhostUserDevice
from virtio_schema.vhost_user.dirty_log import PAGE_SIZE, DirtyLog
from virtio_schema.vhost_user.messages import VRING_STATE, Request, VringStateRec

QUEUE_SIZE = 16
SERVER_THREAD = "vhost-user-server"  # the name test_vhost_user.serving gives the loop's thread
RENDEZVOUS = 1.0  # seconds ring 0's turn waits for ring 1's

TraceFunction: TypeAlias = Callable[[FrameType, str, object], "TraceFunction | None"]


# --- devices --------------------------------------------------------------------------------------


class Filler(VhostUserDevice):
    """Two queues served on worker threads (unless ``threads`` is off): each chain's writable
    part is filled with the byte ``0x30 + ring``. Records the thread each ``handle`` and hook
    ran on."""

    def __init__(self, *, threads: bool = True) -> None:
        self.num_queues = 2
        self.worker_threads = threads
        self.handled: list[tuple[int, str]] = []
        """``(ring, thread name)`` of each ``handle``."""
        self.hooks: list[tuple[str, int, str]] = []
        """``(hook, ring, thread name)`` of each hook."""

    def handle(self, index: int, queue: VirtQueue) -> None:
        self.handled.append((index, threading.current_thread().name))
        while (chain := queue.next_chain()) is not None:
            with chain:
                self.serve(index, chain)

    def serve(self, index: int, chain: DescChain) -> None:
        writer = WritableChain(chain)
        writer.write(bytes([0x30 + index]) * writer.remaining().bytes)

    def _hook(self, name: str, index: int) -> None:
        self.hooks.append((name, index, threading.current_thread().name))

    def started(self, index: int, queue: VirtQueue) -> None:
        self._hook("started", index)

    def enabled(self, index: int, queue: VirtQueue) -> None:
        self._hook("enabled", index)

    def disabled(self, index: int) -> None:
        self._hook("disabled", index)

    def stopped(self, index: int) -> None:
        self._hook("stopped", index)


class Rendezvous(Filler):
    """Ring 0's first chain waits (up to :data:`RENDEZVOUS` seconds) until ring 1's ``handle``
    has served a chain: only a server that runs the two rings at once lets it."""

    def __init__(self, *, threads: bool) -> None:
        super().__init__(threads=threads)
        self.in_ring0 = threading.Event()
        self.ring1_served = threading.Event()
        self.met: bool | None = None
        """Whether ring 0's turn saw ring 1 served while it waited."""

    def serve(self, index: int, chain: DescChain) -> None:
        if index == 0 and self.met is None:
            self.in_ring0.set()
            self.met = self.ring1_served.wait(RENDEZVOUS)
        elif index == 1:
            self.ring1_served.set()
        super().serve(index, chain)


class Held(Filler):
    """Ring 0's first chain is held, inside its turn, until the test sets ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = threading.Event()
        self.release = threading.Event()

    def serve(self, index: int, chain: DescChain) -> None:
        if index == 0 and not self.holding.is_set():
            self.holding.set()
            if not self.release.wait(5):
                raise TimeoutError("the test never released the turn")
        super().serve(index, chain)


class Faulty(Filler):
    """Raises in ``handle`` on ring ``fail`` once the test sets it."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: int | None = None

    def serve(self, index: int, chain: DescChain) -> None:
        if index == self.fail:
            raise RuntimeError("device bug on a worker")
        super().serve(index, chain)


# --- a front-end with a guest RAM per ring ----------------------------------------------------------


@dataclass
class Conn:
    """A connection with ``len(rings)`` started, enabled rings; ring ``i`` lives in ``rams[i]``."""

    fe: Frontend
    rams: list[GuestRam]
    rings: list[SplitRingDriver]
    kicks: list[int]
    calls: list[int]


@contextmanager
def connect(path: str, *, name: str = "vu-workers", polled: Collection[int] = ()) -> Iterator[Conn]:
    """Negotiate as QEMU does and start two rings, each in its own RAM (so that a driver thread
    per ring needs no lock); the rings in ``polled`` get no kick fd (NOFD)."""
    with ExitStack() as stack:
        fe = stack.enter_context(Frontend(path))
        rams = [
            stack.enter_context(
                GuestRam(gpa=GPA_BASE + (i << 21), uva=UVA_BASE + (i << 21), name=f"{name}-{i}")
            )
            for i in range(2)
        ]
        fds = [make_eventfd() for _ in range(4)]
        for fd in fds:
            stack.callback(os.close, fd)
        c = Conn(fe, rams, [SplitRingDriver(r, QUEUE_SIZE) for r in rams], fds[:2], fds[2:])
        negotiate(fe)
        assert fe.use_ram(*rams, need_reply=True) == 0
        for i in range(2):
            fe.set_vring_num(i, QUEUE_SIZE)
            fe.set_vring_base(i, 0)
            fe.set_vring_addr(c.rings[i].vring_addr(i))
            fe.set_vring_call(i, c.calls[i])
            fe.set_vring_kick(i, None if i in polled else c.kicks[i])
            assert fe.set_vring_enable(i, 1, need_reply=True) == 0
        yield c


def serve_one(c: Conn, index: int, length: int = 8) -> UsedChain:
    """Publish a chain of ``length`` writable bytes on ring ``index``, kick, wait for the call;
    checks what the :class:`Filler` wrote."""
    head = c.rings[index].publish(writable=[length])
    kick(c.kicks[index])
    assert wait_signalled(c.calls[index]), f"ring {index}: no used-buffer notification"
    (used,) = c.rings[index].used()
    assert used.head == head
    assert used.data == bytes([0x30 + index]) * length
    return used


def workers() -> list[str]:
    """The names of the worker threads alive, sorted (``vhost-user#N ring I``)."""
    return sorted(t.name for t in threading.enumerate() if " ring " in t.name)


def worker_count(n: int) -> Callable[[], bool]:
    return lambda: len(workers()) == n


# --- concurrency ----------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [True, False], ids=["worker-threads", "one-thread-control"])
def test_two_rings_of_one_connection_are_served_at_the_same_time(
    tmp_path: Path, threads: bool
) -> None:
    device = Rendezvous(threads=threads)
    with serving(tmp_path / "w.sock", lambda: device) as server, connect(server.path) as c:
        head0 = c.rings[0].publish(writable=[8])
        kick(c.kicks[0])
        assert device.in_ring0.wait(5), "ring 0 was not served"
        serve_one(c, 1)  # while ring 0's turn waits for it
        assert wait_signalled(c.calls[0])
        (used,) = c.rings[0].used()
        assert used.head == head0
        assert used.data == b"0" * 8
        # the one-thread server serves ring 1 only once ring 0's turn gave up waiting
        assert device.met is threads
        if threads:
            prefix = "vhost-user#1 ring"
            assert {(i, name) for i, name in device.handled} == {
                (0, f"{prefix} 0"),
                (1, f"{prefix} 1"),
            }, "a ring's handle ran elsewhere than on its worker"
        assert device.hooks, "no hooks"
        assert {name for _, _, name in device.hooks} == {SERVER_THREAD}
    assert server.errors == []


def test_get_vring_base_waits_for_the_turn_in_progress_and_loses_nothing(tmp_path: Path) -> None:
    device = Held()
    with serving(tmp_path / "w.sock", lambda: device) as server, connect(server.path) as c:
        heads = [c.rings[0].publish(writable=[8]) for _ in range(3)]
        kick(c.kicks[0])
        assert device.holding.wait(5), "ring 0 was not served"
        # the turn holds its first chain: the stop must wait for the turn to end
        c.fe.send(Request.GET_VRING_BASE, VRING_STATE.pack(VringStateRec(0, 0)))
        assert not is_readable(c.fe.sock.fileno(), 0.3), "answered while a turn was in progress"
        device.release.set()
        assert VRING_STATE.unpack(c.fe.reply(Request.GET_VRING_BASE)) == (0, 3)
        # the call for what the turn served came before the answer
        assert wait_signalled(c.calls[0], timeout=0), "no call before GET_VRING_BASE's answer"
        used = c.rings[0].used()
        assert [u.head for u in used] == heads
        assert [u.data for u in used] == [b"0" * 8] * 3
        assert wait_for(lambda: workers() == ["vhost-user#1 ring 1"]), workers()
    assert server.errors == []


def test_workers_end_with_their_rings_and_with_the_connection(tmp_path: Path) -> None:
    device = Filler()
    with serving(tmp_path / "w.sock", lambda: device) as server:
        threads, fds = threading.active_count(), fd_count()
        with connect(server.path) as c:
            assert wait_for(worker_count(2)), workers()
            serve_one(c, 0)
            serve_one(c, 1)
            # disabled: its worker ends; a kick is drained by the loop and serves nothing
            assert c.fe.set_vring_enable(1, 0, need_reply=True) == 0
            assert wait_for(lambda: workers() == ["vhost-user#1 ring 0"]), workers()
            head = c.rings[1].publish(writable=[4])
            kick(c.kicks[1])
            assert wait_for(lambda: not is_readable(c.kicks[1]))
            assert c.rings[1].used() == []
            # enabled again: a new worker serves what was made available meanwhile
            assert c.fe.set_vring_enable(1, 1, need_reply=True) == 0
            assert wait_signalled(c.calls[1])
            assert [u.head for u in c.rings[1].used()] == [head]
            assert wait_for(worker_count(2)), workers()
            # stopped: its worker ends before the answer
            assert c.fe.get_vring_base(0) == (0, 1)
            assert workers() == ["vhost-user#1 ring 1"]
            serve_one(c, 1)
            rams = c.rams
        assert wait_for(lambda: threading.active_count() == threads), threading.enumerate()
        assert workers() == []
        assert wait_for(lambda: fd_count() == fds), (fd_count(), fds)
        assert [r.mappings() for r in rams] == [0, 0]
    assert server.errors == []


# --- shared state -----------------------------------------------------------------------------------


def _between_every_opcode(frame: FrameType, event: str, arg: object) -> TraceFunction | None:
    """A trace function that makes the interpreter stop between every two opcodes of
    :meth:`DirtyLog.mark`, where it may switch threads (CPython switches only at calls and
    backward jumps otherwise, and a byte's read-OR-write has neither: a race between two marks
    would hardly ever show)."""
    if event == "call" and frame.f_code is DirtyLog.mark.__code__:
        frame.f_trace_opcodes = True
        return _between_every_opcode
    return _between_every_opcode if event == "opcode" else None


def test_marks_made_by_several_threads_in_the_same_bytes_are_all_kept() -> None:
    """Eight threads mark the eight pages of every byte of the log, each its own page of each
    byte, at once: a read-OR-write that raced another would write back a byte without the other's
    bit, and that page would be missing from the log (the count would miss marks too)."""
    pages = 8 * 4096
    raw = bytearray(pages // 8)
    log = DirtyLog(memoryview(raw))
    go = threading.Barrier(8)

    def mark_pages(first: int) -> None:
        sys.settrace(_between_every_opcode)
        go.wait(5)
        for page in range(first, pages, 8):
            log.mark(page * PAGE_SIZE, 1)
        sys.settrace(None)

    markers = [threading.Thread(target=mark_pages, args=(k,)) for k in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        for t in markers:
            t.start()
    finally:
        for t in markers:
            t.join(timeout=30)
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in markers)
    lost = [p for p in range(pages) if not raw[p >> 3] >> (p & 7) & 1]
    assert lost == [], f"{len(lost)} marks lost"
    assert log.marks == pages
    log.release()


# --- errors and the loop's own rings --------------------------------------------------------------


def test_a_device_error_on_a_worker_ends_that_connection_only(tmp_path: Path) -> None:
    devices: list[Faulty] = []

    def factory() -> Faulty:
        devices.append(Faulty())
        return devices[-1]

    with (
        serving(tmp_path / "w.sock", factory) as server,
        connect(server.path, name="vu-bystander") as bystander,
    ):
        serve_one(bystander, 1)
        threads, fds = threading.active_count(), fd_count()
        with connect(server.path) as c:
            devices[-1].fail = 1
            c.rings[1].publish(writable=[8])
            kick(c.kicks[1])
            assert c.fe.wait_closed() == b""
            rams = c.rams
        assert len(server.errors) == 1, server.errors
        assert re.search(r"device error on ring 1: RuntimeError: device bug on a worker",
                         server.errors[-1])  # fmt: skip
        assert wait_for(lambda: threading.active_count() == threads), threading.enumerate()
        assert wait_for(lambda: fd_count() == fds), (fd_count(), fds)
        assert [r.mappings() for r in rams] == [0, 0]
        serve_one(bystander, 0)  # the other connection never noticed
        serve_one(bystander, 1)
        with connect(server.path, name="vu-fresh") as fresh:  # and a new one is served
            serve_one(fresh, 1)
    assert len(server.errors) == 1


def test_a_kick_pipe_at_end_of_file_on_a_worker_stops_that_ring_only(tmp_path: Path) -> None:
    device = Filler()
    with serving(tmp_path / "w.sock", lambda: device) as server, connect(server.path) as c:
        r, w = os.pipe()
        try:
            c.fe.set_vring_kick(1, r)  # a new kick fd for the running ring: a new worker on it
        finally:
            os.close(r)
        os.close(w)  # the front-end's end: the worker reads end-of-file
        assert wait_for(lambda: server.errors == ["ring 1: its kick pipe is at end-of-file"]), (
            server.errors
        )
        assert wait_for(lambda: workers() == ["vhost-user#1 ring 0"]), workers()
        assert ("stopped", 1, SERVER_THREAD) in device.hooks
        serve_one(c, 0)  # the connection goes on
        assert c.fe.get_vring_base(1) == (1, 0)


def test_a_ring_without_a_kick_fd_is_polled_by_the_loop_on_a_worker_connection(
    tmp_path: Path,
) -> None:
    device = Filler()
    with serving(tmp_path / "w.sock", lambda: device) as server:
        with connect(server.path, polled={1}) as c:
            assert wait_for(lambda: workers() == ["vhost-user#1 ring 0"]), workers()
            head = c.rings[1].publish(writable=[8])  # no kick: the loop polls the ring
            assert wait_signalled(c.calls[1])
            assert [u.head for u in c.rings[1].used()] == [head]
            serve_one(c, 0)
        assert {name for i, name in device.handled if i == 1} == {SERVER_THREAD}
        assert {name for i, name in device.handled if i == 0} == {"vhost-user#1 ring 0"}
    assert server.errors == []


# --- the blk example ------------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Iterator[io.FileIO]:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(7).randbytes(64 * 512))
    with open(path, "r+b", buffering=0) as f:
        yield f


def test_blk_with_threads_serves_two_queues_at_once_with_exact_counts(
    tmp_path: Path, image: io.FileIO
) -> None:
    """Two driver threads, one per queue, read the disk as fast as the back-end answers; every
    read has the image's bytes, and the counts, per queue and in all, are exact."""
    rounds = 60
    blk = BlkDevice(image, num_queues=2)
    devices: list[VhostUserBlk] = []

    def factory() -> VhostUserBlk:
        devices.append(VhostUserBlk(blk, threads=True))
        return devices[-1]

    failures: list[str] = []

    def drive(c: Conn, index: int) -> None:
        ring, rng = c.rings[index], random.Random(index)
        for _ in range(rounds):
            sector = rng.randrange(64)
            head = ring.publish([BLK_REQ_HDR.pack(BlkReqHdr(BlkType.IN, 0, sector))], [512, 1])
            kick(c.kicks[index])
            if not wait_signalled(c.calls[index]):
                failures.append(f"queue {index}: no call")
                return
            (used,) = ring.used()
            want = os.pread(image.fileno(), 512, sector * 512) + bytes([BlkStatus.OK])
            if used.head != head or used.data != want:
                failures.append(f"queue {index}: wrong completion of sector {sector}")
                return

    with serving(tmp_path / "b.sock", factory) as server, connect(server.path) as c:
        drivers = [threading.Thread(target=drive, args=(c, i)) for i in range(2)]
        for t in drivers:
            t.start()
        for t in drivers:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in drivers)
        assert failures == []
        assert devices[0].served == [rounds, rounds]
        assert blk.requests == 2 * rounds
    assert server.errors == []


def test_the_multiqueue_benchmark_drives_two_queues_on_worker_threads(short_tmp: Path) -> None:
    """The benchmark's front-end and its blk back-end process (``--threads``, a slow disk): both
    queues complete requests, every status OK. A rate is only checked to be positive: speed is
    the benchmark's business."""
    slow = bench_multiqueue.Workload("slow disk", 0.001, 4096)
    result = bench_multiqueue.run(slow, bench_multiqueue.Setup(2, True), 4, 0.5, short_tmp)
    assert len(result.per_queue) == 2
    assert all(rate > 0 for rate in result.per_queue)
