"""The one chain validator (:mod:`virtio_schema.queue.walk`) judged against a model of the catalogue,
on indirect tables drawn at random.

An indirect table is where a driver has the most freedom: up to 65535 entries it fills as it likes,
linked by ``next`` (split, virtio 1.2, 2.7.5.3.2) or in table order (packed, 2.8.19). Here random
tables, mostly a chain in table order as Linux and DPDK build them and often just off it in one
field, are put behind an INDIRECT descriptor (split: sometimes after a direct descriptor) and taken
from a fresh queue. :func:`model` restates the rules the walk applies to a table, in the order the
walk applies them, and says what the chain must be: its buffers, or the first rule it breaks and the
entry that breaks it. ``check_chain`` (what dissectors use) must say the same as ``next_chain``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from virtio_schema.fake_queue import FakeDriver, FakeMemory, FakePackedDriver, FakeQueue, make_queue
from virtio_schema.queue import (
    BufferAddressOverflow,
    ChainDescriptor,
    ChainError,
    ChainLengthOverflow,
    ChainTooLong,
    CheckedChain,
    DescChain,
    DescIndexOutOfRange,
    NestedIndirect,
    ReadableAfterWritable,
    VirtQueue,
)
from virtio_schema.ring import DESC, PACKED_DESC, PackedDesc
from virtio_schema.schema import DescFlags, Feature

NEXT, WRITE, INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)
_SPLIT = DESC.struct  # addr, len, flags, next (virtio 1.2, 2.7.5)
_PACKED = PACKED_DESC.struct  # addr, len, id, flags (virtio 1.2, 2.8.13)
QSIZE = 512  # room for a table of 256 entries
BUFFER_ID = 1  # the packed chain's buffer id: below every queue size drawn
TOP = 1 << 64
U32_MAX = (1 << 32) - 1
BEFORE_LEN = 64  # the direct descriptor a split chain may have before its INDIRECT one

# an entry as drawn: (where its buffer is, its length, its flag bits, how its next field is set)
Entry = tuple[str, int, int, str]

entries = st.lists(
    st.tuples(
        st.sampled_from(["ok", "ok", "ok", "unmapped", "high", "near-end"]),
        st.sampled_from([0, 1, 16, 512, 4096, 0xFFFFFFFF]),
        st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, NEXT | 0x80, WRITE | 0x100]),
        st.sampled_from(["seq", "seq", "seq", "zero", "self", "past", "seq+256"]),
    ),
    min_size=1,
    max_size=20,
)


def _sequential(entries: list[Entry]) -> list[Entry]:
    """Bend drawn entries into a table as Linux builds it: NEXT on all but the last, the next
    fields in order, valid buffers, readable ones first."""
    n = len(entries)
    out = []
    for k, (_where, length, flags, _nxt) in enumerate(entries):
        out.append(("ok", min(length, 4096), (flags & WRITE) | (NEXT if k + 1 < n else 0), "seq"))
    first_writable = next((k for k, e in enumerate(out) if e[2] & WRITE), n)
    return [
        (w, ln, f | (WRITE if k >= first_writable else 0), x) for k, (w, ln, f, x) in enumerate(out)
    ]


# one thing changed in a Linux-shaped table: (entry, field, value), the entry an index modulo the
# table's length
changes = st.one_of(
    st.none(),
    st.tuples(st.integers(0, 19), st.just(0), st.sampled_from(["unmapped", "high", "near-end"])),
    st.tuples(st.integers(0, 19), st.just(1), st.sampled_from([0, 0xFFFFFFFF])),
    st.tuples(
        st.integers(0, 19), st.just(2), st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT])
    ),
    st.tuples(st.integers(0, 19), st.just(3), st.sampled_from(["zero", "self", "past", "seq+256"])),
)


def _change(table: list[Entry], change: tuple[int, int, str | int] | None) -> list[Entry]:
    if change is None:
        return table
    k, field, value = change
    k %= len(table)
    where, length, flags, nxt = table[k]
    if field == 0:
        where = str(value)
    elif field == 1:
        length = int(value)
    elif field == 2:
        flags = int(value)
    else:
        nxt = str(value)
    return [*table[:k], (where, length, flags, nxt), *table[k + 1 :]]


@dataclass(frozen=True)
class Laid:
    """A table as written to memory: per entry its address, length, flags and next index."""

    addrs: list[int]
    lens: list[int]
    flags: list[int]
    nexts: list[int]


def _lay(mem: FakeMemory, table: list[Entry]) -> Laid:
    n = len(table)
    addrs = [
        {
            "ok": mem.alloc(min(length, 4096) or 1),
            "unmapped": 0x7000_0000,  # outside the fake memory: the walk does not translate buffers
            "high": 1 << 63,
            "near-end": TOP - 8,
        }[where]
        for where, length, _flags, _nxt in table
    ]
    nexts = [
        {"seq": k + 1, "zero": 0, "self": k, "past": n + 1, "seq+256": k + 257}[nxt]
        for k, (_w, _l, _f, nxt) in enumerate(table)
    ]
    return Laid(addrs, [e[1] for e in table], [e[2] for e in table], nexts)


def _raw(laid: Laid, packed: bool) -> bytes:
    out = bytearray()
    for k in range(len(laid.addrs)):
        if packed:  # a table entry's id means nothing (virtio 1.2, 2.8.19): the index, to see it
            out += _PACKED.pack(laid.addrs[k], laid.lens[k], k, laid.flags[k])
        else:
            out += _SPLIT.pack(laid.addrs[k], laid.lens[k], laid.flags[k], laid.nexts[k])
    return bytes(out)


@dataclass(frozen=True)
class Published:
    fq: FakeQueue[VirtQueue, FakeDriver | FakePackedDriver]
    at: int
    """Where ``check_chain`` finds the chain: the head (split) or the ring slot (packed)."""
    head: int
    """What the chain is named by: the head (split) or the buffer id (packed)."""
    before: ChainDescriptor | None
    laid: Laid


def _publish(packed: bool, table: list[Entry], before: int | None, qsize: int) -> Published:
    """A fresh queue whose first chain is ``table`` behind an INDIRECT descriptor (split: behind
    a direct descriptor with flags ``before`` too, if given)."""
    mem = FakeMemory(1 << 20)
    fq = make_queue(qsize, packed=packed, features=Feature.INDIRECT_DESC, memory=mem)
    laid = _lay(mem, table)
    raw = _raw(laid, packed)
    table_addr = mem.alloc(len(raw))
    mem.write(table_addr, raw)
    d = fq.driver
    first: ChainDescriptor | None = None
    if isinstance(d, FakePackedDriver):
        at = fq.queue.next_avail
        d.push_raw([PackedDesc(table_addr, len(raw), BUFFER_ID, INDIRECT)])
        return Published(fq, at, BUFFER_ID, None, laid)
    last = d.take_descriptor()
    d.write_desc(last, table_addr, len(raw), INDIRECT, 0)
    head = last
    if before is not None:
        head = d.take_descriptor()
        addr = mem.alloc(BEFORE_LEN)
        d.write_desc(head, addr, BEFORE_LEN, before | NEXT, last)
        first = ChainDescriptor(addr, BEFORE_LEN, bool(before & WRITE), head, False)
    d.push_head(head)
    return Published(fq, head, head, first, laid)


# --- the model ------------------------------------------------------------------------------------

Outcome = tuple[type[ChainError], int | None] | tuple[ChainDescriptor, ...]
"""What a chain must be: the error class and the entry it names (``None`` if it names none),
or its buffers in chain order."""


def model(laid: Laid, before: ChainDescriptor | None, packed: bool, qsize: int) -> Outcome:
    """The table's chain by the rules (virtio 1.2, 2.7.4.2, 2.7.5.3, 2.8.19; virtio_schema.queue.errors):
    an entry is INDIRECT again (nested), or is one buffer more than the queue size, or passes the
    end of the address space, or is readable after a writable one; a split entry with NEXT names
    an entry past the table; the buffers total more than a u32. Split follows ``next`` from entry
    0; packed takes every entry in order, NEXT meaning nothing. Buffers are not translated here
    (the chain layer does that when it reads them)."""
    buffers: list[ChainDescriptor] = [] if before is None else [before]
    n = len(laid.addrs)
    k = 0
    while True:
        addr, length, flags = laid.addrs[k], laid.lens[k], laid.flags[k]
        if flags & INDIRECT:
            return NestedIndirect, k
        if len(buffers) >= qsize:
            return ChainTooLong, None
        if addr + length > TOP:
            return BufferAddressOverflow, k
        writable = bool(flags & WRITE)
        if not writable and any(b.writable for b in buffers):
            return ReadableAfterWritable, k
        buffers.append(ChainDescriptor(addr, length, writable, k, True))
        if packed:
            k += 1
            if k == n:
                break
            continue
        if not flags & NEXT:
            break
        if laid.nexts[k] >= n:
            return DescIndexOutOfRange, k
        k = laid.nexts[k]
    if sum(b.len for b in buffers) > U32_MAX:
        return ChainLengthOverflow, None
    return tuple(buffers)


def _outcome(error: ChainError | None, chain: DescChain | None) -> Outcome:
    if error is not None:
        index = getattr(error, "index", None)
        return type(error), index if isinstance(index, int) else None
    assert chain is not None
    return chain.descriptors()


def _same(checked: CheckedChain, chain: DescChain) -> None:
    """``check_chain`` reports what ``next_chain`` hands out: the head, the buffers, the error."""
    assert checked.head == chain.head
    assert type(checked.error) is type(chain.error)
    assert str(checked.error) == str(chain.error)
    got, want = checked.buffers, chain.buffers
    assert (got.addrs, got.lens, got.desc_index) == (want.addrs, want.lens, want.desc_index)
    assert (got.n_readable, got.readable_len, got.writable_len, got.table_start) == (
        want.n_readable,
        want.readable_len,
        want.writable_len,
        want.table_start,
    )


def _take(p: Published) -> DescChain:
    checked = p.fq.queue.check_chain(p.at)  # before taking: check_chain changes nothing
    chain = p.fq.queue.next_chain()
    assert chain is not None
    _same(checked, chain)
    return chain


# a blk-like table: a readable header, two writable data buffers, a writable status byte
_SHAPE: list[Entry] = [("ok", 16, 0, "seq"), ("ok", 512, WRITE, "seq"), ("ok", 512, WRITE, "seq"),
                       ("ok", 1, WRITE, "seq")]  # fmt: skip
BOTH = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


@BOTH
@settings(max_examples=300, deadline=None)
@given(
    drawn=entries,
    bend=st.booleans(),
    change=changes,
    before=st.sampled_from([None, None, 0, WRITE]),
    qsize=st.sampled_from([4, 8, QSIZE]),
)
# one field off the Linux shape: a next field off by 256 (right in its low byte only), NEXT on the
# last entry, a readable entry after writable ones (in the middle, last), a writable descriptor
# before the table, a nested table, a buffer passing 2**64, a u32 overflow of the total
@example(drawn=_SHAPE, bend=True, change=(1, 3, "seq+256"), before=None, qsize=QSIZE)
@example(drawn=_SHAPE, bend=True, change=(3, 2, NEXT | WRITE), before=None, qsize=QSIZE)
@example(drawn=_SHAPE, bend=True, change=(2, 2, NEXT), before=None, qsize=QSIZE)
@example(drawn=_SHAPE, bend=True, change=(3, 2, 0), before=None, qsize=QSIZE)
@example(drawn=_SHAPE, bend=True, change=(0, 2, NEXT | WRITE), before=WRITE, qsize=QSIZE)
@example(drawn=_SHAPE, bend=True, change=(2, 2, INDIRECT), before=None, qsize=QSIZE)
@example(drawn=_SHAPE, bend=True, change=(1, 0, "near-end"), before=None, qsize=QSIZE)
@example(drawn=_SHAPE * 2, bend=True, change=(1, 1, 0xFFFFFFFF), before=None, qsize=QSIZE)
@example(drawn=_SHAPE * 2, bend=True, change=None, before=0, qsize=8)
@example(drawn=_SHAPE, bend=True, change=(2, 3, "self"), before=None, qsize=QSIZE)
def test_an_indirect_table_gives_the_chain_or_the_first_error_the_catalogue_names(
    drawn: list[Entry],
    bend: bool,
    change: tuple[int, int, str | int] | None,
    before: int | None,
    qsize: int,
    packed: bool,
) -> None:
    """Drawn tables as they come, or bent into the Linux shape with at most one thing changed;
    behind a direct descriptor (split) or not; in queues shorter than the table."""
    table = _change(_sequential(drawn), change) if bend else drawn
    if packed:
        before = None  # a packed INDIRECT descriptor is alone in its chain (virtio 1.2, 2.8.19)
    p = _publish(packed, table, before, qsize)
    chain = _take(p)
    assert chain.head == p.head
    assert _outcome(chain.error, chain) == model(p.laid, p.before, packed, qsize)
    chain.return_written(0)
    assert [u.len for u in p.fq.driver.used()] == [0]
    p.fq.memory.close()


@BOTH
@pytest.mark.parametrize("n", [1, 3, 16, 256])
def test_a_table_as_linux_builds_it_gives_its_entries_as_the_chains_buffers(
    packed: bool, n: int
) -> None:
    """A header, data buffers, a status byte (1: one readable entry): the chain is the table's
    entries in table order, readable first, and its lengths add up."""
    table: list[Entry] = [("ok", 16, NEXT if n > 1 else 0, "seq")]
    table += [("ok", 512, NEXT | WRITE, "seq")] * max(n - 2, 0)
    if n > 1:
        table.append(("ok", 1, WRITE, "seq"))
    p = _publish(packed, table, None, QSIZE)
    chain = _take(p)
    assert chain.error is None
    assert chain.descriptors() == tuple(
        ChainDescriptor(p.laid.addrs[k], p.laid.lens[k], k > 0, k, True) for k in range(n)
    )
    assert chain.readable_len == 16
    assert chain.writable_len == (512 * (n - 2) + 1 if n > 1 else 0)
    chain.return_written(chain.writable_len)
    assert [u.len for u in p.fq.driver.used()] == [chain.writable_len]
    p.fq.memory.close()
