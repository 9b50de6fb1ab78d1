"""Scenario e's benchmark works end to end: its vhost-user front-end (the fake driver over shared
memfd memory, real socket and eventfds) drives our example blk back-end, and the C reference
``qemu-storage-daemon``, and every 4 KiB read comes back OK with the image's bytes. A rate is only
checked to be positive: speed is the benchmark's business, never a test's."""

from __future__ import annotations

import shutil
from pathlib import Path

import bench_vhost_blk
import pytest
from conftest import require_e2e

from virtio_schema.testing.process import BackendProcess


@pytest.mark.parametrize("depth", [1, 32])
def test_our_backend_serves_the_benchmark_front_end(short_tmp: Path, depth: int) -> None:
    cpu: dict[str, float] = {}
    rate = bench_vhost_blk.run(
        "ours", bench_vhost_blk.start_ours, depth, 0.5, short_tmp, verify=True, cpu=cpu
    )
    assert rate > 0
    # the CPU time each side spent, for the front-end's ceiling: both worked, within the run
    assert 0 < cpu["frontend"] <= cpu["elapsed"] * 1.5
    assert 0 < cpu["backend"] <= cpu["elapsed"] * 1.5


@pytest.mark.parametrize("depth", [1, 32])
def test_the_c_reference_serves_the_same_front_end(short_tmp: Path, depth: int) -> None:
    if shutil.which("qemu-storage-daemon") is None:
        require_e2e("qemu-storage-daemon not found (Debian package qemu-system-common)")
    rate = bench_vhost_blk.run("qsd", bench_vhost_blk.start_qsd, depth, 0.5, short_tmp, verify=True)
    assert rate > 0


def test_a_busy_polling_backend_serves_the_front_end_with_few_kicks(short_tmp: Path) -> None:
    """With ``--busy-poll`` the back-end turns kicks off while requests stream, and the front-end
    (which kicks only when EVENT_IDX asks) stops kicking: every read still verifies."""
    cpu: dict[str, float] = {}

    def start(sock: Path, image: Path, log: Path) -> BackendProcess:
        return bench_vhost_blk.start_ours(sock, image, log, busy_poll=0.05)

    rate = bench_vhost_blk.run("ours-poll", start, 32, 0.5, short_tmp, verify=True, cpu=cpu)
    assert rate > 0
    requests = rate * cpu["elapsed"]
    assert cpu["kicks"] < requests / 2, f"{cpu['kicks']} kicks for {requests:.0f} requests"
