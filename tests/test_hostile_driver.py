"""Hostile-driver tests of the device side: the driver may write anything into the rings, any time.

The threat model (docs/threat_model.rst): the driver is untrusted and may change any ring byte at
any moment. A state machine (:class:`HostileDriverMachine`) lets a driver mix well-formed chains
(direct, indirect, direct descriptors followed by an indirect one) with every corruption a
driver can commit: arbitrary descriptor bytes (also under chains already published or already
taken by the device), bad ``next`` values, loops, bad indirect tables, avail index jumps, arbitrary
heads, flipped flags and event indices. The device takes chains, reads them (bytes and virtio-blk
headers), writes into them, returns them in any order and by every route, toggles notifications,
and resets or restores the queue.

What a device author relies on, checked at every step:

1. Only :class:`~virtio_schema.errors.VirtioError` subclasses come out of the public API
   (:func:`device_call` fails the test on anything else).
2. Work is bounded: one ``next_chain()`` translates at most one indirect table and reads at most
   ``size + 1`` descriptors plus that indirect descriptor, whatever the ring holds (the bound the
   queue documents, pinned by a focused test below).
3. The device writes only where it may, byte-exactly, all of guest memory (every region) compared
   before and after each device call: ``next_chain()`` only ``avail_event`` (EVENT_IDX,
   notifications on), a return only its used element and ``used.idx``, notification toggles only
   ``used.flags`` / ``avail_event``, a chain write only the bytes of the chain's validated writable
   buffers at the write position; reads, ``pending()``, ``reset()`` and ``restore()`` nothing.
4. Every chain taken is returned exactly once: the driver sees exactly the used entries (head,
   length) of the returns of the current generation, in return order, ``used.idx`` counts them,
   and the driver is notified exactly when the suppression rules say (virtio 1.2, 2.7.7.2, 2.7.10).
5. Once broken, the queue stays broken (same cause) and touches no guest memory (no descriptor
   read, no translation, no byte written, chains included) until ``reset()`` / ``restore()``.
6. An oracle: every ``next_chain()`` answer equals what a reference walk of the validation catalogue
   (virtio_schema.queue.errors), written out independently below, gives on the same bytes: the same ring
   verdict, and for a chain the same descriptors or "malformed"; reads and writes move exactly the
   bytes a model of the chain's buffers over the memory map predicts.

Single-shot property tests then throw arbitrary bytes at the whole descriptor table, indirect tables
and avail ring; focused tests pin the documented work bound, descriptors rewritten after
``next_chain()`` (time of check / time of use, single-threaded), the broken latch under any further
driver writes, and that a driver's ``len`` alone cannot make the device allocate memory.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from conftest import DescReads
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from virtio_schema.chain import InsufficientData, ReadableChain, WritableChain
from virtio_schema.errors import VirtioError
from virtio_schema.fake_queue import FakeDriver, FakeMemory, FakeMemoryFull, FakeQueue, make_queue
from virtio_schema.mem import DeviceRange, DriverMem, DriverRange
from virtio_schema.queue import (
    AvailIndexJump,
    ChainAlreadyReturned,
    ChainDescriptor,
    ChainError,
    DescChain,
    HeadOutOfRange,
    Queue,
    QueueBroken,
    QueueState,
    RingError,
    UnmappedBuffer,
    WrittenTooMuch,
    vring_need_event,
)
from virtio_schema.records import BLK_REQ_HDR
from virtio_schema.ring import Desc
from virtio_schema.schema import AvailFlags, DescFlags, Feature, UsedFlags

T = TypeVar("T")

NEXT = int(DescFlags.NEXT)
WRITE = int(DescFlags.WRITE)
INDIRECT = int(DescFlags.INDIRECT)
NO_INTERRUPT = int(AvailFlags.NO_INTERRUPT)
NO_NOTIFY = int(UsedFlags.NO_NOTIFY)
F_INDIRECT = int(Feature.INDIRECT_DESC)
F_EVENT_IDX = int(Feature.EVENT_IDX)
TOP = 1 << 64
MAX_TOTAL = (1 << 32) - 1
RAW_DESC = struct.Struct("<QLHH")
U16 = struct.Struct("<H")

# Guest memory: region 0 holds the rings and everything the fake driver allocates; region 1 is
# adjacent (a buffer crossing BASE + LOW is split in two by the chain layer); region 2 stands alone
# after a gap.
BASE = 0x10000
LOW = 0x10000
HIGH = 0x4000
FAR = 0x100000
FAR_SIZE = 0x1000
REGIONS = ((BASE, LOW), (BASE + LOW, HIGH), (FAR, FAR_SIZE))

SIZES = st.sampled_from([1, 2, 4, 8, 16, 8, 16])  # mostly room for several chains
FEATURES = st.sampled_from([0, F_INDIRECT, F_EVENT_IDX, F_INDIRECT | F_EVENT_IDX])
U16S = st.integers(0, 0xFFFF)
LENS = st.sampled_from([0, 1, 8, 15, 16, 24, 64, 4096, 1 << 31, MAX_TOTAL]) | st.integers(
    0, MAX_TOTAL
)
FLAGS = (
    st.sampled_from(
        [0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE, 0xFFFF]
    )
    | U16S
)

Snapshot = tuple[bytes, ...]


# --- the checks' tools ---------------------------------------------------------------------------


def device_call(call: Callable[[], T]) -> T | VirtioError:
    """Run one call of the public API: a :class:`VirtioError` is a possible answer, anything else
    escaping (``struct.error``, ``IndexError``, ``AssertionError``, ...) fails the test."""
    try:
        return call()
    except VirtioError as error:
        return error
    except Exception as error:
        raise AssertionError(f"a non-VirtioError escaped the public API: {error!r}") from error


class CountingMem:
    """A :class:`DriverMem` that counts translations (the queue translates only indirect tables)."""

    def __init__(self, inner: DriverMem) -> None:
        self.inner = inner
        self.calls = 0

    def translate(self, driver_range: DriverRange) -> DeviceRange | None:
        self.calls += 1
        return self.inner.translate(driver_range)


def counting_fake(
    size: int, *, features: int = 0, state: QueueState | None = None, memory: FakeMemory
) -> FakeQueue[Queue, FakeDriver]:
    """A fake driver on ``memory`` and a queue on its rings made with a :class:`CountingMem` over
    that memory (a queue translates through the memory it was made with): see :func:`instrument`."""
    fq = make_queue(size, features=features, state=state, memory=memory)
    queue = Queue(
        fq.driver.queue_memory(),
        size,
        CountingMem(memory),
        features=features,
        notify=fq.notifier,
        state=state,
    )
    return FakeQueue(queue, fq.driver, memory, fq.notifier)


def instrument(fq: FakeQueue[Queue, FakeDriver]) -> tuple[DescReads, CountingMem]:
    """Counters of what the queue of a :func:`counting_fake` reads from now on: descriptor
    records, and translations (the queue translates only indirect tables)."""
    counting = fq.queue.driver_mem
    assert isinstance(counting, CountingMem), "made by counting_fake()"
    counting.calls = 0
    return DescReads(fq.queue), counting


@dataclass(frozen=True)
class MemoryMap:
    """Where the fake memory's regions are (in ``FakeMemory.buffers`` order), to predict what the
    device can reach and to compare snapshots of every region."""

    regions: tuple[tuple[int, int], ...]

    def snapshot(self, mem: FakeMemory) -> Snapshot:
        return tuple(bytes(b) for b in mem.buffers)

    def region_at(self, addr: int) -> int | None:
        for k, (start, size) in enumerate(self.regions):
            if start <= addr < start + size:
                return k
        return None

    def mapped_prefix(self, addr: int, n: int) -> int:
        """How many of the ``n`` bytes at ``addr`` the device reaches, from ``addr`` on, walking
        through adjacent regions (what the chain layer does)."""
        done = 0
        while done < n:
            k = self.region_at(addr + done)
            if k is None:
                break
            start, size = self.regions[k]
            done += min(n - done, start + size - (addr + done))
        return done

    def one_region(self, addr: int, n: int) -> bool:
        """Whether one translation covers ``[addr, addr + n)`` (indirect tables are not split)."""
        k = self.region_at(addr)
        if k is None:
            return False
        start, size = self.regions[k]
        return addr + n <= start + size

    def read(self, snap: Snapshot, addr: int, n: int) -> bytes:
        """The bytes of a reachable range in ``snap``."""
        out = bytearray()
        while len(out) < n:
            pos = addr + len(out)
            k = self.region_at(pos)
            assert k is not None, f"{pos:#x} is not mapped"
            start, size = self.regions[k]
            take = min(n - len(out), start + size - pos)
            out += snap[k][pos - start : pos - start + take]
        return bytes(out)

    def first_change_outside(
        self, before: Snapshot, after: Snapshot, allowed: Sequence[tuple[int, int]]
    ) -> int | None:
        """The first driver address whose byte changed outside the ``(addr, len)`` ranges."""
        for (start, size), old, new in zip(self.regions, before, after, strict=True):
            if old == new:
                continue
            masked = bytearray(new)
            for addr, length in allowed:
                lo, hi = max(addr, start), min(addr + length, start + size)
                if lo < hi:
                    masked[lo - start : hi - start] = old[lo - start : hi - start]
            if masked != old:
                return start + next(i for i in range(size) if masked[i] != old[i])
        return None


MAP = MemoryMap(REGIONS)


def span(buffers: Sequence[ChainDescriptor], pos: int, n: int) -> list[tuple[int, int]]:
    """The ``(addr, len)`` pieces holding bytes ``[pos, pos + n)`` of the buffers, concatenated."""
    out: list[tuple[int, int]] = []
    for d in buffers:
        if n == 0:
            break
        if pos >= d.len:
            pos -= d.len
            continue
        take = min(d.len - pos, n)
        out.append((d.addr + pos, take))
        n -= take
        pos = 0
    return out


def reachable(pieces: Sequence[tuple[int, int]]) -> int:
    """How many bytes of the pieces, from the first on, the device reaches before a gap."""
    done = 0
    for addr, length in pieces:
        got = MAP.mapped_prefix(addr, length)
        done += got
        if got < length:
            break
    return done


def gather(snap: Snapshot, pieces: Sequence[tuple[int, int]], n: int) -> bytes:
    """The first ``n`` (reachable) bytes of the pieces in ``snap``."""
    out = bytearray()
    for addr, length in pieces:
        take = min(length, n - len(out))
        if take <= 0:
            break
        out += MAP.read(snap, addr, take)
    return bytes(out)


def overlapping(ranges: Sequence[tuple[int, int]]) -> bool:
    spans = sorted((a, a + n) for a, n in ranges if n)
    return any(b[0] < a[1] for a, b in itertools.pairwise(spans))


def reference_walk(
    snap: Snapshot, desc_addr: int, size: int, head: int, indirect_ok: bool
) -> tuple[ChainDescriptor, ...] | None:
    """The validation catalogue (virtio_schema.queue.errors) written out on its own: the buffers of the chain
    at ``head`` as the device must hand them out, or ``None`` if the chain is malformed.

    Rules (virtio 1.2, 2.7.5 and 2.7.5.3): at most ``size`` buffers (indirect entries count, the
    indirect descriptor does not); ``next`` below the table's entries; no readable buffer after a
    writable one; INDIRECT only if negotiated, not nested, not with NEXT, len a non-zero multiple of
    16 of at most 65535 entries, inside device memory (one translation); ``addr + len`` within
    2**64;
    total length at most 2**32 - 1. Zero-length buffers are legal; buffers are not translated here.
    """
    out: list[ChainDescriptor] = []
    base, limit, in_table = desc_addr, size, False
    i, total, seen_writable = head, 0, False
    while True:
        addr, length, flags, nxt = RAW_DESC.unpack(MAP.read(snap, base + 16 * i, 16))
        if flags & INDIRECT:
            if not indirect_ok or in_table or flags & NEXT:
                return None
            if length == 0 or length % 16 or length // 16 > 65535:
                return None
            if addr + length > TOP or not MAP.one_region(addr, length):
                return None
            base, limit, in_table, i = addr, length // 16, True, 0
            continue
        if len(out) + 1 > size or addr + length > TOP:
            return None
        writable = bool(flags & WRITE)
        if seen_writable and not writable:
            return None
        seen_writable = seen_writable or writable
        total += length
        out.append(ChainDescriptor(addr, length, writable, i, in_table))
        if not flags & NEXT:
            break
        if nxt >= limit:
            return None
        i = nxt
    return tuple(out) if total <= MAX_TOTAL else None


def used_ring_size(size: int) -> int:
    return 6 + 8 * size


def avail_ring_size(size: int) -> int:
    return 6 + 2 * size


# --- the state machine ---------------------------------------------------------------------------


@dataclass(eq=False)
class Held:
    """A chain the device holds, with what the test knows about it."""

    chain: DescChain
    gen: int
    """The test's generation (reset/restore count) when the chain was taken."""
    readable: tuple[ChainDescriptor, ...]
    writable: tuple[ChainDescriptor, ...]
    reader: ReadableChain | None = None
    rpos: int = 0
    """Readable bytes the current reader consumed."""
    writer: WritableChain | None = None


@dataclass(frozen=True)
class Published:
    """A chain the driver published well-formed: its shape, and the descriptor records it is made of
    (if those are unchanged when the device takes the head, it must come out as published)."""

    shape: tuple[tuple[int, bool, bool], ...]
    """``(len, writable, indirect)`` of each buffer."""
    records: tuple[tuple[int, bytes], ...]


@dataclass
class Notify:
    """The device's notification state, modelled (virtio 1.2, 2.7.10)."""

    enabled: bool = True
    signalled_valid: bool = False
    signalled_used: int = 0


class HostileDriverMachine(RuleBasedStateMachine):
    """A hostile driver and a device that uses every public call, on one queue."""

    fq: FakeQueue[Queue, FakeDriver]
    driver: FakeDriver
    queue: Queue
    mem: FakeMemory
    size: int
    features: int
    reads: DescReads
    translations: CountingMem

    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.held: list[Held] = []
        self.recent: list[DescChain] = []  # returned chains, for double returns
        self.gen = 0
        self.used_idx = 0
        self.used_expected: list[tuple[int, int]] = []
        self.broken: RingError | None = None
        self.notify = Notify()
        self.published: dict[int, Published] = {}
        self.pool: list[int] = []  # descriptors the driver keeps for hand-made chains
        self.addr_pool: list[int] = []

    # --- setup ----------------------------------------------------------------------------------

    @initialize(
        size=SIZES,
        features=FEATURES,
        start=st.sampled_from([0, 0xFFFF - 2]) | U16S,
    )
    def build(self, size: int, features: int, start: int) -> None:
        self.mem = FakeMemory(regions=REGIONS)
        self.fq = counting_fake(
            size, features=features, state=QueueState(start, start), memory=self.mem
        )
        self.driver, self.queue = self.fq.driver, self.fq.queue
        self.size, self.features = size, features
        self.reads, self.translations = instrument(self.fq)
        self.used_idx = start
        self.notify = Notify(signalled_used=start)
        self.pool = [self.driver.take_descriptor() for _ in range(min(3, size - 1))]
        scratch = [self.driver.alloc_buffer(64) for _ in range(2)]
        crossing = self.mem.alloc_at(BASE + LOW - 24, 48)
        d = self.driver
        # never the used ring: a driver pointing a writable buffer at it is legal but would make the
        # device overwrite the entries this test reads back (see device_writes_into_a_chain)
        self.addr_pool = [
            *scratch,
            crossing,
            BASE + LOW + HIGH - 8,  # runs off the end of region 1
            FAR,
            FAR + FAR_SIZE - 4,
            BASE - 8,  # starts unmapped, ends mapped
            0,
            TOP - 16,
            TOP - 1,
            d.desc_addr,
            d.avail_addr,
        ]
        self.ready = True

    def teardown(self) -> None:
        # return whatever the device still holds (an unreturned chain warns; warnings are errors)
        for h in self.held:
            if not h.chain.returned:
                with contextlib.suppress(VirtioError):
                    h.chain.return_written(0)
        self.held.clear()

    # --- strategies over this machine's memory ---------------------------------------------------

    def addrs(self) -> st.SearchStrategy[int]:
        near = st.builds(
            lambda a, off: (a + off) % TOP, st.sampled_from(self.addr_pool), st.integers(-16, 80)
        )
        return st.sampled_from(self.addr_pool) | near | st.integers(0, TOP - 1)

    def nexts(self, limit: int) -> st.SearchStrategy[int]:
        return st.integers(0, limit) | U16S

    def descs(self, limit: int) -> st.SearchStrategy[Desc]:
        return st.builds(Desc, self.addrs(), LENS, FLAGS, self.nexts(limit))

    def pick(self, data: st.DataObject) -> Held:
        return self.held[data.draw(st.integers(0, len(self.held) - 1), label="held chain")]

    # --- what the test knows ---------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return MAP.snapshot(self.mem)

    def check_writes(self, before: Snapshot, allowed: Sequence[tuple[int, int]], what: str) -> None:
        bad = MAP.first_change_outside(before, self.snapshot(), allowed)
        assert bad is None, f"{what} wrote guest memory at {bad:#x}; allowed only {allowed}"

    def used_field(self, offset: int, length: int) -> tuple[int, int]:
        return (self.driver.used_addr + offset, length)

    def avail_event_range(self) -> tuple[int, int]:
        return self.used_field(4 + 8 * self.size, 2)

    def avail_idx(self) -> int:
        return self.driver.avail.idx()

    def records_of(self, head: int) -> tuple[tuple[int, bytes], ...]:
        """The descriptor records of a chain just published (trusted: the test wrote them)."""
        out: list[tuple[int, bytes]] = []
        base, i = self.driver.desc_addr, head
        for _ in range(2 * self.size + 2):
            where = base + 16 * i
            raw = self.mem.read(where, 16)
            out.append((where, raw))
            addr, _, flags, nxt = RAW_DESC.unpack(raw)
            if flags & INDIRECT:
                base, i = addr, 0
                continue
            if not flags & NEXT:
                break
            i = nxt
        return tuple(out)

    def collect_used(self) -> None:
        """The driver reads the used ring: exactly the entries the device returned, in order."""
        got = [(u.head, u.len) for u in self.driver.used()]
        assert got == self.used_expected, "the driver sees other used entries than were returned"
        self.used_expected.clear()
        for head, _ in got:
            self.published.pop(head, None)

    def saw_broken(self, result: object) -> None:
        """``result`` of a call on a queue that just broke (or was broken)."""
        assert isinstance(result, QueueBroken), f"expected QueueBroken, got {result!r}"
        assert isinstance(result.cause, AvailIndexJump | HeadOutOfRange)
        if self.broken is not None:
            assert result.cause is self.broken, "a broken queue changed its cause"
        assert self.queue.broken is result.cause
        self.broken = result.cause

    # --- the driver: well-formed chains ----------------------------------------------------------

    def publish_chain(self, data: st.DataObject) -> None:
        readable = data.draw(
            st.lists(st.binary(max_size=40) | st.just(bytes(16)), max_size=3), label="readable"
        )
        writable = data.draw(st.lists(st.integers(0, 64), max_size=3), label="writable")
        if not readable and not writable:
            writable = [16]
        indirect = bool(self.features & F_INDIRECT) and data.draw(st.booleans(), label="indirect")
        if len(readable) + len(writable) > self.size:
            return  # longer than the queue: never well-formed (the raw rules make such chains)
        try:
            head = self.driver.publish(readable, writable, indirect=indirect)
        except FakeMemoryFull:
            return
        if head is None:
            return  # no room: a real driver waits for used buffers
        shape = tuple((len(b), False, indirect) for b in readable) + tuple(
            (n, True, indirect) for n in writable
        )
        self.published[head] = Published(shape, self.records_of(head))

    def publish_direct_then_indirect(self, data: st.DataObject) -> None:
        d = self.driver
        k = data.draw(st.integers(1, len(self.pool) - 1), label="direct descriptors")
        direct = data.draw(st.lists(st.binary(max_size=24), min_size=k, max_size=k))
        table_r = data.draw(st.lists(st.binary(max_size=24), max_size=2), label="table readable")
        table_w = data.draw(st.lists(st.integers(0, 48), min_size=1, max_size=3))
        try:
            addrs = [d.alloc_buffer(b) for b in direct]
            entries = [(d.alloc_buffer(b), len(b), 0) for b in table_r]
            entries += [(d.alloc_buffer(n), n, WRITE) for n in table_w]
            table = d.write_indirect_table(
                [
                    Desc(a, n, f | (NEXT if j + 1 < len(entries) else 0), j + 1)
                    for j, (a, n, f) in enumerate(entries)
                ]
            )
        except FakeMemoryFull:
            return
        for j in range(k):
            d.write_desc(self.pool[j], addrs[j], len(direct[j]), NEXT, self.pool[j + 1])
        d.write_desc(self.pool[k], table, 16 * len(entries), INDIRECT, 0)
        d.push_head(self.pool[0])
        shape = tuple((len(b), False, False) for b in direct) + tuple(
            (n, bool(f), True) for _, n, f in entries
        )
        self.published[self.pool[0]] = Published(shape, self.records_of(self.pool[0]))

    # --- the driver: corruption ------------------------------------------------------------------

    def write_arbitrary_descriptor(self, data: st.DataObject) -> None:
        taken = [d.desc_index for h in self.held for d in h.readable + h.writable if not d.indirect]
        indices = st.integers(0, self.size - 1)
        if taken:  # also under chains the device already holds
            indices |= st.sampled_from(taken)
        index = data.draw(indices, label="index")
        rec = data.draw(self.descs(self.size), label="desc")
        self.driver.write_desc(index, *rec)

    def link_a_loop(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(1, min(self.size, 4)), label="length")
        ring = data.draw(st.lists(st.integers(0, self.size - 1), min_size=n, max_size=n))
        last_next = data.draw(st.none() | st.integers(self.size, 0xFFFF), label="bad next")
        writable_from = data.draw(st.integers(0, n), label="first writable")
        for j, index in enumerate(ring):
            nxt = ring[(j + 1) % n] if last_next is None or j + 1 < n else last_next
            flags = NEXT | (WRITE if j >= writable_from else 0)
            self.driver.write_desc(index, self.addr_pool[0], 8, flags, nxt)
        self.driver.push_head(ring[0])

    def publish_bad_indirect_table(self, data: st.DataObject) -> None:
        entries = data.draw(st.lists(self.descs(6), max_size=6), label="entries")
        try:
            table = self.driver.write_indirect_table(entries)
        except FakeMemoryFull:
            return
        n = max(len(entries), 1)
        length = data.draw(
            st.sampled_from(
                [0, 8, 15, 16 * n, 16 * n + 1, 16 * n - 16, 16 * (n + 1), 65535 * 16, 65536 * 16]
            )
            | LENS,
            label="len",
        )
        where = data.draw(st.sampled_from([table, table + 8, TOP - 16]) | self.addrs())
        flags = INDIRECT | data.draw(st.sampled_from([0, 0, NEXT, WRITE]), label="more flags")
        index = data.draw(st.integers(0, self.size - 1), label="index")
        self.driver.write_desc(index, where, length, flags, data.draw(self.nexts(self.size)))
        head = index
        if data.draw(st.booleans(), label="direct first"):
            head = data.draw(st.integers(0, self.size - 1), label="head")
            if head != index:
                self.driver.write_desc(head, self.addr_pool[0], 4, NEXT, index)
        self.driver.push_head(head)

    def heads(self) -> st.SearchStrategy[int]:
        """Mostly in range (so chains get taken), else anything up to 65535."""
        in_range = st.integers(0, self.size - 1)
        return st.one_of(in_range, in_range, st.integers(0, self.size) | U16S)

    @rule(data=st.data())
    def driver_publishes(self, data: st.DataObject) -> None:
        kinds = ["chain", "chain"]
        if self.features & F_INDIRECT and len(self.pool) >= 2:
            kinds.append("direct then indirect")
        for _ in range(data.draw(st.integers(1, 3), label="chains")):
            if data.draw(st.sampled_from(kinds), label="publish") == "chain":
                self.publish_chain(data)
            else:
                self.publish_direct_then_indirect(data)

    @rule(data=st.data())
    def driver_corrupts_descriptors(self, data: st.DataObject) -> None:
        kind = data.draw(st.sampled_from(["arbitrary", "loop", "bad indirect table"]), label="kind")
        if kind == "arbitrary":
            for _ in range(data.draw(st.integers(1, 3), label="descriptors")):
                self.write_arbitrary_descriptor(data)
        elif kind == "loop":
            self.link_a_loop(data)
        else:
            self.publish_bad_indirect_table(data)

    @rule(data=st.data())
    def driver_corrupts_the_avail_ring(self, data: st.DataObject) -> None:
        d = self.driver
        kind = data.draw(
            st.sampled_from(["push head", "rewrite slot", "move idx", "flags and used_event"]),
            label="kind",
        )
        if kind == "push head":
            d.push_head(data.draw(self.heads(), label="head"))
        elif kind == "rewrite slot":
            slot = data.draw(st.integers(0, self.size - 1), label="slot")
            d.avail.set_ring(slot, data.draw(self.heads(), label="head"))
        elif kind == "move idx":
            near = st.integers(0, self.size)
            delta = data.draw(st.one_of(near, near, st.integers(-2, self.size + 2) | U16S))
            d.set_avail_idx(d.avail_idx + delta)
        else:
            d.set_avail_flags(data.draw(st.sampled_from([0, NO_INTERRUPT]) | U16S, label="flags"))
            d.set_used_event(data.draw(U16S, label="used_event"))

    # --- the device: taking chains ---------------------------------------------------------------

    @rule()
    def device_takes_a_chain(self) -> None:
        self.take_chain()

    @rule(data=st.data())
    def device_serves_a_chain(self, data: st.DataObject) -> None:
        """The usual device loop in one step: take, read, write, return (up to three times)."""
        for _ in range(data.draw(st.integers(1, 3), label="chains")):
            h = self.take_chain()
            if h is None:
                return
            if data.draw(st.booleans(), label="read"):
                self.read_chain(h, data)
            if data.draw(st.booleans(), label="write"):
                self.write_chain(h, data)
            self.return_chain(h, data)
            if h in self.held:  # a refused return: the chain stays held
                return

    def take_chain(self) -> Held | None:
        """``next_chain()``, checked against the reference walk; the chain taken, if any."""
        q = self.queue
        before = self.snapshot()
        next_avail = q.next_avail
        was_broken = self.broken
        writes_event = (
            bool(self.features & F_EVENT_IDX) and self.notify.enabled and was_broken is None
        )
        self.reads.count = self.translations.calls = 0
        result = device_call(q.next_chain)
        reads, translations = self.reads.count, self.translations.calls
        # bounded work: one indirect table at most; size buffers, one more to see the chain is too
        # long, and the indirect descriptor (the documented bound: see the focused test)
        assert translations <= 1
        assert reads <= self.size + 1 + translations, f"{reads} descriptor reads"
        self.check_writes(before, [self.avail_event_range()] if writes_event else [], "next_chain")
        if was_broken is not None:
            self.saw_broken(result)
            assert reads == translations == 0, "a broken queue read guest memory"
            assert self.snapshot() == before
            return None
        after = self.snapshot()  # what the walk read (avail_event is written before it)
        avail = U16.unpack(MAP.read(after, self.driver.avail_addr + 2, 2))[0]
        pending = (avail - next_avail) & 0xFFFF
        if pending == 0:
            assert result is None
            assert q.next_avail == next_avail
            return None
        slot = next_avail & (self.size - 1)
        head = U16.unpack(MAP.read(after, self.driver.avail_addr + 4 + 2 * slot, 2))[0]
        if pending > self.size or head >= self.size:
            self.saw_broken(result)
            kind = AvailIndexJump if pending > self.size else HeadOutOfRange
            event(f"next_chain: {kind.__name__}")
            assert isinstance(self.broken, kind)
            assert q.next_avail == next_avail, "the bad entry was consumed"
            assert self.snapshot() == before
            # latched: the same error again, without reading anything
            again = device_call(q.next_chain)
            self.saw_broken(again)
            assert self.snapshot() == before
            return None
        assert isinstance(result, DescChain), f"expected a chain, got {result!r}"
        chain = result
        assert chain.head == head
        assert not chain.returned
        assert q.next_avail == (next_avail + 1) & 0xFFFF
        if writes_event:
            assert self.driver.avail_event == q.next_avail
        expected = reference_walk(
            after, self.driver.desc_addr, self.size, head, bool(self.features & F_INDIRECT)
        )
        if chain.error is not None:
            assert expected is None, f"valid chain {expected} refused: {chain.error}"
            assert isinstance(chain.error, ChainError)
            assert chain.error.head == head
            assert len(chain) == 0
            assert device_call(chain.descriptors) is chain.error
            held = Held(chain, self.gen, (), ())
        else:
            got = chain.descriptors()
            assert got == expected, f"chain {got} differs from the reference walk {expected}"
            held = Held(chain, self.gen, chain.readable(), chain.writable())
            assert chain.readable_len == sum(d.len for d in held.readable)
            assert chain.writable_len == sum(d.len for d in held.writable)
        self.held.append(held)
        event(f"next_chain: {type(chain.error).__name__ if chain.error else 'chain'}")
        pub = self.published.get(head)
        # (an indirect table may hold more entries than the queue size: then it is too long)
        if (
            pub is not None
            and len(pub.shape) <= self.size
            and all(self.mem.read(a, 16) == raw for a, raw in pub.records)
        ):
            assert chain.error is None, f"a well-formed chain came out malformed: {chain.error}"
            shape = tuple((d.len, d.writable, d.indirect) for d in chain.descriptors())
            assert shape == pub.shape
        return held

    def ask_pending(self) -> None:
        before = self.snapshot()
        self.reads.count = self.translations.calls = 0
        result = device_call(self.queue.pending)
        assert self.reads.count == self.translations.calls == 0
        assert self.snapshot() == before, "pending() wrote guest memory"
        n = (self.avail_idx() - self.queue.next_avail) & 0xFFFF
        if self.broken is not None or n > self.size:
            self.saw_broken(result)
        else:
            assert result == n

    # --- the device: reading and writing ---------------------------------------------------------

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def device_reads_a_chain(self, data: st.DataObject) -> None:
        self.read_chain(self.pick(data), data)

    def read_chain(self, h: Held, data: st.DataObject) -> None:
        chain = h.chain
        before = self.snapshot()
        if chain.error is not None:
            assert device_call(lambda: ReadableChain(chain)) is chain.error
            assert self.snapshot() == before
            return
        if self.broken is not None:  # a broken queue's chains touch no guest memory
            stuck = device_call(lambda: ReadableChain(chain))
            assert isinstance(stuck, ReadableChain)
            self.saw_broken(device_call(lambda: stuck.read(1)))
            self.saw_broken(device_call(lambda: stuck.read_record(BLK_REQ_HDR)))
            assert self.snapshot() == before
            return
        reader = h.reader
        if reader is None or data.draw(st.booleans(), label="fresh reader"):
            fresh = device_call(lambda: ReadableChain(chain))
            assert isinstance(fresh, ReadableChain)
            reader = h.reader = fresh
            h.rpos = 0
        left = chain.readable_len - h.rpos
        remaining = device_call(reader.remaining)
        assert not isinstance(remaining, VirtioError)
        assert remaining.bytes == left
        how = data.draw(st.sampled_from(["read", "readinto", "record", "readall"]), label="how")
        n = data.draw(st.integers(0, 80), label="n")
        if how == "record":
            n = BLK_REQ_HDR.size
        elif how == "readall":
            n = left if left <= 4096 else n  # the test never asks for gigabytes
            how = "read" if left > 4096 else how
        want = min(n, left)
        pieces = span(h.readable, h.rpos, want)
        ok = reachable(pieces)
        expected = gather(before, pieces, ok)
        buf = bytearray(n)
        calls: dict[str, Callable[[], object]] = {
            "read": lambda: reader.read(n),
            "readinto": lambda: reader.readinto(buf),
            "record": lambda: reader.read_record(BLK_REQ_HDR),
            "readall": reader.readall,
        }
        result = device_call(calls[how])
        assert self.snapshot() == before, "reading a chain wrote guest memory"
        if how == "record" and left < BLK_REQ_HDR.size:
            assert isinstance(result, InsufficientData)
            return
        event(f"read: {'unmapped' if ok < want else 'ok'}")
        if ok < want:
            assert isinstance(result, UnmappedBuffer), f"expected UnmappedBuffer, got {result!r}"
            assert result.head == chain.head
            h.rpos += ok
            return
        h.rpos += want
        if how == "readinto":
            assert result == want
            assert bytes(buf[:want]) == expected
        elif how == "record":
            assert result == BLK_REQ_HDR.unpack(expected)
        else:
            assert result == expected

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def device_writes_into_a_chain(self, data: st.DataObject) -> None:
        self.write_chain(self.pick(data), data)

    def write_chain(self, h: Held, data: st.DataObject) -> None:
        chain = h.chain
        before = self.snapshot()
        if chain.error is not None:
            assert device_call(lambda: WritableChain(chain)) is chain.error
            assert self.snapshot() == before
            return
        used = (self.driver.used_addr, used_ring_size(self.size))
        if any(overlapping([used, (d.addr, d.len)]) for d in h.writable):
            return  # the driver aimed a buffer at its own used ring: legal, but not modelled here
        if self.broken is not None:  # a broken queue's chains touch no guest memory
            written = chain.written
            self.saw_broken(device_call(lambda: WritableChain(chain).write(b"x")))
            assert chain.written == written
            assert self.snapshot() == before
            return
        if h.writer is None:
            writer = device_call(lambda: WritableChain(chain))
            assert isinstance(writer, WritableChain)
            h.writer = writer
        writer = h.writer
        payload = data.draw(st.binary(max_size=80), label="payload")
        pos = chain.written
        want = min(len(payload), chain.writable_len - pos)
        pieces = span(h.writable, pos, want)
        ok = reachable(pieces)
        result = device_call(lambda: writer.write(payload))
        event(f"write: {'unmapped' if ok < want else 'ok'}")
        if ok < want:
            assert isinstance(result, UnmappedBuffer), f"expected UnmappedBuffer, got {result!r}"
            landed = ok
        else:
            assert result == want
            landed = want
        assert chain.written == pos + landed
        self.check_writes(before, span(h.writable, pos, landed), "WritableChain.write")
        if not overlapping([(d.addr, d.len) for d in h.writable]):
            assert gather(self.snapshot(), pieces, landed) == payload[:landed]

    # --- the device: returning chains ------------------------------------------------------------

    def finish_return(self, h: Held, length: int, before: Snapshot) -> None:
        """Check a return that went through: the used element, used.idx and the notification."""
        chain = h.chain
        assert chain.returned
        self.held.remove(h)
        self.recent = [*self.recent[-3:], chain]
        notified = self.fq.notifier.take()
        if h.gen != self.gen or self.broken is not None:
            # stale (taken before a reset/restore) or broken: the ring is left alone
            assert self.snapshot() == before, "a stale or broken return wrote guest memory"
            assert notified == 0
            return
        slot = self.used_idx & (self.size - 1)
        allowed = [self.used_field(4 + 8 * slot, 8), self.used_field(2, 2)]
        self.check_writes(before, allowed, "return_written")
        elem = self.driver.used_ring.elem(slot)
        assert (elem.id, elem.len) == (chain.head, length)
        self.used_idx = new = (self.used_idx + 1) & 0xFFFF
        assert self.driver.used_ring.idx() == new
        self.used_expected.append((chain.head, length))
        n = self.notify
        if self.features & F_EVENT_IDX:
            old, valid = n.signalled_used, n.signalled_valid
            n.signalled_used, n.signalled_valid = new, True
            expect = not valid or vring_need_event(self.driver.avail.used_event(), new, old)
        else:
            expect = not self.driver.avail.flags() & NO_INTERRUPT
        assert notified == int(expect), f"notified {notified} times, expected {int(expect)}"
        self.collect_used()

    @precondition(lambda self: self.held or self.recent)
    @rule(data=st.data())
    def device_returns_a_chain(self, data: st.DataObject) -> None:
        if not self.held or (self.recent and data.draw(st.booleans(), label="again")):
            self.return_again(data)
        else:
            self.return_chain(self.pick(data), data)

    def return_chain(self, h: Held, data: st.DataObject) -> None:
        """Return ``h`` by one of the routes a device has, including a refused one."""
        chain = h.chain
        good = chain.error is None
        space = chain.writable_len
        how = data.draw(
            st.sampled_from(["with", "n", "default", "too much", "writer with", "reader with"]),
            label="how",
        )
        before = self.snapshot()
        if how == "too much":
            n = space + data.draw(st.integers(1, 1 << 33), label="excess")
            result = device_call(lambda: chain.return_written(n))
            if good:
                assert isinstance(result, WrittenTooMuch)
                assert (result.written, result.writable) == (n, space)
                assert not chain.returned, "a refused return still returned the chain"
                assert self.snapshot() == before
                assert self.fq.notifier.take() == 0
                return
            assert result is None
            self.finish_return(h, 0, before)
            return
        if how in {"writer with", "reader with"} and good:
            walker: WritableChain | ReadableChain
            if how == "writer with":
                walker = h.writer or WritableChain(chain)
                length = chain.written
            else:
                walker = ReadableChain(chain)
                length = 0

            def leave_block() -> None:
                with walker:
                    pass

            assert device_call(leave_block) is None
            self.finish_return(h, length, before)
            return
        if how == "with":
            w = data.draw(st.integers(0, space), label="written")

            def with_block() -> None:
                with chain:
                    chain.written = w

            assert device_call(with_block) is None
            self.finish_return(h, w if good else 0, before)
            return
        if how == "n":
            n = data.draw(st.integers(0, space), label="n")
            assert device_call(lambda: chain.return_written(n)) is None
            self.finish_return(h, n if good else 0, before)
            return
        length = chain.written if good else 0
        assert device_call(chain.return_written) is None
        self.finish_return(h, length, before)

    def return_again(self, data: st.DataObject) -> None:
        chain = self.recent[data.draw(st.integers(0, len(self.recent) - 1), label="returned")]
        before = self.snapshot()
        assert isinstance(device_call(chain.return_written), ChainAlreadyReturned)
        assert isinstance(device_call(lambda: chain.return_written(0)), ChainAlreadyReturned)
        if chain.error is None:
            assert isinstance(device_call(lambda: ReadableChain(chain)), ChainAlreadyReturned)
        assert chain.returned
        assert self.snapshot() == before
        assert self.fq.notifier.take() == 0

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def device_returns_everything(self, data: st.DataObject) -> None:
        order = data.draw(st.permutations(self.held), label="order")
        for h in order:
            before = self.snapshot()
            length = h.chain.written if h.chain.error is None else 0
            assert device_call(h.chain.return_written) is None
            self.finish_return(h, length, before)
        assert not self.held

    # --- the device: notifications, reset, restore -----------------------------------------------

    @rule(data=st.data())
    def device_polls(self, data: st.DataObject) -> None:
        """``pending()``, or turning notifications off or on."""
        what = data.draw(st.sampled_from(["pending", "off", "on"]), label="poll")
        if what == "pending":
            self.ask_pending()
        elif what == "off":
            self.disable_notifications()
        else:
            self.enable_notifications()

    def disable_notifications(self) -> None:
        before = self.snapshot()
        flags = self.driver.used_ring.flags()
        assert device_call(self.queue.disable_notifications) is None
        self.notify.enabled = False
        if self.broken is not None or self.features & F_EVENT_IDX:
            assert self.snapshot() == before
            return
        self.check_writes(before, [self.used_field(0, 2)], "disable_notifications")
        assert self.driver.used_ring.flags() == flags | NO_NOTIFY

    def enable_notifications(self) -> None:
        before = self.snapshot()
        flags = self.driver.used_ring.flags()
        result = device_call(self.queue.enable_notifications)
        self.notify.enabled = True
        if self.broken is not None:
            self.saw_broken(result)
            assert self.snapshot() == before
            return
        if self.features & F_EVENT_IDX:
            self.check_writes(before, [self.avail_event_range()], "enable_notifications")
            assert self.driver.avail_event == self.queue.next_avail
        else:
            self.check_writes(before, [self.used_field(0, 2)], "enable_notifications")
            assert self.driver.used_ring.flags() == flags & ~NO_NOTIFY & 0xFFFF
        assert result == (self.avail_idx() != self.queue.next_avail)

    def restart(self, used_idx: int) -> None:
        self.gen += 1
        self.broken = None
        self.used_idx = used_idx
        self.notify = Notify(signalled_used=used_idx)
        assert self.queue.broken is None
        assert self.queue.next_used == used_idx

    @rule(data=st.data())
    def device_restarts_the_queue(self, data: st.DataObject) -> None:
        if data.draw(st.booleans(), label="reset"):
            self.reset()
        else:
            self.restore(data)

    def reset(self) -> None:
        before = self.snapshot()
        assert device_call(self.queue.reset) is None
        assert self.snapshot() == before, "reset() wrote guest memory"
        assert self.queue.state() == QueueState(0, 0)
        self.restart(0)
        # the driver sets the queue up again (virtio 1.2, 3.1.1): fresh rings, indices 0
        d = self.driver
        self.mem.write(d.used_addr, bytes(used_ring_size(self.size)))
        self.mem.write(d.avail_addr, bytes(avail_ring_size(self.size)))
        d.set_avail_idx(0)
        d.last_used = 0

    def restore(self, data: st.DataObject) -> None:
        next_avail = data.draw(
            st.one_of(*[st.just(self.queue.next_avail), st.just(self.driver.avail_idx)] * 2, U16S),
            label="next_avail",
        )
        before = self.snapshot()
        state = QueueState(next_avail, self.used_idx)
        assert device_call(lambda: self.queue.restore(state)) is None
        assert self.snapshot() == before, "restore() wrote guest memory"
        assert self.queue.state() == state
        self.restart(self.used_idx)

    # --- after every step ------------------------------------------------------------------------

    @invariant()
    def every_return_is_seen_once_and_counted_by_used_idx(self) -> None:
        if not self.ready:
            return
        assert self.queue.next_used == self.used_idx
        assert self.driver.used_ring.idx() == self.used_idx
        self.collect_used()
        assert self.fq.notifier.take() == 0, "a notification outside a return"

    @invariant()
    def broken_latch_holds_until_reset(self) -> None:
        if self.ready:
            assert self.queue.broken is self.broken

    @invariant()
    def held_chains_are_unreturned_and_returned_ones_stay_returned(self) -> None:
        assert all(not h.chain.returned for h in self.held)
        assert all(c.returned for c in self.recent)


HostileDriverMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
TestHostileDriver = HostileDriverMachine.TestCase


# --- single-shot hostile rings --------------------------------------------------------------------


def hostile_fake(size: int, features: int, start: int) -> FakeQueue[Queue, FakeDriver]:
    return counting_fake(
        size,
        features=features,
        state=QueueState(start, start),
        memory=FakeMemory(regions=REGIONS),
    )


@dataclass
class Drained:
    """What draining a queue did: the ranges the device may have written, how it ended."""

    allowed: list[tuple[int, int]] = field(default_factory=list)
    calls: int = 0
    ended: bool = False


def drain(fq: FakeQueue[Queue, FakeDriver], data: st.DataObject) -> Drained:
    """Take chains until ``None`` or :class:`QueueBroken` (at most size + 1 calls), reading,
    writing and returning each; checks the per-call invariants on the way."""
    q = fq.queue
    size = q.size
    reads, translations = instrument(fq)
    out = Drained([(fq.driver.used_addr, used_ring_size(size))])
    while out.calls < size + 1:
        out.calls += 1
        reads.count = translations.calls = 0
        result = device_call(q.next_chain)
        assert translations.calls <= 1
        assert reads.count <= size + 1 + translations.calls
        if result is None or isinstance(result, QueueBroken):
            if isinstance(result, QueueBroken):
                assert isinstance(result.cause, AvailIndexJump | HeadOutOfRange)
                assert q.broken is result.cause
                before = MAP.snapshot(fq.memory)
                reads.count = translations.calls = 0
                assert isinstance(device_call(q.next_chain), QueueBroken)
                assert reads.count == translations.calls == 0
                assert MAP.snapshot(fq.memory) == before
            out.ended = True
            return out
        assert isinstance(result, DescChain), f"next_chain gave {result!r}"
        with result as chain:
            if chain.error is not None:
                assert isinstance(chain.error, ChainError)
                continue
            out.allowed += [(d.addr, d.len) for d in chain.writable()]
            r = device_call(lambda: ReadableChain(chain).read(data.draw(st.integers(0, 64))))
            assert isinstance(r, bytes | VirtioError)
            avail = (fq.driver.avail_addr, avail_ring_size(size))
            if any(overlapping([avail, (d.addr, d.len)]) for d in chain.writable()):
                continue  # writing the avail ring would publish more chains than the cap allows
            w = device_call(lambda: WritableChain(chain).write(data.draw(st.binary(max_size=64))))
            assert isinstance(w, int | VirtioError)
    return out


def descriptor_bytes(
    fq: FakeQueue[Queue, FakeDriver], tables: Sequence[int]
) -> st.SearchStrategy[bytes]:
    """A descriptor record: raw bytes, or fields aimed at memory the queue can reach."""
    size = fq.queue.size
    addrs = st.sampled_from([*tables, fq.driver.desc_addr, BASE + LOW - 8, FAR, 0, TOP - 16])
    fields = st.builds(
        RAW_DESC.pack,
        addrs | st.integers(0, TOP - 1),
        st.sampled_from([0, 16, 32, 48, 64, 1 << 20]) | LENS,
        FLAGS,
        st.integers(0, size) | U16S,
    )
    return st.binary(min_size=16, max_size=16) | fields


@settings(max_examples=200)
@given(data=st.data(), size=SIZES, features=FEATURES, start=st.sampled_from([0, 0xFFFE]) | U16S)
def test_arbitrary_ring_bytes_raise_only_virtio_errors_read_boundedly_and_write_only_where_allowed(
    data: st.DataObject, size: int, features: int, start: int
) -> None:
    fq = hostile_fake(size, features, start)
    d, mem = fq.driver, fq.memory
    tables = [mem.alloc(64, 16) for _ in range(2)]
    raw = data.draw(st.booleans(), label="pure raw bytes")
    desc = st.binary(min_size=16, max_size=16) if raw else descriptor_bytes(fq, tables)
    for i in range(size):
        mem.write(d.desc_addr + 16 * i, data.draw(desc, label=f"desc {i}"))
    for t in tables:
        for k in range(4):
            mem.write(t + 16 * k, data.draw(desc, label="table entry"))
    if raw:
        avail = data.draw(st.binary(min_size=avail_ring_size(size), max_size=avail_ring_size(size)))
    else:
        heads = data.draw(st.lists(st.integers(0, size) | U16S, min_size=size, max_size=size))
        moved = data.draw(st.integers(0, size + 1) | U16S, label="avail idx - start")
        flags, used_event = data.draw(U16S), data.draw(U16S)
        avail = struct.pack(f"<HH{size}HH", flags, (start + moved) & 0xFFFF, *heads, used_event)
    mem.write(d.avail_addr, avail)
    before = MAP.snapshot(mem)
    drained = drain(fq, data)
    assert drained.ended, f"still handing out chains after {drained.calls} calls"
    bad = MAP.first_change_outside(before, MAP.snapshot(mem), drained.allowed)
    assert bad is None, f"the device wrote at {bad:#x}"


def test_looping_chain_reads_at_most_queue_size_plus_one_descriptors_and_the_indirect_one() -> None:
    """The bound split.py and walk.py document (rule 2): at most ``size`` buffers are accepted per
    chain, direct and indirect alike, and one table is followed, so a chain reads at most
    ``size + 2`` descriptors: ``size`` buffers, one more to see the chain is too long, and the
    indirect descriptor."""
    over: list[str] = []
    for size in (1, 2, 4, 8, 16):
        for shape in ("direct loop", "indirect loop", "direct then indirect loop"):
            fq = counting_fake(size, features=F_INDIRECT, memory=FakeMemory(1 << 16))
            d = fq.driver
            buf = d.alloc_buffer(8)
            allowed = size + 1
            if shape == "direct loop":
                d.write_desc(0, buf, 8, NEXT, 0)  # 0 -> 0 -> 0 ...
            else:
                table = d.write_indirect_table([Desc(buf, 8, NEXT, 0)])  # entry 0 -> 0 ...
                indirect_at = 0 if shape == "indirect loop" or size == 1 else 1
                if indirect_at:
                    d.write_desc(0, buf, 8, NEXT, 1)
                d.write_desc(indirect_at, table, 16, INDIRECT, 0)
                allowed += 1
            d.push_head(0)
            reads, _ = instrument(fq)
            chain = fq.queue.next_chain()
            assert chain is not None
            with chain:
                assert isinstance(chain.error, ChainError)
            if reads.count > allowed:
                over.append(f"size {size}, {shape}: {reads.count} reads > {allowed}")
    assert not over, "descriptor reads above the documented bound:\n" + "\n".join(over)


def test_read_all_of_an_unmapped_chain_fails_before_allocating_the_length_the_driver_claims() -> (
    None
):
    """One 16-byte descriptor must not make the device allocate what its ``len`` claims: the
    buffer is not in guest memory, so ``read()`` can only raise :class:`UnmappedBuffer`. The claim
    here is 256 MiB; a driver may claim 2**32 - 1 bytes: 4 GiB allocated and zeroed per chain."""
    claimed = 1 << 28
    fq = make_queue(4, memory=FakeMemory(1 << 16))
    fq.driver.write_desc(0, 1 << 40, claimed, 0, 0)  # readable, far outside guest memory
    fq.driver.push_head(0)
    chain = fq.queue.next_chain()
    assert chain is not None
    with chain:
        tracemalloc.start()
        try:
            result = device_call(ReadableChain(chain).read)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert isinstance(result, UnmappedBuffer)
    assert peak < 1 << 20, f"read() allocated {peak} bytes for a buffer that is not in memory"


@settings(max_examples=100)
@given(
    data=st.data(),
    indirect=st.booleans(),
    payload=st.binary(min_size=1, max_size=48),
    space=st.integers(1, 48),
)
def test_descriptors_rewritten_after_next_chain_never_redirect_reads_or_writes(
    data: st.DataObject, indirect: bool, payload: bytes, space: int
) -> None:
    fq = make_queue(8, features=F_INDIRECT, memory=FakeMemory(regions=REGIONS))
    d, mem = fq.driver, fq.memory
    canary = d.alloc_buffer(b"\xa5" * 256)
    head = d.publish([payload], [space], indirect=indirect)
    assert head is not None
    table_entries = [d.desc_table.get(head)]
    chain = fq.queue.next_chain()
    assert chain is not None
    with chain:
        # the driver now points every descriptor (and indirect entry) at the canary
        evil = st.builds(
            Desc,
            st.sampled_from([canary, canary + 16]) | st.integers(0, TOP - 1),
            st.integers(0, 256) | LENS,
            FLAGS,
            U16S,
        )
        for i in range(8):
            d.write_desc(i, *data.draw(evil))
        if indirect:
            for k in range(2):
                mem.write(table_entries[0].addr + 16 * k, RAW_DESC.pack(*data.draw(evil)))
        before = MAP.snapshot(mem)
        assert ReadableChain(chain).read() == payload
        writer = WritableChain(chain)
        assert writer.write(b"\x5a" * (space + 8)) == space
        (wbuf,) = chain.writable()
        assert MAP.first_change_outside(before, MAP.snapshot(mem), [(wbuf.addr, wbuf.len)]) is None
        assert mem.read(canary, 256) == b"\xa5" * 256
    (used,) = d.used()
    assert (used.head, used.len) == (head, space)
    assert used.data == b"\x5a" * space


@settings(max_examples=100)
@given(data=st.data(), size=SIZES, features=FEATURES)
def test_broken_queue_touches_no_memory_whatever_the_driver_does_until_reset(
    data: st.DataObject, size: int, features: int
) -> None:
    fq = hostile_fake(size, features, 0)
    d, q = fq.driver, fq.queue
    assert d.publish([], [8]) is not None
    held = q.next_chain()
    assert held is not None
    with held:
        if data.draw(st.booleans(), label="jump"):
            d.set_avail_idx(d.avail_idx + data.draw(st.integers(size + 1, 0xFFFF - 1)))
        else:
            d.push_head(data.draw(st.integers(size, 0xFFFF)))
        reads, translations = instrument(fq)
        first = device_call(q.next_chain)
        assert isinstance(first, QueueBroken)
        ops = data.draw(
            st.lists(
                st.sampled_from(
                    ["desc", "head", "idx", "next", "pending", "on", "off", "write", "return"]
                ),
                max_size=20,
            )
        )
        for op in ops:
            if op == "desc":
                d.write_desc(
                    data.draw(st.integers(0, size - 1)),
                    *data.draw(st.builds(Desc, st.integers(0, TOP - 1), LENS, FLAGS, U16S)),
                )
            elif op == "head":
                d.push_head(data.draw(U16S))
            elif op == "idx":
                d.set_avail_idx(data.draw(U16S))
            else:
                before = MAP.snapshot(fq.memory)
                calls: dict[str, Callable[[], object]] = {
                    "next": q.next_chain,
                    "pending": q.pending,
                    "on": q.enable_notifications,
                    "off": q.disable_notifications,
                    "write": lambda: WritableChain(held).write(b"late"),
                    "return": lambda: None if held.returned else held.return_written(8),
                }
                result = device_call(calls[op])
                if op in {"next", "pending", "on"} or (op == "write" and not held.returned):
                    assert isinstance(result, QueueBroken)
                    assert result.cause is first.cause
                assert MAP.snapshot(fq.memory) == before, f"{op} on a broken queue wrote memory"
                assert reads.count == translations.calls == 0, f"{op} on a broken queue read"
                assert fq.notifier.count == 0
    assert d.used() == []
    q.reset()
    assert q.broken is None
    d.set_avail_idx(0)
    d.last_used = 0
    d.used_ring.set_idx(0)
    d.write_desc(0, d.alloc_buffer(b"again"), 5, 0, 0)
    d.push_head(0)
    chain = q.next_chain()
    assert chain is not None
    with chain:
        assert ReadableChain(chain).read() == b"again"
    assert [(u.head, u.len) for u in d.used()] == [(0, 0)]
