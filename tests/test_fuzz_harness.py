"""The fuzz harness: the seed corpus and every saved finding replay cleanly, and the harness can
actually catch a broken promise (it is not a test that cannot fail)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_schema.mem import DriverMem
from virtio_schema.queue import (
    DescChain,
    DriverNotify,
    QueueMemory,
    QueueState,
    RingError,
    VirtQueue,
    create_queue,
)
from virtio_schema.testing import fuzz
from virtio_schema.testing.fuzz import FuzzedQueue, InvariantViolation, run_queue_case

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
SPLIT_BASIC = (FUZZ / "corpus" / "queue" / "split-basic.bin").read_bytes()
SPLIT_JUMP = (FUZZ / "corpus" / "queue" / "split-jump.bin").read_bytes()
POP, RETURN_ALL = 0, 10  # harness operations (virtio_schema.testing.fuzz)
CASES = sorted((FUZZ / "corpus" / "queue").glob("*.bin")) + sorted((FUZZ / "regressions").glob("*"))


def test_the_corpus_and_the_regressions_exist() -> None:
    assert any(p.parent.name == "queue" for p in CASES)
    assert any(p.parent.name == "regressions" for p in CASES)


@pytest.mark.parametrize("path", CASES, ids=[p.name for p in CASES])
def test_saved_input_keeps_every_invariant(path: Path) -> None:
    run_queue_case(path.read_bytes())


def test_seed_with_well_formed_chains_serves_them() -> None:
    stats = run_queue_case(SPLIT_BASIC)
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


# --- the harness can fail: real queues behind wrappers that break one promise each -------------


class Delegating:
    """A queue that forwards every call the harness makes to a real one (its subclasses break one
    promise each: the harness must notice)."""

    def __init__(self, inner: VirtQueue, memory: QueueMemory) -> None:
        self.inner = inner
        self.memory = memory

    @property
    def broken(self) -> RingError | None:
        return self.inner.broken

    @property
    def descriptors_read(self) -> int:
        return self.inner.descriptors_read

    def next_chain(self) -> DescChain | None:
        return self.inner.next_chain()

    def pending(self) -> int:
        return self.inner.pending()

    def disable_notifications(self) -> None:
        self.inner.disable_notifications()

    def enable_notifications(self) -> bool:
        return self.inner.enable_notifications()

    def reset(self) -> None:
        self.inner.reset()

    def restore(self, state: QueueState) -> None:
        self.inner.restore(state)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self.inner.batch():
            yield


def factory(wrapper: type[Delegating]) -> fuzz.QueueFactory:
    """The harness's ``make_queue``: the real queue, behind ``wrapper``."""

    def make(
        memory: QueueMemory,
        size: int,
        driver_mem: DriverMem,
        *,
        features: int,
        notify: DriverNotify,
        state: QueueState | None = None,
    ) -> FuzzedQueue:
        inner = create_queue(
            memory, size, driver_mem, features=features, notify=notify, state=state
        )
        return wrapper(inner, memory)

    return make


class ScribblesAfterAReturn(Delegating):
    """Publishes a batch of returns, then writes a byte of the descriptor table (which a split
    queue never writes)."""

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self.inner.batch():
            yield
        view = self.memory.desc.view
        view[0] ^= 0xFF


class ReadsTooMuch(Delegating):
    """Reports ``size + 3`` descriptors more than the real walk read for each ``next_chain``."""

    def __init__(self, inner: VirtQueue, memory: QueueMemory) -> None:
        super().__init__(inner, memory)
        self.extra = 0

    @property
    def descriptors_read(self) -> int:
        return self.inner.descriptors_read + self.extra

    def next_chain(self) -> DescChain | None:
        self.extra += self.inner.size + 3
        return self.inner.next_chain()


class WritesWhileBroken(Delegating):
    """Writes its used ring (which it may do while it works) on a call after it broke."""

    def next_chain(self) -> DescChain | None:
        if self.inner.broken is not None:
            view = self.memory.used.view
            view[0] ^= 0xFF
        return self.inner.next_chain()


def test_the_real_queue_behind_a_wrapper_keeps_every_invariant() -> None:
    """The wrappers below differ from the real queue only where they break a promise."""
    stats = run_queue_case(SPLIT_BASIC, make_queue=factory(Delegating))
    assert (stats.chains, stats.returned) == (3, 3)
    stats = run_queue_case(
        SPLIT_BASIC[: 6 + fuzz.MEM_SIZE] + bytes([POP, POP, RETURN_ALL]),
        make_queue=factory(Delegating),
    )
    assert (stats.chains, stats.returned) == (2, 2)


def test_the_harness_catches_a_write_outside_the_allowed_memory() -> None:
    case = SPLIT_BASIC[: 6 + fuzz.MEM_SIZE] + bytes([POP, POP, RETURN_ALL])
    with pytest.raises(InvariantViolation, match=f"op 10: byte {fuzz.MEM_BASE:#x} changed outside"):
        run_queue_case(case, make_queue=factory(ScribblesAfterAReturn))


def test_the_harness_catches_unbounded_descriptor_reads() -> None:
    with pytest.raises(InvariantViolation, match=r"next_chain read \d+ descriptors"):
        run_queue_case(SPLIT_BASIC, make_queue=factory(ReadsTooMuch))


def test_the_harness_catches_a_write_by_a_broken_queue() -> None:
    """split-jump: the first pop breaks the queue (an avail index jump), the second finds it
    broken."""
    used = fuzz.MEM_BASE + fuzz.USED_OFF
    with pytest.raises(InvariantViolation, match=f"op 0: byte {used:#x} changed outside"):
        run_queue_case(SPLIT_JUMP, make_queue=factory(WritesWhileBroken))
