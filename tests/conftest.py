"""Test-suite settings shared by every module."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import HealthCheck, settings

from virtio_schema.queue import VirtQueue
from virtio_schema.testing.qemu import GuestTools, find_guest_tools

# bench/ holds scripts, not a package: the tests that check a benchmark import its module by name
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

# The machine is shared and noisy: no per-example deadlines (speed is the benchmarks' business).
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
# CI: more examples, same seed-free search; select with HYPOTHESIS_PROFILE=ci.
settings.register_profile(
    "ci", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# --- end-to-end prerequisites ---------------------------------------------------------------------


def require_e2e(reason: str) -> NoReturn:
    """Skip an end-to-end test whose system component is missing, with ``reason``; in CI
    (``VIRTIO_SCHEMA_REQUIRE_E2E=1``, set by ``.ci/run``, which installs everything) fail instead."""
    if os.environ.get("VIRTIO_SCHEMA_REQUIRE_E2E") == "1":
        pytest.fail(f"end-to-end prerequisites missing in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def guest() -> GuestTools:
    """QEMU, the guest kernel (fetched into the cache when running as root) and busybox."""
    found = find_guest_tools(fetch=os.geteuid() == 0)
    if isinstance(found, str):
        require_e2e(found)
    return found


@pytest.fixture(scope="session")
def vsock_tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vsock end-to-end tests' guest tool, built once per session
    (``test_e2e_vsock.build_tool``)."""
    from test_e2e_vsock import build_tool

    built = build_tool(tmp_path_factory.mktemp("vsock-tool") / "vsock_tool")
    if isinstance(built, str):
        require_e2e(built)
    return built


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is ~107 bytes; pytest's tmp_path can be long)."""
    with tempfile.TemporaryDirectory(prefix="vs-e2e-") as d:
        yield Path(d)


class DescReads:
    """Counts the descriptor records the queue reads, through its ``descriptors_read`` counter
    (every descriptor, ring and indirect, is read through the format's cursor, which counts it);
    setting ``count`` starts a new count."""

    def __init__(self, queue: VirtQueue) -> None:
        self._queue = queue
        self._base = queue.descriptors_read

    @property
    def count(self) -> int:
        return self._queue.descriptors_read - self._base

    @count.setter
    def count(self, value: int) -> None:
        self._base = self._queue.descriptors_read - value
