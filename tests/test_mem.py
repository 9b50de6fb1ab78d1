"""Tests for :mod:`virtio_schema.mem`: driver ranges, guest memory and its lifetime, the barriers.

What a device relies on here: a descriptor's ``(addr, len)`` becomes a :class:`DriverRange` only
if it fits below 2**64; :meth:`GuestMemory.translate` hands out a writable byte view exactly when
the range lies wholly inside one region (never across two), and the view aliases the right bytes;
and ``close()`` gives every borrowed buffer back so an mmap can be unmapped and remapped.
"""

from __future__ import annotations

import array
import mmap
import os
import struct
import sys
from collections.abc import Callable
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_schema.errors import (
    AddressOverflow,
    DeviceUsageError,
    DriverError,
    InvalidMemoryTable,
    MemoryClosed,
    MemoryInUse,
    VirtioError,
)
from virtio_schema.mem import (
    ADDRESS_SPACE_END,
    DeviceRange,
    DriverMem,
    DriverRange,
    GuestMemory,
    UnmappedRange,
    full_barrier,
    read_barrier,
    write_barrier,
)

TOP = 1 << 64
MMAP_SIZE = 65536

Buffer = bytes | bytearray | mmap.mmap


def r(addr: int, length: int) -> DriverRange:
    return DriverRange.from_addr_len(addr, length)


def assert_byte_view(dr: DeviceRange, length: int) -> None:
    """``dr.view`` is a writable, 1-D, byte-formatted memoryview of exactly ``length`` bytes."""
    view = dr.view
    assert isinstance(view, memoryview)
    assert not view.readonly
    assert view.ndim == 1
    assert view.itemsize == 1
    assert view.format == "B"
    assert len(view) == length
    assert view.nbytes == length
    assert len(dr) == length


# --- DriverRange ---------------------------------------------------------------------------------


def test_address_space_end_is_two_to_the_64() -> None:
    assert ADDRESS_SPACE_END == TOP


def test_from_addr_len_at_address_zero() -> None:
    dr = r(0, 16)
    assert (dr.start, dr.end, dr.len) == (0, 16, 16)


def test_from_addr_len_last_byte_of_the_address_space_ends_exactly_at_2_64() -> None:
    dr = r(TOP - 1, 1)
    assert (dr.start, dr.end, dr.len) == (TOP - 1, TOP, 1)


def test_from_addr_len_covering_the_whole_address_space_has_a_len_above_sys_maxsize() -> None:
    dr = r(0, TOP)
    assert dr.len == TOP
    assert DriverRange(0, TOP) == dr


@pytest.mark.parametrize("addr", [0, 0x1000, TOP - 1, TOP])
def test_from_addr_len_zero_length_is_an_empty_range(addr: int) -> None:
    dr = r(addr, 0)
    assert (dr.start, dr.end, dr.len) == (addr, addr, 0)


@pytest.mark.parametrize(
    ("addr", "length"),
    [(TOP - 1, 2), (TOP, 1), (1, TOP), (TOP - 0x1000, 0x1001), (0xFFFF_FFFF_FFFF_F000, 1 << 32)],
)
def test_from_addr_len_past_2_64_is_refused_with_address_overflow_naming_the_address(
    addr: int, length: int
) -> None:
    with pytest.raises(AddressOverflow) as excinfo:
        r(addr, length)
    err = excinfo.value
    assert isinstance(err, DriverError)
    assert isinstance(err, VirtioError)
    assert (err.addr, err.length) == (addr, length)
    assert f"{addr:#x}" in str(err)
    assert f"{length:#x}" in str(err)


@pytest.mark.parametrize(("addr", "length"), [(-1, 1), (-1, 0), (0, -1), (0x1000, -0x10)])
def test_from_addr_len_negative_address_or_length_is_refused(addr: int, length: int) -> None:
    with pytest.raises(AddressOverflow) as excinfo:
        r(addr, length)
    assert (excinfo.value.addr, excinfo.value.length) == (addr, length)


@pytest.mark.parametrize(("start", "end"), [(-1, 0), (0x10, 0xF), (0, TOP + 1)])
def test_constructor_refuses_ranges_outside_0_to_2_64_or_backwards(start: int, end: int) -> None:
    with pytest.raises(AddressOverflow):
        DriverRange(start, end)


def test_split_at_zero_gives_an_empty_head_and_the_whole_range() -> None:
    head, tail = r(0x1000, 0x100).split_at(0)
    assert head == DriverRange(0x1000, 0x1000)
    assert tail == DriverRange(0x1000, 0x1100)


def test_split_at_len_gives_the_whole_range_and_an_empty_tail() -> None:
    head, tail = r(0x1000, 0x100).split_at(0x100)
    assert head == DriverRange(0x1000, 0x1100)
    assert tail == DriverRange(0x1100, 0x1100)


def test_split_at_the_middle_gives_two_adjacent_ranges() -> None:
    head, tail = r(0x1000, 0x100).split_at(0x30)
    assert head == DriverRange(0x1000, 0x1030)
    assert tail == DriverRange(0x1030, 0x1100)
    assert head.len + tail.len == 0x100


def test_split_at_top_of_address_space() -> None:
    head, tail = r(TOP - 2, 2).split_at(1)
    assert (head.start, head.end, tail.start, tail.end) == (TOP - 2, TOP - 1, TOP - 1, TOP)


@pytest.mark.parametrize("offset", [-1, 0x101, 1 << 70])
def test_split_at_out_of_range_is_a_device_usage_error(offset: int) -> None:
    with pytest.raises(DeviceUsageError, match="split offset"):
        r(0x1000, 0x100).split_at(offset)


def test_equal_ranges_compare_and_hash_equal() -> None:
    a = r(0x1000, 0x10)
    b = DriverRange(0x1000, 0x1010)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert {a: "x"}[b] == "x"


def test_different_ranges_compare_unequal() -> None:
    assert r(0x1000, 0x10) != r(0x1000, 0x11)
    assert r(0x1000, 0x10) != r(0x1001, 0x10)
    assert r(0, 0) != r(1, 0)
    assert r(0x1000, 0x10) != (0x1000, 0x1010)


def test_contains_ranges_wholly_inside() -> None:
    outer = r(0x1000, 0x100)
    assert r(0x1000, 0x100) in outer
    assert r(0x1010, 0x10) in outer
    assert r(0x10F0, 0x10) in outer
    assert r(0x1100, 0) in outer
    assert r(0x0FFF, 2) not in outer
    assert r(0x10F0, 0x11) not in outer
    assert r(0x2000, 1) not in outer


def test_contains_addresses_half_open() -> None:
    outer = r(0x1000, 0x100)
    assert 0x1000 in outer
    assert 0x10FF in outer
    assert 0x1100 not in outer
    assert 0x0FFF not in outer
    assert 0x1000 not in r(0x1000, 0)


def test_contains_other_types_is_false() -> None:
    outer = r(0x1000, 0x100)
    assert "0x1000" not in outer
    assert 4096.0 not in outer
    assert None not in outer


# --- GuestMemory.translate -----------------------------------------------------------------------

# Two separate regions, and a pair of adjacent (touching) ones.
A_START, A_SIZE = 0x1000, 0x1000
B_START, B_SIZE = 0x10000, 0x1000
C_START, C_SIZE = 0x20000, 0x1000
D_START, D_SIZE = 0x21000, 0x1000  # starts exactly where C ends


class Table:
    """A memory over four zeroed bytearrays, keeping the bytearrays to check writes."""

    def __init__(self) -> None:
        self.a = bytearray(A_SIZE)
        self.b = bytearray(B_SIZE)
        self.c = bytearray(C_SIZE)
        self.d = bytearray(D_SIZE)
        self.mem = GuestMemory(
            [(C_START, self.c), (A_START, self.a), (D_START, self.d), (B_START, self.b)]
        )


@pytest.fixture
def table() -> Table:
    return Table()


@pytest.fixture
def mem(table: Table) -> GuestMemory:
    return table.mem


def test_guest_memory_is_a_driver_mem(mem: GuestMemory) -> None:
    driver_mem: DriverMem = mem
    dr = driver_mem.translate(r(A_START, 1))
    assert dr is not None
    mem.close()


def test_translate_at_region_start(mem: GuestMemory) -> None:
    with mem:
        dr = mem.translate(r(A_START, 16))
        assert dr is not None
        assert_byte_view(dr, 16)
        assert dr.driver_range == r(A_START, 16)


def test_translate_last_byte_of_region(table: Table, mem: GuestMemory) -> None:
    with mem:
        dr = mem.translate(r(A_START + A_SIZE - 1, 1))
        assert dr is not None
        assert_byte_view(dr, 1)
        dr.view[0] = 0xEE
        assert table.a[-1] == 0xEE


def test_translate_one_byte_past_region_end_is_none(mem: GuestMemory) -> None:
    with mem:
        assert mem.translate(r(A_START + A_SIZE, 1)) is None


def test_translate_range_ending_exactly_at_region_end(mem: GuestMemory) -> None:
    with mem:
        dr = mem.translate(r(A_START + A_SIZE - 16, 16))
        assert dr is not None
        assert_byte_view(dr, 16)
        assert mem.translate(r(A_START + A_SIZE - 16, 17)) is None


def test_translate_whole_region(table: Table, mem: GuestMemory) -> None:
    with mem:
        dr = mem.translate(r(B_START, B_SIZE))
        assert dr is not None
        assert_byte_view(dr, B_SIZE)
        dr.view[:] = b"\x5a" * B_SIZE
        assert table.b == b"\x5a" * B_SIZE


@pytest.mark.parametrize("addr", [A_START, A_START + 0x10, A_START + A_SIZE, D_START + D_SIZE])
def test_translate_zero_length_inside_or_at_region_end_is_an_empty_view(
    mem: GuestMemory, addr: int
) -> None:
    with mem:
        dr = mem.translate(r(addr, 0))
        assert dr is not None
        assert_byte_view(dr, 0)
        assert dr.driver_range == r(addr, 0)


@pytest.mark.parametrize("addr", [0, A_START - 1, A_START + A_SIZE + 1, 0x8000, 1 << 40, TOP])
def test_translate_zero_length_in_a_gap_or_beyond_is_none(mem: GuestMemory, addr: int) -> None:
    with mem:
        assert mem.translate(r(addr, 0)) is None


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (0x8000, 1),  # gap between A and B
        (A_START + A_SIZE, 0x100),  # right after A
        (D_START + D_SIZE, 1),  # right after the last region
        (1 << 40, 0x1000),  # far beyond
        (TOP - 1, 1),  # top of the address space
    ],
)
def test_translate_in_a_gap_or_beyond_is_none(mem: GuestMemory, addr: int, length: int) -> None:
    with mem:
        assert mem.translate(r(addr, length)) is None


@pytest.mark.parametrize(("addr", "length"), [(0, 1), (0, A_START), (A_START - 1, 2)])
def test_translate_below_first_region_is_none(mem: GuestMemory, addr: int, length: int) -> None:
    with mem:
        assert mem.translate(r(addr, length)) is None


def test_translate_range_across_two_adjacent_regions_is_none(mem: GuestMemory) -> None:
    with mem:
        assert mem.translate(r(D_START - 0x10, 0x20)) is None
        assert mem.translate(r(C_START, C_SIZE + D_SIZE)) is None
        # each side on its own translates
        assert mem.translate(r(D_START - 0x10, 0x10)) is not None
        assert mem.translate(r(D_START, 0x10)) is not None


def test_translate_range_across_a_gap_is_none(mem: GuestMemory) -> None:
    with mem:
        assert mem.translate(r(A_START, B_START + B_SIZE - A_START)) is None


def test_translate_adjacent_region_start_uses_the_second_region(
    table: Table, mem: GuestMemory
) -> None:
    with mem:
        dr = mem.translate(r(D_START, 4))
        assert dr is not None
        dr.view[:] = b"dddd"
        assert table.d[:4] == b"dddd"
        assert table.c[-4:] == bytes(4)


def test_translations_in_two_regions_write_to_the_right_buffer_at_the_right_offset(
    table: Table, mem: GuestMemory
) -> None:
    with mem:
        in_a = mem.translate(r(A_START + 5, 3))
        in_b = mem.translate(r(B_START + 0x7F0, 4))
        assert in_a is not None
        assert in_b is not None
        in_a.view[:] = b"AAA"
        in_b.view[:] = b"BBBB"
        assert table.a[5:8] == b"AAA"
        assert table.a.count(0) == A_SIZE - 3
        assert table.b[0x7F0:0x7F4] == b"BBBB"
        assert table.b.count(0) == B_SIZE - 4
        assert not any(table.c)
        assert not any(table.d)


def test_translated_view_sees_later_changes_to_the_backing_buffer(
    table: Table, mem: GuestMemory
) -> None:
    with mem:
        dr = mem.translate(r(B_START + 8, 2))
        assert dr is not None
        table.b[8:10] = b"hi"
        assert bytes(dr.view) == b"hi"


def test_translate_at_the_top_of_the_address_space() -> None:
    top = bytearray(0x1000)
    with GuestMemory([(TOP - 0x1000, top)]) as mem:
        dr = mem.translate(r(TOP - 1, 1))
        assert dr is not None
        assert_byte_view(dr, 1)
        dr.view[0] = 0x77
        assert top[-1] == 0x77
        tail = mem.translate(r(TOP - 16, 16))
        assert tail is not None
        assert_byte_view(tail, 16)
        empty = mem.translate(r(TOP, 0))
        assert empty is not None
        assert_byte_view(empty, 0)
        # a range whose end would pass 2**64 cannot even be asked for
        with pytest.raises(AddressOverflow):
            r(TOP - 16, 17)


def test_translate_byte_addresses_a_region_with_multibyte_items() -> None:
    words = array.array("I", [0] * 4)
    with GuestMemory([(0x1000, words)]) as mem:
        assert mem.regions[0].size == 16
        dr = mem.translate(r(0x1004, 4))
        assert dr is not None
        assert_byte_view(dr, 4)
        dr.view[:] = struct.pack("=I", 0xDEADBEEF)
        assert words[1] == 0xDEADBEEF


def test_read_only_memory_hands_out_read_only_views() -> None:
    with GuestMemory([(0x1000, b"abcdefgh")], writable=False) as mem:
        assert not mem.writable
        dr = mem.translate(r(0x1002, 3))
        assert dr is not None
        assert dr.view.readonly
        assert bytes(dr.view) == b"cde"
        assert mem.read(0x1000, 8) == b"abcdefgh"


# --- construction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        [(0x1000, 0x1000), (0x1800, 0x1000)],  # sorted, partial overlap
        [(0x1800, 0x1000), (0x1000, 0x1000)],  # unsorted, partial overlap
        [(0x1000, 0x1000), (0x1000, 0x10)],  # same start
        [(0x1000, 0x1000), (0x1100, 0x10)],  # second inside the first
        [(0x5000, 0x10), (0x1000, 0x1000), (0x1FFF, 0x10)],  # unsorted, by one byte
        [(0x1000, 0x10000), (0x3000, 0x10), (0x8000, 0x10)],  # first contains the next two
    ],
)
def test_overlapping_regions_are_refused(layout: list[tuple[int, int]]) -> None:
    with pytest.raises(InvalidMemoryTable, match="overlap") as excinfo:
        GuestMemory([(start, bytearray(size)) for start, size in layout])
    assert isinstance(excinfo.value, DeviceUsageError)


def test_touching_regions_are_accepted() -> None:
    with GuestMemory([(0x2000, bytearray(0x1000)), (0x1000, bytearray(0x1000))]) as mem:
        assert [(g.start, g.end) for g in mem.regions] == [(0x1000, 0x2000), (0x2000, 0x3000)]


def test_regions_are_sorted_by_address() -> None:
    bufs = [bytearray(0x10), bytearray(0x20), bytearray(0x30)]
    with GuestMemory([(0x9000, bufs[0]), (0x1000, bufs[1]), (0x5000, bufs[2])]) as mem:
        regions = mem.regions
        assert [g.start for g in regions] == [0x1000, 0x5000, 0x9000]
        assert [g.size for g in regions] == [0x20, 0x30, 0x10]
        assert [g.end for g in regions] == [0x1020, 0x5030, 0x9010]
        assert [g.buffer for g in regions] == [bufs[1], bufs[2], bufs[0]]


def test_empty_table_translates_nothing() -> None:
    with GuestMemory() as mem:
        assert mem.regions == ()
        assert mem.translate(r(0, 0)) is None
        assert mem.translate(r(0, 1)) is None


def test_empty_region_is_refused() -> None:
    with pytest.raises(InvalidMemoryTable, match="0x1000 is empty"):
        GuestMemory([(0x1000, bytearray())])


def test_read_only_buffer_is_refused_for_writable_memory() -> None:
    with pytest.raises(InvalidMemoryTable, match="read-only"):
        GuestMemory([(0x1000, b"not writable")])


def test_read_only_buffer_is_accepted_with_writable_false() -> None:
    with GuestMemory([(0x1000, b"readable")], writable=False) as mem:
        assert mem.regions[0].size == 8


def test_object_without_buffer_is_refused() -> None:
    with pytest.raises(InvalidMemoryTable, match="object has no buffer interface"):
        GuestMemory([(0x1000, object())])  # type: ignore[list-item]


def test_non_contiguous_buffer_is_refused() -> None:
    strided = memoryview(bytearray(32))[::2]
    with pytest.raises(InvalidMemoryTable, match="not contiguous"):
        GuestMemory([(0x1000, strided)])


@pytest.mark.parametrize(("start", "size"), [(TOP - 0x10, 0x11), (TOP, 1), ((1 << 65), 0x10)])
def test_region_past_2_64_is_refused(start: int, size: int) -> None:
    with pytest.raises(InvalidMemoryTable, match="64-bit address space"):
        GuestMemory([(start, bytearray(size))])


def test_region_at_a_negative_address_is_refused() -> None:
    with pytest.raises(InvalidMemoryTable):
        GuestMemory([(-0x1000, bytearray(0x10))])


def test_region_ending_exactly_at_2_64_is_accepted() -> None:
    with GuestMemory([(TOP - 0x10, bytearray(0x10))]) as mem:
        assert mem.regions[0].end == TOP


# --- read / write --------------------------------------------------------------------------------


def test_write_lands_in_the_backing_buffer_and_read_copies_it(
    table: Table, mem: GuestMemory
) -> None:
    with mem:
        mem.write(B_START + 0x10, b"hello")
        assert table.b[0x10:0x15] == b"hello"
        data = mem.read(B_START + 0x10, 5)
        assert data == b"hello"
        assert isinstance(data, bytes)
        table.b[0x10] = ord("j")
        assert data == b"hello"  # a copy, not a view
        assert mem.read(B_START + 0x10, 5) == b"jello"


def test_write_accepts_any_buffer(table: Table, mem: GuestMemory) -> None:
    with mem:
        mem.write(A_START, array.array("H", [0x0201, 0x0403]))
        mem.write(A_START + 4, memoryview(b"xy"))
        mem.write(A_START + 6, bytearray(b"z"))
        assert table.a[:7] == struct.pack("=HH", 0x0201, 0x0403) + b"xyz"


def test_zero_length_read_and_write_inside_memory(mem: GuestMemory) -> None:
    with mem:
        assert mem.read(A_START, 0) == b""
        mem.write(A_START + A_SIZE, b"")


@pytest.mark.parametrize(
    ("addr", "length"),
    [(0, 1), (0x8000, 4), (A_START + A_SIZE - 2, 4), (D_START - 2, 4), (TOP - 1, 1)],
)
def test_read_of_unmapped_range_raises_unmapped_range_naming_it(
    mem: GuestMemory, addr: int, length: int
) -> None:
    with mem, pytest.raises(UnmappedRange) as excinfo:
        mem.read(addr, length)
    err = excinfo.value
    assert isinstance(err, DriverError)
    assert (err.start, err.length) == (addr, length)
    assert f"{addr:#x}" in str(err)


@pytest.mark.parametrize(
    ("addr", "length"), [(0, 1), (0x8000, 4), (A_START + A_SIZE - 2, 4), (D_START - 2, 4)]
)
def test_write_of_unmapped_range_raises_and_writes_nothing(
    table: Table, mem: GuestMemory, addr: int, length: int
) -> None:
    with mem:
        with pytest.raises(UnmappedRange) as excinfo:
            mem.write(addr, b"\xff" * length)
        assert (excinfo.value.start, excinfo.value.length) == (addr, length)
        for buf in (table.a, table.b, table.c, table.d):
            assert not any(buf)


def test_read_whose_end_passes_2_64_raises_address_overflow(mem: GuestMemory) -> None:
    with mem, pytest.raises(AddressOverflow):
        mem.read(TOP - 1, 2)


# --- DeviceRange.split_at ------------------------------------------------------------------------


def test_device_range_split_at_splits_view_and_driver_range(table: Table, mem: GuestMemory) -> None:
    with mem:
        dr = mem.translate(r(B_START + 0x100, 0x10))
        assert dr is not None
        head, tail = dr.split_at(6)
        assert_byte_view(head, 6)
        assert_byte_view(tail, 10)
        assert head.driver_range == r(B_START + 0x100, 6)
        assert tail.driver_range == r(B_START + 0x106, 10)
        head.view[:] = b"H" * 6
        tail.view[:] = b"T" * 10
        assert table.b[0x100:0x110] == b"HHHHHHTTTTTTTTTT"


def test_device_range_split_at_ends(mem: GuestMemory) -> None:
    with mem:
        dr = mem.translate(r(A_START, 8))
        assert dr is not None
        empty, whole = dr.split_at(0)
        assert (len(empty), len(whole)) == (0, 8)
        assert empty.driver_range == r(A_START, 0)
        assert whole.driver_range == r(A_START, 8)
        whole, empty = dr.split_at(8)
        assert (len(whole), len(empty)) == (8, 0)
        assert empty.driver_range == r(A_START + 8, 0)


@pytest.mark.parametrize("offset", [-1, 9, 1 << 64])
def test_device_range_split_at_out_of_range_is_a_device_usage_error(
    mem: GuestMemory, offset: int
) -> None:
    with mem:
        dr = mem.translate(r(A_START, 8))
        assert dr is not None
        with pytest.raises(DeviceUsageError, match="split offset"):
            dr.split_at(offset)


def test_device_range_without_driver_address_splits_without_one() -> None:
    buf = bytearray(b"abcdef")
    dr = DeviceRange(memoryview(buf))
    assert dr.driver_range is None
    head, tail = dr.split_at(2)
    assert (head.driver_range, tail.driver_range) == (None, None)
    assert (bytes(head.view), bytes(tail.view)) == (b"ab", b"cdef")


def test_device_range_casts_a_non_byte_view_to_bytes() -> None:
    words = array.array("I", [1, 2])
    dr = DeviceRange(memoryview(words))
    assert_byte_view(dr, 8)


def test_split_halves_are_tracked_and_released_by_close(mem: GuestMemory) -> None:
    dr = mem.translate(r(A_START, 8))
    assert dr is not None
    head, tail = dr.split_at(3)
    head_of_tail, _ = tail.split_at(1)
    mem.close()
    for piece in (dr, head, tail, head_of_tail):
        with pytest.raises(ValueError, match="released"):
            piece.view[0]


# --- word views -----------------------------------------------------------------------------------


def test_le16_and_le32_read_and_write_little_endian_words_at_their_byte_offsets() -> None:
    buf = bytearray(11)  # odd length: the word views stop at the last whole word
    dr = DeviceRange(memoryview(buf))
    w16, w32 = dr.le16(), dr.le32()
    assert (len(memoryview(buf)), _count(w16), _count(w32)) == (11, 5, 2)
    w16[1] = 0xBEEF
    w32[1] = 0x01020304
    assert buf[2:4] == b"\xef\xbe"
    assert buf[4:8] == b"\x04\x03\x02\x01"
    assert w16[1] == 0xBEEF
    assert w16[2] == 0x0304
    assert w16[3] == 0x0102
    assert buf[:2] == bytes(2)
    assert buf[8:] == bytes(3)


def _count(words: object) -> int:
    n = 0
    while True:
        try:
            words[n]  # type: ignore[index]
        except IndexError:
            return n
        n += 1


def test_word_views_are_released_with_their_range_so_the_mmap_can_be_unmapped() -> None:
    mm = mmap.mmap(-1, MMAP_SIZE)
    try:
        mem = GuestMemory([(0x100000, mm)], close_buffers=True)
        dr = mem.translate(r(0x100000, 64))
        assert dr is not None
        w16, w32 = dr.le16(), dr.le32()
        w16[0] = 7
        mem.close()  # no MemoryInUse: the word views went with the range
        assert mm.closed
        for words in (w16, w32):
            with pytest.raises(ValueError, match="released"):
                words[0]
    finally:
        mm.close()


# --- lifetime ------------------------------------------------------------------------------------


def test_close_releases_all_views_so_the_mmap_can_be_unmapped() -> None:
    mm = mmap.mmap(-1, MMAP_SIZE)
    try:
        mem = GuestMemory([(0x100000, mm)])
        first = mem.translate(r(0x100000, 0x100))
        second = mem.translate(r(0x100000 + 0x8000, 0x10))
        zero = mem.translate(r(0x100000 + MMAP_SIZE, 0))
        assert first is not None
        assert second is not None
        assert zero is not None
        head, tail = first.split_at(0x80)
        first.view[0] = 1
        mem.close()
        assert mem.closed
        mm.close()  # no BufferError: nothing of ours still exports the mmap
        for dr in (first, second, zero, head, tail):
            with pytest.raises(ValueError, match="released"):
                bytes(dr.view)
    finally:
        mm.close()


def test_translate_read_and_write_after_close_raise_memory_closed(mem: GuestMemory) -> None:
    mem.close()
    with pytest.raises(MemoryClosed) as excinfo:
        mem.translate(r(A_START, 1))
    assert isinstance(excinfo.value, DeviceUsageError)
    with pytest.raises(MemoryClosed):
        mem.read(A_START, 1)
    with pytest.raises(MemoryClosed):
        mem.write(A_START, b"x")


def test_close_is_idempotent(mem: GuestMemory) -> None:
    assert not mem.closed
    mem.close()
    mem.close()
    assert mem.closed


def test_context_manager_closes() -> None:
    buf = bytearray(16)
    with GuestMemory([(0, buf)]) as mem:
        dr = mem.translate(r(0, 4))
        assert dr is not None
    assert mem.closed
    with pytest.raises(ValueError, match="released"):
        dr.view[0]
    buf.extend(b"resizable again")  # no export left on the bytearray either


def test_context_manager_closes_on_exception() -> None:
    with pytest.raises(RuntimeError), GuestMemory([(0, bytearray(16))]) as mem:
        raise RuntimeError("device failed")
    assert mem.closed


def test_remap_a_new_anonymous_mmap_at_the_same_address() -> None:
    old = mmap.mmap(-1, MMAP_SIZE)
    with GuestMemory([(0x100000, old)]) as mem:
        mem.write(0x100010, b"old")
        kept = mem.translate(r(0x100010, 3))
    old.close()
    new = mmap.mmap(-1, MMAP_SIZE)
    try:
        with GuestMemory([(0x100000, new)]) as remapped:
            assert remapped.read(0x100010, 3) == bytes(3)  # a fresh anonymous mapping
            remapped.write(0x100010, b"new")
            assert new[0x10:0x13] == b"new"
        assert kept is not None
        with pytest.raises(ValueError, match="released"):
            bytes(kept.view)
    finally:
        new.close()


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs memfd_create (Linux)")
def test_remap_of_a_memfd_sees_data_written_before_the_unmap() -> None:
    fd = os.memfd_create("guest-ram")
    try:
        os.ftruncate(fd, MMAP_SIZE)
        first = mmap.mmap(fd, MMAP_SIZE)
        with GuestMemory([(0x100000, first)]) as mem:
            dr = mem.translate(r(0x100000 + 0x4000, 8))
            assert dr is not None
            dr.view[:] = b"persists"
            head, _ = dr.split_at(4)
        first.close()
        second = mmap.mmap(fd, MMAP_SIZE)
        try:
            with GuestMemory([(0x100000, second)]) as remapped:
                assert remapped.read(0x100000 + 0x4000, 8) == b"persists"
            with pytest.raises(ValueError, match="released"):
                bytes(head.view)
        finally:
            second.close()
    finally:
        os.close(fd)


def test_close_buffers_closes_the_mmaps_itself() -> None:
    mm = mmap.mmap(-1, MMAP_SIZE)
    other = bytearray(16)
    try:
        mem = GuestMemory([(0x100000, mm), (0, other)], close_buffers=True)
        dr = mem.translate(r(0x100000, 16))
        assert dr is not None
        dr.split_at(8)
        mem.close()
        assert mm.closed
        other.extend(b"x")  # the bytearray is left alone, and no longer exported
    finally:
        mm.close()


def test_close_buffers_with_a_caller_derived_slice_raises_memory_in_use() -> None:
    mm = mmap.mmap(-1, MMAP_SIZE)
    try:
        mem = GuestMemory([(0x100000, mm)], close_buffers=True)
        dr = mem.translate(r(0x100000, 16))
        assert dr is not None
        v = dr.view[0:4]
        with pytest.raises(MemoryInUse) as excinfo:
            mem.close()
        assert isinstance(excinfo.value, DeviceUsageError)
        assert "0x100000" in str(excinfo.value)
        assert not mm.closed
        assert mem.closed
        with pytest.raises(MemoryClosed):
            mem.translate(r(0x100000, 1))
        v.release()
        mm.close()  # once the caller lets go of its slice
    finally:
        mm.close()


def test_caller_derived_slice_is_the_callers_to_release_without_close_buffers() -> None:
    mm = mmap.mmap(-1, MMAP_SIZE)
    try:
        mem = GuestMemory([(0, mm)])
        dr = mem.translate(r(0, 16))
        assert dr is not None
        v = dr.view[0:4]
        mem.close()  # the memory does not own the mmap: nothing to report
        with pytest.raises(BufferError):
            mm.close()
        v.release()
        mm.close()
    finally:
        mm.close()


# Bugs found while writing these tests: each test below states the behaviour the lifetime rules
# (module docstring rule 2, the explicit lifetime of views and the error policy) call for.


def _later_region_read_only(mm: mmap.mmap) -> list[tuple[int, Buffer]]:
    return [(0, mm), (0x100000, b"read-only")]


def _later_region_empty(mm: mmap.mmap) -> list[tuple[int, Buffer]]:
    return [(0, mm), (0x100000, bytearray())]


def _mmap_past_2_64(mm: mmap.mmap) -> list[tuple[int, Buffer]]:
    return [(TOP - 0x1000, mm)]


def _later_region_overlapping(mm: mmap.mmap) -> list[tuple[int, Buffer]]:
    return [(0, mm), (0x1000, bytearray(16))]


@pytest.mark.parametrize(
    "bad_table",
    [_later_region_read_only, _later_region_empty, _mmap_past_2_64, _later_region_overlapping],
)
def test_refused_table_leaves_no_buffer_exported_while_the_refusal_is_handled(
    bad_table: Callable[[mmap.mmap], list[tuple[int, Buffer]]],
) -> None:
    mm = mmap.mmap(-1, MMAP_SIZE)
    unmapped_in_handler = False
    try:
        GuestMemory(bad_table(mm))
    except InvalidMemoryTable:
        # The natural handler: the table was refused, so unmap what was mapped for it.
        try:
            mm.close()
            unmapped_in_handler = True
        except BufferError:
            pass
    else:
        pytest.fail("the table was accepted")
    mm.close()  # the exception (and its traceback) is gone here
    assert unmapped_in_handler, "GuestMemory still exported the mmap after refusing the table"


def test_close_with_a_caller_held_export_of_a_view_raises_virtio_error_and_frees_the_rest() -> None:
    mm = mmap.mmap(-1, MMAP_SIZE)
    mem = GuestMemory([(0, mm)])
    dr = mem.translate(r(0, 16))
    other = mem.translate(r(0x100, 16))
    assert dr is not None
    assert other is not None
    it = struct.iter_unpack("<I", dr.view)  # holds a buffer export of dr.view
    with pytest.raises(VirtioError):
        mem.close()
    with pytest.raises(ValueError, match="released"):
        bytes(other.view)
    del it
    mem.close()  # the export is gone: a second close() finishes the job
    mm.close()


def test_close_buffers_with_one_mmap_mapped_at_two_addresses_closes_cleanly() -> None:
    mm = mmap.mmap(-1, MMAP_SIZE)
    try:
        mem = GuestMemory([(0, mm), (0x100000, mm)], close_buffers=True)
        mem.write(0x10, b"alias")
        assert mem.read(0x100010, 5) == b"alias"
        mem.close()  # the caller holds nothing: no MemoryInUse
        assert mm.closed
    finally:
        mm.close()


# --- barriers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("barrier", [read_barrier, write_barrier, full_barrier])
def test_barrier_helpers_smoke(barrier: Callable[[], object]) -> None:
    """Smoke test only: the helpers are callable and return None (ordering is not observable)."""
    assert barrier() is None


# --- properties ----------------------------------------------------------------------------------

SPACE = 1 << 20


@st.composite
def region_tables(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Non-overlapping ``(start, size)`` regions inside ``0..2**20``, possibly touching."""
    n = draw(st.integers(min_value=0, max_value=6))
    gaps = draw(st.lists(st.integers(0, 0x8000), min_size=n, max_size=n))
    sizes = draw(st.lists(st.integers(1, 0x200), min_size=n, max_size=n))
    table = []
    addr = 0
    for gap, size in zip(gaps, sizes, strict=True):
        addr += gap
        table.append((addr, size))
        addr += size
    assert addr <= SPACE
    return table


@given(table=region_tables(), data=st.data())
def test_translate_gives_a_view_iff_the_range_is_inside_one_region_and_it_aliases_it(
    table: list[tuple[int, int]], data: st.DataObject
) -> None:
    edges = [start for start, _ in table] + [start + size for start, size in table]
    addr = data.draw(
        st.one_of(
            st.integers(0, SPACE),
            st.sampled_from(edges or [0]).flatmap(lambda e: st.integers(max(0, e - 3), e + 3)),
        ),
        label="addr",
    )
    length = data.draw(st.integers(0, 0x240), label="length")
    buffers = [bytearray(size) for _, size in table]
    inside = [
        i
        for i, (start, size) in enumerate(table)
        if start <= addr and addr + length <= start + size
    ]
    with GuestMemory(zip([start for start, _ in table], buffers, strict=True)) as mem:
        dr = mem.translate(r(addr, length))
        if not inside:
            assert dr is None
            return
        assert dr is not None
        assert_byte_view(dr, length)
        assert dr.driver_range == r(addr, length)
        if length == 0:
            return  # may sit on the edge shared by two touching regions
        assert len(inside) == 1
        (i,) = inside
        offset = addr - table[i][0]
        dr.view[:] = b"\xa5" * length
        assert buffers[i][offset : offset + length] == b"\xa5" * length
        assert buffers[i].count(0) == len(buffers[i]) - length
        assert all(not any(buf) for j, buf in enumerate(buffers) if j != i)


@given(
    addr=st.integers(0, TOP),
    data=st.data(),
)
def test_driver_range_split_at_pieces_are_adjacent_and_cover_the_range(
    addr: int, data: st.DataObject
) -> None:
    length = data.draw(st.integers(0, TOP - addr), label="length")
    offset = data.draw(st.integers(0, length), label="offset")
    whole = r(addr, length)
    head, tail = whole.split_at(offset)
    assert (head.start, head.end, tail.start, tail.end) == (
        addr,
        addr + offset,
        addr + offset,
        addr + length,
    )
    assert head.len + tail.len == whole.len
    assert head in whole
    assert tail in whole


@pytest.mark.parametrize(("code", "width"), [("H", 2), ("I", 4)])
def test_swapped_words_store_and_load_in_the_byte_order_opposite_to_the_host(
    code: str, width: int
) -> None:
    """What a big-endian host uses for :meth:`DeviceRange.le16`/``le32``: a native word view plus
    a swap. Checked here on any host: the bytes are the value in the order opposite to the host's
    (little-endian on a big-endian host), and a load gives the value back."""
    from virtio_schema._device_range import _SwappedWords

    buf = bytearray(2 * width)
    native = memoryview(buf).cast(code)  # type: ignore[call-overload]
    words = _SwappedWords(native, width)
    value = int.from_bytes(bytes(range(1, width + 1)), "little")
    words[1] = value
    opposite: Literal["little", "big"] = "big" if sys.byteorder == "little" else "little"
    assert buf[width:] == value.to_bytes(width, opposite)
    assert buf[:width] == bytes(width)
    assert words[1] == value
    words.release()
    native.release()


# --- regions added and removed while the memory is in use (memory hotplug) ----------------------


def test_an_added_region_is_translated_and_located_at_once() -> None:
    mem = GuestMemory([(0x1000, bytearray(0x1000))])
    assert mem.locate(0x9000, 4) is None
    mem.add_region(0x9000, bytearray(b"\xaa" * 0x1000))
    assert [r.start for r in mem.regions] == [0x1000, 0x9000]
    found = mem.locate(0x9000, 4)
    assert found is not None
    assert bytes(found[0][found[1] : found[1] + 4]) == b"\xaa" * 4
    assert mem.read(0x1000, 2) == b"\0\0"  # the first region still answers (two regions now)
    mem.close()


def test_an_added_region_overlapping_another_is_refused_and_changes_nothing() -> None:
    mem = GuestMemory([(0x1000, bytearray(0x2000))])
    with pytest.raises(InvalidMemoryTable, match="overlap"):
        mem.add_region(0x2000, bytearray(0x1000))
    assert len(mem.regions) == 1
    assert mem.locate(0x2000, 4) is not None  # the old fast path still serves
    mem.close()


def test_a_removed_region_is_no_longer_reached_and_its_buffer_is_released() -> None:
    keep, gone = bytearray(0x1000), bytearray(0x1000)
    mem = GuestMemory([(0x1000, keep), (0x8000, gone)])
    mem.remove_region(mem.regions[1])
    assert mem.locate(0x8000, 1) is None
    assert mem.translate(DriverRange.from_addr_len(0x8000, 1)) is None
    with pytest.raises(UnmappedRange):
        mem.read(0x8000, 1)
    gone.extend(b"x")  # no export of it is left: the buffer may be resized (or unmapped)
    assert mem.read(0x1000, 1) == b"\0"
    mem.close()


def test_a_region_with_a_live_view_is_removed_but_stays_exported_until_the_view_is_released() -> (
    None
):
    gone = bytearray(0x1000)
    mem = GuestMemory([(0x1000, bytearray(0x1000)), (0x8000, gone)])
    dr = mem.translate(DriverRange.from_addr_len(0x8010, 16))
    assert dr is not None
    mem.remove_region(mem.regions[1])
    dr.view[:4] = b"live"  # the view still works: nothing was unmapped under it
    assert gone[0x10:0x14] == b"live"
    with pytest.raises(BufferError):  # what mmap.close() raises too: the owner waits
        gone.extend(b"x")
    dr.release()
    gone.extend(b"x")
    mem.close()


def test_removing_a_region_of_another_memory_is_a_usage_error() -> None:
    a = GuestMemory([(0x1000, bytearray(0x1000))])
    b = GuestMemory([(0x1000, bytearray(0x1000))])
    with pytest.raises(DeviceUsageError, match="not a region of this memory"):
        a.remove_region(b.regions[0])
    a.close()
    b.close()
