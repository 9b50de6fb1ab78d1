#!/usr/bin/env python3
"""Instructions per chain of the hot-path scenarios, counted by callgrind: a figure the load of a
shared machine does not move.

    python bench/instructions.py [--scenario S ...] [--impl I ...] [--format split|packed|both]
                                 [--variant pure|compiled|both] [--rounds N]

Each implementation of ``bench_queue.py`` (``library``, ``floor``, ``checked``...) runs twice under
``valgrind --tool=callgrind`` (Debian package ``valgrind``): once building the rig only, once
building it and serving ``N`` rounds of ``bench_queue.QSIZE`` chains. The difference, divided by the
chains served, is what one chain costs in machine instructions, the interpreter's included.

Each count is made for the pure-Python library (``VIRTIO_SCHEMA_PURE_PYTHON=1``) and the compiled
one (which also gets the checked floor compiled by mypyc, as ``bench_queue.py`` does), printed side
by side; the compiled variant needs the compiled kernel importable (``python3 dev.py bench
instructions.py ...``). Issue 19's limit for the pure-Python rewrite is judged on these figures:
at most 10% more instructions per chain than before it (``BEFORE``).

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
VARIANTS = ("pure", "compiled")

# The pure-Python library's instructions per chain before issue 19's rewrite (revision a7c306f,
# counted with that revision's copy of this script, --rounds 2; packed: 2026-12-06): what the
# rewrite is allowed 10% more than.
BEFORE = {
    ("split", "a-echo-64"): 47_993,
    ("split", "b-blk-indirect"): 123_048,
    ("split", "d-batch-256"): 43_944,
    ("packed", "a-echo-64"): 49_433,
    ("packed", "b-blk-indirect"): 121_631,
}
LIMIT = 1.10


def _child(scenario: str, impl: str, packed: bool, rounds: int) -> None:
    """Build the rig and serve ``rounds`` rounds (0: build only)."""
    sys.path.insert(0, str(HERE))
    import bench_queue

    bench_queue.check_variant()
    table = (bench_queue.PACKED if packed else bench_queue.SCENARIOS)[scenario]
    rig = bench_queue.build(scenario, packed=packed)
    if rounds:
        table[impl](rig, rounds)


def count(scenario: str, impl: str, packed: bool, rounds: int, variant: str = "pure") -> int:
    """Instructions callgrind collected for one child run of ``variant``."""
    sys.path.insert(0, str(HERE))
    import bench_queue

    fmt = "packed" if packed else "split"
    command = (
        f"instructions.py --variant {variant} --scenario {scenario} --impl {impl} --format {fmt}"
    )
    env = bench_queue.variant_env(variant, command)
    cmd = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--child", scenario, impl, "packed" if packed else "split",
        str(rounds),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    found = _COLLECTED.search(out.stderr)
    if found is None:
        raise SystemExit(f"no instruction count in callgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def per_chain(scenario: str, impl: str, packed: bool, rounds: int, variant: str = "pure") -> float:
    """Instructions per chain: (count of N rounds - count of 0 rounds) / chains served."""
    sys.path.insert(0, str(HERE))
    import bench_queue

    chains = rounds * bench_queue.QSIZE
    served = count(scenario, impl, packed, rounds, variant)
    return (served - count(scenario, impl, packed, 0, variant)) / chains


def _versus(fmt: str, scenario: str, impl: str, n: dict[str, float]) -> str:
    """The pure library's count against issue 19's limit (10% over ``BEFORE``), where known."""
    before = BEFORE.get((fmt, scenario))
    if impl != "library" or before is None or "pure" not in n:
        return ""
    ratio = n["pure"] / before
    verdict = "met" if ratio <= LIMIT else "not met"
    return f"   pure {ratio:.3f}x before ({before:,}): {verdict} (<= {LIMIT:.2f}x)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        scenario, impl, fmt, rounds = argv[1:5]
        _child(scenario, impl, fmt == "packed", int(rounds))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", action="append", default=None)
    p.add_argument("--impl", action="append", default=None)
    p.add_argument("--format", choices=["split", "packed", "both"], default="split")
    p.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian package valgrind)")
    scenarios = args.scenario or ["a-echo-64", "b-blk-indirect", "c-copy-64k", "d-batch-256"]
    impls = args.impl or ["floor", "library"]
    formats = ["split", "packed"] if args.format == "both" else [args.format]
    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    os.environ.setdefault("PYTHONHASHSEED", "0")  # the same dict layouts in every child
    cols = "".join(f"{v:>14}" for v in variants)
    print(f"{'ring scenario':<23}{'impl':<11}{cols}   instructions/chain", flush=True)
    sys.path.insert(0, str(HERE))
    import bench_queue

    for fmt in formats:
        table = bench_queue.PACKED if fmt == "packed" else bench_queue.SCENARIOS
        for scenario in scenarios:
            for impl in impls:
                if impl not in table[scenario]:  # e.g. no checked floor for d
                    continue
                n = {
                    v: per_chain(scenario, impl, fmt == "packed", args.rounds, v) for v in variants
                }
                cols = "".join(f"{n[v]:>14,.0f}" for v in variants)
                print(f"{fmt + ' ' + scenario:<23}{impl:<11}{cols}{_versus(fmt, scenario, impl, n)}",
                      flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
