"""Tests of :mod:`virtio_schema.ring`: typed views of the split rings over device memory.

What a device relies on here: a ring view refuses a geometry it cannot serve (a queue size the
split format does not allow, a range too short for the queue size, a driver address without the
alignment the specification requires, virtio 1.2, 2.7) with a named error of the right family;
and once built, every accessor reads and writes exactly the bytes the Construct schema describes,
so :mod:`virtio_schema.schema` stays the single source of truth for the layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtio_schema.errors import DeviceUsageError, DriverError, InvalidQueueSize
from virtio_schema.fake_queue import FakeDriver, make_queue
from virtio_schema.mem import DeviceRange, DriverRange, GuestMemory
from virtio_schema.queue import Queue, QueueMemory
from virtio_schema.ring import (
    AvailRing,
    Desc,
    DescTable,
    MisalignedRing,
    RingTooSmall,
    UsedElemRecord,
    UsedRing,
)
from virtio_schema.schema import avail_ring, descriptor_table, used_ring
from virtio_schema.util import NotificationCounter

RingView = DescTable | AvailRing | UsedRing
RingClass = Callable[[DeviceRange, int], RingView]

BASE = 0x10000
SIZES = st.sampled_from([1, 2, 4, 8, 16, 64, 256])
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFF_FFFF)
U64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)


def desc_bytes(n: int) -> int:
    return 16 * n


def avail_bytes(n: int) -> int:
    return 6 + 2 * n


def used_bytes(n: int) -> int:
    return 6 + 8 * n


# (class, area name in errors, bytes needed for size n, alignment of the driver address)
AREAS: list[tuple[RingClass, str, Callable[[int], int], int]] = [
    (DescTable, "descriptor table", desc_bytes, 16),
    (AvailRing, "available ring", avail_bytes, 2),
    (UsedRing, "used ring", used_bytes, 4),
]
AREA_IDS = ["desc", "avail", "used"]


@pytest.fixture
def guest() -> Iterator[GuestMemory]:
    mem = GuestMemory([(BASE, bytearray(0x40000))])
    yield mem
    mem.close()


def device_range(mem: GuestMemory, addr: int, length: int) -> DeviceRange:
    dr = mem.translate(DriverRange.from_addr_len(addr, length))
    assert dr is not None
    return dr


def plain_range(length: int) -> DeviceRange:
    """Device memory with no driver address (alignment cannot be checked, so is not)."""
    return DeviceRange(memoryview(bytearray(length)))


# --- geometry checks at construction ---------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 6, 100, 32769, 65536, -1])
@pytest.mark.parametrize(("cls", "area", "need", "align"), AREAS, ids=AREA_IDS)
def test_invalid_queue_size_refused(
    cls: RingClass, area: str, need: Callable[[int], int], align: int, size: int
) -> None:
    big = plain_range(16 * 32768 + 64)
    with pytest.raises(InvalidQueueSize) as info:
        cls(big, size)
    assert isinstance(info.value, DeviceUsageError)
    assert info.value.size == size
    assert str(size) in str(info.value)


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
@pytest.mark.parametrize(("cls", "area", "need", "align"), AREAS, ids=AREA_IDS)
def test_every_power_of_two_up_to_32768_accepted(
    cls: RingClass, area: str, need: Callable[[int], int], align: int, size: int
) -> None:
    ring = cls(plain_range(need(size)), size)
    assert ring.size == size
    assert len(ring.view) == need(size)


@pytest.mark.parametrize("size", [1, 16, 32768])
@pytest.mark.parametrize(("cls", "area", "need", "align"), AREAS, ids=AREA_IDS)
def test_range_one_byte_short_is_ring_too_small(
    cls: RingClass, area: str, need: Callable[[int], int], align: int, size: int
) -> None:
    with pytest.raises(RingTooSmall) as info:
        cls(plain_range(need(size) - 1), size)
    err = info.value
    assert isinstance(err, DeviceUsageError)
    assert not isinstance(err, DriverError)
    assert err.area == area
    message = str(err)
    assert area in message
    assert f"size-{size}" in message
    assert str(need(size)) in message
    assert str(need(size) - 1) in message


@pytest.mark.parametrize(("cls", "area", "need", "align"), AREAS, ids=AREA_IDS)
def test_empty_range_is_ring_too_small(
    cls: RingClass, area: str, need: Callable[[int], int], align: int
) -> None:
    with pytest.raises(RingTooSmall):
        cls(plain_range(0), 8)


@pytest.mark.parametrize(("cls", "area", "need", "align"), AREAS, ids=AREA_IDS)
def test_longer_range_is_cut_to_the_ring(
    cls: RingClass, area: str, need: Callable[[int], int], align: int
) -> None:
    """A transport may translate more than the ring (e.g. a whole page): the view stops at the
    ring's end, so nothing past it can be read or written through the view."""
    raw = bytearray(need(8) + 100)
    ring = cls(DeviceRange(memoryview(raw)), 8)
    assert len(ring.view) == need(8)
    ring.view[:] = b"\xff" * need(8)
    assert raw[need(8) :] == bytes(100)


@pytest.mark.parametrize("offset", [1, 2, 4, 8, 15, 24])
def test_desc_table_not_16_aligned_is_misaligned(guest: GuestMemory, offset: int) -> None:
    addr = BASE + offset
    with pytest.raises(MisalignedRing) as info:
        DescTable(device_range(guest, addr, desc_bytes(8)), 8)
    err = info.value
    assert isinstance(err, DriverError)
    assert not isinstance(err, DeviceUsageError)
    assert err.area == "descriptor table"
    assert err.addr == addr
    assert f"{addr:#x}" in str(err)
    assert "16" in str(err)


@pytest.mark.parametrize("offset", [1, 3, 5, 0x101])
def test_avail_ring_not_2_aligned_is_misaligned(guest: GuestMemory, offset: int) -> None:
    addr = BASE + offset
    with pytest.raises(MisalignedRing) as info:
        AvailRing(device_range(guest, addr, avail_bytes(8)), 8)
    err = info.value
    assert isinstance(err, DriverError)
    assert err.area == "available ring"
    assert err.addr == addr
    assert f"{addr:#x}" in str(err)


@pytest.mark.parametrize("offset", [1, 2, 3, 6, 0x102])
def test_used_ring_not_4_aligned_is_misaligned(guest: GuestMemory, offset: int) -> None:
    addr = BASE + offset
    with pytest.raises(MisalignedRing) as info:
        UsedRing(device_range(guest, addr, used_bytes(8)), 8)
    err = info.value
    assert isinstance(err, DriverError)
    assert err.area == "used ring"
    assert err.addr == addr
    assert f"{addr:#x}" in str(err)


@pytest.mark.parametrize(("cls", "area", "need", "align"), AREAS, ids=AREA_IDS)
def test_exactly_aligned_driver_address_accepted(
    guest: GuestMemory, cls: RingClass, area: str, need: Callable[[int], int], align: int
) -> None:
    """Linux packs the rings tightly: only the specification's alignment is required, no more."""
    addr = BASE + 0x1000 + align
    ring = cls(device_range(guest, addr, need(8)), 8)
    assert len(ring.view) == need(8)


# --- accessors against the Construct schemas ------------------------------------------------------


def test_field_offsets_are_the_specification_layout() -> None:
    n = 8
    avail = AvailRing(plain_range(avail_bytes(n)), n)
    used = UsedRing(plain_range(used_bytes(n)), n)
    assert (avail.flags_offset, avail.idx_offset, avail.ring_offset) == (0, 2, 4)
    assert avail.used_event_offset == 4 + 2 * n
    assert (used.flags_offset, used.idx_offset, used.ring_offset) == (0, 2, 4)
    assert used.avail_event_offset == 4 + 8 * n


@given(data=st.data())
def test_desc_table_get_reads_what_construct_parses(data: st.DataObject) -> None:
    n = data.draw(SIZES)
    raw = bytearray(data.draw(st.binary(min_size=desc_bytes(n), max_size=desc_bytes(n))))
    table = DescTable(DeviceRange(memoryview(raw)), n)
    parsed: Any = descriptor_table(n).parse(bytes(raw))
    for i in range(n):
        d = parsed[i]
        assert table.get(i) == Desc(d.addr, d.len, d.flags, d.next)


@given(data=st.data())
def test_desc_table_set_writes_what_construct_builds(data: st.DataObject) -> None:
    n = data.draw(SIZES)
    raw = bytearray(data.draw(st.binary(min_size=desc_bytes(n), max_size=desc_bytes(n))))
    table = DescTable(DeviceRange(memoryview(raw)), n)
    i = data.draw(st.integers(0, n - 1))
    new = Desc(data.draw(U64), data.draw(U32), data.draw(U16), data.draw(U16))
    schema = descriptor_table(n)
    expected: Any = schema.parse(bytes(raw))
    expected[i] = {"addr": new.addr, "len": new.len, "flags": new.flags, "next": new.next}
    table.set(i, new)
    assert bytes(raw) == schema.build(expected)  # that entry changed, and nothing else
    assert table.get(i) == new


@given(data=st.data())
def test_avail_ring_reads_what_construct_parses(data: st.DataObject) -> None:
    n = data.draw(SIZES)
    raw = bytearray(data.draw(st.binary(min_size=avail_bytes(n), max_size=avail_bytes(n))))
    ring = AvailRing(DeviceRange(memoryview(raw)), n)
    parsed: Any = avail_ring(n).parse(bytes(raw))
    assert ring.flags() == parsed.flags
    assert ring.idx() == parsed.idx
    assert [ring.ring(slot) for slot in range(n)] == list(parsed.ring)
    assert ring.used_event() == parsed.used_event


@given(data=st.data())
def test_avail_ring_setters_write_what_construct_builds(data: st.DataObject) -> None:
    n = data.draw(SIZES)
    raw = bytearray(data.draw(st.binary(min_size=avail_bytes(n), max_size=avail_bytes(n))))
    ring = AvailRing(DeviceRange(memoryview(raw)), n)
    schema = avail_ring(n)
    expected: Any = schema.parse(bytes(raw))
    flags, idx, used_event = data.draw(U16), data.draw(U16), data.draw(U16)
    slot, head = data.draw(st.integers(0, n - 1)), data.draw(U16)
    ring.set_flags(flags)
    ring.set_idx(idx)
    ring.set_ring(slot, head)
    ring.set_used_event(used_event)
    expected.flags, expected.idx, expected.used_event = flags, idx, used_event
    expected.ring[slot] = head
    assert bytes(raw) == schema.build(expected)


@given(data=st.data())
def test_used_ring_reads_what_construct_parses(data: st.DataObject) -> None:
    n = data.draw(SIZES)
    raw = bytearray(data.draw(st.binary(min_size=used_bytes(n), max_size=used_bytes(n))))
    ring = UsedRing(DeviceRange(memoryview(raw)), n)
    parsed: Any = used_ring(n).parse(bytes(raw))
    assert ring.flags() == parsed.flags
    assert ring.idx() == parsed.idx
    assert [ring.elem(slot) for slot in range(n)] == [
        UsedElemRecord(e.id, e.len) for e in parsed.ring
    ]
    assert ring.avail_event() == parsed.avail_event


@given(data=st.data())
def test_used_ring_setters_write_what_construct_builds(data: st.DataObject) -> None:
    n = data.draw(SIZES)
    raw = bytearray(data.draw(st.binary(min_size=used_bytes(n), max_size=used_bytes(n))))
    ring = UsedRing(DeviceRange(memoryview(raw)), n)
    schema = used_ring(n)
    expected: Any = schema.parse(bytes(raw))
    flags, idx, avail_event = data.draw(U16), data.draw(U16), data.draw(U16)
    slot, head, length = data.draw(st.integers(0, n - 1)), data.draw(U32), data.draw(U32)
    ring.set_flags(flags)
    ring.set_idx(idx)
    ring.set_elem(slot, head, length)
    ring.set_avail_event(avail_event)
    expected.flags, expected.idx, expected.avail_event = flags, idx, avail_event
    expected.ring[slot] = {"id": head, "len": length}
    assert bytes(raw) == schema.build(expected)
    assert ring.elem(slot) == UsedElemRecord(head, length)


def test_views_alias_guest_memory(guest: GuestMemory) -> None:
    """A ring view is a window on guest memory, not a copy: the driver's writes show through and
    the device's writes land in guest memory at the ring's driver address."""
    n = 4
    used_addr = BASE + 0x2000
    avail_addr = BASE + 0x1000
    avail = AvailRing(device_range(guest, avail_addr, avail_bytes(n)), n)
    used = UsedRing(device_range(guest, used_addr, used_bytes(n)), n)
    guest.write(avail_addr + 2, (0x1234).to_bytes(2, "little"))
    assert avail.idx() == 0x1234
    used.set_elem(3, 7, 0xABCDEF)
    assert guest.read(used_addr + 4 + 8 * 3, 8) == (7).to_bytes(4, "little") + (0xABCDEF).to_bytes(
        4, "little"
    )


# --- Queue refuses ring ranges that do not match its size -----------------------------------------


def test_queue_refuses_used_range_of_a_smaller_queue() -> None:
    fq = make_queue(size=16)
    small = FakeDriver(fq.memory, 8).queue_memory()
    good = fq.driver.queue_memory()
    with pytest.raises(RingTooSmall) as info:
        Queue(
            QueueMemory(good.desc, good.avail, small.used),
            16,
            fq.memory,
            features=0,
            notify=NotificationCounter(),
        )
    assert info.value.area == "used ring"


def test_queue_refuses_avail_range_of_a_smaller_queue() -> None:
    fq = make_queue(size=16)
    small = FakeDriver(fq.memory, 8).queue_memory()
    good = fq.driver.queue_memory()
    with pytest.raises(RingTooSmall) as info:
        Queue(
            QueueMemory(good.desc, small.avail, good.used),
            16,
            fq.memory,
            features=0,
            notify=NotificationCounter(),
        )
    assert info.value.area == "available ring"


def test_queue_refuses_desc_range_of_a_smaller_queue() -> None:
    fq = make_queue(size=16)
    small = FakeDriver(fq.memory, 8).queue_memory()
    good = fq.driver.queue_memory()
    with pytest.raises(RingTooSmall) as info:
        Queue(
            QueueMemory(small.desc, good.avail, good.used),
            16,
            fq.memory,
            features=0,
            notify=NotificationCounter(),
        )
    assert info.value.area == "descriptor table"


def test_queue_refuses_invalid_size_and_misaligned_ring(guest: GuestMemory) -> None:
    n = 8
    desc = device_range(guest, BASE, desc_bytes(n))
    avail = device_range(guest, BASE + 0x1000, avail_bytes(n))
    used = device_range(guest, BASE + 0x2000, used_bytes(n))
    with pytest.raises(InvalidQueueSize):
        Queue(QueueMemory(desc, avail, used), 6, guest, features=0, notify=NotificationCounter())
    bad_used = device_range(guest, BASE + 0x2002, used_bytes(n))
    with pytest.raises(MisalignedRing) as info:
        Queue(
            QueueMemory(desc, avail, bad_used), n, guest, features=0, notify=NotificationCounter()
        )
    assert info.value.area == "used ring"
    queue = Queue(
        QueueMemory(desc, avail, used), n, guest, features=0, notify=NotificationCounter()
    )
    assert queue.size == n
    assert queue.next_chain() is None


def test_linked_descs_chain_buffers_through_the_given_indices() -> None:
    from virtio_schema.ring import linked_descs
    from virtio_schema.schema import DescFlags

    bufs = [(0x1000, 16, 0), (0x2000, 512, int(DescFlags.WRITE)), (0x3000, 1, int(DescFlags.WRITE))]
    direct = linked_descs(bufs, [7, 2, 5])
    assert direct == [
        Desc(0x1000, 16, int(DescFlags.NEXT), 2),
        Desc(0x2000, 512, int(DescFlags.WRITE | DescFlags.NEXT), 5),
        Desc(0x3000, 1, int(DescFlags.WRITE), 0),  # the last: no NEXT, next 0
    ]
    table = linked_descs(bufs, range(3))  # an indirect table links 0 -> 1 -> 2
    assert [d.next for d in table] == [1, 2, 0]
    assert linked_descs(bufs[:1], [4]) == [Desc(0x1000, 16, 0, 0)]
