"""Sphinx configuration for virtio_schema's documentation."""

from __future__ import annotations

import virtio_schema

project = "virtio_schema"
release = version = virtio_schema.__version__  # written once, in virtio_schema/__init__.py
author = "virtio_schema developers"
copyright = "2026, virtio_schema developers"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.doctest"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# undoc-members: a name in a module's __all__ is public API and is listed even without a docstring
# (tests/test_api_reference.py checks that each one is).
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_type_aliases = {"ReadBuffer": "ReadBuffer", "WriteBuffer": "WriteBuffer"}
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
suppress_warnings = ["ref.python"]  # builtin ``type`` in signatures vs record fields named ``type``
