"""dev.py, the task runner behind the README's two commands: it refuses an unsupported Python with
one line that says what to run instead, makes an environment again when another Python made it,
says what it is doing on a first run, and runs the fast suite on every other supported Python it
finds (a missing one is a skip here and a failure in CI). Creating and installing environments is
replaced by a recorder: no environment is really made."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dev  # noqa: E402 - dev.py is a script at the repository's root, not a package

HERE = (sys.version_info[0], sys.version_info[1])
OTHER = (3, 98)
"""A version no machine has: dev.py treats it as another supported Python."""


class Recorder:
    """Stands in for dev.py's ``_run``: records each command; ``python -m venv DIR`` makes a
    directory that looks like an environment of the running Python."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []
        self.envs: list[Mapping[str, str | None] | None] = []

    def __call__(self, cmd: list[str], env: Mapping[str, str | None] | None = None) -> int:
        self.commands.append(cmd)
        self.envs.append(env)
        if cmd[1:3] == ["-m", "venv"]:
            _fake_venv(Path(cmd[3]), HERE)
        return 0


def _fake_venv(venv: Path, version: tuple[int, int], *, key: str = "version") -> None:
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "python").write_text("")
    (venv / "pyvenv.cfg").write_text(f"home = /x\n{key} = {version[0]}.{version[1]}.7\n")


def _installed(venv: Path) -> None:
    """Mark ``venv`` installed for the current pyproject.toml, as ensure_env does."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".virtio_schema-installed").write_text(want)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(dev, "_run", rec)
    return rec


# --- an unsupported Python ------------------------------------------------------------------------


def test_an_old_python_is_refused_in_one_line_that_says_what_to_run_instead() -> None:
    message = dev.refusal((3, 9), "/usr/bin/python3", ["demo", "--seed", "2"])
    assert message is not None
    assert "\n" not in message
    assert message.startswith("dev.py needs Python 3.11 or later")
    assert "/usr/bin/python3 is Python 3.9" in message
    assert "dev.py demo --seed 2" in message
    assert dev.refusal(HERE, sys.executable, ["test"]) is None


def _old_python() -> Path | None:
    for version in ((3, 10), (3, 9), (3, 8)):
        python = dev.find_python(version)
        if python is not None:
            return python
    return None


def test_dev_py_run_by_an_old_python_prints_the_refusal_and_exits_2() -> None:
    python = _old_python()
    if python is None:
        pytest.skip("no Python 3.8 to 3.10 on this machine")
    proc = subprocess.run(
        [str(python), str(ROOT / "dev.py"), "demo"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("dev.py needs Python 3.11 or later")
    assert lines[0].endswith("dev.py demo instead")


# --- environments ---------------------------------------------------------------------------------


def test_a_first_run_says_it_creates_and_installs_the_environment(
    tmp_path: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    venv = tmp_path / ".venv"
    assert dev.ensure_env(venv) == venv / "bin" / "python"
    assert [c[1:3] for c in recorder.commands] == [["-m", "venv"], ["-m", "pip"], ["-m", "pip"]]
    assert recorder.commands[2][-2:] == ["-e", f"{ROOT}[dev]"]
    out = capsys.readouterr().out
    assert f"creating the environment {venv}" in out
    assert "installing virtio_schema and its development tools" in out
    assert (venv / ".gitignore").read_text() == "*\n"  # git and ruff leave it alone


def test_an_environment_made_by_another_python_is_made_again(
    tmp_path: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    venv = tmp_path / ".venv"
    _fake_venv(venv, (3, 9))
    _installed(venv)
    (venv / "left-by-3.9").write_text("")
    dev.ensure_env(venv)
    assert not (venv / "left-by-3.9").exists()
    assert [c[1:3] for c in recorder.commands] == [["-m", "venv"], ["-m", "pip"], ["-m", "pip"]]
    assert dev.venv_version(venv) == HERE
    out = capsys.readouterr().out
    assert f"was made by Python 3.9, and this is Python {HERE[0]}.{HERE[1]}" in out


def test_an_environment_that_lost_its_interpreter_is_made_again(
    tmp_path: Path, recorder: Recorder
) -> None:
    venv = tmp_path / ".venv"
    _fake_venv(venv, HERE)
    _installed(venv)
    (venv / "bin" / "python").unlink()  # e.g. a link to an interpreter since removed
    dev.ensure_env(venv)
    assert recorder.commands[0][1:3] == ["-m", "venv"]


def test_an_installed_environment_of_this_python_is_left_alone(
    tmp_path: Path, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    venv = tmp_path / ".venv"
    _fake_venv(venv, HERE)
    _installed(venv)
    assert dev.ensure_env(venv) == venv / "bin" / "python"
    assert recorder.commands == []
    assert capsys.readouterr().out == ""


def test_a_changed_pyproject_reinstalls_into_the_same_environment(
    tmp_path: Path, recorder: Recorder
) -> None:
    venv = tmp_path / ".venv"
    _fake_venv(venv, HERE)
    (venv / ".virtio_schema-installed").write_text("an older pyproject.toml")
    dev.ensure_env(venv)
    assert [c[1:3] for c in recorder.commands] == [["-m", "pip"], ["-m", "pip"]]


def test_a_directory_that_is_not_an_environment_is_refused_and_kept(
    tmp_path: Path, recorder: Recorder
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(dev.SetupFailed, match="not a virtual environment"):
        dev.ensure_env(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert recorder.commands == []


@pytest.mark.parametrize(
    ("line", "version"),
    [
        ("version = 3.12.1", (3, 12)),  # CPython's venv
        ("version_info = 3.13.0.final.0", (3, 13)),  # virtualenv, uv
        ("home = /usr/bin", None),
    ],
)
def test_the_version_that_made_an_environment_is_read_from_pyvenv_cfg(
    tmp_path: Path, line: str, version: tuple[int, int] | None
) -> None:
    (tmp_path / "pyvenv.cfg").write_text(f"include-system-site-packages = false\n{line}\n")
    assert dev.venv_version(tmp_path) == version


def test_each_other_python_has_its_environment_beside_the_main_one() -> None:
    assert dev.venv_for(HERE) == dev.VENV
    assert dev.venv_for(OTHER) == dev.VENV.with_name(f"{dev.VENV.name}-3.98")


# --- finding the other interpreters ---------------------------------------------------------------


def _fake_python(path: Path, prints: str, status: int = 0) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(f"#!/bin/sh\necho {prints}\nexit {status}\n")
    path.chmod(0o755)


def test_an_install_that_does_not_run_is_passed_over_for_one_that_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "pyenv"))
    monkeypatch.setenv("UV_PYTHON_INSTALL_DIR", str(tmp_path / "uv"))
    versions = tmp_path / "pyenv" / "versions"
    _fake_python(versions / "3.98.10" / "bin" / "python3.98", "broken", status=1)
    _fake_python(versions / "3.98.2" / "bin" / "python3.98", "3 98")
    _fake_python(tmp_path / "uv" / "cpython-3.97.1-linux" / "bin" / "python3.97", "3 97")
    assert dev.find_python(OTHER) == versions / "3.98.2" / "bin" / "python3.98"
    assert dev.find_python((3, 97)) == tmp_path / "uv/cpython-3.97.1-linux/bin/python3.97"
    assert dev.find_python((3, 96)) is None
    assert dev.find_python(HERE) == Path(sys.executable)


# --- the fast suite on the other Pythons ----------------------------------------------------------


@pytest.mark.parametrize(("ci", "status"), [(None, None), ("true", 1)])
def test_a_missing_python_is_a_skip_here_and_a_failure_in_ci(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder, ci: str | None, status: int | None
) -> None:
    monkeypatch.delenv("VIRTIO_SCHEMA_REQUIRE_E2E", raising=False)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(dev, "find_python", lambda version: None)
    results: dev.Results = []
    dev._fast_suite_on(OTHER, [], results)
    assert results == [("pytest 3.98 (fast, pure): no python3.98 found", status, 0.0)]
    assert recorder.commands == []


def test_another_python_runs_the_fast_suite_pure_in_its_own_environment(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder
) -> None:
    made: list[tuple[Path, Path | None]] = []

    def ensure_env(venv: Path, python: Path | None = None) -> Path:
        made.append((venv, python))
        return venv / "bin" / "python"

    monkeypatch.setattr(dev, "find_python", lambda version: Path("/opt/python3.98"))
    monkeypatch.setattr(dev, "ensure_env", ensure_env)
    results: dev.Results = []
    dev._fast_suite_on(OTHER, ["-k", "queue"], results)
    assert made == [(dev.venv_for(OTHER), Path("/opt/python3.98"))]
    (cmd,) = recorder.commands
    assert cmd == [
        str(dev.venv_for(OTHER) / "bin" / "python"), "-m", "pytest", *dev.FAST_SUITE, "-k", "queue",
    ]  # fmt: skip
    env = recorder.envs[0]
    assert env is not None
    assert env["VIRTIO_SCHEMA_PURE_PYTHON"] == "1"
    assert env["VIRTIO_SCHEMA_EXPECT_COMPILED"] == "0"
    assert [(name, rc) for name, rc, _ in results] == [("pytest 3.98 (fast, pure)", 0)]


def test_the_fast_suite_leaves_out_the_end_to_end_and_benchmark_modules_only() -> None:
    patterns = [arg.removeprefix("--ignore-glob=") for arg in dev.FAST_SUITE]
    assert patterns == ["tests/test_e2e_*.py", "tests/test_bench_*.py"]
    for pattern in patterns:
        assert list(ROOT.glob(pattern)), f"no module matches {pattern}"
    kept = set(ROOT.glob("tests/test_*.py")) - {p for g in patterns for p in ROOT.glob(g)}
    assert ROOT / "tests" / "test_queue.py" in kept
    assert len(kept) > 30


def test_the_summary_counts_skips_apart_and_fails_only_on_a_failure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert dev._summary([("ruff", 0, 1.0), ("pytest 3.98", None, 0.0)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "checks: 1 passed, 0 failed, 1 skipped"
    assert dev._summary([("ruff", 0, 1.0), ("mypy", 1, 2.0)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "checks: 1 passed, 1 failed"


# --- the demo -------------------------------------------------------------------------------------


def test_the_demo_ends_by_pointing_at_the_examples_source(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(dev, "ensure_env", lambda venv=dev.VENV, python=None: dev.PY)
    assert dev.demo([]) == 0
    assert recorder.commands == [[str(dev.PY), "-m", "virtio_schema.examples.demo"]]
    last = capsys.readouterr().out.rstrip().splitlines()[-2:]
    assert "virtio_schema/examples/demo.py" in last[0]
    assert (ROOT / "virtio_schema" / "examples" / "demo.py").is_file()
    assert os.path.isfile(ROOT / "virtio_schema" / "examples" / "blk.py")
