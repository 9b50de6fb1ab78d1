"""The two variants of the kernel: which one runs, the switch to the source, and the wheels.

``dev.py test`` runs the suite twice, on the pure-Python source and on the kernel compiled with
mypyc copied beside it, and tells each pass which variant it must run
(``VIRTIO_SCHEMA_EXPECT_COMPILED=0`` or ``1``): a compiled pass that silently ran the source fails
here. The wheel tests build the project as pip would (compiled, from the sdist; and pure with
``VIRTIO_SCHEMA_PURE_BUILD=1``) and install it in a fresh virtual environment. They take minutes,
so they run once, in dev.py's compiled pass (``VIRTIO_SCHEMA_WHEEL_TESTS=1``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import virtio_schema
from virtio_schema._variant import KERNEL, SourceFinder, is_compiled

ROOT = Path(__file__).resolve().parent.parent
EXPECT = os.environ.get("VIRTIO_SCHEMA_EXPECT_COMPILED")

needs_expectation = pytest.mark.skipif(
    EXPECT is None, reason="dev.py test says which variant each pass runs"
)
wheel_test = pytest.mark.skipif(
    os.environ.get("VIRTIO_SCHEMA_WHEEL_TESTS") != "1",
    reason="builds and installs wheels (minutes): run once, in dev.py test's compiled pass",
)

# Run by a fresh interpreter: a queue of each format serves a chain, then which variant that was.
PROBE = """
import importlib, json
import virtio_schema
from virtio_schema._variant import KERNEL
from virtio_schema.chain import ReadableChain
from virtio_schema.fake_queue import make_queue

for packed in (False, True):
    fq = make_queue(size=8, packed=packed)
    fq.driver.publish([b"ping"], [16])
    chain = fq.queue.next_chain()
    assert chain is not None
    with chain:
        reader = ReadableChain(chain)
        request = reader.read()
        reader.into_writable().write(request.upper())
    assert [u.data for u in fq.driver.used()] == [b"PING"], packed
files = {name: importlib.import_module(name).__file__ for name in KERNEL}
print(json.dumps({"compiled": virtio_schema.COMPILED, "files": files}))
"""


def probe(python: Path | str, cwd: Path, *, pure: bool) -> tuple[bool, dict[str, str]]:
    """Run PROBE with ``python``: whether the kernel ran compiled, and the file of each module."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTIO_SCHEMA_PURE_PYTHON")
    }
    if pure:
        env["VIRTIO_SCHEMA_PURE_PYTHON"] = "1"
    proc = subprocess.run(
        [str(python), "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    return report["compiled"], report["files"]


def is_extension(file: str) -> bool:
    """Whether ``file`` is a compiled module."""
    return file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def extension_beside(source: str) -> bool:
    """Whether a compiled module sits beside the ``.py`` file ``source``."""
    stem = source.removesuffix(".py")
    return any(Path(stem + suffix).is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES)


# --- which variant runs ---------------------------------------------------------------------------


@needs_expectation
def test_the_pass_runs_the_variant_dev_py_says() -> None:
    expected = EXPECT == "1"
    wrong = [name for name in KERNEL if is_compiled(importlib.import_module(name)) != expected]
    assert wrong == []
    assert virtio_schema.COMPILED is expected


@needs_expectation
def test_a_subprocess_runs_the_same_variant_as_the_pass() -> None:
    compiled, files = probe(sys.executable, ROOT, pure=False)
    assert compiled is (EXPECT == "1")
    assert all(is_extension(file) is compiled for file in files.values()), files


def test_pure_python_switch_loads_the_sources_even_beside_compiled_modules() -> None:
    compiled, files = probe(sys.executable, ROOT, pure=True)
    assert compiled is False
    assert not any(map(is_extension, files.values())), files
    if EXPECT == "1":  # the compiled kernel is in the tree: the switch chose the sources over it
        assert all(extension_beside(file) for file in files.values()), files


def test_source_finder_finds_modules_and_packages_of_the_package_only() -> None:
    finder = SourceFinder()
    package = Path(virtio_schema.__file__).parent
    split = finder.find_spec("virtio_schema.queue.split", [str(package / "queue")])
    assert split is not None
    assert split.origin == str(package / "queue" / "split.py")
    queue = finder.find_spec("virtio_schema.queue", [str(package)])
    assert queue is not None
    assert queue.origin == str(package / "queue" / "__init__.py")
    assert queue.submodule_search_locations == [str(package / "queue")]
    assert finder.find_spec("virtio_schema.no_such_module", [str(package)]) is None
    assert finder.find_spec("json", None) is None


# --- the wheels -----------------------------------------------------------------------------------


def build(out: Path, *args: str, env: dict[str, str]) -> Path:
    """``python -m build`` the repository into ``out`` (isolated, as pip does); the wheel."""
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), *args, str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    return wheel


def install(wheel: Path, venv: Path) -> Path:
    """A fresh virtual environment with ``wheel`` (and construct, from the index); its python."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return python


def build_env(**extra: str) -> dict[str, str]:
    names = (
        "VIRTIO_SCHEMA_PURE_PYTHON",
        "VIRTIO_SCHEMA_PURE_BUILD",
        "VIRTIO_SCHEMA_REQUIRE_COMPILED",
    )
    return {**{k: v for k, v in os.environ.items() if k not in names}, **extra}


@wheel_test
def test_compiled_wheel_from_the_sdist_runs_compiled_and_pure(tmp_path: Path) -> None:
    wheel = build(tmp_path / "dist", env=build_env(VIRTIO_SCHEMA_REQUIRE_COMPILED="1"))
    assert "py3-none-any" not in wheel.name
    assert f"-cp{sys.version_info.major}{sys.version_info.minor}-" in wheel.name
    assert len(list((tmp_path / "dist").glob("*.tar.gz"))) == 1
    names = zipfile.ZipFile(wheel).namelist()
    for module in KERNEL:
        path = module.replace(".", "/")
        assert f"{path}.py" in names
        assert any(name.startswith(f"{path}.") and name.endswith(".so") for name in names), path
    assert [name for name in names if "__mypyc" in name and "/" not in name] != []
    assert "virtio_schema/__init__.py" in names
    assert not any(
        name.startswith("virtio_schema/__init__.") and name.endswith(".so") for name in names
    )

    python = install(wheel, tmp_path / "venv")
    compiled, files = probe(python, tmp_path, pure=False)
    assert compiled is True
    assert all(file.startswith(str(tmp_path / "venv")) for file in files.values()), files
    compiled, files = probe(python, tmp_path, pure=True)
    assert compiled is False
    assert not any(map(is_extension, files.values())), files


@wheel_test
def test_pure_build_gives_a_pure_python_wheel(tmp_path: Path) -> None:
    wheel = build(tmp_path / "dist", "--wheel", env=build_env(VIRTIO_SCHEMA_PURE_BUILD="1"))
    assert wheel.name.endswith("-py3-none-any.whl")
    assert not [name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".so")]
    python = install(wheel, tmp_path / "venv")
    compiled, files = probe(python, tmp_path, pure=False)
    assert compiled is False
    assert all(file.startswith(str(tmp_path / "venv")) for file in files.values()), files
