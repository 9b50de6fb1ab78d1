"""The fuzz harness: the seed corpus and every saved finding replay cleanly, and the harness can
actually catch a broken promise (it is not a test that cannot fail)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_schema.queue import Queue
from virtio_schema.testing import fuzz
from virtio_schema.testing.fuzz import InvariantViolation, run_queue_case

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
CASES = sorted((FUZZ / "corpus" / "queue").glob("*.bin")) + sorted((FUZZ / "regressions").glob("*"))


def test_the_corpus_and_the_regressions_exist() -> None:
    assert any(p.parent.name == "queue" for p in CASES)
    assert any(p.parent.name == "regressions" for p in CASES)


@pytest.mark.parametrize("path", CASES, ids=[p.name for p in CASES])
def test_saved_input_keeps_every_invariant(path: Path) -> None:
    run_queue_case(path.read_bytes())


def test_seed_with_well_formed_chains_serves_them() -> None:
    stats = run_queue_case((FUZZ / "corpus" / "queue" / "split-basic.bin").read_bytes())
    assert stats.chains == 3
    assert stats.malformed == 0
    assert stats.returned == 3


def test_seed_with_malformed_chains_returns_them_all() -> None:
    stats = run_queue_case((FUZZ / "corpus" / "queue" / "split-malformed.bin").read_bytes())
    assert stats.malformed == 4
    assert stats.returned == 4
    assert not stats.broken


@settings(max_examples=300)
@given(st.binary(max_size=fuzz.MEM_SIZE + 200))
def test_any_input_keeps_every_invariant(data: bytes) -> None:
    run_queue_case(data)


def test_the_harness_catches_a_write_outside_the_allowed_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = Queue._publish_used

    def leaky(self: Queue, head: int, written: int, slots: int = 1) -> None:
        real(self, head, written, slots)
        struct.pack_into("<B", self._desc_view, 0, 0xEE)  # scribble on the descriptor table

    monkeypatch.setattr(Queue, "_publish_used", leaky)
    with pytest.raises(InvariantViolation, match="changed outside"):
        run_queue_case((FUZZ / "corpus" / "queue" / "split-basic.bin").read_bytes())


def test_the_harness_catches_unbounded_descriptor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Queue._walk

    def greedy(self: Queue, head: int):  # type: ignore[no-untyped-def]
        for _ in range(self.size + 3):
            self._unpack_desc(self._desc_view, 0)
        return real(self, head)

    monkeypatch.setattr(Queue, "_walk", greedy)
    with pytest.raises(InvariantViolation, match="descriptors"):
        run_queue_case((FUZZ / "corpus" / "queue" / "split-basic.bin").read_bytes())
