"""Tests of :class:`virtio_schema.queue.PackedQueue`: what only a packed ring has (virtio 1.2, 2.8).

Everything the two formats share (the normal path, the validation catalogue, the broken latch,
device misuse, with blocks, forgotten chains, staleness across reset/restore) runs on both formats
in ``tests/test_queue.py``, including the packed ring errors (:class:`ChainNeverEnds`,
:class:`BufferIdOutOfRange`) in its ``BAD_RINGS`` table. Here, what a device author relies on
beyond that:

* a chain occupies consecutive slots, wrapping at the end of the ring, and each wrap counter flips
  after exactly ``size`` slots, for any size 1..32768;
* the device writes ONE used descriptor per chain, at its used position, which then advances by
  the chain's slot count (out-of-order returns included), with ``AVAIL`` = ``USED`` = its used wrap
  counter and ``WRITE`` only when bytes were written (virtio 1.2, 2.8.6 and 2.8.13);
* indirect tables: all ``len/16`` entries are used, ``NEXT`` inside is ignored, and an indirect
  descriptor must be alone in its chain (virtio 1.2, 2.8.19);
* notifications follow the driver event area (ENABLE / DISABLE / DESC with EVENT_IDX, including
  the wrap bit); kicks are asked for in the device event area (virtio 1.2, 2.8.10);
* :class:`QueueState` carries ring positions and wrap counters, and vhost-user's SET/GET_VRING_BASE
  number packs them the way QEMU does (and reads DPDK's shorter form);
* property: whatever a well-behaved driver publishes, over many laps and returns in any order,
  comes back exactly once with the bytes the device wrote, and the two sides' positions meet
  whenever nothing is in flight.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from virtio_schema.chain import ReadableChain, WritableChain
from virtio_schema.fake_queue import FakeMemory, PackedFakeQueue, UsedChain, make_queue
from virtio_schema.queue import (
    BufferIdOutOfRange,
    ChainError,
    ChainNeverEnds,
    ChainTooLong,
    DescChain,
    IndirectWithNext,
    InvalidQueueState,
    PackedQueue,
    QueueBroken,
    QueueState,
    ReadableAfterWritable,
    RingError,
    UnmappedIndirectTable,
    VirtQueue,
    create_queue,
)
from virtio_schema.ring import PackedDesc
from virtio_schema.schema import EventFlags, Feature, PackedDescFlags
from virtio_schema.util import NotificationCounter
from virtio_schema.vhost_user.backend import (
    DPDK_PACKED_BASE,
    Backend,
    Fd,
    Mapping,
    MemoryRefused,
    decode_vring_base,
    encode_vring_base,
)
from virtio_schema.vhost_user.device import VhostUserDevice

NEXT = int(PackedDescFlags.NEXT)
WRITE = int(PackedDescFlags.WRITE)
INDIRECT = int(PackedDescFlags.INDIRECT)
AVAIL = int(PackedDescFlags.AVAIL)
USED = int(PackedDescFlags.USED)
ENABLE = int(EventFlags.ENABLE)
DISABLE = int(EventFlags.DISABLE)
DESC = int(EventFlags.DESC)
F_INDIRECT = int(Feature.INDIRECT_DESC)
F_EVENT_IDX = int(Feature.EVENT_IDX)
QUEUE = 3


def fake(
    size: int = 8,
    *,
    features: int = 0,
    state: QueueState | None = None,
    memory: FakeMemory | None = None,
) -> PackedFakeQueue:
    return make_queue(size, features=features, packed=True, state=state, memory=memory, index=QUEUE)


def take(fq: PackedFakeQueue) -> DescChain:
    chain = fq.queue.next_chain()
    assert chain is not None
    return chain


def snapshot(fq: PackedFakeQueue) -> list[bytes]:
    return [bytes(b) for b in fq.memory.buffers]


def drop(holder: list[DescChain]) -> None:
    """Forget the only references to the chains in ``holder`` and collect them."""
    holder.clear()
    gc.collect()


def used_bits(wrap: bool) -> int:
    """``AVAIL``/``USED`` of a used descriptor written on a lap with this wrap counter."""
    return AVAIL | USED if wrap else 0


def wrap_of(linear: int, size: int) -> bool:
    """The wrap counter after ``linear`` slots from a fresh start (it starts at 1)."""
    return (linear // size) % 2 == 0


def state_at(avail: int, used: int, size: int) -> QueueState:
    """The :class:`QueueState` after ``avail`` slots taken and ``used`` slots returned."""
    return QueueState(avail % size, used % size, wrap_of(avail, size), wrap_of(used, size))


def process(fq: PackedFakeQueue, count: int) -> None:
    """Publish, take and return ``count`` one-slot chains; the driver takes each back."""
    for _ in range(count):
        buf_id = fq.driver.publish([b"req"])
        assert buf_id is not None
        with take(fq) as chain:
            assert chain.head == buf_id
        assert [u.head for u in fq.driver.used()] == [buf_id]


def push(fq: PackedFakeQueue, descs: list[tuple[int, int, int]], buffer_id: int) -> int:
    """Make raw ``(addr, len, flags)`` descriptors available as one chain at the driver's avail
    position: flags as given (NEXT included), the AVAIL/USED bits of each slot's lap added by the
    driver, ``buffer_id`` in every descriptor. Returns the head slot."""
    return fq.driver.push_raw([PackedDesc(a, n, buffer_id, f) for a, n, f in descs])


def broken(fq: PackedFakeQueue) -> RingError | None:
    """``queue.broken``, read through a call so the type checker does not narrow it."""
    return fq.queue.broken


def no_notify(fq: PackedFakeQueue) -> bool:
    """The device event area says DISABLE, as the driver reads it (a fresh read each call)."""
    return fq.driver.no_notify


def assert_sides_meet(fq: PackedFakeQueue) -> None:
    """Nothing in flight: the device's positions and wrap counters are the driver's."""
    d = fq.driver
    assert fq.queue.state() == QueueState(d.avail_pos, d.used_pos, d.avail_wrap, d.used_wrap)
    assert d.avail_idx == d.used_idx


# --- chains, slots and wrap counters ---------------------------------------------------------------


def test_chain_straddling_the_end_of_the_ring_is_read_in_slot_order_and_returned() -> None:
    """A three-descriptor chain from slot size-2 takes slots 6, 7, 0; slot 0 carries the next
    lap's AVAIL/USED bits; the one used descriptor goes at slot 6 (the used position)."""
    fq = fake(8)
    d = fq.driver
    process(fq, 6)
    buf_id = d.publish([b"abc", b"de"], [8])
    assert buf_id is not None
    assert d.ring.flags(6) & (AVAIL | USED) == AVAIL  # lap 1: AVAIL = 1, USED = 0
    assert d.ring.flags(0) & (AVAIL | USED) == USED  # lap 2: AVAIL = 0, USED = 1
    assert fq.queue.pending() == 1
    chain = take(fq)
    assert chain.head == buf_id
    assert [c.desc_index for c in chain.descriptors()] == [6, 7, 0]
    assert [c.writable for c in chain.descriptors()] == [False, False, True]
    assert fq.queue.state() == QueueState(1, 6, avail_wrap=False, used_wrap=True)
    assert fq.queue.pending() == 0
    with ReadableChain(chain) as r:
        assert r.read() == b"abcde"
        with r.into_writable() as w:
            w.write(b"xyz")
    used = d.ring.get(6)
    assert (used.id, used.len, used.flags) == (buf_id, 3, AVAIL | USED | WRITE)
    assert fq.queue.state() == QueueState(1, 1, avail_wrap=False, used_wrap=False)
    assert d.used() == [UsedChain(buf_id, 3, (b"xyz",))]
    process(fq, 1)  # the second lap goes on at slot 1
    assert fq.queue.state() == QueueState(2, 2, avail_wrap=False, used_wrap=False)
    assert_sides_meet(fq)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_wrap_counters_flip_after_exactly_size_slots(size: int) -> None:
    """Over three laps of one-slot chains: the device's avail and used wrap counters flip when
    their position passes size-1 -> 0 and only then; each used descriptor has AVAIL = USED = the
    used wrap counter of its lap, and WRITE exactly when bytes were written."""
    fq = fake(size)
    d = fq.driver
    for step in range(3 * size):
        buf_id = d.publish([], [4])
        assert buf_id is not None
        chain = take(fq)
        assert fq.queue.state() == state_at(step + 1, step, size)
        written = step % 2
        chain.return_written(written)
        assert fq.queue.state() == state_at(step + 1, step + 1, size)
        rec = d.ring.get(step % size)
        assert (rec.id, rec.len) == (buf_id, written)
        assert rec.flags == used_bits(wrap_of(step, size)) | (WRITE if written else 0)
        assert [(u.head, u.len) for u in d.used()] == [(buf_id, written)]
        assert_sides_meet(fq)


@pytest.mark.parametrize("size", [1, 3, 256, 32768])
def test_any_queue_size_works_across_the_end_of_the_ring(size: int) -> None:
    """Sizes need not be powers of two (virtio 1.2, 2.8.10.1), up to 32768: one-slot chains run
    across the end of the ring (twice around small rings), then one chain takes every slot."""
    start = max(size - 2, 0)
    fq = fake(size, state=QueueState(start, start))
    d = fq.driver
    count = 2 * size + 1 if size <= 256 else 5
    for k in range(count):
        buf_id = d.publish([], [2])  # one slot: a size-1 ring holds nothing longer
        assert buf_id is not None
        reply = bytes([k % 256]) + b"!"
        with take(fq) as chain, WritableChain(chain) as w:
            w.write(reply)
        assert d.used() == [UsedChain(buf_id, 2, (reply,))]
    assert fq.queue.state() == state_at(start + count, start + count, size)
    assert_sides_meet(fq)
    if size > 256:
        return  # a 32768-descriptor chain says nothing the small rings do not
    readable = [bytes([k % 256]) for k in range(size - 1)]
    buf_id = d.publish(readable, [1])
    assert buf_id is not None
    chain = take(fq)
    assert len(chain) == size
    pos = (start + count) % size
    assert [c.desc_index for c in chain.descriptors()] == [(pos + k) % size for k in range(size)]
    chain.return_written(0)
    assert [u.head for u in d.used()] == [buf_id]
    assert fq.queue.state() == state_at(start + count + size, start + count + size, size)
    assert_sides_meet(fq)


def test_one_used_descriptor_per_chain_at_the_used_position_with_out_of_order_returns() -> None:
    """Chains of 1, 3 and 2 slots returned in the order 3rd, 1st, 2nd: each return writes one
    used descriptor at the used position (slots 0, 2, 3) and moves it on by that chain's slot
    count; the slots in between keep what the driver wrote."""
    fq = fake(16)
    d = fq.driver
    a = d.publish([b"a"])
    b = d.publish([b"b1", b"b2"], [4])
    c = d.publish([], [2, 2])
    assert a is not None
    assert b is not None
    assert c is not None
    chains = [take(fq) for _ in range(3)]
    assert [ch.head for ch in chains] == [a, b, c]
    assert fq.queue.state() == QueueState(6, 0)
    untouched = {slot: d.ring.get(slot) for slot in (1, 4, 5)}
    first, second, third = chains
    fq.memory.write(third.writable()[0].addr, b"xy")
    fq.memory.write(third.writable()[1].addr, b"z")
    third.return_written(3)
    assert fq.queue.state() == QueueState(6, 2)
    first.return_written(0)
    assert fq.queue.state() == QueueState(6, 3)
    fq.memory.write(second.writable()[0].addr, b"four")
    second.return_written(4)
    assert fq.queue.state() == QueueState(6, 6)
    assert [tuple(d.ring.get(s)[1:]) for s in (0, 2, 3)] == [
        (3, c, AVAIL | USED | WRITE),
        (0, a, AVAIL | USED),
        (4, b, AVAIL | USED | WRITE),
    ]
    assert {slot: d.ring.get(slot) for slot in (1, 4, 5)} == untouched
    assert fq.notifier.count == 3
    assert d.used() == [
        UsedChain(c, 3, (b"xy", b"z")),
        UsedChain(a, 0, ()),
        UsedChain(b, 4, (b"four",)),
    ]
    assert_sides_meet(fq)


def test_malformed_chain_goes_back_without_write_flag_and_skips_all_its_slots() -> None:
    """A chain error is returned with length 0 and no WRITE, whatever the device claims, and the
    used position still moves on by every slot the chain took."""
    fq = fake(8)
    buf = fq.driver.alloc_buffer(8)
    head = push(fq, [(buf, 8, WRITE | NEXT), (buf, 8, NEXT), (buf, 8, 0)], 5)
    chain = take(fq)
    assert isinstance(chain.error, ReadableAfterWritable)
    assert chain.head == 5
    assert chain.error.head == head == 0  # the error names the chain's first slot
    chain.return_written(8)
    rec = fq.driver.ring.get(0)
    assert (rec.id, rec.len, rec.flags) == (5, 0, AVAIL | USED)
    assert fq.queue.state() == QueueState(3, 3)
    assert [(u.head, u.len) for u in fq.driver.used()] == [(5, 0)]
    process(fq, 1)
    assert_sides_meet(fq)


def test_pending_says_whether_the_next_slot_holds_a_chain() -> None:
    fq = fake(4)
    assert fq.queue.pending() == 0
    fq.driver.publish([b"x"])
    fq.driver.publish([b"y"])
    assert fq.queue.pending() == 1  # no index counts them: 1 means "at least one"
    chains = [take(fq), take(fq)]
    assert fq.queue.pending() == 0
    for chain in chains:
        chain.return_written(0)
    assert fq.queue.pending() == 0


# --- indirect descriptors ----------------------------------------------------------------------------


def test_indirect_table_entries_are_all_used_in_order_and_their_next_flags_ignored() -> None:
    """Every one of the ``len/16`` entries is a buffer, whatever NEXT says: the first entry has no
    NEXT, the others have it, the last one too (virtio 1.2, 2.8.19)."""
    fq = fake(8, features=F_INDIRECT)
    d = fq.driver
    bufs = [d.alloc_buffer(bytes([65 + k]) * 4) for k in range(3)]
    out = d.alloc_buffer(4)
    table = d.write_indirect_table(
        [
            PackedDesc(bufs[0], 4, 0xBEEF, 0),
            PackedDesc(bufs[1], 4, 0xFFFF, NEXT),
            PackedDesc(bufs[2], 4, 7, NEXT),
            PackedDesc(out, 4, 0, WRITE | NEXT),
        ]
    )
    push(fq, [(table, 64, INDIRECT)], 2)
    chain = take(fq)
    assert chain.error is None
    assert chain.head == 2
    assert [(c.addr, c.len, c.writable, c.desc_index, c.indirect) for c in chain] == [
        (bufs[0], 4, False, 0, True),
        (bufs[1], 4, False, 1, True),
        (bufs[2], 4, False, 2, True),
        (out, 4, True, 3, True),
    ]
    with ReadableChain(chain) as r:
        assert r.read() == b"AAAABBBBCCCC"
        with r.into_writable() as w:
            w.write(b"done")
    assert [(u.head, u.len) for u in d.used()] == [(2, 4)]
    assert fq.queue.state() == QueueState(1, 1)  # an indirect chain takes one slot


def test_indirect_table_of_one_entry_with_next_is_one_buffer() -> None:
    fq = fake(8, features=F_INDIRECT)
    buf = fq.driver.alloc_buffer(b"only")
    table = fq.driver.write_indirect_table(
        [PackedDesc(buf, 4, 0, NEXT), PackedDesc(buf, 4, 0, WRITE)]
    )
    push(fq, [(table, 16, INDIRECT)], 1)  # len 16: the second entry is not in the table
    with take(fq) as chain:
        assert chain.error is None
        assert [(c.addr, c.writable) for c in chain] == [(buf, False)]


def test_indirect_descriptor_write_flag_is_ignored() -> None:
    fq = fake(8, features=F_INDIRECT)
    buf = fq.driver.alloc_buffer(b"read me")
    table = fq.driver.write_indirect_table([PackedDesc(buf, 7, 0, 0)])
    push(fq, [(table, 16, INDIRECT | WRITE)], 1)
    with take(fq) as chain:
        assert chain.error is None
        assert (chain.readable_len, chain.writable_len) == (7, 0)


@pytest.mark.parametrize(
    ("descs", "refused_at"),
    [
        pytest.param([(INDIRECT | NEXT, True), (WRITE, False)], 0, id="indirect-with-next"),
        pytest.param([(NEXT, False), (INDIRECT, True)], 1, id="indirect-after-direct"),
        pytest.param(
            [(NEXT, False), (INDIRECT | NEXT, True), (WRITE, False)],
            1,
            id="indirect-in-the-middle",
        ),
    ],
)
def test_indirect_descriptor_not_alone_in_its_chain_is_refused_and_all_slots_skipped(
    descs: list[tuple[int, bool]], refused_at: int
) -> None:
    """virtio 1.2, 2.8.19: no INDIRECT with NEXT, and (this library's rule for packed rings) an
    indirect descriptor is a chain of its own. The chain is handed out with
    :class:`IndirectWithNext` naming the slot, returned with length 0, and every slot it took is
    skipped."""
    fq = fake(8, features=F_INDIRECT, state=QueueState(6, 6))  # the chain straddles the end
    d = fq.driver
    buf = d.alloc_buffer(8)
    table = d.write_indirect_table([PackedDesc(buf, 8, 0, 0)])
    head = push(fq, [(table, 16, f) if is_table else (buf, 8, f) for f, is_table in descs], 4)
    chain = take(fq)
    assert isinstance(chain.error, IndirectWithNext)
    assert chain.error.head == head == 6
    assert chain.error.index == (6 + refused_at) % 8
    assert f"descriptor {(6 + refused_at) % 8}" in str(chain.error)
    assert chain.head == 4
    chain.return_written()
    end = (6 + len(descs)) % 8
    assert fq.queue.state() == QueueState(end, end, False, False)
    assert [(u.head, u.len) for u in d.used()] == [(4, 0)]
    process(fq, 1)
    assert_sides_meet(fq)


@pytest.mark.parametrize("size", [1, 4])
def test_indirect_table_of_exactly_queue_size_entries_accepted_one_more_refused(size: int) -> None:
    fq = fake(size, features=F_INDIRECT)
    buf = fq.driver.alloc_buffer(8)
    for entries, error in ((size, None), (size + 1, ChainTooLong)):
        table = fq.driver.write_indirect_table([PackedDesc(buf, 8, 0, 0)] * entries)
        push(fq, [(table, 16 * entries, INDIRECT)], 0)
        with take(fq) as chain:
            if error is None:
                assert chain.error is None
                assert len(chain) == size
            else:
                assert isinstance(chain.error, error)
                assert f"longer than {size}" in str(chain.error)
        assert [(u.head, u.len) for u in fq.driver.used()] == [(0, 0)]


def test_indirect_table_of_65535_entries_is_a_chain_too_long_not_a_table_too_large() -> None:
    """All entries count (unlike a split ring, where the table's NEXT links decide): 65535
    entries pass the table size check (:class:`IndirectTableTooLarge` is for more) and then
    exceed any queue size."""
    fq = fake(32768, features=F_INDIRECT)
    table = fq.memory.alloc(65535 * 16, 16)
    push(fq, [(table, 65535 * 16, INDIRECT)], 0)
    with take(fq) as chain:
        assert isinstance(chain.error, ChainTooLong)
        assert "longer than 32768" in str(chain.error)


def test_unmapped_indirect_table_error_names_the_ring_slot_of_the_indirect_descriptor() -> None:
    """The error names where the indirect descriptor sits, as every other error about a ring
    descriptor does (and as the split queue does: the descriptor's table index). Here the chain
    starts at slot 5, so the message must say ``descriptor 5``."""
    fq = fake(8, features=F_INDIRECT, state=QueueState(5, 5))
    push(fq, [(0x1000, 32, INDIRECT)], 1)  # 0x1000 is below fake memory
    chain = take(fq)
    try:
        assert isinstance(chain.error, UnmappedIndirectTable)
        assert chain.error.head == 5
        assert chain.error.index == 5
        assert "(descriptor 5)" in str(chain.error)
    finally:
        chain.return_written()


# --- ring errors: the chain cannot be returned ----------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 8])
def test_next_on_every_slot_is_chain_never_ends_after_exactly_size_slots(size: int) -> None:
    """size 1: one slot with NEXT already never ends. Nothing is consumed: the bad chain stays
    where it is, for the restore that follows a repair."""
    fq = fake(size)
    buf = fq.driver.alloc_buffer(8)
    fq.driver.push_raw([PackedDesc(buf, 8, 0, NEXT)] * size)
    with pytest.raises(QueueBroken) as info:
        fq.queue.next_chain()
    cause = info.value.cause
    assert isinstance(cause, ChainNeverEnds)
    assert isinstance(cause, RingError)
    assert not isinstance(cause, ChainError)
    assert cause.head == 0
    assert f"queue {QUEUE}" in str(cause)
    assert f"NEXT on all {size} slots" in str(cause)
    assert fq.queue.state() == QueueState()


@dataclass(frozen=True)
class Unreturnable:
    """A chain the device cannot return: ``descs`` as ``(flags, buffer id)``."""

    id: str
    error: type[RingError]
    descs: tuple[tuple[int, int], ...]


UNRETURNABLE = [
    Unreturnable("never-ends", ChainNeverEnds, ((NEXT, 0),) * 8),
    Unreturnable("buffer-id-equal-to-size", BufferIdOutOfRange, ((NEXT, 0), (WRITE, 8))),
    Unreturnable("buffer-id-ffff", BufferIdOutOfRange, ((0, 0xFFFF),)),
]


@pytest.mark.parametrize("case", UNRETURNABLE, ids=[c.id for c in UNRETURNABLE])
def test_unreturnable_chain_latches_broken_until_restore_at_the_same_position(
    case: Unreturnable,
) -> None:
    """No memory write of any kind while broken (held chains returned or dropped, notification
    toggles); restoring the saved position after the driver rewrote the chain takes it."""
    fq = fake(8, state=QueueState(3, 3))
    d = fq.driver
    assert d.publish([b"held"], [4]) is not None
    assert d.publish([b"held too"]) is not None
    held = [take(fq), take(fq)]
    saved = fq.queue.state()
    buf = d.alloc_buffer(8)
    head = d.push_raw([PackedDesc(buf, 8, bid, f) for f, bid in case.descs])
    with pytest.raises(QueueBroken) as info:
        fq.queue.next_chain()
    cause = info.value.cause
    assert type(cause) is case.error
    assert fq.queue.broken is cause
    if isinstance(cause, BufferIdOutOfRange):
        assert (cause.head, cause.buffer_id) == (head, case.descs[-1][1])
    before = snapshot(fq)
    held[0].return_written(4)
    del held[0]
    with pytest.warns(ResourceWarning):
        drop(held)
    fq.queue.disable_notifications()
    with pytest.raises(QueueBroken):
        fq.queue.enable_notifications()
    with pytest.raises(QueueBroken):
        fq.queue.pending()
    with pytest.raises(QueueBroken):
        fq.queue.next_chain()
    assert snapshot(fq) == before
    assert fq.notifier.count == 0
    # the driver rewrites the bad chain as one good descriptor in the same slot, the device restores
    d.write_slot(head, buf, 8, WRITE | (AVAIL if saved.avail_wrap else USED), 2)
    fq.queue.restore(saved)
    assert broken(fq) is None
    chain = take(fq)
    assert (chain.head, chain.error, chain.writable_len) == (2, None, 8)
    chain.return_written(8)
    rec = d.ring.get(saved.next_used)
    assert (rec.id, rec.len, rec.flags) == (2, 8, AVAIL | USED | WRITE)


# --- used buffer notifications: the driver event area ----------------------------------------------


def notified_returns(fq: PackedFakeQueue, count: int, slots: int = 1) -> list[int]:
    """Publish, take and return ``count`` chains of ``slots`` descriptors one at a time; the
    1-based numbers of the returns that notified."""
    out: list[int] = []
    for k in range(1, count + 1):
        assert fq.driver.publish([b"r"] * slots) is not None
        before = fq.notifier.count
        with take(fq):
            pass
        fq.driver.used()
        assert fq.notifier.count - before in (0, 1)
        if fq.notifier.count > before:
            out.append(k)
    return out


@pytest.mark.parametrize("features", [0, F_EVENT_IDX], ids=["plain", "event-idx"])
def test_enable_and_disable_modes_notify_every_return_or_none(features: int) -> None:
    fq = fake(4, features=features)
    d = fq.driver
    d.set_driver_event(0x8002, ENABLE)  # the offset means nothing in ENABLE mode
    assert notified_returns(fq, 6) == [1, 2, 3, 4, 5, 6]
    d.set_driver_event(0x8002, DISABLE)
    assert notified_returns(fq, 6) == []
    d.set_no_interrupt(False)  # ENABLE again
    assert notified_returns(fq, 2) == [1, 2]


def test_desc_mode_without_event_idx_and_unknown_flags_notify_every_return() -> None:
    """DESC is only valid with EVENT_IDX; a flags value the device does not know (3) must not
    silence it either: notify, to be safe."""
    fq = fake(4)
    fq.driver.set_driver_event(0x8003, DESC)
    assert notified_returns(fq, 5) == [1, 2, 3, 4, 5]
    fq.driver.set_driver_event(0x8003, 3)
    assert notified_returns(fq, 3) == [1, 2, 3]


def test_desc_mode_notifies_when_the_used_position_passes_the_event_on_the_next_lap() -> None:
    """size 8, event at position 2 with wrap bit 0, i.e. on the second lap (linear slot 10).
    The first decision after a start always notifies; during the first lap the wrap bit differs,
    so the offset counts as ``2 - 8`` (not yet reached); return 11 moves the used position from
    2 to 3 on the second lap: the only other notification."""
    fq = fake(8, features=F_EVENT_IDX)
    fq.driver.set_used_event(2 | 0 << 15)
    assert notified_returns(fq, 14) == [1, 11]


def test_desc_mode_event_inside_a_multi_slot_jump_notifies() -> None:
    """The used position moves by a chain's slots: an event at a slot the position jumps over
    (3-slot chains: 0 -> 3 -> 6, event at 4) is passed."""
    fq = fake(8, features=F_EVENT_IDX)
    fq.driver.set_used_event(4 | 1 << 15)
    assert notified_returns(fq, 2, slots=3) == [1, 2]


def test_desc_mode_with_a_driver_that_re_arms_ahead_matches_the_linear_model() -> None:
    """A driver like Linux's ``virtqueue_enable_cb_delayed``: after each notification it asks to
    be woken again 4 slots past its used position, wrap bit included. Over nearly eight laps of
    1-, 2- and 3-slot chains (size 7, so events and jumps fall everywhere in the ring, across its
    end included), the queue notifies exactly when the used position, counted linearly, passes
    the event."""
    size = 7
    fq = fake(size, features=F_EVENT_IDX)
    d = fq.driver
    event = 0  # linear slot the driver waits for
    d.set_used_event(0 | 1 << 15)
    used_linear = 0
    got: list[int] = []
    expected: list[int] = []
    for k in range(1, 25):
        slots = (3, 1, 2, 3)[k % 4]
        assert d.publish([b"r"] * slots) is not None
        before = fq.notifier.count
        with take(fq):
            pass
        d.used()
        old, used_linear = used_linear, used_linear + slots
        if k == 1 or old <= event < used_linear:
            expected.append(k)
        if fq.notifier.count > before:
            got.append(k)
            event = used_linear + 4
            d.set_used_event(event % size | wrap_of(event, size) << 15)
    assert got == expected == [1, 3, 6, 8, 11, 14, 16, 19, 22, 24]
    assert used_linear == 54  # nearly eight laps


def test_desc_mode_first_decision_after_restore_notifies_again() -> None:
    fq = fake(8, features=F_EVENT_IDX)
    fq.driver.set_used_event(7 | 0 << 15)  # far away: the second lap
    assert notified_returns(fq, 3) == [1]
    fq.queue.restore(fq.queue.state())
    assert notified_returns(fq, 2) == [1]


# --- kicks: the device event area ------------------------------------------------------------------


def test_device_event_area_enable_disable_without_event_idx() -> None:
    fq = fake(4)
    d = fq.driver
    assert d.device_event.flags() == ENABLE
    old = d.avail_idx
    d.publish([b"r"])
    assert d.kick_needed(old)
    with take(fq):
        pass
    fq.queue.disable_notifications()
    assert d.device_event.flags() == DISABLE
    assert no_notify(fq)
    old = d.avail_idx
    buf_id = d.publish([b"r"])
    assert not d.kick_needed(old)  # the driver does not kick ...
    assert fq.queue.enable_notifications() is True  # ... so the device must look
    assert d.device_event.flags() == ENABLE
    assert not no_notify(fq)
    with take(fq) as chain:
        assert chain.head == buf_id
    assert fq.queue.enable_notifications() is False
    old = d.avail_idx
    d.publish([b"r"])
    assert d.kick_needed(old)
    with take(fq):
        pass


def test_device_event_area_with_event_idx_follows_the_avail_position_and_its_wrap() -> None:
    """With EVENT_IDX the device asks, after each chain it takes, for a kick when the driver
    publishes at its next avail position: DESC with ``off_wrap = position | wrap << 15``."""
    size = 3
    fq = fake(size, features=F_EVENT_IDX)
    d = fq.driver
    for k in range(1, 2 * size + 3):
        old = d.avail_idx
        d.publish([b"r"])
        assert d.kick_needed(old)
        with take(fq):
            pass
        d.used()
        assert d.device_event.flags() == DESC
        assert d.avail_event == k % size | wrap_of(k, size) << 15
    # a two-slot chain that crosses the end of the ring: the wrap bit flips with the position
    assert fq.queue.state().next_avail == size - 1
    old = d.avail_idx
    d.publish([b"r", b"s"])
    assert d.kick_needed(old)
    with take(fq):
        pass
    assert d.avail_event == 1 | wrap_of(2 * size + 4, size) << 15


def test_device_event_area_with_event_idx_disabled_then_enabled_rechecks() -> None:
    fq = fake(4, features=F_EVENT_IDX)
    d = fq.driver
    process(fq, 2)
    fq.queue.disable_notifications()
    assert d.device_event.flags() == DISABLE
    old = d.avail_idx
    d.publish([b"r"])
    assert not d.kick_needed(old)
    off_wrap = d.avail_event
    with take(fq):  # taking while disabled leaves the area alone
        pass
    d.used()
    assert (d.device_event.flags(), d.avail_event) == (DISABLE, off_wrap)
    old = d.avail_idx
    buf_id = d.publish([b"r"])
    assert not d.kick_needed(old)
    assert fq.queue.enable_notifications() is True  # the chain published meanwhile
    assert (d.device_event.flags(), d.avail_event) == (DESC, 3 | 1 << 15)
    with take(fq) as chain:
        assert chain.head == buf_id
    assert d.avail_event == 0 | 0 << 15  # position 0 of the second lap
    d.used()
    assert fq.queue.enable_notifications() is False
    old = d.avail_idx
    d.publish([b"r"])
    assert d.kick_needed(old)
    with take(fq):
        pass


# --- saved state ----------------------------------------------------------------------------------


def test_queue_rebuilt_from_a_state_on_the_second_lap_continues() -> None:
    size = 5
    fq = fake(size)
    d = fq.driver
    process(fq, 7)
    saved = fq.queue.state()
    assert saved == QueueState(2, 2, avail_wrap=False, used_wrap=False)
    notifier = NotificationCounter()
    second = create_queue(
        d.queue_memory(), size, fq.memory, features=fq.queue.features, notify=notifier, state=saved
    )
    assert isinstance(second, PackedQueue)
    assert second.state() == saved
    for k in range(4):
        buf_id = d.publish([], [1])
        chain = second.next_chain()
        assert chain is not None
        assert chain.head == buf_id
        chain.return_written(1)
        rec = d.ring.get((2 + k) % size)
        assert rec.flags == used_bits(wrap_of(7 + k, size)) | WRITE
        assert [u.head for u in d.used()] == [buf_id]
    assert second.state() == state_at(11, 11, size)
    assert notifier.count == 4


@pytest.mark.parametrize("how", ["constructed", "restored"])
def test_queue_at_a_mid_ring_position_with_wrap_counters_cleared(how: str) -> None:
    """A state from vhost-user or migration: position 3 of an even lap (wrap counters 0), given
    to a new queue or restored into one that was reset. The used descriptors have
    AVAIL = USED = 0 until the position passes the end of the ring, then both counters flip."""
    size = 6
    start = QueueState(3, 3, avail_wrap=False, used_wrap=False)
    fq = fake(size, state=start)
    if how == "restored":
        fq.queue.reset()
        assert fq.queue.state() == QueueState(0, 0, avail_wrap=True, used_wrap=True)
        fq.queue.restore(start)
    assert fq.queue.state() == start
    d = fq.driver
    assert fq.queue.next_chain() is None  # the driver's old laps do not look available
    for k in range(size):
        buf_id = d.publish([b"r"])
        with take(fq):
            pass
        rec = d.ring.get((3 + k) % size)
        assert (rec.id, rec.flags) == (buf_id, 0 if k < 3 else AVAIL | USED)
        d.used()
    assert fq.queue.state() == QueueState(3, 3, avail_wrap=True, used_wrap=True)
    assert_sides_meet(fq)


@pytest.mark.parametrize(
    "bad",
    [QueueState(8, 0), QueueState(0, 8), QueueState(0xFFFF, 0), QueueState(3, 0x8003)],
    ids=["avail-equal-to-size", "used-equal-to-size", "avail-ffff", "used-with-wrap-bit"],
)
def test_positions_not_below_size_are_invalid_queue_state(bad: QueueState) -> None:
    mem = FakeMemory()
    with pytest.raises(InvalidQueueState) as info:
        make_queue(8, packed=True, state=bad, memory=mem)
    assert "below 8" in str(info.value)
    fq = fake(8)
    with pytest.raises(InvalidQueueState):
        fq.queue.restore(bad)
    fq.queue.restore(QueueState(7, 7, False, True))  # size - 1 is a position
    assert fq.queue.state() == QueueState(7, 7, False, True)


def test_failed_restore_leaves_held_chains_returnable() -> None:
    """``restore`` with a state that does not fit raises :class:`InvalidQueueState`; it must leave
    the queue as it was. A chain the device holds must still go back to the driver: the queue
    did not move, so nothing else will ever return its slots and buffer id."""
    fq = fake(8)
    d = fq.driver
    buf_id = d.publish([b"req"], [4])
    held = take(fq)
    state = fq.queue.state()
    with pytest.raises(InvalidQueueState):
        fq.queue.restore(QueueState(9, 0))
    assert fq.queue.state() == state
    held.return_written(2)
    assert [(u.head, u.len) for u in d.used()] == [(buf_id, 2)]


def test_failed_restore_leaves_a_broken_queue_broken() -> None:
    """A failed ``restore`` is no restore: the broken latch stays, and ``next_chain`` does not go
    back to reading a ring the queue declared inconsistent."""
    fq = fake(8)
    buf = fq.driver.alloc_buffer(1)
    fq.driver.push_raw([PackedDesc(buf, 1, 0xFFFF, 0)])
    with pytest.raises(QueueBroken):
        fq.queue.next_chain()
    cause = fq.queue.broken
    assert isinstance(cause, BufferIdOutOfRange)
    with pytest.raises(InvalidQueueState):
        fq.queue.restore(QueueState(0, 8))
    assert fq.queue.broken is cause
    with pytest.raises(QueueBroken):
        fq.queue.next_chain()


# --- vhost-user SET_VRING_BASE / GET_VRING_BASE ------------------------------------------------------


class _Device(VhostUserDevice):
    """The smallest device: the tests only call the backend's vring base codec."""

    def handle(self, index: int, queue: VirtQueue) -> None:  # pragma: no cover - never kicked
        raise AssertionError("not used")


class _NoHost:
    """A host with nothing to map (the codec tests send no memory table)."""

    def map(self, fd: Fd, offset: int, size: int) -> Mapping:
        raise MemoryRefused("no memory in this test")

    def create_shared(self, size: int) -> tuple[int, Mapping]:
        raise MemoryRefused("no shared memory in this test")

    def close(self, fd: int) -> None:
        pass


def backend(packed: bool) -> Backend:
    b = Backend(_Device(), host=_NoHost())
    b.acked_features = int(Feature.VERSION_1) | (int(Feature.RING_PACKED) if packed else 0)
    assert b.packed is packed
    return b


@pytest.mark.parametrize("num", [0, 1, 255, 0x8000, 0xFFFF])
def test_split_vring_base_is_the_next_avail_index_for_both_indices(num: int) -> None:
    b = backend(False)
    state = decode_vring_base(num, packed=b.packed)
    assert state == QueueState(num, num)
    assert encode_vring_base(state, packed=b.packed) == num
    # GET_VRING_BASE reports next_avail
    assert encode_vring_base(QueueState(num, 7), packed=b.packed) == num


@pytest.mark.parametrize(
    ("num", "state"),
    [
        pytest.param(0x8000_8000, QueueState(0, 0, True, True), id="qemu-initial"),
        pytest.param(0x8000, QueueState(0, 0, True, True), id="dpdk-initial-low-half-only"),
        pytest.param(0x0005, QueueState(5, 0, False, False), id="qemu-used-at-a-lap-start"),
        pytest.param(0x8007, QueueState(7, 0, True, False), id="qemu-used-a-lap-behind"),
        pytest.param(0x8003_8005, QueueState(5, 3, True, True), id="qemu-in-flight"),
        pytest.param(0x8006_0002, QueueState(2, 6, False, True), id="qemu-avail-wrapped-first"),
        pytest.param(0x7FFF_7FFF, QueueState(0x7FFF, 0x7FFF, False, False), id="qemu-largest"),
    ],
)
def test_packed_vring_base_packs_positions_and_wrap_counters_like_qemu(
    num: int, state: QueueState
) -> None:
    """QEMU (``virtio_queue_packed_get_last_avail_idx``): bits 0-14 the avail position, bit 15 its
    wrap counter, bits 16-30 the used position, bit 31 its wrap counter. DPDK's and SPDK's
    virtio-user always send ``0x8000`` (the low half of a fresh ring, "no reservation"): that one
    number means used = avail; a zero used half in any other number is QEMU's used position 0
    with wrap counter 0 (chains in flight), read as it is."""
    b = backend(True)
    assert decode_vring_base(num, packed=b.packed) == state
    encoded = encode_vring_base(state, packed=b.packed)
    assert encoded == (0x8000_8000 if num == DPDK_PACKED_BASE else num)  # always QEMU's layout
    assert decode_vring_base(encoded, packed=b.packed) == state


@given(st.integers(0, 0x7FFF), st.integers(0, 0x7FFF), st.booleans(), st.booleans())
def test_a_packed_base_survives_get_then_set(
    avail: int, used: int, avail_wrap: bool, used_wrap: bool
) -> None:
    """What GET_VRING_BASE reports, SET_VRING_BASE reads back as the same state (QEMU keeps the
    number across a stop and a start), except the one number DPDK sends for a fresh ring."""
    state = QueueState(avail, used, avail_wrap, used_wrap)
    num = encode_vring_base(state, packed=True)
    if num == DPDK_PACKED_BASE:  # avail 0 of lap 1, used 0 of lap 0: a whole ring in flight
        assert decode_vring_base(num, packed=True) == QueueState(0, 0, True, True)
    else:
        assert decode_vring_base(num, packed=True) == state


@given(
    avail=st.integers(0, 0x7FFF),
    used=st.integers(0, 0x7FFF),
    avail_wrap=st.booleans(),
    used_wrap=st.booleans(),
)
def test_packed_vring_base_round_trips_whenever_the_used_half_is_not_zero(
    avail: int, used: int, avail_wrap: bool, used_wrap: bool
) -> None:
    """GET_VRING_BASE then SET_VRING_BASE restores the same state. Excluded: a used half of 0
    (position 0, wrap counter 0) with a different avail half, which reads as DPDK's low-half-only
    form (used = avail): the number alone cannot tell the two apart."""
    state = QueueState(avail, used, avail_wrap, used_wrap)
    b = backend(True)
    encoded = encode_vring_base(state, packed=b.packed)
    assert encoded >> 16 == used | used_wrap << 15
    if encoded >> 16 == 0 and (avail, avail_wrap) != (0, False):
        return
    assert decode_vring_base(encoded, packed=b.packed) == state


# --- property: many laps, any return order ----------------------------------------------------------


@dataclass
class _Published:
    readable: list[bytes]
    writable: list[int]
    indirect: bool
    reply: bytes | None = None  # what the device wrote, once returned


def _payload(seq: int, length: int) -> bytes:
    """Bytes that differ from chain to chain and buffer to buffer (cheaper than drawing them)."""
    return bytes((seq * 31 + i) % 251 for i in range(length))


_OPS = ["publish", "publish", "take", "take", "return", "return", "collect"]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_published_buffer_comes_back_once_with_its_bytes_and_positions_meet_when_idle(
    data: st.DataObject,
) -> None:
    """A well-behaved driver publishes direct and indirect chains of random shapes (at most
    ``size`` buffers) on a ring of random size 1..17, for 100..300 steps, i.e. many laps; the
    device takes them (in publication order: the ring is FIFO), reads them, and returns them in
    random order with random amounts of bytes. Every buffer id comes back exactly once, with
    exactly the bytes the device wrote; every return notifies (ENABLE); and whenever nothing is
    in flight, the device's and the driver's positions and wrap counters are equal."""
    size = data.draw(st.integers(1, 17), label="size")
    fq = make_queue(size, features=F_INDIRECT, packed=True, memory=FakeMemory(1 << 17))
    d, queue = fq.driver, fq.queue
    published: dict[int, _Published] = {}  # buffer id -> chain, until the driver takes it back
    untaken: list[int] = []  # published, not yet taken by the device, in order
    held: list[DescChain] = []
    seq = returns = slots = 0

    def collect() -> None:
        for used in d.used():
            pub = published.pop(used.head)
            assert pub.reply is not None  # returned once, and only then seen
            assert (used.len, used.data) == (len(pub.reply), pub.reply)

    try:
        for op in data.draw(st.lists(st.sampled_from(_OPS), min_size=100, max_size=300)):
            if op == "publish":
                seq += 1
                n_read, n_write, indirect = data.draw(
                    st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans())
                )
                n_read = min(n_read, size)  # at most ``size`` buffers (virtio 1.2, 2.7.5.3.1)
                n_write = max(min(n_write, size - n_read), 0 if n_read else 1)
                readable = [_payload(seq + k, (seq + k) % 9) for k in range(n_read)]
                writable = [(seq * 3 + k) % 13 for k in range(n_write)]
                buf_id = d.publish(readable, writable, indirect=indirect)
                if buf_id is None:
                    continue  # the ring is full: the device has to catch up
                assert buf_id not in published
                published[buf_id] = _Published(readable, writable, indirect)
                untaken.append(buf_id)
            elif op == "take":
                chain = queue.next_chain()
                if not untaken:
                    assert chain is None
                    continue
                assert chain is not None
                held.append(chain)
                assert chain.head == untaken.pop(0)
                pub = published[chain.head]
                assert chain.error is None
                assert all(c.indirect == pub.indirect for c in chain)
                assert [c.len for c in chain.writable()] == pub.writable
                assert ReadableChain(chain).read() == b"".join(pub.readable)
                slots += 1 if pub.indirect else len(pub.readable) + len(pub.writable)
            elif op == "return" and held:
                k, n = data.draw(st.tuples(st.integers(0, len(held) - 1), st.integers(0, 1 << 8)))
                chain = held.pop(k)
                reply = _payload(chain.head + n, n % (chain.writable_len + 1))
                w = WritableChain(chain)
                w.write_all(reply)
                w.return_written()
                published[chain.head].reply = reply
                returns += 1
            elif op == "collect":
                collect()
            if not published:
                assert_sides_meet(fq)
        # drain: take what is left, return everything in a random order, collect
        while (chain := queue.next_chain()) is not None:
            assert chain.head == untaken.pop(0)
            held.append(chain)
        assert not untaken
        for chain in data.draw(st.permutations(held)):
            chain.return_written(0)
            published[chain.head].reply = b""
            returns += 1
        held.clear()
        collect()
        assert not published
        assert d.in_flight == 0
        assert_sides_meet(fq)
        assert fq.notifier.count == returns
        laps = slots // size
        event(f"laps: {'10+' if laps >= 10 else laps}")
    finally:
        for chain in held:  # a failing example must not leave chains to the garbage collector
            if not chain.returned:
                chain.return_written(0)
