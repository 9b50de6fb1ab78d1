"""The distributions as a user gets them: built, checked, installed, and typed for the user's code.

One module-scoped fixture builds the sdist and, from it, the wheel, once per session
(``python -m build --no-isolation``: the development environment's hatchling, nothing
downloaded). It is a pure-Python build (``VIRTIO_SCHEMA_PURE_BUILD=1``): compiling the kernel with
mypyc would take minutes and changes nothing checked here (``tests/test_compiled.py`` builds and
installs the compiled wheel). A second fixture installs the wheel and mypy in a fresh virtual
environment; pip reaches the package index for construct and mypy there, and where it cannot, the
tests that need the environment skip and say so (CI has the index). Then:

- ``twine check --strict`` passes on both distributions, and their metadata carries the version
  written once in ``virtio_schema/__init__.py``, the licence, the project URLs and the console
  scripts; the wheel holds ``virtio_schema`` (with ``py.typed``) and the stub-only package
  ``construct-stubs``, and nothing that could shadow construct itself;
- in the fresh environment, ``mypy --strict`` passes on ``tests/data/user_device.py`` (a user's
  own schema, ``Layout``, device and tests on the fake driver), which then runs; every deliberate
  mistake of ``MISTAKES`` is reported by mypy on its line, so the check can fail;
- stubtest checks the installed stubs against the installed construct;
- every console script answers ``--help``.

Every subprocess has a timeout. ``dev.py test`` runs the suite twice; the tests that build run in
its pure-Python pass only. The cheap checks at the end run in both passes, on the source tree.
"""

from __future__ import annotations

import email.parser
import os
import pydoc
import re
import runpy
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import pytest

import virtio_schema
from virtio_schema.fake_queue import make_queue

ROOT = Path(__file__).resolve().parent.parent
USER_MODULE = ROOT / "tests" / "data" / "user_device.py"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]

builds = pytest.mark.skipif(
    os.environ.get("VIRTIO_SCHEMA_EXPECT_COMPILED") == "1",
    reason="builds and installs the wheel: once per dev.py test, in its pure-Python pass",
)

# pip's words when no package index can be reached (the fresh environment needs construct and mypy)
NO_INDEX = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution"
    r"|Network is unreachable|No matching distribution found"
)


class Mistake(NamedTuple):
    """A line of the user's module broken on purpose, and the error code mypy must report there."""

    name: str
    line: str
    broken: str
    code: str


MISTAKES = [
    # a str where the schema's typed field wants an int
    Mistake(
        "str_for_int_field",
        "KvReq(op=op, flags=0, key=key)",
        "KvReq(op=op, flags=0, key=str(key))",
        "arg-type",
    ),
    # a packed queue where the code wants a split one (make_queue's overloads give concrete types)
    Mistake(
        "packed_queue_for_split",
        "split: SplitFakeQueue = make_queue(8)",
        "split: SplitFakeQueue = make_queue(8, packed=True)",
        "assignment",
    ),
    # the record of another layout
    Mistake(
        "record_of_another_layout",
        "writer.write_record(KV_RESP, KvResp(status=Status.OK, len=0))",
        "writer.write_record(KV_REQ, KvResp(status=Status.OK, len=0))",
        "misc",
    ),
    # a Construct field named the wrong way round: an error only the construct stubs can report
    Mistake("construct_operands_swapped", '"key" / Int32ul', 'Int32ul / "key"', "operator"),
]


def run(
    cmd: list[str | Path],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``cmd``, output captured, bounded by ``timeout`` seconds."""
    return subprocess.run(
        [str(part) for part in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would point a child at the source tree or a variant."""
    drop = {
        "PYTHONPATH",
        "MYPYPATH",
        "VIRTIO_SCHEMA_PURE_PYTHON",
        "VIRTIO_SCHEMA_PURE_BUILD",
        "VIRTIO_SCHEMA_REQUIRE_COMPILED",
    }
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def tail(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class UserEnv:
    """The fresh virtual environment with the wheel and mypy, and a directory with the user's
    module in it (and no mypy configuration but its own)."""

    python: Path
    bin: Path
    work: Path


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    out = tmp_path_factory.mktemp("dist")
    cmd: list[str | Path] = [sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT]
    proc = run(cmd, timeout=600, env=clean_env(VIRTIO_SCHEMA_PURE_BUILD="1"))
    assert proc.returncode == 0, tail(proc)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dists(sdist, wheel)


@pytest.fixture(scope="module")
def user_env(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> UserEnv:
    venv = tmp_path_factory.mktemp("venv")
    proc = run([sys.executable, "-m", "venv", venv], timeout=180)
    assert proc.returncode == 0, tail(proc)
    python = venv / "bin" / "python"
    # mypy as in the development environment, so both check with the same rules
    pip: list[str | Path] = [python, "-m", "pip", "install", "-q", dists.wheel]
    pip.append(f"mypy=={version('mypy')}")
    proc = run(pip, timeout=600, env=clean_env())
    if proc.returncode != 0 and NO_INDEX.search(proc.stdout + proc.stderr):
        pytest.skip(f"no package index for construct and mypy: {tail(proc).splitlines()[-1]}")
    assert proc.returncode == 0, tail(proc)
    work = tmp_path_factory.mktemp("user")
    shutil.copy(USER_MODULE, work / USER_MODULE.name)
    (work / "mypy.ini").write_text("[mypy]\nstrict = True\n")
    return UserEnv(python, venv / "bin", work)


def mypy(env: UserEnv, *files: str) -> subprocess.CompletedProcess[str]:
    """The fresh environment's ``mypy --strict`` on ``files`` of the user's directory."""
    cmd: list[str | Path] = [env.python, "-m", "mypy", "--config-file", "mypy.ini", "--strict"]
    return run([*cmd, *files], cwd=env.work, timeout=300, env=clean_env())


def wheel_metadata(wheel: Path) -> tuple[list[str], Message, str]:
    """The wheel's file names, its METADATA and its entry_points.txt."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        return (
            names,
            email.parser.Parser().parsestr(zf.read(meta).decode()),
            zf.read(entry_points).decode(),
        )


# --- the distributions --------------------------------------------------------------------------


@builds
def test_twine_check_passes_on_the_sdist_and_the_wheel(dists: Dists) -> None:
    proc = run(
        [sys.executable, "-m", "twine", "check", "--strict", dists.sdist, dists.wheel], timeout=120
    )
    assert proc.returncode == 0, tail(proc)
    assert proc.stdout.count("PASSED") == 2, proc.stdout


@builds
def test_the_metadata_says_version_licence_urls_and_scripts(dists: Dists) -> None:
    names, meta, entry_points = wheel_metadata(dists.wheel)
    assert meta["Name"] == "virtio_schema"
    assert meta["Version"] == virtio_schema.__version__
    assert f"-{virtio_schema.__version__}-" in dists.wheel.name
    assert dists.sdist.name == f"virtio_schema-{virtio_schema.__version__}.tar.gz"
    assert meta["License-Expression"] == "MIT"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    urls = dict(url.split(", ", 1) for url in meta.get_all("Project-URL") or [])
    assert set(urls) >= {"Homepage", "Repository", "Issues", "Changelog"}, urls
    assert "Typing :: Typed" in (meta.get_all("Classifier") or [])
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points
    assert set(SCRIPTS) >= {  # and any added later: each must answer --help below
        "virtio-schema-inspect",
        "virtio-schema-blk",
        "virtio-schema-rng",
        "virtio-schema-net",
        "virtio-schema-demo",
    }


@builds
def test_the_wheel_ships_py_typed_and_the_construct_stub_package(dists: Dists) -> None:
    names, _, _ = wheel_metadata(dists.wheel)
    assert "virtio_schema/py.typed" in names
    assert "construct-stubs/__init__.pyi" in names
    stubs = zipfile.ZipFile(dists.wheel).read("construct-stubs/__init__.pyi")
    assert stubs == (ROOT / "typings" / "construct" / "__init__.pyi").read_bytes()
    # nothing that an import of construct itself could find instead of the real package
    assert not [n for n in names if n.split("/")[0] in ("construct", "typings", "tests")]
    assert not [n for n in names if n.endswith(".so")]  # the pure build


@builds
def test_the_sdist_holds_what_the_wheel_is_built_from(dists: Dists) -> None:
    top = f"virtio_schema-{virtio_schema.__version__}"
    with tarfile.open(dists.sdist) as tf:
        names = set(tf.getnames())
    for path in (
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "pyproject.toml",
        "hatch_build.py",
        "typings/construct/__init__.pyi",
        "typings/stubtest_allowlist.txt",
        "virtio_schema/py.typed",
        "tests/data/user_device.py",
    ):
        assert f"{top}/{path}" in names, path


# --- a user's code against the installed wheel ----------------------------------------------------


@builds
def test_a_users_device_type_checks_strictly_and_runs(user_env: UserEnv) -> None:
    proc = mypy(user_env, USER_MODULE.name)
    assert proc.returncode == 0, tail(proc)
    assert "Success: no issues found in 1 source file" in proc.stdout
    proc = run([user_env.python, USER_MODULE.name], cwd=user_env.work, timeout=120, env=clean_env())
    assert proc.returncode == 0, tail(proc)
    assert proc.stdout.strip() == "user_device: ok"


@pytest.fixture(scope="module")
def mistakes_reported(user_env: UserEnv) -> dict[str, set[tuple[int, str]]]:
    """Each broken copy of the user's module, checked by mypy in one run: the (line, code) of
    every error reported in it."""
    source = USER_MODULE.read_text()
    (user_env.work / "mistakes").mkdir()
    files = []
    for mistake in MISTAKES:
        assert source.count(mistake.line) == 1, mistake.line
        path = f"mistakes/{mistake.name}.py"
        (user_env.work / path).write_text(source.replace(mistake.line, mistake.broken))
        files.append(path)
    proc = mypy(user_env, *files)
    assert proc.returncode == 1, tail(proc)
    reported: dict[str, set[tuple[int, str]]] = {m.name: set() for m in MISTAKES}
    for match in re.finditer(
        r"^mistakes/(\w+)\.py:(\d+): error: .*\[([\w-]+)\]$", proc.stdout, re.M
    ):
        reported[match[1]].add((int(match[2]), match[3]))
    return reported


@builds
@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_mypy_reports_each_mistake_on_its_line(
    mistake: Mistake, mistakes_reported: dict[str, set[tuple[int, str]]]
) -> None:
    source = USER_MODULE.read_text()
    line = source[: source.index(mistake.line)].count("\n") + 1
    assert mistakes_reported[mistake.name] == {(line, mistake.code)}


@builds
def test_stubtest_checks_the_installed_stubs_against_construct(user_env: UserEnv) -> None:
    cmd: list[str | Path] = [user_env.python, "-m", "mypy.stubtest", "construct"]
    cmd += ["--allowlist", ROOT / "typings" / "stubtest_allowlist.txt"]
    if sys.version_info >= (3, 12):  # EnumInteger's layout (the file says why)
        cmd += ["--allowlist", ROOT / "typings" / "stubtest_allowlist_py312.txt"]
    proc = run(cmd, cwd=user_env.work, timeout=300, env=clean_env())
    assert proc.returncode == 0, tail(proc)


@builds
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_the_console_scripts_are_installed_and_answer_help(user_env: UserEnv, script: str) -> None:
    proc = run([user_env.bin / script, "--help"], cwd=user_env.work, timeout=60, env=clean_env())
    assert proc.returncode == 0, tail(proc)
    assert proc.stdout.startswith("usage: "), proc.stdout[:500]


# --- cheap checks on the source tree (every pass) -----------------------------------------------


def test_the_version_is_written_once() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]
    source = ROOT / PYPROJECT["tool"]["hatch"]["version"]["path"]
    assert f'__version__ = "{virtio_schema.__version__}"' in source.read_text()


def test_help_shows_the_concrete_types_of_make_queue() -> None:
    text = pydoc.plain(pydoc.render_doc(make_queue))
    for name in ("SplitFakeQueue", "PackedFakeQueue", "AnyFakeQueue"):
        assert name in text
    assert "Any, Any" not in text


def test_the_users_device_runs_on_the_source_tree() -> None:
    module = runpy.run_path(str(USER_MODULE))
    module["test_both_formats"]()
    module["test_the_concrete_types_of_each_format"]()
    module["test_the_schema_is_the_source_of_truth"]()
