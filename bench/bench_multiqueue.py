#!/usr/bin/env python3
"""Queues on worker threads: the blk back-end with one request queue against two, on one thread
and with ``--threads`` (a worker thread per queue), driven by a vhost-user FRONT-END of our own.

    python bench/bench_multiqueue.py [--seconds 3] [--repeats 3] [--latency 0.001]
                                     [--depth 16] [--variant pure|compiled] [--json FILE]

The back-end is ``python -m virtio_schema.examples.blk`` (a separate process, ``--max-queues 2``).
The front-end (:mod:`virtio_schema.testing.frontend`, as in ``bench_vhost_blk.py``: real socket,
eventfds, shared memfd guest memory, EVENT_IDX honoured) sets up one or two split queues of 128
entries, each in its guest RAM, and drives each from a thread of its own that keeps ``--depth``
reads in flight on its queue (the one-queue runs keep twice as many on their queue: the same
requests in flight in all), for ``--seconds``. Two workloads:

* slow disk: ``--latency`` seconds per request (1 ms by default), 4 KiB reads; the back-end
  sleeps, and a sleep releases the GIL. On one thread the queues' sleeps follow each other; on
  worker threads they overlap: two queues serve up to twice the requests;
* CPU-bound: no latency, 512-byte reads from the page cache; every request is Python work in
  the back-end (and in the front-end). The GIL runs one thread at a time, and the machine's cores
  are shared by the back-end and the front-end's two driver threads: worker threads cannot make
  this faster, only show what switching between threads costs.

It prints requests/s of every variant (the median of ``--repeats`` runs, the variants taking turns
so that a change in the machine's load touches them all alike, and the range of the runs), the
ratio to one queue on one thread, the split between the two queues, and the CPU the back-end and
the front-end (this process) spent per second, of 2.0 on two cores. Each completion's status must
be OK.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from _plot import Bar, write_plot
from bench_queue import VARIANTS, backend_variant
from bench_vhost_blk import cpu_seconds

from virtio_schema._cli import progress
from virtio_schema.mem import full_barrier
from virtio_schema.records import BLK_REQ_HDR, BlkReqHdr
from virtio_schema.ring import linked_descs
from virtio_schema.schema import BlkFeature, BlkType, DescFlags, Feature
from virtio_schema.testing.frontend import (
    GPA_BASE,
    UVA_BASE,
    Frontend,
    GuestRam,
    SplitRingDriver,
    make_eventfd,
)
from virtio_schema.testing.process import BackendProcess
from virtio_schema.vhost_user.messages import ProtocolFeature

QUEUE = 128
IMAGE_MIB = 16
RAM = 16 << 20  # each queue's guest RAM
SECTOR = 512


@dataclass(frozen=True)
class Workload:
    name: str
    latency: float
    """The back-end's ``--latency`` (seconds per request)."""
    size: int
    """Bytes each read asks for."""


@dataclass(frozen=True)
class Setup:
    queues: int
    threads: bool

    @property
    def name(self) -> str:
        return f"{self.queues} queue{'s' if self.queues > 1 else ''}, " + (
            "a thread per queue" if self.threads else "one thread"
        )


SETUPS = [Setup(1, False), Setup(2, False), Setup(1, True), Setup(2, True)]


@dataclass
class Result:
    rate: float
    """Requests/s, all queues."""
    per_queue: list[float]
    backend_busy: float
    """Back-end CPU seconds per second (2.0: both cores)."""
    frontend_busy: float


class Driver:
    """One queue's driver: ``depth`` reads of ``size`` bytes laid out once in ``ram`` (header,
    data, status; a chain of three descriptors each) and published again as they complete."""

    def __init__(self, ram: GuestRam, depth: int, size: int, seed: int) -> None:
        self.ram = ram
        self.ring = SplitRingDriver(ram, QUEUE, features=int(Feature.EVENT_IDX))
        self.kick_fd, self.call_fd = make_eventfd(), make_eventfd()
        self.slots: dict[int, tuple[int, int]] = {}  # head -> (header addr, status addr)
        for _ in range(depth):
            hdr, data, status = ram.alloc(16, 16), ram.alloc(size, 4096), ram.alloc(1, 8)
            idx = [self.ring.take_descriptor() for _ in range(3)]
            entries = [(hdr, 16, 0), (data, size, DescFlags.WRITE), (status, 1, DescFlags.WRITE)]
            for i, desc in zip(idx, linked_descs(entries, idx), strict=True):
                self.ring.write_desc(i, *desc)
            self.slots[idx[0]] = (hdr, status)
        self.rng = random.Random(seed)
        self.blocks = IMAGE_MIB * 2048 * SECTOR // size
        self.size = size
        self.done = 0
        self.error: str | None = None

    def publish(self, head: int) -> None:
        hdr, status = self.slots[head]
        sector = self.rng.randrange(self.blocks) * self.size // SECTOR
        self.ram.write(hdr, BLK_REQ_HDR.pack(BlkReqHdr(BlkType.IN, 0, sector)))
        self.ram.write(status, b"\xff")
        self.ring.push_head(head)

    def run(self, go: threading.Barrier, end: threading.Event) -> None:
        """Keep every request in flight until ``end``; completions counted in ``done``."""
        try:
            go.wait(10)
            for head in self.slots:
                self.publish(head)
            os.eventfd_write(self.kick_fd, 1)
            poll = select.poll()
            poll.register(self.call_fd, select.POLLIN)
            while not end.is_set():
                before = self.ring.avail_idx
                completed = self.ring.used()
                if not completed:
                    if not poll.poll(5000):
                        self.error = "no completion within 5 s"
                        return
                    os.eventfd_read(self.call_fd)
                    continue
                for used in completed:
                    if self.ram.read(self.slots[used.head][1], 1) != b"\0":
                        self.error = "a request failed"
                        return
                    self.done += 1
                    self.publish(used.head)
                full_barrier()  # as in bench_vhost_blk: used_event and avail before avail_event
                if self.ring.kick_needed(before):
                    os.eventfd_write(self.kick_fd, 1)
        except Exception as exc:  # reported by the main thread
            self.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        os.close(self.kick_fd)
        os.close(self.call_fd)


@contextmanager
def backend(tmp: Path, workload: Workload, setup: Setup, name: str) -> Iterator[BackendProcess]:
    image = tmp / "disk.img"
    if not image.exists():
        image.write_bytes(random.Random(7).randbytes(IMAGE_MIB << 20))
    sock, log = tmp / f"{name}.sock", tmp / f"{name}.log"
    args = ["-m", "virtio_schema.examples.blk", "--vhost-user", str(sock), str(image),
            "--max-queues", "2", "--watch", "0", "--latency", str(workload.latency)]  # fmt: skip
    if setup.threads:
        args.append("--threads")
    proc = BackendProcess(args, sock, log)
    try:
        yield proc
    finally:
        proc.stop()


def run(workload: Workload, setup: Setup, depth: int, seconds: float, tmp: Path) -> Result:
    """Requests/s of the blk back-end under ``setup``, ``depth`` requests in flight per queue (one
    queue: ``2 * depth``), for ``seconds``."""
    name = f"{workload.name}-{setup.queues}q{'-t' if setup.threads else ''}".replace(" ", "-")
    per_queue_depth = depth * 2 // setup.queues
    with ExitStack() as stack:
        proc = stack.enter_context(backend(tmp, workload, setup, name))
        fe = stack.enter_context(Frontend(str(proc.sock)))
        at = [GPA_BASE + i * 2 * RAM for i in range(setup.queues)]  # each RAM its own range
        rams = [
            stack.enter_context(
                GuestRam(RAM, gpa=gpa, uva=gpa - GPA_BASE + UVA_BASE, name=f"bench-mq-{i}")
            )
            for i, gpa in enumerate(at)
        ]
        drivers = [
            Driver(ram, per_queue_depth, workload.size, seed=i) for i, ram in enumerate(rams)
        ]
        for d in drivers:
            stack.callback(d.close)
        offered = fe.get_features()
        fe.set_protocol_features(
            fe.get_protocol_features()
            & (ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG | ProtocolFeature.MQ)
        )
        fe.set_owner()
        wanted = Feature.VERSION_1 | Feature.EVENT_IDX | Feature.PROTOCOL_FEATURES | BlkFeature.MQ
        fe.set_features(offered & wanted)
        fe.use_ram(*rams, need_reply=True)
        for i, d in enumerate(drivers):
            fe.set_vring_num(i, QUEUE)
            fe.set_vring_base(i, 0)
            fe.set_vring_addr(d.ring.vring_addr(i))
            fe.set_vring_call(i, d.call_fd)
            fe.set_vring_kick(i, d.kick_fd)
            fe.set_vring_enable(i, 1, need_reply=True)
        go, end = threading.Barrier(len(drivers) + 1), threading.Event()
        threads = [threading.Thread(target=d.run, args=(go, end)) for d in drivers]
        for t in threads:
            t.start()
        try:
            go.wait(10)
            t0, fe_cpu, be_cpu = time.perf_counter(), time.process_time(), cpu_seconds(proc.pid)
            done0 = [d.done for d in drivers]
            time.sleep(seconds)
            done = [d.done - d0 for d, d0 in zip(drivers, done0, strict=True)]
            elapsed = time.perf_counter() - t0
            fe_cpu, be_cpu = time.process_time() - fe_cpu, cpu_seconds(proc.pid) - be_cpu
        finally:
            end.set()
            for t in threads:
                t.join(timeout=10)
        errors = [f"queue {i}: {d.error}" for i, d in enumerate(drivers) if d.error]
        if errors:
            raise SystemExit(f"{name}: {'; '.join(errors)}\n{proc.log()[-2000:]}")
    return Result(
        rate=sum(done) / elapsed,
        per_queue=[n / elapsed for n in done],
        backend_busy=be_cpu / elapsed,
        frontend_busy=fe_cpu / elapsed,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant (the median)")
    p.add_argument(
        "--latency", type=float, default=0.001, help="the slow disk's seconds per request"
    )
    p.add_argument("--depth", type=int, default=16, help="requests in flight per queue (of 2)")
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default=None,
        help="the library variant the back-end runs (default: the one this Python imports)",
    )
    p.add_argument("--json", default=None)
    p.add_argument(
        "--plot", default=None, metavar="FILE.svg", help="also draw the table as a bar chart"
    )
    args = p.parse_args(argv)
    if args.plot is not None and not Path(args.plot).resolve().parent.is_dir():
        p.error(f"--plot: no directory for {args.plot}")
    import virtio_schema

    variant = args.variant or ("compiled" if virtio_schema.COMPILED else "pure")
    workloads = [
        Workload(f"slow disk {args.latency * 1e3:g} ms", args.latency, 4096),
        Workload("CPU-bound 512 B", 0.0, SECTOR),
    ]
    print(f"blk back-end ({variant}), {2 * args.depth} reads in flight, {os.cpu_count()} cores,"
          f" {args.seconds:g} s per run")  # fmt: skip
    print(f"{'workload':<18}{'back-end':<30}{'requests/s':>11}{'range':>16}{'ratio':>7}"
          f"{'per queue':>16}{'back-end CPU':>14}{'front-end CPU':>15}")  # fmt: skip
    out: dict[str, dict[str, object]] = {}
    bars: list[Bar] = []  # requests/s of every row of the table, for --plot
    command = " ".join(["bench_multiqueue.py", *argv])
    with tempfile.TemporaryDirectory(prefix="vs-mq-") as d, backend_variant(variant, command):
        for workload in workloads:
            runs: dict[Setup, list[Result]] = {setup: [] for setup in SETUPS}
            for repeat in range(args.repeats):
                for setup in SETUPS:
                    progress(f"  {workload.name}, {setup.name}: run {repeat + 1} of {args.repeats}")
                    runs[setup].append(run(workload, setup, args.depth, args.seconds, Path(d)))
            base = statistics.median(r.rate for r in runs[SETUPS[0]])
            for setup, results in runs.items():
                results.sort(key=lambda r: r.rate)
                r = results[len(results) // 2]  # the median run (its split and CPU figures)
                low, high = results[0].rate, results[-1].rate
                split = " / ".join(f"{q:,.0f}" for q in r.per_queue) if len(r.per_queue) > 1 else ""
                print(f"{workload.name:<18}{setup.name:<30}{r.rate:>11,.0f}"
                      f"{f'{low:,.0f}-{high:,.0f}':>16}{r.rate / base:>7.2f}{split:>16}"
                      f"{r.backend_busy:>14.0%}{r.frontend_busy:>15.0%}", flush=True)  # fmt: skip
                bars.append(Bar(f"{workload.name}, {setup.name}", r.rate, workload.name))
                out[f"{workload.name}/{setup.name}"] = {
                    "requests_s": r.rate,
                    "runs": [x.rate for x in results],
                    "ratio": r.rate / base,
                    "per_queue": r.per_queue,
                    "backend_busy": r.backend_busy,
                    "frontend_busy": r.frontend_busy,
                }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        title = f"bench_multiqueue.py: requests/s, blk back-end ({variant}), higher is better"
        write_plot(args.plot, title, "requests/s", bars)
    return 0


if __name__ == "__main__":
    sys.exit(main())
