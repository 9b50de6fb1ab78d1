"""How the command lines of the inspector and the example devices read (private; stdlib only).

Each entry point is a module's ``main(argv=None) -> int``, run as ``python -m MODULE`` or as the
console script the project installs for it. Its ``--help`` is a short description in plain text,
a line of help for every option, and an epilog that shows the other side of the command line (the
QEMU or testpmd that connects to it) line by line, as it is typed: the parser keeps the
description's and the epilog's lines as they are written, so both are written to fit 80 columns.
Long-running jobs report progress on a terminal only (:func:`progress`), so a log or a test's
captured output stays the summary alone.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["parser", "program", "progress"]

SCRIPT_PREFIX = "virtio-schema-"
"""The console scripts' names start with this (``virtio-schema-blk``, ...)."""


def program(module: str) -> str:
    """The program name shown in usage lines: the console script's name when the process was
    started as one, else ``python -m MODULE``."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if script.startswith(SCRIPT_PREFIX) else f"python -m {module}"


def parser(module: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """An argument parser for ``module``'s command line; ``%(prog)s`` in ``description`` and
    ``epilog`` becomes the program name."""
    return argparse.ArgumentParser(
        prog=program(module),
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def progress(message: str) -> None:
    """Print one line of progress, only when standard output is a terminal."""
    if sys.stdout.isatty():
        print(message, flush=True)
