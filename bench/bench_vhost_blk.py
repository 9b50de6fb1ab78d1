#!/usr/bin/env python3
"""Scenario e: virtio-blk back-ends driven by a vhost-user FRONT-END of our own, without QEMU.

    python bench/bench_vhost_blk.py [--seconds 3] [--variant pure|compiled|both] [--json FILE]

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
``VIRTIO_SCHEMA_PURE_PYTHON=1``, and compiled: ``python3 dev.py bench bench_vhost_blk.py``), in
the same run.

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


def start_ours(sock: Path, image: Path, log: Path) -> BackendProcess:
    return BackendProcess(
        ["-m", "virtio_schema.examples.blk", "--vhost-user", str(sock), str(image)], sock, log
    )


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
            ring = SplitRingDriver(ram, QUEUE)
            fe.use_ram(ram, need_reply=True)
            fe.set_vring_num(0, QUEUE)
            fe.set_vring_base(0, 0)
            fe.set_vring_addr(ring.vring_addr(0))
            fe.set_vring_call(0, call_fd)
            fe.set_vring_kick(0, kick_fd)
            fe.set_vring_enable(0, 1, need_reply=True)
            reqs = Requests(ram, ring, depth)
            done = 0
            for slot in reqs.slots:
                reqs.publish(slot)
            os.eventfd_write(kick_fd, 1)
            poll = select.poll()
            poll.register(call_fd, select.POLLIN)
            t0 = time.perf_counter()
            fe_cpu, be_cpu = time.process_time(), cpu_seconds(backend.pid)
            end = t0 + seconds
            while time.perf_counter() < end:
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
                # used() asked to be called for the next completion (used_event); order that
                # store before the next look at used.idx, or a completion that landed before it
                # would never be signalled
                full_barrier()
                os.eventfd_write(kick_fd, 1)
            elapsed = time.perf_counter() - t0
            if cpu is not None:
                cpu["frontend"] = time.process_time() - fe_cpu
                cpu["backend"] = cpu_seconds(backend.pid) - be_cpu
                cpu["elapsed"] = elapsed
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
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    command = " ".join(["bench_vhost_blk.py", *argv])
    out: dict[str, dict[str, float]] = {}
    print(f"{'4 KiB reads':<12}{'back-end':<22}{'requests/s':>12}{'ours / C':>10}"
          f"{'back-end busy':>15}{'front-end busy':>16}{'front-end ceiling':>19}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vs-vblk-") as d:
        for depth in (1, 32):
            rates: dict[str, float] = {}
            for name in [*variants, "qemu-storage-daemon"]:
                cpu: dict[str, float] = {}
                if name == "qemu-storage-daemon":
                    rate = run("qsd", start_qsd, depth, args.seconds, Path(d), cpu=cpu)
                else:
                    with backend_variant(name, command):
                        rate = run(
                            f"ours-{name}", start_ours, depth, args.seconds, Path(d), cpu=cpu
                        )
                rates[name] = rate
                label = name if name == "qemu-storage-daemon" else f"virtio_schema {name}"
                per_request = cpu["frontend"] / (rate * cpu["elapsed"])
                out[f"qd{depth}/{name}"] = {
                    "requests_s": rate,
                    "backend_busy": cpu["backend"] / cpu["elapsed"],
                    "frontend_busy": cpu["frontend"] / cpu["elapsed"],
                    "frontend_ceiling": 1 / per_request,
                }
                r = out[f"qd{depth}/{name}"]
                print(f"qd{depth:<10}{label:<22}{rate:>12,.0f}{'':>10}{r['backend_busy']:>15.0%}"
                      f"{r['frontend_busy']:>16.0%}{r['frontend_ceiling']:>17,.0f}/s",
                      flush=True)  # fmt: skip
            for name in variants:
                ratio = rates[name] / rates["qemu-storage-daemon"]
                out[f"qd{depth}/{name}"]["ours_over_c"] = ratio
                print(f"qd{depth:<10}{'ours ' + name + ' / C':<22}{'':>12}{ratio:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
