"""The code layer: exact ``struct`` accessors derived from fixed-size Construct schemas.

Theory of operation. A schema in :mod:`virtio_schema.schema` says where every byte is. Parsing through
Construct costs microseconds per record, so this module derives, once, at import time:

* a :class:`Layout` per flat record schema (a descriptor, a used element, a device header): a
  precompiled :class:`struct.Struct`, the field offsets and a typed record class (a ``NamedTuple``
  declared by the caller so type checkers see the field types);
* an :class:`IntField` per scalar field of any fixed-size schema (``avail.idx``, ``used.flags``), for
  single-field reads and writes;
* an :class:`ArrayField` per fixed array inside a schema (the ``ring`` of the avail and used rings),
  giving the offset and stride so elements are reached by arithmetic, not by parsing.

Rules of this module:

1. Nothing is guessed. Whatever cannot be mapped exactly onto ``struct`` (variable sizes, bit structs,
   adapters, non-zero padding, mixed byte order, float fields) is refused with a subclass of
   :class:`~virtio_schema.errors.LayoutError` naming the field.
2. Every mapping is proved at construction: field names and order against the record class, total size
   against ``schema.sizeof()``, and one build with Construct of a record of distinct values, unpacked with
   the derived ``struct``, must give the same values back.
3. Hot-path methods only call precompiled ``struct.Struct`` methods on the caller's buffer; Construct's
   ``parse``/``build`` never run after construction.

Imports: ``construct``, :mod:`virtio_schema.schema` types and :mod:`virtio_schema.errors` only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import construct

from virtio_schema.errors import DeviceUsageError, LayoutError, LayoutValueError

if TYPE_CHECKING:
    from virtio_schema._buffers import ReadBuffer, WriteBuffer

__all__ = [
    "ArrayField",
    "BitField",
    "IntField",
    "Layout",
    "MixedByteOrder",
    "NestedField",
    "NonZeroPadding",
    "RecordArray",
    "RecordIndexError",
    "RecordMismatch",
    "Span",
    "UnsupportedField",
    "VariableSizeField",
    "spans",
]

R = TypeVar("R", bound=tuple[Any, ...])

_INT_CODES = frozenset("bBhHiIlLqQ")


class VariableSizeField(LayoutError):
    """A field whose size is not a constant (greedy or prefixed data, a count from the context)."""


class BitField(LayoutError):
    """A bit-level structure (``BitStruct``, ``Bitwise``): ``struct`` has no bit fields."""


class NonZeroPadding(LayoutError):
    """Padding whose fill pattern is not zero (``struct`` pads with zero bytes)."""


class MixedByteOrder(LayoutError):
    """Multi-byte fields of both byte orders in one schema."""


class NestedField(LayoutError):
    """A nested structure or array where a flat record field was expected."""


class UnsupportedField(LayoutError):
    """Any other construct (adapters, enums, constants, floats, computed values ...)."""


class RecordMismatch(LayoutError):
    """The record class's fields, or the derived struct, disagree with the schema."""


class RecordIndexError(DeviceUsageError, IndexError):
    """An element index outside a :class:`RecordArray` (also an :class:`IndexError`, so iteration
    protocols work)."""


@dataclass(frozen=True, slots=True)
class Span:
    """Where one field of a fixed-size schema sits: name (``None`` for unnamed padding), byte offset,
    size, and the field's construct."""

    name: str | None
    offset: int
    size: int
    subcon: construct.Construct


def _schema_name(schema: construct.Construct) -> str:
    return schema.name or type(schema).__name__


def _sizeof(schema_name: str, name: str | None, sub: construct.Construct) -> int:
    try:
        return sub.sizeof()
    except construct.ConstructError as exc:
        raise VariableSizeField(
            schema_name, name, f"size is not constant ({type(exc).__name__})"
        ) from None


def spans(schema: construct.Struct, schema_name: str | None = None) -> tuple[Span, ...]:
    """The fields of a fixed-size ``Struct`` with their offsets, in order.

    Raises :class:`VariableSizeField` if any field has no constant size.
    """
    sname = schema_name or _schema_name(schema)
    if not isinstance(schema, construct.Struct):
        raise UnsupportedField(
            sname, None, f"expected a construct Struct, got {type(schema).__name__}"
        )
    out: list[Span] = []
    offset = 0
    for sub in schema.subcons:
        name = sub.name if isinstance(sub, construct.Renamed) else None
        inner = sub.subcon if isinstance(sub, construct.Renamed) else sub
        size = _sizeof(sname, name, inner)
        out.append(Span(name, offset, size, inner))
        offset += size
    return tuple(out)


def _int_format(sname: str, span: Span) -> tuple[str, str]:
    """(byte order, struct code) of an integer FormatField span; refuses anything else."""
    sub = span.subcon
    if isinstance(sub, construct.FormatField):
        order, code = sub.fmtstr[0], sub.fmtstr[1:]
        if code not in _INT_CODES:
            raise UnsupportedField(sname, span.name, f"format {sub.fmtstr!r} is not an integer")
        return order, code
    _refuse(sname, span)
    raise AssertionError("unreachable")  # pragma: no cover


def _refuse(sname: str, span: Span) -> None:
    """Raise the LayoutError that explains why ``span`` is not a flat integer or bytes field."""
    sub = span.subcon
    kind = type(sub).__name__
    if isinstance(sub, construct.Transformed | construct.Restreamed):
        raise BitField(sname, span.name, f"{kind} is a bit-level construct")
    if isinstance(sub, construct.Struct | construct.Array):
        raise NestedField(sname, span.name, f"{kind} must be flattened into scalar fields")
    raise UnsupportedField(sname, span.name, f"{kind} has no exact struct equivalent")


def _copy_in(buf: WriteBuffer, at: int, data: bytes) -> None:
    """Copy ``data`` into ``buf`` at byte ``at`` at once. Unlike ``struct.pack_into``, which zeroes
    its target before it writes, a driver or device polling those bytes never reads a zero that
    was not written. ``ValueError`` if the bytes do not fit, ``TypeError`` for a read-only or
    non-contiguous buffer."""
    with memoryview(buf) as whole, whole.cast("B") as view:
        end = at + len(data)
        if at < 0 or end > len(view):
            raise ValueError(f"bytes {at}..{end} outside a {len(view)}-byte buffer")
        view[at:end] = data


class IntField:
    """Typed access to one integer field of a fixed-size schema, at ``base + offset`` in a buffer.

    ``get`` and ``set`` are the accessors; ``struct`` and ``offset`` are public so the ring layer can
    bind them into its own precomputed calls.
    """

    __slots__ = (
        "_pack",
        "_unpack_from",
        "maximum",
        "minimum",
        "name",
        "offset",
        "owner",
        "struct",
    )

    def __init__(self, name: str, offset: int, fmt: str, owner: str = "record") -> None:
        self.name = name
        self.owner = owner
        self.offset = offset
        self.struct = struct.Struct(fmt)
        bits = 8 * self.struct.size
        signed = fmt[-1].islower()
        self.minimum = -(1 << (bits - 1)) if signed else 0
        self.maximum = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        self._unpack_from = self.struct.unpack_from
        self._pack = self.struct.pack

    @classmethod
    def of(cls, schema: construct.Struct, name: str) -> IntField:
        """The accessor of integer field ``name`` of ``schema`` (which may also hold arrays)."""
        sname = _schema_name(schema)
        for span in spans(schema):
            if span.name == name:
                order, code = _int_format(sname, span)
                return cls(name, span.offset, order + code, sname)
        raise UnsupportedField(sname, name, "no such field")

    @property
    def size(self) -> int:
        """Width of the field in bytes."""
        return self.struct.size

    def get(self, buf: ReadBuffer, base: int = 0) -> int:
        """Read the field of the record starting at ``base`` (>= 0)."""
        at = base + self.offset
        try:
            if at < 0:
                raise struct.error("negative offset")
            value: int = self._unpack_from(buf, at)[0]
        except struct.error as exc:
            raise LayoutValueError(self.owner, self.name, at, f"cannot read: {exc}") from None
        return value

    def set(self, buf: WriteBuffer, value: int, base: int = 0) -> None:
        """Write the field of the record starting at ``base``; out-of-range values are refused."""
        if not self.minimum <= value <= self.maximum:
            raise LayoutValueError(
                self.owner, self.name, value, f"outside {self.minimum}..{self.maximum}"
            )
        at = base + self.offset
        try:
            _copy_in(buf, at, self._pack(value))
        except (TypeError, ValueError) as exc:
            raise LayoutValueError(self.owner, self.name, at, f"cannot write: {exc}") from None

    def __repr__(self) -> str:
        return f"IntField({self.name!r}, offset={self.offset}, format={self.struct.format!r})"


@dataclass(frozen=True, slots=True)
class ArrayField:
    """A fixed-count array inside a schema: element ``i`` starts at ``offset + i * stride``."""

    name: str
    offset: int
    count: int
    stride: int
    element: construct.Construct

    @classmethod
    def of(cls, schema: construct.Struct, name: str) -> ArrayField:
        """The array field ``name`` of ``schema`` (e.g. ``ring`` of ``used_ring(n)``)."""
        sname = _schema_name(schema)
        for span in spans(schema):
            if span.name == name:
                sub = span.subcon
                if not isinstance(sub, construct.Array) or not isinstance(sub.count, int):
                    raise UnsupportedField(sname, name, "not a fixed-count Array")
                stride = _sizeof(sname, name, sub.subcon)
                return cls(name, span.offset, sub.count, stride, sub.subcon)
        raise UnsupportedField(sname, name, "no such field")

    def element_int(self) -> IntField:
        """An :class:`IntField` for an array of integers, at offset 0 of each element."""
        span = Span(self.name, 0, self.stride, self.element)
        order, code = _int_format(self.name, span)
        return IntField(self.name, 0, order + code, self.name)


class Layout(Generic[R]):
    """A flat, fixed-size Construct ``Struct`` mapped exactly onto :class:`struct.Struct`.

    ``record`` is a ``NamedTuple`` class whose fields are the schema's named fields, in order (unnamed
    padding excluded); integers map to ``int``, ``Bytes(n)`` to ``bytes``::

        class Desc(NamedTuple):
            addr: int
            len: int
            flags: int
            next: int

        DESC = Layout(schema.Descriptor, Desc, name="Descriptor")
        d = DESC.unpack_from(table, 16 * i)        # -> Desc, one struct call

    Construction raises a :class:`~virtio_schema.errors.LayoutError` subclass naming the field for
    anything that cannot be mapped exactly, and :class:`RecordMismatch` if ``record`` disagrees.
    """

    __slots__ = (
        "_fields",
        "_has_bytes",
        "_new",
        "_pack",
        "_unpack_from",
        "name",
        "offsets",
        "record",
        "schema",
        "size",
        "struct",
    )

    def __init__(
        self, schema: construct.Struct, record: type[R], *, name: str | None = None
    ) -> None:
        sname = name or _schema_name(schema)
        self.name = sname
        self.schema = schema
        self.record = record
        fmt_order: str | None = None
        order_field: str | None = None
        codes: list[str] = []
        names: list[str] = []
        offsets: dict[str, int] = {}
        fields: list[tuple[str, str, int, int, int]] = []  # (name, kind, size, min, max)
        for span in spans(schema, sname):
            sub = span.subcon
            if isinstance(sub, construct.Padded) and sub.subcon is construct.Pass:
                if any(sub.pattern):
                    raise NonZeroPadding(sname, span.name, f"pattern {sub.pattern!r} is not zero")
                codes.append(f"{span.size}x")
                continue
            if span.name is None:
                raise UnsupportedField(sname, None, f"unnamed {type(sub).__name__} field")
            if isinstance(sub, construct.Bytes) and isinstance(sub.length, int):
                codes.append(f"{sub.length}s")
                kind = "bytes"
            elif isinstance(sub, construct.FormatField):
                order, code = _int_format(sname, span)
                if span.size > 1:
                    order = ">" if order == "!" else order
                    if fmt_order is None:
                        fmt_order, order_field = order, span.name
                    elif order != fmt_order:
                        raise MixedByteOrder(
                            sname,
                            span.name,
                            f"byte order {order!r} differs from {order_field!r}'s {fmt_order!r}",
                        )
                codes.append(code)
                kind = "int"
            else:
                _refuse(sname, span)
            names.append(span.name)
            offsets[span.name] = span.offset
            if kind == "int":
                bits = 8 * span.size
                lo, hi = (
                    (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
                    if code.islower()
                    else (0, (1 << bits) - 1)
                )
            else:
                lo = hi = span.size
            fields.append((span.name, kind, span.size, lo, hi))
        if fmt_order not in (None, "<", ">"):
            raise UnsupportedField(sname, order_field, f"native byte order {fmt_order!r}")
        self.struct = struct.Struct((fmt_order or "<") + "".join(codes))
        self.size = self.struct.size
        self.offsets: dict[str, int] = offsets
        self._fields = tuple(fields)
        self._has_bytes = any(f[1] == "bytes" for f in fields)
        self._unpack_from = self.struct.unpack_from
        self._pack = self.struct.pack
        # tuple.__new__(record, values): the record type's own constructor, without its per-field
        # arguments; typed once here so that the hot path needs no cast() call
        self._new: Callable[[type[R], tuple[Any, ...]], R] = cast("Any", tuple.__new__)
        self._check_record(names)
        self._prove()

    # --- construction-time proofs -------------------------------------------------------------

    def _check_record(self, names: Sequence[str]) -> None:
        rfields = tuple(getattr(self.record, "_fields", ()))
        if not rfields:
            raise RecordMismatch(self.name, None, f"{self.record.__name__} is not a NamedTuple")
        for i in range(max(len(rfields), len(names))):
            want = names[i] if i < len(names) else None
            got = rfields[i] if i < len(rfields) else None
            if want != got:
                raise RecordMismatch(
                    self.name,
                    want or got,
                    f"{self.record.__name__} field #{i} is {got!r}, the schema has {want!r}",
                )

    def _prove(self) -> None:
        schema_size = self.schema.sizeof()
        if schema_size != self.size:
            raise RecordMismatch(
                self.name, None, f"struct size {self.size} != schema size {schema_size}"
            )
        values: list[object] = []
        for i, (_name, kind, size, _lo, _hi) in enumerate(self._fields):
            if kind == "int":
                # distinct, width-filling pattern: a wrong offset or order cannot survive it
                values.append(int.from_bytes(bytes((i * 16 + k + 1) & 0x7F for k in range(size))))
            else:
                values.append(bytes((i * 16 + k + 1) & 0xFF for k in range(size)))
        built = self.schema.build(dict(zip((f[0] for f in self._fields), values, strict=True)))
        if tuple(self._unpack_from(built)) != tuple(values):
            raise RecordMismatch(
                self.name, None, "struct unpack disagrees with the Construct build"
            )

    # --- access --------------------------------------------------------------------------------

    def unpack_from(self, buf: ReadBuffer, offset: int = 0) -> R:
        """Read one record at ``offset`` (>= 0) of ``buf`` (one ``struct`` call)."""
        try:
            if offset < 0:
                raise struct.error("negative offset")
            values = self._unpack_from(buf, offset)
        except struct.error as exc:
            raise LayoutValueError(self.name, "*", offset, f"cannot read: {exc}") from None
        return self._new(self.record, values)

    def unpack(self, data: ReadBuffer) -> R:
        """Read a record from exactly :attr:`size` bytes."""
        n = len(memoryview(data))
        if n != self.size:
            raise LayoutValueError(self.name, "*", n, f"need exactly {self.size} bytes")
        return self.unpack_from(data)

    def pack_into(self, buf: WriteBuffer, offset: int, record: R) -> None:
        """Write ``record`` at ``offset`` of ``buf``. Out-of-range values are refused, never
        truncated, and a refused record writes nothing
        (:class:`~virtio_schema.errors.LayoutValueError` names the field).

        The bytes are packed first and copied in at once: unlike ``struct.pack_into``, which
        zeroes its target before writing it, no reader ever sees a zero that was not written."""
        self._check(record)
        try:
            _copy_in(buf, offset, self._pack(*record))
        except (struct.error, TypeError, ValueError) as exc:
            raise LayoutValueError(self.name, "*", offset, f"cannot write: {exc}") from None

    def pack(self, record: R) -> bytes:
        """The :attr:`size` bytes of ``record``."""
        self._check(record)
        return self.struct.pack(*record)

    def _check(self, record: R) -> None:
        """Refuse a record whose values do not fit their fields exactly."""
        fields = self._fields
        if len(record) != len(fields):
            raise LayoutValueError(self.name, "*", record, f"expected {len(fields)} fields")
        for (name, kind, size, lo, hi), value in zip(fields, record, strict=True):
            if kind == "int":
                if type(value) is not int and not isinstance(value, int):
                    raise LayoutValueError(self.name, name, value, "not an int")
                if not lo <= value <= hi:
                    raise LayoutValueError(self.name, name, value, f"outside {lo}..{hi}")
            elif not isinstance(value, bytes | bytearray) or len(value) != size:
                raise LayoutValueError(self.name, name, value, f"need exactly {size} bytes")

    def field(self, name: str) -> IntField:
        """A single-field accessor for integer field ``name``."""
        return IntField.of(self.schema, name)

    def array(
        self, buf: WriteBuffer, offset: int, count: int, stride: int | None = None
    ) -> RecordArray[R]:
        """Stride access to ``count`` records starting at ``offset`` of ``buf``."""
        return RecordArray(self, buf, offset, count, self.size if stride is None else stride)

    def __repr__(self) -> str:
        return f"Layout({self.name}, {self.struct.format!r}, record={self.record.__name__})"


class RecordArray(Generic[R]):
    """``count`` records of one :class:`Layout` at a fixed stride in a buffer (e.g. a descriptor
    table or the used ring's elements). Indexing is bounds-checked against ``count``."""

    __slots__ = ("_buf", "count", "layout", "offset", "stride")

    def __init__(
        self, layout: Layout[R], buf: WriteBuffer, offset: int, count: int, stride: int
    ) -> None:
        if count < 0 or stride < layout.size or offset < 0:
            raise LayoutValueError(layout.name, "array", (offset, count, stride), "bad geometry")
        needed = offset + count * stride
        have = len(memoryview(buf))
        if have < needed:
            raise LayoutValueError(
                layout.name, "array", have, f"buffer of {have} bytes, {needed} needed"
            )
        self.layout = layout
        self._buf = buf
        self.offset = offset
        self.count = count
        self.stride = stride

    def _at(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise RecordIndexError(
                f"{self.layout.name} array: index {index} outside 0..{self.count - 1}"
            )
        return self.offset + index * self.stride

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> R:
        return self.layout.unpack_from(self._buf, self._at(index))

    def __setitem__(self, index: int, record: R) -> None:
        self.layout.pack_into(self._buf, self._at(index), record)

    def __iter__(self) -> Iterator[R]:
        for i in range(self.count):
            yield self[i]
