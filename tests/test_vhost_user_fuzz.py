"""Message-level fuzzing of the vhost-user protocol core
(:class:`~virtio_schema.vhost_user.backend.Backend`) with no socket, fd or mapping: a
:class:`FakeHost` maps bytearrays and counts closes.

A state machine (:class:`BackendFuzz`) plays a front-end that mixes well-formed messages that make
progress (negotiation, a memory table of one or two regions, starting rings, config space, reset)
with malformed and hostile ones (any request number, any flags, wrong payload sizes, random payload
bytes, wrong fd kinds and counts, ring indices out of range, ring addresses outside memory), and a
guest driver that writes well-formed chains (split, or packed with
:class:`~virtio_schema.fake_queue.FakePackedDriver` when RING_PACKED was negotiated) or arbitrary
bytes into the ring areas; the server's
part is played too: turns (``serve``), polls, wake-ups, call signals, a failed kick fd, and closing
the connection after a :class:`~virtio_schema.vhost_user.backend.FrontendError`.

What the server and a device author rely on, checked at every step:

1. ``handle()`` returns ``None`` or one well-formed reply (same request, flags version 1 with REPLY,
   size = payload), or raises ``FrontendError``; ``serve()``, ``poll()`` and ``kick_failed()``
   raise nothing, whatever the ring memory holds.
2. NEED_REPLY with REPLY_ACK negotiated is answered with exactly one ack (a request without its own
   reply): 0 when it took effect, 1 when it was refused (recorded in ``refusals``; nothing changed).
3. Every fd given is kept by a ring or closed once, before ``handle()`` returns; after ``close()``
   every fd given was closed exactly once. Every mapping is closed exactly once: when a new memory
   table replaced it, when its table was refused, or at ``close()``.
4. The device hears well-nested hooks per ring (``started`` before ``enabled``, ``disabled`` before
   ``stopped``, ``handle`` only in between), matching the ring state table.
5. A queue that is not enabled hands out nothing; a turn takes at most the ring's budget and
   ``Turn.taken`` is what the device took; ``kick_fds()`` holds only open kick fds.
6. A packed ring the guest driver keeps well-formed starts at the base SET_VRING_BASE gave it (or
   GET_VRING_BASE returned), as :func:`~virtio_schema.vhost_user.backend.decode_vring_base` reads
   it; each used descriptor the device writes there carries the id of a chain the driver published
   and not yet got back, with the bytes the device wrote; a turn writes one per chain it took.

Run longer with ``VIRTIO_SCHEMA_FUZZ_EXAMPLES=5000`` (and ``VIRTIO_SCHEMA_FUZZ_STEPS``).
"""

from __future__ import annotations

import enum
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from virtio_schema.chain import ReadableChain
from virtio_schema.errors import DriverError
from virtio_schema.fake_queue import FakeMemory, FakeMemoryFull, FakePackedDriver
from virtio_schema.queue import QueueBroken, QueueState, VirtQueue
from virtio_schema.ring import DESC, Desc
from virtio_schema.schema import DescFlags, Feature
from virtio_schema.vhost_user.backend import (
    DPDK_PACKED_BASE,
    LOG_ALL,
    Backend,
    Fd,
    FdKind,
    Mapping,
    MemoryRefused,
    Turn,
    decode_vring_base,
)
from virtio_schema.vhost_user.device import VhostUserDevice
from virtio_schema.vhost_user.errors import FrontendError
from virtio_schema.vhost_user.messages import (
    CONFIG_HDR,
    HEADER,
    MEM_REGION,
    MEMORY_HDR,
    NOFD,
    OWN_REPLIES,
    U64,
    VRING_ADDR,
    VRING_STATE,
    ConfigHdrRec,
    HeaderFlags,
    MemoryHdrRec,
    MemoryRegionRec,
    ProtocolFeature,
    Request,
    U64Rec,
    VringAddrRec,
    VringStateRec,
)
from virtio_schema.vhost_user.rings import RingState

EXAMPLES = int(os.environ.get("VIRTIO_SCHEMA_FUZZ_EXAMPLES", "400"))
STEPS = int(os.environ.get("VIRTIO_SCHEMA_FUZZ_STEPS", "40"))

NUM_QUEUES = 2
VERSION = 1
NEED_REPLY = int(HeaderFlags.NEED_REPLY)
REPLY = int(HeaderFlags.REPLY)
CONFIG_SIZE = 16
WRITABLE_CONFIG = range(8, 12)
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


class Region(NamedTuple):
    """A memory-table region the well-formed front-end offers."""

    gpa: int
    size: int
    uva: int


REGIONS = (
    Region(0x1_0000, 0x4000, 0x7F00_0000_0000),
    Region(0x10_0000, 0x2000, 0x7F00_1000_0000),
)
# Inside a region: ring r's areas at RING_AREA + r * RING_STRIDE (desc, then avail at +0x100,
# used at +0x180: room for a split ring of 16), its chains' buffers at BUF_AREA + r * BUF_STRIDE.
RING_AREA, RING_STRIDE = 0x100, 0x400
AVAIL_AT, USED_AT = 0x100, 0x180
BUF_AREA, BUF_STRIDE = 0x1000, 0x800


class FdSpec(NamedTuple):
    """An fd to send: its kind, and for a file the size of its contents."""

    kind: FdKind
    file_size: int = 0


class Msg(NamedTuple):
    request: int
    payload: bytes
    fds: tuple[FdSpec, ...] = ()
    flags: int = VERSION


class Outcome(enum.Enum):
    DONE = "took effect"
    REFUSED = "refused with an ack"
    CLOSED = "the connection was closed"


# --- the fake operating system ---------------------------------------------------------------------


@dataclass(eq=False)
class FakeMapping:
    """A "mapping" of a fake file: a view of its bytearray; counts its closes."""

    view: memoryview
    fd: int
    closes: int = 0

    def close(self) -> None:
        self.closes += 1
        self.view.release()


class FakeHost:
    """The :class:`~virtio_schema.vhost_user.backend.Host` of one connection: fds are numbers,
    files are bytearrays, closes are counted."""

    def __init__(self) -> None:
        self.files: dict[int, bytearray] = {}
        self.given: set[int] = set()
        self.closed: Counter[int] = Counter()
        self.mappings: list[FakeMapping] = []

    def map(self, fd: Fd, offset: int, size: int) -> FakeMapping:
        assert fd.num in self.given, f"map of fd {fd.num}, never given to this connection"
        assert not self.closed[fd.num], f"map of fd {fd.num} after it was closed"
        buf = self.files.get(fd.num)
        if buf is None:
            raise MemoryRefused(f"fd {fd.num} cannot be mapped")
        if offset + size > len(buf):
            raise MemoryRefused(f"{offset:#x}+{size:#x} is past the end of the file")
        mapping = FakeMapping(memoryview(buf)[offset : offset + size], fd.num)
        self.mappings.append(mapping)
        return mapping

    def create_shared(self, size: int) -> tuple[int, Mapping]:
        raise MemoryRefused("no shared memory in this test")

    def close(self, fd: int) -> None:
        assert fd in self.given, f"close of fd {fd}, never given to this connection"
        self.closed[fd] += 1
        assert self.closed[fd] == 1, f"fd {fd} closed twice"


# --- the device --------------------------------------------------------------------------------------


class RecordingDevice(VhostUserDevice):
    """Checks that its hooks nest per ring; ``handle`` takes (at most ``limit``) chains, reads and
    writes them and returns them; ``poll`` takes one chain of each enabled queue it keeps."""

    num_queues = NUM_QUEUES
    writable_config = (WRITABLE_CONFIG,)

    def __init__(self) -> None:
        self.phase = ["stopped"] * NUM_QUEUES  # stopped, started, enabled
        self.queues: list[VirtQueue | None] = [None] * NUM_QUEUES
        self.handed: list[VirtQueue] = []  # every queue it was given
        self.limit: int | None = None
        self.taken: int | None = None  # chains the last handle() took; None: not called
        self.space = bytearray(range(CONFIG_SIZE))
        self.config_writes: list[tuple[int, bytes]] = []

    def config(self) -> bytes:
        return bytes(self.space)

    def set_config(self, offset: int, data: bytes) -> None:
        assert offset + len(data) <= CONFIG_SIZE, f"SET_CONFIG {offset}+{len(data)} passed on"
        self.config_writes.append((offset, data))
        self.space[offset : offset + len(data)] = data

    def new_turn(self) -> None:
        """Forget the last turn (``taken`` says whether ``handle`` ran)."""
        self.taken = None

    def _move(self, index: int, hook: str, old: str, new: str) -> None:
        assert self.phase[index] == old, f"ring {index}: {hook} while {self.phase[index]}"
        self.phase[index] = new

    def started(self, index: int, queue: VirtQueue) -> None:
        self._move(index, "started", "stopped", "started")
        self.queues[index] = queue
        self.handed.append(queue)

    def enabled(self, index: int, queue: VirtQueue) -> None:
        self._move(index, "enabled", "started", "enabled")
        assert queue is self.queues[index], f"ring {index}: enabled with another queue"

    def disabled(self, index: int) -> None:
        self._move(index, "disabled", "enabled", "started")

    def stopped(self, index: int) -> None:
        self._move(index, "stopped", "started", "stopped")
        self.queues[index] = None

    def handle(self, index: int, queue: VirtQueue) -> None:
        assert self.phase[index] == "enabled", f"ring {index}: handle while {self.phase[index]}"
        assert queue is self.queues[index], f"ring {index}: handle with another queue"
        self.taken = 0
        while self.limit is None or self.taken < self.limit:
            chain = queue.next_chain()
            if chain is None:
                return
            self.taken += 1
            with chain:
                try:
                    reader = ReadableChain(chain)
                    data = reader.read(64)
                    reader.into_writable(ignore_remaining=True).write(data[::-1] or b"\xa5")
                except DriverError:
                    pass  # a malformed chain goes back with 0 bytes written

    def poll(self) -> None:
        for index, queue in enumerate(self.queues):
            if queue is not None and self.phase[index] == "enabled":
                chain = queue.next_chain()
                if chain is not None:
                    chain.return_written(0)


# --- message strategies ------------------------------------------------------------------------------

RINGS = st.integers(0, NUM_QUEUES - 1)
BAD_RINGS = st.integers(NUM_QUEUES, 0xFF) | st.integers(0x100, U32_MAX)
RING_SIZES = st.sampled_from([1, 2, 4, 8, 8, 16])
BAD_RING_SIZES = st.sampled_from([0, 3, 6, 1 << 15, (1 << 15) + 1, 0xFFFF, 1 << 16]) | st.integers(
    0, U32_MAX
)
ANY_FLAGS = st.sampled_from(
    [0, 2, 3, VERSION | REPLY, VERSION | NEED_REPLY | REPLY, VERSION | 0x10, VERSION | 0x100]
) | st.integers(0, U32_MAX)
FD_KINDS = st.sampled_from(list(FdKind))
ANY_FD = st.builds(FdSpec, FD_KINDS, st.sampled_from([0, 0x800, 0x6000]))
NOTIFY_FDS = st.sampled_from([FdKind.EVENTFD, FdKind.PIPE, None])  # None: NOFD


def u64(value: int) -> bytes:
    return U64.pack(U64Rec(value))


def vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(VringStateRec(index, num))


def mem_table(regions: list[MemoryRegionRec], count: int | None = None) -> bytes:
    n = len(regions) if count is None else count
    return MEMORY_HDR.pack(MemoryHdrRec(n)) + b"".join(MEM_REGION.pack(r) for r in regions)


def ring_addr(index: int, region: Region, slot: int) -> VringAddrRec:
    """Ring areas in ``region`` at ``slot`` (a ring's own slot, or another ring's)."""
    base = region.uva + RING_AREA + slot * RING_STRIDE
    return VringAddrRec(index, 0, base, base + USED_AT, base + AVAIL_AT, 0)


def _or(bits: frozenset[int]) -> int:
    value = 0
    for bit in bits:
        value |= bit
    return value


FEATURES = st.builds(
    lambda bits, packed: _or(bits) | packed,
    st.frozensets(
        st.sampled_from(
            [
                int(Feature.VERSION_1),
                int(Feature.INDIRECT_DESC),
                int(Feature.EVENT_IDX),
                int(Feature.PROTOCOL_FEATURES),
            ]
        )
    ),
    st.sampled_from([0] * 6 + [int(Feature.RING_PACKED)] * 3 + [LOG_ALL]),
)
PROTOCOL_FEATURES = st.builds(
    _or,
    st.frozensets(
        st.sampled_from(
            [int(ProtocolFeature.MQ), int(ProtocolFeature.REPLY_ACK), int(ProtocolFeature.CONFIG)]
        )
    ),
)


@st.composite
def mem_tables(draw: st.DrawFn) -> Msg:
    """One or two of :data:`REGIONS`, in either order, at a file offset; rarely a file too short."""
    order = draw(st.sampled_from([(0,), (0,), (0, 1), (1, 0), (1,)]))
    recs: list[MemoryRegionRec] = []
    fds: list[FdSpec] = []
    for k in order:
        r = REGIONS[k]
        offset = draw(st.sampled_from([0, 0x1000]))
        short = draw(st.sampled_from([0, 0, 0, 0, 0, 0, 0, 0x800]))
        recs.append(MemoryRegionRec(r.gpa, r.size, r.uva, offset))
        fds.append(FdSpec(FdKind.FILE, offset + r.size - short))
    return Msg(Request.SET_MEM_TABLE, mem_table(recs), tuple(fds))


@st.composite
def hostile_mem_tables(draw: st.DrawFn) -> Msg:
    """Regions with any fields (sizes 0, past 2**64, overlapping), any count, any fds."""
    edge = st.sampled_from([0, 1, 0x1000, 0x1_0000, 1 << 63, U64_MAX - 0xFFF, U64_MAX])
    field = edge | st.integers(0, U64_MAX)
    small = st.sampled_from([0, 0x800, 0x1000, 0x2000]) | field
    recs = draw(
        st.lists(
            st.builds(MemoryRegionRec, field, small, edge | st.just(REGIONS[0].uva), small),
            max_size=3,
        )
    )
    count = draw(st.none() | st.integers(0, 10) | st.integers(0, U32_MAX))
    fds = draw(st.lists(ANY_FD, max_size=4) | st.just([FdSpec(FdKind.FILE, 0x2000)] * len(recs)))
    return Msg(Request.SET_MEM_TABLE, mem_table(recs, count), tuple(fds))


@st.composite
def vring_addrs(draw: st.DrawFn) -> Msg:
    index = draw(RINGS)
    addr = ring_addr(index, REGIONS[draw(st.sampled_from([0, 0, 1]))], draw(RINGS))
    return Msg(Request.SET_VRING_ADDR, VRING_ADDR.pack(addr))


@st.composite
def hostile_vring_addrs(draw: st.DrawFn) -> Msg:
    """Ring areas outside memory, across a region's end, misaligned, or anywhere."""
    r = REGIONS[draw(st.integers(0, 1))]
    near_end = st.integers(r.uva + r.size - 0x200, r.uva + r.size + 0x10)
    addr = st.integers(0, U64_MAX) | near_end | st.integers(r.uva, r.uva + 0x400)
    rec = VringAddrRec(draw(RINGS | BAD_RINGS), draw(st.integers(0, U32_MAX)), draw(addr),
                       draw(addr), draw(addr), draw(st.integers(0, U64_MAX)))  # fmt: skip
    return Msg(Request.SET_VRING_ADDR, VRING_ADDR.pack(rec))


@st.composite
def vring_fds(draw: st.DrawFn) -> Msg:
    request = draw(
        st.sampled_from([Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR])
    )
    index, kind = draw(RINGS), draw(NOTIFY_FDS)
    if kind is None:
        return Msg(request, u64(index | NOFD))
    return Msg(request, u64(index), (FdSpec(kind),))


@st.composite
def configs(draw: st.DrawFn) -> Msg:
    offset, size = draw(st.integers(0, CONFIG_SIZE + 4)), draw(st.integers(0, CONFIG_SIZE + 4))
    if draw(st.booleans()):
        hdr = CONFIG_HDR.pack(ConfigHdrRec(offset, size, 0))
        return Msg(Request.GET_CONFIG, hdr + bytes(size))
    flags = draw(st.sampled_from([0, 0, 1]))
    hdr = CONFIG_HDR.pack(ConfigHdrRec(offset, size, flags))
    return Msg(Request.SET_CONFIG, hdr + draw(st.binary(min_size=size, max_size=size)))


BASES = st.sampled_from([0, 1, 2, 0x8000]) | st.integers(0, 0xFFFF) | st.integers(0, U32_MAX)

MESSAGES: st.SearchStrategy[Msg] = st.one_of(
    st.sampled_from(
        [
            Msg(Request.GET_FEATURES, b""),
            Msg(Request.GET_PROTOCOL_FEATURES, b""),
            Msg(Request.GET_QUEUE_NUM, b""),
            Msg(Request.SET_OWNER, b""),
            Msg(Request.RESET_OWNER, b""),
        ]
    ),
    st.builds(lambda v: Msg(Request.SET_FEATURES, u64(v)), FEATURES),
    st.builds(lambda v: Msg(Request.SET_PROTOCOL_FEATURES, u64(v)), PROTOCOL_FEATURES),
    mem_tables(),
    st.builds(lambda i, n: Msg(Request.SET_VRING_NUM, vring_state(i, n)), RINGS, RING_SIZES),
    vring_addrs(),
    st.builds(lambda i, n: Msg(Request.SET_VRING_BASE, vring_state(i, n)), RINGS, BASES),
    st.builds(lambda i: Msg(Request.GET_VRING_BASE, vring_state(i, 0)), RINGS),
    vring_fds(),
    st.builds(
        lambda i, n: Msg(Request.SET_VRING_ENABLE, vring_state(i, n)), RINGS, st.integers(0, 1)
    ),
    configs(),
)
"""Well-formed messages (a few are refused: unoffered features, a short file, config past the end)."""


@st.composite
def mutated(draw: st.DrawFn) -> Msg:
    """A well-formed message with one thing wrong."""
    msg = draw(MESSAGES)
    how = draw(st.sampled_from(["flags", "cut", "extend", "bytes", "fds", "kinds", "ring"]))
    if how == "flags":
        return msg._replace(flags=draw(ANY_FLAGS))
    if how == "cut" and msg.payload:
        return msg._replace(payload=msg.payload[: draw(st.integers(0, len(msg.payload) - 1))])
    if how == "extend":
        return msg._replace(payload=msg.payload + draw(st.binary(min_size=1, max_size=9)))
    if how == "bytes":
        size = len(msg.payload)
        return msg._replace(payload=draw(st.binary(min_size=size, max_size=size)))
    if how == "fds":
        return msg._replace(fds=tuple(draw(st.lists(ANY_FD, max_size=9))))
    if how == "kinds" and msg.fds:
        return msg._replace(fds=tuple(FdSpec(draw(FD_KINDS), f.file_size) for f in msg.fds))
    if how == "ring" and len(msg.payload) >= 4 and msg.request != Request.SET_MEM_TABLE:
        if msg.request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            (value,) = struct.unpack_from("<Q", msg.payload)
            bad = draw(BAD_RINGS.map(lambda i: i & 0xFF) | st.integers(0, U64_MAX))
            return msg._replace(payload=u64((value & NOFD) | bad))
        return msg._replace(payload=struct.pack("<I", draw(BAD_RINGS)) + msg.payload[4:])
    return msg._replace(flags=VERSION | REPLY)


RAW = st.builds(
    Msg,
    st.integers(0, 45) | st.integers(0, U32_MAX),
    st.binary(max_size=80),
    st.lists(ANY_FD, max_size=9).map(tuple),
    st.just(VERSION) | ANY_FLAGS,
)

HOSTILE: st.SearchStrategy[Msg] = st.one_of(
    mutated(),
    RAW,
    hostile_mem_tables(),
    hostile_vring_addrs(),
    st.builds(lambda i, n: Msg(Request.SET_VRING_NUM, vring_state(i, n)), RINGS, BAD_RING_SIZES),
    st.builds(
        lambda i, n: Msg(Request.SET_VRING_ENABLE, vring_state(i, n)),
        RINGS,
        st.integers(0, U32_MAX),
    ),
    st.builds(lambda v: Msg(Request.SET_FEATURES, u64(v)), st.integers(0, U64_MAX)),
    st.builds(lambda v: Msg(Request.SET_PROTOCOL_FEATURES, u64(v)), st.integers(0, U64_MAX)),
)


# --- the state machine -------------------------------------------------------------------------------


Setup = tuple[int, int, Msg, list[tuple[int, FdKind | None]]]
"""What every connection starts with: features, protocol features, a memory table, and rings
started (size, kick fd kind) from ring 0 on."""


@dataclass
class Mem:
    """A region of the front-end's current memory table: where its bytes are."""

    rec: MemoryRegionRec
    file: bytearray = field(repr=False)


Span = tuple[bytearray, int, int]
"""Bytes of a fake file: the file, and the offsets ``[start, end)``."""


def overlap(a: Span, b: Span) -> bool:
    return a[0] is b[0] and a[1] < b[2] and b[1] < a[2]


@dataclass(eq=False)
class PackedGuest:
    """The guest driver of one packed ring: a :class:`FakePackedDriver` whose allocator sees only
    the ring's three areas and the ring's buffer area (the rest of the region is reserved), so
    that its ring lands where SET_VRING_ADDR put it and its buffers stay in the buffer area."""

    driver: FakePackedDriver
    memory: FakeMemory
    key: tuple[object, ...]
    """What it was laid out on: the file, the ring areas' guest addresses, the size."""
    spans: list[Span]
    """The bytes it owns: ring areas and buffer area."""
    published: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    """Buffer ids in flight: the readable bytes and the writable room of their chains."""


class BackendFuzz(RuleBasedStateMachine):
    """A front-end, a guest driver and the server around one :class:`Backend` at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.budget: int | None = None
        self.next_fd = 100
        self.connections = 0
        self.backend: Backend | None = None
        self.setup: Setup | None = None

    @initialize(
        budget=st.none() | st.integers(1, 3),
        setup=st.tuples(
            FEATURES,
            PROTOCOL_FEATURES,
            mem_tables(),
            st.lists(st.tuples(RING_SIZES, NOTIFY_FDS), min_size=1, max_size=NUM_QUEUES),
        ),
        bare=st.sampled_from([False, False, False, True]),
    )
    def connect(self, budget: int | None, setup: Setup, bare: bool) -> None:
        """``setup``: what every connection starts with (features, protocol features, a memory
        table), so that most runs get to serve rings; ``bare``: connections start with nothing."""
        self.budget = budget
        self.setup = None if bare else setup
        self._connect()

    def _connect(self) -> None:
        self.connections += 1
        self.host = FakeHost()
        self.device = RecordingDevice()
        self.backend = Backend(
            self.device, host=self.host, name=f"fuzz#{self.connections}", budget=self.budget
        )
        self.kick_given: set[int] = set()
        self.live: list[FakeMapping] = []
        self.table: list[Mem] = []
        self.fe_num: list[int | None] = [None] * NUM_QUEUES
        self.fe_addr: list[VringAddrRec | None] = [None] * NUM_QUEUES
        self.fe_packed = False
        self.fe_features = 0
        self.fe_base: list[QueueState | None] = [QueueState()] * NUM_QUEUES
        """Where each ring starts, as far as the front-end knows (its SET_VRING_BASE, decoded)."""
        self.guests: list[PackedGuest | None] = [None] * NUM_QUEUES
        self.was_started = [False] * NUM_QUEUES
        setup, self.setup = self.setup, None  # a setup that fails leaves the new connection bare
        if setup is not None:
            features, protocol, table, rings = setup
            for msg in (
                Msg(Request.SET_FEATURES, u64(features)),
                Msg(Request.SET_PROTOCOL_FEATURES, u64(protocol)),
                Msg(Request.SET_OWNER, b""),
                table,
            ):
                if self.send(msg) is Outcome.CLOSED:
                    return
            for ring, (size, kick) in enumerate(rings):
                if self._start_ring(ring, size, 0, 0, kick, True, True) is Outcome.CLOSED:
                    return
            self.setup = setup

    def _close(self) -> None:
        """The server drops the connection: everything given is closed, everything mapped
        unmapped, every ring stopped."""
        b = self.backend
        assert b is not None
        for ring in range(NUM_QUEUES):
            self._drop(ring)
        b.close()
        host = self.host
        assert host.given == set(host.closed), f"never closed: {host.given - set(host.closed)}"
        assert all(m.closes == 1 for m in host.mappings), "a mapping not closed exactly once"
        assert self.device.phase == ["stopped"] * NUM_QUEUES, f"after close: {self.device.phase}"
        self.backend = None

    def teardown(self) -> None:
        if self.backend is not None:
            self._close()

    # --- sending ---------------------------------------------------------------------------------

    def _reply_ack(self) -> bool:
        assert self.backend is not None
        return bool(self.backend.protocol_features & ProtocolFeature.REPLY_ACK)

    def _snapshot(self) -> object:
        """What a refused request must leave as it was."""
        b = self.backend
        assert b is not None
        return (
            b.acked_features,
            b.protocol_features,
            b.owner,
            sorted(b.kick_fds().items()),
            b.polled_rings(),
            [(vr.state, vr.size, vr.addr, vr.base, vr.call_fd, vr.err_fd) for vr in b.vrings],
            [id(m) for m in self.live],
            bytes(self.device.space),
        )

    def send(self, msg: Msg) -> Outcome:
        """One message through ``handle()``, with the checks of rules 1-3 around it."""
        b, host = self.backend, self.host
        assert b is not None
        fds = []
        for spec in msg.fds:
            num, self.next_fd = self.next_fd, self.next_fd + 1
            host.given.add(num)
            if spec.kind is FdKind.FILE:
                host.files[num] = bytearray(spec.file_size)
            fds.append(Fd(num, spec.kind))
        if msg.request == Request.SET_VRING_KICK:
            self.kick_given.update(fd.num for fd in fds)
        acks_before, refusals, mapped = self._reply_ack(), len(b.refusals), len(host.mappings)
        before = self._snapshot()
        positions = [None if vr.queue is None else vr.queue.state() for vr in b.vrings]
        try:
            reply = b.handle(msg.request, msg.flags, msg.payload, fds)
        except FrontendError:
            self._check_settled(fds)
            assert len(b.refusals) == refusals
            assert all(m.closes == 1 for m in host.mappings[mapped:]), "refused table still mapped"
            self._close()
            self._connect()
            event("a message closed the connection")
            return Outcome.CLOSED
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(f"handle({msg}) raised {exc!r}, not a FrontendError") from exc
        self._check_settled(fds)
        outcome = self._check_reply(msg, reply, acks_before)
        if outcome is Outcome.REFUSED:
            assert len(b.refusals) == refusals + 1, "a refusal acked but not recorded"
            assert self._snapshot() == before, f"refused {msg} changed the connection"
        else:
            assert len(b.refusals) == refusals
        self._check_mappings(msg, outcome, mapped)
        if outcome is Outcome.DONE:
            self._learn(msg)
            if msg.request == Request.GET_VRING_BASE and reply is not None:
                s = VRING_STATE.unpack_from(reply, HEADER.size)
                packed_dpdk = self.fe_packed and s.num == DPDK_PACKED_BASE  # read as a fresh ring
                self.fe_base[s.index] = (
                    None if packed_dpdk else decode_vring_base(s.num, packed=self.fe_packed)
                )
        self._reap()  # GET_VRING_BASE serves the ring before it stops
        self._sync_guests(msg.request)
        if msg.request in (Request.SET_MEM_TABLE, Request.SET_VRING_ADDR):
            for vr, position in zip(b.vrings, positions, strict=True):
                if vr.queue is not None and position is not None:
                    assert vr.queue.state() == position, f"ring {vr.index} rebuilt elsewhere"
        return outcome

    def _check_settled(self, fds: list[Fd]) -> None:
        """Rule 2 of the core: each fd of the message is kept by a ring or closed."""
        b = self.backend
        assert b is not None
        kept = {fd for vr in b.vrings for fd in (vr.kick_fd, vr.call_fd, vr.err_fd)}
        for fd in fds:
            assert (fd.num in kept) != (self.host.closed[fd.num] == 1), f"fd {fd.num} not settled"

    def _check_reply(self, msg: Msg, reply: bytes | None, acks_before: bool) -> Outcome:
        # an ack is owed by the protocol features in force when the message arrived, even for a
        # SET_PROTOCOL_FEATURES that turns REPLY_ACK on or off
        need = bool(msg.flags & NEED_REPLY)
        own = msg.request in OWN_REPLIES
        if reply is None:
            assert not own, f"no reply to {msg}"
            assert not (need and acks_before), f"no ack for {msg}"
            return Outcome.DONE
        assert len(reply) >= HEADER.size, f"reply {reply!r} shorter than a header"
        hdr = HEADER.unpack_from(reply)
        payload = reply[HEADER.size :]
        assert hdr.request == msg.request, f"reply to {hdr.request} for {msg}"
        assert hdr.flags == VERSION | REPLY, f"reply flags {hdr.flags:#x}"
        assert hdr.size == len(payload), f"reply size {hdr.size}, payload {len(payload)}"
        if own:
            self._check_own_reply(msg, payload)
            return Outcome.DONE
        assert need, f"an ack nobody asked for: {msg}"
        assert acks_before, f"an ack without REPLY_ACK: {msg}"
        assert len(payload) == U64.size, f"an ack of {len(payload)} bytes"
        value = U64.unpack(payload).u64
        assert value in (0, 1), f"ack {value}"
        return Outcome.REFUSED if value else Outcome.DONE

    def _check_own_reply(self, msg: Msg, payload: bytes) -> None:
        """The payload a GET_* request's reply carries (vhost-user.rst, "Message types")."""
        if msg.request == Request.GET_VRING_BASE:
            assert len(payload) == VRING_STATE.size, f"GET_VRING_BASE reply {payload!r}"
            index = VRING_STATE.unpack(payload).index
            assert index == VRING_STATE.unpack(msg.payload).index, f"base of ring {index}"
            assert self.backend is not None
            assert not self.backend.vrings[index].state.started, "GET_VRING_BASE left it running"
        elif msg.request == Request.GET_CONFIG:
            if payload:  # empty: the request failed (past the config space)
                assert payload[: CONFIG_HDR.size] == msg.payload[: CONFIG_HDR.size]
                assert len(payload) == len(msg.payload), "GET_CONFIG reply of another size"
        else:
            assert len(payload) == U64.size, f"{msg.request} reply of {len(payload)} bytes"

    def _check_mappings(self, msg: Msg, outcome: Outcome, mapped: int) -> None:
        new = self.host.mappings[mapped:]
        if msg.request == Request.SET_MEM_TABLE and outcome is Outcome.DONE:
            assert all(m.closes == 0 for m in new), "a mapping of the new table is closed"
            assert all(m.closes == 1 for m in self.live), "the replaced table is still mapped"
            self.live = new
        else:
            assert all(m.closes == 1 for m in new), f"{msg}: mapped and kept"
            assert all(m.closes == 0 for m in self.live), f"{msg}: the memory table was unmapped"

    def _learn(self, msg: Msg) -> None:
        """What the front-end knows after a request took effect."""
        request, payload = msg.request, msg.payload
        if request == Request.SET_FEATURES:
            self.fe_features = U64.unpack(payload).u64
            self.fe_packed = bool(self.fe_features & Feature.RING_PACKED)
        elif request == Request.SET_VRING_BASE:
            s = VRING_STATE.unpack(payload)
            self.fe_base[s.index] = decode_vring_base(s.num, packed=self.fe_packed)
        elif request == Request.SET_VRING_NUM:
            s = VRING_STATE.unpack(payload)
            self.fe_num[s.index] = s.num
        elif request == Request.SET_VRING_ADDR:
            a = VRING_ADDR.unpack(payload)
            self.fe_addr[a.index] = a
        elif request == Request.SET_MEM_TABLE:
            (n,) = MEMORY_HDR.unpack_from(payload)
            recs = [MEM_REGION.unpack_from(payload, MEMORY_HDR.size + k * MEM_REGION.size)
                    for k in range(n)]  # fmt: skip
            nums = [m.fd for m in self.live]
            self.table = [Mem(r, self.host.files[num]) for r, num in zip(recs, nums, strict=True)]
        elif request == Request.SET_CONFIG:
            c = CONFIG_HDR.unpack_from(payload)
            if c.flags == 0 and c.size:
                end = c.offset + c.size - 1
                assert c.offset in WRITABLE_CONFIG, f"SET_CONFIG of read-only byte {c.offset}"
                assert end in WRITABLE_CONFIG, f"SET_CONFIG of read-only byte {end}"

    # --- the front-end -----------------------------------------------------------------------------

    @rule(msg=MESSAGES, need_reply=st.booleans())
    def send_a_message(self, msg: Msg, need_reply: bool) -> None:
        self.send(msg._replace(flags=VERSION | (NEED_REPLY if need_reply else 0)))

    @rule(msg=mem_tables(), need_reply=st.booleans())
    def send_a_memory_table(self, msg: Msg, need_reply: bool) -> None:
        self.send(msg._replace(flags=VERSION | (NEED_REPLY if need_reply else 0)))

    @rule(msg=HOSTILE)
    def send_a_hostile_message(self, msg: Msg) -> None:
        self.send(msg)

    @rule(features=FEATURES, protocol=PROTOCOL_FEATURES, need_reply=st.booleans())
    def negotiate(self, features: int, protocol: int, need_reply: bool) -> None:
        flags = VERSION | (NEED_REPLY if need_reply else 0)
        for msg in (
            Msg(Request.GET_FEATURES, b""),
            Msg(Request.SET_FEATURES, u64(features), flags=flags),
            Msg(Request.GET_PROTOCOL_FEATURES, b""),
            Msg(Request.SET_PROTOCOL_FEATURES, u64(protocol), flags=flags),
            Msg(Request.SET_OWNER, b"", flags=flags),
            Msg(Request.GET_QUEUE_NUM, b""),
        ):
            if self.send(msg) is Outcome.CLOSED:
                return

    @rule(
        ring=RINGS,
        size=RING_SIZES,
        region=st.integers(0, 2),
        base=st.sampled_from([0, 0, 7, 0xFFFF, 0x8000]),
        kick=NOTIFY_FDS,
        enable=st.booleans(),
        need_reply=st.booleans(),
    )
    def start_a_ring(
        self,
        ring: int,
        size: int,
        region: int,
        base: int,
        kick: FdKind | None,
        enable: bool,
        need_reply: bool,
    ) -> None:
        self._start_ring(ring, size, region, base, kick, enable, need_reply)

    def _start_ring(
        self,
        ring: int,
        size: int,
        region: int,
        base: int,
        kick: FdKind | None,
        enable: bool,
        need_reply: bool,
    ) -> Outcome:
        """QEMU's order: NUM, BASE, ADDR, CALL, KICK, ENABLE, after a memory table (the rings
        in one of its regions, mostly) and a stop of the ring if it runs; then the server's
        turn for a ring that woke up."""
        flags = VERSION | (NEED_REPLY if need_reply else 0)
        if not self.table:
            table = Msg(Request.SET_MEM_TABLE, mem_table([MemoryRegionRec(*REGIONS[0], 0)]),
                        (FdSpec(FdKind.FILE, REGIONS[0].size),))  # fmt: skip
            if self.send(table) is Outcome.CLOSED:
                return Outcome.CLOSED
        assert self.backend is not None
        stop = Msg(Request.GET_VRING_BASE, vring_state(ring, 0))
        if self.backend.vrings[ring].state.started and self.send(stop) is Outcome.CLOSED:
            return Outcome.CLOSED
        uvas = [m.rec.userspace_addr for m in self.table]
        where = next((r for r in REGIONS if r.uva == uvas[region % len(uvas)]), REGIONS[region % 2])
        kick_msg = (
            Msg(Request.SET_VRING_KICK, u64(ring | NOFD), flags=flags)
            if kick is None
            else Msg(Request.SET_VRING_KICK, u64(ring), (FdSpec(kick),), flags)
        )
        for msg in (
            Msg(Request.SET_VRING_NUM, vring_state(ring, size), flags=flags),
            Msg(Request.SET_VRING_BASE, vring_state(ring, base), flags=flags),
            Msg(Request.SET_VRING_ADDR, VRING_ADDR.pack(ring_addr(ring, where, ring)), flags=flags),
            Msg(Request.SET_VRING_CALL, u64(ring), (FdSpec(FdKind.EVENTFD),), flags),
            kick_msg,
            Msg(Request.SET_VRING_ENABLE, vring_state(ring, int(enable)), flags=flags),
        ):
            if self.send(msg) is Outcome.CLOSED:
                return Outcome.CLOSED
        self.take_wakeups_and_serve_them()
        return Outcome.DONE

    # --- the guest driver --------------------------------------------------------------------------

    def _locate(self, uva: int, length: int) -> tuple[bytearray, int, MemoryRegionRec] | None:
        """Where ``length`` bytes at front-end address ``uva`` are: file, offset, region."""
        for m in self.table:
            r = m.rec
            if r.userspace_addr <= uva and uva + length <= r.userspace_addr + r.memory_size:
                return m.file, r.mmap_offset + uva - r.userspace_addr, r
        return None

    def _area(self, ring: int, which: str) -> tuple[bytearray, int, int] | None:
        n, addr = self.fe_num[ring], self.fe_addr[ring]
        if n is None or addr is None or n > 64:
            return None
        if which == "desc":
            uva, length = addr.descriptor, 16 * n
        elif which == "avail":
            uva, length = addr.available, 4 if self.fe_packed else 6 + 2 * n
        else:
            uva, length = addr.used, 4 if self.fe_packed else 6 + 8 * n
        found = self._locate(uva, length)
        return None if found is None else (found[0], found[1], length)

    @rule(
        ring=RINGS,
        which=st.sampled_from(["desc", "avail", "used"]),
        at=st.integers(0, 1024),
        data=st.binary(min_size=1, max_size=16),
    )
    def driver_writes_ring_bytes(self, ring: int, which: str, at: int, data: bytes) -> None:
        area = self._area(ring, which)
        if area is None:
            return
        file, offset, length = area
        at %= length
        chunk = data[: length - at]
        file[offset + at : offset + at + len(chunk)] = chunk
        for index, g in enumerate(self.guests):  # a packed ring scribbled on is not well-formed
            if g is not None and any(overlap(s, (file, offset + at, offset + at + len(chunk)))
                                     for s in g.spans):  # fmt: skip
                self._drop(index)

    @rule(
        ring=RINGS,
        chains=st.lists(
            st.tuples(
                st.lists(st.binary(max_size=24), max_size=2),
                st.lists(st.integers(0, 32), max_size=2),
            ),
            max_size=4,
        ),
        limit=st.none() | st.integers(0, 3),
        indirect=st.booleans(),
    )
    def driver_publishes_and_kicks(
        self,
        ring: int,
        chains: list[tuple[list[bytes], list[int]]],
        limit: int | None,
        indirect: bool,
    ) -> None:
        """Chains, then a kick: the server gives the ring a turn, and more while it asks."""
        for readable, writable in chains:
            self.driver_publishes_a_chain(ring, readable, writable, indirect)
        self.device.limit = limit
        self._serve(ring)

    @rule(ring=RINGS, jump=st.integers(1, 0xFFFF))
    def driver_moves_avail_idx(self, ring: int, jump: int) -> None:
        area = self._area(ring, "avail")
        if area is None or self.fe_packed:
            return
        file, offset, _ = area
        (idx,) = struct.unpack_from("<H", file, offset + 2)
        struct.pack_into("<H", file, offset + 2, (idx + jump) & 0xFFFF)

    @rule(
        ring=RINGS,
        readable=st.lists(st.binary(max_size=24), max_size=3),
        writable=st.lists(st.integers(0, 32), max_size=3),
        indirect=st.booleans(),
    )
    def driver_publishes_a_chain(
        self, ring: int, readable: list[bytes], writable: list[int], indirect: bool
    ) -> None:
        """A well-formed split chain (virtio 1.2, 2.7.13): descriptors from ``avail.idx % size``
        on, its head in the next avail slot, then ``avail.idx`` + 1. On a packed ring, the
        guest's :class:`FakePackedDriver` publishes it (in an indirect table if ``indirect`` and
        INDIRECT_DESC was negotiated)."""
        if self.fe_packed:
            self._publish_packed(ring, readable, writable, indirect)
            return
        n, addr = self.fe_num[ring], self.fe_addr[ring]
        desc, avail = self._area(ring, "desc"), self._area(ring, "avail")
        count = len(readable) + len(writable)
        if n is None or addr is None or desc is None or avail is None or self.fe_packed:
            return
        if not 0 < count <= n:
            return
        found = self._locate(addr.descriptor, 16 * n)
        assert found is not None
        buf_file, _, region = found
        start = BUF_AREA + ring * BUF_STRIDE
        if start + BUF_STRIDE > region.memory_size:
            return
        (idx,) = struct.unpack_from("<H", avail[0], avail[1] + 2)  # avail.idx
        slots = [(idx + k) % n for k in range(count)]
        pos = 0
        buffers = [(data, len(data), 0) for data in readable]
        buffers += [(b"", size, int(DescFlags.WRITE)) for size in writable]
        for k, (data, length, flags) in enumerate(buffers):
            at = region.mmap_offset + start + pos
            buf_file[at : at + len(data)] = data
            last = k == count - 1
            event("the driver published a chain") if k == 0 else None
            DESC.pack_into(
                desc[0],
                desc[1] + DESC.size * slots[k],
                Desc(region.guest_phys_addr + start + pos, length,
                     flags | (0 if last else int(DescFlags.NEXT)), 0 if last else slots[k + 1]),
            )  # fmt: skip
            pos += -(-max(length, 1) // 8) * 8
        struct.pack_into("<H", avail[0], avail[1] + 4 + 2 * (idx % n), slots[0])  # ring[]
        struct.pack_into("<H", avail[0], avail[1] + 2, (idx + 1) & 0xFFFF)

    # --- the packed guest driver ------------------------------------------------------------------

    def _publish_packed(
        self, ring: int, readable: list[bytes], writable: list[int], indirect: bool
    ) -> None:
        g = self.guests[ring]
        count = len(readable) + len(writable)
        if g is None or not 0 < count <= g.driver.size:
            return
        indirect = indirect and bool(self.fe_features & Feature.INDIRECT_DESC)
        try:
            buf_id = g.driver.publish(readable, writable, indirect=indirect)
        except FakeMemoryFull:  # the buffer area is full of chains in flight
            return
        if buf_id is None:  # no free slot or id
            return
        assert buf_id not in g.published, f"ring {ring}: id {buf_id} published twice"
        g.published[buf_id] = (b"".join(readable), sum(writable))
        event("the driver published a packed chain" + (" (indirect)" if indirect else ""))

    def _ring_spans(self, ring: int) -> list[Span]:
        """The bytes of ring ``ring``'s areas (as the front-end last set them) in memory."""
        n, addr = self.fe_num[ring], self.fe_addr[ring]
        if n is None or addr is None:
            return []
        avail, used = (4, 4) if self.fe_packed else (6 + 2 * n, 6 + 8 * n)
        spans = []
        for uva, length in ((addr.descriptor, 16 * n), (addr.available, avail), (addr.used, used)):
            found = self._locate(uva, length)
            if found is not None:
                spans.append((found[0], found[1], found[1] + length))
        return spans

    def _others(self, ring: int) -> list[Span]:
        """What the other rings (their areas, their guests' buffers) may write."""
        out: list[Span] = []
        for j in range(NUM_QUEUES):
            if j != ring:
                g = self.guests[j]
                out += self._ring_spans(j) + ([] if g is None else g.spans)
        return out

    def _layout(self, ring: int) -> tuple[Mem, list[int], list[int], list[Span]] | None:
        """Where a packed driver of ``ring`` would live: the region, then the guest addresses,
        lengths and bytes of its descriptor ring, driver and device event areas and buffer area;
        ``None`` if they are outside memory, misaligned or overlap each other."""
        n, addr = self.fe_num[ring], self.fe_addr[ring]
        if n is None or addr is None or n > 64:
            return None
        found = self._locate(addr.descriptor, 16 * n)
        if found is None:
            return None
        rec = found[2]
        (mem,) = [m for m in self.table if m.rec is rec]
        areas = [(addr.descriptor, 16 * n, 16), (addr.available, 4, 4), (addr.used, 4, 4),
                 (rec.userspace_addr + BUF_AREA + ring * BUF_STRIDE, BUF_STRIDE, 8)]  # fmt: skip
        spans: list[Span] = []
        gpas: list[int] = []
        for uva, length, align in areas:
            where = self._locate(uva, length)
            gpa = rec.guest_phys_addr + uva - rec.userspace_addr
            if where is None or where[2] is not rec or gpa % align:
                return None
            spans.append((mem.file, where[1], where[1] + length))
            gpas.append(gpa)
        if any(overlap(a, b) for k, a in enumerate(spans) for b in spans[k + 1 :]):
            return None
        return mem, gpas, [length for _, length, _ in areas], spans

    def _lay_guest(self, ring: int, start: QueueState) -> PackedGuest | None:
        """A packed guest driver for ``ring`` at ``start`` (its ring zeroed, or marked used on the
        previous lap when resumed), its ring where the front-end put it and its buffers in the
        ring's buffer area; ``None`` if they cannot be its own (see :meth:`_layout`, or another
        ring's areas or buffers overlap them)."""
        layout = self._layout(ring)
        if layout is None:
            return None
        mem, gpas, lengths, spans = layout
        if any(overlap(a, b) for a in spans for b in self._others(ring)):
            return None
        rec = mem.rec
        view = memoryview(mem.file)[rec.mmap_offset : rec.mmap_offset + rec.memory_size]
        memory = FakeMemory.over([(rec.guest_phys_addr, view)])
        pos, end = rec.guest_phys_addr, rec.guest_phys_addr + rec.memory_size
        for gpa, length in sorted(zip(gpas, lengths, strict=True)):
            if gpa > pos:
                memory.alloc_at(pos, gpa - pos)  # not the driver's: its allocator skips it
            pos = gpa + length
        if pos < end:
            memory.alloc_at(pos, end - pos)
        # first fit: the ring, then the two event areas, land in the blocks left for them (unless
        # the buffer area comes first and takes one)
        driver = FakePackedDriver(memory, lengths[0] // 16, self.fe_features, start)
        if [driver.ring_addr, driver.driver_event_addr, driver.device_event_addr] != gpas[:3]:
            memory.close()
            return None
        event("the guest laid out a packed ring")
        return PackedGuest(driver, memory, (mem.file, *gpas, lengths[0]), spans)

    def _drop(self, ring: int) -> None:
        g, self.guests[ring] = self.guests[ring], None
        if g is not None:
            g.memory.close()

    def _sync_guests(self, request: int | None = None) -> None:
        """After a message (``request``) or a failed kick: a packed guest driver for each ring
        that started, laid out again for a ring that moved (memory table, addresses) with nothing
        in flight, dropped for a ring that stopped or that another ring's areas now overlap."""
        b = self.backend
        assert b is not None
        for ring, vr in enumerate(b.vrings):
            queue = vr.queue if vr.state.started else None
            was, self.was_started[ring] = self.was_started[ring], queue is not None
            if (
                was
                and queue is None
                and request
                not in (
                    Request.GET_VRING_BASE,  # the reply told where
                    Request.RESET_OWNER,  # the base stays what SET_VRING_BASE said
                )
            ):
                self.fe_base[ring] = None  # stopped where the front-end was not told
            g = self.guests[ring]
            if queue is None or not self.fe_packed:
                self._drop(ring)
            elif not was:
                self._drop(ring)
                self.guests[ring] = self._start_guest(ring, queue)
            elif g is not None:
                self._follow(ring, g)
        for ring, g in enumerate(self.guests):
            if g is not None and any(overlap(a, b) for a in g.spans for b in self._others(ring)):
                self._drop(ring)
                event("a packed ring's areas overlap another ring's")

    def _start_guest(self, ring: int, queue: VirtQueue) -> PackedGuest | None:
        start, want = queue.state(), self.fe_base[ring]
        if want is None:
            return None
        assert start == want, f"ring {ring} started at {start}, the front-end said {want}"
        if (start.next_avail, start.avail_wrap) != (start.next_used, start.used_wrap):
            event("a packed ring started with descriptors in flight")
            return None
        return self._lay_guest(ring, start)

    def _follow(self, ring: int, g: PackedGuest) -> None:
        """A running ring rebuilt on a new memory table or new addresses: the driver lays its
        ring out again (zeroed, at its own positions) if nothing is in flight."""
        layout = self._layout(ring)
        if layout is not None and (layout[0].file, *layout[1], layout[2][0]) == g.key:
            return  # not moved (the same addresses again): the same bytes, the same driver
        d = g.driver
        self._drop(ring)
        if d.in_flight == 0:
            state = QueueState(d.avail_pos, d.used_pos, d.avail_wrap, d.used_wrap)
            self.guests[ring] = self._lay_guest(ring, state)
            event("a packed ring moved, and its driver with it")

    def _reap(self, polled: bool = False) -> dict[int, int]:
        """Read back every used descriptor of the packed guests' rings (rule 6); how many, per
        ring. ``polled``: they came from ``poll`` (0 bytes), else from ``handle``."""
        counts: dict[int, int] = {}
        for ring, g in enumerate(self.guests):
            if g is None:
                continue
            in_flight = sorted(g.published)
            used = g.driver.used()
            counts[ring] = len(used)
            for u in used:
                assert u.head in g.published, (
                    f"ring {ring}: used id {u.head}, in flight {in_flight}"
                )
                data, room = g.published.pop(u.head)
                reply = b"" if polled else (data[:64][::-1] or b"\xa5")[:room]
                assert u.len == len(reply), f"ring {ring}: id {u.head} used len {u.len}, {reply!r}"
                assert b"".join(u.written) == reply, f"ring {ring}: id {u.head} wrote {u.written}"
        return counts

    # --- the server --------------------------------------------------------------------------------

    def _serve(self, ring: int) -> None:
        b = self.backend
        assert b is not None
        vr = b.vrings[ring]
        live, queue = vr.state is RingState.STARTED_ENABLED, vr.queue
        self.device.new_turn()
        guest = self.guests[ring]
        turn = b.serve(ring)
        assert isinstance(turn, Turn)
        returned = self._reap().get(ring, 0)
        if guest is not None:
            assert returned == turn.taken, f"ring {ring}: {returned} used descriptors for {turn}"
            if turn.taken:
                event("a packed ring's turn took a well-formed chain")
        if not live or queue is None:
            assert turn.taken == 0, f"ring {ring} served while {vr.state}"
            assert self.device.taken is None, f"handle() while {vr.state}"
        else:
            budget = min(self.budget or queue.size, queue.size)
            assert 0 <= turn.taken <= budget, f"took {turn.taken}, budget {budget}"
            assert turn.taken == self.device.taken, (
                f"Turn.taken {turn} but device took {self.device.taken}"
            )
            assert (ring in turn.again) == (turn.taken == budget), f"{turn}, budget {budget}"
            event(f"a turn took {min(turn.taken, 2)}+ chains")
        self._check_again(turn)

    def _check_again(self, turn: Turn) -> None:
        b = self.backend
        assert b is not None
        for index in turn.again:
            assert b.vrings[index].state is RingState.STARTED_ENABLED, f"{turn}: {index} not live"

    @rule(ring=RINGS, limit=st.none() | st.integers(0, 3))
    def serve(self, ring: int, limit: int | None) -> None:
        self.device.limit = limit
        self._serve(ring)

    @rule()
    def poll(self) -> None:
        assert self.backend is not None
        self._check_again(self.backend.poll())
        self._reap(polled=True)

    @rule()
    def take_wakeups_and_serve_them(self) -> None:
        assert self.backend is not None
        woken = self.backend.take_wakeups()
        assert all(0 <= i < NUM_QUEUES for i in woken), f"wake-ups {woken}"
        self.device.limit = None
        for index in woken:
            self._serve(index)

    @rule()
    def take_calls(self) -> None:
        b = self.backend
        assert b is not None
        call_fds = {vr.call_fd for vr in b.vrings if vr.call_fd is not None}
        calls = b.take_calls()
        assert set(calls) <= call_fds, f"signal {calls}, call fds {call_fds}"
        assert b.take_calls() == [], "a notification signalled twice"

    @rule(ring=RINGS)
    def kick_fails(self, ring: int) -> None:
        b = self.backend
        assert b is not None
        b.kick_failed(ring, "kick pipe is at end-of-file")
        self._sync_guests()
        assert not b.vrings[ring].state.started, f"ring {ring} runs on a failed kick fd"
        assert b.vrings[ring].kick_fd is None, f"ring {ring} keeps a failed kick fd"

    # --- after every step --------------------------------------------------------------------------

    @invariant()
    def fds_are_kept_or_closed_once(self) -> None:
        b = self.backend
        if b is None:
            return
        host = self.host
        kept = [
            fd for vr in b.vrings for fd in (vr.kick_fd, vr.call_fd, vr.err_fd) if fd is not None
        ]
        assert len(kept) == len(set(kept)), f"an fd kept twice: {kept}"
        assert all(host.closed[fd] == 0 for fd in kept), "a kept fd is closed"
        assert set(kept) | set(host.closed) == host.given, "an fd neither kept nor closed"
        for fd, index in b.kick_fds().items():
            assert fd in self.kick_given, f"kick fd {fd} never came with SET_VRING_KICK"
            assert not host.closed[fd], f"closed kick fd {fd} watched"
            assert b.vrings[index].kick_fd == fd
        for index in b.polled_rings():
            assert b.vrings[index].kick_fd is None, f"ring {index} polled with a kick fd"
            assert b.vrings[index].state.started, f"ring {index} polled while stopped"

    @invariant()
    def the_memory_table_is_mapped_once(self) -> None:
        if self.backend is None:
            return
        for m in self.host.mappings:
            assert m.closes == (0 if m in self.live else 1), "a mapping closed twice, or leaked"

    @invariant()
    def the_device_hears_every_ring_state(self) -> None:
        b = self.backend
        if b is None:
            return
        for index, vr in enumerate(b.vrings):
            want = (
                "enabled"
                if vr.state is RingState.STARTED_ENABLED
                else "started"
                if vr.state.started
                else "stopped"
            )
            assert self.device.phase[index] == want, (
                f"ring {index} {vr.state}, device {self.device.phase}"
            )
            assert self.device.queues[index] is vr.queue, (
                f"ring {index}: the device has another queue"
            )

    @invariant()
    def a_queue_not_enabled_hands_out_nothing(self) -> None:
        b = self.backend
        if b is None:
            return
        live = [vr.queue for vr in b.vrings if vr.state is RingState.STARTED_ENABLED]
        for queue in self.device.handed:
            if any(queue is q for q in live):
                continue
            try:
                chain = queue.next_chain()
            except QueueBroken:
                continue
            if chain is not None:
                chain.return_written(0)
            assert chain is None, f"queue {queue.index} handed out {chain} while not enabled"


BackendFuzz.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestAnyMessageSequenceKeepsRepliesFdsMappingsAndRingHooksConsistent = BackendFuzz.TestCase
