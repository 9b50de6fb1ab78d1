"""The memory-ordering points of both queue formats.

What a driver relies on, on every CPU and in both variants of the kernel: when it is notified, the
used entry and the store that publishes it (``used.idx``; packed: the descriptor's flags) are
already in memory. A notifier that records what the driver's side of memory holds when it is
called checks that with no patching at all.

Where the barriers sit, on a CPU that needs them. On x86-64 (:data:`~virtio_schema.mem.STRONG_ORDER`)
the queues skip the calls to the read and write barriers, which do nothing there; on a weakly
ordered CPU they must happen at the points the specification names. The tests of the second half
make the queue modules believe they run on such a CPU (patching the module globals the queue code
calls) and record what the driver's side of memory holds at each barrier:

* the read barrier comes after the queue saw a chain published, before it read the chain (and only
  then: no chain, no barrier);
* the write barrier comes after the used entry (split) or used descriptor's id and length (packed)
  and before the store that publishes it (``used.idx``, the descriptor's flags);
* the full barrier comes after that store, before the notification decision reads the driver's
  side; on packed rings that read is one load of the whole driver event area.

The compiled kernel calls the barrier functions directly (mypyc binds calls between compiled
modules when it builds them), so no patch reaches them: the second half checks the source the
compiled modules are built from, and is skipped on the compiled variant.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import virtio_schema
import virtio_schema.queue.packed as packed_mod
import virtio_schema.queue.split as split_mod
from virtio_schema.fake_queue import FakeDriver, FakePackedDriver, FakeQueue, make_queue
from virtio_schema.queue import VirtQueue, create_queue
from virtio_schema.schema import EventFlags, Feature, PackedDescFlags

Event = tuple[str, object]
USED_FLAGS = int(PackedDescFlags.AVAIL | PackedDescFlags.USED)


# --- what the driver sees when it is notified (both variants) -------------------------------------


class Seen:
    """A notifier that records what ``look()`` returns each time the queue notifies."""

    def __init__(self, look: Callable[[], object]) -> None:
        self.look = look
        self.calls: list[object] = []

    def notify(self) -> None:
        self.calls.append(self.look())


def notified(packed: bool) -> tuple[FakeQueue[VirtQueue, FakeDriver | FakePackedDriver], Seen]:
    """A fake driver and a queue on its rings whose notifier records, at each notification, the
    used entries the driver can see: split ``(used.idx, [(id, len) of each entry below it])``,
    packed ``[(id, len) of each slot whose flags say used]`` (all in the driver's first lap)."""
    fq = make_queue(8, packed=packed)
    d = fq.driver

    def look() -> object:
        if isinstance(d, FakePackedDriver):
            used = [k for k in range(d.size) if d.ring.flags(k) & USED_FLAGS == USED_FLAGS]
            return [(d.ring.get(k).id, d.ring.get(k).len) for k in used]
        idx = d.used_idx
        return idx, [(d.used_ring.elem(k).id, d.used_ring.elem(k).len) for k in range(idx)]

    seen = Seen(look)
    queue = create_queue(
        d.queue_memory(), d.size, fq.memory, features=d.features, notify=seen, state=None
    )
    return FakeQueue(queue, d, fq.memory, fq.notifier), seen


BOTH = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


@BOTH
def test_the_driver_is_notified_after_the_used_entry_is_published(packed: bool) -> None:
    fq, seen = notified(packed)
    head = fq.driver.publish([b"request"], [16])
    assert head is not None
    chain = fq.queue.next_chain()
    assert chain is not None
    chain.return_written(5)
    assert seen.calls == [[(head, 5)] if packed else (1, [(head, 5)])]


@BOTH
def test_a_batch_notifies_once_after_every_used_entry_is_published(packed: bool) -> None:
    fq, seen = notified(packed)
    heads = [fq.driver.publish([bytes([k])], [4]) for k in range(3)]
    with fq.queue.batch():
        while (chain := fq.queue.next_chain()) is not None:
            chain.return_written(1)
            assert seen.calls == []
    used = [(head, 1) for head in heads]
    assert seen.calls == [used if packed else (3, used)]


# --- where the barriers are, on a weakly ordered CPU (pure-Python variant) ---------------------------

weak_cpu_source = pytest.mark.skipif(
    virtio_schema.COMPILED,
    reason="the compiled queues call the barrier functions directly: no patch reaches them",
)


def _weak_cpu(
    monkeypatch: pytest.MonkeyPatch, module: object, seen: Callable[[], object]
) -> list[Event]:
    """Patch ``module`` (a queue format) as on a weakly ordered CPU; each barrier call appends
    its name and what ``seen()`` returns at that moment."""
    events: list[Event] = []
    monkeypatch.setattr(module, "STRONG_ORDER", False)
    for name in ("read_barrier", "write_barrier", "full_barrier"):
        monkeypatch.setattr(module, name, lambda name=name: events.append((name, seen())))
    return events


@weak_cpu_source
def test_split_barriers_on_a_weakly_ordered_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fq = make_queue(8)
    d, q = fq.driver, fq.queue

    def seen() -> tuple[int, int, int]:
        # used.idx, and the first used element (id, len), as the driver would read them
        elem = d.used_ring.elem(0)
        return d.used_idx, elem.id, elem.len

    events = _weak_cpu(monkeypatch, split_mod, seen)
    assert q.next_chain() is None
    assert events == []  # nothing published: no read barrier either
    d.used_ring.set_elem(0, 0xFFFF, 0xFFFF)  # poison the slot the device will fill
    head = d.publish([b"request"], [16])
    assert head is not None
    chain = q.next_chain()
    assert chain is not None
    assert [name for name, _ in events] == ["read_barrier"]
    chain.return_written(5)
    assert events[1:] == [
        ("write_barrier", (0, head, 5)),  # the element written, used.idx not yet
        ("full_barrier", (1, head, 5)),  # used.idx published before the decision reads
    ]
    assert [(u.head, u.len) for u in d.used()] == [(head, 5)]


@weak_cpu_source
def test_packed_barriers_on_a_weakly_ordered_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fq = make_queue(8, packed=True)
    d, q = fq.driver, fq.queue

    def seen() -> tuple[bool, int, int]:
        # is slot 0 marked used yet, and its id and len, as the driver would read them
        desc = d.ring.get(0)
        return d.ring.flags(0) & USED_FLAGS == USED_FLAGS, desc.id, desc.len

    events = _weak_cpu(monkeypatch, packed_mod, seen)
    assert q.next_chain() is None
    assert events == []
    buf_id = d.publish([b"request"], [16])
    assert buf_id is not None
    chain = q.next_chain()
    assert chain is not None
    assert [name for name, _ in events] == ["read_barrier"]
    chain.return_written(5)
    assert events[1:] == [
        ("write_barrier", (False, buf_id, 5)),  # id and len written, flags not yet
        ("full_barrier", (True, buf_id, 5)),  # the flags published before the decision reads
    ]
    assert [(u.head, u.len) for u in d.used()] == [(buf_id, 5)]


@weak_cpu_source
@BOTH
def test_batched_returns_take_the_write_barrier_once(
    monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    fq = make_queue(8, packed=packed)
    events = _weak_cpu(monkeypatch, packed_mod if packed else split_mod, lambda: None)
    for _ in range(3):
        assert fq.driver.publish([b"x"], [4]) is not None
    with fq.queue.batch():
        while (chain := fq.queue.next_chain()) is not None:
            chain.return_written(1)
    names = [name for name, _ in events]
    assert names.count("read_barrier") == 3
    # split: one barrier before used.idx; packed: one per used descriptor (each has its flags)
    assert names.count("write_barrier") == (3 if packed else 1)
    assert names[-1] == "full_barrier"
    assert names.count("full_barrier") == 1
    assert len(fq.driver.used()) == 3


@weak_cpu_source
def test_packed_decision_reads_the_driver_event_area_in_one_load_after_the_fence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With EVENT_IDX the decision needs the area's flags and offset from the same moment: it
    reads the 4-byte area once, as one word, and only after the full barrier."""
    fq = make_queue(8, packed=True, features=int(Feature.EVENT_IDX))
    d, q = fq.driver, fq.queue
    events = _weak_cpu(monkeypatch, packed_mod, lambda: None)
    words = q._drv_event

    class Recording:
        def __getitem__(self, k: int) -> int:
            events.append(("area read", k))
            return words[k]

    monkeypatch.setattr(q, "_drv_event", Recording())
    d.set_driver_event(0x8000 | 2, int(EventFlags.DESC))  # notify once slot 2 is used
    for _ in range(2):
        assert d.publish([b"x"], [4]) is not None
    for k in range(2):
        chain = q.next_chain()
        assert chain is not None
        events.clear()
        chain.return_written(1)
        assert [name for name, _ in events] == ["write_barrier", "full_barrier", "area read"]
        assert events[-1] == ("area read", 0)
        assert fq.notifier.count == k + 1  # the first decision after a start, then the event
