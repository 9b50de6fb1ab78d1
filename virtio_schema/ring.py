"""Typed views of the virtqueue rings over device memory: split (virtio 1.2, 2.7) and packed (2.8).

Theory of operation. A split queue is three driver-allocated areas: the descriptor table, the available
ring (driver area) and the used ring (device area). A transport translates their driver addresses into
:class:`~virtio_schema.mem.DeviceRange`\\ s; this module wraps each in a view whose accessors are the
``struct`` objects :mod:`virtio_schema.layout` derived from :mod:`virtio_schema.schema`.

Rules of this module:

1. No policy. A view reads and writes what it is told; validation of *values* (indices, chains,
   features) belongs to :mod:`virtio_schema.queue`. Construction validates only geometry: queue size,
   range length and alignment of the driver address, with a clear error.
2. Every value read here comes from memory the driver may change at any moment: callers read a field
   once and keep the value, never read it twice expecting the same answer.
3. Offsets come from the schemas (``IntField.of`` / ``ArrayField.of``), never from literals.

Imports: :mod:`virtio_schema.schema`, :mod:`virtio_schema.layout`, :mod:`virtio_schema.mem`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final, NamedTuple, final

from virtio_schema.errors import DeviceUsageError, DriverError
from virtio_schema.layout import ArrayField, IntField, Layout
from virtio_schema.mem import DeviceRange
from virtio_schema.schema import packed as pk
from virtio_schema.schema import split as sp
from virtio_schema.schema.flags import DescFlags

__all__ = [
    "DESC",
    "EVENT_SUPPRESSION",
    "PACKED_DESC",
    "USED_ELEM",
    "AvailRing",
    "Desc",
    "DescTable",
    "EventArea",
    "EventSuppressionRecord",
    "MisalignedRing",
    "PackedDesc",
    "PackedRing",
    "RingTooSmall",
    "UsedElemRecord",
    "UsedRing",
    "linked_descs",
]


class Desc(NamedTuple):
    """One split descriptor as read from the table (``struct virtq_desc``)."""

    addr: int
    len: int
    flags: int
    next: int


_NEXT: Final = int(DescFlags.NEXT)


def linked_descs(buffers: Sequence[tuple[int, int, int]], at: Sequence[int]) -> list[Desc]:
    """The split descriptors a driver writes for a chain of ``buffers`` (``(addr, len, flags)``,
    in chain order) placed at table indices ``at``: each but the last gets ``NEXT`` and the index
    of the one after it (``at = range(n)`` for an indirect table). For drivers in tests and
    benchmarks; the device side never builds chains."""
    last = len(buffers) - 1
    return [
        Desc(addr, length, flags | _NEXT, at[k + 1]) if k < last else Desc(addr, length, flags, 0)
        for k, (addr, length, flags) in enumerate(buffers)
    ]


class UsedElemRecord(NamedTuple):
    """One used ring element (``struct virtq_used_elem``)."""

    id: int
    len: int


DESC: Layout[Desc] = Layout(sp.Descriptor, Desc, name="Descriptor")
USED_ELEM: Layout[UsedElemRecord] = Layout(sp.UsedElem, UsedElemRecord, name="UsedElem")


class RingTooSmall(DeviceUsageError):
    """A ring's device range is shorter than the queue size needs (the transport computed it)."""

    def __init__(self, area: str, size: int, have: int, need: int) -> None:
        self.area = area
        super().__init__(f"{area} of a size-{size} queue needs {need} bytes, the range has {have}")


class MisalignedRing(DriverError):
    """A ring's driver address does not have the alignment the specification requires."""

    def __init__(self, area: str, addr: int, align: int) -> None:
        self.area = area
        self.addr = addr
        super().__init__(f"{area} at {addr:#x} is not {align}-byte aligned")


def _area(dr: DeviceRange, area: str, size: int, need: int, align: int) -> DeviceRange:
    have = len(dr.view)
    if have < need:
        raise RingTooSmall(area, size, have, need)
    if dr.driver_range is not None and dr.driver_range.start % align:
        raise MisalignedRing(area, dr.driver_range.start, align)
    if have > need:  # split, not slice: the piece stays tracked by the memory it came from
        dr = dr.split_at(need)[0]
    return dr


@final
class DescTable:
    """The descriptor table: ``size`` descriptors of 16 bytes, 16-aligned."""

    __slots__ = ("range", "size", "view")

    def __init__(self, dr: DeviceRange, size: int) -> None:
        sp.check_split_queue_size(size)
        self.size = size
        self.range = _area(
            dr, "descriptor table", size, DESC.size * size, sp.DESC_ALIGN
        )  # kept: the memory tracks (and releases) ranges
        self.view = self.range.view

    def get(self, index: int) -> Desc:
        """Descriptor ``index`` (``0 <= index < size``; the caller checks the bound)."""
        return DESC.unpack_from(self.view, DESC.size * index)

    def set(self, index: int, desc: Desc) -> None:
        """Write descriptor ``index`` (drivers and tests only: a device never writes the table)."""
        DESC.pack_into(self.view, DESC.size * index, desc)


@functools.cache
def _avail_fields(size: int) -> tuple[IntField, IntField, ArrayField, IntField]:
    schema = sp.avail_ring(size)
    return (
        IntField.of(schema, "flags"),
        IntField.of(schema, "idx"),
        ArrayField.of(schema, "ring"),
        IntField.of(schema, "used_event"),
    )


@functools.cache
def _used_fields(size: int) -> tuple[IntField, IntField, ArrayField, IntField]:
    schema = sp.used_ring(size)
    return (
        IntField.of(schema, "flags"),
        IntField.of(schema, "idx"),
        ArrayField.of(schema, "ring"),
        IntField.of(schema, "avail_event"),
    )


@final
class AvailRing:
    """The available ring (driver area), written by the driver, read by the device."""

    __slots__ = ("_elem", "_flags", "_idx", "_ring", "_used_event", "range", "size", "view")

    def __init__(self, dr: DeviceRange, size: int) -> None:
        sp.check_split_queue_size(size)
        self._flags, self._idx, self._ring, self._used_event = _avail_fields(size)
        self._elem = self._ring.element_int()
        self.size = size
        self.range = _area(
            dr, "available ring", size, sp.avail_ring(size).sizeof(), sp.AVAIL_ALIGN
        )  # kept: the memory tracks (and releases) ranges
        self.view = self.range.view

    @property
    def ring_offset(self) -> int:
        """Byte offset of ``ring[0]``; entries are 2 bytes apart."""
        return self._ring.offset

    @property
    def used_event_offset(self) -> int:
        return self._used_event.offset

    @property
    def idx_offset(self) -> int:
        return self._idx.offset

    @property
    def flags_offset(self) -> int:
        return self._flags.offset

    def flags(self) -> int:
        return self._flags.get(self.view)

    def idx(self) -> int:
        return self._idx.get(self.view)

    def ring(self, slot: int) -> int:
        """The head index in ``ring[slot]`` (``0 <= slot < size``)."""
        return self._elem.get(self.view, self._ring.offset + self._ring.stride * slot)

    def used_event(self) -> int:
        return self._used_event.get(self.view)

    # driver side (fake driver, tests)
    def set_flags(self, value: int) -> None:
        self._flags.set(self.view, value)

    def set_idx(self, value: int) -> None:
        self._idx.set(self.view, value)

    def set_ring(self, slot: int, head: int) -> None:
        self._elem.set(self.view, head, self._ring.offset + self._ring.stride * slot)

    def set_used_event(self, value: int) -> None:
        self._used_event.set(self.view, value)


@final
class UsedRing:
    """The used ring (device area), written by the device, read by the driver."""

    __slots__ = ("_avail_event", "_flags", "_idx", "_ring", "range", "size", "view")

    def __init__(self, dr: DeviceRange, size: int) -> None:
        sp.check_split_queue_size(size)
        self._flags, self._idx, self._ring, self._avail_event = _used_fields(size)
        self.size = size
        self.range = _area(
            dr, "used ring", size, sp.used_ring(size).sizeof(), sp.USED_ALIGN
        )  # kept: the memory tracks (and releases) ranges
        self.view = self.range.view

    @property
    def ring_offset(self) -> int:
        """Byte offset of ``ring[0]``; elements are 8 bytes apart."""
        return self._ring.offset

    @property
    def idx_offset(self) -> int:
        return self._idx.offset

    @property
    def flags_offset(self) -> int:
        return self._flags.offset

    @property
    def avail_event_offset(self) -> int:
        return self._avail_event.offset

    def flags(self) -> int:
        return self._flags.get(self.view)

    def set_flags(self, value: int) -> None:
        self._flags.set(self.view, value)

    def idx(self) -> int:
        return self._idx.get(self.view)

    def set_idx(self, value: int) -> None:
        self._idx.set(self.view, value)

    def elem(self, slot: int) -> UsedElemRecord:
        return USED_ELEM.unpack_from(self.view, self._ring.offset + self._ring.stride * slot)

    def set_elem(self, slot: int, head: int, length: int) -> None:
        USED_ELEM.pack_into(
            self.view, self._ring.offset + self._ring.stride * slot, UsedElemRecord(head, length)
        )

    def avail_event(self) -> int:
        return self._avail_event.get(self.view)

    def set_avail_event(self, value: int) -> None:
        self._avail_event.set(self.view, value)


# --- packed ring (virtio 1.2, 2.8) ---------------------------------------------------------------


class PackedDesc(NamedTuple):
    """One packed descriptor (``struct pvirtq_desc``)."""

    addr: int
    len: int
    id: int
    flags: int


class EventSuppressionRecord(NamedTuple):
    """An event suppression area (``struct pvirtq_event_suppress``)."""

    off_wrap: int
    flags: int


PACKED_DESC: Layout[PackedDesc] = Layout(pk.PackedDescriptor, PackedDesc, name="PackedDescriptor")
EVENT_SUPPRESSION: Layout[EventSuppressionRecord] = Layout(
    pk.EventSuppression, EventSuppressionRecord, name="EventSuppression"
)


@final
class PackedRing:
    """The packed descriptor ring: ``size`` 16-byte descriptors, 16-aligned, written by the driver
    (available descriptors) and by the device (used descriptors)."""

    __slots__ = ("_flags", "_id", "_len", "range", "size", "view")

    def __init__(self, dr: DeviceRange, size: int) -> None:
        pk.check_packed_queue_size(size)
        self.size = size
        self.range = _area(
            dr, "packed descriptor ring", size, PACKED_DESC.size * size, pk.PACKED_RING_ALIGN
        )  # kept: the memory tracks (and releases) ranges
        self.view = self.range.view
        self._len = IntField.of(pk.PackedDescriptor, "len")
        self._id = IntField.of(pk.PackedDescriptor, "id")
        self._flags = IntField.of(pk.PackedDescriptor, "flags")

    @property
    def flags_offset(self) -> int:
        """Offset of ``flags`` inside a descriptor (read first, written last)."""
        return self._flags.offset

    @property
    def id_offset(self) -> int:
        return self._id.offset

    @property
    def len_offset(self) -> int:
        return self._len.offset

    def get(self, index: int) -> PackedDesc:
        return PACKED_DESC.unpack_from(self.view, PACKED_DESC.size * index)

    def set(self, index: int, desc: PackedDesc) -> None:
        """Write a whole descriptor (drivers and tests; the device writes id/len then flags)."""
        PACKED_DESC.pack_into(self.view, PACKED_DESC.size * index, desc)

    def flags(self, index: int) -> int:
        return self._flags.get(self.view, PACKED_DESC.size * index)

    def set_flags(self, index: int, value: int) -> None:
        self._flags.set(self.view, value, PACKED_DESC.size * index)


@final
class EventArea:
    """A driver or device event suppression area (4 bytes, 4-aligned)."""

    __slots__ = ("_flags", "_off_wrap", "range", "view")

    def __init__(self, dr: DeviceRange, area: str) -> None:
        self.range = _area(
            dr, area, 0, EVENT_SUPPRESSION.size, pk.EVENT_SUPPRESSION_ALIGN
        )  # kept: the memory tracks (and releases) ranges
        self.view = self.range.view
        self._off_wrap = IntField.of(pk.EventSuppression, "off_wrap")
        self._flags = IntField.of(pk.EventSuppression, "flags")

    @property
    def off_wrap_offset(self) -> int:
        return self._off_wrap.offset

    @property
    def flags_offset(self) -> int:
        return self._flags.offset

    def off_wrap(self) -> int:
        return self._off_wrap.get(self.view)

    def flags(self) -> int:
        return self._flags.get(self.view)

    def set(self, off_wrap: int, flags: int) -> None:
        self._off_wrap.set(self.view, off_wrap)
        self._flags.set(self.view, flags)
