"""Exercise the construct API through the hand-written stubs in typings/construct.

They are the one copy of the stubs: the wheel installs them as the PEP 561 stub-only package
``construct-stubs`` (tests/test_wheel.py checks a user's code against the installed copy).

Run under ``mypy --strict`` this checks that the stubs describe the API the way
virtio_schema uses it (``assert_type`` pins the declared types); run under pytest it
checks that construct really behaves that way at runtime.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Callable
from typing import Any, assert_type

import pytest
from construct import (
    AdaptationError,
    Adapter,
    Aligned,
    Array,
    Bit,
    BitsInteger,
    BitStruct,
    Bitwise,
    Byte,
    Bytes,
    BytesInteger,
    Bytewise,
    CancelParsing,
    CheckError,
    ChecksumError,
    Compiled,
    Computed,
    Const,
    ConstError,
    Construct,
    ConstructError,
    Container,
    Double,
    Enum,
    EnumInteger,
    EnumIntegerString,
    ExplicitError,
    Flag,
    FlagsEnum,
    Float32l,
    FocusedSeq,
    FormatField,
    FormatFieldError,
    GreedyBytes,
    GreedyRange,
    Half,
    If,
    IfThenElse,
    IndexFieldError,
    Int,
    Int8sb,
    Int8ub,
    Int8ul,
    Int16sl,
    Int16ub,
    Int16ul,
    Int24sl,
    Int24ub,
    Int24ul,
    Int32sb,
    Int32ub,
    Int32ul,
    Int64sl,
    Int64ub,
    Int64ul,
    IntegerError,
    ListContainer,
    Long,
    MappingError,
    NamedTupleError,
    Nibble,
    Optional,
    Padded,
    Padding,
    PaddingError,
    Pass,
    PrefixedArray,
    RangeError,
    RawCopyError,
    Renamed,
    RepeatError,
    Restreamed,
    RotationError,
    Select,
    SelectError,
    Short,
    Single,
    SizeofError,
    StopFieldError,
    StreamError,
    Struct,
    Subconstruct,
    Switch,
    SwitchError,
    SymmetricAdapter,
    TerminatedError,
    TimestampError,
    Transformed,
    UnionError,
    ValidationError,
    Validator,
    this,
)

# A virtq descriptor (virtio 1.x, split ring): the kind of schema virtio_schema declares.
VIRTQ_DESC = Struct(
    "addr" / Int64ul,
    "len" / Int32ul,
    "flags" / Int16ul,
    "next" / Int16ul,
)
# addr=0x1000 (8 bytes LE), len=0x200 (4), flags=1 (2), next=7 (2)
DESC_BYTES = bytes.fromhex("0010000000000000 00020000 0100 0700")


def test_struct_round_trip_and_sizeof() -> None:
    parsed = VIRTQ_DESC.parse(DESC_BYTES)
    assert isinstance(parsed, Container)
    assert parsed.addr == 0x1000
    assert parsed["len"] == 0x200
    assert (parsed.flags, parsed.next) == (1, 7)
    built = VIRTQ_DESC.build(dict(addr=0x1000, len=0x200, flags=1, next=7))
    assert_type(built, bytes)
    assert built == DESC_BYTES
    assert VIRTQ_DESC.build(parsed) == DESC_BYTES
    assert_type(VIRTQ_DESC.sizeof(), int)
    assert VIRTQ_DESC.sizeof() == 16


def test_parse_accepts_bytearray_and_memoryview() -> None:
    assert VIRTQ_DESC.parse(bytearray(DESC_BYTES)).addr == 0x1000
    assert VIRTQ_DESC.parse(memoryview(DESC_BYTES)).next == 7


def test_struct_subcons_are_renamed_fields() -> None:
    assert_type(VIRTQ_DESC.subcons, list[Construct])
    assert [sc.name for sc in VIRTQ_DESC.subcons] == ["addr", "len", "flags", "next"]
    first = VIRTQ_DESC.subcons[0]
    assert isinstance(first, Renamed)
    assert first.subcon is Int64ul
    assert list(VIRTQ_DESC._subcons) == ["addr", "len", "flags", "next"]
    # Struct exposes named members as attributes.
    assert VIRTQ_DESC.flags is VIRTQ_DESC.subcons[2]


def test_rtruediv_renames_and_mul_adds_docs() -> None:
    field = "queue_size" / Int16ul
    assert_type(field, Renamed)
    assert field.name == "queue_size"
    assert field.subcon is Int16ul
    assert field.sizeof() == 2
    documented = field * "maximum queue size"
    assert_type(documented, Renamed)
    assert (documented.name, documented.docs) == ("queue_size", "maximum queue size")
    assert Int16ul.name is None
    with pytest.raises(TypeError):
        Int16ul / "wrong_way_round"  # type: ignore[operator]


@pytest.mark.parametrize(
    ("field", "fmtstr", "length"),
    [
        (Int8ub, ">B", 1),
        (Int16ub, ">H", 2),
        (Int32ub, ">L", 4),
        (Int64ub, ">Q", 8),
        (Int8ul, "<B", 1),
        (Int16ul, "<H", 2),
        (Int32ul, "<L", 4),
        (Int64ul, "<Q", 8),
        (Int8sb, ">b", 1),
        (Int32sb, ">l", 4),
        (Int16sl, "<h", 2),
        (Int64sl, "<q", 8),
        (Byte, ">B", 1),
        (Short, ">H", 2),
        (Int, ">L", 4),
        (Long, ">Q", 8),
        (Half, ">e", 2),
        (Single, ">f", 4),
        (Double, ">d", 8),
        (Float32l, "<f", 4),
    ],
)
def test_format_fields(field: FormatField, fmtstr: str, length: int) -> None:
    assert isinstance(field, FormatField)
    assert_type(field.fmtstr, str)
    assert_type(field.length, int)
    assert (field.fmtstr, field.length) == (fmtstr, length)
    assert field.sizeof() == length


def test_formatfield_constructor_and_errors() -> None:
    be32 = FormatField(">", "L")
    assert be32.build(0x01020304) == b"\x01\x02\x03\x04"
    with pytest.raises(FormatFieldError):
        FormatField("!", "L")
    with pytest.raises(FormatFieldError):
        Int8ub.build(256)
    with pytest.raises(StreamError) as excinfo:
        Int32ul.parse(b"\x01")
    assert excinfo.value.path == "(parsing)"


def test_float_round_trip() -> None:
    assert Float32l.parse(Float32l.build(1.5)) == 1.5


def test_int24_fields_are_bytesinteger() -> None:
    assert_type(Int24ul, BytesInteger)
    for field in (Int24ul, Int24ub, Int24sl):
        assert isinstance(field, BytesInteger)
        assert field.length == 3
        assert field.sizeof() == 3
    assert Int24ul.swapped is True
    assert Int24ub.swapped is False
    assert Int24sl.signed is True
    assert Int24ul.parse(b"\x01\x02\x03") == 0x030201
    assert Int24ub.build(0x010203) == b"\x01\x02\x03"
    assert BytesInteger(2, signed=True, swapped=True).parse(b"\xfe\xff") == -2
    with pytest.raises(IntegerError):
        Int24ub.build(1 << 24)


def test_array_count_is_int_or_context_expression() -> None:
    fixed = Array(3, Int16ul)
    assert_type(fixed.count, int | Callable[[Any], int])
    assert fixed.count == 3
    assert fixed.subcon is Int16ul
    assert fixed.discard is False
    assert fixed.parse(b"\x01\x00\x02\x00\x03\x00") == [1, 2, 3]
    assert fixed.sizeof() == 6
    with pytest.raises(RangeError):
        fixed.build([1, 2])

    indexed = Int8ub[2]
    assert_type(indexed, Array)
    assert indexed.count == 2

    counted = Struct("n" / Int8ub, "elems" / Array(this.n, Int16ul))
    parsed = counted.parse(b"\x02\x0a\x00\x0b\x00")
    assert isinstance(parsed.elems, ListContainer)
    assert parsed.elems == [10, 11]
    assert counted.build(dict(n=1, elems=[5])) == b"\x01\x05\x00"

    by_lambda = Struct("n" / Int8ub, "elems" / Array(lambda ctx: ctx.n * 2, Int8ub))
    assert by_lambda.parse(b"\x01\x07\x08").elems == [7, 8]
    with pytest.raises(SizeofError):
        by_lambda.sizeof()


def test_greedy_range_and_prefixed_array() -> None:
    greedy = GreedyRange(Int16ul)
    assert greedy.parse(b"\x01\x00\x02\x00\xff") == [1, 2]
    assert greedy.build([3, 4]) == b"\x03\x00\x04\x00"

    prefixed = PrefixedArray(Int8ub, Int16ul)
    assert_type(prefixed, FocusedSeq)
    assert isinstance(prefixed, FocusedSeq)
    assert prefixed.parse(b"\x02\x01\x00\x02\x00") == [1, 2]
    assert prefixed.build([9]) == b"\x01\x09\x00"


def test_bytes_and_greedybytes() -> None:
    four = Bytes(4)
    assert four.length == 4
    assert four.parse(b"virtio") == b"virt"
    assert four.sizeof() == 4
    assert GreedyBytes.parse(b"rest") == b"rest"
    with pytest.raises(SizeofError) as excinfo:
        GreedyBytes.sizeof()
    assert excinfo.value.path == "(sizeof)"


def test_padded_padding_and_aligned() -> None:
    padded = Padded(8, Int16ul, pattern=b"\xff")
    assert (padded.length, padded.pattern) == (8, b"\xff")
    assert padded.subcon is Int16ul
    assert padded.build(1) == b"\x01\x00" + b"\xff" * 6
    assert padded.sizeof() == 8

    padding = Padding(4)
    assert_type(padding, Padded)
    assert isinstance(padding, Padded)
    assert padding.subcon is Pass
    assert padding.build(None) == b"\x00" * 4
    with pytest.raises(PaddingError):
        Padded(4, Int8ub, pattern=b"ab")

    aligned = Aligned(4, Int8ub)
    assert aligned.modulus == 4
    assert aligned.sizeof() == 4
    assert aligned.build(7) == b"\x07\x00\x00\x00"


def test_pass_computed_and_const() -> None:
    assert Pass.parse(b"") is None
    assert Pass.sizeof() == 0
    assert Pass.flagbuildnone is True

    doubled = Struct("a" / Int8ub, "twice" / Computed(lambda ctx: ctx.a * 2))
    assert doubled.parse(b"\x15").twice == 42
    assert doubled.sizeof() == 1

    magic = Struct("magic" / Const(b"virt"), "version" / Const(2, Int8ub))
    assert magic.build({}) == b"virt\x02"
    assert magic.parse(b"virt\x02").version == 2
    with pytest.raises(ConstError) as excinfo:
        magic.parse(b"VIRT\x02")
    assert excinfo.value.path == "(parsing) -> magic"


class Feature(enum.IntEnum):
    NET = 1
    BLOCK = 2


def test_enum_and_flags_enum() -> None:
    device = Enum(Int8ub, Feature, console=3)
    label = device.parse(b"\x02")
    assert isinstance(label, EnumIntegerString)
    assert (label, int(label)) == ("BLOCK", 2)
    assert isinstance(device.parse(b"\x09"), EnumInteger)
    assert device.build("console") == b"\x03"
    assert_type(device.NET, EnumIntegerString)
    assert device.NET.intvalue == 1

    flags = FlagsEnum(Int8ub, indirect=1, event_idx=2)
    assert flags.flags == {"indirect": 1, "event_idx": 2}
    parsed = flags.parse(b"\x02")
    assert (parsed.indirect, parsed.event_idx) == (False, True)
    assert flags.build(flags.indirect | flags.event_idx) == b"\x03"

    assert Flag.parse(b"\x05") is True
    assert Flag.build(False) == b"\x00"


def test_bit_level_constructs() -> None:
    bits = BitStruct("a" / Flag, "b" / Nibble, "c" / BitsInteger(3))
    assert_type(bits, Transformed | Restreamed)
    assert isinstance(bits, Transformed)  # fixed size
    parsed = bits.parse(b"\xa5")
    assert (parsed.a, parsed.b, parsed.c) == (True, 4, 5)
    assert bits.sizeof() == 1
    assert bits.build(parsed) == b"\xa5"

    assert isinstance(Bit, BitsInteger)
    assert Bit.length == 1
    unsized = Bitwise(GreedyRange(Bit))
    assert isinstance(unsized, Restreamed)  # variable size
    assert unsized.parse(b"\x81") == [1, 0, 0, 0, 0, 0, 0, 1]

    mixed = BitStruct("hi" / Nibble, "lo" / Nibble, "word" / Bytewise(Int16ub))
    assert mixed.parse(b"\x12\x00\x03") == dict(hi=1, lo=2, word=3)


def test_conditionals() -> None:
    maybe = Optional(Int32ul)
    assert_type(maybe, Select)
    assert maybe.parse(b"") is None
    assert maybe.parse(b"\x01\x00\x00\x00") == 1

    gated = Struct("has" / Flag, "value" / If(this.has, Int8ub))
    assert isinstance(gated.subcons[1], Renamed)
    assert isinstance(gated.subcons[1].subcon, IfThenElse)
    assert gated.parse(b"\x01\x2a").value == 42
    assert gated.parse(b"\x00").value is None

    switched = Struct(
        "kind" / Int8ub,
        "body" / Switch(this.kind, {1: Int8ub, 2: Int16ul}),
    )
    assert switched.parse(b"\x02\x34\x12").body == 0x1234
    assert switched.parse(b"\x09").body is None  # default is Pass
    assert Switch(1, {1: Int8ub}).default is Pass


class Hex16(Adapter):
    """Parses an Int16ul into a hex string, the way project adapters are written."""

    def _decode(self, obj: Any, context: Container, path: str) -> str:
        return f"{obj:#06x}"

    def _encode(self, obj: Any, context: Container, path: str) -> int:
        return int(obj, 16)


class Even(Validator):
    def _validate(self, obj: Any, context: Container, path: str) -> bool:
        return isinstance(obj, int) and obj % 2 == 0


class Inverted(SymmetricAdapter):
    def _decode(self, obj: Any, context: Container, path: str) -> int:
        return int(obj) ^ 0xFF


def test_adapter_subclasses() -> None:
    hex16 = Hex16(Int16ul)
    assert isinstance(hex16, Subconstruct)
    assert hex16.parse(b"\x34\x12") == "0x1234"
    assert hex16.build("0x1234") == b"\x34\x12"

    even = Even(Int8ub)
    assert even.parse(b"\x04") == 4
    with pytest.raises(ValidationError):
        even.parse(b"\x05")

    inverted = Inverted(Int8ub)
    assert inverted.parse(b"\x0f") == 0xF0
    assert inverted.build(0xF0) == b"\x0f"


def test_streams_and_compile() -> None:
    stream = io.BytesIO(DESC_BYTES + b"trailing")
    assert VIRTQ_DESC.parse_stream(stream).len == 0x200
    assert stream.read() == b"trailing"

    out = io.BytesIO()
    VIRTQ_DESC.build_stream(dict(addr=1, len=2, flags=3, next=4), out)
    assert VIRTQ_DESC.parse(out.getvalue()).flags == 3

    compiled = VIRTQ_DESC.compile()
    assert_type(compiled, Compiled)
    assert compiled.parse(DESC_BYTES) == VIRTQ_DESC.parse(DESC_BYTES)
    assert compiled.build(dict(addr=0x1000, len=0x200, flags=1, next=7)) == DESC_BYTES


def test_operators_build_structs_and_arrays() -> None:
    combined = ("a" / Int8ub) + ("b" / Int16ul)
    assert isinstance(combined, Struct)
    assert combined.parse(b"\x01\x02\x00") == dict(a=1, b=2)
    assert (Int8ub >> Int8ub).parse(b"\x01\x02") == [1, 2]


def test_container_attribute_access() -> None:
    c = Container(queue=3, ready=True)
    c.extra = "x"
    assert c["extra"] == "x"
    assert c.queue == 3
    del c.ready
    assert "ready" not in c
    with pytest.raises(AttributeError):
        _ = c.missing
    c.update([("queue", 4)])
    assert c.queue == 4
    assert isinstance(c.copy(), Container)
    assert ListContainer([1, 2]) == [1, 2]


@pytest.mark.parametrize(
    "exc",
    [
        SizeofError,
        AdaptationError,
        ValidationError,
        StreamError,
        FormatFieldError,
        IntegerError,
        MappingError,
        RangeError,
        RepeatError,
        ConstError,
        IndexFieldError,
        CheckError,
        ExplicitError,
        NamedTupleError,
        TimestampError,
        UnionError,
        SelectError,
        SwitchError,
        StopFieldError,
        PaddingError,
        TerminatedError,
        RawCopyError,
        RotationError,
        ChecksumError,
        CancelParsing,
    ],
)
def test_exceptions_carry_path(exc: type[ConstructError]) -> None:
    assert issubclass(exc, ConstructError)
    err = exc("boom", path="(parsing) -> field")
    assert err.path == "(parsing) -> field"
    assert str(err) == "Error in path (parsing) -> field\nboom"
    assert exc("plain").path is None
