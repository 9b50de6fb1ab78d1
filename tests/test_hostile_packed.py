"""Hostile-driver tests of the packed virtqueue, device side (virtio 1.2, 2.8): the driver is
untrusted and may write anything into the descriptor ring and the event areas, at any time.

A state machine (:class:`HostilePackedMachine`) lets a driver mix well-formed chains (direct and
indirect) with raw garbage chains (arbitrary ``addr``/``len``/``id``/``flags``, with or without the
AVAIL/USED bits of the lap), rewritten slots, rewritten indirect tables and arbitrary driver event
areas. The device takes chains, reads them, writes into them, returns them (alone or in a
``batch()``, in order under IN_ORDER, and tries an out-of-order return), toggles notifications and
resets or restores the queue.

What a device author relies on, checked at every step:

1. Only :class:`~virtio_schema.errors.VirtioError` subclasses come out of the public API.
2. Work is bounded: one ``next_chain()`` reads at most ``2 * size + 2`` descriptor records (the ring
   slots of one chain plus the entries of one indirect table, each capped by ``size``).
3. The device writes only where it may (all guest memory compared around every device call): the
   descriptor ring (used descriptors), the device event area, and the writable buffers of the chains
   it holds; reads and ``reset()``/``restore()`` write nothing.
4. Once broken, no device call changes guest memory until ``reset()`` / ``restore()``.
5. Every chain taken is returned exactly once: a return writes one used descriptor at the device's
   used position with the chain's buffer id, its length and ``AVAIL`` = ``USED`` = the used wrap
   counter (virtio 1.2, 2.8.9); while the driver has been well-behaved since the last reset, its
   ``used()`` reports exactly the returns of the current generation, in order.

A single-shot property then throws arbitrary bytes at the whole ring and both event areas, and a
short two-thread race rewrites raw ring bytes while the device works, with canaries around every
buffer.
"""

from __future__ import annotations

import contextlib
import random
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from conftest import DescReads
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from virtio_schema.chain import ReadableChain, WritableChain
from virtio_schema.errors import VirtioError
from virtio_schema.fake_queue import FakeMemory, FakeMemoryFull, FakePackedDriver, make_queue
from virtio_schema.fake_queue import FakeQueue as _FakeQueue
from virtio_schema.queue import (
    DescChain,
    OutOfOrderReturn,
    PackedQueue,
    QueueBroken,
    QueueState,
)
from virtio_schema.ring import PackedDesc
from virtio_schema.schema import Feature, PackedDescFlags

T = TypeVar("T")
PackedFQ = _FakeQueue[PackedQueue, FakePackedDriver]

NEXT = int(PackedDescFlags.NEXT)
WRITE = int(PackedDescFlags.WRITE)
INDIRECT = int(PackedDescFlags.INDIRECT)
AVAIL = int(PackedDescFlags.AVAIL)
USED = int(PackedDescFlags.USED)
F_INDIRECT = int(Feature.INDIRECT_DESC)
F_EVENT_IDX = int(Feature.EVENT_IDX)
F_IN_ORDER = int(Feature.IN_ORDER)
TOP = 1 << 64
U16 = struct.Struct("<H")
RAW_DESC = struct.Struct("<QLHH")  # packed: addr, len, id, flags

BASE = 0x10000
MEM_SIZE = 0x20000
TABLE_ENTRIES = 4

SIZES = st.integers(1, 17)
FEATURES = st.builds(
    lambda bits: sum(bits),
    st.lists(st.sampled_from([F_INDIRECT, F_EVENT_IDX, F_IN_ORDER]), unique=True),
)
U16S = st.integers(0, 0xFFFF)
LENS = st.sampled_from([0, 1, 15, 16, 32, 64, 4096, (1 << 32) - 1]) | st.integers(0, (1 << 32) - 1)
FLAGS = (
    st.sampled_from([0, NEXT, WRITE, INDIRECT, NEXT | WRITE, INDIRECT | NEXT, AVAIL, USED, 0xFFFF])
    | st.builds(
        lambda low, av, us: low | (AVAIL if av else 0) | (USED if us else 0),
        st.integers(0, 7),
        st.booleans(),
        st.booleans(),
    )
    | U16S
)

Snapshot = tuple[bytes, ...]


# --- the checks' tools ---------------------------------------------------------------------------


def device_call(call: Callable[[], T]) -> T | VirtioError:
    """One call of the public API: a :class:`VirtioError` is a possible answer, anything else
    escaping fails the test."""
    try:
        return call()
    except VirtioError as error:
        return error
    except Exception as error:
        raise AssertionError(f"a non-VirtioError escaped the public API: {error!r}") from error


def snapshot(mem: FakeMemory) -> Snapshot:
    return tuple(bytes(b) for b in mem.buffers)


def first_change_outside(
    mem: FakeMemory, before: Snapshot, allowed: Sequence[tuple[int, int]]
) -> int | None:
    """The first driver address (single-region fake memory at ``BASE``) whose byte changed
    outside the ``(addr, len)`` ranges."""
    (old,) = before
    new = mem.buffers[0]
    if old == new:
        return None
    masked = bytearray(new)
    size = len(masked)
    for addr, length in allowed:
        lo, hi = max(addr - BASE, 0), min(addr + length - BASE, size)
        if lo < hi:
            masked[lo:hi] = old[lo:hi]
    if masked == old:
        return None
    return BASE + next(i for i in range(size) if masked[i] != old[i])


def write_into(chain: DescChain, payload: bytes) -> int:
    return WritableChain(chain).write(payload)


def writable_ranges(chain: DescChain) -> list[tuple[int, int]]:
    """The validated writable buffers of a well-formed chain (none for a malformed one)."""
    if chain.error is not None:
        return []
    return [(d.addr, d.len) for d in chain.writable()]


def ring_areas(driver: FakePackedDriver) -> list[tuple[int, int]]:
    """Where the queue itself may write: the descriptor ring and the device event area."""
    return [(driver.ring_addr, 16 * driver.size), (driver.device_event_addr, 4)]


def resync_driver(driver: FakePackedDriver, state: QueueState) -> None:
    """The driver's half of a device reset/restore: it re-initialises its ring for ``state``
    (zeroed on a reset; every slot marked used on its previous lap on a resume) and forgets its
    in-flight chains (their memory is leaked, which the test does not mind)."""
    mem = driver.memory
    mem.write(driver.ring_addr, bytes(16 * driver.size))
    mem.write(driver.driver_event_addr, bytes(4))
    driver.avail_pos, driver.avail_wrap = state.next_avail, state.avail_wrap
    driver.used_pos, driver.used_wrap = state.next_used, state.used_wrap
    driver._free_ids = list(range(driver.size - 1, -1, -1))
    driver._free_slots = driver.size
    driver._chains.clear()
    driver._raw_slots.clear()
    driver._order.clear()
    if state.next_avail or not state.avail_wrap:
        for i in range(driver.size):
            lap = state.avail_wrap if i < state.next_avail else not state.avail_wrap
            driver.ring.set(i, PackedDesc(0, 0, 0, (AVAIL | USED) if lap else 0))


@dataclass(eq=False)
class Held:
    chain: DescChain
    gen: int
    writable: list[tuple[int, int]]
    reader: ReadableChain | None = None
    writer: WritableChain | None = None


# --- the state machine ---------------------------------------------------------------------------


class HostilePackedMachine(RuleBasedStateMachine):
    """A hostile driver and a device that uses every public call, on one packed queue."""

    fq: PackedFQ
    driver: FakePackedDriver
    queue: PackedQueue
    mem: FakeMemory
    size: int
    features: int
    reads: DescReads

    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.held: list[Held] = []
        self.gen = 0
        self.expected_used: list[tuple[int, int]] = []
        self.tainted = False  # the driver wrote raw ring bytes since the last reset/restore
        self.addr_pool: list[int] = []
        self.tables: list[int] = []

    @initialize(size=SIZES, features=FEATURES)
    def build(self, size: int, features: int) -> None:
        self.mem = FakeMemory(MEM_SIZE, base=BASE)
        self.fq = make_queue(size, packed=True, features=features, memory=self.mem)
        self.driver, self.queue = self.fq.driver, self.fq.queue
        self.size, self.features = size, features
        self.reads = DescReads(self.queue)
        scratch = [self.driver.alloc_buffer(64) for _ in range(2)]
        self.tables = [
            self.driver.write_indirect_table([PackedDesc(s, 32, 0, WRITE) for s in scratch])
            for _ in range(2)
        ]
        d = self.driver
        self.addr_pool = [
            *scratch,
            *self.tables,
            d.ring_addr,
            d.driver_event_addr,
            d.device_event_addr,
            BASE + MEM_SIZE - 8,  # runs off the end of memory
            BASE - 8,  # starts unmapped
            0,
            TOP - 16,
            TOP - 1,
        ]
        self.ready = True

    def teardown(self) -> None:
        # return everything still held, oldest first (an unreturned chain warns; warnings are
        # errors); a chain the queue refuses to take back is made stale by a reset
        if not self.ready:
            return
        for h in self.held:
            with contextlib.suppress(VirtioError):
                h.chain.return_written(0)
        if any(not h.chain.returned for h in self.held):
            self.queue.reset()
            for h in self.held:
                if not h.chain.returned:
                    h.chain.return_written(0)
        self.held.clear()

    # --- helpers ---------------------------------------------------------------------------------

    def addrs(self) -> st.SearchStrategy[int]:
        near = st.builds(
            lambda a, off: (a + off) % TOP, st.sampled_from(self.addr_pool), st.integers(-16, 80)
        )
        return st.sampled_from(self.addr_pool) | near | st.integers(0, TOP - 1)

    def raw_descs(self) -> st.SearchStrategy[PackedDesc]:
        ids = st.integers(0, max(self.size - 1, 0)) | U16S
        return st.builds(PackedDesc, self.addrs(), LENS, ids, FLAGS)

    def allowed(self) -> list[tuple[int, int]]:
        """Where a device call may write: nothing once broken; else the ring, the device event
        area and the writable buffers of every held chain."""
        if self.queue.broken is not None:
            return []
        out = ring_areas(self.driver)
        for h in self.held:
            out.extend(h.writable)
        return out

    def call(
        self, what: str, fn: Callable[[], T], allowed: Sequence[tuple[int, int]] | None = None
    ) -> T | VirtioError:
        """A device call with the memory and exception checks around it."""
        allow = self.allowed() if allowed is None else allowed
        if self.queue.broken is not None:
            allow = []
        before = snapshot(self.mem)
        result = device_call(fn)
        bad = first_change_outside(self.mem, before, allow)
        assert bad is None, f"{what} wrote guest memory at {bad:#x}; allowed only {allow}"
        return result

    def pick(self, data: st.DataObject) -> Held:
        return self.held[data.draw(st.integers(0, len(self.held) - 1), label="held chain")]

    def current(self) -> list[Held]:
        return [h for h in self.held if h.gen == self.gen]

    def returnable(self, data: st.DataObject) -> Held:
        """Any held chain; under IN_ORDER the oldest one (stale chains first: returning them does
        nothing)."""
        if self.queue.in_order:
            return self.held[0]
        return self.pick(data)

    # --- the driver ------------------------------------------------------------------------------

    @rule(data=st.data())
    def driver_publishes(self, data: st.DataObject) -> None:
        readable = data.draw(st.lists(st.binary(max_size=40), max_size=3), label="readable")
        writable = data.draw(st.lists(st.integers(0, 64), max_size=3), label="writable")
        if not readable and not writable:
            writable = [16]
        indirect = bool(self.features & F_INDIRECT) and data.draw(st.booleans(), label="indirect")
        if len(readable) + len(writable) > self.size:
            return  # longer than the queue: never well-formed (push_raw makes such chains)
        with contextlib.suppress(FakeMemoryFull):
            self.driver.publish(readable, writable, indirect=indirect)

    @rule(data=st.data(), raw_flags=st.booleans())
    def driver_pushes_a_raw_chain(self, data: st.DataObject, raw_flags: bool) -> None:
        descs = data.draw(st.lists(self.raw_descs(), min_size=1, max_size=self.size + 2))
        self.driver.push_raw(descs, raw_flags=raw_flags)
        self.tainted = True

    @rule(data=st.data())
    def driver_rewrites_a_slot(self, data: st.DataObject) -> None:
        d = data.draw(self.raw_descs(), label="slot contents")
        index = data.draw(st.integers(0, self.size - 1), label="slot")
        self.driver.write_slot(index, d.addr, d.len, d.flags, d.id)
        self.tainted = True

    @rule(data=st.data())
    def driver_rewrites_an_indirect_table(self, data: st.DataObject) -> None:
        table = data.draw(st.sampled_from(self.tables))
        entries = data.draw(st.lists(self.raw_descs(), min_size=1, max_size=TABLE_ENTRIES))
        for k, e in enumerate(entries):
            self.mem.write(table + 16 * k, RAW_DESC.pack(e.addr, e.len, e.id, e.flags))

    @rule(off_wrap=U16S, flags=st.sampled_from([0, 1, 2]) | U16S)
    def driver_sets_its_event_area(self, off_wrap: int, flags: int) -> None:
        self.driver.set_driver_event(off_wrap, flags)

    # --- the device ------------------------------------------------------------------------------

    @rule()
    def device_takes_a_chain(self) -> None:
        was_broken = self.queue.broken
        self.reads.count = 0
        result = self.call("next_chain()", self.queue.next_chain)
        assert self.reads.count <= 2 * self.size + 2, (
            f"next_chain() read {self.reads.count} descriptors on a ring of {self.size}"
        )
        if isinstance(result, VirtioError):
            assert isinstance(result, QueueBroken), f"next_chain() raised {result!r}"
            assert self.queue.broken is result.cause
            if was_broken is not None:
                assert result.cause is was_broken, "a broken queue changed its cause"
            return
        assert was_broken is None, "a broken queue handed out a chain"
        if result is not None:
            assert 0 <= result.head < self.size
            writable = device_call(lambda: writable_ranges(result))
            assert isinstance(writable, list)
            self.held.append(Held(result, self.gen, writable))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def device_reads(self, data: st.DataObject) -> None:
        h = self.pick(data)
        if h.reader is None:
            reader = self.call("ReadableChain()", lambda: ReadableChain(h.chain), [])
            if isinstance(reader, VirtioError):
                return
            h.reader = reader
        r = h.reader
        n = data.draw(st.integers(-1, 100), label="read size")
        if data.draw(st.booleans(), label="readinto"):
            self.call("readinto()", lambda: r.readinto(bytearray(max(n, 0))), [])
        else:
            self.call("read()", lambda: r.read(n), [])

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def device_writes(self, data: st.DataObject) -> None:
        h = self.pick(data)
        if h.writer is None:
            writer = self.call("WritableChain()", lambda: WritableChain(h.chain), [])
            if isinstance(writer, VirtioError):
                return
            h.writer = writer
        w = h.writer
        payload = data.draw(st.binary(max_size=100), label="payload")
        self.call("write()", lambda: w.write(payload), h.writable)

    def return_one(self, h: Held) -> None:
        """Return ``h`` outside a batch and check the used descriptor it wrote."""
        q = self.queue
        pos, wrap = q.next_used, q.state().used_wrap
        live = h.gen == self.gen and q.broken is None
        written = h.chain.written if h.chain.error is None else 0
        result = self.call("return_written()", h.chain.return_written)
        assert result is None, f"returning the oldest held chain raised {result!r}"
        self.held.remove(h)
        if not live:
            return
        _, length, buf_id, flags = RAW_DESC.unpack(
            self.mem.read(self.driver.ring_addr + 16 * pos, 16)
        )
        bits = (AVAIL | USED) if wrap else 0
        assert (buf_id, length) == (h.chain.head, written), "wrong used descriptor"
        assert flags & (AVAIL | USED) == bits, "used descriptor on the wrong lap"
        assert bool(flags & WRITE) == bool(written)
        self.expected_used.append((h.chain.head, written))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def device_returns_a_chain(self, data: st.DataObject) -> None:
        self.return_one(self.returnable(data))

    @precondition(lambda self: self.queue.in_order and len(self.current()) >= 2)
    @rule(data=st.data())
    def device_returns_out_of_order(self, data: st.DataObject) -> None:
        cur = self.current()
        h = cur[data.draw(st.integers(1, len(cur) - 1), label="younger chain")]
        if h.chain.head == cur[0].chain.head:
            return  # a driver may reuse a buffer id: the queue cannot tell the two apart
        result = self.call("out-of-order return", h.chain.return_written, [])
        assert isinstance(result, OutOfOrderReturn), f"expected OutOfOrderReturn, got {result!r}"
        assert not h.chain.returned, "a refused return marked the chain returned"

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def device_returns_a_batch(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(1, len(self.held)), label="batch size")
        q = self.queue
        live = q.broken is None
        chosen = self.held[:n] if q.in_order else data.draw(st.permutations(self.held))[:n]

        def batch() -> None:
            with q.batch():
                for h in chosen:
                    h.chain.return_written()

        results: list[tuple[int, int]] = [
            (h.chain.head, h.chain.written if h.chain.error is None else 0)
            for h in chosen
            if h.gen == self.gen
        ]
        result = self.call("batch()", batch)
        assert result is None, f"returning chains in a batch raised {result!r}"
        for h in chosen:
            assert h.chain.returned
            self.held.remove(h)
        if live:
            self.expected_used.extend(results)

    @rule(enable=st.booleans())
    def device_toggles_notifications(self, enable: bool) -> None:
        area = [(self.driver.device_event_addr, 4)]
        if enable:
            result = self.call("enable_notifications()", self.queue.enable_notifications, area)
            assert isinstance(result, bool) == (self.queue.broken is None)
        else:
            self.call("disable_notifications()", self.queue.disable_notifications, area)

    def restart(self, state: QueueState, what: str, fn: Callable[[], None]) -> None:
        result = self.call(what, fn, [])
        assert result is None
        assert self.queue.broken is None
        assert self.queue.state() == state
        self.gen += 1
        self.expected_used.clear()
        self.tainted = False
        resync_driver(self.driver, state)

    @rule()
    def device_resets(self) -> None:
        self.restart(QueueState(), "reset()", self.queue.reset)

    @rule(data=st.data())
    def device_restores(self, data: st.DataObject) -> None:
        pos = data.draw(st.integers(0, self.size - 1), label="position")
        state = QueueState(pos, pos, *[data.draw(st.booleans(), label="wrap")] * 2)
        self.restart(state, "restore()", lambda: self.queue.restore(state))

    # --- invariants ------------------------------------------------------------------------------

    @invariant()
    def driver_sees_exactly_the_returns_of_this_generation(self) -> None:
        if not self.ready or self.tainted:
            return  # a driver that rewrote its ring reads garbage back: nothing to compare
        got = [(u.head, u.len) for u in self.driver.used()]
        assert got == self.expected_used, "the driver sees other used entries than were returned"
        self.expected_used.clear()

    @invariant()
    def held_chains_are_unreturned(self) -> None:
        assert all(not h.chain.returned for h in self.held)


HostilePackedMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)
TestHostilePacked = HostilePackedMachine.TestCase


# --- arbitrary bytes over the whole ring ---------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data(), size=SIZES, features=FEATURES)
def test_arbitrary_ring_bytes_raise_only_virtio_errors_read_boundedly_and_write_only_where_allowed(
    data: st.DataObject, size: int, features: int
) -> None:
    fq = make_queue(size, packed=True, features=features, memory=FakeMemory(MEM_SIZE, base=BASE))
    d, q, mem = fq.driver, fq.queue, fq.memory
    reads = DescReads(q)
    bufs = [d.alloc_buffer(64) for _ in range(2)]
    pool = [*bufs, d.ring_addr, d.device_event_addr, 0, TOP - 16]
    desc = st.builds(
        lambda a, n, i, f: RAW_DESC.pack(a, n, i, f),
        st.sampled_from(pool) | st.integers(0, TOP - 1),
        st.integers(0, 128) | LENS,
        st.integers(0, size) | U16S,
        FLAGS,
    )
    table = d.write_indirect_table([PackedDesc(b, 32, 0, WRITE) for b in bufs])
    pool.append(table)
    ring = data.draw(
        st.binary(min_size=16 * size, max_size=16 * size)
        | st.lists(desc, min_size=size, max_size=size).map(b"".join),
        label="ring",
    )
    mem.write(d.ring_addr, ring)
    mem.write(d.driver_event_addr, data.draw(st.binary(min_size=4, max_size=4)))
    mem.write(d.device_event_addr, data.draw(st.binary(min_size=4, max_size=4)))
    held: list[DescChain] = []
    try:
        for _ in range(4 * size):
            allow = [] if q.broken is not None else ring_areas(d)
            for c in held:
                allow.extend(writable_ranges(c))
            before = snapshot(mem)
            reads.count = 0
            result = device_call(q.next_chain)
            assert reads.count <= 2 * size + 2
            bad = first_change_outside(mem, before, allow)
            assert bad is None, f"next_chain() wrote at {bad:#x}"
            if result is None:
                break
            if isinstance(result, VirtioError):
                assert isinstance(result, QueueBroken)
                break
            held.append(result)
            if result.error is None and data.draw(st.booleans(), label="write"):
                before = snapshot(mem)
                device_call(partial(write_into, result, b"\x5a" * 40))
                bad = first_change_outside(mem, before, writable_ranges(result))
                assert bad is None, f"a chain write wrote at {bad:#x}"
            if data.draw(st.booleans(), label="return now"):
                device_call(held.pop(0).return_written)
    finally:
        for c in held:
            with contextlib.suppress(VirtioError):
                c.return_written(0)
        if any(not c.returned for c in held):
            q.reset()
            for c in held:
                if not c.returned:
                    c.return_written(0)


# --- a racing driver -----------------------------------------------------------------------------

CANARY = 0xA5
GUARD = 32
BUF_LEN = 64
WIDE = 4 * BUF_LEN
RACE_SIZE = 8
RUN_TIME = 2.0
JOIN_TIMEOUT = 30.0


def test_racing_packed_driver_gives_only_virtio_errors_and_no_write_outside_writable_buffers() -> (
    None
):
    rng = random.Random(1234)
    mem = FakeMemory(MEM_SIZE, base=BASE)
    mem.buffers[0][:] = bytes([CANARY]) * MEM_SIZE
    fq = make_queue(
        RACE_SIZE, packed=True, features=F_INDIRECT | F_EVENT_IDX, memory=mem
    )  # the ring and event areas are zeroed by the allocator
    d, q = fq.driver, fq.queue
    guarded: list[tuple[int, int]] = []

    def alloc(content: bytes) -> int:
        block = mem.alloc(len(content) + 2 * GUARD, 16)
        mem.write(block, bytes([CANARY]) * (len(content) + 2 * GUARD))
        mem.write(block + GUARD, content)
        guarded.append((block + GUARD, len(content)))
        return block + GUARD

    readable = [alloc(rng.randbytes(BUF_LEN)) for _ in range(4)]
    # room for what a device may legitimately write: a slot's len can be a used length the device
    # wrote (< 2 * BUF_LEN), so writable buffers and tables are WIDE bytes, offsets < BUF_LEN
    writable = [alloc(bytes(WIDE)) for _ in range(4)]
    tables = [alloc(bytes(WIDE)) for _ in range(2)]
    buf = mem.buffers[0]
    before = bytes(buf)
    stop = threading.Event()
    failures: list[BaseException] = []
    ring_off = d.ring_addr - BASE

    def descriptor(r: random.Random) -> tuple[int, int, int]:
        """A ring descriptor: a writable buffer, an indirect table or garbage, any flags. Readable
        buffers are reached only through table entries, which never say WRITE: whatever flag or
        length bytes a slot ends up with, the device may write only where this test allows."""
        kind = r.randrange(3)
        if kind == 0:
            off = r.randrange(BUF_LEN)
            return r.choice(writable) + off, r.randrange(BUF_LEN - off + 1), r.randrange(0x80)
        if kind == 1:
            return (
                r.choice(tables),
                16 * r.randrange(TABLE_ENTRIES + 1),
                INDIRECT | NEXT * r.randrange(2),
            )
        return r.choice([0, TOP - 16, BASE + MEM_SIZE]), r.randrange(1 << 32), r.randrange(0x80)

    def driver() -> None:
        r = random.Random(1)
        try:
            while not stop.is_set():
                if r.random() < 0.2:
                    entry = r.choice(tables) - BASE + 16 * r.randrange(TABLE_ENTRIES)
                    if r.random() < 0.5:
                        addr, length = r.choice(readable), r.randrange(BUF_LEN + 1)
                        flags = r.randrange(0x10000) & ~WRITE
                    else:
                        addr, length, flags = descriptor(r)
                    struct.pack_into("<QLHH", buf, entry, addr, length, 0, flags)
                    continue
                at = ring_off + 16 * r.randrange(RACE_SIZE)
                addr, length, flags = descriptor(r)
                flags |= r.choice([AVAIL, USED, 0, AVAIL | USED])
                field = r.randrange(4)
                if field == 0:
                    struct.pack_into("<QLHH", buf, at, addr, length, r.randrange(RACE_SIZE), flags)
                elif field == 1:
                    struct.pack_into("<H", buf, at + 14, flags)
                elif field == 2:
                    struct.pack_into("<H", buf, at + 12, r.randrange(RACE_SIZE + 2))
                else:
                    struct.pack_into("<QL", buf, at, addr, length)
        except BaseException as error:
            failures.append(error)

    held: list[DescChain] = []
    outcomes: dict[str, int] = {}

    def give_back(chain: DescChain) -> None:
        with contextlib.suppress(VirtioError):
            chain.return_written()
        if not chain.returned:  # refused (IN_ORDER bookkeeping): a reset makes it stale
            q.reset()
            chain.return_written()

    def device() -> None:
        r = random.Random(2)
        try:
            while not stop.is_set():
                try:
                    chain = q.next_chain()
                except QueueBroken:
                    outcomes["broken"] = outcomes.get("broken", 0) + 1
                    while held:
                        give_back(held.pop(0))
                    q.reset()
                    continue
                except VirtioError as error:
                    failures.append(AssertionError(f"next_chain() raised {error!r}"))
                    return
                if chain is None:
                    continue
                held.append(chain)
                try:
                    if chain.error is None:
                        outcomes["chain"] = outcomes.get("chain", 0) + 1
                        ReadableChain(chain).read(r.randrange(2 * BUF_LEN))
                        WritableChain(chain).write(r.randbytes(r.randrange(2 * BUF_LEN)))
                    else:
                        outcomes["error"] = outcomes.get("error", 0) + 1
                except VirtioError:
                    pass
                while len(held) > r.randrange(3):
                    give_back(held.pop(0))  # oldest first: fine with or without IN_ORDER
        except BaseException as error:
            failures.append(error)
        finally:
            while held:
                give_back(held.pop(0))

    threads = [
        threading.Thread(target=driver, name="driver", daemon=True),
        threading.Thread(target=device, name="device", daemon=True),
    ]
    try:
        for t in threads:
            t.start()
        time.sleep(RUN_TIME)
    finally:
        stop.set()
        for t in threads:
            t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, f"non-VirtioError in a thread: {failures[0]!r}"
    assert outcomes.get("chain", 0) > 0, f"the device never got a chain: {outcomes}"
    for addr, length in guarded:
        lo = addr - BASE
        assert buf[lo - GUARD : lo] == bytes([CANARY]) * GUARD, f"guard before {addr:#x} hit"
        assert buf[lo + length : lo + length + GUARD] == bytes([CANARY]) * GUARD, (
            f"guard after {addr:#x} hit"
        )
    allowed = [
        *ring_areas(d),
        *[(w, WIDE) for w in writable],
        *[(t, WIDE) for t in tables],
    ]
    snap = (before,)
    bad = first_change_outside(mem, snap, allowed)
    assert bad is None, f"guest memory changed at {bad:#x} outside the ring and writable buffers"


# --- focused ----------------------------------------------------------------------------------------


def test_in_order_chains_held_when_the_queue_breaks_can_all_be_returned_oldest_first() -> None:
    """A device returning its chains oldest first must be able to return all of them, even after
    the driver broke the queue (the returns then write nothing)."""
    fq = make_queue(4, packed=True, features=F_IN_ORDER)
    d, q = fq.driver, fq.queue
    d.publish([b"a"], [8])
    d.publish([b"b"], [8])
    first, second = q.next_chain(), q.next_chain()
    assert first is not None
    assert second is not None
    d.push_raw([PackedDesc(0, 0, 99, 0)])  # buffer id out of range: the queue latches broken
    assert isinstance(device_call(q.next_chain), QueueBroken)
    before = snapshot(fq.memory)
    first.return_written(0)
    try:
        result = device_call(second.return_written)
        assert result is None, f"returning the oldest held chain raised {result!r}"
        assert first_change_outside(fq.memory, before, []) is None
    finally:
        if not second.returned:
            q.reset()  # makes it stale, so the test does not leak it
            second.return_written(0)
