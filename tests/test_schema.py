"""Tests of :mod:`virtio_schema.schema`: the Construct declarations against the virtio spec.

Every offset below is written out from the specification (virtio 1.2: 2.7.5 descriptor, 2.7.6 avail
ring, 2.7.8 used ring, 2.8.13 packed descriptor, 2.8.10 event suppression, 5.1.6 virtio-net header,
5.2.4/5.2.6 virtio-blk config and request, 5.10.6 virtio-vsock header), never derived from the schemas under test. Each layout is checked twice: by
:func:`virtio_schema.layout.spans`, and by building a record of distinct bytes with Construct and
comparing it to a ``struct.pack`` with a hand-written format string.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

import construct
import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_schema.errors import InvalidQueueSize, VirtioError
from virtio_schema.layout import IntField, spans
from virtio_schema.schema import (
    AvailFlags,
    BlkStatus,
    BlkType,
    DescFlags,
    Descriptor,
    EventFlags,
    EventSuppression,
    Feature,
    PackedDescFlags,
    PackedDescriptor,
    UsedElem,
    UsedFlags,
    VirtioBlkConfig,
    VirtioBlkReqHdr,
    VirtioNetHdr,
    VirtioVsockHdr,
    avail_ring,
    check_packed_queue_size,
    check_split_queue_size,
    descriptor_table,
    packed_ring,
    used_ring,
)

# --- flat record layouts -----------------------------------------------------------------------


@dataclass(frozen=True)
class SpecLayout:
    """A record as the specification lays it out: ``(name, offset, size)`` per field (``None``
    for padding), its total size, and the ``struct`` format of the same bytes."""

    name: str
    schema: construct.Struct
    size: int
    fmt: str
    fields: tuple[tuple[str | None, int, int], ...]


SPEC_LAYOUTS = [
    SpecLayout(
        "Descriptor",
        Descriptor,
        16,
        "<QLHH",
        (("addr", 0, 8), ("len", 8, 4), ("flags", 12, 2), ("next", 14, 2)),
    ),
    SpecLayout("UsedElem", UsedElem, 8, "<LL", (("id", 0, 4), ("len", 4, 4))),
    SpecLayout(
        "PackedDescriptor",
        PackedDescriptor,
        16,
        "<QLHH",
        (("addr", 0, 8), ("len", 8, 4), ("id", 12, 2), ("flags", 14, 2)),
    ),
    SpecLayout(
        "EventSuppression", EventSuppression, 4, "<HH", (("off_wrap", 0, 2), ("flags", 2, 2))
    ),
    SpecLayout(
        "VirtioNetHdr",
        VirtioNetHdr,
        12,
        "<BBHHHHH",
        (
            ("flags", 0, 1),
            ("gso_type", 1, 1),
            ("hdr_len", 2, 2),
            ("gso_size", 4, 2),
            ("csum_start", 6, 2),
            ("csum_offset", 8, 2),
            ("num_buffers", 10, 2),
        ),
    ),
    SpecLayout(
        "VirtioBlkReqHdr",
        VirtioBlkReqHdr,
        16,
        "<LLQ",
        (("type", 0, 4), ("ioprio", 4, 4), ("sector", 8, 8)),
    ),
    SpecLayout(
        "VirtioBlkConfig",
        VirtioBlkConfig,
        60,
        "<QLLHBBLBBHLBBHLLLLLB3x",
        (
            ("capacity", 0, 8),
            ("size_max", 8, 4),
            ("seg_max", 12, 4),
            ("cylinders", 16, 2),
            ("heads", 18, 1),
            ("sectors", 19, 1),
            ("blk_size", 20, 4),
            ("physical_block_exp", 24, 1),
            ("alignment_offset", 25, 1),
            ("min_io_size", 26, 2),
            ("opt_io_size", 28, 4),
            ("writeback", 32, 1),
            ("unused0", 33, 1),
            ("num_queues", 34, 2),
            ("max_discard_sectors", 36, 4),
            ("max_discard_seg", 40, 4),
            ("discard_sector_alignment", 44, 4),
            ("max_write_zeroes_sectors", 48, 4),
            ("max_write_zeroes_seg", 52, 4),
            ("write_zeroes_may_unmap", 56, 1),
            (None, 57, 3),
        ),
    ),
    SpecLayout(
        "VirtioVsockHdr",
        VirtioVsockHdr,
        44,
        "<QQLLLHHLLL",
        (
            ("src_cid", 0, 8),
            ("dst_cid", 8, 8),
            ("src_port", 16, 4),
            ("dst_port", 20, 4),
            ("len", 24, 4),
            ("type", 28, 2),
            ("op", 30, 2),
            ("flags", 32, 4),
            ("buf_alloc", 36, 4),
            ("fwd_cnt", 40, 4),
        ),
    ),
]


def _distinct_values(spec: SpecLayout) -> dict[str, int]:
    """One value per named field such that every byte of the record differs (bytes 1, 2, 3 ...
    in field order), so any swapped, shifted or resized field changes the built bytes."""
    values: dict[str, int] = {}
    counter = 1
    for name, _offset, size in spec.fields:
        if name is not None:
            values[name] = int.from_bytes(bytes(range(counter, counter + size)), "little")
        counter += size
    return values


@pytest.mark.parametrize("spec", SPEC_LAYOUTS, ids=lambda s: s.name)
def test_spans_give_the_spec_offsets_and_sizes(spec: SpecLayout) -> None:
    got = tuple((s.name, s.offset, s.size) for s in spans(spec.schema))
    assert got == spec.fields
    assert spec.schema.sizeof() == spec.size
    assert struct.calcsize(spec.fmt) == spec.size


@pytest.mark.parametrize("spec", SPEC_LAYOUTS, ids=lambda s: s.name)
def test_built_record_equals_hand_packed_struct(spec: SpecLayout) -> None:
    values = _distinct_values(spec)
    built = spec.schema.build(values)
    assert built == struct.pack(spec.fmt, *values.values())
    # each field's little-endian bytes sit at its spec offset, padding is zero
    for name, offset, size in spec.fields:
        expected = bytes(size) if name is None else values[name].to_bytes(size, "little")
        assert built[offset : offset + size] == expected, name


@pytest.mark.parametrize("spec", SPEC_LAYOUTS, ids=lambda s: s.name)
def test_parsed_hand_packed_struct_gives_the_field_values(spec: SpecLayout) -> None:
    values = _distinct_values(spec)
    parsed = spec.schema.parse(struct.pack(spec.fmt, *values.values()))
    assert {name: parsed[name] for name in values} == values


# --- split ring areas ----------------------------------------------------------------------------

QUEUE_SIZES = [1, 2, 256, 32768]
BAD_SPLIT_SIZES = [0, 3, 32769, -1, 65536]


@pytest.mark.parametrize("n", QUEUE_SIZES)
def test_avail_ring_is_6_plus_2n_bytes(n: int) -> None:
    assert avail_ring(n).sizeof() == 6 + 2 * n


@pytest.mark.parametrize("n", QUEUE_SIZES)
def test_used_ring_is_6_plus_8n_bytes(n: int) -> None:
    assert used_ring(n).sizeof() == 6 + 8 * n


@pytest.mark.parametrize("n", QUEUE_SIZES)
def test_descriptor_table_is_16n_bytes(n: int) -> None:
    assert descriptor_table(n).sizeof() == 16 * n


@pytest.mark.parametrize("n", QUEUE_SIZES)
def test_avail_ring_header_and_used_event_offsets(n: int) -> None:
    ring = avail_ring(n)
    assert (IntField.of(ring, "flags").offset, IntField.of(ring, "flags").size) == (0, 2)
    assert (IntField.of(ring, "idx").offset, IntField.of(ring, "idx").size) == (2, 2)
    used_event = IntField.of(ring, "used_event")
    assert (used_event.offset, used_event.size) == (4 + 2 * n, 2)


@pytest.mark.parametrize("n", QUEUE_SIZES)
def test_used_ring_header_and_avail_event_offsets(n: int) -> None:
    ring = used_ring(n)
    assert (IntField.of(ring, "flags").offset, IntField.of(ring, "flags").size) == (0, 2)
    assert (IntField.of(ring, "idx").offset, IntField.of(ring, "idx").size) == (2, 2)
    avail_event = IntField.of(ring, "avail_event")
    assert (avail_event.offset, avail_event.size) == (4 + 8 * n, 2)


def test_built_avail_ring_of_4_equals_hand_packed_struct() -> None:
    ring = [0x0101, 0x0202, 0x0303, 0x0404]
    built = avail_ring(4).build({"flags": 1, "idx": 0xA1A2, "ring": ring, "used_event": 0xE1E2})
    assert built == struct.pack("<HH4HH", 1, 0xA1A2, *ring, 0xE1E2)


def test_built_used_ring_of_4_equals_hand_packed_struct() -> None:
    elems = [(0x11, 0x1000), (0x22, 0x2000), (0x33, 0x3000), (0x44, 0x4000)]
    built = used_ring(4).build(
        {
            "flags": 1,
            "idx": 0xB1B2,
            "ring": [{"id": i, "len": n} for i, n in elems],
            "avail_event": 0xE1E2,
        }
    )
    flat = [v for elem in elems for v in elem]
    assert built == struct.pack("<HH" + "LL" * 4 + "H", 1, 0xB1B2, *flat, 0xE1E2)


def test_built_descriptor_table_of_4_equals_hand_packed_struct() -> None:
    descs = [(0x1000 * (i + 1), 0x100 + i, i, (i + 1) % 4) for i in range(4)]
    built = descriptor_table(4).build(
        [{"addr": a, "len": n, "flags": f, "next": x} for a, n, f, x in descs]
    )
    assert built == struct.pack("<" + "QLHH" * 4, *(v for d in descs for v in d))


def test_built_packed_ring_of_3_equals_hand_packed_struct() -> None:
    descs = [(0x1000 * (i + 1), 0x100 + i, i, 0x8080) for i in range(3)]
    built = packed_ring(3).build(
        [{"addr": a, "len": n, "id": i, "flags": f} for a, n, i, f in descs]
    )
    assert built == struct.pack("<" + "QLHH" * 3, *(v for d in descs for v in d))
    assert packed_ring(3).sizeof() == 48


def test_ring_factories_are_cached_per_size() -> None:
    assert avail_ring(8) is avail_ring(8)
    assert used_ring(8) is used_ring(8)
    assert descriptor_table(8) is descriptor_table(8)
    assert packed_ring(8) is packed_ring(8)
    assert avail_ring(8) is not avail_ring(16)


@pytest.mark.parametrize("n", BAD_SPLIT_SIZES)
@pytest.mark.parametrize(
    "factory",
    [avail_ring, used_ring, descriptor_table, check_split_queue_size],
    ids=lambda f: f.__name__,
)
def test_split_factories_refuse_invalid_queue_sizes(
    factory: Callable[[int], object], n: int
) -> None:
    with pytest.raises(InvalidQueueSize) as info:
        factory(n)
    assert isinstance(info.value, VirtioError)
    assert info.value.size == n


def test_packed_ring_accepts_sizes_that_are_not_powers_of_two() -> None:
    check_packed_queue_size(3)
    assert packed_ring(3).sizeof() == 3 * 16
    assert packed_ring(32768).sizeof() == 32768 * 16


@pytest.mark.parametrize("n", [0, 32769, -1])
@pytest.mark.parametrize(
    "factory", [packed_ring, check_packed_queue_size], ids=lambda f: f.__name__
)
def test_packed_factories_refuse_sizes_outside_1_to_32768(
    factory: Callable[[int], object], n: int
) -> None:
    with pytest.raises(InvalidQueueSize) as info:
        factory(n)
    assert info.value.size == n


# --- flags and feature bits ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "value"),
    [
        (DescFlags.NEXT, 1),
        (DescFlags.WRITE, 2),
        (DescFlags.INDIRECT, 4),
        (AvailFlags.NO_INTERRUPT, 1),
        (UsedFlags.NO_NOTIFY, 1),
        (PackedDescFlags.NEXT, 1),
        (PackedDescFlags.WRITE, 2),
        (PackedDescFlags.INDIRECT, 4),
        (PackedDescFlags.AVAIL, 1 << 7),
        (PackedDescFlags.USED, 1 << 15),
        (EventFlags.ENABLE, 0),
        (EventFlags.DISABLE, 1),
        (EventFlags.DESC, 2),
        (BlkType.IN, 0),
        (BlkType.OUT, 1),
        (BlkType.FLUSH, 4),
        (BlkType.GET_ID, 8),
        (BlkType.DISCARD, 11),
        (BlkType.WRITE_ZEROES, 13),
        (BlkStatus.OK, 0),
        (BlkStatus.IOERR, 1),
        (BlkStatus.UNSUPP, 2),
    ],
    ids=lambda v: repr(v) if isinstance(v, enum.Enum) else str(v),
)
def test_wire_constant_has_spec_value(member: enum.IntEnum | enum.IntFlag, value: int) -> None:
    assert member.value == value
    assert member == value


@pytest.mark.parametrize(
    ("feature", "bit"),
    [
        (Feature.INDIRECT_DESC, 28),
        (Feature.EVENT_IDX, 29),
        (Feature.PROTOCOL_FEATURES, 30),
        (Feature.VERSION_1, 32),
        (Feature.ACCESS_PLATFORM, 33),
        (Feature.RING_PACKED, 34),
        (Feature.IN_ORDER, 35),
        (Feature.ORDER_PLATFORM, 36),
        (Feature.NOTIFICATION_DATA, 38),
        (Feature.RING_RESET, 40),
    ],
    ids=lambda v: repr(v) if isinstance(v, enum.Enum) else str(v),
)
def test_feature_mask_and_bit_number(feature: Feature, bit: int) -> None:
    assert feature == 1 << bit
    assert feature.bit == bit


def test_dpdk_negotiated_feature_word_decodes_to_the_observed_features() -> None:
    # observed: DPDK virtio-user with packed_vq=1,in_order=1 negotiates 0xd50000000
    expected = (
        Feature.INDIRECT_DESC
        | Feature.PROTOCOL_FEATURES
        | Feature.VERSION_1
        | Feature.RING_PACKED
        | Feature.IN_ORDER
    )
    assert expected == 0xD50000000


# --- flags stay plain integers -------------------------------------------------------------------


def test_descriptor_with_all_flag_bits_round_trips_unchanged() -> None:
    raw = struct.pack("<QLHH", 0x1000, 512, 0xFFFF, 7)
    parsed = Descriptor.parse(raw)
    assert parsed.flags == 0xFFFF
    assert type(parsed.flags) is int
    assert Descriptor.build(parsed) == raw


def test_packed_descriptor_and_event_suppression_keep_unknown_flag_bits() -> None:
    raw = struct.pack("<QLHH", 0x2000, 64, 3, 0xFFFF)
    assert PackedDescriptor.parse(raw).flags == 0xFFFF
    assert PackedDescriptor.build(PackedDescriptor.parse(raw)) == raw
    event = struct.pack("<HH", 0x8005, 0xFFFF)
    assert EventSuppression.parse(event).flags == 0xFFFF
    assert EventSuppression.build(EventSuppression.parse(event)) == event


@given(flags=st.integers(0, 0xFFFF), next_=st.integers(0, 0xFFFF))
def test_any_u16_descriptor_flags_survive_parse_then_build(flags: int, next_: int) -> None:
    raw = struct.pack("<QLHH", 0xDEAD_BEEF_0000, 4096, flags, next_)
    parsed = Descriptor.parse(raw)
    assert (parsed.flags, parsed.next) == (flags, next_)
    assert Descriptor.build(parsed) == raw


@given(flags=st.integers(0, 0xFFFF))
def test_any_u16_ring_flags_survive_parse_then_build(flags: int) -> None:
    avail = struct.pack("<HH2HH", flags, 5, 0, 1, 9)
    assert avail_ring(2).parse(avail).flags == flags
    assert avail_ring(2).build(avail_ring(2).parse(avail)) == avail
    used = struct.pack("<HHLLLLH", flags, 5, 0, 16, 1, 32, 9)
    assert used_ring(2).parse(used).flags == flags
    assert used_ring(2).build(used_ring(2).parse(used)) == used
