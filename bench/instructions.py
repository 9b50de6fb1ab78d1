#!/usr/bin/env python3
"""Instructions per chain of the hot-path scenarios, counted by callgrind: a figure the load of a
shared machine does not move.

    python bench/instructions.py [--scenario S ...] [--impl I ...] [--format split|packed] [--rounds N]

Each implementation of ``bench_queue.py`` (``library``, ``floor``, ``checked``...) runs twice under
``valgrind --tool=callgrind`` (Debian package ``valgrind``): once building the rig only, once
building it and serving ``N`` rounds of ``bench_queue.QSIZE`` chains. The difference, divided by the
chains served, is what one chain costs in machine instructions, the interpreter's included.

Instructions are not time (a copy of 64 KiB is few instructions and many cycles; allocation and
cache misses cost more than their count), so the timed benchmark stays the measure of the targets.
This one is for comparing two versions of the Python code: on this machine two timed runs of the
same code differ by up to 2x, two counts by a few instructions.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def _child(scenario: str, impl: str, packed: bool, rounds: int) -> None:
    """Build the rig and serve ``rounds`` rounds (0: build only)."""
    sys.path.insert(0, str(HERE))
    import bench_queue

    table = (bench_queue.PACKED if packed else bench_queue.SCENARIOS)[scenario]
    rig = bench_queue.build(scenario, packed=packed)
    if rounds:
        table[impl](rig, rounds)


def count(scenario: str, impl: str, packed: bool, rounds: int) -> int:
    """Instructions callgrind collected for one child run."""
    cmd = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--child", scenario, impl, "packed" if packed else "split",
        str(rounds),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    found = _COLLECTED.search(out.stderr)
    if found is None:
        raise SystemExit(f"no instruction count in callgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def per_chain(scenario: str, impl: str, packed: bool, rounds: int) -> float:
    """Instructions per chain: (count of N rounds - count of 0 rounds) / chains served."""
    sys.path.insert(0, str(HERE))
    import bench_queue

    chains = rounds * bench_queue.QSIZE
    return (count(scenario, impl, packed, rounds) - count(scenario, impl, packed, 0)) / chains


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        scenario, impl, fmt, rounds = argv[1:5]
        _child(scenario, impl, fmt == "packed", int(rounds))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", action="append", default=None)
    p.add_argument("--impl", action="append", default=None)
    p.add_argument("--format", choices=["split", "packed"], default="split")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian package valgrind)")
    scenarios = args.scenario or ["a-echo-64", "b-blk-indirect", "c-copy-64k", "d-batch-256"]
    impls = args.impl or ["floor", "library"]
    os.environ.setdefault("PYTHONHASHSEED", "0")  # the same dict layouts in every child
    print(f"{'ring scenario':<23}{'impl':<11}{'instructions/chain':>20}")
    for scenario in scenarios:
        for impl in impls:
            n = per_chain(scenario, impl, args.format == "packed", args.rounds)
            print(f"{args.format + ' ' + scenario:<23}{impl:<11}{n:>20,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
