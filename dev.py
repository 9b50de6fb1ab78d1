#!/usr/bin/env python3
"""Project task runner: needs only Python 3.11+; sets up its own virtual environment on first use.

    python3 dev.py test     # ruff, mypy --strict, stubtest, docs build (-W), pytest twice:
                            # on the pure-Python source, then on the kernel compiled with mypyc
    python3 dev.py demo     # the example virtio-blk device serving the fake driver
    python3 dev.py guest    # fetch the guest kernel for the end-to-end tests (root, apt)
    python3 dev.py fuzz [--seconds N]   # the queue fuzz target, bounded (atheris), compiled kernel
    python3 dev.py bench SCRIPT [ARGS]  # bench/SCRIPT, compiled kernel in the tree (both variants)
    python3 dev.py build    # sdist, and the wheel built from it, into dist/ (compiled where cc is)
    python3 dev.py env      # only create/refresh .venv

The environment lives in ``.venv`` next to this file and is reinstalled when ``pyproject.toml``
changes. Set ``VIRTIO_SCHEMA_VENV`` to use another location. Arguments after ``test`` go to both
pytest passes.

The compiled variant: the build hook (``hatch_build.py``) compiles the kernel with mypyc into
``build/mypyc/<key>/`` (the key hashes the package's sources, the stubs, the build configuration,
mypy's and Python's versions, so an unchanged tree is not compiled again). For a compiled pass the
extension modules are copied beside their sources (the editable install puts the repository on
``sys.path``, and Python prefers an extension module to the ``.py`` beside it) and removed after;
every task starts by removing any that an interrupted run left behind. While they are in the tree,
everything run from it gets the compiled kernel unless ``VIRTIO_SCHEMA_PURE_PYTHON=1``; a second
compiled run waits for the first to take them out.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("VIRTIO_SCHEMA_VENV", ROOT / ".venv"))
PY = VENV / "bin" / "python"
KERNEL_CACHE = ROOT / "build" / "mypyc"
IN_TREE = KERNEL_CACHE / "in-tree.pid"  # who has the compiled kernel in the source tree


def _run(cmd: list[str], env: Mapping[str, str | None] | None = None) -> int:
    """Run ``cmd`` in the repository; ``env`` sets (or, with None, unsets) environment variables."""
    print("+ " + " ".join(cmd), flush=True)
    full = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    return subprocess.call(cmd, cwd=ROOT, env=full)


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


def _step(
    name: str,
    cmd: list[str],
    results: list[tuple[str, int, float]],
    env: Mapping[str, str | None] | None = None,
) -> None:
    t0 = time.monotonic()
    print(f"\n=== {name} ===", flush=True)
    rc = _run(cmd, env)
    results.append((name, rc, time.monotonic() - t0))


# --- the compiled kernel ---------------------------------------------------------------------------


def _in_tree_files() -> list[Path]:
    """Compiled kernel files in the source tree: the extension modules and mypyc's shared library."""
    return [*ROOT.glob("*__mypyc*.so"), *(ROOT / "virtio_schema").rglob("*.so")]


def _live_owner() -> int | None:
    """The pid of a running dev.py that has the compiled kernel in the tree, if there is one."""
    try:
        pid = int(IN_TREE.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _remove_compiled_from_tree() -> None:
    """Remove what an interrupted compiled run left in the source tree (not a live run's files)."""
    owner = _live_owner()
    if owner is not None:
        print(f"note: dev.py (pid {owner}) has the compiled kernel in the tree: it is what runs")
        return
    left = _in_tree_files()
    for path in left:
        path.unlink()
    IN_TREE.unlink(missing_ok=True)
    if left:
        print(f"removed {len(left)} compiled kernel files an interrupted run left in the tree")


def _kernel_key() -> str:
    """Hash of what the compiled kernel depends on: the package's sources (mypyc types the kernel
    against all of them), the stubs, the build configuration and hook, mypy's and Python's versions."""
    digest = hashlib.sha256()
    inputs = [*(ROOT / "virtio_schema").rglob("*.py"), *(ROOT / "typings").rglob("*.pyi")]
    for path in sorted([*inputs, ROOT / "pyproject.toml", ROOT / "hatch_build.py"]):
        digest.update(f"{path.relative_to(ROOT)}\0".encode() + path.read_bytes())
    versions = "import sys, mypy.version; print(mypy.version.__version__, sys.version)"
    digest.update(subprocess.check_output([str(PY), "-c", versions]))
    return digest.hexdigest()[:20]


def _compile_kernel(results: list[tuple[str, int, float]]) -> Path | None:
    """The compiled kernel from the cache, compiled first if the sources changed; None (and a FAIL
    line in ``results``) if compiling failed."""
    t0 = time.monotonic()
    print("\n=== mypyc compile ===", flush=True)
    out = KERNEL_CACHE / _kernel_key()
    if out.is_dir():
        print(f"unchanged sources: {out.relative_to(ROOT)}")
        results.append(("mypyc compile (cached)", 0, time.monotonic() - t0))
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rc = _run([str(PY), "hatch_build.py", str(partial)])
    results.append(("mypyc compile", rc, time.monotonic() - t0))
    if rc != 0:
        return None
    for old in KERNEL_CACHE.iterdir():  # keep one build: the cache is for an unchanged tree
        if old.is_dir() and old != partial:
            shutil.rmtree(old)
    partial.rename(out)
    return out


@contextlib.contextmanager
def _compiled_in_tree(kernel: Path) -> Iterator[None]:
    """The compiled kernel copied beside its sources for the duration of the block."""
    while (owner := _live_owner()) is not None:
        print(f"waiting for dev.py (pid {owner}) to take its compiled kernel out of the tree")
        time.sleep(10)
    KERNEL_CACHE.mkdir(parents=True, exist_ok=True)
    IN_TREE.write_text(str(os.getpid()))
    try:
        for path in kernel.rglob("*.so"):
            shutil.copy2(path, ROOT / path.relative_to(kernel))
        yield
    finally:
        for path in _in_tree_files():
            path.unlink()
        IN_TREE.unlink(missing_ok=True)


# The compiled pass: tests/test_compiled.py checks the compiled kernel is what runs and builds the
# wheels (slow, so once: here); pytest's doctest collection accepts a module loaded from a .so.
NOT_PURE: dict[str, str | None] = {"VIRTIO_SCHEMA_PURE_PYTHON": None}
COMPILED_PASS = {
    **NOT_PURE,
    "VIRTIO_SCHEMA_EXPECT_COMPILED": "1",
    "VIRTIO_SCHEMA_WHEEL_TESTS": "1",
    "PY_IGNORE_IMPORTMISMATCH": "1",
}


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
    pytest = [str(PY), "-m", "pytest", *extra]
    _step("pytest (pure Python)", pytest, results, env={"VIRTIO_SCHEMA_EXPECT_COMPILED": "0"})
    kernel = _compile_kernel(results)
    if kernel is None:
        results.append(("pytest (compiled): not run", 1, 0.0))
    else:
        with _compiled_in_tree(kernel):
            _step("pytest (compiled)", pytest, results, env=COMPILED_PASS)
    print("\n=== summary ===")
    for name, rc, secs in results:
        print(f"{'ok  ' if rc == 0 else 'FAIL'} {name:<30} {secs:6.1f}s  (exit {rc})")
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
    """Run the queue fuzz target on the compiled kernel for a bounded time (default 60 s)."""
    ensure_env()
    kernel = _compile_kernel([])
    if kernel is None:
        print("fuzz: FAIL: the kernel did not compile")
        return 1
    check = "import sys, virtio_schema; sys.exit(not virtio_schema.COMPILED)"
    with _compiled_in_tree(kernel):
        if _run([str(PY), "-c", check], NOT_PURE) != 0:
            print("fuzz: FAIL: the compiled kernel is in the tree but did not load")
            return 1
        return _run([str(PY), "fuzz/run.py", *(extra or ["--seconds", "60"])], NOT_PURE)


def bench(extra: list[str]) -> int:
    """Run a benchmark script of bench/ with the compiled kernel in the tree: the scripts measure
    both variants in one run (children with VIRTIO_SCHEMA_PURE_PYTHON=1 for the source)."""
    ensure_env()
    if not extra:
        print("usage: python3 dev.py bench SCRIPT [ARGS...]   (SCRIPT: a file of bench/)")
        return 2
    script = ROOT / "bench" / Path(extra[0]).name
    kernel = _compile_kernel([])
    if kernel is None:
        print("bench: FAIL: the kernel did not compile")
        return 1
    with _compiled_in_tree(kernel):
        return _run([str(PY), str(script), *extra[1:]], NOT_PURE)


def build(extra: list[str]) -> int:
    """The sdist, then the wheel built from it, into dist/ (python -m build; see hatch_build.py)."""
    ensure_env()
    return _run([str(PY), "-m", "build", "--outdir", "dist", *extra, "."])


def main(argv: list[str]) -> int:
    tasks = {
        "test": test,
        "demo": demo,
        "guest": guest,
        "fuzz": fuzz,
        "bench": bench,
        "build": build,
    }
    if not argv or argv[0] not in (*tasks, "env"):
        print(__doc__)
        return 2
    _remove_compiled_from_tree()
    if argv[0] == "env":
        ensure_env()
        return 0
    return tasks[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
