#!/usr/bin/env python3
"""The same Linux guest workload against our virtio-blk back-end and against qemu-storage-daemon.

    python bench/blk_vs_qsd.py [--disk-mib 64] [--rounds 3] [--json FILE]

Both back-ends serve the same image over vhost-user to the same QEMU guest (TCG, Linux 6.1,
``virtio_blk``). Inside the guest, ``/proc/uptime`` around each phase times: a sequential 64 KiB
O_DIRECT read of the whole disk, a sequential 64 KiB O_DIRECT write of half of it, and 4 KiB O_DIRECT
reads. Each back-end is measured ``--rounds`` times (a fresh guest each time); the table shows the
median MB/s per phase and our throughput as a fraction of the C reference's.

A guest under TCG is slow: its own emulation dominates, so the ratio says how much our back-end
costs the guest end to end, not the back-ends' raw speed (the bench/ suite measures that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench_vhost_blk import Start, start_ours, start_qsd

from virtio_schema._cli import progress
from virtio_schema.testing.process import BackendProcess
from virtio_schema.testing.qemu import (
    INIT_EPILOGUE,
    INIT_PRELUDE,
    build_initramfs,
    find_busybox,
    find_kernel,
    qemu_binary,
    run_guest,
)

PHASES = ("read_64k", "write_64k", "read_4k")


def workload(disk_mib: int) -> str:
    blocks = disk_mib * 16  # 64 KiB blocks
    small = 2048  # 4 KiB reads: 8 MiB
    return f"""
t() {{ cut -d' ' -f1 /proc/uptime; }}
a=$(t); dd if=/dev/vda of=/dev/null bs=65536 count={blocks} iflag=direct 2>/dev/null; b=$(t)
echo "E2E-PHASE read_64k $a $b {blocks * 65536}"
a=$(t); dd if=/dev/zero of=/dev/vda bs=65536 count={blocks // 2} oflag=direct conv=notrunc 2>/dev/null; b=$(t)
echo "E2E-PHASE write_64k $a $b {blocks // 2 * 65536}"
a=$(t); dd if=/dev/vda of=/dev/null bs=4096 count={small} iflag=direct 2>/dev/null; b=$(t)
echo "E2E-PHASE read_4k $a $b {small * 4096}"
"""


def start_qsd_cached(sock: Path, image: Path, log: Path) -> BackendProcess:
    """The C reference through the host page cache, as our back-end reads the image."""
    return start_qsd(sock, image, log, blockdev=",cache.direct=off")


def measure(name: str, start: Start, disk_mib: int, tmp: Path) -> dict[str, float]:
    kit = find_kernel()
    busybox = find_busybox()
    assert kit is not None
    assert busybox is not None
    image = tmp / f"{name}.img"
    image.write_bytes(bytes(disk_mib << 20))
    sock = tmp / f"{name}.sock"
    backend = start(sock, image, tmp / f"{name}.log")
    try:
        initrd = build_initramfs(
            tmp / "initrd",
            init_script=INIT_PRELUDE + workload(disk_mib) + INIT_EPILOGUE,
            busybox=busybox,
            modules=kit.module_paths(["virtio_pci", "virtio_blk"]),
        )
        result = run_guest(
            kit,
            initrd,
            ["-chardev", f"socket,id=b0,path={sock}", "-device", "vhost-user-blk-pci,chardev=b0"],
            timeout=600,
        )
    finally:
        backend.stop()
    rates: dict[str, float] = {}
    for line in result.lines("E2E-PHASE"):
        phase, a, b, nbytes = line.split()
        rates[phase] = int(nbytes) / max(float(b) - float(a), 0.01) / 1e6
    if set(rates) != set(PHASES):
        raise SystemExit(f"{name}: the guest did not finish:\n{result.tail()}")
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--disk-mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if qemu_binary() is None or find_kernel() is None or find_busybox() is None:
        raise SystemExit(
            "needs QEMU, busybox-static and the guest kernel: run python3 dev.py guest"
        )
    runs: dict[str, list[dict[str, float]]] = {"virtio_schema": [], "qemu-storage-daemon": []}
    with tempfile.TemporaryDirectory(prefix="vs-bench-") as d:
        for round_ in range(args.rounds):
            progress(f"  round {round_ + 1} of {args.rounds}: a guest on virtio_schema")
            runs["virtio_schema"].append(measure("ours", start_ours, args.disk_mib, Path(d)))
            progress(f"  round {round_ + 1} of {args.rounds}: a guest on qemu-storage-daemon")
            runs["qemu-storage-daemon"].append(
                measure("qsd", start_qsd_cached, args.disk_mib, Path(d))
            )
    med = {k: {ph: statistics.median(r[ph] for r in v) for ph in PHASES} for k, v in runs.items()}
    print(
        f"guest workload, {args.disk_mib} MiB disk, median of {args.rounds} (MB/s inside the guest)"
    )
    print(f"{'phase':<12}{'virtio_schema':>16}{'qemu-storage-daemon':>22}{'ours / C':>10}")
    for ph in PHASES:
        ours, ref = med["virtio_schema"][ph], med["qemu-storage-daemon"][ph]
        print(f"{ph:<12}{ours:>16.1f}{ref:>22.1f}{ours / ref:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"median_mb_s": med, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
