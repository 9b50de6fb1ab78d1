"""The live-migration dirty log (:mod:`virtio_schema.vhost_user.dirty_log`) and the queues that
mark it (``set_dirty_log``), both ring formats.

The migration test plays the front-end's part in memory: it copies guest memory to a
"destination" once, then, round after round while the device goes on writing, copies again the
pages the log marks (clearing their bits, as QEMU does), and a last time after the device
stopped. The destination must then equal the source byte for byte. Its negative twin runs the
same migration with the device's data writes left out of the log, and the destination must
differ: the check can fail.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable

import pytest

from virtio_schema.chain import WritableChain
from virtio_schema.fake_queue import FakeDriver, FakeMemory, make_queue
from virtio_schema.vhost_user.dirty_log import PAGE_SIZE, DirtyLog

# --- the bitmap -------------------------------------------------------------------------------------


def bits(log: bytearray) -> list[int]:
    """The pages whose bits are set."""
    return [p for p in range(8 * len(log)) if log[p >> 3] >> (p & 7) & 1]


@pytest.mark.parametrize(
    ("addr", "length", "pages"),
    [
        (0, 1, [0]),
        (PAGE_SIZE - 1, 2, [0, 1]),  # one byte each side of a page boundary
        (3 * PAGE_SIZE, PAGE_SIZE, [3]),
        (5 * PAGE_SIZE + 7, 20 * PAGE_SIZE, list(range(5, 26))),  # whole bytes in the middle
        (0, 0, []),
    ],
)
def test_a_mark_sets_exactly_the_bits_of_the_pages_written(
    addr: int, length: int, pages: list[int]
) -> None:
    raw = bytearray(8)
    log = DirtyLog(memoryview(raw))
    log.mark(addr, length)
    assert bits(raw) == pages


def test_a_mark_keeps_the_bits_already_set_and_the_front_ends_clears() -> None:
    raw = bytearray(2)
    log = DirtyLog(memoryview(raw))
    log.mark(0, 1)
    raw[0] = 0  # the front-end copied page 0 and cleared its bit
    log.mark(2 * PAGE_SIZE, 1)
    log.mark(PAGE_SIZE, 1)
    assert bits(raw) == [1, 2]


def test_a_mark_past_the_end_of_the_log_writes_nothing_outside_it_and_is_counted() -> None:
    backing = bytearray(4)
    raw = memoryview(backing)[:2]  # a 2-byte log inside a larger buffer: 16 pages
    log = DirtyLog(raw)
    log.mark(15 * PAGE_SIZE, 3 * PAGE_SIZE)  # pages 15..17: 16 and 17 are past the end
    log.mark(100 * PAGE_SIZE, 1)
    assert bits(backing) == [15]
    assert backing[2:] == b"\0\0"
    assert log.missed == 2


def test_covers_says_whether_every_page_below_an_address_has_a_bit() -> None:
    log = DirtyLog(memoryview(bytearray(2)))  # 16 pages
    assert log.covers(16 * PAGE_SIZE)
    assert not log.covers(16 * PAGE_SIZE + 1)


# --- a migration, played in memory ----------------------------------------------------------------

RAM = 1 << 20
RAM_BASE = 0x10000
SIZE = 16


class RingsOnly:
    """A back-end that skips logging the data writes: only the ring areas reach the log."""

    def __init__(self, log: DirtyLog, rings: list[tuple[int, int]]) -> None:
        self.log = log
        self.rings = rings

    def mark(self, addr: int, length: int) -> None:
        if (addr, length) in self.rings:
            self.log.mark(addr, length)


def _migrate(*, packed: bool, log_data: bool) -> tuple[bytes, bytes]:
    """Serve chains that write random amounts (across page boundaries, through ``write`` and
    ``write_from_fd``) while a migration runs; return (source, destination) at the end."""
    ram = bytearray(RAM)
    memory = FakeMemory.over([(RAM_BASE, ram)])
    fq = make_queue(SIZE, packed=packed, memory=memory)
    queue, driver = fq.queue, fq.driver
    qm = driver.queue_memory()
    areas = [qm.used] if isinstance(driver, FakeDriver) else [qm.desc, qm.used]
    rings = []
    for area in areas:
        assert area.driver_range is not None
        rings.append((area.driver_range.start, len(area)))
    raw = bytearray((RAM_BASE + RAM) // PAGE_SIZE // 8 + 1)
    log = DirtyLog(memoryview(raw))
    dest = bytearray(ram)  # the first full copy, taken as logging starts
    queue.set_dirty_log(log if log_data else RingsOnly(log, rings), rings)
    rng = random.Random(packed)

    guest_dirty: set[int] = set()  # what the front-end tracks itself: the guest's own writes

    def as_guest(action: Callable[[], object]) -> None:
        before = bytes(ram)
        action()
        for at in range(0, RAM, PAGE_SIZE):
            if ram[at : at + PAGE_SIZE] != before[at : at + PAGE_SIZE]:
                guest_dirty.add((RAM_BASE + at) // PAGE_SIZE)

    def copy_dirty() -> None:
        for page in {*bits(raw), *guest_dirty}:
            raw[page >> 3] &= ~(1 << (page & 7)) & 0xFF
            at = page * PAGE_SIZE - RAM_BASE
            dest[at : at + PAGE_SIZE] = ram[at : at + PAGE_SIZE]
        guest_dirty.clear()

    with tempfile.TemporaryFile() as f:
        f.write(rng.randbytes(64 << 10))
        f.flush()
        for _ in range(6):  # rounds of the front-end's copy, the device writing in between
            for _ in range(5):
                lens = [rng.randrange(1, 9000) for _ in range(rng.randrange(1, 4))]
                as_guest(lambda: driver.publish([], lens))  # noqa: B023 - called at once
                chain = queue.next_chain()
                assert chain is not None
                with chain:
                    writer = WritableChain(chain)
                    n = rng.randrange(0, chain.writable_len + 1)
                    if n and rng.random() < 0.5:
                        writer.write_from_fd(f.fileno(), 0, n)
                    else:
                        writer.write(rng.randbytes(n))
            as_guest(driver.used)
            copy_dirty()
        queue.log_rings()  # the stop (GET_VRING_BASE) marks the rings a last time
        copy_dirty()
    return bytes(ram), bytes(dest)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_migration_copies_every_byte_the_device_wrote(packed: bool) -> None:
    source, dest = _migrate(packed=packed, log_data=True)
    assert source == dest


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_without_the_data_writes_in_the_log_the_destination_differs(packed: bool) -> None:
    """The negative check of the log: the same migration, the chains' data left unlogged."""
    source, dest = _migrate(packed=packed, log_data=False)
    assert source != dest
