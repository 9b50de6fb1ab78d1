"""The fields a driver polls change in one store, never through a zero.

A real driver polls ``used.idx`` (split) or a descriptor's flags (packed) on another CPU while
the device writes them. ``struct.pack_into`` zeroes its target before writing the value, and DPDK's
virtio-user driver read that zero: ``used.idx`` at 0 looks like 65535 new used elements to it, and a
packed descriptor's flags at 0 look "used" on a wrap-0 lap, so the driver re-armed the slot and
the device's second store then overwrote the re-arm (issue #10: a phantom lap of 65536 frames on
split, a stalled receive queue on packed). See ``virtio_schema.mem``, rule 3.

Here the rings live in a shared mapping. A watcher PROCESS (its own interpreter, so the GIL does
not serialise it with the device) reads the watched word in a tight loop while the device serves
chains as fast as it can, and reports every value no correct store sequence can produce. With the
old ``pack_into`` stores both tests fail within a fraction of a second on a 2-CPU machine; on one
CPU the watcher rarely runs inside a store and the tests can only pass. Nothing here asserts speed.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtio_schema.mem import DeviceRange, DriverRange, GuestMemory
from virtio_schema.queue import QueueMemory, create_queue
from virtio_schema.schema import Feature, PackedDescFlags
from virtio_schema.util import NotificationCounter

SIZE = 8
DESC, AVAIL, USED, BUFS = 0x0, 0x1000, 0x2000, 0x3000
STOP = 0x7000  # a byte the test sets to end the watcher
READY = 0x7001  # the watcher sets it once it polls
MAP_SIZE = 0x8000
CHAINS = 200_000
DEADLINE_S = 20.0

WATCHER = r"""
import mmap, sys
path, word, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(path, "r+b") as f:
    mm = mmap.mmap(f.fileno(), 0)
view = memoryview(mm)
words = view.cast("H")
legal = {0x0082, 0x8082, 0x8002, 0x0002}  # packed, writable chain: avail/used, wraps 1 and 0
last = words[word]
changes = bad = 0
seen = []
view[0x7001] = 1
while not view[0x7000]:
    value = words[word]
    if value != last:
        changes += 1
        if mode == "split":
            wrong = ((value - last) & 0xFFFF) >= 0x8000  # used.idx stepped backwards
        else:
            wrong = last in legal and value not in legal
        if wrong:
            bad += 1
            if len(seen) < 5:
                seen.append(f"{last:#06x}->{value:#06x}")
        last = value
print(changes, bad, " ".join(seen))
"""


@pytest.fixture
def shared() -> Iterator[tuple[Path, mmap.mmap]]:
    with tempfile.TemporaryDirectory(
        prefix="vs-store-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    ) as d:
        path = Path(d) / "ring"
        path.write_bytes(bytes(MAP_SIZE))
        with open(path, "r+b") as f:
            mm = mmap.mmap(f.fileno(), 0)
        try:
            yield path, mm
        finally:
            mm.close()


@dataclass
class Watch:
    """What the watcher process saw, once it has stopped."""

    changes: int = 0
    bad: int = 0
    seen: str = ""

    def check(self, what: str) -> None:
        assert self.changes > 0, "the watcher saw no store at all"
        assert self.bad == 0, f"{self.bad} of {self.changes} {what}: {self.seen}"


@contextmanager
def _watching(path: Path, view: memoryview, word: int, mode: str) -> Iterator[Watch]:
    """The watcher polls 16-bit ``word`` of the mapping for the body of the ``with`` block; the
    :class:`Watch` is filled when the block ends (it is stopped then, whatever happened)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHER, str(path), str(word), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watch = Watch()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not view[READY]:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "watcher died"
            assert time.monotonic() < deadline, "the watcher did not start"
            time.sleep(0.01)
        yield watch
    finally:
        view[STOP] = 1
        try:
            out, err = proc.communicate(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("the watcher did not stop") from None
    assert proc.returncode == 0, err
    changes, bad, *seen = out.split(maxsplit=2)
    watch.changes, watch.bad, watch.seen = int(changes), int(bad), " ".join(seen)


def _queue_memory(mem: GuestMemory, used_len: int) -> QueueMemory:
    def area(addr: int, length: int) -> DeviceRange:
        dr = mem.translate(DriverRange.from_addr_len(addr, length))
        assert dr is not None
        return dr

    return QueueMemory(area(DESC, 16 * SIZE), area(AVAIL, 6 + 2 * SIZE), area(USED, used_len))


def test_split_used_idx_never_steps_back_while_a_driver_polls_it(
    shared: tuple[Path, mmap.mmap],
) -> None:
    path, mm = shared
    view = memoryview(mm)
    words = view.cast("H")
    for i in range(SIZE):  # one writable 64-byte buffer per descriptor, all made available at once
        off = DESC + 16 * i
        view[off : off + 16] = (
            (BUFS + 64 * i).to_bytes(8, "little")
            + (64).to_bytes(4, "little")
            + int(PackedDescFlags.WRITE).to_bytes(2, "little")
            + bytes(2)
        )
    mem = GuestMemory([(0, mm)])
    try:
        queue = create_queue(
            _queue_memory(mem, 6 + 8 * SIZE),
            SIZE,
            mem,
            features=int(Feature.VERSION_1),
            notify=NotificationCounter(),
        )
        with _watching(path, view, (USED + 2) // 2, "split") as watch:
            avail_idx = 0
            served = 0
            deadline = time.monotonic() + DEADLINE_S
            while served < CHAINS and time.monotonic() < deadline:
                for k in range(SIZE):  # the driver re-offers every head (the test is the driver)
                    words[(AVAIL + 4) // 2 + (avail_idx + k) % SIZE] = k
                avail_idx = (avail_idx + SIZE) & 0xFFFF
                words[(AVAIL + 2) // 2] = avail_idx
                while (chain := queue.next_chain()) is not None:
                    chain.return_written(8)
                    served += 1
        assert served >= CHAINS // 10, "the device loop barely ran"
        assert words[(USED + 2) // 2] == served & 0xFFFF
    finally:
        words.release()
        view.release()
        mem.close()
    watch.check("used.idx changes went backwards")


def test_packed_used_flags_never_pass_through_zero_while_a_driver_polls_them(
    shared: tuple[Path, mmap.mmap],
) -> None:
    path, mm = shared
    view = memoryview(mm)
    words = view.cast("H")
    write, avail_bit, used_bit = (
        int(f) for f in (PackedDescFlags.WRITE, PackedDescFlags.AVAIL, PackedDescFlags.USED)
    )

    def arm(wrap: bool) -> None:
        """The driver offers every slot for the lap of ``wrap`` (fields first, then the flags)."""
        flags = write | (avail_bit if wrap else used_bit)
        for i in range(SIZE):
            off = DESC + 16 * i
            view[off : off + 14] = (
                (BUFS + 64 * i).to_bytes(8, "little")
                + (64).to_bytes(4, "little")
                + i.to_bytes(2, "little")
            )
            words[(off + 14) // 2] = flags

    arm(True)
    mem = GuestMemory([(0, mm)])
    try:
        queue = create_queue(
            _queue_memory(mem, 4),
            SIZE,
            mem,
            features=int(Feature.VERSION_1 | Feature.RING_PACKED),
            notify=NotificationCounter(),
        )
        with _watching(path, view, (DESC + 14) // 2, "packed") as watch:
            served = 0
            wrap = True
            deadline = time.monotonic() + DEADLINE_S
            while served < CHAINS and time.monotonic() < deadline:
                n = 0
                while (chain := queue.next_chain()) is not None:
                    chain.return_written(8)
                    n += 1
                assert n == SIZE, f"a lap gave {n} chains"
                served += n
                wrap = not wrap
                arm(wrap)
        assert served >= CHAINS // 10, "the device loop barely ran"
    finally:
        words.release()
        view.release()
        mem.close()
    watch.check("flag changes passed through an illegal value")
