"""The vsock benchmark works end to end: one guest, one small transfer each way through the
example device, every byte's CRC checked at both ends by the benchmark itself. Rates and loads
are only checked to be positive (loads, to be plausible): speed is the benchmark's business, never a test's."""

from __future__ import annotations

from pathlib import Path

import bench_vsock
from test_e2e_vsock import running_guest

from virtio_schema.testing.qemu import GuestTools


def test_the_benchmark_moves_data_both_ways(guest: GuestTools, vsock_tool: Path) -> None:
    with running_guest(guest, vsock_tool) as vg:
        results = bench_vsock.measure(vg, mib=1, repeats=1)
    assert set(results) == set(bench_vsock.DIRECTIONS)
    for r in results.values():
        assert r["MB_s"] > 0
        # CPU time counts in clock ticks (10 ms): a short transfer may show 0 for a side
        assert 0 <= r["device_busy"] < 4
        assert 0 <= r["qemu_busy"] < 4
