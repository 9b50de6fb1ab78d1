"""Tests of :mod:`virtio_schema.fake_queue`: the fake memory, the fake driver and the harness.

What a device test relies on here: :class:`FakeMemory` hands out aligned, zeroed, never-overlapping
blocks, gets every byte back on ``free`` (so long tests do not run out), and can place a buffer
across two adjacent regions; :class:`FakeDriver` publishes chains like a well-behaved driver, says
``None`` instead of overfilling the ring, and reads back exactly what the device reported (heads,
used lengths, the written bytes); its notification helpers follow the specification's suppression
rules, with and without EVENT_IDX.
"""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_schema.chain import ReadableChain, WritableChain
from virtio_schema.errors import DeviceUsageError
from virtio_schema.fake_queue import (
    FakeDriver,
    FakeMemory,
    FakeMemoryFull,
    SplitFakeQueue,
    UsedChain,
    make_queue,
)
from virtio_schema.mem import DriverRange
from virtio_schema.queue import DescChain, QueueState, create_queue
from virtio_schema.ring import DESC, Desc
from virtio_schema.schema import AvailFlags, DescFlags, Feature
from virtio_schema.util import NotificationCounter

BASE = 0x10000
SIZE = 0x1000


def take(fq: SplitFakeQueue) -> DescChain:
    chain = fq.queue.next_chain()
    assert chain is not None
    return chain


# --- FakeMemory: the allocator -------------------------------------------------------------------


@pytest.mark.parametrize("align", [1, 2, 8, 16, 64, 256, 4096])
def test_alloc_is_aligned(align: int) -> None:
    mem = FakeMemory(SIZE * 4)
    mem.alloc(3, 1)  # leave the next free byte unaligned
    addr = mem.alloc(10, align)
    assert addr % align == 0
    assert BASE <= addr <= BASE + SIZE * 4 - 10


def test_alloc_default_alignment_is_16() -> None:
    mem = FakeMemory(SIZE)
    mem.alloc(1)
    assert mem.alloc(1) % 16 == 0


def test_alloc_returns_zeroed_memory_even_after_reuse() -> None:
    mem = FakeMemory(SIZE)
    addr = mem.alloc(32)
    mem.write(addr, b"\xff" * 32)
    mem.free(addr)
    again = mem.alloc(32)
    assert again == addr
    assert mem.read(again, 32) == bytes(32)


def test_zero_sized_allocations_are_distinct() -> None:
    mem = FakeMemory(SIZE)
    a = mem.alloc(0, 1)
    b = mem.alloc(0, 1)
    assert a != b
    assert mem.allocated == 2
    mem.free(a)
    mem.free(b)
    assert mem.allocated == 0


def test_fake_memory_full_when_exhausted() -> None:
    mem = FakeMemory(SIZE)
    blocks = [mem.alloc(256, 256) for _ in range(SIZE // 256)]
    assert sorted(blocks) == list(range(BASE, BASE + SIZE, 256))
    with pytest.raises(FakeMemoryFull) as info:
        mem.alloc(1, 1)
    assert isinstance(info.value, DeviceUsageError)
    mem.free(blocks[3])
    assert mem.alloc(256, 1) == blocks[3]


def test_too_big_or_unalignable_alloc_raises_fake_memory_full() -> None:
    mem = FakeMemory(SIZE)
    with pytest.raises(FakeMemoryFull):
        mem.alloc(SIZE + 1, 1)
    mem.alloc(1, 1)
    with pytest.raises(FakeMemoryFull):
        mem.alloc(SIZE - 1, 0x2000)  # the only aligned start (BASE) is taken
    assert mem.allocated == 1


def test_free_merges_so_the_whole_memory_can_be_reused() -> None:
    mem = FakeMemory(SIZE)
    blocks = [mem.alloc(100, 4) for _ in range(20)]
    for addr in blocks[::2] + blocks[1::2]:  # free in an order that needs merging both ways
        mem.free(addr)
    assert mem.allocated == 0
    assert mem.alloc(SIZE, 1) == BASE


def test_free_of_unknown_address_or_double_free_raises() -> None:
    mem = FakeMemory(SIZE)
    addr = mem.alloc(16)
    with pytest.raises(DeviceUsageError):
        mem.free(addr + 1)
    mem.free(addr)
    with pytest.raises(DeviceUsageError):
        mem.free(addr)
    with pytest.raises(DeviceUsageError):
        mem.free(0x10)  # not in fake memory at all


def test_alloc_in_a_given_region() -> None:
    mem = FakeMemory(regions=[(0x40000, SIZE), (0x10000, SIZE)])
    assert mem.alloc(8, region=0) == 0x10000  # regions are sorted by address
    assert mem.alloc(8, region=1) == 0x40000


ALIGNS = [1, 2, 4, 8, 16, 64, 256]
alloc_ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 700), st.sampled_from(ALIGNS)),
        st.tuples(st.just("free"), st.integers(0, 1000), st.just(0)),
    ),
    max_size=80,
)


def fits_somewhere(live: dict[int, int], size: int, align: int) -> bool:
    """Whether a free gap of ``[BASE, BASE+SIZE)`` holds ``size`` bytes at an aligned start."""
    pos = BASE
    for start in [*sorted(live), BASE + SIZE]:
        aligned = -(-pos // align) * align
        if aligned + max(size, 1) <= start:
            return True
        if start < BASE + SIZE:
            pos = start + live[start]
    return False


@settings(max_examples=100, deadline=None)
@given(ops=alloc_ops)
def test_allocations_never_overlap_and_all_memory_comes_back(
    ops: list[tuple[str, int, int]],
) -> None:
    mem = FakeMemory(SIZE)
    live: dict[int, int] = {}  # addr -> reserved bytes
    for op, a, b in ops:
        if op == "alloc":
            size, align = a, b
            try:
                addr = mem.alloc(size, align)
            except FakeMemoryFull:
                assert not fits_somewhere(live, size, align)
                continue
            need = max(size, 1)
            assert addr % align == 0
            assert addr >= BASE
            assert addr + need <= BASE + SIZE
            for other, n in live.items():
                assert addr + need <= other or other + n <= addr
            assert mem.read(addr, size) == bytes(size)
            mem.write(addr, b"\xa5" * size)  # dirty it: a later block must come back zeroed
            live[addr] = need
        elif live:
            addr = sorted(live)[a % len(live)]
            mem.free(addr)
            del live[addr]
        assert mem.allocated == sum(live.values())
    for addr in live:
        mem.free(addr)
    assert mem.allocated == 0
    assert mem.alloc(SIZE, 1) == BASE


# --- FakeMemory: adjacent regions ----------------------------------------------------------------


def two_regions() -> FakeMemory:
    return FakeMemory(regions=[(BASE, SIZE), (BASE + SIZE, SIZE)])


def test_alloc_at_spans_adjacent_regions_and_read_write_cross_them() -> None:
    mem = two_regions()
    addr = mem.alloc_at(BASE + SIZE - 8, 16)
    assert addr == BASE + SIZE - 8
    assert mem.allocated == 16
    mem.write(addr, b"0123456789abcdef")
    assert mem.read(addr, 16) == b"0123456789abcdef"
    assert mem.buffers[0][-8:] == b"01234567"
    assert mem.buffers[1][:8] == b"89abcdef"
    # a translation never spans two regions: the chain layer splits such buffers
    assert mem.translate(DriverRange(addr, addr + 16)) is None
    low = mem.translate(DriverRange(addr, addr + 8))
    assert low is not None
    assert bytes(low.view) == b"01234567"
    mem.free(addr)
    assert mem.allocated == 0
    assert mem.alloc_at(addr, 16) == addr  # both pieces were given back


def test_alloc_at_overlapping_an_allocation_raises_and_reserves_nothing() -> None:
    mem = two_regions()
    taken = mem.alloc_at(BASE + SIZE + 4, 4)
    with pytest.raises(DeviceUsageError):
        mem.alloc_at(BASE + SIZE - 8, 16)  # first piece fits, second overlaps
    assert mem.allocated == 4
    mem.free(taken)
    assert mem.alloc_at(BASE + SIZE - 8, 16) == BASE + SIZE - 8


def test_alloc_at_outside_memory_raises() -> None:
    mem = two_regions()
    with pytest.raises(DeviceUsageError):
        mem.alloc_at(BASE + 2 * SIZE - 4, 8)  # runs past the last region
    assert mem.allocated == 0
    with pytest.raises(DeviceUsageError):
        mem.alloc_at(0x100, 8)


def test_read_write_outside_memory_raise() -> None:
    mem = two_regions()
    with pytest.raises(DeviceUsageError):
        mem.read(BASE + 2 * SIZE - 4, 8)
    with pytest.raises(DeviceUsageError):
        mem.write(BASE - 1, b"xx")


def test_fake_memory_close() -> None:
    mem = FakeMemory(SIZE)
    mem.close()
    assert mem.memory.closed


def test_fake_memory_over_a_borrowed_mmap_allocates_in_it_and_leaves_it_to_its_owner() -> None:
    with mmap.mmap(-1, SIZE) as mm:
        mm[:] = b"\xaa" * SIZE
        mem = FakeMemory.over([(BASE, mm)])
        assert mem.buffers == []
        addr = mem.alloc_buffer(b"data")
        assert BASE <= addr < BASE + SIZE
        assert mm[addr - BASE : addr - BASE + 4] == b"data"
        zeroed = mem.alloc(8)
        assert mm[zeroed - BASE : zeroed - BASE + 8] == bytes(8)
        mem.close()
        assert not mm.closed  # the owner closes it, which works: no view is left exported


def test_copy_allocations_lets_a_remapped_driver_take_back_chains_in_flight() -> None:
    old = FakeMemory(1 << 16)
    driver = FakeDriver(old, 8)
    baseline = old.allocated
    head = driver.publish([b"req"], [4])
    assert head is not None
    new = FakeMemory(1 << 16)
    new.buffers[0][:] = old.buffers[0]
    new.copy_allocations(old)
    assert new.allocated == old.allocated
    driver.remap(new)
    old.close()  # the driver holds nothing of the old memory any more
    queue = create_queue(driver.queue_memory(), 8, new, features=0, notify=NotificationCounter())
    chain = queue.next_chain()
    assert chain is not None
    with ReadableChain(chain) as r:
        assert r.read() == b"req"
        with r.into_writable() as w:
            w.write(b"done")
    assert driver.used() == [UsedChain(head, 4, (b"done",))]
    assert new.allocated == baseline  # the buffers went back to the new memory's allocator


def test_copy_allocations_from_other_regions_raises() -> None:
    with pytest.raises(DeviceUsageError, match="other regions"):
        FakeMemory(SIZE).copy_allocations(FakeMemory(2 * SIZE))


# --- FakeDriver: publishing ----------------------------------------------------------------------


def test_publish_returns_none_when_no_descriptors_are_free() -> None:
    fq = make_queue(4, memory=FakeMemory(1 << 16))
    driver = fq.driver
    first = driver.publish([b"abc"], [2, 2])
    assert first is not None
    assert driver.free_descriptors == 1
    assert driver.publish([b"x"], [1]) is None  # needs two
    assert driver.in_flight == 1
    second = driver.publish([b"y"])
    assert second is not None
    assert driver.publish([b"z"]) is None
    assert driver.free_descriptors == 0
    with take(fq) as chain:
        assert chain.head == first
    assert driver.publish([b"z"]) is None  # returned, but the driver has not looked yet
    assert [u.head for u in driver.used()] == [first]
    assert driver.free_descriptors == 3
    assert driver.publish([b"x"], [1]) is not None
    for _ in range(2):
        take(fq).return_written(0)
    assert len(driver.used()) == 2
    assert driver.free_descriptors == 4


def test_publish_returns_none_when_the_ring_is_full() -> None:
    fq = make_queue(4, memory=FakeMemory(1 << 16))
    driver = fq.driver
    head = driver.take_descriptor()
    driver.write_desc(head, driver.alloc_buffer(b"raw"), 3, 0, 0)
    for _ in range(4):  # the same head four times: the ring is full, descriptors are free
        driver.push_head(head)
    assert driver.in_flight == 4
    assert driver.free_descriptors == 3
    assert driver.publish([b"x"]) is None
    chain = take(fq)
    chain.return_written(0)
    assert [u.head for u in driver.used()] == [head]
    assert driver.publish([b"x"]) is not None
    while (c := fq.queue.next_chain()) is not None:
        c.return_written(0)
    assert len(driver.used()) == 4


def test_indirect_chains_need_one_descriptor() -> None:
    fq = make_queue(8, features=Feature.INDIRECT_DESC, memory=FakeMemory(1 << 16))
    assert fq.driver.publish([b"a", b"b", b"c"], [1, 2, 3], indirect=True) is not None
    assert fq.driver.free_descriptors == 7
    with take(fq) as chain:
        assert len(chain) == 6
        assert all(d.indirect for d in chain)
    fq.driver.used()
    assert fq.driver.free_descriptors == 8


def test_publish_misuse_raises() -> None:
    fq = make_queue(4, memory=FakeMemory(1 << 16))
    with pytest.raises(DeviceUsageError):
        fq.driver.publish()
    with pytest.raises(DeviceUsageError):
        fq.driver.publish([b"x"], indirect=True)  # INDIRECT_DESC not negotiated
    assert fq.driver.in_flight == 0


def test_used_reports_heads_lengths_and_written_bytes_in_order() -> None:
    mem = FakeMemory(1 << 16)
    fq = make_queue(8, memory=mem)
    baseline = mem.allocated
    driver = fq.driver
    a = driver.publish([b"req-a"], [4, 8])
    b = driver.publish([], [3])
    c = driver.publish([b"req-c"])
    assert a is not None
    assert b is not None
    assert c is not None
    chains = [take(fq) for _ in range(3)]
    assert [ch.head for ch in chains] == [a, b, c]
    assert driver.used() == []
    with WritableChain(chains[1]) as w:  # returned out of order
        w.write(b"xyz")
    with ReadableChain(chains[0]) as r:
        assert r.read() == b"req-a"
        with r.into_writable() as w:
            w.write(b"0123456")
    chains[2].return_written(0)
    used = driver.used()
    assert used == [
        UsedChain(b, 3, (b"xyz",)),
        UsedChain(a, 7, (b"0123", b"456")),
        UsedChain(c, 0, ()),
    ]
    assert used[1].data == b"0123456"
    assert driver.used() == []
    assert driver.in_flight == 0
    assert driver.free_descriptors == 8
    assert mem.allocated == baseline  # buffers freed


def test_used_of_a_raw_chain_has_no_written_bytes() -> None:
    fq = make_queue(4, memory=FakeMemory(1 << 16))
    driver = fq.driver
    head = driver.take_descriptor()
    buf = driver.alloc_buffer(4)
    driver.write_desc(head, buf, 4, 2, 0)  # WRITE
    driver.push_head(head)
    with take(fq) as chain, WritableChain(chain) as w:
        w.write(b"raw!")
    assert driver.used() == [UsedChain(head, 4, ())]
    assert fq.memory.read(buf, 4) == b"raw!"


def test_raw_indirect_table_is_walked_by_the_queue() -> None:
    fq = make_queue(4, features=Feature.INDIRECT_DESC, memory=FakeMemory(1 << 16))
    driver = fq.driver
    req, resp = driver.alloc_buffer(b"raw-req"), driver.alloc_buffer(5)
    table = driver.write_indirect_table(
        [Desc(req, 7, DescFlags.NEXT, 1), Desc(resp, 5, DescFlags.WRITE, 0)]
    )
    assert table % 16 == 0
    assert fq.memory.read(table, 32) == DESC.pack(Desc(req, 7, DescFlags.NEXT, 1)) + DESC.pack(
        Desc(resp, 5, DescFlags.WRITE, 0)
    )
    head = driver.take_descriptor()
    driver.write_desc(head, table, 32, DescFlags.INDIRECT, 0)
    driver.push_head(head)
    with take(fq) as chain, ReadableChain(chain) as r:
        assert [d.indirect for d in chain] == [True, True]
        assert r.read() == b"raw-req"
        with r.into_writable() as w:
            w.write(b"reply")
    assert driver.used() == [UsedChain(head, 5, ())]
    assert fq.memory.read(resp, 5) == b"reply"


def test_driver_resumes_at_a_saved_position_across_the_wrap() -> None:
    state = QueueState(next_avail=0xFFFE, next_used=0xFFFE)
    fq = make_queue(8, state=state, memory=FakeMemory(1 << 16), index=3)
    for k in range(4):
        assert fq.driver.publish([bytes([k])], [1]) is not None
    assert fq.driver.avail_idx == 2
    for k in range(4):
        with take(fq) as chain:
            assert chain.queue_index == 3
            with ReadableChain(chain) as r:
                assert r.read() == bytes([k])
                with r.into_writable() as w:
                    w.write(bytes([k + 10]))
    assert [u.data for u in fq.driver.used()] == [b"\x0a", b"\x0b", b"\x0c", b"\x0d"]
    assert fq.driver.used_idx == 2
    assert fq.queue.state() == QueueState(2, 2)


def test_queue_memory_views_are_the_rings() -> None:
    mem = FakeMemory(1 << 16)
    driver = FakeDriver(mem, 8)
    qm = driver.queue_memory()
    assert qm.desc.driver_range == DriverRange(driver.desc_addr, driver.desc_addr + 16 * 8)
    assert qm.avail.driver_range is not None
    assert qm.avail.driver_range.start == driver.avail_addr
    assert qm.used.driver_range is not None
    assert qm.used.driver_range.start == driver.used_addr
    assert driver.desc_addr % 16 == 0
    assert driver.avail_addr % 2 == 0
    assert driver.used_addr % 4 == 0


# --- FakeDriver: notification fields -------------------------------------------------------------


def no_notify(driver: FakeDriver) -> bool:
    """``driver.no_notify``, read through a call so the type checker does not narrow it."""
    return driver.no_notify


def test_kick_needed_without_event_idx_follows_no_notify() -> None:
    fq = make_queue(8, memory=FakeMemory(1 << 16))
    driver, queue = fq.driver, fq.queue
    old = driver.avail_idx
    driver.publish([b"a"])
    assert not no_notify(driver)
    assert driver.kick_needed(old)
    queue.disable_notifications()
    assert no_notify(driver)
    old = driver.avail_idx
    driver.publish([b"b"])
    assert not driver.kick_needed(old)
    assert queue.enable_notifications() is True  # chains are waiting
    assert not no_notify(driver)
    assert driver.kick_needed(old)
    while (chain := queue.next_chain()) is not None:
        chain.return_written(0)
    assert len(driver.used()) == 2


def test_kick_needed_with_event_idx_follows_avail_event() -> None:
    fq = make_queue(8, features=Feature.EVENT_IDX, memory=FakeMemory(1 << 16))
    driver, queue = fq.driver, fq.queue
    held: list[DescChain] = []
    assert driver.avail_event == 0
    driver.publish([b"a"])
    assert driver.kick_needed(0)  # avail_event 0 is in [0, 1)
    driver.publish([b"b"])
    assert not driver.kick_needed(1)  # the device has not caught up: no second kick
    held.append(take(fq))
    assert driver.avail_event == 1
    held.append(take(fq))
    assert driver.avail_event == 2
    old = driver.avail_idx
    driver.publish([b"c"])
    assert driver.kick_needed(old)
    queue.disable_notifications()
    held.append(take(fq))
    assert driver.avail_event == 2  # no longer follows the taken index
    old = driver.avail_idx
    driver.publish([b"d"])
    assert not driver.kick_needed(old)
    assert not driver.no_notify  # EVENT_IDX suppresses through avail_event, not the flag
    assert queue.enable_notifications() is True
    assert driver.avail_event == 3
    assert driver.kick_needed(old)
    held.append(take(fq))
    for chain in held:
        chain.return_written(0)
    assert len(driver.used()) == 4


def test_set_no_interrupt_suppresses_used_notifications() -> None:
    fq = make_queue(8, memory=FakeMemory(1 << 16))
    fq.driver.publish([b"a"])
    fq.driver.publish([b"b"])
    fq.driver.set_no_interrupt(True)
    take(fq).return_written(0)
    assert fq.notifier.take() == 0
    fq.driver.set_no_interrupt(False)
    take(fq).return_written(0)
    assert fq.notifier.take() == 1
    assert len(fq.driver.used()) == 2


def test_set_avail_flags_writes_the_raw_flags() -> None:
    fq = make_queue(8, memory=FakeMemory(1 << 16))
    fq.driver.publish([b"a"])
    fq.driver.publish([b"b"])
    fq.driver.set_avail_flags(AvailFlags.NO_INTERRUPT | 0x8000)  # other bits must not matter
    assert fq.driver.avail.flags() == 0x8001
    take(fq).return_written(0)
    assert fq.notifier.take() == 0
    fq.driver.set_avail_flags(0x8000)
    take(fq).return_written(0)
    assert fq.notifier.take() == 1
    assert len(fq.driver.used()) == 2


@pytest.mark.parametrize("on", [True, False])
def test_set_no_interrupt_keeps_the_other_flag_bits(on: bool) -> None:
    fq = make_queue(8, memory=FakeMemory(1 << 16))
    fq.driver.set_avail_flags(0x8000 | (0 if on else AvailFlags.NO_INTERRUPT))
    fq.driver.set_no_interrupt(on)
    assert fq.driver.avail.flags() == 0x8000 | (AvailFlags.NO_INTERRUPT if on else 0)


def test_set_used_event_with_event_idx() -> None:
    fq = make_queue(8, features=Feature.EVENT_IDX, memory=FakeMemory(1 << 16))
    for k in range(4):
        fq.driver.publish([bytes([k])])
    fq.driver.set_used_event(2)  # interrupt me when used.idx passes 2
    chains = [take(fq) for _ in range(4)]
    counts = []
    for chain in chains:
        chain.return_written(0)
        counts.append(fq.notifier.take())
    # the first return always notifies (nothing signalled yet); then only crossing used_event 2
    assert counts == [1, 0, 1, 0]
    assert len(fq.driver.used()) == 4


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_publish_refuses_a_chain_longer_than_the_queue_size(packed: bool, indirect: bool) -> None:
    """A well-behaved driver never makes one (virtio 1.2, 2.7.5.3.1 and 2.8.19), even in an
    indirect table; the device would reject it as too long."""
    fq = make_queue(size=2, features=Feature.INDIRECT_DESC, packed=packed)
    with pytest.raises(DeviceUsageError, match="longer than the queue size 2"):
        fq.driver.publish([b"a", b"b"], [1], indirect=indirect)
    assert fq.queue.next_chain() is None  # nothing was published
    assert fq.driver.publish([b"a"], [1], indirect=indirect) is not None  # size 2 is fine
    chain = fq.queue.next_chain()
    assert chain is not None
    assert chain.error is None
    chain.return_written(1)
