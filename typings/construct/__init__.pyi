"""Partial, hand-written type stubs for construct 2.10.70.

Only the part of construct that virtio_schema and device code use is stubbed; everything else in
``construct.__all__`` is listed in ``typings/stubtest_allowlist.txt``. virtio_schema's wheel
installs this file as the PEP 561 stub-only package ``construct-stubs``, so users' own schemas
type-check too. It is not marked partial: a name missing here is an error, not ``Any``.

Conventions:

* Parsed values and contexts are genuinely dynamic, so ``parse`` returns ``Any`` and
  contexts are ``Any`` (or ``Container``, their runtime type, in the subclassing hooks).
* Parameters documented as "integer or context lambda" accept an ``int`` or any
  callable taking the context; ``this`` expressions (``this.count``) are such callables.
* Several names that look like classes are really functions or singleton instances at
  runtime; they are declared here with the runtime kind (see each comment).
"""

import enum
from collections.abc import Callable, Iterable
from collections.abc import Mapping as _Mapping
from typing import IO, Any, ClassVar, Self, TypeAlias, overload

from _typeshed import FileDescriptorOrPath
from typing_extensions import disjoint_base

__all__ = [
    "AdaptationError",
    "Adapter",
    "Aligned",
    "Array",
    "Bit",
    "BitStruct",
    "BitsInteger",
    "BitwisableString",
    "Bitwise",
    "Byte",
    "Bytes",
    "BytesInteger",
    "Bytewise",
    "CancelParsing",
    "CheckError",
    "ChecksumError",
    "CipherError",
    "Compiled",
    "Computed",
    "Const",
    "ConstError",
    "Construct",
    "ConstructError",
    "Container",
    "Double",
    "Enum",
    "EnumInteger",
    "EnumIntegerString",
    "ExplicitError",
    "Flag",
    "FlagsEnum",
    "Float16b",
    "Float16l",
    "Float16n",
    "Float32b",
    "Float32l",
    "Float32n",
    "Float64b",
    "Float64l",
    "Float64n",
    "FocusedSeq",
    "FormatField",
    "FormatFieldError",
    "GreedyBytes",
    "GreedyRange",
    "Half",
    "If",
    "IfThenElse",
    "IndexFieldError",
    "Int",
    "Int8sb",
    "Int8sl",
    "Int8sn",
    "Int8ub",
    "Int8ul",
    "Int8un",
    "Int16sb",
    "Int16sl",
    "Int16sn",
    "Int16ub",
    "Int16ul",
    "Int16un",
    "Int24sb",
    "Int24sl",
    "Int24sn",
    "Int24ub",
    "Int24ul",
    "Int24un",
    "Int32sb",
    "Int32sl",
    "Int32sn",
    "Int32ub",
    "Int32ul",
    "Int32un",
    "Int64sb",
    "Int64sl",
    "Int64sn",
    "Int64ub",
    "Int64ul",
    "Int64un",
    "IntegerError",
    "ListContainer",
    "Long",
    "MappingError",
    "NamedTupleError",
    "Nibble",
    "Octet",
    "Optional",
    "Padded",
    "Padding",
    "PaddingError",
    "Pass",
    "Path",
    "PrefixedArray",
    "RangeError",
    "RawCopyError",
    "Renamed",
    "RepeatError",
    "Restreamed",
    "RotationError",
    "Select",
    "SelectError",
    "Sequence",
    "Short",
    "Single",
    "SizeofError",
    "StopFieldError",
    "StreamError",
    "StringError",
    "Struct",
    "Subconstruct",
    "Switch",
    "SwitchError",
    "SymmetricAdapter",
    "TerminatedError",
    "TimestampError",
    "Transformed",
    "Tunnel",
    "UnionError",
    "ValidationError",
    "Validator",
    "this",
]

# An integer, or a context lambda / ``this`` expression evaluated against the context.
_IntOrContextFn: TypeAlias = int | Callable[[Any], int]
# A function called with (parsed value, context) after a field is parsed.
_ParsedHook: TypeAlias = Callable[[Any, Any], object]
# Streams are io.BytesIO, user files, or construct's RestreamedBytesIO (no common base).
_Stream: TypeAlias = Any

# ---------------------------------------------------------------------------
# exceptions
# ---------------------------------------------------------------------------

class ConstructError(Exception):
    path: str | None
    def __init__(self, message: str = "", path: str | None = None) -> None: ...

class SizeofError(ConstructError): ...
class AdaptationError(ConstructError): ...
class ValidationError(ConstructError): ...
class StreamError(ConstructError): ...
class FormatFieldError(ConstructError): ...
class IntegerError(ConstructError): ...
class StringError(ConstructError): ...
class MappingError(ConstructError): ...
class RangeError(ConstructError): ...
class RepeatError(ConstructError): ...
class ConstError(ConstructError): ...
class IndexFieldError(ConstructError): ...
class CheckError(ConstructError): ...
class ExplicitError(ConstructError): ...
class NamedTupleError(ConstructError): ...
class TimestampError(ConstructError): ...
class UnionError(ConstructError): ...
class SelectError(ConstructError): ...
class SwitchError(ConstructError): ...
class StopFieldError(ConstructError): ...
class PaddingError(ConstructError): ...
class TerminatedError(ConstructError): ...
class RawCopyError(ConstructError): ...
class RotationError(ConstructError): ...
class ChecksumError(ConstructError): ...
class CancelParsing(ConstructError): ...
class CipherError(ConstructError): ...

# ---------------------------------------------------------------------------
# containers (construct.lib.containers)
# ---------------------------------------------------------------------------

class Container(dict[str, Any]):
    """A dict whose entries are also readable and writable as attributes."""

    def __getattr__(self, name: str) -> Any: ...
    def __setattr__(self, name: str, value: Any) -> None: ...
    def __delattr__(self, name: str) -> None: ...
    # Runtime update() takes exactly one dict or iterable of pairs, and no keywords.
    def update(  # type: ignore[override]
        self, seqordict: _Mapping[str, Any] | Iterable[tuple[str, Any]]
    ) -> None: ...
    def __update__(self, seqordict: _Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None: ...
    def copy(self) -> Container: ...
    def __copy__(self) -> Container: ...
    def search(self, pattern: str) -> Any: ...
    def search_all(self, pattern: str) -> list[Any]: ...
    def __getstate__(self) -> dict[str, Any]: ...
    def __setstate__(self, state: _Mapping[str, Any]) -> None: ...

class ListContainer(list[Any]):
    """A list with pretty-printing and regex search."""

    def search(self, pattern: str) -> Any: ...
    def search_all(self, pattern: str) -> list[Any]: ...

# ---------------------------------------------------------------------------
# expressions (construct.expr)
# ---------------------------------------------------------------------------

class ExprMixin:
    """Operators on ``this`` expressions build new (callable) expressions."""

    def __add__(self, other: object) -> BinExpr: ...
    def __sub__(self, other: object) -> BinExpr: ...
    def __mul__(self, other: object) -> BinExpr: ...
    def __floordiv__(self, other: object) -> BinExpr: ...
    def __truediv__(self, other: object) -> BinExpr: ...
    def __mod__(self, other: object) -> BinExpr: ...
    def __pow__(self, other: object) -> BinExpr: ...
    def __xor__(self, other: object) -> BinExpr: ...
    def __rshift__(self, other: object) -> BinExpr: ...
    def __lshift__(self, other: object) -> BinExpr: ...
    def __and__(self, other: object) -> BinExpr: ...
    def __or__(self, other: object) -> BinExpr: ...
    def __radd__(self, other: object) -> BinExpr: ...
    def __rsub__(self, other: object) -> BinExpr: ...
    def __rmul__(self, other: object) -> BinExpr: ...
    def __rfloordiv__(self, other: object) -> BinExpr: ...
    def __rtruediv__(self, other: object) -> BinExpr: ...
    def __rmod__(self, other: object) -> BinExpr: ...
    def __rpow__(self, other: object) -> BinExpr: ...
    def __rxor__(self, other: object) -> BinExpr: ...
    def __rrshift__(self, other: object) -> BinExpr: ...
    def __rlshift__(self, other: object) -> BinExpr: ...
    def __rand__(self, other: object) -> BinExpr: ...
    def __ror__(self, other: object) -> BinExpr: ...
    def __neg__(self) -> UniExpr: ...
    def __pos__(self) -> UniExpr: ...
    def __invert__(self) -> UniExpr: ...
    def __contains__(self, other: object) -> BinExpr: ...
    def __gt__(self, other: object) -> BinExpr: ...
    def __ge__(self, other: object) -> BinExpr: ...
    def __lt__(self, other: object) -> BinExpr: ...
    def __le__(self, other: object) -> BinExpr: ...
    # == and != build expressions instead of comparing, so instances are unhashable.
    def __eq__(self, other: object) -> BinExpr: ...  # type: ignore[override]
    def __ne__(self, other: object) -> BinExpr: ...  # type: ignore[override]
    __hash__: ClassVar[None]  # type: ignore[assignment]
    def __getstate__(self) -> dict[str, Any]: ...
    def __setstate__(self, attrs: dict[str, Any]) -> None: ...

class UniExpr(ExprMixin):
    op: Callable[[Any], Any]
    operand: Any
    def __init__(self, op: Callable[[Any], Any], operand: Any) -> None: ...
    def __call__(self, obj: Any, *args: Any) -> Any: ...

class BinExpr(ExprMixin):
    op: Callable[[Any, Any], Any]
    lhs: Any
    rhs: Any
    def __init__(self, op: Callable[[Any, Any], Any], lhs: Any, rhs: Any) -> None: ...
    def __call__(self, obj: Any, *args: Any) -> Any: ...

class Path(ExprMixin):
    """``this.a.b`` / ``this["a"]``: evaluates to that entry of the context when called."""

    def __init__(self, name: str, field: Any = None, parent: Path | None = None) -> None: ...
    def __call__(self, obj: Any, *args: Any) -> Any: ...
    def __getfield__(self) -> Any: ...
    def __getattr__(self, name: str) -> Path: ...
    def __getitem__(self, name: Any) -> Path: ...

this: Path

# ---------------------------------------------------------------------------
# abstract constructs
# ---------------------------------------------------------------------------

class Construct:
    name: str | None
    docs: str
    flagbuildnone: bool
    parsed: _ParsedHook | None
    def __init__(self) -> None: ...
    def parse(self, data: bytes | bytearray | memoryview, **contextkw: Any) -> Any: ...
    # Returns None if parsing raised CancelParsing.
    def parse_stream(self, stream: IO[bytes], **contextkw: Any) -> Any: ...
    def parse_file(self, filename: FileDescriptorOrPath, **contextkw: Any) -> Any: ...
    def build(self, obj: Any, **contextkw: Any) -> bytes: ...
    def build_stream(self, obj: Any, stream: IO[bytes], **contextkw: Any) -> None: ...
    def build_file(self, obj: Any, filename: FileDescriptorOrPath, **contextkw: Any) -> None: ...
    def sizeof(self, **contextkw: Any) -> int: ...
    def compile(self, filename: str | None = None) -> Compiled: ...
    def benchmark(self, sampledata: bytes, filename: str | None = None) -> str: ...
    def export_ksy(
        self, schemaname: str = "unnamed_schema", filename: str | None = None
    ) -> str: ...
    # Hooks for subclass authors (parse_stream/build_stream/sizeof call these).
    def _parse(self, stream: _Stream, context: Container, path: str) -> Any: ...
    def _build(self, obj: Any, stream: _Stream, context: Container, path: str) -> Any: ...
    def _sizeof(self, context: Container, path: str) -> int: ...
    # "name" / field; there is no __truediv__ (field / "name" is a TypeError).
    def __rtruediv__(self, name: str) -> Renamed: ...
    # field * "docstring" or field * parsed_hook.
    def __mul__(self, other: str | _ParsedHook) -> Renamed: ...
    def __rmul__(self, other: str | _ParsedHook) -> Renamed: ...
    def __add__(self, other: Construct) -> Struct: ...
    def __rshift__(self, other: Construct) -> Sequence: ...
    # field[count] builds an Array; a slice raises ConstructError.
    def __getitem__(self, count: _IntOrContextFn) -> Array: ...
    def __getstate__(self) -> dict[str, Any]: ...
    def __setstate__(self, attrs: dict[str, Any]) -> None: ...
    def __copy__(self) -> Self: ...

class Subconstruct(Construct):
    subcon: Construct
    def __init__(self, subcon: Construct) -> None: ...

class Adapter(Subconstruct):
    def _decode(self, obj: Any, context: Container, path: str) -> Any: ...
    def _encode(self, obj: Any, context: Container, path: str) -> Any: ...

class SymmetricAdapter(Adapter): ...

class Validator(SymmetricAdapter):
    # Truthy means valid.
    def _validate(self, obj: Any, context: Container, path: str) -> object: ...

class Tunnel(Subconstruct):
    def _decode(self, data: bytes, context: Container, path: str) -> bytes: ...
    def _encode(self, data: bytes, context: Container, path: str) -> bytes: ...

class Compiled(Construct):
    """What Construct.compile() returns."""

    source: str | None
    defersubcon: Construct | None
    parsefunc: Callable[[Any, Any], Any]
    buildfunc: Callable[[Any, Any, Any], Any]
    def __init__(
        self, parsefunc: Callable[[Any, Any], Any], buildfunc: Callable[[Any, Any, Any], Any]
    ) -> None: ...

# ---------------------------------------------------------------------------
# bytes, bits, integers, floats
# ---------------------------------------------------------------------------

class Bytes(Construct):
    length: _IntOrContextFn
    def __init__(self, length: _IntOrContextFn) -> None: ...

# Singleton instance of an unnamed Construct subclass.
GreedyBytes: Construct

class FormatField(Construct):
    fmtstr: str
    length: int
    # endianity: one of "<", ">", "="; format: one of "fdBHLQbhlqe?".
    def __init__(self, endianity: str, format: str) -> None: ...

class BytesInteger(Construct):
    length: _IntOrContextFn
    signed: bool
    swapped: bool | Callable[[Any], bool]
    def __init__(
        self,
        length: _IntOrContextFn,
        signed: bool = False,
        swapped: bool | Callable[[Any], bool] = False,
    ) -> None: ...

class BitsInteger(Construct):
    length: _IntOrContextFn
    signed: bool
    swapped: bool | Callable[[Any], bool]
    def __init__(
        self,
        length: _IntOrContextFn,
        signed: bool = False,
        swapped: bool | Callable[[Any], bool] = False,
    ) -> None: ...

# Bitwise/Bytewise/BitStruct are functions; they return Transformed when the subcon has
# a fixed size and Restreamed otherwise.
def Bitwise(subcon: Construct) -> Transformed | Restreamed: ...
def Bytewise(subcon: Construct) -> Transformed | Restreamed: ...

Bit: BitsInteger
Nibble: BitsInteger
Octet: BitsInteger

Int8ub: FormatField
Int16ub: FormatField
Int32ub: FormatField
Int64ub: FormatField
Int8sb: FormatField
Int16sb: FormatField
Int32sb: FormatField
Int64sb: FormatField
Int8ul: FormatField
Int16ul: FormatField
Int32ul: FormatField
Int64ul: FormatField
Int8sl: FormatField
Int16sl: FormatField
Int32sl: FormatField
Int64sl: FormatField
Int8un: FormatField
Int16un: FormatField
Int32un: FormatField
Int64un: FormatField
Int8sn: FormatField
Int16sn: FormatField
Int32sn: FormatField
Int64sn: FormatField
Byte: FormatField
Short: FormatField
Int: FormatField
Long: FormatField

Float16b: FormatField
Float16l: FormatField
Float16n: FormatField
Float32b: FormatField
Float32l: FormatField
Float32n: FormatField
Float64b: FormatField
Float64l: FormatField
Float64n: FormatField
Half: FormatField
Single: FormatField
Double: FormatField

# 24-bit integers are not struct formats, so these are BytesInteger(3, ...).
Int24ub: BytesInteger
Int24ul: BytesInteger
Int24un: BytesInteger
Int24sb: BytesInteger
Int24sl: BytesInteger
Int24sn: BytesInteger

# ---------------------------------------------------------------------------
# mappings
# ---------------------------------------------------------------------------

# Singleton instance of an unnamed Construct subclass; parses one byte into a bool.
Flag: Construct

# An int subclass with an instance __dict__ has its own memory layout (PEP 800).
@disjoint_base
class EnumInteger(int):
    """What Enum parses an unmapped value into."""

class EnumIntegerString(str):
    """What Enum parses a mapped value into: the label, convertible back with int()."""

    intvalue: int
    def __int__(self) -> int: ...
    @staticmethod
    def new(intvalue: int, stringvalue: str) -> EnumIntegerString: ...

class Enum(Adapter):
    encmapping: dict[EnumIntegerString, int]
    decmapping: dict[int, EnumIntegerString]
    ksymapping: dict[int, str]
    # *merge: enum.IntEnum / enum.IntFlag classes whose members are added to the mapping.
    def __init__(self, subcon: Construct, *merge: type[enum.Enum], **mapping: int) -> None: ...
    # Enum(...).label gives the label as an EnumIntegerString (AttributeError if unknown).
    def __getattr__(self, name: str) -> EnumIntegerString: ...

class BitwisableString(str):
    """What FlagsEnum attribute access gives: labels combinable with |."""

    def __or__(self, other: object) -> BitwisableString: ...

class FlagsEnum(Adapter):
    flags: dict[str, int]
    reverseflags: dict[int, str]
    def __init__(self, subcon: Construct, *merge: type[enum.Enum], **flags: int) -> None: ...
    def __getattr__(self, name: str) -> BitwisableString: ...

# ---------------------------------------------------------------------------
# structures, sequences, repeaters
# ---------------------------------------------------------------------------

class Struct(Construct):
    subcons: list[Construct]
    _subcons: Container
    def __init__(self, *subcons: Construct, **subconskw: Construct) -> None: ...
    # Named members are readable as attributes (AttributeError otherwise).
    def __getattr__(self, name: str) -> Construct: ...

class Sequence(Construct):
    subcons: list[Construct]
    _subcons: Container
    def __init__(self, *subcons: Construct, **subconskw: Construct) -> None: ...
    def __getattr__(self, name: str) -> Construct: ...

class Array(Subconstruct):
    count: _IntOrContextFn
    discard: bool
    def __init__(
        self, count: _IntOrContextFn, subcon: Construct, discard: bool = False
    ) -> None: ...

class GreedyRange(Subconstruct):
    discard: bool
    def __init__(self, subcon: Construct, discard: bool = False) -> None: ...

class Renamed(Subconstruct):
    def __init__(
        self,
        subcon: Construct,
        newname: str | None = None,
        newdocs: str | None = None,
        newparsed: _ParsedHook | None = None,
    ) -> None: ...
    # Unknown attributes are forwarded to the wrapped subcon.
    def __getattr__(self, name: str) -> Any: ...

class FocusedSeq(Construct):
    parsebuildfrom: str | Callable[[Any], str]
    subcons: list[Construct]
    _subcons: Container
    def __init__(
        self,
        parsebuildfrom: str | Callable[[Any], str],
        *subcons: Construct,
        **subconskw: Construct,
    ) -> None: ...
    def __getattr__(self, name: str) -> Construct: ...

# A function: FocusedSeq("items", "count" / Rebuild(countfield, ...), "items" / subcon[...]).
def PrefixedArray(countfield: Construct, subcon: Construct) -> FocusedSeq: ...

# ---------------------------------------------------------------------------
# miscellaneous
# ---------------------------------------------------------------------------

class Const(Subconstruct):
    value: Any
    # Without a subcon the value must be bytes and the subcon is Bytes(len(value)).
    @overload
    def __init__(self, value: bytes, subcon: None = None) -> None: ...
    @overload
    def __init__(self, value: Any, subcon: Construct) -> None: ...

class Computed(Construct):
    # A context lambda, or a constant value.
    func: Any
    def __init__(self, func: Any) -> None: ...

# Singleton instance of an unnamed Construct subclass; parses to None, size 0.
Pass: Construct

# ---------------------------------------------------------------------------
# conditionals
# ---------------------------------------------------------------------------

class Select(Construct):
    subcons: list[Construct]
    def __init__(self, *subcons: Construct, **subconskw: Construct) -> None: ...

# A function returning Select(subcon, Pass).
def Optional(subcon: Construct) -> Select: ...

class IfThenElse(Construct):
    condfunc: bool | Callable[[Any], object]
    thensubcon: Construct
    elsesubcon: Construct
    def __init__(
        self,
        condfunc: bool | Callable[[Any], object],
        thensubcon: Construct,
        elsesubcon: Construct,
    ) -> None: ...

# A function returning IfThenElse(condfunc, subcon, Pass).
def If(condfunc: bool | Callable[[Any], object], subcon: Construct) -> IfThenElse: ...

class Switch(Construct):
    # A context lambda, or a constant key.
    keyfunc: Any
    cases: _Mapping[Any, Construct]
    default: Construct
    def __init__(
        self, keyfunc: Any, cases: _Mapping[Any, Construct], default: Construct | None = None
    ) -> None: ...

# ---------------------------------------------------------------------------
# alignment and padding
# ---------------------------------------------------------------------------

class Padded(Subconstruct):
    length: _IntOrContextFn
    pattern: bytes
    def __init__(
        self, length: _IntOrContextFn, subcon: Construct, pattern: bytes = b"\x00"
    ) -> None: ...

# A function returning Padded(length, Pass, pattern=pattern).
def Padding(length: _IntOrContextFn, pattern: bytes = b"\x00") -> Padded: ...

class Aligned(Subconstruct):
    modulus: _IntOrContextFn
    pattern: bytes
    def __init__(
        self, modulus: _IntOrContextFn, subcon: Construct, pattern: bytes = b"\x00"
    ) -> None: ...

# A function returning Bitwise(Struct(*subcons, **subconskw)).
def BitStruct(*subcons: Construct, **subconskw: Construct) -> Transformed | Restreamed: ...

# ---------------------------------------------------------------------------
# stream transformations
# ---------------------------------------------------------------------------

class Transformed(Subconstruct):
    decodefunc: Callable[[bytes], bytes]
    decodeamount: int | None
    encodefunc: Callable[[bytes], bytes]
    encodeamount: int | None
    def __init__(
        self,
        subcon: Construct,
        decodefunc: Callable[[bytes], bytes],
        decodeamount: int | None,
        encodefunc: Callable[[bytes], bytes],
        encodeamount: int | None,
    ) -> None: ...

class Restreamed(Subconstruct):
    decoder: Callable[[bytes], bytes]
    decoderunit: int
    encoder: Callable[[bytes], bytes]
    encoderunit: int
    sizecomputer: Callable[[int], int] | None
    def __init__(
        self,
        subcon: Construct,
        decoder: Callable[[bytes], bytes],
        decoderunit: int,
        encoder: Callable[[bytes], bytes],
        encoderunit: int,
        sizecomputer: Callable[[int], int] | None,
    ) -> None: ...
