"""Tests of :mod:`virtio_schema.chain`: walking a descriptor chain as bytes.

What a device relies on here: a :class:`ReadableChain` yields exactly the bytes the driver put in
its readable buffers, in order, whatever the buffer boundaries (zero-length buffers, indirect tables,
buffers that cross a guest-memory region boundary); a :class:`WritableChain` puts bytes exactly into
the writable buffers and the driver sees exactly those bytes, cut to the used length; records cross
buffer boundaries; the standard binary I/O protocol works (``shutil.copyfileobj``); and every
driver fault comes out as a :class:`~virtio_schema.errors.DriverError`, every misuse as a
:class:`~virtio_schema.errors.DeviceUsageError`.

The chain layer never asks which ring format a chain came from: every test runs on a split and on a
packed queue (the ``packed`` fixture, ids ``[split]`` / ``[packed]``). Only the malformed chains
that need a split ring's ``next`` field are split-only.
"""

from __future__ import annotations

import array
import io
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from typing import NamedTuple, TypeVar
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import virtio_schema.chain as chain_module
from virtio_schema import schema
from virtio_schema.chain import (
    DataRemaining,
    InsufficientData,
    InsufficientSpace,
    ReadableChain,
    Remaining,
    WritableChain,
)
from virtio_schema.errors import DeviceUsageError, DriverError
from virtio_schema.fake_queue import (
    FakeDriver,
    FakeMemory,
    FakePackedDriver,
    FakeQueue,
    UsedChain,
    make_queue,
)
from virtio_schema.layout import Layout
from virtio_schema.mem import DriverRange
from virtio_schema.queue import (
    ChainAlreadyReturned,
    ChainError,
    ChainTooLong,
    DescChain,
    DescIndexOutOfRange,
    IndirectNotNegotiated,
    PackedQueue,
    Queue,
    ReadableAfterWritable,
    UnmappedBuffer,
    VirtQueue,
    WrittenTooMuch,
    create_queue,
)
from virtio_schema.ring import PackedDesc
from virtio_schema.schema import DescFlags, Feature
from virtio_schema.util import NotificationCounter

F_INDIRECT = Feature.INDIRECT_DESC
# the same values in both ring formats (virtio 1.2, 2.7.5 and 2.8.1)
NEXT = int(DescFlags.NEXT)
WRITE = int(DescFlags.WRITE)
INDIRECT = int(DescFlags.INDIRECT)

Q = TypeVar("Q", Queue, PackedQueue, VirtQueue)
D = TypeVar("D", FakeDriver, FakePackedDriver, FakeDriver | FakePackedDriver)
Driver = FakeDriver | FakePackedDriver
AnyFakeQueue = FakeQueue[VirtQueue, Driver]


class BlkReqHdr(NamedTuple):
    type: int
    ioprio: int
    sector: int


BLK_REQ_HDR: Layout[BlkReqHdr] = Layout(schema.VirtioBlkReqHdr, BlkReqHdr, name="VirtioBlkReqHdr")


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    """The ring format a test runs on: the chain layer never asks which one it serves."""
    return bool(request.param)


def fake(
    packed: bool, size: int = 16, *, indirect: bool = False, memory_size: int = 1 << 16
) -> AnyFakeQueue:
    return make_queue(
        size,
        features=F_INDIRECT if indirect else 0,
        memory=FakeMemory(memory_size),
        packed=packed,
    )


def publish(
    fq: FakeQueue[Q, D],
    readable: list[bytes] | tuple[bytes, ...] = (),
    writable: list[int] | tuple[int, ...] = (),
    *,
    indirect: bool = False,
) -> int:
    head = fq.driver.publish(readable, writable, indirect=indirect)
    assert head is not None
    return head


def take(fq: FakeQueue[Q, D]) -> DescChain:
    chain = fq.queue.next_chain()
    assert chain is not None
    return chain


def used_one(fq: FakeQueue[Q, D]) -> UsedChain:
    (used,) = fq.driver.used()
    return used


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into consecutive pieces of ``sizes`` (the bytes each buffer holds)."""
    pieces, at = [], 0
    for n in sizes:
        pieces.append(data[at : at + n])
        at += n
    return pieces


def raw_chain(driver: Driver, descs: list[tuple[int, int, int]]) -> int:
    """Publish ``(addr, len, flags)`` descriptors as one chain (NEXT added between them); returns
    what the used entry will name. Split: fresh descriptors linked in order, the head pushed.
    Packed: consecutive slots from the driver's avail position, buffer id ``size - 1``."""
    n = len(descs)
    if isinstance(driver, FakePackedDriver):
        buffer_id = driver.size - 1
        driver.push_raw(
            [
                PackedDesc(addr, length, buffer_id, flags | (NEXT if k + 1 < n else 0))
                for k, (addr, length, flags) in enumerate(descs)
            ]
        )
        return buffer_id
    idx = [driver.take_descriptor() for _ in descs]
    for k, (addr, length, flags) in enumerate(descs):
        more = k + 1 < n
        driver.write_desc(
            idx[k], addr, length, flags | (NEXT if more else 0), idx[k + 1] if more else 0
        )
    driver.push_head(idx[0])
    return idx[0]


# --- smoke: direct and indirect ------------------------------------------------------------------


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_read_all_readable_then_write_writable_driver_sees_written_bytes(
    indirect: bool, packed: bool
) -> None:
    fq = fake(packed, indirect=indirect)
    rings = fq.memory.allocated
    head = publish(fq, [b"GET ", b"", b"/index", b".html"], [4, 0, 6, 8], indirect=indirect)
    with take(fq) as chain:
        assert chain.head == head
        r = ReadableChain(chain)
        assert r.read() == b"GET /index.html"
        w = r.into_writable()
        assert w.write(b"0123456789") == 10
        assert w.written == 10
        w.return_written()
    used = used_one(fq)
    assert used.head == head
    assert used.len == 10
    assert used.written == (b"0123", b"", b"456789", b"")
    assert used.data == b"0123456789"
    assert fq.driver.free_descriptors == 16
    assert fq.memory.allocated == rings  # buffers (and the indirect table) freed
    assert fq.driver.in_flight == 0


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_chain_descriptors_report_indirect(indirect: bool, packed: bool) -> None:
    fq = fake(packed, indirect=indirect)
    publish(fq, [b"ab"], [3], indirect=indirect)
    with take(fq) as chain:
        assert [d.indirect for d in chain.descriptors()] == [indirect, indirect]
        assert [d.writable for d in chain.descriptors()] == [False, True]
        assert (chain.readable_len, chain.writable_len) == (2, 3)


# --- next(limit) and remaining() -----------------------------------------------------------------


def test_next_yields_ranges_with_driver_range_and_contents_and_respects_limit(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"hello", b"", b"world!"])
    with take(fq) as chain:
        a, _, c = chain.readable()
        r = ReadableChain(chain)
        first = r.next(3)
        assert first is not None
        assert bytes(first.view) == b"hel"
        assert first.driver_range == DriverRange(a.addr, a.addr + 3)
        second = r.next()
        assert second is not None
        assert bytes(second.view) == b"lo"
        assert second.driver_range == DriverRange(a.addr + 3, a.addr + 5)
        third = r.next(100)  # the zero-length buffer is skipped
        assert third is not None
        assert bytes(third.view) == b"world!"
        assert third.driver_range == DriverRange(c.addr, c.addr + 6)
        assert len(third) == 6
        assert r.next() is None
        assert r.next(1) is None
        assert r.remaining() == Remaining(0, 0)


def test_next_limit_must_be_positive(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"abc"])
    with take(fq) as chain:
        r = ReadableChain(chain)
        with pytest.raises(DeviceUsageError):
            r.next(0)
        with pytest.raises(DeviceUsageError):
            r.next(-1)
        assert r.read() == b"abc"


def test_next_ranges_alias_guest_memory(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [], [4])
    with take(fq) as chain:
        w = WritableChain(chain)
        rng = w.next()
        assert rng is not None
        assert rng.driver_range is not None
        rng.view[:] = b"wxyz"
        assert fq.memory.read(rng.driver_range.start, 4) == b"wxyz"
        w.add_written(4)
    assert used_one(fq).written == (b"wxyz",)


def test_remaining_counts_bytes_and_partly_read_buffers(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"abc", b"", b"defgh"], [2, 0, 5])
    with take(fq) as chain:
        r = ReadableChain(chain)
        assert r.remaining() == Remaining(8, 2)
        assert r.read(1) == b"a"
        assert r.remaining() == Remaining(7, 2)  # the partly read buffer counts
        assert r.read(2) == b"bc"
        assert r.remaining() == Remaining(5, 1)
        assert r.read(4) == b"defg"
        assert r.remaining() == Remaining(1, 1)
        assert r.read() == b"h"
        assert r.remaining() == Remaining(0, 0)
        w = r.into_writable()
        assert w.remaining() == Remaining(7, 2)
        assert w.write(b"x") == 1
        assert w.remaining() == Remaining(6, 2)
        assert w.write(b"y") == 1
        assert w.remaining() == Remaining(5, 1)
        w.return_written()
    assert used_one(fq).written == (b"xy", b"", b"")


# --- io round trips ------------------------------------------------------------------------------


def test_read_sizes_and_read_at_end(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"0123", b"4567", b"89"])
    with take(fq) as chain:
        r = ReadableChain(chain)
        assert r.readable()
        assert r.read(0) == b""
        assert r.read(3) == b"012"
        assert r.read(3) == b"345"
        assert r.read(-1) == b"6789"
        assert r.read() == b""
        assert r.read(5) == b""
        assert r.readall() == b""


def test_readall_reads_everything(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"ab", b"cd", b"ef"])
    with take(fq) as chain:
        r = ReadableChain(chain)
        assert r.read(1) == b"a"
        assert r.readall() == b"bcdef"


def test_readinto_bytearray_across_buffers(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"abc", b"defg"])
    with take(fq) as chain:
        r = ReadableChain(chain)
        buf = bytearray(5)
        assert r.readinto(buf) == 5
        assert buf == b"abcde"
        assert r.readinto(buf) == 2
        assert buf == b"fgcde"
        assert r.readinto(buf) == 0


@pytest.mark.parametrize("size", [12, 3000])  # below and above the copy-through-a-view threshold
def test_readinto_leaves_the_callers_bytearray_resizable(packed: bool, size: int) -> None:
    """The copies go through a memoryview of the caller's bytearray; it is released before
    readinto returns (a live export would make ``extend`` raise BufferError), also when a later
    buffer turns out unmapped midway."""
    fq = make_queue(4, memory=FakeMemory(0x4000), packed=packed)
    data = (bytes(range(256)) * 16)[: size - 6]
    first = fq.driver.alloc_buffer(data)
    edge = 0x10000 + 0x4000 - 4  # 4 mapped bytes, then the end of memory
    raw_chain(fq.driver, [(first, size - 6, 0), (edge, 8, 0)])  # the read needs 6 of edge's 8
    with take(fq) as chain:
        r = ReadableChain(chain)
        buf = bytearray(size)
        with pytest.raises(UnmappedBuffer) as info:
            r.readinto(buf)
        assert buf[: size - 6] == data
        buf.extend(b"resizable")  # with the traceback (and its frames) still alive
        assert len(buf) == size + 9
        array_buf = array.array("H", bytes(size))
        with pytest.raises(UnmappedBuffer) as info_array:
            ReadableChain(chain).readinto(array_buf)
        array_buf.append(7)
        del info, info_array
    publish(fq, [b"abc", b"x" * 2000])
    with take(fq) as chain:
        big = bytearray(2003)
        assert ReadableChain(chain).readinto(big) == 2003
        assert big == b"abc" + b"x" * 2000
        big.extend(b"!")


def test_copies_that_end_exactly_at_a_buffer_end_continue_in_the_next(packed: bool) -> None:
    """Every way of consuming a buffer to its end (readinto, read_record, write_from, write)
    leaves the position where the next call continues in the next buffer."""
    fq = fake(packed)
    hdr = BlkReqHdr(schema.BlkType.IN, 0, 7)
    publish(fq, [BLK_REQ_HDR.pack(hdr), b"abcd", b"efgh"], [4, 2, 1])
    with take(fq) as chain:
        r = ReadableChain(chain)
        assert r.read_record(BLK_REQ_HDR) == hdr
        assert r.remaining() == Remaining(8, 2)
        four = bytearray(4)
        assert r.readinto(four) == 4
        assert four == b"abcd"
        assert r.remaining() == Remaining(4, 1)
        assert r.readinto(four) == 4
        assert four == b"efgh"
        assert r.remaining() == Remaining(0, 0)
        w = r.into_writable()
        assert w.write_from(io.BytesIO(b"WXYZ").readinto, 4) == 4
        assert w.remaining() == Remaining(3, 2)
        assert w.write(b"12") == 2
        assert w.remaining() == Remaining(1, 1)
        assert w.write(b"!") == 1
        assert w.remaining() == Remaining(0, 0)
        assert w.write(b"?") == 0
        w.return_written()
    assert used_one(fq).data == b"WXYZ12!"


def test_empty_buffers_before_the_first_lookup_are_skipped_whatever_their_address(
    packed: bool,
) -> None:
    """Empty writable buffers (one at address 0) before the data: nothing is copied for them,
    and writing from read-only ``bytes`` works (found by the racing-driver test: the copy
    loop once tried an empty copy into its source before it had looked up any region)."""
    fq = fake(packed)
    mem = fq.memory
    data_at = mem.alloc(8)
    raw_chain(fq.driver, [(mem.alloc(4), 0, WRITE), (0, 0, WRITE), (data_at, 8, WRITE)])
    with take(fq) as chain:
        w = WritableChain(chain)
        assert w.write(b"abcdefgh") == 8
        w.return_written()
    assert mem.read(data_at, 8) == b"abcdefgh"
    assert used_one(fq).len == 8


def test_a_copy_over_several_buffers_that_ends_at_a_buffer_end_steps_past_it(
    packed: bool,
) -> None:
    """(White box.) The position after a copy: past a buffer the copy finished, inside one it
    did not, so the next copy starts where the fast paths take it."""
    fq = fake(packed)
    publish(fq, [b"abcd", b"efgh", b"ij"], [4, 4, 4, 2])
    with take(fq) as chain:
        r = ReadableChain(chain)
        eight = bytearray(8)
        assert r.readinto(eight) == 8
        assert (r._cursor.i, r._cursor.pos) == (2, 0)
        assert r.readinto(bytearray(1)) == 1
        assert (r._cursor.i, r._cursor.pos) == (2, 1)
        w = r.into_writable(ignore_remaining=True)
        assert w.write(b"abcdefgh") == 8  # ends at the second buffer's end
        assert (w._cursor.i, w._cursor.pos) == (5, 0)
        assert w.write(b"ij") == 2
        assert (w._cursor.i, w._cursor.pos) == (5, 2)
        assert w.write(b"klmn") == 4  # the rest of one buffer, then all of the last
        assert (w._cursor.i, w._cursor.pos) == (7, 0)
        w.return_written()
    assert used_one(fq).data == b"abcdefghijklmn"


def test_readinto_memoryview_fills_callers_buffer(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"xy", b"zw"])
    backing = bytearray(b"........")
    with take(fq) as chain:
        r = ReadableChain(chain)
        view = memoryview(backing)[2:6]
        assert r.readinto(view) == 4
        view.release()
    assert backing == b"..xyzw.."


@pytest.mark.parametrize("shape", ["strided", "2-d"])
def test_readinto_and_write_with_byte_views_of_other_shapes(packed: bool, shape: str) -> None:
    """Byte views that are not plain 1-D ranges (every other byte; two rows of four) are filled
    and read in element order, whichever path the copy takes."""
    fq = fake(packed)
    publish(fq, [b"abc", b"defgh"], [3, 5])
    backing = bytearray(16)
    view = (
        memoryview(backing)[::2]
        if shape == "strided"
        else memoryview(backing)[:8].cast("B", [2, 4])
    )
    with take(fq) as chain:
        r = ReadableChain(chain)
        assert r.readinto(view) == 8
        flat = backing[::2] if shape == "strided" else backing[:8]
        assert flat == b"abcdefgh"
        w = r.into_writable()
        assert w.write(view) == 8
        w.return_written()
        view.release()
    assert used_one(fq).data == b"abcdefgh"


def test_readinto_non_byte_memoryview(packed: bool) -> None:
    fq = fake(packed)
    payload = struct.pack("<4H", 1, 2, 3, 4)
    publish(fq, [payload[:3], payload[3:]])
    backing = bytearray(8)
    with take(fq) as chain:
        r = ReadableChain(chain)
        words = memoryview(backing).cast("H")
        assert r.readinto(words) == 8
        assert words.tolist() == [1, 2, 3, 4]
        words.release()


def test_write_returns_count_and_zero_when_full(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [], [3, 2])
    with take(fq) as chain:
        w = WritableChain(chain)
        assert w.writable()
        assert w.write(b"") == 0
        assert w.write(b"ab") == 2
        assert w.write(b"cdefgh") == 3
        assert w.written == 5
        assert w.write(b"i") == 0
        assert w.write(bytearray(b"j")) == 0
        w.return_written()
    used = used_one(fq)
    assert used.len == 5
    assert used.written == (b"abc", b"de")


def test_write_accepts_any_buffer(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [], [8])
    with take(fq) as chain, WritableChain(chain) as w:
        assert w.write(memoryview(b"abcd")[1:3]) == 2
        assert w.write(bytearray(b"ef")) == 2
        assert w.write(memoryview(struct.pack("<H", 0x4847)).cast("H")) == 2
    assert used_one(fq).data == b"bcefGH"


def test_write_all_too_big_raises_and_writes_nothing(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [], [3, 2])
    with take(fq) as chain:
        (w0, w1) = chain.writable()
        fq.memory.write(w0.addr, b"...")
        fq.memory.write(w1.addr, b"..")
        w = WritableChain(chain)
        with pytest.raises(InsufficientSpace) as info:
            w.write_all(b"123456")
        assert (info.value.need, info.value.have) == (6, 5)
        assert isinstance(info.value, DriverError)
        assert w.written == 0
        assert w.remaining() == Remaining(5, 2)
        assert fq.memory.read(w0.addr, 3) == b"..."
        assert fq.memory.read(w1.addr, 2) == b".."
        w.write_all(b"12345")
        assert w.written == 5
        w.return_written()
    assert used_one(fq).written == (b"123", b"45")


def test_copyfileobj_from_readable_chain(packed: bool) -> None:
    fq = fake(packed)
    parts = [b"The quick ", b"", b"brown fox ", b"jumps"]
    publish(fq, parts)
    out = io.BytesIO()
    with take(fq) as chain:
        shutil.copyfileobj(ReadableChain(chain), out, 3)
    assert out.getvalue() == b"".join(parts)
    assert used_one(fq).len == 0


def test_copyfileobj_into_writable_chain(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [], [4, 0, 7, 5])
    src = io.BytesIO(b"0123456789abcdef")
    with take(fq) as chain, WritableChain(chain) as w:
        shutil.copyfileobj(src, w, 3)
        assert w.written == 16
    used = used_one(fq)
    assert used.len == 16
    assert used.written == (b"0123", b"", b"456789a", b"bcdef")


# --- schema records across descriptor boundaries -------------------------------------------------


def test_read_record_blk_header_split_across_buffers(packed: bool) -> None:
    fq = fake(packed)
    raw = struct.pack("<IIQ", schema.BlkType.OUT, 7, 0x1122334455667788)
    publish(fq, [raw[:5], raw[5:], b"payload"], [1])
    with take(fq) as chain:
        r = ReadableChain(chain)
        hdr = r.read_record(BLK_REQ_HDR)
        assert hdr == BlkReqHdr(schema.BlkType.OUT, 7, 0x1122334455667788)
        assert isinstance(hdr, BlkReqHdr)
        assert r.read() == b"payload"
        with r.into_writable() as w:
            w.write(bytes([schema.BlkStatus.OK]))
    assert used_one(fq).written == (b"\x00",)


def test_write_record_blk_header_split_across_buffers(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [], [5, 11])
    hdr = BlkReqHdr(schema.BlkType.IN, 3, 0xDEADBEEF)
    with take(fq) as chain, WritableChain(chain) as w:
        w.write_record(BLK_REQ_HDR, hdr)
        assert w.written == 16
    used = used_one(fq)
    raw = struct.pack("<IIQ", schema.BlkType.IN, 3, 0xDEADBEEF)
    assert used.written == (raw[:5], raw[5:])
    assert BLK_REQ_HDR.unpack(used.data) == hdr


def test_read_record_insufficient_data_consumes_nothing(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"12345", b"1234567890"])
    with take(fq) as chain:
        r = ReadableChain(chain)
        with pytest.raises(InsufficientData) as info:
            r.read_record(BLK_REQ_HDR)
        assert (info.value.need, info.value.have) == (16, 15)
        assert isinstance(info.value, DriverError)
        assert r.remaining() == Remaining(15, 2)
        assert r.read() == b"123451234567890"


def test_write_record_insufficient_space_writes_nothing(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [], [5, 10])
    with take(fq) as chain, WritableChain(chain) as w:
        with pytest.raises(InsufficientSpace):
            w.write_record(BLK_REQ_HDR, BlkReqHdr(0, 0, 0))
        assert w.written == 0
    assert used_one(fq).len == 0


# --- completing a chain --------------------------------------------------------------------------


def test_return_complete_after_reading_everything(packed: bool) -> None:
    fq = fake(packed)
    head = publish(fq, [b"abc"], [4])
    chain = take(fq)
    r = ReadableChain(chain)
    assert r.read() == b"abc"
    r.return_complete()
    assert chain.returned
    used = used_one(fq)
    assert (used.head, used.len) == (head, 0)


def test_return_complete_with_data_left_returns_and_raises(packed: bool) -> None:
    fq = fake(packed)
    head = publish(fq, [b"abc", b"de"])
    chain = take(fq)
    r = ReadableChain(chain)
    assert r.read(1) == b"a"
    with pytest.raises(DataRemaining) as info:
        r.return_complete()
    assert info.value.remaining == 4
    assert chain.returned
    used = used_one(fq)
    assert (used.head, used.len) == (head, 0)


def test_into_writable_strict_raises_when_readable_bytes_remain(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"abc"], [2])
    with take(fq) as chain:
        r = ReadableChain(chain)
        assert r.read(2) == b"ab"
        with pytest.raises(DataRemaining) as info:
            r.into_writable()
        assert info.value.remaining == 1
        assert not chain.returned
        w = r.into_writable(ignore_remaining=True)
        assert w.write(b"ok") == 2
    assert used_one(fq).written == (b"ok",)


def test_add_written_counts_writes_through_ranges(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [], [4, 4])
    with take(fq) as chain:
        w = WritableChain(chain)
        first = w.next()
        assert first is not None
        first.view[:] = b"abcd"
        w.add_written(len(first))
        second = w.next(2)
        assert second is not None
        second.view[:] = b"ef"
        w.add_written(2)
        assert w.written == 6
        assert w.remaining() == Remaining(2, 1)
        assert w.write(b"gh") == 2  # write() continues after the ranges
        assert w.written == 8
        w.return_written()
    assert used_one(fq).written == (b"abcd", b"efgh")


def test_with_writable_chain_returns_with_written_count(packed: bool) -> None:
    fq = fake(packed)
    head = publish(fq, [b"req"], [10])
    chain = take(fq)
    with ReadableChain(chain) as r:
        assert r.read() == b"req"
        with r.into_writable() as w:
            w.write(b"resp")
        assert chain.returned
    used = used_one(fq)
    assert (used.head, used.len, used.data) == (head, 4, b"resp")


def test_with_readable_chain_returns_with_zero(packed: bool) -> None:
    fq = fake(packed)
    head = publish(fq, [b"req"], [10])
    chain = take(fq)
    with ReadableChain(chain) as r:
        assert r.read(1) == b"r"
    assert chain.returned
    assert used_one(fq)[:2] == (head, 0)


def test_with_writable_chain_returns_on_exception(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [], [8])
    chain = take(fq)

    def serve() -> None:
        with WritableChain(chain) as w:
            w.write(b"abc")
            raise RuntimeError("device failure")

    with pytest.raises(RuntimeError):
        serve()
    assert chain.returned
    assert used_one(fq).data == b"abc"


def test_add_written_beyond_writable_space_raises(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [], [4, 4])
    with take(fq) as chain:
        w = WritableChain(chain)
        w.add_written(5)
        with pytest.raises(WrittenTooMuch) as info:
            w.add_written(4)
        assert isinstance(info.value, DeviceUsageError)
        assert w.written == 5
    assert used_one(fq).len == 5


def test_next_after_return_raises(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"abc"], [4])
    chain = take(fq)
    r = ReadableChain(chain)
    w = WritableChain(chain)
    chain.return_written(0)
    with pytest.raises(ChainAlreadyReturned):
        r.next()
    with pytest.raises(ChainAlreadyReturned):
        w.next()
    with pytest.raises(ChainAlreadyReturned):
        ReadableChain(chain)


def test_write_after_return_raises_and_leaves_driver_memory_alone(packed: bool) -> None:
    """Once returned, the writable buffers belong to the driver again: the device must not
    scribble on them (the driver may already have reused them)."""
    fq = fake(packed)
    publish(fq, [], [4])
    chain = take(fq)
    (wd,) = chain.writable()
    w = WritableChain(chain)
    chain.return_written(0)
    used_one(fq)  # the driver takes the buffer back
    with pytest.raises(ChainAlreadyReturned):
        w.write(b"late")
    assert fq.memory.read(wd.addr, 4) == bytes(4)


def test_read_after_return_raises(packed: bool) -> None:
    """Reading after return is refused, as ``next()`` and ``DescChain.readable()`` refuse it."""
    fq = fake(packed)
    publish(fq, [b"abcd"])
    chain = take(fq)
    r = ReadableChain(chain)
    chain.return_written(0)
    with pytest.raises(ChainAlreadyReturned):
        r.read(4)


# --- buffers that cross a region boundary --------------------------------------------------------

BOUNDARY = 0x11000
SPANNING = BOUNDARY - 8


def two_regions(packed: bool) -> AnyFakeQueue:
    mem = FakeMemory(regions=[(0x10000, 0x1000), (BOUNDARY, 0x1000)])
    mem.alloc_at(SPANNING, 16)
    return make_queue(8, memory=mem, packed=packed)


def test_read_buffer_spanning_two_regions(packed: bool) -> None:
    fq = two_regions(packed)
    fq.memory.write(SPANNING, b"0123456789ABCDEF")
    head = raw_chain(fq.driver, [(SPANNING, 16, 0)])
    with take(fq) as chain:
        assert ReadableChain(chain).read() == b"0123456789ABCDEF"
    assert used_one(fq)[:2] == (head, 0)


def test_next_splits_a_spanning_buffer_into_contiguous_ranges(packed: bool) -> None:
    fq = two_regions(packed)
    fq.memory.write(SPANNING, b"0123456789ABCDEF")
    raw_chain(fq.driver, [(SPANNING, 16, 0)])
    with take(fq) as chain:
        r = ReadableChain(chain)
        first = r.next()
        second = r.next()
        assert first is not None
        assert second is not None
        assert r.next() is None
        assert (bytes(first.view), bytes(second.view)) == (b"01234567", b"89ABCDEF")
        assert first.driver_range == DriverRange(SPANNING, BOUNDARY)
        assert second.driver_range == DriverRange(BOUNDARY, SPANNING + 16)


def test_next_limit_inside_a_spanning_buffer(packed: bool) -> None:
    fq = two_regions(packed)
    fq.memory.write(SPANNING, b"0123456789ABCDEF")
    raw_chain(fq.driver, [(SPANNING, 16, 0)])
    with take(fq) as chain:
        r = ReadableChain(chain)
        sizes = []
        data = b""
        while (rng := r.next(5)) is not None:
            assert rng.driver_range is not None
            assert rng.driver_range.start == SPANNING + len(data)
            sizes.append(len(rng))
            data += bytes(rng.view)
        assert data == b"0123456789ABCDEF"
        assert sizes == [5, 3, 5, 3]  # a range never crosses the region boundary


def test_write_buffer_spanning_two_regions_lands_in_both(packed: bool) -> None:
    fq = two_regions(packed)
    head = raw_chain(fq.driver, [(SPANNING, 16, WRITE)])
    with take(fq) as chain, WritableChain(chain) as w:
        assert w.write(b"abcdefghijklmnop") == 16
    assert used_one(fq)[:2] == (head, 16)
    assert fq.memory.buffers[0][-8:] == b"abcdefgh"
    assert fq.memory.buffers[1][:8] == b"ijklmnop"
    assert fq.memory.read(SPANNING, 16) == b"abcdefghijklmnop"


@pytest.mark.parametrize("writing", [False, True])
def test_one_copy_over_buffers_alternating_between_regions(packed: bool, writing: bool) -> None:
    """One readinto/write over buffers in region 0, region 1, region 0, a spanning one, then
    region 1: each piece lands at its own address (the copy remembers the last region found and
    must look again whenever a buffer leaves it)."""
    fq = two_regions(packed)
    mem = fq.memory
    low = [mem.alloc(4, region=0) for _ in range(2)]
    high = [mem.alloc(4, region=1) for _ in range(2)]
    addrs = [low[0], high[0], low[1], SPANNING, high[1]]
    lengths = [4, 4, 4, 16, 4]
    flag = WRITE if writing else 0
    raw_chain(fq.driver, [(a, n, flag) for a, n in zip(addrs, lengths, strict=True)])
    data = bytes(range(65, 65 + sum(lengths)))
    pieces = cut(data, lengths)
    if not writing:
        for a, piece in zip(addrs, pieces, strict=True):
            mem.write(a, piece)
    with take(fq) as chain:
        if writing:
            with WritableChain(chain) as w:
                assert w.write(data) == len(data)
            assert [mem.read(a, n) for a, n in zip(addrs, lengths, strict=True)] == pieces
        else:
            buf = bytearray(len(data))
            r = ReadableChain(chain)
            assert r.readinto(buf) == len(data)
            assert buf == data
            assert r.remaining() == Remaining(0, 0)


def test_record_across_a_region_boundary_queue_built_by_hand(packed: bool) -> None:
    mem = FakeMemory(regions=[(0x10000, 0x1000), (BOUNDARY, 0x1000)])
    mem.alloc_at(SPANNING, 16)
    driver: Driver = FakePackedDriver(mem, 8) if packed else FakeDriver(mem, 8)
    notifier = NotificationCounter()
    queue = create_queue(driver.queue_memory(), 8, mem, features=driver.features, notify=notifier)
    assert isinstance(queue, PackedQueue) is packed
    hdr = BlkReqHdr(schema.BlkType.GET_ID, 0, 42)
    mem.write(SPANNING, BLK_REQ_HDR.pack(hdr))
    status = driver.alloc_buffer(1)
    raw_chain(driver, [(SPANNING, 16, 0), (status, 1, WRITE)])
    chain = queue.next_chain()
    assert chain is not None
    with ReadableChain(chain) as r:
        assert r.read_record(BLK_REQ_HDR) == hdr
        with r.into_writable() as w:
            w.write(b"\x02")
    assert [u[:2] for u in driver.used()] == [(chain.head, 1)]
    assert mem.read(status, 1) == b"\x02"
    assert notifier.count == 1


# --- buffers adjacent in driver memory ------------------------------------------------------------


def adjacent_chain(packed: bool, flag: int) -> tuple[AnyFakeQueue, list[int], list[int]]:
    """A chain of buffers at ``addrs``/``lengths``: three adjacent ones (with an empty one among
    them), one elsewhere, then two adjacent across the region boundary."""
    fq = two_regions(packed)
    mem = fq.memory
    run = mem.alloc(40, region=0)
    lone = mem.alloc(8, region=0)
    mem.alloc_at(BOUNDARY - 24, 16)  # [BOUNDARY-24, BOUNDARY-8) continues into SPANNING
    addrs = [run, run + 10, run + 30, run + 30, lone, BOUNDARY - 24, SPANNING]
    lengths = [10, 20, 0, 10, 8, 16, 16]
    raw_chain(fq.driver, [(a, n, flag) for a, n in zip(addrs, lengths, strict=True)])
    return fq, addrs, lengths


def test_a_copy_moves_a_run_of_adjacent_buffers_as_one_piece(packed: bool) -> None:
    """Buffers that continue each other in driver memory are one piece for the copies and
    transfers (one slice per run), but ``next()`` still hands out a buffer at a time, and a run
    that crosses a region boundary is taken a buffer at a time."""
    data = bytes(range(1, 81))

    def rig() -> AnyFakeQueue:
        fq, addrs, lengths = adjacent_chain(packed, 0)
        for a, piece in zip(addrs, cut(data, lengths), strict=True):
            if piece:
                fq.memory.write(a, piece)
        return fq

    with take(rig()) as chain:
        seen: list[bytes] = []

        def keep(view: memoryview) -> int:
            seen.append(bytes(view))
            return len(view)

        assert ReadableChain(chain).read_to(keep) == 80
        # a run across the region boundary goes a buffer at a time, cut at the boundary
        assert seen == [data[:40], data[40:48], data[48:64], data[64:72], data[72:]]
    with take(rig()) as chain:
        r = ReadableChain(chain)
        ranges = []
        while (rng := r.next()) is not None:
            ranges.append(len(rng))
            rng.release()
        assert ranges == [10, 20, 10, 8, 16, 8, 8]
    with take(rig()) as chain:  # copies in odd sizes stop inside a run and go on from there
        r = ReadableChain(chain)
        got = b""
        while chunk := r.read(7):
            got += chunk
            assert r.remaining().bytes == 80 - len(got)
        assert got == data


def test_a_write_over_a_run_of_adjacent_buffers_stays_inside_them(packed: bool) -> None:
    fq, addrs, _ = adjacent_chain(packed, WRITE)
    mem = fq.memory
    before = mem.read(addrs[0] - 8, 8)
    after = mem.read(addrs[4] + 8, 8)
    with take(fq) as chain, WritableChain(chain) as w:
        assert w.write(b"x" * 25) == 25  # stops inside the second buffer of the run
        assert w.write(b"y" * 100) == 55
        assert w.written == 80
    assert mem.read(addrs[0], 40) == b"x" * 25 + b"y" * 15
    assert mem.read(addrs[4], 8) == b"y" * 8
    assert mem.read(BOUNDARY - 24, 32) == b"y" * 32
    assert (mem.read(addrs[0] - 8, 8), mem.read(addrs[4] + 8, 8)) == (before, after)


# --- driver faults -------------------------------------------------------------------------------


def test_buffer_outside_memory_raises_unmapped_buffer_on_read(packed: bool) -> None:
    fq = fake(packed)
    head = raw_chain(fq.driver, [(0x4000_0000, 16, 0)])
    with take(fq) as chain:
        assert chain.error is None  # translation happens when the buffer is reached
        r = ReadableChain(chain)
        with pytest.raises(UnmappedBuffer) as info:
            r.read()
        assert isinstance(info.value, ChainError)
        assert isinstance(info.value, DriverError)
        assert info.value.addr == 0x4000_0000
        with pytest.raises(UnmappedBuffer):
            r.next()
    assert used_one(fq)[:2] == (head, 0)


def test_buffer_outside_memory_raises_unmapped_buffer_on_write(packed: bool) -> None:
    fq = fake(packed)
    raw_chain(fq.driver, [(0x4000_0000, 16, WRITE)])
    with take(fq) as chain, WritableChain(chain) as w:
        with pytest.raises(UnmappedBuffer):
            w.write(b"x")
        assert w.written == 0
    assert used_one(fq).len == 0


def test_buffer_running_past_the_end_of_memory_raises_unmapped_buffer(packed: bool) -> None:
    mem = FakeMemory(0x1000)
    fq = make_queue(4, memory=mem, packed=packed)
    head = raw_chain(fq.driver, [(0x10000 + 0x1000 - 4, 8, 0)])
    with take(fq) as chain:
        r = ReadableChain(chain)
        with pytest.raises(UnmappedBuffer):
            r.read()
    assert used_one(fq)[:2] == (head, 0)


def test_write_reports_the_bytes_that_landed_before_an_unmapped_buffer(packed: bool) -> None:
    """Rule 3 of the chain module: the written count is exactly what reached the driver's
    buffers, also when a later buffer turns out to be unmapped halfway through a write."""
    fq = make_queue(4, memory=FakeMemory(0x1000), packed=packed)
    first = fq.driver.alloc_buffer(4)
    edge = 0x10000 + 0x1000 - 4  # 4 mapped bytes, then the end of memory
    raw_chain(fq.driver, [(first, 4, WRITE), (edge, 8, WRITE)])
    with take(fq) as chain, WritableChain(chain) as w:
        with pytest.raises(UnmappedBuffer):
            w.write(b"ABCDEFGHIJKL")
        # the buffers started zeroed and the data has no zero byte: count what arrived
        landed = len(fq.memory.read(first, 4).strip(b"\0"))
        landed += len(fq.memory.read(edge, 4).strip(b"\0"))
        assert landed == 8
        assert w.written == landed


def test_write_leaves_the_callers_buffer_resizable_after_an_unmapped_buffer(packed: bool) -> None:
    fq = make_queue(4, memory=FakeMemory(0x1000), packed=packed)
    edge = 0x10000 + 0x1000 - 4  # 4 mapped bytes, then the end of memory
    source = bytearray(b"ABCDEFGHIJKL")
    words = array.array("H", b"MNOPQRSTUVWX")
    infos = []
    for data in (source, words):  # a chain each: each write counts the 8 bytes that landed
        raw_chain(fq.driver, [(fq.driver.alloc_buffer(4), 4, WRITE), (edge, 8, WRITE)])
        with take(fq) as chain, WritableChain(chain) as w:
            with pytest.raises(UnmappedBuffer) as info:
                w.write(data)
            infos.append(info)
            assert w.written == 8
    source.extend(b"!")  # with the tracebacks (and their frames) still alive
    words.append(1)
    del infos, info


def malformed_readable_after_writable(driver: Driver) -> int:
    a = driver.alloc_buffer(4)
    b = driver.alloc_buffer(b"read")
    return raw_chain(driver, [(a, 4, WRITE), (b, 4, 0)])


def malformed_indirect_not_negotiated(driver: Driver) -> int:
    """An INDIRECT descriptor on a queue without INDIRECT_DESC (the table is never looked at)."""
    return raw_chain(driver, [(driver.alloc_buffer(16), 16, INDIRECT)])


def split_malformed_next_out_of_range(driver: Driver) -> int:
    assert isinstance(driver, FakeDriver)  # packed descriptors have no next field
    d = driver.take_descriptor()
    driver.write_desc(d, driver.alloc_buffer(b"x"), 1, NEXT, 99)
    driver.push_head(d)
    return d


def split_malformed_loop(driver: Driver) -> int:
    assert isinstance(driver, FakeDriver)  # packed chains are consecutive slots: no loops
    d0, d1 = driver.take_descriptor(), driver.take_descriptor()
    buf = driver.alloc_buffer(b"x")
    driver.write_desc(d0, buf, 1, NEXT, d1)
    driver.write_desc(d1, buf, 1, NEXT, d0)
    driver.push_head(d0)
    return d0


MALFORMED = [
    *(
        pytest.param(packed, build, error, id=f"{'packed' if packed else 'split'}-{name}")
        for name, build, error in [
            ("readable-after-writable", malformed_readable_after_writable, ReadableAfterWritable),
            ("indirect-not-negotiated", malformed_indirect_not_negotiated, IndirectNotNegotiated),
        ]
        for packed in (False, True)
    ),
    pytest.param(
        False, split_malformed_next_out_of_range, DescIndexOutOfRange, id="split-next-out-of-range"
    ),
    pytest.param(False, split_malformed_loop, ChainTooLong, id="split-loop"),
]


@pytest.mark.parametrize(("packed", "build", "error"), MALFORMED)
@pytest.mark.parametrize("walker", [ReadableChain, WritableChain])
def test_malformed_chain_raises_its_error_at_construction(
    build: Callable[[Driver], int],
    error: type[ChainError],
    walker: type[ReadableChain | WritableChain],
    packed: bool,
) -> None:
    fq = fake(packed, 8)
    head = build(fq.driver)
    with take(fq) as chain:
        assert isinstance(chain.error, error)
        with pytest.raises(error) as info:
            walker(chain)
        assert info.value is chain.error
        chain.written = 0
    assert used_one(fq)[:2] == (head, 0)


# --- properties ----------------------------------------------------------------------------------

buffer_sizes = st.lists(st.integers(0, 64), min_size=1, max_size=8)


def buffers_left(sizes: list[int], consumed: int) -> int:
    """The reference for ``remaining().descriptors``: buffers with bytes after ``consumed``."""
    n = end = 0
    for size in sizes:
        end += size
        if size and end > consumed:
            n += 1
    return n


BOTH_FORMATS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


@BOTH_FORMATS  # not the fixture: hypothesis runs many examples per test function
@settings(max_examples=75, deadline=None)
@given(sizes=buffer_sizes, indirect=st.booleans(), data=st.data())
def test_reads_in_any_sizes_concatenate_to_the_payload(
    sizes: list[int], indirect: bool, data: st.DataObject, packed: bool
) -> None:
    payload = data.draw(st.binary(min_size=sum(sizes), max_size=sum(sizes)), label="payload")
    parts = cut(payload, sizes)
    fq = fake(packed, indirect=indirect)
    publish(fq, parts, indirect=indirect)
    got = b""
    with take(fq) as chain:
        r = ReadableChain(chain)
        while True:
            assert r.remaining() == (len(payload) - len(got), buffers_left(sizes, len(got)))
            how = data.draw(
                st.sampled_from(["read", "readinto", "readinto-view", "read_to", "next"]),
                label="how",
            )
            size = data.draw(st.integers(1, 70), label="size")
            if how == "read":
                piece = r.read(size)
            elif how == "readinto":
                buf = bytearray(size)
                piece = bytes(buf[: r.readinto(buf)])
            elif how == "readinto-view":
                backing = bytearray(size + 2)
                with memoryview(backing)[1:-1] as view:
                    piece = bytes(view[: r.readinto(view)])
            elif how == "read_to":
                sink = io.BytesIO()
                assert r.read_to(sink.write, size) == len(sink.getvalue())
                piece = sink.getvalue()
            else:
                rng = r.next(size)
                piece = b"" if rng is None else bytes(rng.view)
            assert len(piece) <= size
            if not piece:
                break
            got += piece
        r.return_complete()
    assert got == payload
    assert used_one(fq).len == 0


@BOTH_FORMATS
@settings(max_examples=60, deadline=None)
@given(
    layout=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 1)), min_size=1, max_size=6),
    writing=st.booleans(),
    data=st.data(),
)
def test_copies_over_buffers_scattered_across_two_regions(
    layout: list[tuple[int, int]], writing: bool, data: st.DataObject, packed: bool
) -> None:
    """Buffers of up to 3000 bytes, each in region 0 or 1 (two separate regions), copied in
    pieces of up to 5000 bytes: the copies cross buffers and regions in every order, take the
    view path from 1 KiB up, and every byte lands in its own buffer."""
    mem = FakeMemory(regions=[(0x10000, 0x8000), (0x40000, 0x8000)])
    fq = make_queue(8, memory=mem, packed=packed)
    sizes = [n for n, _ in layout]
    addrs = [mem.alloc(n, region=r) for n, r in layout]
    payload = data.draw(st.binary(min_size=sum(sizes), max_size=sum(sizes)), label="payload")
    pieces = cut(payload, sizes)
    flag = WRITE if writing else 0
    if not writing:
        for addr, piece in zip(addrs, pieces, strict=True):
            mem.write(addr, piece)
    raw_chain(fq.driver, [(a, n, flag) for a, n in zip(addrs, sizes, strict=True)])
    moved = 0
    with take(fq) as chain:
        walker = WritableChain(chain) if writing else ReadableChain(chain)
        while moved < len(payload):
            size = data.draw(st.integers(1, 5000), label="size")
            if isinstance(walker, WritableChain):
                n = walker.write(payload[moved : moved + size])
            else:
                buf = bytearray(size)
                n = walker.readinto(buf)
                assert buf[:n] == payload[moved : moved + n]
            assert n == min(size, len(payload) - moved)
            moved += n
            assert walker.remaining() == (len(payload) - moved, buffers_left(sizes, moved))
        if isinstance(walker, WritableChain):
            walker.return_written()
    if writing:
        assert [mem.read(a, n) for a, n in zip(addrs, sizes, strict=True)] == pieces


@BOTH_FORMATS
@settings(max_examples=75, deadline=None)
@given(
    sizes=buffer_sizes,
    chunks=st.lists(st.binary(max_size=40), max_size=12),
    indirect=st.booleans(),
)
def test_driver_sees_exactly_the_bytes_written_in_order(
    sizes: list[int], chunks: list[bytes], indirect: bool, packed: bool
) -> None:
    fq = fake(packed, indirect=indirect)
    publish(fq, [], sizes, indirect=indirect)
    accepted = b""
    with take(fq) as chain, WritableChain(chain) as w:
        for k, chunk in enumerate(chunks):
            how = k % 3  # bytes, a byte view, a file's readinto
            if how == 0:
                n = w.write(chunk)
            elif how == 1:
                with memoryview(bytearray(chunk)) as view:
                    n = w.write(view)
            else:
                n = w.write_from(io.BytesIO(chunk).readinto, len(chunk))
            assert n == min(len(chunk), sum(sizes) - len(accepted))
            accepted += chunk[:n]
            assert w.remaining() == (sum(sizes) - len(accepted), buffers_left(sizes, len(accepted)))
        assert w.written == len(accepted)
    used = used_one(fq)
    assert used.len == len(accepted)
    assert used.data == accepted
    assert used.written == tuple(cut(accepted, sizes))


# --- vectored file I/O: read_to_fd / write_from_fd ---------------------------------------------


@BOTH_FORMATS
@settings(max_examples=60, deadline=None)
@given(
    layout=st.lists(
        st.tuples(st.integers(0, 3000), st.sampled_from(["r0", "r1", "far", "cross"])),
        min_size=1,
        max_size=6,
    ),
    writing=st.booleans(),
    iov_max=st.sampled_from([1, 2, 1024]),
    offset=st.integers(0, 5000),
    data=st.data(),
)
def test_fd_transfers_move_every_byte_between_its_buffer_and_its_file_offset(
    layout: list[tuple[int, str]],
    writing: bool,
    iov_max: int,
    offset: int,
    data: st.DataObject,
    packed: bool,
) -> None:
    """Buffers of up to 3000 bytes in two adjacent regions, a third one apart, and (at most
    one) across the boundary of the adjacent two; moved to or from a file at ``offset`` in
    pieces of up to 5000 bytes, with preadv/pwritev given at most ``iov_max`` buffers a call:
    every byte lands at its place, the counts and ``remaining()`` follow, the file position is
    never moved."""
    mem = FakeMemory(regions=[(0x10000, 0x8000), (0x18000, 0x8000), (0x40000, 0x8000)])
    fq = make_queue(8, memory=mem, packed=packed)
    crossing = next((n for n, where in layout if where == "cross" and n >= 2), None)
    cross_at = None if crossing is None else mem.alloc_at(0x18000 - crossing // 2, crossing)
    addrs, sizes = [], []
    for n, where in layout:
        if where == "cross" and n == crossing and cross_at is not None:
            addrs.append(cross_at)
            cross_at = None  # one crossing buffer; any other "cross" goes to region 0
        else:
            addrs.append(mem.alloc(n, region={"r1": 1, "far": 2}.get(where, 0)))
        sizes.append(n)
    payload = data.draw(st.binary(min_size=sum(sizes), max_size=sum(sizes)), label="payload")
    pieces = cut(payload, sizes)
    if not writing:
        for addr, piece in zip(addrs, pieces, strict=True):
            mem.write(addr, piece)
    raw_chain(
        fq.driver, [(a, n, WRITE if writing else 0) for a, n in zip(addrs, sizes, strict=True)]
    )
    with tempfile.TemporaryFile() as f, mock.patch.object(chain_module, "_IOV_MAX", iov_max):
        fd = f.fileno()
        if writing:
            os.pwrite(fd, payload, offset)
        moved = 0
        with take(fq) as chain:
            walker = WritableChain(chain) if writing else ReadableChain(chain)
            while moved < len(payload):
                size = data.draw(st.integers(1, 5000), label="size")
                if isinstance(walker, WritableChain):
                    n = walker.write_from_fd(fd, offset + moved, size)
                else:
                    n = walker.read_to_fd(fd, offset + moved, size)
                assert n == min(size, len(payload) - moved)
                moved += n
                assert walker.remaining() == (len(payload) - moved, buffers_left(sizes, moved))
            if isinstance(walker, WritableChain):
                assert walker.written == len(payload)
                walker.return_written()
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
        if not writing:
            assert os.pread(fd, len(payload) + 1, offset) == payload
    if writing:
        assert [mem.read(a, n) for a, n in zip(addrs, sizes, strict=True)] == pieces
        assert used_one(fq).len == len(payload)


@BOTH_FORMATS
def test_write_from_fd_stops_at_the_end_of_the_file_and_counts_what_it_read(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [], [100, 100])
    with tempfile.TemporaryFile() as f, take(fq) as chain:
        f.write(bytes(range(150)))
        f.flush()
        w = WritableChain(chain)
        assert w.write_from_fd(f.fileno(), 0) == 150  # a short read: the file ends at 150
        assert w.written == 150
        assert w.remaining() == (50, 1)
        assert w.write_from_fd(f.fileno(), 150) == 0  # at the end: nothing more
        w.write(b"\xff" * 50)
    used = used_one(fq)
    assert used.len == 200
    assert used.written == (bytes(range(100)), bytes(range(100, 150)) + b"\xff" * 50)


@BOTH_FORMATS
def test_fd_transfers_raise_the_os_error_and_consume_nothing(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"abc"], [8])
    with tempfile.TemporaryFile() as f, take(fq) as chain:
        r = ReadableChain(chain)
        bad = os.open(os.devnull, os.O_RDONLY)
        os.close(bad)
        with pytest.raises(OSError, match="Bad file descriptor"):
            r.read_to_fd(bad, 0)
        assert r.remaining() == (3, 1)
        w = r.into_writable(ignore_remaining=True)
        with pytest.raises(OSError, match="Bad file descriptor"):
            w.write_from_fd(bad, 0)
        assert w.remaining() == (8, 1)
        assert w.written == 0
        assert r.read_to_fd(f.fileno(), 10) == 3
        assert os.pread(f.fileno(), 20, 0) == bytes(10) + b"abc"
    assert used_one(fq).len == 0


@BOTH_FORMATS
def test_fd_transfers_refuse_a_returned_chain(packed: bool) -> None:
    fq = fake(packed)
    publish(fq, [b"abc"], [8])
    chain = take(fq)
    r = ReadableChain(chain)
    w = r.into_writable(ignore_remaining=True)
    chain.return_written(0)
    with tempfile.TemporaryFile() as f:
        with pytest.raises(ChainAlreadyReturned):
            r.read_to_fd(f.fileno(), 0)
        with pytest.raises(ChainAlreadyReturned):
            w.write_from_fd(f.fileno(), 0)


@pytest.mark.parametrize("offset", [-1, -4096, 1 << 63, (1 << 63) - 4])
def test_fd_transfers_refuse_an_offset_outside_a_file(offset: int) -> None:
    """-1 would mean "the file position" to Linux's preadv2: refused, with nothing consumed."""
    fq = fake(False)
    publish(fq, [b"abcdefgh"], [8])
    with tempfile.TemporaryFile() as f, take(fq) as chain:
        r = ReadableChain(chain)
        with pytest.raises(DeviceUsageError, match="file offset"):
            r.read_to_fd(f.fileno(), offset)
        w = r.into_writable(ignore_remaining=True)
        with pytest.raises(DeviceUsageError, match="file offset"):
            w.write_from_fd(f.fileno(), offset)
        assert (r.remaining(), w.remaining(), w.written) == ((8, 1), (8, 1), 0)
