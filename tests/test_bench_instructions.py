"""The instruction counter of the benchmarks (``bench/instructions.py``) counts what it claims: a
chain of the library's echo costs more instructions than the hand-written floor's, and a run of
more rounds costs more in proportion (the rig's construction cancels out)."""

from __future__ import annotations

import os
import shutil
import subprocess

import instructions
import pytest

import virtio_schema

needs_valgrind = pytest.mark.skipif(
    shutil.which("valgrind") is None and not os.environ.get("VIRTIO_SCHEMA_REQUIRE_E2E"),
    reason="valgrind not installed (Debian package valgrind)",
)


@needs_valgrind
def test_the_library_counts_more_instructions_per_chain_than_the_floor() -> None:
    """In the variant this pass runs (the compiled one gets the compiled checked floor)."""
    variant = "compiled" if virtio_schema.COMPILED else "pure"
    floor = instructions.per_chain("a-echo-64", "floor", False, 1, variant)
    library = instructions.per_chain("a-echo-64", "library", False, 1, variant)
    # the floor is a few struct calls and two 64-byte copies: thousands of instructions, not
    # hundreds of thousands; the library does the same work plus its checks and its API (compiled,
    # it may come close to the interpreted floor: only an upper bound)
    assert 2_000 < floor < 100_000
    assert library < floor * 20
    if variant == "pure":
        assert floor * 1.5 < library


def test_counts_are_read_from_callgrinds_summary_and_failures_stop_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs: list[list[str]] = []
    envs: list[object] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        runs.append(cmd)
        envs.append(kwargs.get("env"))
        rounds = int(cmd[-1])
        err = f"==1== Events    : Ir\n==1== Collected : {1_000_000 + 2_560 * rounds}\n"
        return subprocess.CompletedProcess(cmd, 0, "", err)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert instructions.per_chain("b-blk-indirect", "floor", True, 3) == 2_560 / 256
    assert [cmd[-4:] for cmd in runs] == [
        ["b-blk-indirect", "floor", "packed", "3"],
        ["b-blk-indirect", "floor", "packed", "0"],
    ]
    assert runs[0][:2] == ["valgrind", "--tool=callgrind"]
    # the pure variant (the default): the child is told to load the pure-Python source
    for env in envs:
        assert isinstance(env, dict)
        assert env["VIRTIO_SCHEMA_PURE_PYTHON"] == "1"
        assert env["VIRTIO_SCHEMA_BENCH_VARIANT"] == "pure"

    def failing(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "valgrind: no such tool")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(SystemExit, match="no such tool"):
        instructions.count("a-echo-64", "library", False, 1)
