"""vhost-user inflight I/O tracking: the shared region that lets a restarted back-end resubmit what
its predecessor had taken from a ring but not completed (``VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD``).

Source: QEMU ``docs/interop/vhost-user.rst``, "Inflight I/O tracking" and GET/SET_INFLIGHT_FD.
The spec leaves the stride between queue regions open; :func:`queue_region_size` gives the one
DPDK and libvhost-user use, so a region either of them sized fits here too. Numbers are in the
machine's byte order, little-endian on every host this library supports.

Theory of operation.

* Who allocates. When the front-end starts the device it sends GET_INFLIGHT_FD with its number of
  queues and its queue size; the back-end allocates the region (shared memory, zero-filled, sealed
  against resizing) and replies with its fd, ``mmap_size`` and ``mmap_offset`` 0 (:data:`INFLIGHT`).
  The front-end keeps its own fd and mapping, so the region outlives a back-end crash. QEMU 7.2
  (vhost-user-blk) asks only when it has no region yet and sends SET_INFLIGHT_FD, with the same fd,
  on every start, also after the back-end reconnected: right after SET_FEATURES (which says split
  or packed), before the memory table and the rings. It frees the region at a VM reset and asks
  for a new one at the next start. A reply with ``mmap_size`` 0 means "no tracking".
* The region is ``num_queues`` queue regions, ``queue_region_size()`` bytes apart
  (:func:`check_region`); each is a header followed by ``queue_size`` entries
  (:data:`SPLIT_QUEUE_REGION` and :data:`SPLIT_DESC_STATE`; :data:`PACKED_QUEUE_REGION` and
  :data:`PACKED_DESC_STATE`). ``queue_size`` is the front-end's (QEMU: the ``queue-size``
  property); the ring size the driver programs (SET_VRING_NUM) may be smaller.
* One :class:`SplitInflight` or :class:`PackedInflight` per ring works on that ring's slice.
  Recovery runs at SET_VRING_KICK, once the ring is mapped and before it is served: split reads
  ``used->idx`` from the used ring, packed one descriptor's flags. A fresh region (version 0) is
  initialised there; a used one yields the chains to hand to the device again, in the order they
  were first taken, and the ring position to resume at.
* While the ring runs, the queue layer reports each step ("publish" is the store that shows a
  completion to the driver: split ``used->idx``, packed the used descriptor's flags)::

      step               split                          packed
      chain taken        taken(head)                    entry = taken(descs)
      before publishing  completing(heads)              completing(entries, used_idx, used_wrap)
      after publishing   completed(heads, used_idx)     completed(entries)

  Packed: one ``completing``/``completed`` pair per used descriptor (several entries only for an
  IN_ORDER run written as one used descriptor), and no ``taken`` between the two.

Rules of this module:

1. Sans-I/O: it works on the writable ``memoryview`` it is given and opens, maps and closes
   nothing; ``release()`` lets go of its views so that the owner can unmap.
2. The region is hostile input: the front-end hands it over, and a crashed predecessor or a
   malicious front-end may have written anything. Recovery reads the queue region once (a
   snapshot), validates every value it uses, bounds every walk by the queue size, and raises
   :class:`InflightError`, never anything else, for a region it cannot trust; it writes only
   after every check has passed, so a refused region is left as it was. (``features``
   is not checked: version 1 defines none, and DPDK and libvhost-user ignore it too.)
3. The hot path never reads the region. A tracker keeps what it needs (the counter, the last
   batch head, the packed free list) and only writes, so a front-end scribbling on the region
   while the ring runs can only spoil the next recovery, which rule 2 covers. The heads and
   entries it is handed are checked against the queue size: no store lands outside its region.
4. Every store is one machine store through a word view (as :mod:`virtio_schema.mem` rule 3): a
   crash never leaves a half-written field.

Ordering. Recovery needs the region to show a prefix, in program order, of the tracker's stores and
the queue's. A crash gives that by itself (a killed process stops between two instructions and
every store it made reaches memory), so keeping the spec's step order in each method is what makes
a crash at any point recoverable. Where a "commit" store follows the stores it commits (the
``inflight`` flag after the counter, the region ``used_idx`` after the cleared flags, ``version``
after an initialisation, packed ``old_*`` after the copies or the cleared flags),
:func:`~virtio_schema.mem.write_barrier` sits between them (mem rule 4) so that a reader on another
CPU sees the same prefix while we run; on x86-64 it is skipped, as it does nothing there.
``completing`` needs none of its own: it runs before the queue's write barrier that precedes the
publishing store.

Packed: was the last completion published? After a crash between ``completing`` and ``completed``
the current fields (``free_head``, ``used_idx``, ``used_wrap_counter``) are ahead of the committed
``old_*`` ones, and recovery must know whether the driver was shown the used descriptor. As the spec
says, :meth:`PackedInflight.recover` reads the flags of the ring descriptor at ``old_used_idx``
(through the ``flags_at`` callable it is given): if its AVAIL and USED bits still say "made
available in the lap of ``old_used_wrap_counter``" (AVAIL equal to that counter, USED its
opposite), the used descriptor was not written: roll back; anything else means it was written (or
the driver has even reused the slot): commit. Two refinements of the spec's words: only the AVAIL
and USED bits are compared (the others are the driver's NEXT/WRITE/INDIRECT), and the test runs
when ``used_idx`` OR ``used_wrap_counter`` differs from its ``old_`` copy (a chain of ring-size
descriptors brings ``used_idx`` back to its value one lap later, and a crash inside the commit can
leave ``old_used_idx`` copied but not the wrap counter). The rule assumes, as the spec does, that
the driver marks every descriptor of a chain with the AVAIL/USED bits of its lap (virtio 1.2,
2.8.6; Linux and DPDK do): the used position can stop inside a chain. DPDK tests the region entry
``desc[old_used_idx].inflight`` instead, which mixes a ring position with an entry index.

Imports: :mod:`virtio_schema.layout`, :mod:`virtio_schema.mem` (barriers), the packed flag bits
from :mod:`virtio_schema.schema`, and :class:`~virtio_schema.vhost_user.errors.FrontendError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

from construct import Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

from virtio_schema.errors import DeviceUsageError, LayoutError
from virtio_schema.layout import Layout
from virtio_schema.mem import STRONG_ORDER, write_barrier
from virtio_schema.schema import PackedDescFlags
from virtio_schema.vhost_user.errors import FrontendError

__all__ = [
    "ALIGNMENT",
    "INFLIGHT",
    "MAX_QUEUE_SIZE",
    "PACKED_DESC_STATE",
    "PACKED_QUEUE_REGION",
    "SPLIT_DESC_STATE",
    "SPLIT_QUEUE_REGION",
    "VERSION",
    "DescStatePacked",
    "DescStatePackedRec",
    "DescStateSplit",
    "DescStateSplitRec",
    "Inflight",
    "InflightChain",
    "InflightDesc",
    "InflightError",
    "InflightRec",
    "PackedInflight",
    "PackedRecovery",
    "QueueRegionPacked",
    "QueueRegionPackedRec",
    "QueueRegionSplit",
    "QueueRegionSplitRec",
    "SplitInflight",
    "SplitRecovery",
    "check_region",
    "queue_region_size",
    "region_size",
]

VERSION = 1
"""The region version this module writes and reads; 0 means never initialised (or a VM reset)."""

ALIGNMENT = 64
"""Queue regions start at multiples of this many bytes (DPDK's and libvhost-user's choice)."""

MAX_QUEUE_SIZE = 32768
"""The largest queue size a region may describe (the largest split or packed ring)."""


class InflightError(FrontendError):
    """The inflight region, or the GET/SET_INFLIGHT_FD values describing it, cannot be trusted: a
    field out of range, a list that leaves the queue or loops, entries claimed twice, a region too
    small. The message names the queue region and the offending values."""


# --- schemas -----------------------------------------------------------------------------------

Inflight = Struct(
    "mmap_size" / Int64ul,
    "mmap_offset" / Int64ul,
    "num_queues" / Int16ul,
    "queue_size" / Int16ul,
    Padding(4),  # the C struct's tail padding (it is not packed): 24 bytes in all
)
"""``VhostUserInflight``: the GET_INFLIGHT_FD request and reply and the SET_INFLIGHT_FD payload."""

QueueRegionSplit = Struct(
    "features" / Int64ul,
    "version" / Int16ul,
    "desc_num" / Int16ul,
    "last_batch_head" / Int16ul,
    "used_idx" / Int16ul,
)
"""``QueueRegionSplit`` without its ``desc[]`` array: the header of a split queue region."""

DescStateSplit = Struct(
    "inflight" / Int8ul,
    Padding(5),
    "next" / Int16ul,
    "counter" / Int64ul,
)
"""``DescStateSplit``: entry ``i`` tracks the chain whose head descriptor is ``i``."""

QueueRegionPacked = Struct(
    "features" / Int64ul,
    "version" / Int16ul,
    "desc_num" / Int16ul,
    "free_head" / Int16ul,
    "old_free_head" / Int16ul,
    "used_idx" / Int16ul,
    "old_used_idx" / Int16ul,
    "used_wrap_counter" / Int8ul,
    "old_used_wrap_counter" / Int8ul,
    Padding(7),  # padding[7]
    Padding(3),  # the C compiler's: desc[] starts 8-byte aligned
)
"""``QueueRegionPacked`` without its ``desc[]`` array: the header of a packed queue region."""

DescStatePacked = Struct(
    "inflight" / Int8ul,
    Padding(1),
    "next" / Int16ul,
    "last" / Int16ul,
    "num" / Int16ul,
    "counter" / Int64ul,
    "id" / Int16ul,
    "flags" / Int16ul,
    "len" / Int32ul,
    "addr" / Int64ul,
)
"""``DescStatePacked``: one ring descriptor of a chain in flight (the chain's first entry also
holds its ``num``, ``last``, ``counter`` and ``inflight``), or a free entry."""


# --- records and layouts -----------------------------------------------------------------------


class InflightRec(NamedTuple):
    """The fields of :data:`Inflight`."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


class QueueRegionSplitRec(NamedTuple):
    """The fields of :data:`QueueRegionSplit`."""

    features: int
    version: int
    desc_num: int
    last_batch_head: int
    used_idx: int


class DescStateSplitRec(NamedTuple):
    """The fields of :data:`DescStateSplit`."""

    inflight: int
    next: int
    counter: int


class QueueRegionPackedRec(NamedTuple):
    """The fields of :data:`QueueRegionPacked`."""

    features: int
    version: int
    desc_num: int
    free_head: int
    old_free_head: int
    used_idx: int
    old_used_idx: int
    used_wrap_counter: int
    old_used_wrap_counter: int


class DescStatePackedRec(NamedTuple):
    """The fields of :data:`DescStatePacked`."""

    inflight: int
    next: int
    last: int
    num: int
    counter: int
    id: int
    flags: int
    len: int
    addr: int


INFLIGHT: Layout[InflightRec] = Layout(Inflight, InflightRec, name="Inflight")
"""The 24-byte GET/SET_INFLIGHT_FD payload."""
SPLIT_QUEUE_REGION: Layout[QueueRegionSplitRec] = Layout(
    QueueRegionSplit, QueueRegionSplitRec, name="QueueRegionSplit"
)
"""The 16-byte split queue region header; entries follow it."""
SPLIT_DESC_STATE: Layout[DescStateSplitRec] = Layout(
    DescStateSplit, DescStateSplitRec, name="DescStateSplit"
)
"""A 16-byte split entry."""
PACKED_QUEUE_REGION: Layout[QueueRegionPackedRec] = Layout(
    QueueRegionPacked, QueueRegionPackedRec, name="QueueRegionPacked"
)
"""The 32-byte packed queue region header (its padding included); entries follow it."""
PACKED_DESC_STATE: Layout[DescStatePackedRec] = Layout(
    DescStatePacked, DescStatePackedRec, name="DescStatePacked"
)
"""A 32-byte packed entry."""


class InflightDesc(NamedTuple):
    """A packed ring descriptor as the region keeps it (the ring's ``struct pvirtq_desc`` order,
    so a :class:`~virtio_schema.ring.PackedDesc` read from the ring can be handed over as it is)."""

    addr: int
    len: int
    id: int
    flags: int


class SplitRecovery(NamedTuple):
    """What :meth:`SplitInflight.recover` found.

    ``heads``: the chains to hand to the device again, in the order they were first taken (the
    ring's descriptor table still holds them: the driver gets a head back only through the used
    ring); they are still in flight, so they need no new :meth:`~SplitInflight.taken`.
    ``next_avail``: where the device resumes reading the avail ring, the guest's used index
    plus the chains in flight. ``fresh``: the region had never been used (version 0) and is now
    initialised; nothing is resubmitted and the ring position of SET_VRING_BASE stands."""

    heads: tuple[int, ...]
    next_avail: int
    fresh: bool


class InflightChain(NamedTuple):
    """One packed chain to resubmit: its region ``entry`` (what ``completing``/``completed`` take
    when it is returned; the chain is still in flight, so it must not be passed to
    :meth:`~PackedInflight.taken` again) and the copies of its ring descriptors, first to last.
    The copies are as untrusted as the ring they came from: the queue validates them like any
    chain."""

    entry: int
    descs: tuple[InflightDesc, ...]


class PackedRecovery(NamedTuple):
    """What :meth:`PackedInflight.recover` found.

    ``chains``: to hand to the device again, in the order they were first taken. ``next_used`` and
    ``used_wrap``: the committed used position; ``next_avail`` and ``avail_wrap``: that position
    advanced by the ring slots of the chains in flight (QEMU 7.2 does not track a packed ring's
    position across a back-end crash, so SET_VRING_BASE cannot be trusted for it). ``fresh``: the
    region had never been used (version 0) and is now initialised at the position the caller gave;
    nothing is resubmitted."""

    chains: tuple[InflightChain, ...]
    next_avail: int
    avail_wrap: int
    next_used: int
    used_wrap: int
    fresh: bool


# --- geometry ----------------------------------------------------------------------------------


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def queue_region_size(queue_size: int, *, packed: bool) -> int:
    """The stride between queue regions: header plus ``queue_size`` entries, rounded up to
    :data:`ALIGNMENT`. The same value as DPDK's ``ALIGN_UP(16*qs + 16, 64)`` (split) and
    ``ALIGN_UP(32*qs + 29, 64)`` (packed, which leaves out the header's 3 alignment bytes, lost in
    the rounding) and libvhost-user's split ``ALIGN_UP(16*qs + 2, 64)``."""
    if packed:
        return _align_up(PACKED_QUEUE_REGION.size + PACKED_DESC_STATE.size * queue_size, ALIGNMENT)
    return _align_up(SPLIT_QUEUE_REGION.size + SPLIT_DESC_STATE.size * queue_size, ALIGNMENT)


def region_size(num_queues: int, queue_size: int, *, packed: bool) -> int:
    """The ``mmap_size`` of a region for ``num_queues`` queues of ``queue_size`` entries."""
    return num_queues * queue_region_size(queue_size, packed=packed)


def check_region(view_len: int, num_queues: int, queue_size: int, *, packed: bool) -> int:
    """Check the SET_INFLIGHT_FD description of a mapped region of ``view_len`` bytes; return the
    stride (queue ``i`` starts at ``i * stride``). :class:`InflightError` if a count is out of
    range or the region is smaller than ``num_queues`` queue regions."""
    if not 1 <= num_queues <= 0xFFFF:
        raise InflightError(f"inflight region: num_queues {num_queues} (1..65535)")
    if not 1 <= queue_size <= MAX_QUEUE_SIZE:
        raise InflightError(f"inflight region: queue_size {queue_size} (1..{MAX_QUEUE_SIZE})")
    stride = queue_region_size(queue_size, packed=packed)
    need = num_queues * stride
    if view_len < need:
        kind = "packed" if packed else "split"
        raise InflightError(
            f"inflight region of {view_len} bytes, {num_queues} {kind} queues of "
            f"{queue_size} entries need {need}"
        )
    return stride


# --- word indices, derived from the schemas ----------------------------------------------------


def _word(layout: Layout[Any], name: str, width: int, base: int = 0) -> int:
    """Index of field ``name`` (``width`` bytes wide) of the record at byte ``base`` in a view of
    ``width``-byte words; refuses a field of another width or one not aligned to it."""
    at = base + layout.offsets[name]
    size = layout.field(name).size
    if size != width or at % width:
        raise LayoutError(layout.name, name, f"{size} bytes at {at}: not a {width}-byte word")
    return at // width


def _step(layout: Layout[Any], width: int) -> int:
    """Entries are ``layout.size`` bytes apart: that many ``width``-byte words."""
    if layout.size % width:
        raise LayoutError(layout.name, None, f"size {layout.size} is not a multiple of {width}")
    return layout.size // width


_U64_MAX: Final = (1 << 64) - 1

# split: the header's fields, and entry 0's (entry i: + i * step)
_S_HDR: Final = SPLIT_QUEUE_REGION.size
_S_ENT: Final = SPLIT_DESC_STATE.size
_S_VERSION: Final = _word(SPLIT_QUEUE_REGION, "version", 2)
_S_DESC_NUM: Final = _word(SPLIT_QUEUE_REGION, "desc_num", 2)
_S_LAST_BATCH_HEAD: Final = _word(SPLIT_QUEUE_REGION, "last_batch_head", 2)
_S_USED_IDX: Final = _word(SPLIT_QUEUE_REGION, "used_idx", 2)
_S_INFLIGHT: Final = _word(SPLIT_DESC_STATE, "inflight", 1, _S_HDR)
_S_INFLIGHT_STEP: Final = _step(SPLIT_DESC_STATE, 1)
_S_NEXT: Final = _word(SPLIT_DESC_STATE, "next", 2, _S_HDR)
_S_NEXT_STEP: Final = _step(SPLIT_DESC_STATE, 2)
_S_COUNTER: Final = _word(SPLIT_DESC_STATE, "counter", 8, _S_HDR)
_S_COUNTER_STEP: Final = _step(SPLIT_DESC_STATE, 8)

# packed
_P_HDR: Final = PACKED_QUEUE_REGION.size
_P_ENT: Final = PACKED_DESC_STATE.size
_P_VERSION: Final = _word(PACKED_QUEUE_REGION, "version", 2)
_P_DESC_NUM: Final = _word(PACKED_QUEUE_REGION, "desc_num", 2)
_P_FREE_HEAD: Final = _word(PACKED_QUEUE_REGION, "free_head", 2)
_P_OLD_FREE_HEAD: Final = _word(PACKED_QUEUE_REGION, "old_free_head", 2)
_P_USED_IDX: Final = _word(PACKED_QUEUE_REGION, "used_idx", 2)
_P_OLD_USED_IDX: Final = _word(PACKED_QUEUE_REGION, "old_used_idx", 2)
_P_USED_WRAP: Final = _word(PACKED_QUEUE_REGION, "used_wrap_counter", 1)
_P_OLD_USED_WRAP: Final = _word(PACKED_QUEUE_REGION, "old_used_wrap_counter", 1)
_P_INFLIGHT: Final = _word(PACKED_DESC_STATE, "inflight", 1, _P_HDR)
_P_STEP8: Final = _step(PACKED_DESC_STATE, 1)
_P_NEXT: Final = _word(PACKED_DESC_STATE, "next", 2, _P_HDR)
_P_LAST: Final = _word(PACKED_DESC_STATE, "last", 2, _P_HDR)
_P_NUM: Final = _word(PACKED_DESC_STATE, "num", 2, _P_HDR)
_P_ID: Final = _word(PACKED_DESC_STATE, "id", 2, _P_HDR)
_P_FLAGS: Final = _word(PACKED_DESC_STATE, "flags", 2, _P_HDR)
_P_STEP16: Final = _step(PACKED_DESC_STATE, 2)
_P_LEN: Final = _word(PACKED_DESC_STATE, "len", 4, _P_HDR)
_P_STEP32: Final = _step(PACKED_DESC_STATE, 4)
_P_COUNTER: Final = _word(PACKED_DESC_STATE, "counter", 8, _P_HDR)
_P_ADDR: Final = _word(PACKED_DESC_STATE, "addr", 8, _P_HDR)
_P_STEP64: Final = _step(PACKED_DESC_STATE, 8)

_AVAIL: Final = int(PackedDescFlags.AVAIL)
_USED: Final = int(PackedDescFlags.USED)

# where an entry is, in packed recovery (0: not seen)
_FREE: Final = 1
_IN_CHAIN: Final = 2


def _queue_view(
    view: memoryview, queue_size: int, header: int, entry: int, name: str
) -> memoryview:
    """The first ``header + queue_size * entry`` bytes of ``view``, as unsigned bytes."""
    if view.readonly:
        raise DeviceUsageError(f"{name}: the inflight region view is read-only")
    if not view.c_contiguous:
        raise DeviceUsageError(f"{name}: the inflight region view is not contiguous")
    if not 1 <= queue_size <= MAX_QUEUE_SIZE:
        raise InflightError(f"{name}: queue_size {queue_size} (1..{MAX_QUEUE_SIZE})")
    need = header + queue_size * entry
    if view.nbytes < need:
        raise InflightError(
            f"{name}: queue region of {view.nbytes} bytes, {queue_size} entries need {need}"
        )
    with view.cast("B") as whole:
        return whole[:need]


def _ring_size(name: str, queue_size: int, ring_size: int | None) -> int:
    ring = queue_size if ring_size is None else ring_size
    if not 1 <= ring <= queue_size:
        raise InflightError(
            f"{name}: ring of {ring} descriptors, the region tracks queues of {queue_size}"
        )
    return ring


def _ordered(name: str, found: list[tuple[int, int]]) -> tuple[list[int], int]:
    """``(counter, entry)`` pairs sorted by counter: the entries in the order they were taken, and
    the counter to go on from. Duplicate counters make that order ambiguous."""
    found.sort()
    for k in range(1, len(found)):
        if found[k][0] == found[k - 1][0]:
            raise InflightError(
                f"{name}: entries {found[k - 1][1]} and {found[k][1]} are in flight with the "
                f"same counter {found[k][0]}"
            )
    if not found:
        return [], 0
    top = found[-1][0]
    if top == _U64_MAX:
        raise InflightError(f"{name}: entry {found[-1][1]} has counter {top}, no room after it")
    return [entry for _counter, entry in found], top + 1


# --- split -------------------------------------------------------------------------------------


class SplitInflight:
    """The split queue region of one ring: ``view`` starts at the queue region (any length from
    header plus ``queue_size`` entries up; the tracker uses only that much), ``queue_size`` is the
    region's (SET_INFLIGHT_FD's). ``name`` prefixes error messages.

    Entry ``i`` tracks the chain whose head descriptor is ``i``. Call :meth:`init` on a region the
    back-end has just allocated, or :meth:`recover` at SET_VRING_KICK, before the other methods."""

    def __init__(self, view: memoryview, queue_size: int, *, name: str = "inflight") -> None:
        self.name = name
        self.queue_size = queue_size
        self._w8 = _queue_view(view, queue_size, _S_HDR, _S_ENT, name)
        self._w16 = self._w8.cast("H")
        self._w64 = self._w8.cast("Q")
        self.counter = 0
        """The global counter: the next chain taken gets this value."""
        self._last_batch_head = 0

    def release(self) -> None:
        """Release the views on the region (the owner may unmap it); the tracker is unusable."""
        self._w64.release()
        self._w16.release()
        self._w8.release()

    # --- hot path --------------------------------------------------------------------------------

    def taken(self, head: int) -> None:
        """The device took the chain whose head descriptor is ``head`` from the avail ring."""
        if not 0 <= head < self.queue_size:
            raise InflightError(f"{self.name}: head {head} outside 0..{self.queue_size - 1}")
        self._w64[_S_COUNTER + head * _S_COUNTER_STEP] = self.counter
        self.counter = (self.counter + 1) & _U64_MAX
        if not STRONG_ORDER:
            write_barrier()  # the counter before the flag that makes the entry count
        self._w8[_S_INFLIGHT + head * _S_INFLIGHT_STEP] = 1

    def completing(self, heads: Sequence[int]) -> None:
        """The chains ``heads`` are about to be published in one batch (one ``used->idx`` store):
        link them into the last-batch list. Call before the queue's write barrier and
        ``used->idx`` store, which order these links first."""
        qs = self.queue_size
        w16 = self._w16
        last = self._last_batch_head
        for head in heads:
            if not 0 <= head < qs:
                raise InflightError(f"{self.name}: head {head} outside 0..{qs - 1}")
            w16[_S_NEXT + head * _S_NEXT_STEP] = last
            last = head
        self._last_batch_head = last
        w16[_S_LAST_BATCH_HEAD] = last

    def completed(self, heads: Sequence[int], used_idx: int) -> None:
        """The batch ``heads`` was published and ``used->idx`` is now ``used_idx``: the chains are
        no longer in flight."""
        qs = self.queue_size
        w8 = self._w8
        for head in heads:
            if not 0 <= head < qs:
                raise InflightError(f"{self.name}: head {head} outside 0..{qs - 1}")
            w8[_S_INFLIGHT + head * _S_INFLIGHT_STEP] = 0
        if not STRONG_ORDER:
            write_barrier()  # the cleared flags before the used_idx that says they are current
        self._w16[_S_USED_IDX] = used_idx & 0xFFFF

    # --- initialisation and recovery -------------------------------------------------------------

    def init(self, used_idx: int = 0) -> None:
        """Make the queue region fresh: no entry in flight, ``desc_num`` the queue size,
        ``used_idx`` the ring's current used index (0 for a new ring), version last."""
        self._w8[:] = bytes(len(self._w8))
        self._w16[_S_DESC_NUM] = self.queue_size
        self._w16[_S_USED_IDX] = used_idx & 0xFFFF
        if not STRONG_ORDER:
            write_barrier()  # the initialised fields before the version that vouches for them
        self._w16[_S_VERSION] = VERSION
        self.counter = 0
        self._last_batch_head = 0

    def recover(self, used_idx_in_guest: int, *, ring_size: int | None = None) -> SplitRecovery:
        """Bring the region in line with the used ring after a reconnect, and say what to
        resubmit. ``used_idx_in_guest`` is ``used->idx`` as the used ring holds it now;
        ``ring_size`` is the ring's size (SET_VRING_NUM; the region's queue size if omitted).

        The spec's rule: if the region's ``used_idx`` lags the guest's, the last batch was
        published but not retired; its ``(guest - region) mod 2**16`` heads, from
        ``last_batch_head`` along ``next``, leave flight and ``used_idx`` catches up. Every entry
        still in flight is then resubmitted, in ascending ``counter`` order, and the counter goes
        on after the largest. A fresh region (version 0) is initialised at ``used_idx_in_guest``.
        :class:`InflightError` for a region that breaks any of this (module rule 2)."""
        name = self.name
        qs = self.queue_size
        ring = _ring_size(name, qs, ring_size)
        guest_used = used_idx_in_guest & 0xFFFF
        snap = bytes(self._w8)  # rule 2: every value below is read once, from this copy
        hdr = SPLIT_QUEUE_REGION.unpack_from(snap)
        if hdr.version == 0:
            self.init(guest_used)
            return SplitRecovery((), guest_used, True)
        if hdr.version != VERSION:
            raise InflightError(f"{name}: version {hdr.version}, expected 0 or {VERSION}")
        if hdr.desc_num != qs:
            raise InflightError(f"{name}: desc_num {hdr.desc_num}, the queue size is {qs}")
        if hdr.last_batch_head >= qs:
            raise InflightError(
                f"{name}: last_batch_head {hdr.last_batch_head} outside 0..{qs - 1}"
            )
        entries = [SPLIT_DESC_STATE.unpack_from(snap, _S_HDR + i * _S_ENT) for i in range(qs)]
        inflight = [e.inflight for e in entries]
        batch = self._last_batch(entries, hdr, guest_used, ring)
        for head in batch:
            inflight[head] = 0
        found: list[tuple[int, int]] = []
        for i, flag in enumerate(inflight):
            if flag == 1:
                if i >= ring:
                    raise InflightError(
                        f"{name}: head {i} in flight, the ring has {ring} descriptors"
                    )
                found.append((entries[i].counter, i))
            elif flag != 0:
                raise InflightError(f"{name}: entry {i} has inflight {flag} (0 or 1)")
        heads, counter = _ordered(name, found)
        if batch:  # all checked: now retire the last batch
            w8 = self._w8
            for head in batch:
                w8[_S_INFLIGHT + head * _S_INFLIGHT_STEP] = 0
            if not STRONG_ORDER:
                write_barrier()  # the cleared flags before the used_idx that says they are current
            self._w16[_S_USED_IDX] = guest_used
        self.counter = counter
        self._last_batch_head = hdr.last_batch_head
        return SplitRecovery(tuple(heads), (guest_used + len(heads)) & 0xFFFF, False)

    def _last_batch(
        self,
        entries: list[DescStateSplitRec],
        hdr: QueueRegionSplitRec,
        guest_used: int,
        ring: int,
    ) -> list[int]:
        """The heads of the last batch if it was published but not retired (the guest's used
        index is ahead of the region's): ``(guest - region) mod 2**16`` of them, from
        ``last_batch_head`` along ``next``."""
        name = self.name
        qs = self.queue_size
        batch = (guest_used - hdr.used_idx) & 0xFFFF
        if batch > ring:
            raise InflightError(
                f"{name}: used_idx {hdr.used_idx}, the guest's used idx {guest_used}: a last "
                f"batch of {batch} heads, more than the ring's {ring} descriptors"
            )
        seen = bytearray(qs)
        head = hdr.last_batch_head
        heads: list[int] = []
        for k in range(batch):
            if k:
                head = entries[heads[-1]].next
                if head >= qs:
                    raise InflightError(
                        f"{name}: last batch entry {heads[-1]} has next {head} outside 0..{qs - 1}"
                    )
            if seen[head]:
                raise InflightError(
                    f"{name}: the last batch list loops back to head {head} after {k} of "
                    f"{batch} heads"
                )
            seen[head] = 1
            heads.append(head)
        return heads


# --- packed ------------------------------------------------------------------------------------


class PackedInflight:
    """The packed queue region of one ring: ``view`` starts at the queue region (header plus
    ``queue_size`` entries at least), ``queue_size`` is the region's (SET_INFLIGHT_FD's). ``name``
    prefixes error messages.

    The entries hold copies of the ring descriptors of every chain in flight (the ring itself may
    overwrite them with used descriptors of other chains); the others form a free list through
    ``next``, ended by the value ``queue_size``. Call :meth:`init` on a region the back-end has
    just allocated, or :meth:`recover` at SET_VRING_KICK, before the other methods."""

    def __init__(self, view: memoryview, queue_size: int, *, name: str = "inflight") -> None:
        self.name = name
        self.queue_size = queue_size
        self._w8 = _queue_view(view, queue_size, _P_HDR, _P_ENT, name)
        self._w16 = self._w8.cast("H")
        self._w32 = self._w8.cast("I")
        self._w64 = self._w8.cast("Q")
        self.counter = 0
        """The global counter: the next chain taken gets this value."""
        # what the hot path needs, kept here (rule 3): the free list, each chain's last entry,
        # the current free head and used position
        self._next = list(range(1, queue_size + 1))
        self._last = [0] * queue_size
        self._free_head = 0
        self._used_idx = 0
        self._used_wrap = 1
        self._completing = False

    def release(self) -> None:
        """Release the views on the region (the owner may unmap it); the tracker is unusable."""
        self._w64.release()
        self._w32.release()
        self._w16.release()
        self._w8.release()

    # --- hot path --------------------------------------------------------------------------------

    def taken(self, descs: Sequence[tuple[int, int, int, int]]) -> int:
        """The device took a chain of ring descriptors ``descs``, each ``(addr, len, id, flags)``
        as the ring holds it (a :class:`~virtio_schema.ring.PackedDesc` will do), first to last;
        returns the region entry that stands for the chain."""
        name = self.name
        qs = self.queue_size
        count = len(descs)
        if self._completing:
            raise DeviceUsageError(f"{name}: taken() between completing() and completed()")
        if not 1 <= count <= qs:
            raise InflightError(f"{name}: a chain of {count} descriptors (1..{qs})")
        head = self._free_head
        if head >= qs:
            raise InflightError(f"{name}: no free entry for a chain of {count} descriptors")
        w16 = self._w16
        w32 = self._w32
        w64 = self._w64
        nxt = self._next
        w16[_P_NUM + head * _P_STEP16] = 0
        w64[_P_COUNTER + head * _P_STEP64] = self.counter
        self.counter = (self.counter + 1) & _U64_MAX
        if not STRONG_ORDER:
            write_barrier()  # the counter before the flag that makes the entry count
        self._w8[_P_INFLIGHT + head * _P_STEP8] = 1
        free = head
        for k in range(count):
            if free >= qs:
                raise InflightError(
                    f"{name}: the free list ran out after {k} of {count} descriptors"
                )
            addr, length, buf_id, flags = descs[k]
            if k == count - 1:
                w16[_P_LAST + head * _P_STEP16] = free
                self._last[head] = free
            w16[_P_NUM + head * _P_STEP16] = k + 1
            w64[_P_ADDR + free * _P_STEP64] = addr
            w32[_P_LEN + free * _P_STEP32] = length
            w16[_P_FLAGS + free * _P_STEP16] = flags
            w16[_P_ID + free * _P_STEP16] = buf_id
            free = nxt[free]
            w16[_P_FREE_HEAD] = free
        if not STRONG_ORDER:
            write_barrier()  # the copies and the new free_head before the commit of the chain
        w16[_P_OLD_FREE_HEAD] = free
        self._free_head = free
        return head

    def completing(self, entries: Sequence[int], used_idx: int, used_wrap: int) -> None:
        """The chains ``entries`` (from :meth:`taken`) are about to be published as ONE used
        descriptor, after which the device's used position is ``used_idx`` with wrap counter
        ``used_wrap``: put them on the free list and record that position. Call before the
        queue's write barrier and the used descriptor's flags store, which order these first."""
        name = self.name
        qs = self.queue_size
        if self._completing:
            raise DeviceUsageError(f"{name}: completing() twice without completed()")
        if not 0 <= used_idx < qs or used_wrap not in (0, 1):
            raise DeviceUsageError(f"{name}: used position {used_idx} wrap {used_wrap}")
        w16 = self._w16
        nxt = self._next
        free = self._free_head
        for entry in entries:
            if not 0 <= entry < qs:
                raise InflightError(f"{name}: entry {entry} outside 0..{qs - 1}")
            last = self._last[entry]
            w16[_P_NEXT + last * _P_STEP16] = free
            nxt[last] = free
            free = entry
        self._completing = True
        w16[_P_FREE_HEAD] = free
        self._free_head = free
        w16[_P_USED_IDX] = used_idx
        self._w8[_P_USED_WRAP] = used_wrap
        self._used_idx = used_idx
        self._used_wrap = used_wrap

    def completed(self, entries: Sequence[int]) -> None:
        """The used descriptor for ``entries`` is published: they leave flight, and the free list
        and used position recorded by :meth:`completing` become the committed ``old_*`` ones."""
        qs = self.queue_size
        w8 = self._w8
        for entry in entries:
            if not 0 <= entry < qs:
                raise InflightError(f"{self.name}: entry {entry} outside 0..{qs - 1}")
            w8[_P_INFLIGHT + entry * _P_STEP8] = 0
        if not STRONG_ORDER:
            write_barrier()  # the cleared flags before the commit of the new state
        self._commit(self._free_head, self._used_idx, self._used_wrap)
        self._completing = False

    def _commit(self, free_head: int, used_idx: int, used_wrap: int) -> None:
        # the spec's order: the free head, then the used position, its wrap counter last
        w16 = self._w16
        w16[_P_OLD_FREE_HEAD] = free_head
        w16[_P_OLD_USED_IDX] = used_idx
        self._w8[_P_OLD_USED_WRAP] = used_wrap

    # --- initialisation and recovery -------------------------------------------------------------

    def init(self, used_idx: int = 0, used_wrap: int = 1) -> None:
        """Make the queue region fresh, as DPDK lays it out: every entry free (``desc[j].next =
        j + 1``), ``desc_num`` the queue size, the used position the ring's (a new ring: 0 with
        wrap counter 1) as both current and committed, version last."""
        qs = self.queue_size
        if not 0 <= used_idx < qs or used_wrap not in (0, 1):
            raise DeviceUsageError(f"{self.name}: used position {used_idx} wrap {used_wrap}")
        w16 = self._w16
        self._w8[:] = bytes(len(self._w8))
        for j in range(qs):
            w16[_P_NEXT + j * _P_STEP16] = j + 1
        w16[_P_DESC_NUM] = qs
        w16[_P_USED_IDX] = used_idx
        w16[_P_OLD_USED_IDX] = used_idx
        self._w8[_P_USED_WRAP] = used_wrap
        self._w8[_P_OLD_USED_WRAP] = used_wrap
        if not STRONG_ORDER:
            write_barrier()  # the initialised fields before the version that vouches for them
        w16[_P_VERSION] = VERSION
        self.counter = 0
        self._next = list(range(1, qs + 1))
        self._last = [0] * qs
        self._free_head = 0
        self._used_idx = used_idx
        self._used_wrap = used_wrap
        self._completing = False

    def recover(
        self,
        flags_at: Callable[[int], int],
        *,
        ring_size: int | None = None,
        used_idx: int = 0,
        used_wrap: int = 1,
    ) -> PackedRecovery:
        """Bring the region in line with the ring after a reconnect, and say what to resubmit.

        ``flags_at(position)`` returns the flags of the ring descriptor at ``position`` (e.g.
        :meth:`~virtio_schema.ring.PackedRing.flags`); it is called at most once, only if a
        completion was in progress (the module docstring gives the decision rule). ``ring_size``
        is the ring's size (SET_VRING_NUM; the region's queue size if omitted). ``used_idx`` and
        ``used_wrap`` are the ring's used position (SET_VRING_BASE's), used only to initialise a
        fresh region (version 0).

        Then, as the spec says: the committed state is restored (a half-done take or completion
        rolls back), every entry on the free list leaves flight, and every chain still in flight
        is resubmitted in ascending ``counter`` order; the counter goes on after the largest.
        :class:`InflightError` for a region that breaks any of this (module rule 2), e.g. a free
        list that loops, or entries that are neither free nor in exactly one chain."""
        name = self.name
        qs = self.queue_size
        ring = _ring_size(name, qs, ring_size)
        snap = bytes(self._w8)  # rule 2: every value below is read once, from this copy
        hdr = PACKED_QUEUE_REGION.unpack_from(snap)
        if hdr.version == 0:
            if not 0 <= used_idx < ring:
                raise DeviceUsageError(f"{name}: used position {used_idx}, ring size {ring}")
            self.init(used_idx, used_wrap)
            return PackedRecovery((), used_idx, used_wrap, used_idx, used_wrap, True)
        self._check_header(hdr, ring)
        entries = [PACKED_DESC_STATE.unpack_from(snap, _P_HDR + i * _P_ENT) for i in range(qs)]

        # 1. a completion in progress: published (commit) or not (roll back)
        current = (hdr.free_head, hdr.used_idx, hdr.used_wrap_counter)
        committed = (hdr.old_free_head, hdr.old_used_idx, hdr.old_used_wrap_counter)
        publish = False
        if current[1:] != committed[1:]:
            w = hdr.old_used_wrap_counter
            still_avail = _AVAIL if w else _USED  # made available in lap w, not used yet
            publish = flags_at(hdr.old_used_idx) & (_AVAIL | _USED) != still_avail
            if publish:
                committed = current
        free_head, used_pos, wrap = committed
        # 2. the free list from the committed free head; 3. the chains still in flight
        where = self._walk_free_list(entries, free_head)
        chains, found, slots = self._collect_chains(entries, where)
        if slots > ring:
            raise InflightError(
                f"{name}: {slots} descriptors in flight, more than the ring's {ring}"
            )
        order, counter = _ordered(name, found)
        avail_pos = used_pos + slots
        avail_wrap = wrap
        if avail_pos >= ring:
            avail_pos -= ring
            avail_wrap ^= 1

        # all checked: now commit, restore the current state from the committed one, and take
        # the free list out of flight
        if publish:
            self._commit(free_head, used_pos, wrap)
        w16 = self._w16
        w16[_P_FREE_HEAD] = free_head
        w16[_P_USED_IDX] = used_pos
        w8 = self._w8
        w8[_P_USED_WRAP] = wrap
        for i in range(qs):
            if where[i] == _FREE and entries[i].inflight:
                w8[_P_INFLIGHT + i * _P_STEP8] = 0

        self.counter = counter
        self._next = [e.next for e in entries]
        self._last = [e.last if where[i] == _IN_CHAIN else 0 for i, e in enumerate(entries)]
        self._free_head = free_head
        self._used_idx = used_pos
        self._used_wrap = wrap
        self._completing = False
        resubmit = tuple(chains[entry] for entry in order)
        return PackedRecovery(resubmit, avail_pos, avail_wrap, used_pos, wrap, False)

    def _check_header(self, hdr: QueueRegionPackedRec, ring: int) -> None:
        name = self.name
        qs = self.queue_size
        if hdr.version != VERSION:
            raise InflightError(f"{name}: version {hdr.version}, expected 0 or {VERSION}")
        if hdr.desc_num != qs:
            raise InflightError(f"{name}: desc_num {hdr.desc_num}, the queue size is {qs}")
        for field, value in (("free_head", hdr.free_head), ("old_free_head", hdr.old_free_head)):
            if value > qs:
                raise InflightError(f"{name}: {field} {value} outside 0..{qs}")
        for field, value in (("used_idx", hdr.used_idx), ("old_used_idx", hdr.old_used_idx)):
            if value >= ring:
                raise InflightError(f"{name}: {field} {value}, the ring has {ring} descriptors")
        for field, value in (
            ("used_wrap_counter", hdr.used_wrap_counter),
            ("old_used_wrap_counter", hdr.old_used_wrap_counter),
        ):
            if value not in (0, 1):
                raise InflightError(f"{name}: {field} {value} (0 or 1)")

    def _walk_free_list(self, entries: list[DescStatePackedRec], free_head: int) -> bytearray:
        """Walk the free list from ``free_head`` to the end marker (the queue size); return each
        entry's place (:data:`_FREE` for the entries on it, 0 for the others)."""
        name = self.name
        qs = self.queue_size
        where = bytearray(qs)
        at = free_head
        for _ in range(qs + 1):
            if at == qs:
                break
            if at > qs:
                raise InflightError(f"{name}: the free list leads to entry {at}, outside 0..{qs}")
            if where[at]:
                raise InflightError(f"{name}: the free list loops back to entry {at}")
            where[at] = _FREE
            at = entries[at].next
        return where

    def _collect_chains(
        self, entries: list[DescStatePackedRec], where: bytearray
    ) -> tuple[dict[int, InflightChain], list[tuple[int, int]], int]:
        """The chains in flight (entries not free with ``inflight`` 1) by head entry, their
        ``(counter, entry)`` pairs and their descriptor count; every entry must be free or in
        exactly one chain."""
        name = self.name
        qs = self.queue_size
        chains: dict[int, InflightChain] = {}
        found: list[tuple[int, int]] = []
        slots = 0
        for head in range(qs):
            e = entries[head]
            if where[head] == _FREE:
                continue
            if e.inflight == 0:
                continue  # a later entry of some chain, or nothing (counted below)
            if e.inflight != 1:
                raise InflightError(f"{name}: entry {head} has inflight {e.inflight} (0 or 1)")
            if not 1 <= e.num <= qs:
                raise InflightError(f"{name}: chain at entry {head} has num {e.num} (1..{qs})")
            descs: list[InflightDesc] = []
            at = head
            for k in range(e.num):
                if k:
                    at = entries[at].next
                    if at >= qs:
                        raise InflightError(
                            f"{name}: chain at entry {head} leads to entry {at} after {k} of "
                            f"{e.num} descriptors"
                        )
                if where[at] == _FREE:
                    raise InflightError(f"{name}: chain at entry {head} holds free entry {at}")
                if where[at] == _IN_CHAIN:
                    raise InflightError(
                        f"{name}: chain at entry {head} holds entry {at}, already in a chain"
                    )
                where[at] = _IN_CHAIN
                d = entries[at]
                descs.append(InflightDesc(d.addr, d.len, d.id, d.flags))
            if at != e.last:
                raise InflightError(
                    f"{name}: chain at entry {head} ends at entry {at}, its last says {e.last}"
                )
            chains[head] = InflightChain(head, tuple(descs))
            found.append((e.counter, head))
            slots += e.num
        lost = where.count(0)
        if lost:
            raise InflightError(
                f"{name}: {lost} entries are neither free nor in a chain in flight "
                f"(first: {where.index(0)})"
            )
        return chains, found, slots
