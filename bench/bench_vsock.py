#!/usr/bin/env python3
"""Bulk transfers through the example vsock device, both directions, under a Linux guest.

    python bench/bench_vsock.py [--mib 32] [--repeats 3] [--variant pure|compiled|both]
                                [--json FILE]

A Linux guest (QEMU 7.2, TCG) with the vsock device (``virtio_schema.examples.vsock``, its own
process, ``vhost-user-vsock-pci``) and the end-to-end tests' guest tool (``tests/data/vsock_tool.c``;
the rig is ``tests/test_e2e_vsock.py``'s): **host to guest**, a host program connects through the
device's unix socket (``CONNECT``), sends ``--mib`` MiB and half-closes, the guest reads to the end
and replies its byte count and CRC-32; **guest to host**, the guest connects to a host program on
``UDS_P``, sends ``--mib`` MiB and half-closes, the host reads to the end and replies the same. The
rate is the bytes over the host program's time from its first byte to the end (the median of
``--repeats``); every transfer's CRC is checked at both ends. The device runs in each variant of
the library in the same run (pure Python, and compiled: ``python3 dev.py bench bench_vsock.py``),
one guest boot per variant.

What bounds the rate: besides it, the run reports how busy the device process and QEMU (the guest's
vCPU under TCG, and its I/O thread) were during the transfers (CPU seconds over the transfer's
wall time, from ``/proc/PID/stat``; and the device's CPU milliseconds per MB moved, the device's
own cost, which the machine's noise moves less than the rate): a side near 100% of one core sets
the pace (the host program, this process, shares the two cores too). The guest's
receive buffers are 4 KiB each (Linux's ``VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE``), so host to guest
costs the device a chain per 4 KiB; the guest sends up to 64 KiB per packet the other way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_queue import VARIANTS, backend_variant
from bench_vhost_blk import cpu_seconds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_e2e_vsock import (
    HOST_CID,
    MIB,
    HostListener,
    VsockGuest,
    build_tool,
    host_connect,
    running_guest,
    stream,
    summary,
)

from virtio_schema.testing.qemu import find_guest_tools

DIRECTIONS = ("host->guest", "guest->host")


def host_to_guest(vg: VsockGuest, data: bytes, port: int) -> float:
    """One transfer to a guest listener; its seconds (CRCs checked)."""
    job = vg.start(f"listen {port} 1 sink")
    vg.wait_result(job, "listening")
    conn = host_connect(vg.uds, port, data)
    out = vg.finish(job)
    if conn.received.decode(errors="replace") != f"{summary(data)}\n" or out.rc != 0:
        raise RuntimeError(f"host -> guest transfer failed: {conn.ok!r} {out}\n{vg.explain()}")
    return conn.seconds


def guest_to_host(vg: VsockGuest, data: bytes, port: int, seed: int) -> float:
    """One transfer from the guest to a host listener; its seconds (CRCs checked)."""
    with HostListener(Path(f"{vg.uds}_{port}"), 1) as listener:
        out = vg.run(f"connect {HOST_CID} {port} {len(data)} {seed}")
    got = [summary(a.data) for a in listener.accepted]
    if got != [summary(data)] or out.rc != 0 or out.one("connected")[3:] != summary(data).split():
        raise RuntimeError(f"guest -> host transfer failed: {got} {out}\n{vg.explain()}")
    return listener.accepted[0].seconds


def measure(vg: VsockGuest, mib: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per direction: the median MB/s, and how busy the device and QEMU were."""
    out: dict[str, dict[str, float]] = {}
    seed = 40
    for direction in DIRECTIONS:
        seconds, busy_dev, busy_qemu = [], [], []
        for r in range(repeats):
            seed += 1
            data = stream(mib * MIB, seed)
            dev0, qemu0, t0 = cpu_seconds(vg.device.pid), cpu_seconds(vg.vm.pid), time.monotonic()
            if direction == "host->guest":
                s = host_to_guest(vg, data, 7000 + r)
            else:
                s = guest_to_host(vg, data, 7100 + r, seed)
            wall = time.monotonic() - t0
            seconds.append(s)
            busy_dev.append((cpu_seconds(vg.device.pid) - dev0) / wall)
            busy_qemu.append((cpu_seconds(vg.vm.pid) - qemu0) / wall)
        rate = mib * MIB / 1e6 / statistics.median(seconds)
        out[direction] = {
            "MB_s": rate,
            "device_busy": statistics.median(busy_dev),
            "qemu_busy": statistics.median(busy_qemu),
            "device_ms_per_MB": 1e3 * statistics.median(busy_dev) / rate,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=32, help="MiB per transfer (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="transfers per direction (default 3)")
    p.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    tools = find_guest_tools(fetch=False)
    if isinstance(tools, str):
        p.error(tools)
    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    command = " ".join(["bench_vsock.py", *argv])
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="vs-bvsock-") as d:
        tool = build_tool(Path(d) / "vsock_tool")
        if isinstance(tool, str):
            p.error(tool)
        for variant in variants:
            print(f"{variant}: booting the guest ...", file=sys.stderr, flush=True)
            with backend_variant(variant, command), running_guest(tools, tool) as vg:
                results[variant] = measure(vg, args.mib, args.repeats)
    print(f"{args.mib} MiB per transfer, median of {args.repeats}")
    print(f"{'direction':<13}{'variant':<10}{'MB/s':>8}{'device busy':>13}{'QEMU busy':>11}"
          f"{'device CPU ms/MB':>18}")  # fmt: skip
    for direction in DIRECTIONS:
        for variant in variants:
            r = results[variant][direction]
            print(f"{direction:<13}{variant:<10}{r['MB_s']:>8.1f}{r['device_busy']:>13.0%}"
                  f"{r['qemu_busy']:>11.0%}{r['device_ms_per_MB']:>18.1f}")  # fmt: skip
        if len(variants) == 2:
            ratio = results["compiled"][direction]["MB_s"] / results["pure"][direction]["MB_s"]
            print(f"{direction:<13}{'compiled / pure':<18}{ratio:>5.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
