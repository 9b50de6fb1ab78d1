"""Indirect tables read in one snapshot (``queue.base.sequential_table``) give the walk's outcome.

Both queue formats take a table that is one chain in table order (as Linux and DPDK build them) in
one copy, and every other table entry by entry. Here random tables, mostly near that shape and
often just off it, are walked both ways (the snapshot path switched off for the second walk) and
must give the same chain or the same error, field for field.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import virtio_schema.queue.base as base_module
import virtio_schema.queue.packed as packed_module
import virtio_schema.queue.split as split_module
from virtio_schema.errors import DriverError
from virtio_schema.fake_queue import FakeDriver, FakeMemory, FakePackedDriver, FakeQueue, make_queue
from virtio_schema.queue import DescChain, QueueBroken, VirtQueue
from virtio_schema.ring import PackedDesc
from virtio_schema.schema import DescFlags, Feature

NEXT, WRITE, INDIRECT = int(DescFlags.NEXT), int(DescFlags.WRITE), int(DescFlags.INDIRECT)
_SPLIT = struct.Struct("<QLHH")  # addr, len, flags, next
_PACKED = struct.Struct("<QLHH")  # addr, len, id, flags
QSIZE = 512  # room for a table of 256 entries

# an entry: (where its buffer is, its length, its flag bits, how its next field is set)
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
    """Bend drawn entries into a table the fast path takes: NEXT on all but the last, the next
    fields in order, valid buffers, readable ones first."""
    n = len(entries)
    out = []
    for k, (_where, length, flags, _nxt) in enumerate(entries):
        out.append(("ok", min(length, 4096), (flags & WRITE) | (NEXT if k + 1 < n else 0), "seq"))
    first_writable = next((k for k, e in enumerate(out) if e[2] & WRITE), n)
    return [
        (w, ln, f | (WRITE if k >= first_writable else 0), x) for k, (w, ln, f, x) in enumerate(out)
    ]


# one thing changed in a table the fast path would take: (entry, field, value), the entry an
# index modulo the table's length
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


def _table_bytes(mem: FakeMemory, table: list[Entry], packed: bool) -> bytes:
    n = len(table)
    out = bytearray()
    for k, (where, length, flags, nxt) in enumerate(table):
        addr = {
            "ok": mem.alloc(min(length, 4096) or 1),
            "unmapped": 0x7000_0000,
            "high": 1 << 63,
            "near-end": (1 << 64) - 8,
        }[where]
        next_index = {"seq": k + 1, "zero": 0, "self": k, "past": n + 1, "seq+256": k + 257}[nxt]
        if packed:
            out += _PACKED.pack(addr, length, k, flags)
        else:
            out += _SPLIT.pack(addr, length, flags, next_index)
    return bytes(out)


def _publish(
    packed: bool, table: list[Entry], before: int | None, qsize: int
) -> tuple[FakeQueue[VirtQueue, FakeDriver | FakePackedDriver], FakeMemory]:
    """A fresh queue whose first chain is ``table`` behind an INDIRECT descriptor (split: behind
    a direct descriptor with flags ``before`` too, if given)."""
    mem = FakeMemory(1 << 20)
    fq = make_queue(qsize, packed=packed, features=Feature.INDIRECT_DESC, memory=mem)
    raw = _table_bytes(mem, table, packed)
    table_addr = mem.alloc(len(raw))
    mem.write(table_addr, raw)
    d = fq.driver
    if isinstance(d, FakePackedDriver):
        d.push_raw([PackedDesc(table_addr, len(raw), 5, INDIRECT)])
    else:
        last = d.take_descriptor()
        d.write_desc(last, table_addr, len(raw), INDIRECT, 0)
        head = last
        if before is not None:
            head = d.take_descriptor()
            d.write_desc(head, mem.alloc(64), 64, before | NEXT, last)
        d.push_head(head)
    return fq, mem


@contextmanager
def _snapshots_off() -> Iterator[None]:
    with (  # a head that is one indirect descriptor (base), a table reached otherwise (formats)
        mock.patch.object(base_module, "sequential_table", return_value=None),
        mock.patch.object(split_module, "sequential_table", return_value=None),
        mock.patch.object(packed_module, "sequential_table", return_value=None),
    ):
        yield


def _outcome(packed: bool, table: list[Entry], before: int | None, qsize: int = QSIZE) -> object:
    """What taking the first chain gives: its fields, or the error raised (type and text)."""
    fq, mem = _publish(packed, table, before, qsize)
    try:
        chain = fq.queue.next_chain()
    except DriverError as exc:
        cause = exc.cause if isinstance(exc, QueueBroken) else exc
        return type(cause), str(cause)
    assert isinstance(chain, DescChain)
    fields = (
        chain.head,
        type(chain.error),
        str(chain.error),
        list(chain._addrs),
        list(chain._lens),
        chain.descriptors() if chain.error is None else None,  # indices and flags as well
        chain._n_readable,
        chain.readable_len,
        chain.writable_len,
        chain._table_at,
        chain._slots,
    )
    chain.return_written(0)
    mem.close()
    return fields


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
# the shapes the snapshot must refuse one by one, each off the fast shape in one place: a next
# field right in its low byte only, a readable entry after a writable one (in the middle, last),
# NEXT on the last entry, a writable entry before the table
@example(drawn=_SHAPE, bend=True, change=(1, 3, "seq+256"), before=None, qsize=QSIZE)
@example(drawn=_SHAPE, bend=True, change=(2, 2, NEXT), before=None, qsize=QSIZE)
@example(drawn=_SHAPE, bend=True, change=(3, 2, 0), before=None, qsize=QSIZE)
@example(drawn=_SHAPE, bend=True, change=(3, 2, NEXT | WRITE), before=None, qsize=QSIZE)
@example(drawn=_SHAPE, bend=True, change=(0, 2, NEXT | WRITE), before=WRITE, qsize=QSIZE)
def test_a_table_walks_the_same_with_and_without_the_snapshot(
    drawn: list[Entry],
    bend: bool,
    change: tuple[int, int, str | int] | None,
    before: int | None,
    qsize: int,
    packed: bool,
) -> None:
    """Drawn tables as they come, or bent into the fast path's shape with at most one thing
    changed; behind a direct descriptor (split) or not; in queues shorter than the table."""
    table = _change(_sequential(drawn), change) if bend else drawn
    if packed:
        before = None  # a packed INDIRECT descriptor is alone in its chain
    fast = _outcome(packed, table, before, qsize)
    with _snapshots_off():
        slow = _outcome(packed, table, before, qsize)
    assert fast == slow


@BOTH
@pytest.mark.parametrize("n", [1, 3, 16, 256])
def test_a_table_as_linux_builds_it_is_taken_in_one_snapshot(packed: bool, n: int) -> None:
    """A header, data buffers, a status byte (1: one readable entry): the snapshot path takes
    it, and gives what the walk gives."""
    table: list[Entry] = [("ok", 16, NEXT if n > 1 else 0, "seq")]
    table += [("ok", 512, NEXT | WRITE, "seq")] * max(n - 2, 0)
    if n > 1:
        table.append(("ok", 1, WRITE, "seq"))
    real = base_module.sequential_table
    taken: list[object] = []

    def recording(*args: Any, **kwargs: Any) -> object:
        got = real(*args, **kwargs)
        taken.append(got)
        return got

    module = packed_module if packed else split_module
    with (
        mock.patch.object(base_module, "sequential_table", recording),
        mock.patch.object(module, "sequential_table", recording),
    ):
        fast = _outcome(packed, table, None)
    assert len(taken) == 1
    assert taken[0] is not None  # the snapshot path took the table
    with _snapshots_off():
        slow = _outcome(packed, table, None)
    assert fast == slow
    assert isinstance(fast, tuple)
    assert fast[1] is type(None)  # a good chain, no error
