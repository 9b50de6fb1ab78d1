"""IN_ORDER (feature bit 35) on both ring formats: returns in order, batches completed with the
used entries the specification prescribes (virtio 1.2, 2.7.10.1 for split, 2.8.20 for packed)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from virtio_schema.errors import DeviceUsageError
from virtio_schema.fake_queue import FakeQueue, PackedFakeQueue, SplitFakeQueue, make_queue
from virtio_schema.queue import DescChain, OutOfOrderReturn, VirtQueue
from virtio_schema.schema import Feature, PackedDescFlags


def _take(
    fq: SplitFakeQueue | PackedFakeQueue | FakeQueue[VirtQueue, Any], n: int
) -> list[DescChain]:
    chains = []
    for _ in range(n):
        c = fq.queue.next_chain()
        assert c is not None
        chains.append(c)
    return chains


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _fq(packed: bool, size: int = 16) -> SplitFakeQueue | PackedFakeQueue:
    if packed:
        return make_queue(size, packed=True, features=Feature.IN_ORDER)
    return make_queue(size, features=Feature.IN_ORDER)


def test_in_order_is_reported_by_the_queue(packed: bool) -> None:
    assert _fq(packed).queue.in_order
    assert not make_queue(8, packed=packed).queue.in_order


def test_out_of_order_return_is_a_device_usage_error_and_the_chain_stays_held(
    packed: bool,
) -> None:
    fq = _fq(packed)
    for _ in range(3):
        fq.driver.publish([b"x"], [4])
    first, second, third = _take(fq, 3)
    with pytest.raises(OutOfOrderReturn, match="returned before chain") as err:
        second.return_written(0)
    assert isinstance(err.value, DeviceUsageError)
    assert err.value.expected == first.head
    assert not second.returned
    for c in (first, second, third):  # in order, it works
        c.return_written(1)
    assert [u.head for u in fq.driver.used()] == [first.head, second.head, third.head]


def test_without_in_order_any_return_order_is_fine(packed: bool) -> None:
    fq = make_queue(8, packed=packed)
    for _ in range(2):
        fq.driver.publish([b"x"], [4])
    a, b = _take(fq, 2)
    b.return_written(0)
    a.return_written(0)
    assert [u.head for u in fq.driver.used()] == [b.head, a.head]


def test_split_batch_completes_a_run_with_one_used_element_at_its_last_slot() -> None:
    fq = make_queue(8, features=Feature.IN_ORDER)
    heads = [fq.driver.publish([b"x"], [4]) for _ in range(4)]
    chains = _take(fq, 4)
    used_elems = fq.driver.used_ring
    with fq.queue.batch():
        for c in chains:
            c.return_written(0)
    # one element, the last chain's id, at the run's last slot; used.idx moved by the run
    assert fq.driver.used_ring.idx() == 4
    last = used_elems.elem(3)
    assert (last.id, last.len) == (heads[3], 0)
    for slot in range(3):
        assert used_elems.elem(slot).id != heads[slot] or (heads[slot] == 0 and slot == 0)
    assert fq.notifier.count == 1
    assert [u.head for u in fq.driver.used()] == heads


def test_split_batch_keeps_each_written_length(packed: bool) -> None:
    """A chain that wrote bytes ends a run: its length is never lost to batching."""
    fq = _fq(packed)
    ids = [fq.driver.publish([b"x"], [8]) for _ in range(5)]
    chains = _take(fq, 5)
    lengths = [0, 3, 0, 0, 8]
    with fq.queue.batch():
        for c, n in zip(chains, lengths, strict=True):
            c.return_written(n)
    used = fq.driver.used()
    assert [u.head for u in used] == ids
    assert [u.len for u in used] == lengths


def test_packed_batch_completes_a_run_with_one_used_descriptor() -> None:
    fq = make_queue(8, packed=True, features=Feature.IN_ORDER)
    ids = [fq.driver.publish([b"x"], [4]) for _ in range(3)]  # 2 slots each
    chains = _take(fq, 3)
    with fq.queue.batch():
        for c in chains:
            c.return_written(0)
    ring = fq.driver.ring
    used_bits = int(PackedDescFlags.AVAIL | PackedDescFlags.USED)
    # one used descriptor at slot 0 naming the last id; the slots after it stay as the driver left
    # them (available on this lap), and the device's used position moved by all 6 slots
    assert ring.get(0).id == ids[2]
    assert ring.flags(0) & used_bits == used_bits
    for slot in (2, 4):
        assert ring.flags(slot) & used_bits == int(PackedDescFlags.AVAIL)
    assert fq.queue.state().next_used == 6
    assert [u.head for u in fq.driver.used()] == ids


def test_batch_publishes_once_and_notifies_once(packed: bool) -> None:
    fq = make_queue(16, packed=packed)
    for _ in range(6):
        fq.driver.publish([b"x"], [4])
    chains = _take(fq, 6)
    with fq.queue.batch():
        for c in chains:
            c.return_written(2)
        assert fq.driver.used() == []  # nothing published inside the block
    assert len(fq.driver.used()) == 6
    assert fq.notifier.count == 1


def test_nested_batches_publish_at_the_outer_end(packed: bool) -> None:
    fq = make_queue(8, packed=packed)
    for _ in range(2):
        fq.driver.publish([b"x"], [4])
    a, b = _take(fq, 2)
    with fq.queue.batch():
        with fq.queue.batch():
            a.return_written(0)
        assert fq.driver.used() == []
        b.return_written(0)
    assert len(fq.driver.used()) == 2


def test_batch_on_a_queue_that_broke_inside_publishes_nothing() -> None:
    fq = make_queue(8)
    fq.driver.publish([b"x"], [4])
    (c,) = _take(fq, 1)
    before = bytes(fq.memory.buffers[0])
    with fq.queue.batch():
        c.return_written(0)
        fq.driver.set_avail_idx(100)  # an index jump breaks the ring
        with pytest.raises(Exception, match="broken"):
            fq.queue.next_chain()
    after = bytes(fq.memory.buffers[0])
    # only the driver's own avail.idx write differs
    diff = [i for i in range(len(before)) if before[i] != after[i]]
    avail_idx_at = fq.driver.avail_addr - fq.memory.memory.regions[0].start + 2
    assert set(diff) <= {avail_idx_at, avail_idx_at + 1}
    assert struct.unpack_from("<H", after, avail_idx_at)[0] == 100
