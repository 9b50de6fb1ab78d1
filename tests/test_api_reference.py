"""docs/api.rst is the whole public API: every public module, and every name in its ``__all__``.

A public module is one of the package whose dotted name has no part starting with ``_``; each must
say what it exports with ``__all__``. The reference documents a module with ``.. automodule::``
(``docs/conf.py`` turns on ``members`` and ``undoc-members`` for all of them).

Whether a name is *rendered* is decided by autodoc, not by the page's text: autodoc drops a module
constant that has no doc comment in the module it documents, whatever the options say. So the
test does not read the page for names: it builds the documentation with Sphinx's ``dummy`` builder
(every page read, autodoc run, nothing written) in a child process, and takes the Python domain's
objects, the names the reference actually documents. A name of ``__all__`` counts as documented
under its own module (``virtio_schema.queue.Queue``), or, for a constant a package re-exports
from one of its modules (``virtio_schema.schema.Descriptor``), under that module with the same
name and the same object (autodoc shows module data only where its doc comment is). Building
takes about 20 s, once for the whole file.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest

import virtio_schema

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "api.rst"

# Run in a child process: Sphinx imports every module again and must not share this interpreter's
# warning filters (the suite turns warnings into errors) or module state.
_BUILD = """
import json, sys
from sphinx.application import Sphinx
from sphinx.util.console import nocolor

nocolor()
docs, out = sys.argv[1], sys.argv[2]
app = Sphinx(docs, docs, out + "/out", out + "/doctrees", "dummy",
             status=None, warning=sys.stderr, freshenv=True)
app.build()
domain = app.env.get_domain("py")
print(json.dumps({"modules": sorted(domain.modules), "objects": sorted(domain.objects)}))
"""


def _public_modules() -> dict[str, ModuleType]:
    """Every public module of the package, the package itself included, imported."""
    names = ["virtio_schema"] + [
        info.name
        for info in pkgutil.walk_packages(virtio_schema.__path__, "virtio_schema.")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    return {name: importlib.import_module(name) for name in sorted(names)}


def _exports(module: ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    assert names is not None, f"{module.__name__} has no __all__"
    return [str(name) for name in names]


def _automodules() -> list[str]:
    """The modules the page documents, in its order."""
    return re.findall(r"^\.\. automodule:: (\S+)\s*$", API.read_text(), flags=re.MULTILINE)


class Rendered(NamedTuple):
    modules: set[str]
    """The modules documented."""
    objects: set[str]
    """The full names of everything documented."""
    warnings: str
    """What the build reported."""


# The reference documents the source: in the compiled pass too, the build imports the pure-Python
# kernel (the names exported are the same; autodoc reads native classes less well).
_PURE = {**os.environ, "VIRTIO_SCHEMA_PURE_PYTHON": "1"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """The Python domain of the built documentation."""
    out = tmp_path_factory.mktemp("docs")
    result = subprocess.run(
        [sys.executable, "-c", _BUILD, str(DOCS), str(out)],
        cwd=ROOT, env=_PURE, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    domain: dict[str, list[str]] = json.loads(result.stdout)
    return Rendered(set(domain["modules"]), set(domain["objects"]), result.stderr)


def test_every_public_module_says_what_it_exports_with_all() -> None:
    without = [name for name, module in _public_modules().items() if not hasattr(module, "__all__")]
    assert without == [], "public modules without __all__"


def test_every_public_module_is_in_the_api_reference_and_only_those() -> None:
    documented = _automodules()
    assert len(documented) == len(set(documented)), "a module documented twice"
    public = set(_public_modules())
    assert sorted(public - set(documented)) == [], "public modules missing from docs/api.rst"
    assert sorted(set(documented) - public) == [], "docs/api.rst documents what is not public"


def test_every_module_of_the_page_is_rendered(rendered: Rendered) -> None:
    assert sorted(set(_automodules()) - rendered.modules) == []


def test_no_name_is_documented_twice(rendered: Rendered) -> None:
    # An explicit ``autodata`` below a constant that has since got a doc comment, or a class of a
    # private module re-exported by two documented ones (``DeviceRange``).
    assert "duplicate object description" not in rendered.warnings, rendered.warnings


def test_every_name_in_all_is_rendered_in_the_api_reference(rendered: Rendered) -> None:
    objects = rendered.objects
    exports = {
        name: {export: getattr(module, export) for export in _exports(module)}
        for name, module in _public_modules().items()
    }

    def documented(module: str, name: str) -> bool:
        if f"{module}.{name}" in objects:
            return True
        value = exports[module][name]
        return any(
            other != module
            and name in names
            and names[name] is value
            and f"{other}.{name}" in objects
            for other, names in exports.items()
        )

    missing = [
        f"{module}.{name}"
        for module, names in exports.items()
        for name in names
        if not documented(module, name)
    ]
    assert missing == [], (
        "names in __all__ the reference does not render (a module constant needs a `#:` doc comment"
        " or an explicit `.. autodata::` in docs/api.rst)"
    )


def test_the_stability_statement_names_only_public_modules() -> None:
    text = API.read_text()
    section = text.split("\nWhich API is stable\n", 1)[1].split("\nCore API\n", 1)[0]
    named = set(re.findall(r":mod:`(virtio_schema[\w.]*)`", section))
    assert "virtio_schema" in named
    assert sorted(named - set(_public_modules())) == []
