"""Inflight I/O tracking (:mod:`virtio_schema.vhost_user.inflight`): the region's layouts against
the byte offsets of the vhost-user spec (as libvhost-user and DPDK lay them out), the stride DPDK
uses, the split and packed bookkeeping with a back-end "crash" at every point between two of its
steps, and recovery from hostile regions: only :class:`InflightError`, never a hang.

A crash is simulated by dropping the tracker and building a fresh one over the same bytes, as a
restarted back-end maps the front-end's copy of the region. The rings are reduced to what recovery
reads: the split used index, and the flags of each packed descriptor (:class:`FakePackedRing`).
"""

from __future__ import annotations

import mmap
import random
from collections.abc import Callable, Sequence
from typing import overload

import pytest

from virtio_schema.errors import DeviceUsageError
from virtio_schema.layout import Layout
from virtio_schema.schema import PackedDescFlags
from virtio_schema.vhost_user.errors import FrontendError
from virtio_schema.vhost_user.inflight import (
    INFLIGHT,
    PACKED_DESC_STATE,
    PACKED_QUEUE_REGION,
    SPLIT_DESC_STATE,
    SPLIT_QUEUE_REGION,
    DescStatePackedRec,
    DescStateSplitRec,
    InflightChain,
    InflightDesc,
    InflightError,
    InflightRec,
    PackedInflight,
    PackedRecovery,
    QueueRegionPackedRec,
    QueueRegionSplitRec,
    SplitInflight,
    SplitRecovery,
    check_region,
    queue_region_size,
    region_size,
)

AVAIL = int(PackedDescFlags.AVAIL)
USED = int(PackedDescFlags.USED)
NEXT = int(PackedDescFlags.NEXT)
QS = 8


def u(buf: bytes | bytearray, at: int, size: int) -> int:
    """The little-endian unsigned integer of ``size`` bytes at ``at``."""
    return int.from_bytes(buf[at : at + size], "little")


# --- layouts: the byte offsets of the study (vhost-user.rst, lvu.h, rte_vhost.h) ---------------


def test_inflight_payload_is_24_bytes_with_the_documented_offsets() -> None:
    data = INFLIGHT.pack(InflightRec(0x1122334455667788, 0x0102030405060708, 0xA1A2, 0xB1B2))
    assert len(data) == 24
    assert u(data, 0, 8) == 0x1122334455667788  # mmap_size
    assert u(data, 8, 8) == 0x0102030405060708  # mmap_offset
    assert u(data, 16, 2) == 0xA1A2  # num_queues
    assert u(data, 18, 2) == 0xB1B2  # queue_size
    assert data[20:24] == bytes(4)  # tail padding
    assert INFLIGHT.unpack(data) == InflightRec(
        0x1122334455667788, 0x0102030405060708, 0xA1A2, 0xB1B2
    )


def test_split_header_and_entry_offsets() -> None:
    hdr = SPLIT_QUEUE_REGION.pack(
        QueueRegionSplitRec(0x0807060504030201, 0x1211, 0x2221, 0x3231, 0x4241)
    )
    assert len(hdr) == 16
    assert (u(hdr, 0, 8), u(hdr, 8, 2), u(hdr, 10, 2), u(hdr, 12, 2), u(hdr, 14, 2)) == (
        0x0807060504030201,
        0x1211,
        0x2221,
        0x3231,
        0x4241,
    )
    ent = SPLIT_DESC_STATE.pack(DescStateSplitRec(0xEE, 0x5150, 0x6968676665646362))
    assert len(ent) == 16
    assert ent[0] == 0xEE  # inflight
    assert ent[1:6] == bytes(5)  # padding[5]
    assert u(ent, 6, 2) == 0x5150  # next
    assert u(ent, 8, 8) == 0x6968676665646362  # counter


def test_packed_header_and_entry_offsets() -> None:
    hdr = PACKED_QUEUE_REGION.pack(
        QueueRegionPackedRec(
            0x0807060504030201, 0x1211, 0x2221, 0x3231, 0x4241, 0x5251, 0x6261, 0x71, 0x81
        )
    )
    assert len(hdr) == 32  # the entries start at +32
    offsets = [(0, 8), (8, 2), (10, 2), (12, 2), (14, 2), (16, 2), (18, 2), (20, 1), (21, 1)]
    assert [u(hdr, at, size) for at, size in offsets] == [
        0x0807060504030201,
        0x1211,  # version
        0x2221,  # desc_num
        0x3231,  # free_head
        0x4241,  # old_free_head
        0x5251,  # used_idx
        0x6261,  # old_used_idx
        0x71,  # used_wrap_counter
        0x81,  # old_used_wrap_counter
    ]
    assert hdr[22:32] == bytes(10)  # padding[7] and the 3 alignment bytes
    ent = PACKED_DESC_STATE.pack(
        DescStatePackedRec(
            0xEE,
            0x1211,
            0x2221,
            0x3231,
            0x4847464544434241,
            0x5251,
            0x6261,
            0x74737271,
            0x8887868584838281,
        )
    )
    assert len(ent) == 32
    assert ent[0] == 0xEE  # inflight
    assert ent[1] == 0  # padding
    offsets = [(2, 2), (4, 2), (6, 2), (8, 8), (16, 2), (18, 2), (20, 4), (24, 8)]
    assert [u(ent, at, size) for at, size in offsets] == [
        0x1211,  # next
        0x2221,  # last
        0x3231,  # num
        0x4847464544434241,  # counter
        0x5251,  # id
        0x6261,  # flags
        0x74737271,  # len
        0x8887868584838281,  # addr
    ]


SIZES = [1, 2, 3, 4, 5, 63, 64, 127, 128, 256, 1000, 1024, 4096, 32768]


@pytest.mark.parametrize("qs", SIZES)
def test_stride_is_dpdks_and_libvhost_users(qs: int) -> None:
    def align64(n: int) -> int:
        return (n + 63) // 64 * 64

    assert queue_region_size(qs, packed=False) == align64(16 * qs + 16)  # DPDK split
    assert queue_region_size(qs, packed=False) == align64(16 * qs + 2)  # libvhost-user split
    assert queue_region_size(qs, packed=True) == align64(32 * qs + 29)  # DPDK packed
    assert queue_region_size(qs, packed=True) >= 32 + 32 * qs
    assert region_size(3, qs, packed=True) == 3 * queue_region_size(qs, packed=True)


def test_stride_example_of_the_study() -> None:
    assert queue_region_size(128, packed=False) == 2112
    assert region_size(2, 128, packed=False) == 4224


@pytest.mark.parametrize("packed", [False, True])
def test_check_region_returns_the_stride_and_refuses_a_short_region(packed: bool) -> None:
    need = region_size(4, 128, packed=packed)
    assert check_region(need, 4, 128, packed=packed) == queue_region_size(128, packed=packed)
    assert check_region(need + 4096, 4, 128, packed=packed) == need // 4
    with pytest.raises(InflightError, match=f"{need - 1} bytes"):
        check_region(need - 1, 4, 128, packed=packed)


@pytest.mark.parametrize(("num_queues", "queue_size"), [(0, 128), (1, 0), (1, 32769), (70000, 1)])
def test_check_region_refuses_counts_out_of_range(num_queues: int, queue_size: int) -> None:
    with pytest.raises(InflightError):
        check_region(1 << 30, num_queues, queue_size, packed=False)


def test_inflight_error_is_a_frontend_error() -> None:
    assert issubclass(InflightError, FrontendError)


# --- split ---------------------------------------------------------------------------------------


def split_region(qs: int = QS) -> bytearray:
    return bytearray(queue_region_size(qs, packed=False))


def hdr_field(
    layout: Layout[QueueRegionSplitRec] | Layout[QueueRegionPackedRec], buf: bytearray, name: str
) -> int:
    return layout.field(name).get(buf)


def set_split_entry(buf: bytearray, i: int, name: str, value: int) -> None:
    SPLIT_DESC_STATE.field(name).set(
        buf, value, SPLIT_QUEUE_REGION.size + i * SPLIT_DESC_STATE.size
    )


def split_entry(buf: bytearray, i: int) -> DescStateSplitRec:
    return SPLIT_DESC_STATE.unpack_from(buf, SPLIT_QUEUE_REGION.size + i * SPLIT_DESC_STATE.size)


def test_split_init_writes_a_fresh_header() -> None:
    buf = split_region()
    buf[:] = b"\xff" * len(buf)  # whatever was there: init starts from zero
    SplitInflight(memoryview(buf), QS).init(7)
    hdr = SPLIT_QUEUE_REGION.unpack_from(buf)
    assert hdr == QueueRegionSplitRec(0, 1, QS, 0, 7)
    assert all(split_entry(buf, i) == DescStateSplitRec(0, 0, 0) for i in range(QS))


def test_split_taken_sets_counter_then_inflight() -> None:
    buf = split_region()
    t = SplitInflight(memoryview(buf), QS)
    t.init()
    t.taken(5)
    t.taken(2)
    assert split_entry(buf, 5) == DescStateSplitRec(1, 0, 0)
    assert split_entry(buf, 2) == DescStateSplitRec(1, 0, 1)
    assert t.counter == 2


def test_split_completing_links_the_batch_and_completed_retires_it() -> None:
    buf = split_region()
    t = SplitInflight(memoryview(buf), QS)
    t.init(40)
    for head in (1, 6, 3):
        t.taken(head)
    t.completing([6, 3])
    assert hdr_field(SPLIT_QUEUE_REGION, buf, "last_batch_head") == 3
    assert split_entry(buf, 3).next == 6
    assert split_entry(buf, 6).next == 0  # the previous last_batch_head
    t.completed([6, 3], 42)
    assert hdr_field(SPLIT_QUEUE_REGION, buf, "used_idx") == 42
    assert [split_entry(buf, h).inflight for h in (1, 6, 3)] == [1, 0, 0]


# where the back-end dies in "take 1, 6, 3; complete the batch [6, 3]"
CRASH_POINTS = ["after_taken", "after_completing", "after_used_idx", "after_completed"]


def split_run_until(buf: bytearray, crash: str, start: int) -> int:
    """Take heads 1, 6, 3, complete 6 and 3 in one batch; stop at ``crash``. Returns the guest's
    used index at that moment."""
    t = SplitInflight(memoryview(buf), QS)
    t.init(start)
    for head in (1, 6, 3):
        t.taken(head)
    guest_used = start
    if crash == "after_taken":
        return guest_used
    t.completing([6, 3])
    if crash == "after_completing":
        return guest_used
    guest_used = (start + 2) & 0xFFFF  # the queue publishes used->idx
    if crash == "after_used_idx":
        return guest_used
    t.completed([6, 3], guest_used)
    return guest_used


@pytest.mark.parametrize("start", [0, 1000, 0xFFFF])  # 0xFFFF: the batch wraps used->idx
@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_split_recovery_after_a_crash_resubmits_exactly_the_unfinished_heads(
    crash: str, start: int
) -> None:
    buf = split_region()
    guest_used = split_run_until(buf, crash, start)
    t = SplitInflight(memoryview(buf), QS)
    got = t.recover(guest_used)
    if crash in ("after_taken", "after_completing"):  # the batch never reached the driver
        assert got == SplitRecovery((1, 6, 3), (start + 3) & 0xFFFF, False)
        assert t.counter == 3
    else:  # published: only head 1 is still the device's
        assert got == SplitRecovery((1,), (start + 3) & 0xFFFF, False)
        assert t.counter == 1
    assert hdr_field(SPLIT_QUEUE_REGION, buf, "used_idx") == guest_used
    # recovery is idempotent: a second crash right after it finds the same
    assert SplitInflight(memoryview(buf), QS).recover(guest_used) == got


def test_split_work_goes_on_after_recovery_in_counter_order() -> None:
    buf = split_region()
    guest_used = split_run_until(buf, "after_used_idx", 10)
    t = SplitInflight(memoryview(buf), QS)
    assert t.recover(guest_used).heads == (1,)
    t.taken(6)  # the driver reuses head 6
    t.taken(0)
    t.completing([1])
    t.completed([1], guest_used + 1)
    got = SplitInflight(memoryview(buf), QS).recover(guest_used + 1)
    assert got == SplitRecovery((6, 0), (guest_used + 3) & 0xFFFF, False)


def test_split_recovery_of_a_fresh_region_initialises_it() -> None:
    buf = split_region()
    t = SplitInflight(memoryview(buf), QS)
    assert t.recover(300) == SplitRecovery((), 300, True)
    assert SPLIT_QUEUE_REGION.unpack_from(buf) == QueueRegionSplitRec(0, 1, QS, 0, 300)
    t.taken(4)
    assert SplitInflight(memoryview(buf), QS).recover(300) == SplitRecovery((4,), 301, False)


def test_split_ring_smaller_than_the_region_queue_size() -> None:
    buf = split_region(256)  # QEMU's queue-size property; the driver programs a ring of 64
    t = SplitInflight(memoryview(buf), 256)
    t.init()
    t.taken(63)
    assert SplitInflight(memoryview(buf), 256).recover(0, ring_size=64).heads == (63,)


@pytest.mark.parametrize("head", [-1, QS, 1 << 16])
def test_split_hot_path_refuses_heads_outside_the_region(head: int) -> None:
    buf = split_region()
    after = bytearray(64)
    whole = bytearray(len(buf)) + after  # bytes after the queue region must stay untouched
    t = SplitInflight(memoryview(whole), QS)
    t.init()
    calls: list[Callable[[], None]] = [
        lambda: t.taken(head),
        lambda: t.completing([head]),
        lambda: t.completed([head], 1),
    ]
    for call in calls:
        with pytest.raises(InflightError, match=str(head)):
            call()
    assert whole[len(buf) :] == after


def test_split_hot_path_never_reads_the_region() -> None:
    buf = split_region()
    t = SplitInflight(memoryview(buf), QS)
    t.init()
    t.taken(2)
    buf[:] = random.Random(1).randbytes(len(buf))  # a front-end scribbles while we run
    t.taken(3)
    t.completing([2, 3])
    t.completed([2, 3], 2)
    assert split_entry(buf, 3).counter == 1
    assert hdr_field(SPLIT_QUEUE_REGION, buf, "last_batch_head") == 3
    assert split_entry(buf, 3).next == 2
    assert split_entry(buf, 2).next == 0


# --- split: hostile regions ----------------------------------------------------------------------


def split_hostile_base() -> tuple[bytearray, int]:
    """Heads 1, 2, 3 taken from used index 100, the batch [2, 3] published, not retired."""
    buf = split_region()
    t = SplitInflight(memoryview(buf), QS)
    t.init(100)
    for head in (1, 2, 3):
        t.taken(head)
    t.completing([2, 3])
    return buf, 102


def test_split_hostile_base_is_valid() -> None:
    buf, guest_used = split_hostile_base()
    assert SplitInflight(memoryview(buf), QS).recover(guest_used) == SplitRecovery((1,), 103, False)


SplitCorruption = Callable[[bytearray], tuple[int, int | None]]  # -> (guest used idx, ring size)


def _hdr(name: str, value: int, used: int = 102) -> SplitCorruption:
    def corrupt(buf: bytearray) -> tuple[int, int | None]:
        SPLIT_QUEUE_REGION.field(name).set(buf, value)
        return used, None

    return corrupt


def _entry(
    i: int, name: str, value: int, used: int = 102, ring: int | None = None
) -> SplitCorruption:
    def corrupt(buf: bytearray) -> tuple[int, int | None]:
        set_split_entry(buf, i, name, value)
        return used, ring

    return corrupt


def _both(first: SplitCorruption, second: SplitCorruption) -> SplitCorruption:
    def corrupt(buf: bytearray) -> tuple[int, int | None]:
        first(buf)
        return second(buf)

    return corrupt


SPLIT_HOSTILE: dict[str, tuple[SplitCorruption, str]] = {
    "version 2": (_hdr("version", 2), "version 2"),
    "version 0xffff": (_hdr("version", 0xFFFF), "version 65535"),
    "desc_num not the queue size": (_hdr("desc_num", QS // 2), "desc_num 4"),
    "last_batch_head past the queue": (_hdr("last_batch_head", QS), "last_batch_head 8"),
    # the batch list: 3 -> 2 -> (previous last_batch_head 0)
    "batch next past the queue": (_entry(3, "next", 0xFFFF), "next 65535"),
    "batch list cycle": (_entry(2, "next", 3, used=103), "loops back to head 3"),
    "batch list self-loop": (_entry(3, "next", 3), "loops back to head 3"),
    "batch longer than the ring": (lambda buf: (100 + QS + 1, None), "more than the ring"),
    "guest used idx behind the region": (lambda buf: (99, None), "65535 heads"),
    "inflight not 0 or 1": (_entry(1, "inflight", 2), "inflight 2"),
    "duplicate counters": (
        _both(_entry(5, "inflight", 1), _entry(5, "counter", 0)),
        "same counter 0",
    ),
    "head in flight past the ring": (
        _both(_entry(6, "inflight", 1), _entry(6, "counter", 9, ring=4)),
        "head 6 in flight",
    ),
    "counter at its maximum": (_entry(1, "counter", (1 << 64) - 1), "no room"),
    "ring larger than the region": (lambda buf: (102, QS * 2), "ring of 16"),
    "ring of zero": (lambda buf: (102, 0), "ring of 0"),
}


@pytest.mark.parametrize("case", SPLIT_HOSTILE)
def test_split_hostile_region_raises_inflight_error(case: str) -> None:
    corrupt, message = SPLIT_HOSTILE[case]
    buf, _ = split_hostile_base()
    guest_used, ring = corrupt(buf)
    before = bytes(buf)
    with pytest.raises(InflightError, match=message):
        SplitInflight(memoryview(buf), QS, name="ring 0").recover(guest_used, ring_size=ring)
    assert buf == before  # a refused region is left as it was


@pytest.mark.parametrize(
    ("length", "qs"), [(0, QS), (16 + 16 * QS - 1, QS), (1 << 20, 0), (1 << 20, 40000)]
)
@pytest.mark.parametrize("cls", [SplitInflight, PackedInflight])
def test_tracker_refuses_a_short_view_or_bad_queue_size(
    length: int, qs: int, cls: type[SplitInflight | PackedInflight]
) -> None:
    with pytest.raises(InflightError):
        cls(memoryview(bytearray(length)), qs)


def test_tracker_refuses_a_read_only_view() -> None:
    with pytest.raises(DeviceUsageError, match="read-only"):
        SplitInflight(memoryview(bytes(split_region())), QS)


# --- packed --------------------------------------------------------------------------------------


class FakePackedRing:
    """Just what recovery reads of a packed ring: each descriptor's flags. The driver makes chains
    available (every descriptor marked with its lap's AVAIL/USED bits), the device publishes used
    descriptors."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.flags = [0] * size
        self.avail_pos = 0
        self.avail_wrap = 1
        self.used_pos = 0
        self.used_wrap = 1
        self.next_id = 0

    def make_available(self, count: int) -> list[InflightDesc]:
        buf_id = self.next_id
        self.next_id += 1
        descs = []
        for k in range(count):
            flags = (AVAIL if self.avail_wrap else USED) | (NEXT if k < count - 1 else 0)
            self.flags[self.avail_pos] = flags
            descs.append(InflightDesc(0x1000 * (buf_id + 1) + k, 512 + k, buf_id, flags))
            self.avail_pos += 1
            if self.avail_pos == self.size:
                self.avail_pos, self.avail_wrap = 0, self.avail_wrap ^ 1
        return descs

    def after_used(self, slots: int) -> tuple[int, int]:
        pos, wrap = self.used_pos + slots, self.used_wrap
        if pos >= self.size:
            pos, wrap = pos - self.size, wrap ^ 1
        return pos, wrap

    def publish(self, slots: int) -> None:
        self.flags[self.used_pos] = (AVAIL | USED) if self.used_wrap else 0
        self.used_pos, self.used_wrap = self.after_used(slots)

    def flags_at(self, pos: int) -> int:
        return self.flags[pos]


class Device:
    """Takes and returns chains through a :class:`PackedInflight`, as the queue layer will."""

    def __init__(self, buf: bytearray, ring: FakePackedRing, qs: int = QS) -> None:
        self.ring = ring
        self.t = PackedInflight(memoryview(buf), qs)

    def take(self, count: int) -> tuple[int, list[InflightDesc]]:
        descs = self.ring.make_available(count)
        return self.t.taken(descs), descs

    def complete(self, entry: int, slots: int, crash: str | None = None) -> None:
        pos, wrap = self.ring.after_used(slots)
        self.t.completing([entry], pos, wrap)
        if crash == "after_completing":
            return
        self.ring.publish(slots)
        if crash == "after_publish":
            return
        self.t.completed([entry])


def packed_region(qs: int = QS) -> bytearray:
    return bytearray(queue_region_size(qs, packed=True))


def packed_entry(buf: bytearray, i: int) -> DescStatePackedRec:
    return PACKED_DESC_STATE.unpack_from(buf, PACKED_QUEUE_REGION.size + i * PACKED_DESC_STATE.size)


def set_packed_entry(buf: bytearray, i: int, name: str, value: int) -> None:
    PACKED_DESC_STATE.field(name).set(
        buf, value, PACKED_QUEUE_REGION.size + i * PACKED_DESC_STATE.size
    )


def never_called(pos: int) -> int:
    raise AssertionError(f"flags_at({pos}) called with no completion in progress")


def test_packed_init_lays_the_region_out_as_dpdk() -> None:
    buf = packed_region()
    buf[:] = b"\xff" * len(buf)
    PackedInflight(memoryview(buf), QS).init()
    assert PACKED_QUEUE_REGION.unpack_from(buf) == QueueRegionPackedRec(0, 1, QS, 0, 0, 0, 0, 1, 1)
    assert [packed_entry(buf, j).next for j in range(QS)] == list(range(1, QS + 1))
    assert all(
        packed_entry(buf, j)._replace(next=0) == DescStatePackedRec(0, 0, 0, 0, 0, 0, 0, 0, 0)
        for j in range(QS)
    )


def test_packed_taken_copies_the_chain_and_moves_the_free_head() -> None:
    buf = packed_region()
    dev = Device(buf, FakePackedRing(QS))
    dev.t.init()
    a, descs_a = dev.take(2)
    b, _ = dev.take(3)
    assert (a, b) == (0, 2)
    head = packed_entry(buf, a)
    assert (head.inflight, head.num, head.last, head.counter) == (1, 2, 1, 0)
    assert [
        InflightDesc(e.addr, e.len, e.id, e.flags)
        for e in map(lambda i: packed_entry(buf, i), (0, 1))
    ] == descs_a
    assert (packed_entry(buf, b).num, packed_entry(buf, b).last, packed_entry(buf, b).counter) == (
        3,
        4,
        1,
    )
    hdr = PACKED_QUEUE_REGION.unpack_from(buf)
    assert (hdr.free_head, hdr.old_free_head) == (5, 5)


def test_packed_completion_frees_the_chain_and_commits_the_used_position() -> None:
    buf = packed_region()
    dev = Device(buf, FakePackedRing(QS))
    dev.t.init()
    a, _ = dev.take(2)
    b, _ = dev.take(3)
    dev.complete(b, 3, crash="after_completing")
    hdr = PACKED_QUEUE_REGION.unpack_from(buf)
    assert (hdr.free_head, hdr.used_idx, hdr.used_wrap_counter) == (b, 3, 1)
    assert (hdr.old_free_head, hdr.old_used_idx, hdr.old_used_wrap_counter) == (5, 0, 1)
    assert packed_entry(buf, 4).next == 5  # the chain's last entry leads to the old free head
    dev.ring.publish(3)
    dev.t.completed([b])
    hdr = PACKED_QUEUE_REGION.unpack_from(buf)
    assert (hdr.old_free_head, hdr.old_used_idx, hdr.old_used_wrap_counter) == (b, 3, 1)
    assert packed_entry(buf, b).inflight == 0
    assert packed_entry(buf, a).inflight == 1


PACKED_CRASH_POINTS = ["after_completing", "after_publish", None]


def packed_scenario(
    buf: bytearray, crash: str | None
) -> tuple[FakePackedRing, list[list[InflightDesc]]]:
    """Chains A (2 descriptors), B (1), C (3) taken; B completed, crashing at ``crash``."""
    ring = FakePackedRing(QS)
    dev = Device(buf, ring)
    dev.t.init()
    _a, descs_a = dev.take(2)
    b, descs_b = dev.take(1)
    _c, descs_c = dev.take(3)
    dev.complete(b, 1, crash)
    return ring, [descs_a, descs_b, descs_c]


@pytest.mark.parametrize("crash", PACKED_CRASH_POINTS)
def test_packed_recovery_after_a_crash_resubmits_exactly_the_unfinished_chains(
    crash: str | None,
) -> None:
    buf = packed_region()
    ring, (descs_a, descs_b, descs_c) = packed_scenario(buf, crash)
    t = PackedInflight(memoryview(buf), QS)
    got = t.recover(ring.flags_at)
    if crash == "after_completing":  # the used descriptor never reached the driver: roll back
        assert got == PackedRecovery(
            (
                InflightChain(0, tuple(descs_a)),
                InflightChain(2, tuple(descs_b)),
                InflightChain(3, tuple(descs_c)),
            ),
            6,
            1,
            0,
            1,
            False,
        )
        assert t.counter == 3
    else:  # published: B is done
        assert got == PackedRecovery(
            (InflightChain(0, tuple(descs_a)), InflightChain(3, tuple(descs_c))), 6, 1, 1, 1, False
        )
        assert packed_entry(buf, 2).inflight == 0
    hdr = PACKED_QUEUE_REGION.unpack_from(buf)
    assert (hdr.free_head, hdr.used_idx, hdr.used_wrap_counter) == (
        hdr.old_free_head,
        hdr.old_used_idx,
        hdr.old_used_wrap_counter,
    )
    # idempotent, and with nothing in progress the ring is not even looked at
    assert PackedInflight(memoryview(buf), QS).recover(never_called) == got


class Crash(Exception):
    """Stands for the back-end dying in the middle of a call."""


class DyingChain(Sequence[tuple[int, int, int, int]]):
    """A chain whose ``die_at``-th descriptor kills the back-end while ``taken`` copies it."""

    def __init__(self, descs: list[InflightDesc], die_at: int) -> None:
        self.descs = descs
        self.die_at = die_at

    def __len__(self) -> int:
        return len(self.descs)

    @overload
    def __getitem__(self, index: int) -> tuple[int, int, int, int]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[int, int, int, int]]: ...
    def __getitem__(
        self, index: int | slice
    ) -> tuple[int, int, int, int] | Sequence[tuple[int, int, int, int]]:
        if isinstance(index, slice):
            return self.descs[index]
        if index == self.die_at:
            raise Crash
        return self.descs[index]


@pytest.mark.parametrize("die_at", [0, 1, 2])
def test_packed_crash_in_the_middle_of_a_take_rolls_it_back(die_at: int) -> None:
    buf = packed_region()
    ring = FakePackedRing(QS)
    dev = Device(buf, ring)
    dev.t.init()
    a, descs_a = dev.take(2)
    with pytest.raises(Crash):
        dev.t.taken(DyingChain(ring.make_available(3), die_at))
    got = PackedInflight(memoryview(buf), QS).recover(ring.flags_at)
    assert got.chains == (InflightChain(a, tuple(descs_a)),)
    assert (got.next_avail, got.avail_wrap) == (2, 1)  # the half-taken chain is read again
    assert PACKED_QUEUE_REGION.unpack_from(buf).free_head == 2


@pytest.mark.parametrize("crash", PACKED_CRASH_POINTS)
def test_packed_recovery_across_the_wrap_and_a_whole_lap_chain(crash: str | None) -> None:
    ring = FakePackedRing(4)
    buf = packed_region(4)
    dev = Device(buf, ring, qs=4)
    dev.t.init()
    for _ in range(3):  # positions 0..2, then wrap: the used position ends on 3 in lap 1
        entry, _ = dev.take(1)
        dev.complete(entry, 1)
    a, _ = dev.take(1)  # position 3
    dev.complete(a, 1)  # used position 0, wrap 0
    big, descs = dev.take(4)  # a chain of the whole ring: positions 0..3 of lap 0
    dev.complete(big, 4, crash)  # used position back to 0, wrap 1
    got = PackedInflight(memoryview(buf), 4).recover(ring.flags_at)
    if crash == "after_completing":
        assert got == PackedRecovery((InflightChain(big, tuple(descs)),), 0, 1, 0, 0, False)
    else:
        assert got == PackedRecovery((), 0, 1, 0, 1, False)


def test_packed_torn_commit_with_the_wrap_flipped_is_committed() -> None:
    ring = FakePackedRing(4)
    buf = packed_region(4)
    dev = Device(buf, ring, qs=4)
    dev.t.init()
    first, _ = dev.take(3)
    dev.complete(first, 3)
    keep, descs_keep = dev.take(1)  # position 3
    done, _ = dev.take(1)  # position 0 of lap 0
    dev.complete(done, 1, crash="after_publish")  # used 3 -> 0 flips the wrap counter
    # the back-end dies inside completed(): old_used_idx copied, old_used_wrap_counter not
    PACKED_QUEUE_REGION.field("old_free_head").set(
        buf, PACKED_QUEUE_REGION.field("free_head").get(buf)
    )
    PACKED_QUEUE_REGION.field("old_used_idx").set(buf, 0)
    got = PackedInflight(memoryview(buf), 4).recover(ring.flags_at)
    assert got.chains == (InflightChain(keep, tuple(descs_keep)),)
    assert (got.next_used, got.used_wrap, got.next_avail, got.avail_wrap) == (0, 0, 1, 0)


def test_packed_recovery_of_a_fresh_region_initialises_it_at_the_given_position() -> None:
    buf = packed_region()
    got = PackedInflight(memoryview(buf), QS).recover(never_called, used_idx=5, used_wrap=0)
    assert got == PackedRecovery((), 5, 0, 5, 0, True)
    assert PACKED_QUEUE_REGION.unpack_from(buf) == QueueRegionPackedRec(0, 1, QS, 0, 0, 5, 5, 0, 0)


def test_packed_work_goes_on_after_recovery() -> None:
    buf = packed_region()
    ring, (_a, _b, descs_c) = packed_scenario(buf, "after_publish")
    dev = Device(buf, ring)
    got = dev.t.recover(ring.flags_at)
    assert [c.entry for c in got.chains] == [0, 3]
    dev.complete(0, 2)  # the resubmitted A is done
    d, descs_d = dev.take(2)
    got = PackedInflight(memoryview(buf), QS).recover(never_called)
    assert got.chains == (InflightChain(3, tuple(descs_c)), InflightChain(d, tuple(descs_d)))
    assert (got.next_used, got.used_wrap, got.next_avail, got.avail_wrap) == (
        3,
        1,
        0,
        0,
    )  # 3 + 5 wraps


def test_packed_hot_path_misuse() -> None:
    buf = packed_region()
    dev = Device(buf, FakePackedRing(QS))
    dev.t.init()
    a, _ = dev.take(QS)
    with pytest.raises(InflightError, match="no free entry"):
        dev.take(1)
    with pytest.raises(InflightError, match="chain of 0"):
        dev.t.taken([])
    with pytest.raises(InflightError, match=f"entry {QS}"):
        dev.t.completing([QS], 0, 1)
    dev.t.completing([a], 0, 0)
    with pytest.raises(DeviceUsageError, match="between completing"):
        dev.t.taken([(0, 0, 0, 0)])
    with pytest.raises(DeviceUsageError, match="twice"):
        dev.t.completing([a], 0, 0)
    dev.t.completed([a])
    assert dev.t.taken([(1, 2, 3, 4)]) == a


def test_packed_hot_path_never_reads_the_region() -> None:
    buf = packed_region()
    dev = Device(buf, FakePackedRing(QS))
    dev.t.init()
    a, _ = dev.take(2)
    buf[:] = random.Random(2).randbytes(len(buf))  # a front-end scribbles while we run
    b, _ = dev.take(1)
    dev.complete(a, 2)
    assert b == 2
    hdr = PACKED_QUEUE_REGION.unpack_from(buf)
    assert (hdr.free_head, hdr.old_free_head, hdr.used_idx, hdr.old_used_idx) == (a, a, 2, 2)
    assert packed_entry(buf, 1).next == 3


# --- packed: hostile regions ---------------------------------------------------------------------


def packed_hostile_base() -> tuple[bytearray, FakePackedRing]:
    """A (entries 0, 1) and C (3, 4, 5) in flight; B (entry 2) completed; free list 2 -> 6 -> 7."""
    buf = packed_region()
    ring, _ = packed_scenario(buf, None)
    return buf, ring


def test_packed_hostile_base_is_valid() -> None:
    buf, ring = packed_hostile_base()
    got = PackedInflight(memoryview(buf), QS).recover(ring.flags_at)
    assert [c.entry for c in got.chains] == [0, 3]


PackedCorruption = Callable[[bytearray], int | None]  # -> ring size


def _phdr(name: str, value: int) -> PackedCorruption:
    def corrupt(buf: bytearray) -> int | None:
        PACKED_QUEUE_REGION.field(name).set(buf, value)
        return None

    return corrupt


def _pentry(*changes: tuple[int, str, int], ring: int | None = None) -> PackedCorruption:
    def corrupt(buf: bytearray) -> int | None:
        for i, name, value in changes:
            set_packed_entry(buf, i, name, value)
        return ring

    return corrupt


PACKED_HOSTILE: dict[str, tuple[PackedCorruption, str]] = {
    "version 7": (_phdr("version", 7), "version 7"),
    "desc_num not the queue size": (_phdr("desc_num", 4), "desc_num 4"),
    "free_head past the end": (_phdr("free_head", QS + 1), "free_head 9"),
    "old_free_head past the end": (_phdr("old_free_head", 0xFFFF), "old_free_head 65535"),
    "used_idx past the ring": (_phdr("used_idx", QS), "used_idx 8"),
    "old_used_idx past the ring": (_phdr("old_used_idx", 0x8000), "old_used_idx 32768"),
    "wrap counter 2": (_phdr("used_wrap_counter", 2), "used_wrap_counter 2"),
    "old wrap counter 0xff": (_phdr("old_used_wrap_counter", 0xFF), "old_used_wrap_counter 255"),
    "free list cycle": (_pentry((7, "next", 2)), "loops back to entry 2"),
    "free list self-loop": (_pentry((6, "next", 6)), "loops back to entry 6"),
    "free list leaves the queue": (_pentry((6, "next", QS + 4)), "leads to entry 12"),
    "free list ends early (a leaked entry)": (
        _pentry((6, "next", QS)),
        "neither free nor in a chain",
    ),
    "chain num 0": (_pentry((0, "num", 0)), "num 0"),
    "chain num past the queue": (_pentry((3, "num", QS + 1)), "num 9"),
    "chain leaves the queue": (_pentry((3, "next", 0xFFFF)), "leads to entry 65535"),
    "chain does not end at last": (_pentry((0, "last", 5)), "its last says 5"),
    "chain holds a free entry": (_pentry((0, "next", 2)), "holds free entry 2"),
    "chains share an entry": (_pentry((4, "next", 1)), "already in a chain"),
    "chain loops on itself": (_pentry((4, "next", 3)), "already in a chain"),
    "a second head inside a chain": (
        _pentry((4, "inflight", 1), (4, "counter", 77), (4, "num", 2), (4, "last", 5)),
        "already in a chain",
    ),
    "inflight 3": (_pentry((0, "inflight", 3)), "inflight 3"),
    "duplicate counters": (_pentry((3, "counter", 0)), "same counter 0"),
    "counter at its maximum": (_pentry((3, "counter", (1 << 64) - 1)), "no room"),
    "more descriptors in flight than the ring": (_pentry(ring=4), "5 descriptors in flight"),
    "ring larger than the region": (_pentry(ring=QS + 1), "ring of 9"),
}


@pytest.mark.parametrize("case", PACKED_HOSTILE)
def test_packed_hostile_region_raises_inflight_error(case: str) -> None:
    corrupt, message = PACKED_HOSTILE[case]
    buf, ring = packed_hostile_base()
    ring_size = corrupt(buf)
    before = bytes(buf)
    with pytest.raises(InflightError, match=message):
        PackedInflight(memoryview(buf), QS, name="ring 1").recover(
            ring.flags_at, ring_size=ring_size
        )
    assert buf == before  # a refused region is left as it was


# --- several queues, and the mapping's lifetime --------------------------------------------------


@pytest.mark.parametrize("packed", [False, True])
def test_queues_stay_inside_their_own_region(packed: bool) -> None:
    qs = 16
    buf = bytearray(region_size(3, qs, packed=packed))
    stride = check_region(len(buf), 3, qs, packed=packed)
    view = memoryview(buf)
    middle = view[stride : 2 * stride]
    trackers: list[SplitInflight | PackedInflight] = []
    for q in range(3):
        part = view[q * stride : (q + 1) * stride]
        tracker = PackedInflight(part, qs) if packed else SplitInflight(part, qs)
        tracker.init()
        trackers.append(tracker)
    before = bytes(middle)
    for q in (0, 2):
        tracker = trackers[q]
        for k in range(qs):
            if isinstance(tracker, PackedInflight):
                tracker.taken([(k, k, k, k)])
            else:
                tracker.taken(k)
        if isinstance(tracker, PackedInflight):
            with pytest.raises(InflightError):
                tracker.completing([qs], 0, 0)
        else:
            with pytest.raises(InflightError):
                tracker.completing([qs])
    assert bytes(middle) == before


def test_release_lets_the_owner_unmap() -> None:
    size = queue_region_size(QS, packed=True)
    with mmap.mmap(-1, size) as mm:
        t = PackedInflight(memoryview(mm), QS)
        t.init()
        t.release()
        s = SplitInflight(memoryview(mm), QS)
        s.release()
    assert mm.closed


# --- random histories and fuzz -----------------------------------------------------------------


def split_history(rng: random.Random) -> tuple[bytearray, int, int, SplitRecovery]:
    """A random run of takes and batches of completions ending in a crash at a random point.
    Returns the region, its queue size, the guest's used index, and what recovery must find."""
    qs = rng.choice([1, 2, 4, 8])
    buf = split_region(qs)
    t = SplitInflight(memoryview(buf), qs)
    used = rng.randrange(1 << 16)
    t.init(used)
    in_flight: list[int] = []  # in take order
    for _ in range(rng.randrange(12)):
        free = [h for h in range(qs) if h not in in_flight]
        if free and (not in_flight or rng.random() < 0.6):
            head = rng.choice(free)
            t.taken(head)
            in_flight.append(head)
            continue
        batch = rng.sample(in_flight, rng.randint(1, len(in_flight)))
        t.completing(batch)
        crash = rng.choice(["after_completing", "after_used_idx", None, None, None])
        if crash != "after_completing":
            used = (used + len(batch)) & 0xFFFF
            in_flight = [h for h in in_flight if h not in batch]
            if crash is None:
                t.completed(batch, used)
        if crash:
            break
    return buf, qs, used, SplitRecovery(tuple(in_flight), (used + len(in_flight)) & 0xFFFF, False)


def packed_history(rng: random.Random) -> tuple[bytearray, int, FakePackedRing, PackedRecovery]:
    """The packed counterpart of :func:`split_history` (chains of 1..3 descriptors, completed out
    of order, the crash possibly in the middle of a take)."""
    qs = rng.choice([1, 2, 3, 4, 8])
    buf = packed_region(qs)
    ring = FakePackedRing(qs)
    dev = Device(buf, ring, qs=qs)
    dev.t.init()
    in_flight: list[InflightChain] = []
    for _ in range(rng.randrange(12)):
        room = qs - sum(len(c.descs) for c in in_flight)
        if room and (not in_flight or rng.random() < 0.6):
            count = rng.randint(1, min(room, 3))
            if rng.random() < 0.1:  # dies while copying the chain
                with pytest.raises(Crash):
                    dev.t.taken(DyingChain(ring.make_available(count), rng.randrange(count)))
                break
            entry, descs = dev.take(count)
            in_flight.append(InflightChain(entry, tuple(descs)))
            continue
        chain = rng.choice(in_flight)
        crash = rng.choice(["after_completing", "after_publish", None, None, None])
        dev.complete(chain.entry, len(chain.descs), crash)
        if crash != "after_completing":
            in_flight.remove(chain)
        if crash:
            break
    slots = sum(len(c.descs) for c in in_flight)
    avail, avail_wrap = ring.after_used(slots)
    expect = PackedRecovery(
        tuple(in_flight), avail, avail_wrap, ring.used_pos, ring.used_wrap, False
    )
    return buf, qs, ring, expect


def test_random_split_histories_recover_exactly_what_was_in_flight() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        buf, qs, used, expect = split_history(rng)
        assert SplitInflight(memoryview(buf), qs).recover(used) == expect


def test_random_packed_histories_recover_exactly_what_was_in_flight() -> None:
    rng = random.Random(8)
    for _ in range(2000):
        buf, qs, ring, expect = packed_history(rng)
        assert PackedInflight(memoryview(buf), qs).recover(ring.flags_at) == expect


def mutate(rng: random.Random, buf: bytearray) -> None:
    """Either random bytes all over, or a few bytes of a valid region changed."""
    if rng.random() < 0.2:
        buf[:] = rng.randbytes(len(buf))
        return
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(buf))
        buf[at] = rng.choice([0, 1, 2, 3, 7, 8, 0x80, 0xFF, rng.randrange(256)])


def test_fuzz_split_recover_raises_only_inflight_error_and_is_idempotent() -> None:
    rng = random.Random(20261206)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(3000):
        buf, qs, used, _expect = split_history(rng)
        mutate(rng, buf)
        if rng.random() < 0.2:
            used = rng.randrange(1 << 16)
        before = bytes(buf)
        try:
            got = SplitInflight(memoryview(buf), qs).recover(used)
        except InflightError:
            outcomes["refused"] += 1
            assert buf == before
            continue
        outcomes["ok"] += 1
        assert len(set(got.heads)) == len(got.heads)
        assert all(0 <= h < qs for h in got.heads)
        assert got.next_avail == (used + len(got.heads)) & 0xFFFF
        again = SplitInflight(memoryview(buf), qs).recover(used)
        assert again == got._replace(fresh=False)  # a fresh region was initialised by the first
    assert min(outcomes.values()) > 300, outcomes  # both ways were exercised


def constant(flags: int) -> Callable[[int], int]:
    def flags_at(pos: int) -> int:
        return flags

    return flags_at


def test_fuzz_packed_recover_raises_only_inflight_error_and_is_idempotent() -> None:
    rng = random.Random(12)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(3000):
        buf, qs, ring, _expect = packed_history(rng)
        mutate(rng, buf)
        flags_at = ring.flags_at if rng.random() < 0.5 else constant(rng.randrange(1 << 16))
        before = bytes(buf)
        try:
            got = PackedInflight(memoryview(buf), qs).recover(flags_at)
        except InflightError:
            outcomes["refused"] += 1
            assert buf == before
            continue
        outcomes["ok"] += 1
        entries = [c.entry for c in got.chains]
        assert len(set(entries)) == len(entries)
        slots = sum(len(c.descs) for c in got.chains)
        assert slots <= qs
        assert got.next_avail + qs * (got.avail_wrap != got.used_wrap) - got.next_used == slots
        again = PackedInflight(memoryview(buf), qs).recover(never_called)
        assert again == got._replace(fresh=False)
    assert min(outcomes.values()) > 300, outcomes
