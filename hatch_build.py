"""Build hook: the wheel ships the kernel compiled by mypyc, as mypy and black ship themselves.

Theory of operation. hatchling calls ``MypycBuildHook.initialize`` before it writes a wheel. For an
editable install it does nothing (the source runs as it is). Otherwise ``compile_kernel`` runs mypyc
over the kernel (``KERNEL`` in ``virtio_schema/_variant.py``, read from the file's text: the build
environment has no construct to import the package with) under the project's mypy configuration
(``pyproject.toml``, so the construct stubs in ``typings/`` and ``--strict`` apply as they do for
``mypy``), and builds the C extensions with setuptools' ``build_ext`` in a temporary directory. Each
compiled module goes into the wheel beside its ``.py`` (which stays: it is the reference, loaded
with ``VIRTIO_SCHEMA_PURE_PYTHON=1``), mypyc's shared runtime ``<hash>__mypyc`` at the wheel root,
and the wheel is tagged for this interpreter and platform.

Where mypyc, a C compiler or Python's headers are missing, or ``VIRTIO_SCHEMA_PURE_BUILD=1`` is
set, the hook says so in one line and the wheel stays pure Python (``py3-none-any``);
``VIRTIO_SCHEMA_REQUIRE_COMPILED=1`` makes that an error. Once the tools are there, any failure
(a type error in the kernel, a C compile error) fails the build: it is never hidden by a fallback.

``python hatch_build.py OUT_DIR`` compiles the kernel into ``OUT_DIR``, laid out as in the wheel
(``dev.py`` does this to test the compiled variant from the source tree).
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.config import BuilderConfig
from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PURE_BUILD_ENV = "VIRTIO_SCHEMA_PURE_BUILD"
REQUIRE_COMPILED_ENV = "VIRTIO_SCHEMA_REQUIRE_COMPILED"
VARIANT_FILE = "virtio_schema/_variant.py"


def kernel_sources(root: Path) -> list[str]:
    """The kernel's source files, relative to ``root``; a missing one is an error."""
    tree = ast.parse((root / VARIANT_FILE).read_text(), VARIANT_FILE)
    for node in tree.body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["KERNEL"]:
            names: tuple[str, ...] = ast.literal_eval(node.value)
            break
    else:
        raise ValueError(f"{VARIANT_FILE} has no KERNEL = (...) assignment")
    sources = [name.replace(".", "/") + ".py" for name in names]
    missing = [source for source in sources if not (root / source).is_file()]
    if missing:
        raise FileNotFoundError(f"kernel modules listed in {VARIANT_FILE} are missing: {missing}")
    return sources


def missing_tool() -> str | None:
    """What this machine lacks to compile the kernel (None when mypyc, a C compiler and Python's
    headers are all there)."""
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed"
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler!r} not found)"
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        return "Python's C headers (Python.h) are not installed"
    return None


def compile_kernel(root: Path, work: Path) -> dict[Path, str]:
    """Compile the kernel with mypyc under ``work``; map each built file to its path in the wheel."""
    from mypyc.build import mypycify

    # setuptools ships no type information (nor does the project install types-setuptools)
    from setuptools import Distribution  # type: ignore[import-untyped]
    from setuptools.command.build_ext import build_ext  # type: ignore[import-untyped]

    with contextlib.chdir(root):  # mypy finds the modules and the typings/ stubs from the root
        extensions = mypycify(
            ["--config-file", "pyproject.toml", *kernel_sources(root)],
            opt_level="3",
            target_dir=str(work / "c"),
        )
        command = build_ext(Distribution({"ext_modules": extensions}))
        command.build_lib = str(work / "lib")
        command.build_temp = str(work / "temp")
        command.ensure_finalized()
        command.run()
        built = [Path(output).resolve() for output in command.get_outputs()]
    return {path: path.relative_to(work / "lib").as_posix() for path in built}


class MypycBuildHook(BuildHookInterface[BuilderConfig]):
    """Adds the compiled kernel to the standard wheel (see the module docstring)."""

    _work: Path | None = None  # the temporary build directory, until the wheel is written

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        reason = "VIRTIO_SCHEMA_PURE_BUILD=1" if os.environ.get(PURE_BUILD_ENV) == "1" else None
        reason = reason or missing_tool()
        if reason is not None:
            if os.environ.get(REQUIRE_COMPILED_ENV) == "1":
                raise RuntimeError(f"virtio_schema: cannot compile the kernel: {reason}")
            self.app.display_warning(f"virtio_schema: building the pure-Python wheel: {reason}")
            return
        self._work = Path(tempfile.mkdtemp(prefix="virtio_schema-mypyc-"))
        built = compile_kernel(Path(self.root), self._work)
        build_data["force_include"].update({str(path): dest for path, dest in built.items()})
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        self.app.display_info(f"virtio_schema: compiled {len(built)} extension modules with mypyc")

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)


def main(argv: list[str]) -> int:
    """``python hatch_build.py OUT_DIR``: the compiled kernel into OUT_DIR, laid out as in the wheel."""
    if len(argv) != 1:
        print("usage: python hatch_build.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0]).resolve()
    reason = missing_tool()
    if reason is not None:
        print(f"cannot compile the kernel: {reason}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="virtio_schema-mypyc-") as work:
        for path, dest in compile_kernel(Path(__file__).resolve().parent, Path(work)).items():
            (out / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out / dest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
