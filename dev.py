#!/usr/bin/env python3
"""Project task runner: needs only Python 3.11+; sets up its own virtual environment on first use.

    python3 dev.py test     # ruff, mypy --strict, stubtest, docs build (-W), pytest
    python3 dev.py demo     # the example virtio-blk device serving the fake driver
    python3 dev.py guest    # fetch the guest kernel for the end-to-end tests (root, apt)
    python3 dev.py fuzz [--seconds N]   # the queue fuzz target, bounded (atheris)
    python3 dev.py env      # only create/refresh .venv

The environment lives in ``.venv`` next to this file and is reinstalled when ``pyproject.toml``
changes. Set ``VIRTIO_SCHEMA_VENV`` to use another location.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("VIRTIO_SCHEMA_VENV", ROOT / ".venv"))
PY = VENV / "bin" / "python"


def _run(cmd: list[str]) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def ensure_env() -> None:
    """Create the venv and install the project with its dev extra, once per pyproject.toml."""
    stamp = VENV / ".virtio_schema-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want and PY.exists():
        return
    if not PY.exists() and _run([sys.executable, "-m", "venv", str(VENV)]) != 0:
        sys.exit("could not create the virtual environment (is the venv module installed?)")
    pip = [str(PY), "-m", "pip", "--disable-pip-version-check", "-q"]
    if _run([*pip, "install", "--upgrade", "pip"]) != 0:
        sys.exit("pip upgrade failed")
    if _run([*pip, "install", "-e", f"{ROOT}[dev]"]) != 0:
        sys.exit("installing the project failed")
    stamp.write_text(want)


def _step(name: str, cmd: list[str], results: list[tuple[str, int, float]]) -> None:
    t0 = time.monotonic()
    print(f"\n=== {name} ===", flush=True)
    rc = _run(cmd)
    results.append((name, rc, time.monotonic() - t0))


def test(extra: list[str]) -> int:
    """Every check CI runs; non-zero if any failed (pytest finding no test counts as a failure)."""
    ensure_env()
    bin_ = VENV / "bin"
    results: list[tuple[str, int, float]] = []
    _step("ruff check", [str(bin_ / "ruff"), "check", "."], results)
    _step("ruff format", [str(bin_ / "ruff"), "format", "--check", "."], results)
    _step("mypy --strict", [str(PY), "-m", "mypy"], results)
    _step(
        "stubtest construct",
        [
            str(PY), "-m", "mypy.stubtest", "construct",
            "--mypy-config-file", "pyproject.toml",
            "--allowlist", "typings/stubtest_allowlist.txt",
        ],
        results,
    )  # fmt: skip
    _step(
        "docs (warnings are errors)",
        [str(PY), "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", "docs/_build/html"],
        results,
    )  # fmt: skip
    _step("pytest", [str(PY), "-m", "pytest", *extra], results)
    print("\n=== summary ===")
    for name, rc, secs in results:
        print(f"{'ok  ' if rc == 0 else 'FAIL'} {name:<28} {secs:6.1f}s  (exit {rc})")
    failed = [name for name, rc, _ in results if rc != 0]
    print(f"checks: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def demo(extra: list[str]) -> int:
    ensure_env()
    return _run([str(PY), "-m", "virtio_schema.examples.demo", *extra])


def guest(extra: list[str]) -> int:
    """Fetch and unpack the Debian cloud kernel the QEMU tests boot (needs apt-get as root)."""
    ensure_env()
    code = (
        "import sys; from virtio_schema.testing.qemu import find_kernel; "
        "k = find_kernel(fetch=True); print('guest kernel:', k); sys.exit(k is None)"
    )
    return _run([str(PY), "-c", code])


def fuzz(extra: list[str]) -> int:
    """Run the queue fuzz target for a bounded time (default 60 s) and summarise."""
    ensure_env()
    return _run([str(PY), "fuzz/run.py", *(extra or ["--seconds", "60"])])


def main(argv: list[str]) -> int:
    tasks = {"test": test, "demo": demo, "guest": guest, "fuzz": fuzz}
    if not argv or argv[0] not in (*tasks, "env"):
        print(__doc__)
        return 2
    if argv[0] == "env":
        ensure_env()
        return 0
    return tasks[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
