#!/usr/bin/env python3
"""Project task runner: needs only Python 3.11+; sets up its own virtual environment on first use.

    python3 dev.py test     # ruff, mypy --strict, stubtest, docs build (-W), pytest twice:
                            # on the pure-Python source, then on the kernel compiled with mypyc;
                            # then the fast suite on each other supported Python that is installed
    python3 dev.py demo     # the example virtio-blk device serving the fake driver
    python3 dev.py guest    # fetch the guest kernel for the end-to-end tests (root, apt)
    python3 dev.py fuzz [--seconds N]   # the queue fuzz target, bounded (atheris), compiled kernel
    python3 dev.py bench SCRIPT [ARGS]  # bench/SCRIPT, compiled kernel in the tree (both variants)
    python3 dev.py build    # sdist, and the wheel built from it, into dist/ (compiled where cc is)
    python3 dev.py env      # only create/refresh .venv
    python3 dev.py pythons  # the interpreters test runs on; exit 1 if a supported one is missing

The environment lives in ``.venv`` next to this file, made by the Python that runs dev.py; it is
reinstalled when ``pyproject.toml`` changes and made again when another Python made it (its
``pyvenv.cfg`` names another version). Set ``VIRTIO_SCHEMA_VENV`` to use another location.
Arguments after ``test`` go to every pytest pass.

Every supported Python: ``test`` runs the whole suite on the Python that runs dev.py, and then the
fast suite (all but the end-to-end tests and the benchmark rigs' tests: ``FAST_SUITE``), on the
pure-Python source, on each other supported version it finds (``python3.X`` on ``PATH``, else pyenv's or uv's installs),
each in its own environment (``.venv-3.12`` beside ``.venv``, made and installed like it). A version
not found is a skip, or a failure where CI requires every one (``CI=true`` or
``VIRTIO_SCHEMA_REQUIRE_E2E=1``).

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
from typing import TYPE_CHECKING

SUPPORTED = ((3, 11), (3, 12), (3, 13))
"""The Python versions the package supports (``requires-python``), oldest first."""
ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("VIRTIO_SCHEMA_VENV", ROOT / ".venv"))
PY = VENV / "bin" / "python"
KERNEL_CACHE = ROOT / "build" / "mypyc"
IN_TREE = KERNEL_CACHE / "in-tree.pid"  # who has the compiled kernel in the source tree
FAST_SUITE = ["--ignore-glob=tests/test_e2e_*.py", "--ignore-glob=tests/test_bench_*.py"]
"""pytest's arguments for the fast suite that the other supported Pythons run: everything but the
end-to-end tests (guests, testpmd) and the tests of the benchmark rigs, which run on ``.venv``'s
Python only (``dev.py bench``; their valgrind instruction count alone takes a minute and a half)."""

if TYPE_CHECKING:  # aliases for annotations only: an old Python must get as far as main()
    Version = tuple[int, int]
    Results = list[tuple[str, int | None, float]]
    """A check's name, its exit status (None: skipped) and its time in seconds."""


class SetupFailed(Exception):
    """An environment could not be made: the message says what failed."""


def _dotted(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


def refusal(version: Version, executable: str, argv: list[str]) -> str | None:
    """The one line with which dev.py refuses to run on Python ``version``, naming what to run
    instead (``argv``: the task asked for); None if the version is supported."""
    if version >= SUPPORTED[0]:
        return None
    python = _supported_python_command()
    command = " ".join(["dev.py", *argv])
    instead = (
        f"run {python} {command} instead"
        if python
        else f"install Python {_dotted(SUPPORTED[0])} or later (Debian 12: apt-get install python3)"
        f" and run {command} with it"
    )
    return (
        f"dev.py needs Python {_dotted(SUPPORTED[0])} or later, and {executable} is Python"
        f" {_dotted(version)}: {instead}"
    )


def _supported_python_command() -> str | None:
    """How to start a supported Python here: ``python3`` if it is one, else ``python3.X`` on PATH,
    else an install's full path (pyenv's shims on PATH only run the selected versions)."""
    on_path = shutil.which("python3")
    if on_path is not None and (python_version(Path(on_path)) or (0, 0)) >= SUPPORTED[0]:
        return "python3"
    for version in reversed(SUPPORTED):
        python = find_python(version)
        if python is not None:
            name = f"python{_dotted(version)}"
            return name if shutil.which(name) == str(python) else str(python)
    return None


def _run(cmd: list[str], env: Mapping[str, str | None] | None = None) -> int:
    """Run ``cmd`` in the repository; ``env`` sets (or, with None, unsets) environment variables."""
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=_environ(env))


def _environ(env: Mapping[str, str | None] | None) -> dict[str, str]:
    full = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    return full


def _run_ticking(
    cmd: list[str], label: str, env: Mapping[str, str | None] | None = None, every: float = 10.0
) -> int:
    """``_run``, and on a terminal a line every ``every`` seconds while ``cmd`` runs."""
    if not sys.stdout.isatty():
        return _run(cmd, env)
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.monotonic()
    with subprocess.Popen(cmd, cwd=ROOT, env=_environ(env)) as proc:
        while True:
            try:
                return proc.wait(timeout=every)
            except subprocess.TimeoutExpired:
                print(f"  {label}: {time.monotonic() - t0:.0f} s", flush=True)


# --- interpreters and their environments ---------------------------------------------------------


def python_version(python: Path) -> Version | None:
    """``python``'s (major, minor), or None if it does not run (a pyenv shim of a version that
    is not selected, a link to a removed interpreter)."""
    if python == Path(sys.executable):
        return sys.version_info[0], sys.version_info[1]
    try:
        out = subprocess.run(
            [str(python), "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        major, minor = map(int, out.split())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return major, minor


def _installs(version: Version) -> list[Path]:
    """Interpreters of ``version`` installed by pyenv or uv (newest patch release first)."""
    name = f"python{_dotted(version)}"
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    uv = Path(os.environ.get("UV_PYTHON_INSTALL_DIR", Path.home() / ".local/share/uv/python"))
    found = [
        *pyenv.glob(f"{_dotted(version)}.*/bin/{name}"),
        *uv.glob(f"cpython-{_dotted(version)}.*/bin/{name}"),
    ]

    def patch(path: Path) -> int:
        digits = path.parent.parent.name.split(".")[2].split("-")[0].split("+")[0]
        return int(digits) if digits.isdigit() else -1

    return sorted(found, key=patch, reverse=True)


def find_python(version: Version) -> Path | None:
    """An interpreter of ``version`` that runs: this one, ``python3.X`` on PATH, or an install of
    pyenv's or uv's."""
    if sys.version_info[:2] == version:
        return Path(sys.executable)
    on_path = shutil.which(f"python{_dotted(version)}")
    candidates = [Path(on_path)] if on_path else []
    for python in [*candidates, *_installs(version)]:
        if python_version(python) == version:
            return python
    return None


def venv_for(version: Version) -> Path:
    """The environment of ``version``: ``.venv`` for the Python that runs dev.py, ``.venv-3.X``
    beside it for the others."""
    if sys.version_info[:2] == version:
        return VENV
    return VENV.with_name(f"{VENV.name}-{_dotted(version)}")


def venv_version(venv: Path) -> Version | None:
    """The Python version that made ``venv``, from its ``pyvenv.cfg`` (None: no readable one)."""
    try:
        lines = (venv / "pyvenv.cfg").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() in ("version", "version_info"):
            parts = value.strip().split(".")
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                return int(parts[0]), int(parts[1])
    return None


def ensure_env(venv: Path = VENV, python: Path | None = None) -> Path:
    """Make ``venv`` with ``python`` (default: the one running dev.py) and install the project
    with its dev extra, once per pyproject.toml; made again if another Python version made it.
    Returns the environment's interpreter; raises SetupFailed."""
    python = python or Path(sys.executable)
    version = python_version(python)
    if version is None:
        raise SetupFailed(f"{python} does not run")
    name = _shown(venv)
    py = venv / "bin" / "python"
    stale = _stale(venv, version)
    if stale is not None:
        print(f"{name} {stale}: making it again", flush=True)
        shutil.rmtree(venv)
    stamp = venv / ".virtio_schema-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want and py.exists():
        return py
    if not py.exists():
        print(f"creating the environment {name} (Python {_dotted(version)}: {python})", flush=True)
        if _run([str(python), "-m", "venv", str(venv)]) != 0:
            raise SetupFailed(f"could not create {name} (is Python's venv module installed?)")
        (venv / ".gitignore").write_text("*\n")  # as Python 3.13's venv does: git, ruff skip it
    print(f"installing virtio_schema and its development tools into {name} (pip, quiet: a"
          " minute or two the first time)", flush=True)  # fmt: skip
    pip = [str(py), "-m", "pip", "--disable-pip-version-check", "-q"]
    if _run([*pip, "install", "--upgrade", "pip"]) != 0:
        raise SetupFailed(f"pip upgrade in {name} failed")
    if _run([*pip, "install", "-e", f"{ROOT}[dev]"]) != 0:
        raise SetupFailed(f"installing the project into {name} failed")
    stamp.write_text(want)
    print(f"{name} is ready", flush=True)
    return py


def _stale(venv: Path, version: Version) -> str | None:
    """Why the environment at ``venv`` cannot serve Python ``version`` (None: it can, or there is
    none yet); raises SetupFailed for a directory that is not an environment, which it leaves."""
    if not (venv / "pyvenv.cfg").exists():
        if venv.exists() and any(venv.iterdir()):
            raise SetupFailed(f"{venv} is not a virtual environment (no pyvenv.cfg): remove it,"
                              " or set VIRTIO_SCHEMA_VENV to another place")  # fmt: skip
        return None
    made_by = venv_version(venv)
    if made_by != version:
        by = f"Python {_dotted(made_by)}" if made_by else "an unknown Python version"
        return f"was made by {by}, and this is Python {_dotted(version)}"
    if not (venv / "bin" / "python").exists():
        return "has lost its interpreter"
    return None


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it is inside it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


def require_every_python() -> bool:
    """CI requires every supported version: a missing one fails ``test`` instead of skipping."""
    ci = os.environ.get("CI", "").lower() in ("true", "1", "yes")
    return ci or os.environ.get("VIRTIO_SCHEMA_REQUIRE_E2E") == "1"


def _step(
    name: str,
    cmd: list[str],
    results: Results,
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


def _compile_kernel(results: Results) -> Path | None:
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
    owner = _live_owner()
    while owner is not None:
        print(f"waiting for dev.py (pid {owner}) to take its compiled kernel out of the tree")
        time.sleep(10)
        owner = _live_owner()
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


# The other Pythons' pass: the fast suite on the pure-Python source (the compiled kernel in the tree,
# if any, is built for the Python that runs dev.py), the vhost-user fuzz test with a quarter of its
# examples (its own knob: it is the suite's slowest property test; the main passes keep all 400).
OTHER_PYTHON_PASS: dict[str, str | None] = {
    "VIRTIO_SCHEMA_PURE_PYTHON": "1",
    "VIRTIO_SCHEMA_EXPECT_COMPILED": "0",
    "VIRTIO_SCHEMA_FUZZ_EXAMPLES": "100",
}


def _fast_suite_on(version: Version, extra: list[str], results: Results) -> None:
    """The fast suite, pure Python, on another supported version: found, its environment made,
    run; a version not found is skipped, or failed where CI requires every version."""
    name = f"pytest {_dotted(version)} (fast, pure)"
    python = find_python(version)
    if python is None:
        missing = f"no python{_dotted(version)} found"
        print(f"\n=== {name} ===\n{missing} (on PATH, in pyenv's or uv's installs)", flush=True)
        results.append((f"{name}: {missing}", 1 if require_every_python() else None, 0.0))
        return
    t0 = time.monotonic()
    print(f"\n=== {name} ===", flush=True)
    try:
        py = ensure_env(venv_for(version), python)
    except SetupFailed as exc:
        print(exc)
        results.append((f"{name}: no environment", 1, time.monotonic() - t0))
        return
    rc = _run([str(py), "-m", "pytest", *FAST_SUITE, *extra], OTHER_PYTHON_PASS)
    results.append((name, rc, time.monotonic() - t0))


def _summary(results: Results) -> int:
    print("\n=== summary ===")
    for name, rc, secs in results:
        verdict = "skip" if rc is None else "ok  " if rc == 0 else "FAIL"
        status = "skipped" if rc is None else f"exit {rc}"
        print(f"{verdict} {name:<34} {secs:6.1f}s  ({status})")
    failed = sum(1 for _, rc, _ in results if rc is not None and rc != 0)
    skipped = sum(1 for _, rc, _ in results if rc is None)
    passed = len(results) - failed - skipped
    print(f"checks: {passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0


def test(extra: list[str]) -> int:
    """Every check CI runs; non-zero if any failed (pytest finding no test counts as a failure)."""
    ensure_env()
    bin_ = VENV / "bin"
    results: Results = []
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
    for version in SUPPORTED:
        if version != sys.version_info[:2]:
            _fast_suite_on(version, extra, results)
    return _summary(results)


def pythons(extra: list[str]) -> int:
    """Which interpreter ``test`` runs on for each supported version; 1 if one is missing."""
    missing = 0
    for version in SUPPORTED:
        python = find_python(version)
        missing += python is None
        where = str(python) if python else "not found"
        print(f"{_dotted(version)}  {where}  ({_shown(venv_for(version))})")
    return 1 if missing else 0


def demo(extra: list[str]) -> int:
    ensure_env()
    print(
        "\n=== the demo: the example virtio-blk device serving a simulated driver ===", flush=True
    )
    rc = _run([str(PY), "-m", "virtio_schema.examples.demo", *extra])
    print("\nhow it works: virtio_schema/examples/demo.py (the simulated driver and its checks),")
    print("serving the device of virtio_schema/examples/blk.py")
    return rc


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
        cmd = [str(PY), "fuzz/run.py", *(extra or ["--seconds", "60"])]
        return _run_ticking(cmd, "fuzzing", NOT_PURE)


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
    refused = refusal((sys.version_info[0], sys.version_info[1]), sys.executable, argv)
    if refused is not None:
        print(refused, file=sys.stderr)
        return 2
    tasks = {
        "test": test,
        "demo": demo,
        "guest": guest,
        "fuzz": fuzz,
        "bench": bench,
        "build": build,
        "pythons": pythons,
    }
    if not argv or argv[0] not in (*tasks, "env"):
        print(__doc__)
        return 2
    try:
        _remove_compiled_from_tree()
        if argv[0] == "env":
            ensure_env()
            return 0
        return tasks[argv[0]](argv[1:])
    except SetupFailed as exc:
        print(f"dev.py {argv[0]}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
