#!/usr/bin/env python3
"""Run the queue fuzz target for a bounded time and summarise (cases, time, findings).

    python fuzz/run.py --seconds 60 [--json fuzz/last_run.json]

Exit status 0 when the run found nothing. A finding (libFuzzer's crash-*/timeout-* file) is copied
to ``fuzz/findings/``; add it to ``fuzz/regressions/`` with the fix, and the test suite replays it
(tests/test_fuzz_harness.py).

The summary says which kernel ran: the mypyc-compiled modules (``compiled``; atheris instruments
Python bytecode only, so there coverage guides the search through the interpreted code around the
kernel alone) or the pure-Python source (``VIRTIO_SCHEMA_PURE_PYTHON=1``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import virtio_schema

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    findings_dir = HERE / "findings"
    with tempfile.TemporaryDirectory(prefix="vs-fuzz-") as work:
        artifacts = Path(work) / "artifacts"
        artifacts.mkdir()
        cmd = [
            sys.executable, str(HERE / "fuzz_queue.py"),
            f"-max_total_time={args.seconds}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            str(Path(work) / "corpus"),
            str(HERE / "corpus" / "queue"),
            str(HERE / "regressions"),
        ]  # fmt: skip
        (Path(work) / "corpus").mkdir()
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 120)
        seconds = time.monotonic() - t0
        log = proc.stdout + proc.stderr
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
        cases = int(runs[-1]) if runs else 0
        found = sorted(artifacts.iterdir())
        if found:
            findings_dir.mkdir(exist_ok=True)
            for f in found:
                shutil.copy(f, findings_dir / f.name)
        corpus_size = len(list((Path(work) / "corpus").iterdir()))
    summary = {
        "compiled": bool(virtio_schema.COMPILED),  # the same interpreter and environment as the run
        "cases": cases,
        "seconds": round(seconds, 1),
        "findings": len(found),
        "new_corpus_entries": corpus_size,
        "exit_status": proc.returncode,
    }
    print(
        f"fuzz: {cases} cases in {seconds:.0f} s, {len(found)} findings,"
        f" {corpus_size} new corpus entries (libFuzzer exit {proc.returncode};"
        f" {'compiled' if summary['compiled'] else 'pure-Python'} kernel)"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if found or proc.returncode != 0:
        print(log[-4000:])
        for f in found:
            print(f"finding saved: {findings_dir / f.name}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
