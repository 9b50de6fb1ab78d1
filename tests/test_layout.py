"""Tests of :mod:`virtio_schema.layout`: the ``struct`` accessors derived from Construct schemas.

What a user relies on: a :class:`Layout` reads and writes exactly the bytes Construct would (so the
schema stays the single source of truth), refuses values that do not fit instead of truncating them,
refuses every schema it cannot map exactly with a named error, and raises nothing but
:class:`~virtio_schema.errors.VirtioError` subclasses.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

import construct
import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_schema import schema
from virtio_schema.errors import (
    DeviceUsageError,
    LayoutError,
    LayoutValueError,
    VirtioError,
)
from virtio_schema.layout import (
    ArrayField,
    BitField,
    IntField,
    Layout,
    MixedByteOrder,
    NestedField,
    NonZeroPadding,
    RecordIndexError,
    RecordMismatch,
    Span,
    UnsupportedField,
    VariableSizeField,
    spans,
)

R = TypeVar("R", bound=tuple[Any, ...])

# --- records of the flat schemas -----------------------------------------------------------------


class Desc(NamedTuple):
    addr: int
    len: int
    flags: int
    next: int


class Used(NamedTuple):
    id: int
    len: int


class PackedDesc(NamedTuple):
    addr: int
    len: int
    id: int
    flags: int


class EventSupp(NamedTuple):
    off_wrap: int
    flags: int


class NetHdr(NamedTuple):
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int
    num_buffers: int


class BlkReqHdr(NamedTuple):
    type: int
    ioprio: int
    sector: int


class BlkConfig(NamedTuple):
    capacity: int
    size_max: int
    seg_max: int
    cylinders: int
    heads: int
    sectors: int
    blk_size: int
    physical_block_exp: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int
    writeback: int
    unused0: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int


class VsockHdr(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


DESC = Layout(schema.Descriptor, Desc, name="Descriptor")
USED = Layout(schema.UsedElem, Used, name="UsedElem")
PACKED_DESC = Layout(schema.PackedDescriptor, PackedDesc, name="PackedDescriptor")
EVENT_SUPP = Layout(schema.EventSuppression, EventSupp, name="EventSuppression")
NET_HDR = Layout(schema.VirtioNetHdr, NetHdr, name="VirtioNetHdr")
BLK_REQ_HDR = Layout(schema.VirtioBlkReqHdr, BlkReqHdr, name="VirtioBlkReqHdr")
BLK_CONFIG = Layout(schema.VirtioBlkConfig, BlkConfig, name="VirtioBlkConfig")
VSOCK_HDR = Layout(schema.VirtioVsockHdr, VsockHdr, name="VirtioVsockHdr")

# A heterogeneous list, so its element type is Layout[Any]; each Layout above keeps its own type.
LAYOUTS: list[Layout[Any]] = [
    DESC,
    USED,
    PACKED_DESC,
    EVENT_SUPP,
    NET_HDR,
    BLK_REQ_HDR,
    BLK_CONFIG,
    VSOCK_HDR,
]


def _layout_id(layout: Layout[Any]) -> str:
    return layout.name


def _named(layout: Layout[Any]) -> list[Span]:
    """The record fields of ``layout``'s schema (unnamed padding left out)."""
    return [s for s in spans(layout.schema) if s.name is not None]


def _values(span: Span) -> st.SearchStrategy[Any]:
    """Every value the field can hold: ``0 .. 2**(8*size) - 1`` for an unsigned integer."""
    if isinstance(span.subcon, construct.Bytes):
        return st.binary(min_size=span.size, max_size=span.size)
    return st.integers(0, (1 << (8 * span.size)) - 1)


def records(layout: Layout[R]) -> st.SearchStrategy[R]:
    """Records of ``layout`` with arbitrary in-range field values."""
    return st.builds(layout.record, *(_values(s) for s in _named(layout)))


def _as_dict(layout: Layout[Any], record: tuple[Any, ...]) -> dict[str, Any]:
    return {s.name: v for s, v in zip(_named(layout), record, strict=True) if s.name is not None}


def _zero_record(layout: Layout[R]) -> R:
    return layout.unpack(bytes(layout.size))


# --- Layout agrees with Construct ----------------------------------------------------------------


def test_layouts_have_the_schema_sizes() -> None:
    sizes = {layout.name: layout.size for layout in LAYOUTS}
    assert sizes == {
        "Descriptor": 16,
        "UsedElem": 8,
        "PackedDescriptor": 16,
        "EventSuppression": 4,
        "VirtioNetHdr": 12,
        "VirtioBlkReqHdr": 16,
        "VirtioBlkConfig": 60,
        "VirtioVsockHdr": 44,
    }
    assert DESC.offsets == {"addr": 0, "len": 8, "flags": 12, "next": 14}


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@given(data=st.data())
def test_layout_pack_equals_construct_build(layout: Layout[Any], data: st.DataObject) -> None:
    record = data.draw(records(layout))
    assert layout.pack(record) == layout.schema.build(_as_dict(layout, record))


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@given(data=st.data())
def test_layout_unpack_of_construct_build_gives_the_record(
    layout: Layout[Any], data: st.DataObject
) -> None:
    record = data.draw(records(layout))
    unpacked = layout.unpack(layout.schema.build(_as_dict(layout, record)))
    assert unpacked == record
    assert type(unpacked) is layout.record


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@given(data=st.data())
def test_construct_parse_of_layout_pack_gives_the_record(
    layout: Layout[Any], data: st.DataObject
) -> None:
    record = data.draw(records(layout))
    parsed = layout.schema.parse(layout.pack(record))
    assert {name: parsed[name] for name in _as_dict(layout, record)} == _as_dict(layout, record)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@given(data=st.data())
def test_pack_into_at_any_offset_writes_only_the_record_and_unpack_from_reads_it_back(
    layout: Layout[Any], data: st.DataObject
) -> None:
    record = data.draw(records(layout))
    before = data.draw(st.binary(min_size=layout.size, max_size=layout.size + 64))
    offset = data.draw(st.integers(0, len(before) - layout.size))
    buf = bytearray(before)
    layout.pack_into(buf, offset, record)
    end = offset + layout.size
    assert bytes(buf[offset:end]) == layout.schema.build(_as_dict(layout, record))
    assert buf[:offset] == before[:offset]
    assert buf[end:] == before[end:]
    assert layout.unpack_from(buf, offset) == record
    assert layout.unpack_from(memoryview(bytes(buf)), offset) == record


# --- out-of-range values are refused, not truncated ----------------------------------------------

BAD_INT_CASES = [
    pytest.param(layout, span.name, bad, id=f"{layout.name}.{span.name}={label}")
    for layout in LAYOUTS
    for span in _named(layout)
    for bad, label in ((1 << (8 * span.size), "2**width"), (-1, "-1"))
]


@pytest.mark.parametrize(("layout", "name", "bad"), BAD_INT_CASES)
def test_pack_refuses_out_of_range_value_naming_the_field(
    layout: Layout[Any], name: str, bad: int
) -> None:
    record = _zero_record(layout)._replace(**{name: bad})
    with pytest.raises(LayoutValueError) as info:
        layout.pack(record)
    assert info.value.field == name
    assert info.value.value == bad


@pytest.mark.parametrize(("layout", "name", "bad"), BAD_INT_CASES)
def test_pack_into_refuses_out_of_range_value_naming_the_field(
    layout: Layout[Any], name: str, bad: int
) -> None:
    record = _zero_record(layout)._replace(**{name: bad})
    with pytest.raises(LayoutValueError) as info:
        layout.pack_into(bytearray(layout.size + 8), 8, record)
    assert info.value.field == name


@pytest.mark.parametrize(("layout", "name", "bad"), BAD_INT_CASES)
def test_int_field_set_refuses_out_of_range_value_and_writes_nothing(
    layout: Layout[Any], name: str, bad: int
) -> None:
    field = layout.field(name)
    buf = bytearray(range(1, layout.size + 9))
    before = bytes(buf)
    with pytest.raises(LayoutValueError) as info:
        field.set(buf, bad, base=8)
    assert info.value.field == name
    assert buf == before


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@given(data=st.data())
def test_refused_pack_into_leaves_the_buffer_unchanged(
    layout: Layout[Any], data: st.DataObject
) -> None:
    valid = data.draw(records(layout))
    span = data.draw(st.sampled_from(_named(layout)))
    assert span.name is not None
    bad = data.draw(st.sampled_from([1 << (8 * span.size), -1]))
    record = valid._replace(**{span.name: bad})
    before = data.draw(st.binary(min_size=layout.size, max_size=layout.size + 32))
    offset = data.draw(st.integers(0, len(before) - layout.size))
    buf = bytearray(before)
    with pytest.raises(LayoutValueError):
        layout.pack_into(buf, offset, record)
    assert bytes(buf) == before


class SignedPair(NamedTuple):
    a: int
    b: int


SIGNED = Layout(construct.Struct("a" / construct.Int16sl, "b" / construct.Int8sl), SignedPair)


def test_signed_fields_accept_their_negative_range() -> None:
    assert SIGNED.pack(SignedPair(-(1 << 15), -1)) == struct.pack("<hb", -(1 << 15), -1)
    assert SIGNED.unpack(struct.pack("<hb", -2, -128)) == SignedPair(-2, -128)


@pytest.mark.parametrize("bad", [1 << 15, -(1 << 15) - 1])
def test_pack_refuses_out_of_range_signed_value_naming_the_field(bad: int) -> None:
    with pytest.raises(LayoutValueError) as info:
        SIGNED.pack(SignedPair(bad, 0))
    assert info.value.field == "a"


class WithId(NamedTuple):
    kind: int
    ident: bytes


WITH_ID = Layout(construct.Struct("kind" / construct.Int8ul, "ident" / construct.Bytes(4)), WithId)


@pytest.mark.parametrize("ident", [b"abc", b"abcde", b""])
def test_pack_refuses_bytes_of_the_wrong_length_naming_the_field(ident: bytes) -> None:
    # Layout.pack promises "out-of-range values are refused, never truncated"; struct's "4s"
    # silently pads a short value with zeros and cuts a long one.
    with pytest.raises(LayoutValueError) as info:
        WITH_ID.pack(WithId(1, ident))
    assert info.value.field == "ident"


# --- schemas Layout refuses ----------------------------------------------------------------------


class AB(NamedTuple):
    a: int
    b: int


def _ab(second: construct.Construct) -> construct.Struct:
    return construct.Struct("a" / construct.Int8ul, "b" / second)


@dataclass(frozen=True)
class Refusal:
    label: str
    schema: construct.Struct
    error: type[LayoutError]
    field: str | None


REFUSALS = [
    Refusal("GreedyBytes", _ab(construct.GreedyBytes), VariableSizeField, "b"),
    Refusal(
        "PrefixedArray",
        _ab(construct.PrefixedArray(construct.Int8ul, construct.Int8ul)),
        VariableSizeField,
        "b",
    ),
    Refusal(
        "Array[this.a]",
        _ab(construct.Array(construct.this.a, construct.Int8ul)),
        VariableSizeField,
        "b",
    ),
    Refusal("Bytes[lambda]", _ab(construct.Bytes(lambda ctx: int(ctx.a))), VariableSizeField, "b"),
    Refusal(
        "BitStruct",
        _ab(construct.BitStruct("hi" / construct.Nibble, "lo" / construct.Nibble)),
        BitField,
        "b",
    ),
    Refusal("Padding[ff] named", _ab(construct.Padding(2, b"\xff")), NonZeroPadding, "b"),
    # unnamed padding has no name to report: the error's field is None
    Refusal(
        "Padding[ff] unnamed",
        construct.Struct(
            "a" / construct.Int8ul, construct.Padding(2, b"\xff"), "b" / construct.Int8ul
        ),
        NonZeroPadding,
        None,
    ),
    Refusal(
        "Int16ul+Int32ub",
        construct.Struct("a" / construct.Int16ul, "b" / construct.Int32ub),
        MixedByteOrder,
        "b",
    ),
    Refusal("nested Struct", _ab(construct.Struct("x" / construct.Int8ul)), NestedField, "b"),
    Refusal("fixed Array", _ab(construct.Array(2, construct.Int8ul)), NestedField, "b"),
    Refusal("Enum", _ab(construct.Enum(construct.Int8ul, ON=1)), UnsupportedField, "b"),
    Refusal("Const", _ab(construct.Const(b"\x01\x02")), UnsupportedField, "b"),
    # Computed has a constant sizeof (0), so it is not a VariableSizeField: the code reports
    # UnsupportedField, for a constant and for a context lambda alike.
    Refusal("Computed[7]", _ab(construct.Computed(7)), UnsupportedField, "b"),
    Refusal(
        "Computed[lambda]",
        _ab(construct.Computed(lambda ctx: ctx.a)),
        UnsupportedField,
        "b",
    ),
    Refusal("Float32l", _ab(construct.Float32l), UnsupportedField, "b"),
    Refusal("Int16un native order", _ab(construct.Int16un), UnsupportedField, "b"),
    Refusal("Int24ul", _ab(construct.Int24ul), UnsupportedField, "b"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: c.label)
def test_layout_refuses_unmappable_construct_naming_the_field(case: Refusal) -> None:
    with pytest.raises(LayoutError) as info:
        Layout(case.schema, AB, name="Test")
    assert type(info.value) is case.error
    assert info.value.field == case.field
    assert info.value.schema_name == "Test"
    assert isinstance(info.value, VirtioError)


class BA(NamedTuple):
    b: int
    a: int


class XY(NamedTuple):
    x: int
    y: int


class OnlyA(NamedTuple):
    a: int


class ABC(NamedTuple):
    a: int
    b: int
    c: int


@dataclass
class ABData:
    a: int
    b: int


@pytest.mark.parametrize(
    ("record", "field"),
    [
        pytest.param(XY, "a", id="wrong names"),
        pytest.param(BA, "a", id="wrong order"),
        pytest.param(OnlyA, "b", id="missing field"),
        pytest.param(ABC, "c", id="extra field"),
        pytest.param(tuple, None, id="plain tuple"),
        pytest.param(cast(Any, ABData), None, id="dataclass"),
    ],
)
def test_layout_refuses_a_record_class_that_disagrees_with_the_schema(
    record: type[tuple[Any, ...]], field: str | None
) -> None:
    two_bytes = construct.Struct("a" / construct.Int8ul, "b" / construct.Int8ul)
    with pytest.raises(RecordMismatch) as info:
        Layout(two_bytes, record, name="Two")
    assert info.value.field == field


def test_layout_accepts_zero_padding_and_skips_it() -> None:
    padded = construct.Struct("a" / construct.Int8ul, construct.Padding(2), "b" / construct.Int16ul)
    layout = Layout(padded, AB)
    assert layout.size == 5
    assert layout.offsets == {"a": 0, "b": 3}
    assert layout.pack(AB(1, 0x0302)) == b"\x01\x00\x00\x02\x03"
    assert layout.pack(AB(1, 0x0302)) == padded.build({"a": 1, "b": 0x0302})
    assert layout.unpack(b"\x07\xff\xff\x02\x03") == AB(7, 0x0302)


def test_layout_maps_bytes_n_to_a_bytes_field() -> None:
    assert WITH_ID.size == 5
    assert WITH_ID.pack(WithId(9, b"vio!")) == b"\x09vio!"
    assert WITH_ID.pack(WithId(9, b"vio!")) == WITH_ID.schema.build({"kind": 9, "ident": b"vio!"})
    assert WITH_ID.unpack(b"\x02abcd") == WithId(2, b"abcd")


def test_layout_maps_a_big_endian_schema_and_single_bytes_of_any_order() -> None:
    big = construct.Struct("a" / construct.Int8ul, "b" / construct.Int16ub, "c" / construct.Int32ub)

    class Big(NamedTuple):
        a: int
        b: int
        c: int

    layout = Layout(big, Big)
    record = Big(1, 0x0203, 0x04050607)
    assert layout.pack(record) == b"\x01\x02\x03\x04\x05\x06\x07"
    assert layout.pack(record) == big.build(record._asdict())


# --- IntField and ArrayField on the split rings --------------------------------------------------


@pytest.mark.parametrize("n", [1, 256])
def test_avail_idx_field_reads_and_writes_bytes_2_and_3(n: int) -> None:
    ring = schema.avail_ring(n)
    idx = IntField.of(ring, "idx")
    assert (idx.offset, idx.size, idx.minimum, idx.maximum) == (2, 2, 0, 0xFFFF)
    base = 8
    buf = bytearray(base + ring.sizeof())
    idx.set(buf, 0xBEEF, base=base)
    assert buf[base + 2 : base + 4] == b"\xef\xbe"
    assert buf.count(0) == len(buf) - 2
    assert idx.get(buf, base) == 0xBEEF
    assert ring.parse(bytes(buf[base:])).idx == 0xBEEF


def test_int_field_set_refuses_65536_and_keeps_the_old_value() -> None:
    idx = IntField.of(schema.avail_ring(4), "idx")
    buf = bytearray(schema.avail_ring(4).sizeof())
    idx.set(buf, 0xFFFF)
    assert idx.get(buf) == 0xFFFF
    with pytest.raises(LayoutValueError):
        idx.set(buf, 0x10000)
    assert idx.get(buf) == 0xFFFF


@pytest.mark.parametrize("n", [1, 4, 256])
def test_used_ring_array_field_geometry(n: int) -> None:
    ring = ArrayField.of(schema.used_ring(n), "ring")
    assert (ring.name, ring.offset, ring.stride, ring.count) == ("ring", 4, 8, n)
    assert (
        ring.offset + ring.count * ring.stride
        == IntField.of(schema.used_ring(n), "avail_event").offset
    )


@given(
    log_n=st.integers(0, 8),
    data=st.data(),
)
def test_used_elements_written_by_stride_are_what_construct_parses(
    log_n: int, data: st.DataObject
) -> None:
    n = 1 << log_n
    used = schema.used_ring(n)
    ring = ArrayField.of(used, "ring")
    i = data.draw(st.integers(0, n - 1))
    elem = data.draw(records(USED))
    idx = data.draw(st.integers(0, 0xFFFF))
    buf = bytearray(used.sizeof())
    USED.pack_into(buf, ring.offset + i * ring.stride, elem)
    IntField.of(used, "idx").set(buf, idx)
    parsed = used.parse(bytes(buf))
    assert (parsed.ring[i].id, parsed.ring[i].len) == elem
    assert parsed.idx == idx
    assert all((e.id, e.len) == (0, 0) for j, e in enumerate(parsed.ring) if j != i)


@given(log_n=st.integers(0, 8), data=st.data())
def test_avail_ring_entries_read_by_stride_are_what_construct_built(
    log_n: int, data: st.DataObject
) -> None:
    n = 1 << log_n
    avail = schema.avail_ring(n)
    heads = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=n, max_size=n))
    used_event = data.draw(st.integers(0, 0xFFFF))
    buf = avail.build({"flags": 0, "idx": n, "ring": heads, "used_event": used_event})
    ring = ArrayField.of(avail, "ring")
    entry = ring.element_int()
    assert (entry.offset, entry.size) == (0, 2)
    assert [entry.get(buf, ring.offset + i * ring.stride) for i in range(ring.count)] == heads
    assert IntField.of(avail, "used_event").get(buf) == used_event


def test_element_int_of_a_struct_array_is_refused() -> None:
    with pytest.raises(NestedField):
        ArrayField.of(schema.used_ring(4), "ring").element_int()


def test_field_lookups_refuse_the_wrong_kind_of_field() -> None:
    with pytest.raises(NestedField) as nested:
        IntField.of(schema.avail_ring(4), "ring")
    assert nested.value.field == "ring"
    with pytest.raises(UnsupportedField) as missing:
        IntField.of(schema.avail_ring(4), "nope")
    assert missing.value.field == "nope"
    with pytest.raises(UnsupportedField) as scalar:
        ArrayField.of(schema.avail_ring(4), "idx")
    assert scalar.value.field == "idx"


# --- RecordArray ---------------------------------------------------------------------------------


def _descs(count: int) -> list[Desc]:
    return [Desc(0x1000 * (i + 1), 0x200 + i, i & 7, (i + 1) % count) for i in range(count)]


def test_record_array_indexes_and_iterates_at_its_offset() -> None:
    buf = bytearray(8 + 16 * 4)
    table = DESC.array(buf, 8, 4)
    assert len(table) == 4
    for i, desc in enumerate(_descs(4)):
        table[i] = desc
    assert list(table) == _descs(4)
    assert table[2] == _descs(4)[2]
    assert buf[:8] == bytes(8)
    assert bytes(buf[8 + 16 * 3 : 8 + 16 * 4]) == struct.pack("<QLHH", *_descs(4)[3])
    assert schema.descriptor_table(4).parse(bytes(buf[8:]))[1].addr == 0x2000


def test_record_array_honours_a_stride_larger_than_the_record() -> None:
    buf = bytearray(2 * 24)
    table = DESC.array(buf, 0, 2, stride=24)
    table[1] = Desc(1, 2, 3, 4)
    assert DESC.unpack_from(buf, 24) == Desc(1, 2, 3, 4)
    assert buf[:24] == bytes(24)


@pytest.mark.parametrize("index", [4, 5, -1, -4])
def test_record_array_index_outside_count_raises_record_index_error(index: int) -> None:
    buf = bytearray(16 * 5)  # room for a fifth record the array must not reach
    table = DESC.array(buf, 0, 4)
    with pytest.raises(RecordIndexError) as info:
        table[index]
    assert isinstance(info.value, IndexError)
    assert isinstance(info.value, VirtioError)
    assert isinstance(info.value, DeviceUsageError)
    with pytest.raises(RecordIndexError):
        table[index] = Desc(1, 1, 1, 1)
    assert buf == bytes(16 * 5)


def test_empty_record_array_has_no_elements() -> None:
    table = DESC.array(bytearray(), 0, 0)
    assert len(table) == 0
    assert list(table) == []
    with pytest.raises(RecordIndexError):
        table[0]


def test_layout_array_accepts_an_exactly_fitting_buffer() -> None:
    table = USED.array(bytearray(4 + 8 * 3), 4, 3)
    table[2] = Used(7, 8)
    assert table[2] == Used(7, 8)


@pytest.mark.parametrize(
    ("size", "offset", "count", "stride"),
    [
        pytest.param(16 * 4 - 1, 0, 4, None, id="one byte short"),
        pytest.param(16 * 4, 1, 4, None, id="short after offset"),
        pytest.param(32 * 2 - 1, 0, 2, 32, id="short with stride"),
        pytest.param(64, 0, 2, 8, id="stride below record size"),
        pytest.param(64, -16, 1, None, id="negative offset"),
        pytest.param(64, 0, -1, None, id="negative count"),
    ],
)
def test_layout_array_refuses_a_buffer_that_cannot_hold_it(
    size: int, offset: int, count: int, stride: int | None
) -> None:
    with pytest.raises(LayoutValueError) as info:
        DESC.array(bytearray(size), offset, count, stride)
    assert info.value.field == "array"


# --- every error is a VirtioError ----------------------------------------------------------------


def _unpack_short() -> object:
    return DESC.unpack_from(bytes(15))


def _unpack_past_end() -> object:
    return DESC.unpack_from(bytes(16), 8)


def _unpack_wrong_size() -> object:
    return DESC.unpack(bytes(17))


def _pack_into_short() -> object:
    DESC.pack_into(bytearray(15), 0, Desc(1, 2, 3, 4))
    return None


def _pack_into_read_only() -> object:
    DESC.pack_into(cast(Any, bytes(16)), 0, Desc(1, 2, 3, 4))
    return None


def _pack_wrong_arity() -> object:
    return DESC.pack(cast(Any, (1, 2, 3)))


def _pack_not_an_int() -> object:
    return DESC.pack(Desc(cast(Any, "0x1000"), 2, 3, 4))


def _int_field_get_short() -> object:
    return IntField.of(schema.avail_ring(4), "idx").get(bytes(3))


def _int_field_set_short() -> object:
    IntField.of(schema.avail_ring(4), "idx").set(bytearray(3), 1)
    return None


def _int_field_get_past_base() -> object:
    return IntField.of(schema.used_ring(4), "avail_event").get(bytes(38), base=8)


@pytest.mark.parametrize(
    "misuse",
    [
        _unpack_short,
        _unpack_past_end,
        _unpack_wrong_size,
        _pack_into_short,
        _pack_into_read_only,
        _pack_wrong_arity,
        _pack_not_an_int,
        _int_field_get_short,
        _int_field_set_short,
        _int_field_get_past_base,
    ],
    ids=lambda f: f.__name__.lstrip("_"),
)
def test_misuse_raises_a_virtio_error_not_a_bare_struct_error(misuse: Callable[[], object]) -> None:
    with pytest.raises(VirtioError):
        misuse()


def test_pack_of_a_non_int_names_the_field() -> None:
    with pytest.raises(LayoutValueError) as info:
        _pack_not_an_int()
    assert info.value.field == "addr"
