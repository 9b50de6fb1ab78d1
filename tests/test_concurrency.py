"""Concurrency tests of the device side: a driver thread that rewrites the rings while the device
uses them, and kicks that race the asyncio chain stream.

What a device author relies on here:

* Time of check / time of use (docs/threat_model.rst: every descriptor is read once, as a whole
  record, and validated before use; no value read from guest memory is trusted twice): while a
  driver thread rewrites descriptors, indirect tables, avail ring entries and ``avail.idx`` in a
  tight loop, the device thread only ever sees :class:`~virtio_schema.errors.VirtioError`\\ s, never
  hangs, and writes nothing but the used ring and the buffers the driver offered as writable
  (canary bytes around every buffer prove it).
* :class:`~virtio_schema.util.DescChainStream` delivers every chain exactly once when several
  threads publish and kick at once, and never loses a wake-up when a kick races the consumer's
  empty check
  (the scenario is repeated, with different pacing, to give the race many chances).

Threads are always joined with a timeout in a ``finally`` block, and every wait is bounded, so a
hang fails the test instead of blocking the run. Nothing here asserts speed.
"""

from __future__ import annotations

import asyncio
import random
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from virtio_schema.chain import ReadableChain, WritableChain
from virtio_schema.errors import VirtioError
from virtio_schema.fake_queue import FakeDriver, FakeMemory, FakeQueue, make_queue
from virtio_schema.queue import DescChain, Queue, QueueBroken, QueueState
from virtio_schema.records import BLK_REQ_HDR
from virtio_schema.schema import DescFlags, Feature
from virtio_schema.util import DescChainStream

NEXT = int(DescFlags.NEXT)
WRITE = int(DescFlags.WRITE)
INDIRECT = int(DescFlags.INDIRECT)
F_INDIRECT = int(Feature.INDIRECT_DESC)
F_EVENT_IDX = int(Feature.EVENT_IDX)
TOP = 1 << 64

JOIN_TIMEOUT = 30.0
"""Bound on joining a thread or waiting for a result: a hang fails; speed is never asserted."""

RAW_DESC = struct.Struct("<QLHH")
U16 = struct.Struct("<H")


@contextmanager
def fine_thread_switching() -> Iterator[None]:
    """Switch threads every 20 us instead of every 5 ms, so the racing threads interleave at many
    more points (the setting is process-wide: restored on exit)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(2e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def join_all(threads: list[threading.Thread]) -> list[str]:
    """Join every thread with a timeout; the names of those still running (hung)."""
    for t in threads:
        t.join(JOIN_TIMEOUT)
    return [t.name for t in threads if t.is_alive()]


# --- time of check / time of use ------------------------------------------------------------------

BASE = 0x10000
MEM_SIZE = 1 << 18
END = BASE + MEM_SIZE
GUARD = 32
CANARY = 0xA5
"""Fills every byte nobody owns. As a descriptor, canary bytes read as flags 0xA5A5 =
NEXT|INDIRECT (never WRITE): a table that runs into a guard only yields a nested-indirect error."""
BUF_LEN = 64
TABLE_ENTRIES = 6
RUN_TIME = 2.0


@dataclass
class Guest:
    """Guest memory laid out for the race: rings, guarded buffers and tables, canaries elsewhere."""

    fq: FakeQueue[Queue, FakeDriver]
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    tables: list[int]

    @property
    def mem(self) -> FakeMemory:
        return self.fq.memory

    @property
    def buf(self) -> bytearray:
        return self.fq.memory.buffers[0]

    def off(self, addr: int) -> int:
        return addr - BASE

    @property
    def used_ring(self) -> tuple[int, int]:
        return (self.fq.driver.used_addr, 6 + 8 * self.fq.queue.size)

    @property
    def driver_areas(self) -> list[tuple[int, int]]:
        """What the driver thread rewrites: descriptor table, avail ring, indirect tables."""
        size = self.fq.queue.size
        d = self.fq.driver
        return [
            (d.desc_addr, 16 * size),
            (d.avail_addr, 6 + 2 * size),
            *[(t, 16 * TABLE_ENTRIES) for t in self.tables],
        ]


def build_guest(size: int, features: int, rng: random.Random) -> Guest:
    mem = FakeMemory(MEM_SIZE, base=BASE)
    mem.buffers[0][:] = bytes([CANARY]) * MEM_SIZE
    fq = make_queue(size, features=features, memory=mem)  # the rings are zeroed by the allocator

    def guarded(content: bytes) -> int:
        block = mem.alloc(len(content) + 2 * GUARD, 16)
        mem.write(block, bytes([CANARY]) * (len(content) + 2 * GUARD))
        mem.write(block + GUARD, content)
        return block + GUARD

    readable = [(guarded(rng.randbytes(BUF_LEN)), BUF_LEN) for _ in range(6)]
    writable = [(guarded(bytes(BUF_LEN)), BUF_LEN) for _ in range(6)]
    tables = [guarded(bytes(16 * TABLE_ENTRIES)) for _ in range(3)]
    return Guest(fq, readable, writable, tables)


class HostileDriverThread(threading.Thread):
    """Rewrites descriptors, table entries, avail slots and ``avail.idx`` as fast as it can.

    Every record is written with ONE ``struct.pack_into`` (as a real driver writes a descriptor
    before publishing it; the test is about values changing between reads, not torn records), into
    guest memory and into a shadow copy, so the test can tell afterwards that the device wrote none
    of these areas. The values are chosen so that every device-WRITABLE range the driver ever
    names inside guest memory lies inside one of the writable buffers; everything else it names is
    readable, or unmapped, or malformed.
    """

    def __init__(self, guest: Guest, seed: int, stop: threading.Event) -> None:
        super().__init__(name="hostile-driver", daemon=True)
        self.g = guest
        self.rng = random.Random(seed)
        self.stop = stop
        self.shadow = bytearray(guest.buf)
        self.failures: list[BaseException] = []
        self.writes = 0
        self.idx = 0

    def put(self, packer: struct.Struct, addr: int, *values: int) -> None:
        off = self.g.off(addr)
        packer.pack_into(self.g.buf, off, *values)
        packer.pack_into(self.shadow, off, *values)
        self.writes += 1

    def descriptor(self) -> tuple[int, int, int, int]:
        r, g = self.rng, self.g
        size = g.fq.queue.size
        nxt = r.randrange(size + 1) if r.random() < 0.9 else r.randrange(0x10000)
        more = NEXT if r.random() < 0.6 else 0
        kind = r.random()
        if kind < 0.25:  # readable buffer
            addr, n = r.choice(g.readable)
            off = r.randrange(n)
            return addr + off, r.randrange(n - off + 1), more, nxt
        if kind < 0.5:  # writable buffer: always inside one
            addr, n = r.choice(g.writable)
            off = r.randrange(n)
            return addr + off, r.randrange(n - off + 1), WRITE | more, nxt
        if kind < 0.6:  # readable, anywhere in memory (reading canaries harms nobody)
            addr = r.randrange(BASE, END)
            return addr, r.choice([0, 1, 16, END - addr, END - addr + 1]), more, nxt
        if kind < 0.75:  # indirect table, good and bad lengths
            length = r.choice(
                [0, 8, 16, 17, 48, 16 * TABLE_ENTRIES, 1 << 20, 65536 * 16, (1 << 32) - 16]
            )
            return r.choice(g.tables), length, INDIRECT | r.choice([0, 0, NEXT, WRITE]), nxt
        # garbage: any flags, any length, at addresses the device cannot reach
        addr = r.choice(
            [0, BASE - 1, END, END + r.randrange(1 << 20), TOP - 1, TOP - 8, r.randrange(END, TOP)]
        )
        length = r.choice([0, 1, 16, 1 << 31, (1 << 32) - 1, r.randrange(1 << 32)])
        return addr, length, r.randrange(0x10000), nxt

    def step(self) -> None:
        r, g = self.rng, self.g
        size = g.fq.queue.size
        d = g.fq.driver
        op = r.random()
        if op < 0.4:
            self.put(RAW_DESC, d.desc_addr + 16 * r.randrange(size), *self.descriptor())
        elif op < 0.55:
            entry = r.randrange(TABLE_ENTRIES)
            self.put(RAW_DESC, r.choice(g.tables) + 16 * entry, *self.descriptor())
        elif op < 0.75:
            head = r.randrange(size) if r.random() < 0.99 else r.randrange(0x10000)
            self.put(U16, d.avail_addr + 4 + 2 * r.randrange(size), head)
        elif op < 0.97:
            # publish like a driver (never more than size in flight, judged by used.idx), but now
            # and then move the index backwards or jump
            used_idx: int = U16.unpack_from(g.buf, g.off(d.used_addr) + 2)[0]
            misstep = r.random()
            if misstep < 0.005:
                self.idx = r.randrange(0x10000)
            elif misstep < 0.01:
                self.idx = (self.idx - 1) & 0xFFFF
            elif (self.idx + 1 - used_idx) & 0xFFFF <= size:
                self.idx = (self.idx + 1) & 0xFFFF
            elif (self.idx - used_idx) & 0xFFFF > size:  # back in line after a misstep
                self.idx = (used_idx + r.randrange(size + 1)) & 0xFFFF
            self.put(U16, d.avail_addr + 2, self.idx)
        else:  # flags and used_event
            self.put(U16, d.avail_addr, r.randrange(0x10000))
            self.put(U16, d.avail_addr + 4 + 2 * size, r.randrange(0x10000))

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
        except BaseException as error:  # reported by the test
            self.failures.append(error)


@dataclass
class DeviceStats:
    outcomes: Counter[str] = field(default_factory=Counter)
    published: int = 0
    """Returns that reached the used ring (queue not broken, chain from the current generation)."""
    bytes_written: int = 0


class DeviceThread(threading.Thread):
    """Takes, reads, writes and returns chains (holding up to a few, returning in any order) until
    stopped; on a broken queue it returns what it holds (to no effect) and restores the queue at its
    used index. Records anything that is not a :class:`VirtioError`."""

    def __init__(self, guest: Guest, seed: int, stop: threading.Event) -> None:
        super().__init__(name="device", daemon=True)
        self.g = guest
        self.rng = random.Random(seed)
        self.stop = stop
        self.stats = DeviceStats()
        self.failures: list[BaseException] = []
        self.held: list[DescChain] = []

    def give_back(self, chain: DescChain) -> None:
        if chain.returned:
            return
        if self.g.fq.queue.broken is None:
            self.stats.published += 1
        if self.rng.random() < 0.5:
            chain.return_written()
        else:
            with chain:
                pass

    def step(self) -> None:
        q, r = self.g.fq.queue, self.rng
        try:
            chain = q.next_chain()
        except QueueBroken:
            self.stats.outcomes["QueueBroken"] += 1
            while self.held:
                self.give_back(self.held.pop())
            q.restore(QueueState(q.next_used, q.next_used))  # take up from the used index
            return
        if chain is None:
            if r.random() < 0.1:
                q.disable_notifications()
            elif r.random() < 0.1:
                q.enable_notifications()
            return
        self.held.append(chain)
        if chain.error is not None:
            self.stats.outcomes[type(chain.error).__name__] += 1
        else:
            self.stats.outcomes["chain"] += 1
            reader = ReadableChain(chain)
            if r.random() < 0.3 and reader.remaining().bytes >= BLK_REQ_HDR.size:
                reader.read_record(BLK_REQ_HDR)
            reader.read(r.randrange(4 * BUF_LEN))
            self.stats.bytes_written += WritableChain(chain).write(r.randbytes(r.randrange(128)))
        while len(self.held) > r.randrange(4):
            self.give_back(self.held.pop(r.randrange(len(self.held))))

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    self.step()
                except VirtioError as error:
                    self.stats.outcomes[type(error).__name__] += 1
        except BaseException as error:  # reported by the test
            self.failures.append(error)
        finally:  # return what is still held (an unreturned chain warns; warnings are errors)
            while self.held:
                self.give_back(self.held.pop())


def first_change_outside(before: bytes, after: bytes, allowed: list[tuple[int, int]]) -> int | None:
    masked = bytearray(after)
    for addr, length in allowed:
        masked[addr - BASE : addr - BASE + length] = before[addr - BASE : addr - BASE + length]
    if masked == before:
        return None
    return BASE + next(i for i in range(len(before)) if masked[i] != before[i])


@pytest.mark.parametrize(
    ("size", "features"),
    [(4, F_INDIRECT | F_EVENT_IDX), (16, 0)],
    ids=["size4-indirect-event-idx", "size16-plain"],
)
def test_racing_driver_gives_only_virtio_errors_no_hang_and_no_write_outside_writable_buffers(
    size: int, features: int
) -> None:
    seed = 0x5EED + size
    guest = build_guest(size, features, random.Random(seed))
    initial = bytes(guest.buf)
    stop = threading.Event()
    driver = HostileDriverThread(guest, seed + 1, stop)
    device = DeviceThread(guest, seed + 2, stop)
    with fine_thread_switching():
        try:
            driver.start()
            device.start()
            started = time.monotonic()
            # run RUN_TIME seconds, and on until the device has served a well-formed chain (no
            # speed is asserted: on a loaded machine this just takes longer)
            while time.monotonic() - started < RUN_TIME or not device.stats.bytes_written:
                if not (driver.is_alive() and device.is_alive()):
                    break
                if time.monotonic() - started > 20 * RUN_TIME:
                    break
                stop.wait(0.05)
        finally:
            stop.set()
            hung = join_all([device, driver])
    assert not hung, f"threads still running after {JOIN_TIMEOUT} s: {hung}"
    assert not device.failures, f"the device thread raised a non-VirtioError: {device.failures!r}"
    assert not driver.failures, f"the driver thread failed: {driver.failures!r}"
    stats = device.stats
    assert stats.outcomes["chain"] > 0, stats
    assert stats.bytes_written > 0, stats
    final = bytes(guest.buf)
    # the device wrote only the used ring and the writable buffers (the driver wrote its own areas)
    allowed = [guest.used_ring, *guest.writable, *guest.driver_areas]
    bad = first_change_outside(initial, final, allowed)
    assert bad is None, f"guest memory changed at {bad:#x} (guards/canaries included)"
    for addr, n in guest.driver_areas:
        o = addr - BASE
        assert final[o : o + n] == driver.shadow[o : o + n], f"the device wrote at {addr:#x}"
    for addr, n in [*guest.writable, *guest.readable]:
        o = addr - BASE
        guards = final[o - GUARD : o] + final[o + n : o + n + GUARD]
        assert guards == bytes([CANARY]) * (2 * GUARD), f"a guard of {addr:#x} was overwritten"
    # every return that went through is counted by used.idx
    q = guest.fq.queue
    assert q.next_used == stats.published & 0xFFFF
    assert guest.fq.driver.used_ring.idx() == q.next_used


# --- DescChainStream under a storm of kicks -------------------------------------------------------

PUBLISHERS = 4
PER_PUBLISHER = 25
ROUNDS = 20


@dataclass(frozen=True)
class Pacing:
    """How one round interleaves (each gives the kick / empty-check race a different shape)."""

    consumer_yields: bool
    publisher_yields: bool
    burst: int
    """Chains a publisher publishes before it kicks once."""
    lockstep: bool
    """One chain in flight at a time (the publishers race for the turn): then each kick is the
    only one around, and a single lost wake-up stalls the round (and fails it)."""


def pacing(round_no: int) -> Pacing:
    lockstep = round_no % 2 == 0
    return Pacing(
        consumer_yields=round_no % 4 in {1, 2},
        publisher_yields=round_no % 3 == 1,
        burst=1 if lockstep else 1 + round_no % 3,
        lockstep=lockstep,
    )


@pytest.mark.parametrize("round_no", range(ROUNDS))
def test_stream_under_racing_kicks_delivers_every_chain_exactly_once_and_loses_no_wakeup(
    round_no: int,
) -> None:
    pace = pacing(round_no)
    total = PUBLISHERS * PER_PUBLISHER
    fq = make_queue(16, memory=FakeMemory(1 << 18))
    stream = DescChainStream(fq.queue)
    driver_lock = threading.Lock()  # the fake driver is not thread-safe; kicks race freely
    stop = threading.Event()
    failures: list[BaseException] = []
    consumed: set[tuple[int, int]] = set()
    published = [0]  # under driver_lock

    def publisher(t: int) -> None:
        try:
            for seq in range(PER_PUBLISHER):
                payload = struct.pack("<HH", t, seq)
                while True:
                    if stop.is_set():
                        return
                    with driver_lock:
                        fq.driver.used()  # take back what the device returned
                        turn = not pace.lockstep or published[0] == len(consumed)
                        head = fq.driver.publish([payload]) if turn else None
                        if head is not None:
                            published[0] += 1
                    if head is not None:
                        break
                    if turn:
                        stream.kick()  # the ring is full: make sure the device knows
                    stop.wait(0.0001 if pace.lockstep else 0.0005)
                if (seq + 1) % pace.burst == 0 or seq + 1 == PER_PUBLISHER:
                    stream.kick()  # outside the lock: races the other kicks and the consumer
                if pace.publisher_yields:
                    time.sleep(0)
        except BaseException as error:  # reported by the assertion below
            failures.append(error)

    async def consume() -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        async for chain in stream:
            with ReadableChain(chain) as r:
                t, seq = struct.unpack("<HH", r.read())
            got.append((t, seq))
            consumed.add((t, seq))
            if len(got) == total:
                break
            if pace.consumer_yields:
                await asyncio.sleep(0)
        return got

    async def scenario() -> list[tuple[int, int]]:
        consumer = asyncio.ensure_future(consume())
        for _ in range(5):  # the consumer is now waiting on an empty ring
            await asyncio.sleep(0)
        threads = [
            threading.Thread(target=publisher, args=(t,), name=f"publisher-{t}", daemon=True)
            for t in range(PUBLISHERS)
        ]
        try:
            for th in threads:
                th.start()
            return await asyncio.wait_for(consumer, JOIN_TIMEOUT)
        finally:
            stop.set()
            hung = join_all(threads)
            assert not hung, f"threads still running after {JOIN_TIMEOUT} s: {hung}"

    with fine_thread_switching():
        got = asyncio.run(scenario())
    stream.close()
    assert not failures, failures
    assert len(got) == total
    assert len(set(got)) == total, "a chain was delivered twice"
    assert set(got) == {(t, s) for t in range(PUBLISHERS) for s in range(PER_PUBLISHER)}
    for t in range(PUBLISHERS):  # the avail ring is FIFO: each publisher's order is kept
        assert [s for tt, s in got if tt == t] == list(range(PER_PUBLISHER))
    fq.driver.used()
    assert fq.driver.in_flight == 0
    assert fq.queue.next_chain() is None
