"""The hot-path benchmark measures equal work: every reference implementation of every scenario
(the hand-written floor, the API skeleton, the Construct-per-access version) leaves guest memory
exactly as the library does, chain for chain. Speed is never asserted here (a shared, noisy
machine); only that the comparison is honest and that the script runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import bench_queue
import pytest

ROUNDS = 3

Impl = Callable[[bench_queue.Rig, int], int]


def _table(packed: bool) -> dict[str, dict[str, Impl]]:
    return bench_queue.PACKED if packed else bench_queue.SCENARIOS


CASES = [
    pytest.param(packed, name, impl, id=f"{'packed' if packed else 'split'}-{name}-{impl}")
    for packed in (False, True)
    for name, impls in _table(packed).items()
    for impl in impls
    if impl != "library"
]


@functools.cache
def _run(packed: bool, name: str, impl: str | None) -> tuple[int, str]:
    """Chains served and a digest of the whole guest memory after ``ROUNDS`` rounds of ``impl``
    on a fresh rig (``None``: no round at all, the rig as built)."""
    rig = bench_queue.build(name, packed=packed)
    n = 0 if impl is None else _table(packed)[name][impl](rig, ROUNDS)
    return n, hashlib.sha256(rig.mem).hexdigest()


@pytest.mark.parametrize(("packed", "name", "impl"), CASES)
def test_a_reference_leaves_guest_memory_as_the_library_does(
    packed: bool, name: str, impl: str
) -> None:
    served, digest = _run(packed, name, "library")
    assert served == ROUNDS * bench_queue.QSIZE
    assert digest != _run(packed, name, None)[1], "the library changed nothing: nothing to compare"
    assert _run(packed, name, impl) == (served, digest)


def test_the_script_prints_its_table_and_targets_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    args = ["--quick", "--repeats", "1", "--format", "split", "--scenario", "a-echo-64"]
    assert bench_queue.main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "split a-echo-64        library" in printed
    assert "split/a-echo-64 <= 2.0x floor" in printed
    doc = json.loads(out.read_text())
    figures = doc["scenarios"]["split/a-echo-64"]
    assert figures["library_ns"] > 0
    assert figures["floor_ns"] > 0
    assert figures["lib_over_floor"] == pytest.approx(figures["library_ns"] / figures["floor_ns"])
    kinds = {t["target"] for t in doc["targets"]}
    assert kinds == {
        "split/a-echo-64 <= 2.0x floor",
        "split/a-echo-64 >= 20x Construct",
        "memory peak flat",
    }
    assert all(isinstance(t["met"], bool) for t in doc["targets"])
