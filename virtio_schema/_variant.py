"""Which variant of the kernel runs: the mypyc-compiled modules or their pure-Python source.

The kernel (``KERNEL``: the modules on the hot path) is compiled by mypyc when the wheel is built
(``hatch_build.py``); each compiled module is an extension module installed beside its ``.py``, and
mypyc's runtime for all of them is one shared library at the top level. The ``.py`` files are the
reference: where no compiled module is installed they are what runs.

Theory of operation: Python's path finder prefers an extension module over a ``.py`` in the same
directory, so forcing the source takes a finder ahead of it. With ``VIRTIO_SCHEMA_PURE_PYTHON=1``
importing this module (the first thing ``virtio_schema/__init__.py`` does, before any other
submodule is imported) puts ``SourceFinder`` first on ``sys.meta_path``: for every name under
``virtio_schema.`` it returns the spec of the ``.py`` source (or the package's ``__init__.py``)
found on the parent package's ``__path__``, and leaves every other name to the usual finders.
``compiled()`` says which variant was loaded, from the files the kernel modules came from.

Rules: standard library only, and nothing at import time but the finder (``hatch_build.py`` reads
``KERNEL`` from this file's text without importing it, in a build environment without construct).
This module is never compiled.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PURE_PYTHON_ENV = "VIRTIO_SCHEMA_PURE_PYTHON"

# The modules mypyc compiles, the single list (hatch_build.py and the tests read it).
KERNEL = (
    "virtio_schema.mem",
    "virtio_schema.ring",
    "virtio_schema.layout",
    "virtio_schema.util",
    "virtio_schema.chain",
    "virtio_schema.queue.base",
    "virtio_schema.queue.split",
    "virtio_schema.queue.packed",
    "virtio_schema.queue.desc_chain",
    "virtio_schema.queue.walk",
)


class SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the ``.py`` source of every ``virtio_schema`` submodule, never a compiled module."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("virtio_schema.") or path is None:
            return None
        name = fullname.rpartition(".")[2]
        for entry in path:
            package = Path(entry, name, "__init__.py")
            if package.is_file():
                return importlib.util.spec_from_file_location(
                    fullname, package, submodule_search_locations=[str(package.parent)]
                )
            module = Path(entry, f"{name}.py")
            if module.is_file():
                return importlib.util.spec_from_file_location(fullname, module)
        return None


def is_compiled(module: ModuleType) -> bool:
    """Whether ``module`` was loaded from an extension module (a mypyc-compiled one, here)."""
    return str(getattr(module, "__file__", "")).endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES)
    )


@functools.cache
def compiled() -> bool:
    """Whether the whole kernel runs compiled (imports it; ``virtio_schema.COMPILED`` calls this)."""
    return all(is_compiled(importlib.import_module(name)) for name in KERNEL)


if os.environ.get(PURE_PYTHON_ENV) == "1" and not any(
    isinstance(finder, SourceFinder) for finder in sys.meta_path
):
    sys.meta_path.insert(0, SourceFinder())
