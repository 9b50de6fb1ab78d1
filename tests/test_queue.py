"""Tests of :mod:`virtio_schema.queue` (device side), written against ``fake_queue``.

Every behaviour the two ring formats share runs on both by parametrisation (the ``packed`` fixture:
test ids ``[split]`` / ``[packed]``); what only one format has is named so (``test_split_...``) and
packed specifics live in ``tests/test_packed_queue.py``. Where the fake drivers differ (raw
descriptors: ``FakeDriver.write_desc``/``push_head`` vs ``FakePackedDriver.push_raw``), the small
format-aware helpers below (:func:`push`, :func:`table`, :func:`withdraw`) hide it.

What a device author relies on here:

* a well-formed chain comes out as the driver published it (order, flags, lengths, head), goes back
  exactly once with the number of bytes written, and the driver is notified exactly when the
  suppression rules say so (virtio 1.2, 2.7.7 and 2.7.10);
* every row of the validation catalogue (virtio_schema.queue.errors) raises its own exception class of the
  right family: a :class:`ChainError` spoils one chain only (handed out with ``error`` set, returned
  with length 0, the queue goes on); a :class:`RingError` latches the queue broken, after which it
  raises :class:`QueueBroken` and leaves guest memory alone until ``reset()`` or ``restore()``;
* every error message names the queue and the offending value;
* split indices are free-running u16 counters (wrap at 65536), and a queue can be rebuilt at a saved
  position;
* device-side misuse (returning twice, claiming too many written bytes) is a
  :class:`DeviceUsageError`, and a chain the device forgets is still returned (with a warning).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_schema.errors import DeviceUsageError, DriverError, VirtioError
from virtio_schema.fake_queue import (
    FakeDriver,
    FakeMemory,
    FakePackedDriver,
    FakeQueue,
    UsedChain,
    make_queue,
)
from virtio_schema.mem import DeviceRange, DriverRange
from virtio_schema.queue import (
    AvailIndexJump,
    BufferAddressOverflow,
    BufferIdOutOfRange,
    ChainAlreadyReturned,
    ChainDescriptor,
    ChainError,
    ChainLengthOverflow,
    ChainNeverEnds,
    ChainTooLong,
    DescChain,
    DescIndexOutOfRange,
    HeadOutOfRange,
    IndirectNotNegotiated,
    IndirectTableTooLarge,
    IndirectWithNext,
    InvalidIndirectLength,
    NestedIndirect,
    PackedQueue,
    Queue,
    QueueBroken,
    QueueState,
    ReadableAfterWritable,
    RingError,
    UnmappedIndirectTable,
    VirtQueue,
    WrittenTooMuch,
    create_queue,
    vring_need_event,
)
from virtio_schema.ring import DESC, Desc, PackedDesc
from virtio_schema.schema import DescFlags, Feature, PackedDescFlags
from virtio_schema.util import NotificationCounter

if TYPE_CHECKING:
    from _pytest.mark.structures import ParameterSet

# NEXT, WRITE and INDIRECT have the same values in both formats (virtio 1.2, 2.7.5 and 2.8.1)
NEXT = int(DescFlags.NEXT)
WRITE = int(DescFlags.WRITE)
INDIRECT = int(DescFlags.INDIRECT)
AVAIL = int(PackedDescFlags.AVAIL)
USED = int(PackedDescFlags.USED)
F_INDIRECT = int(Feature.INDIRECT_DESC)
F_EVENT_IDX = int(Feature.EVENT_IDX)
TOP = 1 << 64
QUEUE = 3  # the queue index every error message must name

Q = TypeVar("Q", Queue, PackedQueue, VirtQueue)
D = TypeVar("D", FakeDriver, FakePackedDriver, FakeDriver | FakePackedDriver)
Driver = FakeDriver | FakePackedDriver
AnyFakeQueue = FakeQueue[VirtQueue, Driver]
Descs = Sequence[tuple[int, int, int]]
"""Raw descriptors as ``(addr, len, flags)``."""


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    """The ring format a test runs on."""
    return bool(request.param)


def fmt(packed: bool) -> str:
    return "packed" if packed else "split"


def take(fq: FakeQueue[Q, D]) -> DescChain:
    chain = fq.queue.next_chain()
    assert chain is not None
    return chain


def snapshot(fq: FakeQueue[Q, D]) -> list[bytes]:
    return [bytes(b) for b in fq.memory.buffers]


def drop(holder: list[DescChain]) -> None:
    """Forget the only references to the chains in ``holder`` and collect them."""
    holder.clear()
    gc.collect()


def drop_on_another_thread(holder: list[DescChain]) -> None:
    thread = threading.Thread(target=drop, args=(holder,))
    thread.start()
    thread.join()


def no_notify(d: Driver) -> bool:
    """The device asked not to be kicked, as the driver reads it (a call, so each read is fresh)."""
    return d.no_notify


def process(fq: FakeQueue[Q, D], count: int) -> list[int]:
    """Publish ``count`` one-descriptor chains, take and return each, and check that the driver
    sees each one used (which also gives its descriptors back to the fake driver); the heads (split)
    or buffer ids (packed), in order. One descriptor each: both formats advance by one per chain."""
    heads: list[int] = []
    for _ in range(count):
        head = fq.driver.publish([b"req"])
        assert head is not None
        chain = take(fq)
        assert chain.head == head
        chain.return_written(0)
        assert [(u.head, u.len) for u in fq.driver.used()] == [(head, 0)]
        heads.append(head)
    return heads


def driver_index(d: Driver, steps: int) -> int:
    """The driver's ``avail_idx``/``used_idx`` after ``steps`` one-descriptor chains from a fresh
    start: split, a free-running u16; packed, ``position | wrap_counter << 15``."""
    if isinstance(d, FakeDriver):
        return steps & 0xFFFF
    lap, pos = divmod(steps, d.size)
    return pos | (lap % 2 == 0) << 15


@dataclass(frozen=True)
class Pushed:
    """A chain a test wrote descriptor by descriptor."""

    head: int
    """Split: the head descriptor index. Packed: the ring slot of its first descriptor (what a
    :class:`ChainError` names as ``head``)."""
    id: int
    """What the used entry names: split the head index, packed the buffer id."""
    at: tuple[int, ...]
    """Where each descriptor sits: descriptor table index (split) or ring slot (packed)."""


def push(
    d: Driver, descs: Descs, *, at: Sequence[int] | None = None, buffer_id: int | None = None
) -> Pushed:
    """Make ``descs`` available as one chain, NEXT added between them and nowhere else.

    Split: written at the table indices ``at`` (default: descriptors reserved from the driver),
    then the head is pushed. Packed: written from the driver's avail position (``at`` does not
    apply), with ``buffer_id`` (default: one that differs from the head slot, so that tests tell
    the two apart)."""
    n = len(descs)
    if isinstance(d, FakePackedDriver):
        head = d.avail_pos
        bid = (head + 3) % d.size if buffer_id is None else buffer_id
        d.push_raw(
            [
                PackedDesc(addr, length, bid, flags | (NEXT if k + 1 < n else 0))
                for k, (addr, length, flags) in enumerate(descs)
            ]
        )
        return Pushed(head, bid, tuple((head + k) % d.size for k in range(n)))
    idx = tuple(at) if at is not None else tuple(d.take_descriptor() for _ in descs)
    for k, (addr, length, flags) in enumerate(descs):
        more = k + 1 < n
        d.write_desc(idx[k], addr, length, flags | (NEXT if more else 0), idx[k + 1] if more else 0)
    d.push_head(idx[0])
    return Pushed(idx[0], idx[0], idx)


def table(d: Driver, entries: Descs) -> int:
    """An indirect table holding ``entries`` in order; its address. Split links them with
    NEXT/``next``; packed writes them as given (every one of the ``len/16`` entries counts,
    virtio 1.2, 2.8.19)."""
    if isinstance(d, FakePackedDriver):
        return d.write_indirect_table([PackedDesc(a, n, 0, f) for a, n, f in entries])
    last = len(entries) - 1
    return d.write_indirect_table(
        [
            Desc(a, n, f | (NEXT if k < last else 0), k + 1 if k < last else 0)
            for k, (a, n, f) in enumerate(entries)
        ]
    )


@dataclass(frozen=True)
class RingMark:
    """What the driver had made available at one moment (see :func:`withdraw`)."""

    avail_idx: int
    ring: bytes
    """Packed: the descriptor ring's bytes (the slots a withdrawal must give back)."""


def mark(d: Driver) -> RingMark:
    return RingMark(d.avail_idx, bytes(d.ring.view) if isinstance(d, FakePackedDriver) else b"")


def withdraw(d: Driver, mark: RingMark) -> None:
    """The driver takes back everything it made available since ``mark``: a queue that looked at
    the ring again would find nothing new. Split: ``avail.idx`` goes back. Packed: the descriptor
    ring gets its bytes back (no slot can be marked neither available nor used for every lap)
    and the avail position goes back."""
    if isinstance(d, FakeDriver):
        d.set_avail_idx(mark.avail_idx)
        return
    d.ring.view[:] = mark.ring
    d.avail_pos = mark.avail_idx & 0x7FFF
    d.avail_wrap = bool(mark.avail_idx >> 15)


def split_driver(d: Driver) -> FakeDriver:
    """For the catalogue rows that only a split ring can express."""
    assert isinstance(d, FakeDriver)
    return d


def packed_driver(d: Driver) -> FakePackedDriver:
    """For the catalogue rows that only a packed ring can express."""
    assert isinstance(d, FakePackedDriver)
    return d


# --- the normal path --------------------------------------------------------------------------------


def test_returned_chain_reaches_the_driver_with_written_bytes_and_one_notification(
    packed: bool,
) -> None:
    fq = make_queue(size=8, packed=packed)
    head = fq.driver.publish([b"ping"], [16])
    assert head is not None
    chain = take(fq)
    assert fq.notifier.count == 0  # taking a chain never notifies
    assert chain.head == head
    (buf,) = chain.writable()
    fq.memory.write(buf.addr, b"pong!")
    chain.return_written(5)
    assert fq.notifier.count == 1
    assert fq.driver.used() == [UsedChain(head, 5, (b"pong!",))]
    assert fq.driver.used_idx == driver_index(fq.driver, 2 if packed else 1)  # packed: 2 slots


def test_each_return_notifies_once_without_suppression(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    for k in range(1, 6):
        process(fq, 1)
        assert fq.notifier.count == k


def test_next_chain_is_none_when_the_driver_published_nothing(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    assert fq.queue.next_chain() is None
    process(fq, 2)
    assert fq.queue.next_chain() is None
    assert fq.queue.next_chain() is None
    assert fq.notifier.count == 2


def test_direct_chain_descriptors_as_published(packed: bool) -> None:
    fq = make_queue(size=8, index=QUEUE, packed=packed)
    d = fq.driver
    head = d.publish([b"abc", b"defgh"], [16, 4])
    assert head is not None
    chain = take(fq)
    assert chain.error is None
    assert chain.head == head
    assert chain.queue_index == QUEUE
    assert chain.driver_mem is fq.memory  # what the chain layer translates addresses through
    descs = chain.descriptors()
    assert len(chain) == 4
    assert list(chain) == list(descs)
    assert [c.len for c in descs] == [3, 5, 16, 4]
    assert [c.writable for c in descs] == [False, False, True, True]
    assert not any(c.indirect for c in descs)
    # desc_index: split follows the driver's next links from the head; packed counts the
    # consecutive ring slots from the driver's avail position (0 here); addr/len are the ring's
    if isinstance(d, FakePackedDriver):
        assert [c.desc_index for c in descs] == [0, 1, 2, 3]
        records = [d.ring.get(c.desc_index)[:2] for c in descs]
    else:
        index, records = head, []
        for c in descs:
            assert c.desc_index == index
            rec = d.desc_table.get(index)
            records.append((rec.addr, rec.len))
            index = rec.next
    assert [(c.addr, c.len) for c in descs] == records
    assert fq.memory.read(descs[0].addr, 3) == b"abc"
    assert fq.memory.read(descs[1].addr, 5) == b"defgh"
    assert chain.readable() == descs[:2]
    assert chain.writable() == descs[2:]
    assert chain.readable_len == 8
    assert chain.writable_len == 20
    chain.return_written(20)
    (used,) = fq.driver.used()
    assert (used.head, used.len) == (head, 20)


def test_indirect_chain_descriptors_come_from_the_table(packed: bool) -> None:
    fq = make_queue(size=8, features=F_INDIRECT, packed=packed)
    head = fq.driver.publish([b"hdr", b"body"], [8], indirect=True)
    assert head is not None
    chain = take(fq)
    assert chain.error is None
    assert chain.head == head
    descs = chain.descriptors()
    assert [d.desc_index for d in descs] == [0, 1, 2]
    assert all(d.indirect for d in descs)
    assert [d.writable for d in descs] == [False, False, True]
    assert fq.memory.read(descs[0].addr, 3) == b"hdr"
    assert fq.memory.read(descs[1].addr, 4) == b"body"
    assert (chain.readable_len, chain.writable_len, len(chain)) == (7, 8, 3)
    fq.memory.write(descs[2].addr, b"resp")
    chain.return_written(4)
    assert fq.driver.used() == [UsedChain(head, 4, (b"resp",))]


class TranslateOnly:
    """A :class:`~virtio_schema.mem.DriverMem` with ``translate`` and nothing else: no ``locate``
    fast path, as a transport's own memory may be."""

    def __init__(self, inner: FakeMemory) -> None:
        self.inner = inner

    def translate(self, driver_range: DriverRange) -> DeviceRange | None:
        return self.inner.translate(driver_range)


def test_indirect_tables_are_translated_when_the_memory_has_no_locate(packed: bool) -> None:
    """The walks look an indirect table up with ``locate`` when the memory offers it; without it
    the table is translated, with the same chain as the outcome, and a table outside memory is
    still refused."""
    fq = make_queue(size=8, features=F_INDIRECT, packed=packed)
    d = fq.driver
    queue = create_queue(
        d.queue_memory(), 8, TranslateOnly(fq.memory), features=fq.queue.features,
        notify=fq.notifier,
    )  # fmt: skip
    head = d.publish([b"hdr", b"body"], [8], indirect=True)
    assert head is not None
    chain = queue.next_chain()
    assert chain is not None
    assert chain.error is None
    assert [(x.len, x.writable, x.desc_index) for x in chain.descriptors()] == [
        (3, False, 0),
        (4, False, 1),
        (8, True, 2),
    ]
    assert fq.memory.read(chain.descriptors()[1].addr, 4) == b"body"
    chain.return_written(0)
    _indirect_head(d, 0x1000, 32)  # a table where no memory is
    bad = queue.next_chain()
    assert bad is not None
    assert isinstance(bad.error, UnmappedIndirectTable)
    assert "0x1000" in str(bad.error)
    bad.return_written(0)


def test_split_direct_descriptors_followed_by_one_indirect_descriptor_accepted() -> None:
    """A mixed chain (virtio 1.2, 2.7.5.3): the indirect descriptor's own WRITE flag is ignored.
    (A packed ring refuses it: ``test_packed_queue``.)"""
    fq = make_queue(size=8, features=F_INDIRECT)
    d = fq.driver
    hdr = d.alloc_buffer(b"hdr")
    body = d.alloc_buffer(b"body!")
    out = d.alloc_buffer(6)
    tbl = d.write_indirect_table([Desc(body, 5, NEXT, 1), Desc(out, 6, WRITE, 0)])
    d.write_desc(2, hdr, 3, NEXT, 5)
    d.write_desc(5, tbl, 32, INDIRECT | WRITE, 0)
    d.push_head(2)
    chain = take(fq)
    assert chain.error is None
    assert chain.descriptors() == (
        ChainDescriptor(hdr, 3, False, 2, False),
        ChainDescriptor(body, 5, False, 0, True),
        ChainDescriptor(out, 6, True, 1, True),
    )
    assert (chain.readable_len, chain.writable_len) == (8, 6)
    chain.return_written(6)
    assert [(u.head, u.len) for u in d.used()] == [(2, 6)]


def test_zero_length_descriptors_accepted_even_with_a_garbage_address(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    d = fq.driver
    buf = d.alloc_buffer(b"data")
    p = push(
        d,
        [(0xDEAD_BEEF_0000, 0, 0), (buf, 4, 0), (TOP - 1, 0, WRITE)],  # far outside fake memory
        at=(1, 2, 3),
    )
    chain = take(fq)
    assert chain.error is None
    assert [(c.addr, c.len, c.writable, c.desc_index) for c in chain.descriptors()] == [
        (0xDEAD_BEEF_0000, 0, False, p.at[0]),
        (buf, 4, False, p.at[1]),
        (TOP - 1, 0, True, p.at[2]),
    ]
    assert (chain.readable_len, chain.writable_len) == (4, 0)
    chain.return_written(0)
    assert [(u.head, u.len) for u in d.used()] == [(p.id, 0)]


def test_chain_of_exactly_queue_size_descriptors_accepted(packed: bool) -> None:
    """Split: four linked descriptors; packed: a chain over all four ring slots."""
    fq = make_queue(size=4, packed=packed)
    d = fq.driver
    buf = d.alloc_buffer(8)
    p = push(d, [(buf, 8, 0)] * 4, at=(0, 1, 2, 3))
    chain = take(fq)
    assert chain.error is None
    assert [c.desc_index for c in chain.descriptors()] == [0, 1, 2, 3]
    chain.return_written(0)
    assert [(u.head, u.len) for u in d.used()] == [(p.id, 0)]


def test_split_chain_of_queue_size_descriptors_counting_indirect_entries_accepted() -> None:
    fq = make_queue(size=4, features=F_INDIRECT)
    d = fq.driver
    buf = d.alloc_buffer(8)
    tbl = d.write_indirect_table([Desc(buf, 8, NEXT, 1), Desc(buf, 8, NEXT, 2), Desc(buf, 8, 0, 0)])
    d.write_desc(0, buf, 8, NEXT, 1)
    d.write_desc(1, tbl, 48, INDIRECT, 0)
    d.push_head(0)
    chain = take(fq)
    assert chain.error is None
    assert len(chain) == 4
    chain.return_written(0)


def test_split_next_just_below_queue_size_accepted() -> None:
    fq = make_queue(size=8)
    d = fq.driver
    buf = d.alloc_buffer(8)
    d.write_desc(0, buf, 8, NEXT, 7)
    d.write_desc(7, buf, 8, WRITE, 0)
    d.push_head(0)
    chain = take(fq)
    assert chain.error is None
    assert [c.desc_index for c in chain.descriptors()] == [0, 7]
    chain.return_written(0)


def test_total_length_of_exactly_2_32_minus_1_accepted(packed: bool) -> None:
    """Lengths are not translated when the chain is taken, so no memory is needed."""
    fq = make_queue(size=8, packed=packed)
    push(fq.driver, [(0x1000_0000, 1 << 31, 0), (0x2000_0000, (1 << 31) - 1, WRITE)], at=(0, 1))
    chain = take(fq)
    assert chain.error is None
    assert chain.readable_len + chain.writable_len == (1 << 32) - 1
    chain.return_written(0)


def test_buffer_ending_exactly_at_2_64_accepted(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    push(fq.driver, [(TOP - 16, 16, 0)], at=(0,))
    chain = take(fq)
    assert chain.error is None
    assert chain.descriptors() == (ChainDescriptor(TOP - 16, 16, False, 0, False),)
    chain.return_written(0)


def test_split_indirect_table_of_65535_entries_passes_the_size_check() -> None:
    """(A packed ring uses all ``len/16`` entries, so there 65535 entries are a chain too long:
    ``test_packed_queue``.)"""
    fq = make_queue(size=8, features=F_INDIRECT)
    d = fq.driver
    buf = d.alloc_buffer(b"x")
    tbl = fq.memory.alloc(65535 * 16, 16)
    fq.memory.write(tbl, DESC.pack(Desc(buf, 1, 0, 0)))
    d.write_desc(0, tbl, 65535 * 16, INDIRECT, 0)
    d.push_head(0)
    chain = take(fq)
    assert chain.error is None
    assert chain.descriptors() == (ChainDescriptor(buf, 1, False, 0, True),)
    chain.return_written(0)


def test_full_ring_of_queue_size_chains_accepted(packed: bool) -> None:
    """Split: ``avail.idx`` exactly the queue size ahead; packed: every slot available."""
    fq = make_queue(size=4, packed=packed)
    heads = [fq.driver.publish([b"r"]) for _ in range(4)]
    assert None not in heads
    assert fq.driver.publish([b"r"]) is None  # the ring is full
    assert fq.queue.pending() == (1 if packed else 4)  # packed: no index counts them
    chains = [take(fq) for _ in range(4)]
    assert [c.head for c in chains] == heads
    assert fq.queue.next_chain() is None
    for c in chains:
        c.return_written(0)
    assert [u.head for u in fq.driver.used()] == heads


# --- the validation catalogue: chain errors ------------------------------------------------------

BOTH = (False, True)
SPLIT_ONLY = (False,)
PACKED_ONLY = (True,)


@dataclass(frozen=True)
class BadChain:
    """A malformed chain: ``build`` makes it available and returns ``(chain, value)`` where
    ``value`` is the offending value as the error message must show it. ``formats`` lists the ring
    formats (``packed`` values) that can express it: split-only rows need ``next`` fields, a
    packed-only row breaks a rule only packed rings have."""

    id: str
    error: type[ChainError]
    build: Callable[[Driver], tuple[Pushed, str]]
    size: int = 8
    features: int = F_INDIRECT
    formats: tuple[bool, ...] = BOTH


def _indirect_head(d: Driver, tbl: int, length: int, flags: int = INDIRECT) -> Pushed:
    return push(d, [(tbl, length, flags)], at=(5,))


def _next_equal_to_size(d: Driver) -> tuple[Pushed, str]:
    sd = split_driver(d)
    sd.write_desc(5, sd.alloc_buffer(8), 8, NEXT, sd.size)
    sd.push_head(5)
    return Pushed(5, 5, (5,)), f"next = {sd.size}"


def _next_ffff(d: Driver) -> tuple[Pushed, str]:
    sd = split_driver(d)
    buf = sd.alloc_buffer(8)
    sd.write_desc(5, buf, 8, NEXT, 6)
    sd.write_desc(6, buf, 8, WRITE | NEXT, 0xFFFF)
    sd.push_head(5)
    return Pushed(5, 5, (5, 6)), "next = 65535"


def _next_past_indirect_table(d: Driver) -> tuple[Pushed, str]:
    sd = split_driver(d)
    buf = sd.alloc_buffer(8)
    tbl = sd.write_indirect_table([Desc(buf, 8, NEXT, 2), Desc(buf, 8, 0, 0)])
    return _indirect_head(sd, tbl, 32), "next = 2"


def _next_loop(d: Driver) -> tuple[Pushed, str]:
    sd = split_driver(d)
    buf = sd.alloc_buffer(8)
    sd.write_desc(5, buf, 8, NEXT, 6)
    sd.write_desc(6, buf, 8, NEXT, 5)
    sd.push_head(5)
    return Pushed(5, 5, (5, 6)), f"longer than {sd.size}"


def _self_loop(d: Driver) -> tuple[Pushed, str]:
    sd = split_driver(d)
    sd.write_desc(5, sd.alloc_buffer(8), 8, WRITE | NEXT, 5)
    sd.push_head(5)
    return Pushed(5, 5, (5,)), f"longer than {sd.size}"


def _one_more_than_size(d: Driver) -> tuple[Pushed, str]:
    """size 4: 0 -> 1 -> 2 -> 3 -> 0: the fifth descriptor is one too many."""
    sd = split_driver(d)
    buf = sd.alloc_buffer(8)
    for i in range(4):
        sd.write_desc(i, buf, 8, NEXT, (i + 1) % 4)
    sd.push_head(0)
    return Pushed(0, 0, (0, 1, 2, 3)), "longer than 4"


def _indirect_loop(d: Driver) -> tuple[Pushed, str]:
    sd = split_driver(d)
    buf = sd.alloc_buffer(8)
    tbl = sd.write_indirect_table([Desc(buf, 8, NEXT, 1), Desc(buf, 8, NEXT, 0)])
    return _indirect_head(sd, tbl, 32), f"longer than {sd.size}"


def _direct_plus_indirect_over_size(d: Driver) -> tuple[Pushed, str]:
    """size 4: two direct descriptors and a table of three entries make five buffers."""
    buf = d.alloc_buffer(8)
    tbl = table(d, [(buf, 8, 0)] * 3)
    return push(d, [(buf, 8, 0), (buf, 8, 0), (tbl, 48, INDIRECT)], at=(0, 1, 2)), "longer than 4"


def _indirect_table_over_size(d: Driver) -> tuple[Pushed, str]:
    """size 4: an indirect table of five entries (split: chained; packed: all count)."""
    buf = d.alloc_buffer(8)
    tbl = table(d, [(buf, 8, 0)] * 5)
    return push(d, [(tbl, 80, INDIRECT)], at=(1,)), "longer than 4"


def _readable_after_writable(d: Driver) -> tuple[Pushed, str]:
    buf = d.alloc_buffer(8)
    p = push(d, [(buf, 8, WRITE), (buf, 8, 0)], at=(5, 6))
    return p, f"descriptor {p.at[1]}"


def _readable_after_writable_indirect(d: Driver) -> tuple[Pushed, str]:
    buf = d.alloc_buffer(8)
    tbl = table(d, [(buf, 8, 0), (buf, 8, WRITE), (buf, 8, 0)])
    return _indirect_head(d, tbl, 48), "descriptor 2"


def _readable_after_writable_mixed(d: Driver) -> tuple[Pushed, str]:
    """A writable direct descriptor, then an indirect table that starts with a readable entry."""
    buf = d.alloc_buffer(8)
    tbl = table(d, [(buf, 8, 0)])
    return push(d, [(buf, 8, WRITE), (tbl, 16, INDIRECT)], at=(5, 6)), "descriptor 0"


def _length_overflow(d: Driver) -> tuple[Pushed, str]:
    p = push(d, [(0x1000_0000, 1 << 31, 0), (0x2000_0000, 1 << 31, WRITE)], at=(5, 6))
    return p, str(1 << 32)


def _length_overflow_indirect(d: Driver) -> tuple[Pushed, str]:
    tbl = table(d, [(0x1000_0000, 0xFFFF_FFFF, 0), (0x2000_0000, 1, WRITE)])
    return _indirect_head(d, tbl, 32), str(1 << 32)


def _address_overflow(d: Driver) -> tuple[Pushed, str]:
    return push(d, [(TOP - 8, 16, 0)], at=(5,)), f"{TOP - 8:#x}"


def _address_overflow_indirect(d: Driver) -> tuple[Pushed, str]:
    buf = d.alloc_buffer(8)
    tbl = table(d, [(buf, 8, 0), (TOP - 1, 2, WRITE)])
    return _indirect_head(d, tbl, 32), f"{TOP - 1:#x}"


def _indirect_not_negotiated(d: Driver) -> tuple[Pushed, str]:
    buf = d.alloc_buffer(8)
    tbl = table(d, [(buf, 8, 0)])
    p = push(d, [(tbl, 16, INDIRECT)], at=(6,))
    return p, f"descriptor {p.at[0]}"


def _nested_indirect(d: Driver) -> tuple[Pushed, str]:
    buf = d.alloc_buffer(8)
    inner = table(d, [(buf, 8, 0)])
    outer = table(d, [(buf, 8, 0), (inner, 16, INDIRECT)])
    return _indirect_head(d, outer, 32), "entry 1"


def _indirect_with_next(d: Driver) -> tuple[Pushed, str]:
    buf = d.alloc_buffer(8)
    tbl = table(d, [(buf, 8, 0)])
    p = push(d, [(tbl, 16, INDIRECT), (buf, 8, WRITE)], at=(6, 7))
    return p, f"descriptor {p.at[0]}"


def _indirect_after_direct(d: Driver) -> tuple[Pushed, str]:
    """Packed: an indirect descriptor must be alone in its chain (virtio 1.2, 2.8.19)."""
    buf = d.alloc_buffer(8)
    tbl = table(packed_driver(d), [(buf, 8, WRITE)])
    p = push(d, [(buf, 8, 0), (tbl, 16, INDIRECT)])
    return p, f"descriptor {p.at[1]}"


def _indirect_len(length: int) -> Callable[[Driver], tuple[Pushed, str]]:
    def build(d: Driver) -> tuple[Pushed, str]:
        tbl = table(d, [(d.alloc_buffer(8), 8, 0)] * 2)
        return _indirect_head(d, tbl, length), f"len {length}"

    return build


def _indirect_too_large(length: int, entries: int) -> Callable[[Driver], tuple[Pushed, str]]:
    def build(d: Driver) -> tuple[Pushed, str]:
        tbl = table(d, [(d.alloc_buffer(8), 8, 0)])
        return _indirect_head(d, tbl, length), f"{entries} entries"

    return build


def _indirect_at(addr: int, length: int) -> Callable[[Driver], tuple[Pushed, str]]:
    def build(d: Driver) -> tuple[Pushed, str]:
        return _indirect_head(d, addr, length), f"{addr:#x}"

    return build


_MEM_END = 0x10000 + (1 << 22)  # FakeMemory's default region: [0x10000, 0x10000 + 4 MiB)

BAD_CHAINS = [
    BadChain("next-equal-to-size", DescIndexOutOfRange, _next_equal_to_size, formats=SPLIT_ONLY),
    BadChain("next-ffff", DescIndexOutOfRange, _next_ffff, formats=SPLIT_ONLY),
    BadChain(
        "next-past-indirect-table",
        DescIndexOutOfRange,
        _next_past_indirect_table,
        formats=SPLIT_ONLY,
    ),
    BadChain("next-loop", ChainTooLong, _next_loop, formats=SPLIT_ONLY),
    BadChain("self-loop", ChainTooLong, _self_loop, formats=SPLIT_ONLY),
    BadChain("size-plus-one", ChainTooLong, _one_more_than_size, size=4, formats=SPLIT_ONLY),
    BadChain("indirect-loop", ChainTooLong, _indirect_loop, formats=SPLIT_ONLY),
    BadChain(
        "direct-plus-indirect",
        ChainTooLong,
        _direct_plus_indirect_over_size,
        size=4,
        formats=SPLIT_ONLY,
    ),
    BadChain("indirect-over-size", ChainTooLong, _indirect_table_over_size, size=4),
    BadChain("readable-after-writable", ReadableAfterWritable, _readable_after_writable),
    BadChain(
        "readable-after-writable-indirect", ReadableAfterWritable, _readable_after_writable_indirect
    ),
    BadChain(
        "readable-after-writable-mixed",
        ReadableAfterWritable,
        _readable_after_writable_mixed,
        formats=SPLIT_ONLY,
    ),
    BadChain("length-overflow", ChainLengthOverflow, _length_overflow),
    BadChain("length-overflow-indirect", ChainLengthOverflow, _length_overflow_indirect),
    BadChain("address-overflow", BufferAddressOverflow, _address_overflow),
    BadChain("address-overflow-indirect", BufferAddressOverflow, _address_overflow_indirect),
    BadChain(
        "indirect-not-negotiated", IndirectNotNegotiated, _indirect_not_negotiated, features=0
    ),
    BadChain("nested-indirect", NestedIndirect, _nested_indirect),
    BadChain("indirect-with-next", IndirectWithNext, _indirect_with_next),
    BadChain(
        "indirect-after-direct", IndirectWithNext, _indirect_after_direct, formats=PACKED_ONLY
    ),
    BadChain("indirect-len-0", InvalidIndirectLength, _indirect_len(0)),
    BadChain("indirect-len-24", InvalidIndirectLength, _indirect_len(24)),
    BadChain("indirect-len-8", InvalidIndirectLength, _indirect_len(8)),
    BadChain(
        "indirect-65536-entries", IndirectTableTooLarge, _indirect_too_large(65536 * 16, 65536)
    ),
    BadChain("indirect-huge", IndirectTableTooLarge, _indirect_too_large(0xFFFF_FFF0, 0x0FFF_FFFF)),
    BadChain("indirect-unmapped", UnmappedIndirectTable, _indirect_at(0x1000, 32)),
    BadChain("indirect-past-memory-end", UnmappedIndirectTable, _indirect_at(_MEM_END - 16, 32)),
    BadChain("indirect-wraps-2-64", UnmappedIndirectTable, _indirect_at(TOP - 16, 32)),
    BadChain(
        "indirect-65535-entries-unmapped", UnmappedIndirectTable, _indirect_at(0x1000, 65535 * 16)
    ),
]


def _catalogue(cases: Sequence[BadChain]) -> list[ParameterSet]:
    """One test per (row, format it applies to), with ids like ``split-next-loop``."""
    return [
        pytest.param(case, packed, id=f"{fmt(packed)}-{case.id}")
        for case in cases
        for packed in case.formats
    ]


def _bad_queue(case: BadChain, packed: bool) -> tuple[AnyFakeQueue, DescChain, Pushed, str]:
    """Packed queues start at the last ring slot, so that every chain of two or more descriptors
    straddles the end of the ring (split queues at index 0, with the rows' own table indices)."""
    last = case.size - 1
    start = QueueState(last, last) if packed else QueueState()
    fq = make_queue(size=case.size, features=case.features, index=QUEUE, packed=packed, state=start)
    pushed, value = case.build(fq.driver)
    chain = take(fq)
    return fq, chain, pushed, value


def _assert_queue_still_works(fq: FakeQueue[Q, D]) -> None:
    """A good chain published after the bad one comes out intact and reaches the driver."""
    d = fq.driver
    buf = d.alloc_buffer(b"good")
    out = d.alloc_buffer(4)
    p = push(d, [(buf, 4, 0), (out, 4, WRITE)], at=(0, 1))
    chain = take(fq)
    assert chain.error is None
    assert chain.descriptors() == (
        ChainDescriptor(buf, 4, False, p.at[0], False),
        ChainDescriptor(out, 4, True, p.at[1], False),
    )
    chain.return_written(3)
    assert [(u.head, u.len) for u in d.used()] == [(p.id, 3)]
    assert fq.queue.broken is None


@pytest.mark.parametrize(("case", "packed"), _catalogue(BAD_CHAINS))
def test_malformed_chain_is_handed_out_with_its_error_and_returned_with_length_0(
    case: BadChain, packed: bool
) -> None:
    """``head`` in the error is where the chain starts (split: its head index; packed: its first
    ring slot); the chain itself, and the used entry, carry what the driver gets back (split: the
    head; packed: the buffer id)."""
    fq, chain, pushed, _ = _bad_queue(case, packed)
    err = chain.error
    assert type(err) is case.error
    assert isinstance(err, ChainError)
    assert isinstance(err, DriverError)
    assert not isinstance(err, RingError)
    assert err.queue == QUEUE
    assert err.head == pushed.head
    assert chain.head == pushed.id
    assert len(chain) == 0
    for read in (chain.descriptors, chain.readable, chain.writable):
        with pytest.raises(case.error) as info:
            read()
        assert info.value is err
    assert fq.queue.broken is None
    chain.return_written()
    assert chain.returned
    assert [(u.head, u.len) for u in fq.driver.used()] == [(pushed.id, 0)]
    _assert_queue_still_works(fq)


@pytest.mark.parametrize(("case", "packed"), _catalogue(BAD_CHAINS))
def test_malformed_chain_returned_with_length_0_even_if_device_claims_bytes(
    case: BadChain, packed: bool
) -> None:
    """``DescChain.return_written``: "A malformed chain is returned with 0 whatever n says"."""
    fq, chain, pushed, _ = _bad_queue(case, packed)
    try:
        chain.return_written(16)
    finally:  # never leave the chain to the garbage collector, even when this test fails
        if not chain.returned:
            chain.return_written(0)
    assert chain.returned
    assert [(u.head, u.len) for u in fq.driver.used()] == [(pushed.id, 0)]
    _assert_queue_still_works(fq)


@pytest.mark.parametrize(("case", "packed"), _catalogue(BAD_CHAINS))
def test_chain_error_message_names_queue_and_offending_value(case: BadChain, packed: bool) -> None:
    _, chain, pushed, value = _bad_queue(case, packed)
    message = str(chain.error)
    assert f"queue {QUEUE}" in message
    assert f"head {pushed.head}" in message
    assert value in message
    chain.return_written()


_WITH_BLOCK_ROWS = ("next-equal-to-size", "readable-after-writable", "nested-indirect")


@pytest.mark.parametrize(
    ("case", "packed"), _catalogue([c for c in BAD_CHAINS if c.id in _WITH_BLOCK_ROWS])
)
def test_malformed_chain_in_a_with_block_is_returned_with_length_0(
    case: BadChain, packed: bool
) -> None:
    fq, chain, pushed, _ = _bad_queue(case, packed)
    with pytest.raises(case.error), chain:
        chain.descriptors()
    assert chain.returned
    assert [(u.head, u.len) for u in fq.driver.used()] == [(pushed.id, 0)]


# --- the validation catalogue: ring errors latch the queue broken --------------------------------


@dataclass(frozen=True)
class BadRing:
    """``corrupt`` breaks the ring; returns the offending value as the message must show it.
    Split rings break on their indices (``avail.idx``, the heads), packed rings on a chain whose
    end or buffer id cannot be found (so it cannot be returned)."""

    id: str
    error: type[RingError]
    corrupt: Callable[[Driver], str]
    packed: bool = False


def _jump_past_size(d: Driver) -> str:
    sd = split_driver(d)
    sd.set_avail_idx(sd.avail_idx + sd.size + 1)
    return f"avail.idx {sd.avail_idx}"


def _jump_backwards(d: Driver) -> str:
    sd = split_driver(d)
    sd.set_avail_idx(sd.avail_idx - 1 - sd.size)
    return f"avail.idx {sd.avail_idx}"


def _head_equal_to_size(d: Driver) -> str:
    sd = split_driver(d)
    sd.push_head(sd.size)
    return f"= {sd.size}"


def _head_ffff(d: Driver) -> str:
    split_driver(d).push_head(0xFFFF)
    return "= 65535"


def _never_ends(d: Driver) -> str:
    """NEXT on every slot of the ring: no last descriptor, no buffer id."""
    buf = d.alloc_buffer(8)
    push(packed_driver(d), [(buf, 8, NEXT)] * d.size)
    return f"NEXT on all {d.size} slots"


def _never_ends_indirect(d: Driver) -> str:
    """The same with INDIRECT|NEXT descriptors: the chain error cannot be returned either."""
    tbl = table(d, [(d.alloc_buffer(8), 8, 0)])
    push(packed_driver(d), [(tbl, 16, INDIRECT | NEXT)] * d.size)
    return f"NEXT on all {d.size} slots"


def _buffer_id(value: int) -> Callable[[Driver], str]:
    def corrupt(d: Driver) -> str:
        push(packed_driver(d), [(d.alloc_buffer(8), 8, WRITE)], buffer_id=value)
        return f"buffer id {value}"

    return corrupt


def _buffer_id_of_a_malformed_chain(d: Driver) -> str:
    """A chain error is handed out and returned, but not with an id the driver never gave."""
    buf = d.alloc_buffer(8)
    push(packed_driver(d), [(buf, 8, WRITE), (buf, 8, 0)], buffer_id=d.size)
    return f"buffer id {d.size}"


BAD_RINGS = [
    BadRing("avail-jump", AvailIndexJump, _jump_past_size),
    BadRing("avail-backwards", AvailIndexJump, _jump_backwards),
    BadRing("head-equal-to-size", HeadOutOfRange, _head_equal_to_size),
    BadRing("head-ffff", HeadOutOfRange, _head_ffff),
    BadRing("chain-never-ends", ChainNeverEnds, _never_ends, packed=True),
    BadRing("indirect-chain-never-ends", ChainNeverEnds, _never_ends_indirect, packed=True),
    BadRing("buffer-id-equal-to-size", BufferIdOutOfRange, _buffer_id(8), packed=True),
    BadRing("buffer-id-ffff", BufferIdOutOfRange, _buffer_id(0xFFFF), packed=True),
    BadRing(
        "buffer-id-of-malformed-chain",
        BufferIdOutOfRange,
        _buffer_id_of_a_malformed_chain,
        packed=True,
    ),
]
RING_IDS = [f"{fmt(c.packed)}-{c.id}" for c in BAD_RINGS]


@pytest.mark.parametrize("case", BAD_RINGS, ids=RING_IDS)
def test_ring_error_latches_queue_broken(case: BadRing) -> None:
    fq = make_queue(size=8, index=QUEUE, packed=case.packed)
    d = fq.driver
    process(fq, 2)
    assert d.publish([b"held"], [4]) is not None
    held = take(fq)
    d.used()
    position = fq.queue.state()
    good = mark(d)
    value = case.corrupt(d)
    with pytest.raises(QueueBroken) as info:
        fq.queue.next_chain()
    cause = info.value.cause
    assert type(cause) is case.error
    assert isinstance(cause, RingError)
    assert isinstance(info.value, DriverError)
    assert fq.queue.broken is cause
    assert "broken" in repr(fq.queue)
    assert fq.queue.state() == position  # the bad entry was not consumed
    message = str(cause)
    assert f"queue {QUEUE}" in message
    assert value in message
    assert f"queue {QUEUE}" in str(info.value)
    # the driver "repairs" the ring: a queue that re-read it would now see nothing pending
    withdraw(d, good)
    before = snapshot(fq)
    for _ in range(3):
        with pytest.raises(QueueBroken) as again:
            fq.queue.next_chain()
        assert again.value.cause is cause
    with pytest.raises(QueueBroken):
        fq.queue.pending()
    fq.queue.disable_notifications()
    with pytest.raises(QueueBroken):
        fq.queue.enable_notifications()
    held.return_written(4)  # accepted, but the ring is left alone
    assert held.returned
    assert snapshot(fq) == before
    assert d.used() == []
    assert fq.notifier.count == 2


@pytest.mark.parametrize("case", BAD_RINGS, ids=RING_IDS)
def test_broken_queue_leaves_memory_alone_when_a_held_chain_is_dropped(case: BadRing) -> None:
    fq = make_queue(size=8, index=QUEUE, packed=case.packed)
    assert fq.driver.publish([b"held"], [4]) is not None
    held = [take(fq)]
    case.corrupt(fq.driver)
    with pytest.raises(QueueBroken):
        fq.queue.next_chain()
    before = snapshot(fq)
    with pytest.warns(ResourceWarning):
        drop(held)
    with pytest.raises(QueueBroken):
        fq.queue.next_chain()
    assert snapshot(fq) == before


@pytest.mark.parametrize("case", BAD_RINGS, ids=RING_IDS)
def test_reset_clears_the_broken_latch(case: BadRing) -> None:
    fq = make_queue(size=8, index=QUEUE, packed=case.packed)
    d = fq.driver
    fresh = mark(d)
    case.corrupt(d)
    with pytest.raises(QueueBroken):
        fq.queue.next_chain()
    fq.queue.reset()
    assert fq.queue.broken is None
    withdraw(d, fresh)  # the driver re-initialises its ring too
    assert fq.queue.next_chain() is None
    assert process(fq, 1) == [0]
    assert fq.queue.state() == QueueState(1, 1)


@pytest.mark.parametrize("case", BAD_RINGS, ids=RING_IDS)
def test_restore_clears_the_broken_latch(case: BadRing) -> None:
    fq = make_queue(size=8, index=QUEUE, packed=case.packed)
    d = fq.driver
    process(fq, 3)
    good = mark(d)
    case.corrupt(d)
    with pytest.raises(QueueBroken):
        fq.queue.next_chain()
    withdraw(d, good)
    fq.queue.restore(QueueState(next_avail=3, next_used=3))
    assert fq.queue.broken is None
    process(fq, 1)
    assert fq.queue.state() == QueueState(4, 4)


def test_split_pending_counts_available_chains_and_latches_on_a_jump() -> None:
    fq = make_queue(size=8, index=QUEUE)
    d = fq.driver
    assert fq.queue.pending() == 0
    for _ in range(3):
        d.publish([b"r"], [1])
    assert fq.queue.pending() == 3
    chain = take(fq)
    assert fq.queue.pending() == 2
    chain.return_written(0)
    assert fq.queue.pending() == 2
    d.set_avail_idx(1 + 8 + 1)
    with pytest.raises(QueueBroken) as info:
        fq.queue.pending()
    assert isinstance(info.value.cause, AvailIndexJump)
    assert fq.queue.broken is info.value.cause
    d.set_avail_idx(3)
    with pytest.raises(QueueBroken):
        fq.queue.next_chain()
    with pytest.raises(QueueBroken):
        fq.queue.pending()


# --- indices: wrap, save and restore ---------------------------------------------------------------


def test_split_indices_wrap_at_65536() -> None:
    fq = make_queue(size=16, state=QueueState(next_avail=65534, next_used=65534))
    d = fq.driver
    heads = [d.publish([b"q"], [2]) for _ in range(5)]
    assert d.avail_idx == 3
    assert fq.queue.pending() == 5
    lengths = []
    for k in range(5):
        chain = take(fq)
        assert chain.head == heads[k]
        fq.memory.write(chain.writable()[0].addr, b"ok")
        chain.return_written(k % 3)
        lengths.append(k % 3)
        if k == 1:
            assert d.used_idx == 0
    assert fq.queue.next_chain() is None
    assert d.used_idx == 3
    assert fq.queue.state() == QueueState(3, 3)
    assert (fq.queue.next_avail, fq.queue.next_used) == (3, 3)
    # the entries sit in slots 14, 15, 0, 1, 2
    slots = [d.used_ring.elem(s) for s in (14, 15, 0, 1, 2)]
    assert [(e.id, e.len) for e in slots] == list(zip(heads, lengths, strict=True))
    assert [(u.head, u.len) for u in d.used()] == list(zip(heads, lengths, strict=True))


def test_queue_rebuilt_from_saved_state_continues(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    d = fq.driver
    process(fq, 3)
    d.used()
    saved = fq.queue.state()
    assert saved == QueueState(next_avail=3, next_used=3)
    notifier = NotificationCounter()
    second = create_queue(
        d.queue_memory(), 8, fq.memory, features=fq.queue.features, notify=notifier, state=saved
    )
    assert type(second) is type(fq.queue)
    heads = [d.publish([], [4]) for _ in range(2)]
    for head in heads:
        chain = second.next_chain()
        assert chain is not None
        assert chain.head == head
        fq.memory.write(chain.writable()[0].addr, b"abcd")
        chain.return_written(4)
    assert second.next_chain() is None
    assert d.used() == [UsedChain(h, 4, (b"abcd",)) for h in heads if h is not None]
    assert d.used_idx == driver_index(d, 5)
    assert second.state() == QueueState(5, 5)
    assert notifier.count == 2


def test_chain_held_across_restore_is_stale(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    d = fq.driver
    process(fq, 1)
    d.publish([], [4])
    held = take(fq)
    d.used()
    fq.queue.restore(QueueState(next_avail=2, next_used=1))
    before = snapshot(fq)
    held.return_written(4)
    assert held.returned
    assert snapshot(fq) == before
    assert fq.queue.state() == QueueState(2, 1)


def test_queue_state_refuses_values_outside_u16() -> None:
    for bad in (-1, 65536):
        with pytest.raises(DeviceUsageError):
            QueueState(next_avail=bad)
        with pytest.raises(DeviceUsageError):
            QueueState(next_used=bad)


def test_reset_returns_indices_to_zero_and_makes_held_chains_stale(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    d = fq.driver
    process(fq, 2)
    d.publish([], [4])
    held = take(fq)
    assert fq.queue.state() == QueueState(3, 2)
    count = fq.notifier.count
    fq.queue.reset()
    assert fq.queue.state() == QueueState(0, 0)  # and, packed, both wrap counters 1
    if isinstance(fq.queue, Queue):  # the split queue also offers its indices as properties
        assert (fq.queue.next_avail, fq.queue.next_used) == (0, 0)
    assert fq.queue.broken is None
    before = snapshot(fq)
    held.return_written(4)
    assert held.returned
    assert snapshot(fq) == before
    assert fq.notifier.count == count
    with pytest.raises(ChainAlreadyReturned):
        held.return_written(0)


# --- out-of-order returns ----------------------------------------------------------------------


def test_out_of_order_returns_reach_the_driver_in_return_order(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    d = fq.driver
    heads = [d.publish([b"r"], [8]) for _ in range(3)]
    chains = [take(fq) for _ in range(3)]
    assert [c.head for c in chains] == heads
    for chain, (data, n) in zip(
        (chains[2], chains[0], chains[1]),
        ((b"two!!", 5), (b"zer", 3), (b"one-one!", 8)),
        strict=True,
    ):
        fq.memory.write(chain.writable()[0].addr, data)
        chain.return_written(n)
    assert d.used() == [
        UsedChain(chains[2].head, 5, (b"two!!",)),
        UsedChain(chains[0].head, 3, (b"zer",)),
        UsedChain(chains[1].head, 8, (b"one-one!",)),
    ]
    assert fq.notifier.count == 3
    assert d.in_flight == 0
    assert d.used_idx == d.avail_idx  # every slot came back: the driver's indices meet again


# --- device misuse -----------------------------------------------------------------------------------


def test_returning_twice_is_chain_already_returned(packed: bool) -> None:
    fq = make_queue(size=8, index=QUEUE, packed=packed)
    head = fq.driver.publish([b"r"], [8])
    chain = take(fq)
    chain.return_written(2)
    with pytest.raises(ChainAlreadyReturned) as info:
        chain.return_written(2)
    err = info.value
    assert isinstance(err, DeviceUsageError)
    assert not isinstance(err, DriverError)
    assert f"queue {QUEUE}" in str(err)
    assert f"head {head}" in str(err)
    with pytest.raises(ChainAlreadyReturned):
        chain.return_written()
    with pytest.raises(ChainAlreadyReturned):
        chain.written = 1
    with pytest.raises(ChainAlreadyReturned):
        chain.descriptors()
    assert [(u.head, u.len) for u in fq.driver.used()] == [(head, 2)]
    assert fq.notifier.count == 1


def test_return_written_more_than_writable_is_refused_and_chain_stays_held(packed: bool) -> None:
    fq = make_queue(size=8, index=QUEUE, packed=packed)
    head = fq.driver.publish([b"r"], [8, 4])
    chain = take(fq)
    assert chain.writable_len == 12
    for n in (13, 1 << 40, -1):
        with pytest.raises(WrittenTooMuch) as info:
            chain.return_written(n)
        assert isinstance(info.value, DeviceUsageError)
        assert not isinstance(info.value, DriverError)
        assert info.value.written == n
        assert info.value.writable == 12
    assert str(13) in str(WrittenTooMuch(QUEUE, chain.head, 13, 12))
    assert not chain.returned
    assert fq.driver.used() == []
    chain.return_written(12)
    assert [(u.head, u.len) for u in fq.driver.used()] == [(head, 12)]


def test_written_too_much_message_names_queue_and_value(packed: bool) -> None:
    fq = make_queue(size=8, index=QUEUE, packed=packed)
    fq.driver.publish([b"r"], [8])
    chain = take(fq)
    with pytest.raises(WrittenTooMuch) as info:
        chain.return_written(9)
    assert f"queue {QUEUE}" in str(info.value)
    assert "9" in str(info.value)
    chain.return_written(0)


def test_setting_written_past_writable_is_refused(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    head = fq.driver.publish([b"r"], [8])
    chain = take(fq)
    chain.written = 8
    with pytest.raises(WrittenTooMuch) as info:
        chain.written = 9
    assert isinstance(info.value, DeviceUsageError)
    assert chain.written == 8
    chain.return_written()
    assert [(u.head, u.len) for u in fq.driver.used()] == [(head, 8)]


def test_readable_only_chain_cannot_claim_written_bytes(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    fq.driver.publish([b"only readable"])
    chain = take(fq)
    assert chain.writable_len == 0
    with pytest.raises(WrittenTooMuch):
        chain.return_written(1)
    with pytest.raises(WrittenTooMuch):
        chain.written = 1
    chain.return_written()


# --- with blocks and forgotten chains -------------------------------------------------------------


def test_with_block_returns_chain_with_written(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    head = fq.driver.publish([b"r"], [8])
    assert head is not None
    with take(fq) as chain:
        fq.memory.write(chain.writable()[0].addr, b"abc")
        chain.written = 3
    assert chain.returned
    assert fq.driver.used() == [UsedChain(head, 3, (b"abc",))]


def test_with_block_returns_zero_when_nothing_set(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    head = fq.driver.publish([b"r"], [8])
    with take(fq) as chain:
        assert chain.writable_len == 8
    assert chain.returned
    assert [(u.head, u.len) for u in fq.driver.used()] == [(head, 0)]
    assert fq.notifier.count == 1


def test_with_block_returns_chain_when_an_exception_escapes(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    head = fq.driver.publish([b"r"], [8])
    chain = take(fq)

    def device_code_that_fails() -> None:
        with chain:
            chain.written = 2
            raise RuntimeError("device bug")

    with pytest.raises(RuntimeError, match="device bug"):
        device_code_that_fails()
    assert chain.returned
    assert [(u.head, u.len) for u in fq.driver.used()] == [(head, 2)]


def test_with_block_after_explicit_return_does_not_return_again(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    head = fq.driver.publish([b"r"], [8])
    with take(fq) as chain:
        chain.return_written(5)
    assert [(u.head, u.len) for u in fq.driver.used()] == [(head, 5)]
    assert fq.notifier.count == 1


def test_dropped_chain_warns_and_is_returned_with_length_0(packed: bool) -> None:
    fq = make_queue(size=8, index=QUEUE, packed=packed)
    head = fq.driver.publish([b"r"], [8])
    held = [take(fq)]
    held[0].written = 5  # never returned: the driver must not believe those bytes
    with pytest.warns(ResourceWarning, match=f"queue {QUEUE}: chain at head {head}"):
        drop(held)
    assert [(u.head, u.len) for u in fq.driver.used()] == [(head, 0)]
    assert fq.notifier.count == 1
    process(fq, 1)  # the slot came back: the queue goes on


def test_chain_dropped_on_another_thread_is_returned_by_the_next_call(packed: bool) -> None:
    """The queue belongs to the transport's thread: a chain collected elsewhere is handed back
    there, at the queue's next ``next_chain()``, not written from the collecting thread."""
    fq = make_queue(size=8, index=QUEUE, packed=packed)
    head = fq.driver.publish([b"r"], [8])
    held = [take(fq)]
    before = snapshot(fq)
    with pytest.warns(ResourceWarning, match=f"chain at head {head}"):
        drop_on_another_thread(held)
    assert snapshot(fq) == before  # nothing written from the collecting thread
    assert fq.notifier.count == 0
    assert fq.queue.next_chain() is None
    assert [(u.head, u.len) for u in fq.driver.used()] == [(head, 0)]
    assert fq.notifier.count == 1


def test_dropped_malformed_chain_is_returned_with_length_0(packed: bool) -> None:
    fq = make_queue(size=8, index=QUEUE, packed=packed)
    pushed, _ = _readable_after_writable(fq.driver)
    held = [take(fq)]
    assert isinstance(held[0].error, ReadableAfterWritable)
    with pytest.warns(ResourceWarning):
        drop(held)
    assert [(u.head, u.len) for u in fq.driver.used()] == [(pushed.id, 0)]


# --- used buffer notifications (split only: NO_INTERRUPT and used_event; packed: test_packed_queue) --


def test_split_no_interrupt_suppresses_notifications_without_event_idx() -> None:
    fq = make_queue(size=8)
    process(fq, 1)
    assert fq.notifier.take() == 1
    fq.driver.set_no_interrupt(True)
    process(fq, 3)
    assert fq.notifier.take() == 0
    fq.driver.set_no_interrupt(False)
    process(fq, 2)
    assert fq.notifier.take() == 2


def test_split_no_interrupt_is_a_bit_test() -> None:
    fq = make_queue(size=8)
    fq.driver.set_avail_flags(0x8001)  # NO_INTERRUPT plus an unrelated bit
    process(fq, 2)
    assert fq.notifier.take() == 0
    fq.driver.set_avail_flags(0x8000)  # only the unrelated bit
    process(fq, 2)
    assert fq.notifier.take() == 2


def _notified_at(fq: FakeQueue[Q, D], chains: list[DescChain]) -> list[int]:
    """Return ``chains`` one at a time; the 1-based positions of the returns that notified."""
    out: list[int] = []
    for k, chain in enumerate(chains, start=1):
        before = fq.notifier.count
        chain.return_written(0)
        assert fq.notifier.count - before in (0, 1)
        if fq.notifier.count > before:
            out.append(k)
    return out


def test_split_event_idx_notifies_when_used_idx_passes_used_event() -> None:
    fq = make_queue(size=16, features=F_EVENT_IDX)
    d = fq.driver
    d.set_used_event(5)
    for _ in range(10):
        d.publish([b"r"])
    chains = [take(fq) for _ in range(10)]
    # return 1: the first decision after start always notifies (QEMU's signalled_used_valid);
    # return 6: used.idx moves 5 -> 6, past used_event = 5; no other return passes it
    assert _notified_at(fq, chains) == [1, 6]


def test_split_event_idx_notifies_when_the_driver_asks_again() -> None:
    """A driver that re-arms ``used_event = used.idx`` after each interrupt (Linux's
    ``virtqueue_enable_cb``) is notified for every return."""
    fq = make_queue(size=16, features=F_EVENT_IDX)
    d = fq.driver
    d.set_used_event(100)
    for _ in range(4):
        d.publish([b"r"], [1])
    chains = [take(fq) for _ in range(4)]
    notified = []
    for k, chain in enumerate(chains, start=1):
        before = fq.notifier.count
        chain.return_written(0)
        if fq.notifier.count > before:
            notified.append(k)
        d.set_used_event(d.used_idx)
    assert notified == [1, 2, 3, 4]


def test_split_event_idx_ignores_no_interrupt() -> None:
    fq = make_queue(size=16, features=F_EVENT_IDX)
    d = fq.driver
    for _ in range(3):
        d.publish([b"r"], [1])
    chains = [take(fq) for _ in range(3)]
    d.set_no_interrupt(True)
    d.set_used_event(1)
    chains[0].return_written(0)  # first decision: notifies
    chains[1].return_written(0)  # used.idx 1 -> 2 passes used_event 1: notifies despite the flag
    assert fq.notifier.take() == 2
    d.set_no_interrupt(False)
    d.set_used_event(100)
    chains[2].return_written(0)  # flag clear, but used_event not passed: no notification
    assert fq.notifier.take() == 0


def test_split_event_idx_first_decision_after_restore_notifies_again() -> None:
    fq = make_queue(size=16, features=F_EVENT_IDX)
    d = fq.driver
    d.set_used_event(1000)
    process(fq, 2)
    assert fq.notifier.take() == 1
    fq.queue.restore(fq.queue.state())
    process(fq, 2)
    assert fq.notifier.take() == 1


def test_split_event_idx_notification_across_the_wrap() -> None:
    fq = make_queue(size=16, features=F_EVENT_IDX, state=QueueState(65534, 65534))
    d = fq.driver
    d.set_used_event(0xFFFF)
    for _ in range(4):
        d.publish([b"r"], [1])
    chains = [take(fq) for _ in range(4)]
    # 1: first decision (-> 65535); 2: 65535 -> 0 passes used_event 65535; 3, 4: no
    assert _notified_at(fq, chains) == [1, 2]
    assert d.used_idx == 2


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),
        (0, 0, 0, False),  # nothing moved
        (4, 5, 4, True),
        (5, 5, 4, False),  # event not yet reached
        (5, 10, 0, True),
        (10, 10, 0, False),
        (3, 10, 4, False),  # already passed before old
        (0xFFFF, 0, 0xFFFE, True),  # wrap
        (0, 1, 0xFFFF, True),
        (1, 1, 0xFFFE, False),
        (0xFFFE, 2, 0xFFFE, True),
        (0x7FFF, 0x8000, 0x7FFF, True),
        (0x8000, 0x8000, 0x7FFF, False),
    ],
)
def test_vring_need_event_cases(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


@given(event=st.integers(0, 0xFFFF), old=st.integers(0, 0xFFFF), moved=st.integers(0, 300))
def test_vring_need_event_true_iff_event_is_passed(event: int, old: int, moved: int) -> None:
    """Moving from ``old`` by ``moved`` steps passes ``event`` iff one of the indices
    ``old, old+1, ..., new-1`` (mod 2**16) equals it."""
    new = (old + moved) & 0xFFFF
    passed = any((old + k) & 0xFFFF == event for k in range(moved))
    assert vring_need_event(event, new, old) is passed


# --- driver kicks (available buffer notifications) --------------------------------------------------
# NO_NOTIFY and avail_event are split words; the packed device event area: test_packed_queue


def test_split_disable_notifications_sets_no_notify_keeping_other_used_flags() -> None:
    fq = make_queue(size=8)
    d = fq.driver
    assert d.kick_needed(d.avail_idx)
    d.used_ring.set_flags(0x8000)
    fq.queue.disable_notifications()
    assert d.used_ring.flags() == 0x8001
    assert no_notify(d)
    old = d.avail_idx
    d.publish([b"r"], [1])
    assert not d.kick_needed(old)
    with take(fq):
        pass
    fq.queue.disable_notifications()  # disabling twice changes nothing
    assert d.used_ring.flags() == 0x8001


def test_split_enable_notifications_clears_only_no_notify() -> None:
    fq = make_queue(size=8)
    d = fq.driver
    d.used_ring.set_flags(0x8000)
    fq.queue.disable_notifications()
    assert no_notify(d)
    assert fq.queue.enable_notifications() is False  # nothing pending
    assert not no_notify(d)
    assert d.used_ring.flags() == 0x8000  # the unrelated bit is kept


def test_enable_notifications_asks_for_kicks_again(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    d = fq.driver
    fq.queue.disable_notifications()
    old = d.avail_idx
    d.publish([b"r"], [1])
    assert not d.kick_needed(old)
    with take(fq):
        pass
    assert fq.queue.enable_notifications() is False  # nothing pending
    assert not no_notify(d)
    old = d.avail_idx
    d.publish([b"r"], [1])
    assert d.kick_needed(old)
    with take(fq):
        pass


def test_enable_notifications_reports_chains_published_while_disabled(packed: bool) -> None:
    fq = make_queue(size=8, packed=packed)
    d = fq.driver
    fq.queue.disable_notifications()
    old = d.avail_idx
    head = d.publish([b"r"], [1])
    assert not d.kick_needed(old)  # the driver did not kick ...
    assert fq.queue.enable_notifications() is True  # ... so the device must look
    assert not no_notify(d)
    chain = take(fq)
    assert chain.head == head
    chain.return_written(0)
    assert fq.queue.enable_notifications() is False


def test_split_event_idx_avail_event_follows_taken_chains_while_enabled() -> None:
    fq = make_queue(size=8, features=F_EVENT_IDX)
    d = fq.driver
    assert d.avail_event == 0
    old = d.avail_idx
    d.publish([b"r"], [1])
    assert d.kick_needed(old)
    with take(fq):
        pass
    assert d.avail_event == 1
    old = d.avail_idx
    d.publish([b"r"], [1])
    assert d.kick_needed(old)
    with take(fq):
        pass
    assert d.avail_event == 2
    assert not no_notify(d)  # with EVENT_IDX the flags are not used


def test_split_event_idx_disabled_stops_avail_event_and_enable_rechecks() -> None:
    fq = make_queue(size=8, features=F_EVENT_IDX)
    d = fq.driver
    process(fq, 2)
    assert d.avail_event == 2
    fq.queue.disable_notifications()
    assert d.used_ring.flags() == 0  # EVENT_IDX: NO_NOTIFY is not how kicks are suppressed
    old = d.avail_idx
    d.publish([b"r"], [1])
    assert d.kick_needed(old)  # avail_event 2 was still armed
    with take(fq):
        pass
    assert d.avail_event == 2  # not advanced while disabled
    old = d.avail_idx
    d.publish([b"r"], [1])
    assert not d.kick_needed(old)  # 3 -> 4 does not pass avail_event 2: no kick
    assert fq.queue.enable_notifications() is True  # the chain published meanwhile
    assert d.avail_event == 3  # re-armed at next_avail
    with take(fq):
        pass
    assert d.avail_event == 4
    assert fq.queue.enable_notifications() is False
    old = d.avail_idx
    d.publish([b"r"], [1])
    assert d.kick_needed(old)
    with take(fq):
        pass


# --- robustness against arbitrary ring contents (split only) ---------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_split_arbitrary_rings_give_only_virtio_errors_and_writes_only_the_used_ring(
    data: st.DataObject,
) -> None:
    size = data.draw(st.sampled_from([1, 2, 4, 8]), label="size")
    features = data.draw(st.sampled_from([0, F_INDIRECT, F_EVENT_IDX, F_INDIRECT | F_EVENT_IDX]))
    mem = FakeMemory(1 << 16)
    fq = make_queue(size=size, features=features, memory=mem)
    d = fq.driver
    tables = [mem.alloc(64, 16) for _ in range(2)]
    buf = d.alloc_buffer(64)
    addrs = st.sampled_from([*tables, buf, 0, TOP - 16, TOP - 1]) | st.integers(0, TOP - 1)
    lens = st.sampled_from([0, 1, 16, 24, 32, 64, 1 << 31, (1 << 32) - 1]) | st.integers(
        0, (1 << 32) - 1
    )
    flags = st.integers(0, 7) | st.integers(0, 0xFFFF)
    descs = st.builds(Desc, addrs, lens, flags, st.integers(0, size + 1) | st.integers(0, 0xFFFF))
    for i in range(size):
        d.desc_table.set(i, data.draw(descs))
    for t in tables:
        for k in range(4):
            mem.write(t + 16 * k, DESC.pack(data.draw(descs)))
    for head in data.draw(
        st.lists(st.integers(0, size) | st.integers(0, 0xFFFF), max_size=size + 1)
    ):
        d.push_head(head)
    if data.draw(st.booleans()):
        d.set_avail_idx(data.draw(st.integers(0, 0xFFFF)))
    used_lo = d.used_addr - 0x10000
    used_hi = used_lo + 6 + 8 * size
    before = bytes(mem.buffers[0])
    broken: QueueBroken | None = None
    for _ in range(size + 3):
        try:
            chain = fq.queue.next_chain()
        except QueueBroken as error:
            broken = error
            break
        if chain is None:
            break
        if chain.error is None:
            got = chain.descriptors()
            assert 1 <= len(got) <= size
            kinds = [c.writable for c in got]
            assert kinds == sorted(kinds)  # readable ones first
            where = [c.indirect for c in got]
            assert where == sorted(where)  # direct ones first, then one table
            assert features & F_INDIRECT or not any(where)
            assert chain.readable_len == sum(c.len for c in got if not c.writable)
            assert chain.writable_len == sum(c.len for c in got if c.writable)
            assert chain.readable_len + chain.writable_len <= (1 << 32) - 1
            for c in got:
                assert c.addr + c.len <= TOP
                if not c.indirect:
                    rec = d.desc_table.get(c.desc_index)
                    assert (c.addr, c.len) == (rec.addr, rec.len)
            chain.return_written(min(chain.writable_len, 7))
        else:
            assert isinstance(chain.error, VirtioError)
            chain.return_written()
    if broken is not None:
        assert isinstance(broken.cause, AvailIndexJump | HeadOutOfRange)
    after = bytes(mem.buffers[0])
    assert after[:used_lo] == before[:used_lo]
    assert after[used_hi:] == before[used_hi:]


# --- turn budgets (both formats) ----------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_budget_limits_the_chains_next_chain_hands_out_until_it_is_set_again(
    packed: bool,
) -> None:
    fq = make_queue(8, packed=packed)
    for k in range(6):
        fq.driver.publish([bytes([k])], [])
    queue = fq.queue
    unset = queue.budget
    assert unset is None  # no limit unless a transport sets one

    def drain() -> int:
        n = 0
        while (chain := queue.next_chain()) is not None:
            chain.return_written(0)
            n += 1
        return n

    queue.set_budget(4)
    assert drain() == 4
    assert queue.budget == 0  # spent: work may remain
    queue.set_budget(4)
    assert drain() == 2
    assert queue.budget == 2  # the ring ran dry first
    queue.set_budget(None)
    fq.driver.publish([b"x"], [])
    assert drain() == 1


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_zero_budget_hands_out_nothing_and_reads_no_ring(packed: bool) -> None:
    fq = make_queue(8, packed=packed)
    fq.driver.publish([b"a"], [])
    fq.queue.set_budget(0)
    assert fq.queue.next_chain() is None
    assert fq.driver.used() == []
    fq.queue.set_budget(1)
    chain = fq.queue.next_chain()
    assert chain is not None
    chain.return_written(0)


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(DeviceUsageError, match="budget -1 < 0"):
        make_queue(8).queue.set_budget(-1)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_enable_notifications_reports_no_work_once_the_turn_budget_is_spent(packed: bool) -> None:
    """The drain, re-enable, re-check idiom must end when the budget is spent: next_chain answers
    None then, and a re-check that said "more work" would spin forever."""
    fq = make_queue(8, packed=packed)
    for _ in range(3):
        fq.driver.publish([b"x"], [])
    queue = fq.queue
    queue.set_budget(2)
    queue.disable_notifications()
    for _ in range(2):
        chain = queue.next_chain()
        assert chain is not None
        chain.return_written(0)
    assert queue.next_chain() is None
    assert queue.enable_notifications() is False  # work remains, but not for this turn
    queue.set_budget(2)
    assert queue.enable_notifications() is True  # the next turn sees it
    chain = queue.next_chain()
    assert chain is not None
    chain.return_written(0)
