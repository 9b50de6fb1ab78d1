#!/usr/bin/env python3
"""atheris target: raw ring memory plus device operations (virtio_schema.testing.fuzz).

Run it through ``fuzz/run.py`` (which bounds the time and summarises), or directly with libFuzzer
flags: ``python fuzz/fuzz_queue.py -max_total_time=60 WORKDIR fuzz/corpus/queue``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["virtio_schema"]):
    from virtio_schema.testing.fuzz import run_queue_case


def test_one_input(data: bytes) -> None:
    run_queue_case(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
