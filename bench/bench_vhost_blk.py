#!/usr/bin/env python3
"""Scenario e: virtio-blk back-ends driven by a vhost-user FRONT-END of our own, without QEMU.

    python bench/bench_vhost_blk.py [--seconds 3] [--variant pure|compiled|both]
                                    [--busy-poll 0,0.0005] [--json FILE]

The front-end (:mod:`virtio_schema.testing.frontend`: a real unix socket, SCM_RIGHTS, eventfds,
shared memfd guest memory) negotiates like QEMU, sets up one split queue of 128 entries, then keeps
1 or 32 4 KiB read requests in flight (random sectors of a 64 MiB image) and counts completions for
``--seconds``. Its guest driver is the library's fake driver
(:class:`~virtio_schema.testing.frontend.SplitRingDriver`, a
:class:`~virtio_schema.fake_queue.FakeDriver`): the requests are raw chains laid out once
(``take_descriptor``, ``write_desc``) and made available again with ``push_head``; completions are
read with ``used``. The same front-end drives our example back-end (``python -m
virtio_schema.examples.blk``, a separate process) and ``qemu-storage-daemon --export
type=vhost-user-blk`` (C, Debian package qemu-system-common) on the same image. It prints the
requests/s of both and the ratio; our back-end runs once per variant of the library (pure Python,
``VIRTIO_SCHEMA_PURE_PYTHON=1``, and compiled: ``python3 dev.py bench bench_vhost_blk.py``) and
``--busy-poll`` setting (by default 0, kicks only, and 0.5 ms of adaptive polling), in the same
run. The driver honours EVENT_IDX as Linux's does (it kicks only when ``avail_event`` asks for
it): the kicks per request show how many wake-ups a back-end cost its driver. (qemu-storage-daemon
7.2 does not poll a vhost-user export's rings: with an iothread and ``poll-max-ns=500000`` it still
took a kick per request at depth 1, 36% busy, at the same rate.)

Whether the front-end is the bottleneck: each run also counts the CPU time the front-end (this
process) and the back-end spent. The front-end's CPU time per request is what it costs alone: its
inverse is the most requests/s it could drive from a back-end that cost nothing, printed as the
front-end's ceiling; a back-end's rate near that ceiling (or the front-end near 100% busy) means
the front-end, not the back-end, set the pace.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_queue import VARIANTS, backend_variant

from virtio_schema.mem import full_barrier
from virtio_schema.records import BLK_REQ_HDR, BlkReqHdr
from virtio_schema.ring import linked_descs
from virtio_schema.schema import BlkType, DescFlags, Feature
from virtio_schema.testing.frontend import Frontend, GuestRam, SplitRingDriver, make_eventfd
from virtio_schema.testing.process import BackendProcess
from virtio_schema.vhost_user.messages import ProtocolFeature

QUEUE = 128
IMAGE_MIB = 64


Start = Callable[[Path, Path, Path], BackendProcess]
"""How a benchmark starts a back-end: ``start(sock, image, log)``, serving once it returns."""


def start_ours(sock: Path, image: Path, log: Path, busy_poll: float = 0.0) -> BackendProcess:
    return BackendProcess(
        ["-m", "virtio_schema.examples.blk", "--vhost-user", str(sock), str(image),
         "--busy-poll", str(busy_poll)],
        sock, log,
    )  # fmt: skip


def start_qsd(sock: Path, image: Path, log: Path, *, blockdev: str = "") -> BackendProcess:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk on ``sock`` (``blockdev``: more
    ``--blockdev`` options, e.g. ``,cache.direct=off``)."""
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        raise SystemExit("qemu-storage-daemon not found (Debian package qemu-system-common)")
    export = f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on"
    return BackendProcess(
        ["--blockdev", f"driver=file,node-name=f0,filename={image}{blockdev}", "--export", export],
        sock,
        log,
        program=qsd,
    )


class Requests:
    """``depth`` reusable 4 KiB read requests laid out once (header, data, status buffers, a chain
    of three descriptors each, written raw through the driver), re-published as they complete."""

    def __init__(self, ram: GuestRam, ring: SplitRingDriver, depth: int) -> None:
        self.ram = ram
        self.ring = ring
        self.slots: list[tuple[int, int, int, int]] = []  # (head, hdr addr, data addr, status addr)
        for _ in range(depth):
            hdr, data, status = ram.alloc(16, 16), ram.alloc(4096, 4096), ram.alloc(1, 8)
            idx = [ring.take_descriptor() for _ in range(3)]
            entries = [(hdr, 16, 0), (data, 4096, DescFlags.WRITE), (status, 1, DescFlags.WRITE)]
            for i, desc in zip(idx, linked_descs(entries, idx), strict=True):
                ring.write_desc(i, *desc)
            self.slots.append((idx[0], hdr, data, status))
        self.by_head = {s[0]: s for s in self.slots}
        self.sector_of: dict[int, int] = {}  # head -> the sector its request reads
        self.rng = random.Random(1)
        self.sectors = IMAGE_MIB * 2048 // 8  # 4 KiB blocks

    def publish(self, slot: tuple[int, int, int, int]) -> None:
        head, hdr, _data, status = slot
        sector = self.rng.randrange(self.sectors) * 8
        self.sector_of[head] = sector
        self.ram.write(hdr, BLK_REQ_HDR.pack(BlkReqHdr(BlkType.IN, 0, sector)))
        self.ram.write(status, b"\xff")
        self.ring.push_head(head)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    name: str,
    start: Start,
    depth: int,
    seconds: float,
    tmp: Path,
    *,
    verify: bool = False,
    cpu: dict[str, float] | None = None,
) -> float:
    """Requests/s of the back-end ``start`` launches, ``depth`` reads in flight for ``seconds``.
    Every completion's status must be OK; with ``verify`` (tests) every 4 KiB read must also hold
    the image's bytes at its sector (kept out of the measured runs: the check costs time). With
    ``cpu``, the CPU seconds the front-end and the back-end spent in the timed loop go into it
    (``frontend``, ``backend``, ``elapsed``)."""
    image = tmp / "disk.img"
    if not image.exists():
        image.write_bytes(random.Random(7).randbytes(IMAGE_MIB << 20))
    contents = image.read_bytes() if verify else b""
    sock = tmp / f"{name}-{depth}.sock"
    log = tmp / f"{name}-{depth}.log"
    backend = start(sock, image, log)
    ram = GuestRam(16 << 20, name=f"bench-{name}")
    kick_fd, call_fd = make_eventfd(), make_eventfd()
    try:
        with Frontend(str(sock)) as fe:
            offered = fe.get_features()
            fe.set_protocol_features(
                fe.get_protocol_features()
                & (ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG | ProtocolFeature.MQ)
            )
            fe.set_owner()
            wanted = Feature.VERSION_1 | Feature.EVENT_IDX | Feature.PROTOCOL_FEATURES
            fe.set_features(offered & wanted)
            # the driver honours EVENT_IDX as Linux's does: it kicks only when the back-end asks
            ring = SplitRingDriver(ram, QUEUE, features=int(Feature.EVENT_IDX))
            fe.use_ram(ram, need_reply=True)
            fe.set_vring_num(0, QUEUE)
            fe.set_vring_base(0, 0)
            fe.set_vring_addr(ring.vring_addr(0))
            fe.set_vring_call(0, call_fd)
            fe.set_vring_kick(0, kick_fd)
            fe.set_vring_enable(0, 1, need_reply=True)
            reqs = Requests(ram, ring, depth)
            done = kicks = 0
            for slot in reqs.slots:
                reqs.publish(slot)
            os.eventfd_write(kick_fd, 1)
            poll = select.poll()
            poll.register(call_fd, select.POLLIN)
            t0 = time.perf_counter()
            fe_cpu, be_cpu = time.process_time(), cpu_seconds(backend.pid)
            end = t0 + seconds
            while time.perf_counter() < end:
                before = ring.avail_idx
                completed = ring.used()
                if not completed:
                    if not poll.poll(5000):
                        raise SystemExit(
                            f"{name} (depth {depth}): no completion within 5 s\n"
                            f"{log.read_text()[-2000:]}"
                        )
                    os.eventfd_read(call_fd)
                    continue
                for used in completed:
                    slot = reqs.by_head[used.head]
                    if ram.read(slot[3], 1) != b"\0":
                        raise SystemExit(f"{name} (depth {depth}): request failed")
                    if verify:
                        at = reqs.sector_of[used.head] * 512
                        if ram.read(slot[2], 4096) != contents[at : at + 4096]:
                            raise SystemExit(f"{name} (depth {depth}): wrong data at byte {at}")
                    done += 1
                    reqs.publish(slot)
                # used() asked to be called for the next completion (used_event) and the new
                # requests are published: order those stores before the next look at used.idx
                # and at avail_event, or a completion (a kick request) would be missed
                full_barrier()
                if ring.kick_needed(before):
                    os.eventfd_write(kick_fd, 1)
                    kicks += 1
            elapsed = time.perf_counter() - t0
            if cpu is not None:
                cpu["frontend"] = time.process_time() - fe_cpu
                cpu["backend"] = cpu_seconds(backend.pid) - be_cpu
                cpu["elapsed"] = elapsed
                cpu["kicks"] = kicks
    finally:
        backend.stop()
        ram.close()
        os.close(kick_fd)
        os.close(call_fd)
    return done / elapsed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    p.add_argument(
        "--busy-poll",
        default="0,0.0005",
        metavar="SECONDS,...",
        help="our back-end's --busy-poll settings, each run in turn (default 0,0.0005)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    polls = [float(v) for v in args.busy_poll.split(",")]
    command = " ".join(["bench_vhost_blk.py", *argv])
    out: dict[str, dict[str, float]] = {}
    print(f"{'4 KiB reads':<7}{'back-end':<36}{'requests/s':>11}{'ours/C':>7}{'kicks/req':>10}"
          f"{'back-end busy':>14}{'front-end busy':>15}{'front-end ceiling':>18}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vs-vblk-") as d:
        for depth in (1, 32):
            rates: dict[str, float] = {}
            setups = [(v, bp) for v in variants for bp in polls] + [("qemu-storage-daemon", 0.0)]
            for variant, bp in setups:
                cpu: dict[str, float] = {}
                if variant == "qemu-storage-daemon":
                    name = variant
                    rate = run("qsd", start_qsd, depth, args.seconds, Path(d), cpu=cpu)
                else:
                    name = f"virtio_schema {variant}" + (f" poll {bp * 1e6:.0f}us" if bp else "")

                    def start(sock: Path, image: Path, log: Path, bp: float = bp) -> BackendProcess:
                        return start_ours(sock, image, log, bp)

                    with backend_variant(variant, command):
                        rate = run(f"ours-{variant}", start, depth, args.seconds, Path(d), cpu=cpu)
                rates[name] = rate
                per_request = cpu["frontend"] / (rate * cpu["elapsed"])
                r = out[f"qd{depth}/{name}"] = {
                    "requests_s": rate,
                    "kicks_per_request": cpu["kicks"] / (rate * cpu["elapsed"]),
                    "backend_busy": cpu["backend"] / cpu["elapsed"],
                    "frontend_busy": cpu["frontend"] / cpu["elapsed"],
                    "frontend_ceiling": 1 / per_request,
                }
                print(f"qd{depth:<5}{name:<36}{rate:>11,.0f}{'':>7}"
                      f"{r['kicks_per_request']:>10.2f}{r['backend_busy']:>14.0%}"
                      f"{r['frontend_busy']:>15.0%}{r['frontend_ceiling']:>16,.0f}/s",
                      flush=True)  # fmt: skip
            for name, rate in rates.items():
                if name != "qemu-storage-daemon":
                    ratio = rate / rates["qemu-storage-daemon"]
                    out[f"qd{depth}/{name}"]["ours_over_c"] = ratio
                    print(f"qd{depth:<5}{name + ' / C':<36}{'':>11}{ratio:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
