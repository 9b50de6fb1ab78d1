"""What both queue formats share: identity, the broken latch, generations, orphans, save/restore.

Rules of this module:

1. The state every format keeps is here and nowhere else: the chain generation (chains from before a
   reset/restore are stale and returning them does nothing), the broken latch (after a ring
   violation nothing touches guest memory until reset/restore), the orphan list (chains
   garbage-collected on another thread), the notification bookkeeping.
2. Formats implement ``_start_format``, ``_publish_used``, ``next_chain``, the notification
   methods and ``state``; they never re-implement the rules above.
"""

from __future__ import annotations

import collections
import contextlib
import struct
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from virtio_schema.errors import DeviceUsageError
from virtio_schema.mem import DriverRange
from virtio_schema.queue.errors import (
    IndirectTableTooLarge,
    InvalidIndirectLength,
    OutOfOrderReturn,
    QueueBroken,
    RingError,
    UnmappedIndirectTable,
)
from virtio_schema.queue.state import DriverNotify, QueueState
from virtio_schema.schema import Feature

if TYPE_CHECKING:
    from virtio_schema.mem import DriverMem, Locate
    from virtio_schema.queue.desc_chain import ChainDescriptor, DescChain

__all__ = ["ADDR_END", "MAX_INDIRECT_ENTRIES", "MAX_TABLE_LEN", "MAX_TOTAL_LEN", "QueueBase"]

MAX_TOTAL_LEN = (1 << 32) - 1
"""Largest total length of a chain's buffers (the used length is a u32)."""
ADDR_END = 1 << 64
"""One past the last driver address: ``addr + len`` must not pass it."""
MAX_INDIRECT_ENTRIES = 65535
"""Most entries an indirect table may have."""
MAX_TABLE_LEN = 16 * MAX_INDIRECT_ENTRIES
"""Largest length of an indirect descriptor (bytes)."""


# --- indirect tables in one snapshot ---------------------------------------------------------------
#
# Linux (and DPDK) build an indirect table as exactly the chain it describes: entry k links to k + 1,
# readable entries first. Such a table is read in one copy and validated with a few byte-string
# operations instead of entry by entry. Anything else (a table longer than 256 entries, an unknown
# flag bit, another order, an address in the top half of the 64-bit space) returns None, and the
# queue's general walk reads the table entry by entry, with its precise errors. The outcome is the
# same either way: tests/test_queue_fast_table.py walks random tables both ways.

_FAST_TABLE_MAX = 256  # entries (the next fields' high bytes are then zero)
_KEEP_NEXT_WRITE_INDIRECT = bytes(b & 7 for b in range(256))  # what the split walk reads
_KEEP_WRITE_INDIRECT = bytes(b & 6 for b in range(256))  # what the packed walk reads (no NEXT)
_ZEROS = bytes(_FAST_TABLE_MAX)
_TWOS = b"\x02" * _FAST_TABLE_MAX  # WRITE
_Unpack = Callable[[bytes], tuple[int, ...]]
# n -> what checking and reading an n-entry table needs: the unpackers of the addr fields and of
# the len fields (flat tuples, no object per entry), and the next fields' low and high bytes of
# entries 0 .. n-2 in the split shape (1, 2, ..., n-1 and zeros)
_FIELDS: dict[int, tuple[_Unpack, _Unpack, bytes, bytes]] = {}


def _fields(n: int) -> tuple[_Unpack, _Unpack, bytes, bytes]:
    fields = _FIELDS[n] = (
        struct.Struct("<" + "Q8x" * n).unpack,
        struct.Struct("<" + "8xL4x" * n).unpack,
        bytes(range(1, n)),
        bytes(n - 1),
    )
    return fields


def sequential_table(
    view: memoryview, at: int, n: int, *, split: bool
) -> tuple[tuple[int, ...], tuple[int, ...], int, int, int] | None:
    """The ``n``-entry indirect table at ``view[at:]`` if it is one chain in table order:
    ``(addresses, lengths, readable entries, readable bytes, writable bytes)``, else ``None``.

    Split (``split=True``): every entry but the last has NEXT and ``next`` = its index + 1, the
    last has no NEXT. Packed: NEXT is ignored (every entry is in the chain). Both: readable
    entries before writable ones, no INDIRECT flag, every address below 2**63 (so no buffer
    reaches 2**64). Only the flag bits the walks read are looked at (NEXT, WRITE, INDIRECT)."""
    if n > _FAST_TABLE_MAX:
        return None
    snap = view[at : at + 16 * n].tobytes()
    fields = _FIELDS.get(n) or _fields(n)
    if split:
        # the flags' low bytes, kept to the bits the split walk reads: 1 (NEXT) for readable
        # entries, then 3 (NEXT | WRITE) for writable ones, and no NEXT on the last entry
        flags = snap[12::16].translate(_KEEP_NEXT_WRITE_INDIRECT)
        readable = flags.count(1)
        last = flags[-1]
        if last == 0:  # a readable last entry: all are readable
            if readable != n - 1:
                return None
            readable = n
        elif (  # a writable last entry, after readable ones and then writable ones
            last != 2
            or flags.count(3) != n - 1 - readable
            or (readable != n - 1 and flags.find(3) != readable)
        ):
            return None
        # every entry but the last links to the next one: next = k + 1 (bytes 14 and 15)
        end = 16 * n - 16
        if snap[14:end:16] != fields[2] or snap[15:end:16] != fields[3]:
            return None
    else:
        flags = snap[14::16].translate(_KEEP_WRITE_INDIRECT)
        readable = flags.count(0)
        if flags != _ZEROS[:readable] + _TWOS[: n - readable]:
            return None
    if not snap[7::16].isascii():  # an address's top byte at 0x80 or more
        return None
    lens = fields[1](snap)
    head = lens[0] if readable == 1 else sum(lens[:readable])
    return fields[0](snap), lens, readable, head, sum(lens) - head


class QueueBase:
    """The format-independent half of a virtqueue (see :class:`~virtio_schema.queue.Queue` and
    :class:`~virtio_schema.queue.PackedQueue`)."""

    size: int
    driver_mem: DriverMem
    features: int
    notifier: DriverNotify
    index: int

    def __init__(
        self, size: int, driver_mem: DriverMem, features: int, notify: DriverNotify, index: int
    ) -> None:
        self.size = size
        self.driver_mem = driver_mem
        self.features = features
        self.notifier = notify
        self.index = index
        self._orphans: collections.deque[tuple[int, int, int]] = collections.deque()
        self._generation = 0
        self._broken: RingError | None = None
        self._in_order = bool(features & Feature.IN_ORDER)
        self._indirect = bool(features & Feature.INDIRECT_DESC)
        self._outstanding: collections.deque[int] = collections.deque()  # IN_ORDER: pop order
        self._batch: list[tuple[int, int, int]] | None = None
        self._budget = -1  # chains next_chain may still hand out this turn; negative: no limit
        locate = getattr(driver_mem, "locate", None)  # the optional fast path (mem.Locate)
        self._locate: Locate | None = locate if callable(locate) else None

    # --- state ---------------------------------------------------------------------------------

    def _start(self, state: QueueState) -> None:
        self._check_state(state)  # refuse before changing anything
        self._generation += 1
        self._broken = None
        self._signalled_valid = False
        self._notify_enabled = True
        self._orphans.clear()
        self._outstanding.clear()
        self._batch = None
        self._start_format(state)

    def _check_state(self, state: QueueState) -> None:
        """Raise :class:`InvalidQueueState` if ``state`` does not fit this queue."""

    def _start_format(self, state: QueueState) -> None:
        raise NotImplementedError

    def state(self) -> QueueState:
        raise NotImplementedError

    def restore(self, state: QueueState) -> None:
        """Continue from ``state``; clears a broken latch. Chains still held from before are
        stale: returning them does nothing."""
        self._start(state)

    def reset(self) -> None:
        """Back to the device-reset state (indices 0, wrap counters 1, not broken, notifications
        enabled)."""
        self._start(QueueState())

    @property
    def broken(self) -> RingError | None:
        """The ring violation that broke the queue, or ``None``."""
        return self._broken

    def _break(self, error: RingError) -> QueueBroken:
        self._broken = error
        return QueueBroken(self.index, error)

    # --- turns ---------------------------------------------------------------------------------

    def set_budget(self, chains: int | None) -> None:
        """Let :meth:`next_chain` hand out at most ``chains`` more chains (``None``: no limit),
        then answer ``None`` as if the ring were empty until the budget is set again.

        A transport gives each queue a budget per turn so that a driver that keeps publishing
        cannot keep one device handler running forever (the vhost-user server: the queue size
        per turn, then the other queues and connections get theirs). Returning chains is never
        limited."""
        if chains is not None and chains < 0:
            raise DeviceUsageError(f"queue {self.index}: budget {chains} < 0")
        self._budget = -1 if chains is None else chains

    @property
    def budget(self) -> int | None:
        """Chains :meth:`next_chain` may still hand out before :meth:`set_budget` is called again
        (``None``: no limit; 0: the budget is spent, and work may remain)."""
        return None if self._budget < 0 else self._budget

    # --- returning chains ----------------------------------------------------------------------

    @property
    def in_order(self) -> bool:
        """IN_ORDER was negotiated: chains must be returned in the order they were taken."""
        return self._in_order

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Publish every chain returned inside the block at its end, at once: one used-index
        update (split) and one notification decision; under IN_ORDER, runs of chains are
        completed with a single used entry where the specification allows it. Transports wrap a
        device's kick handling in it; device code does not change. Nested blocks join the outer."""
        if self._batch is not None:
            yield
            return
        self._batch = []
        try:
            yield
        finally:
            items, self._batch = self._batch, None
            if items and self._broken is not None:
                items = []
            if items:
                self._publish_batch(items)

    def _check_return(self, chain: DescChain) -> None:
        """Called before a chain is marked returned: refuse an out-of-order return under
        IN_ORDER (a device-usage error; the chain stays held)."""
        if self._in_order and chain._gen == self._generation and self._outstanding:
            first = self._outstanding[0]
            if chain.head != first:
                raise OutOfOrderReturn(self.index, chain.head, first)

    def _return_chain(self, chain: DescChain, written: int) -> None:
        if self._in_order and chain._gen == self._generation:
            self._forget(chain.head)  # also when broken: the next-oldest can then be returned
        if chain._gen != self._generation or self._broken is not None:
            return  # from before a reset/restore, or the queue is broken: leave the ring alone
        if self._batch is not None:
            self._batch.append((chain.head, written, chain._slots))
        else:
            self._publish_used(chain.head, written, chain._slots)

    def _forget(self, head: int) -> None:
        """Drop ``head`` from the IN_ORDER bookkeeping (normally the oldest; a chain collected by
        the GC may not be, and then IN_ORDER is already broken by the device)."""
        outstanding = self._outstanding
        if outstanding and outstanding[0] == head:  # the normal, in-order case: O(1)
            outstanding.popleft()
            return
        with contextlib.suppress(ValueError):
            outstanding.remove(head)

    def _check_indirect_table(self, head: int, at: int, addr: int, length: int) -> None:
        """The table rules both formats share, after their own structural ones: a non-zero
        multiple of 16 bytes, at most 65535 entries, not wrapping past 2**64."""
        if length == 0 or length & 15:
            raise InvalidIndirectLength(self.index, head, at, length)
        if length >> 4 > MAX_INDIRECT_ENTRIES:
            raise IndirectTableTooLarge(self.index, head, at, length)
        if addr + length > ADDR_END:
            raise UnmappedIndirectTable(self.index, head, at, addr, length)

    def _lone_table(
        self, addr: int, length: int, split: bool
    ) -> tuple[tuple[int, ...], tuple[int, ...], int, int, int] | None:
        """The chain Linux and DPDK send with INDIRECT_DESC, a head that is one indirect
        descriptor (the caller saw INDIRECT without NEXT in its flags) whose table is one
        sequence: the table's buffers as :func:`sequential_table` gives them, read in one
        snapshot. ``None`` for anything else, every error included: the format's general walk
        then reads the chain entry by entry and names it."""
        if (
            length & 15
            or not 0 < length <= 16 * self.size  # the chain length limit: one buffer per entry
            or addr + length > ADDR_END
            or not self._indirect
        ):
            return None
        locate = self._locate
        found = locate(addr, length) if locate is not None else None
        if found is None:
            return None
        whole = sequential_table(found[0], found[1], length >> 4, split=split)
        if whole is None or whole[3] + whole[4] > MAX_TOTAL_LEN:
            return None
        return whole

    def _indirect_table(self, head: int, at: int, addr: int, length: int) -> tuple[memoryview, int]:
        """A view holding the indirect table ``[addr, addr+length)`` (checked) and the table's
        offset in it, for a walk that reads it at once, by translation. The walks try the
        untracked region lookup first, inline (:data:`~virtio_schema.mem.Locate`, an eighth of
        the cost); this is their path when the memory offers none or it found no single region.
        Raises :class:`UnmappedIndirectTable`."""
        dr = self.driver_mem.translate(DriverRange(addr, addr + length))
        if dr is None:
            raise UnmappedIndirectTable(self.index, head, at, addr, length)
        return dr.view, 0

    def _publish_batch(self, items: list[tuple[int, int, int]]) -> None:
        raise NotImplementedError

    def _describe(self, chain: DescChain) -> tuple[ChainDescriptor, ...]:
        raise NotImplementedError

    def _orphan(self, chain: DescChain) -> None:
        self._orphans.append((chain._gen, chain.head, chain._slots))

    def _return_orphans(self) -> None:
        while self._orphans:
            gen, head, slots = self._orphans.popleft()
            if gen == self._generation and self._broken is None:
                if self._in_order:
                    self._forget(head)
                self._publish_used(head, 0, slots)

    def _publish_used(self, head: int, written: int, slots: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        state = f"broken: {self._broken}" if self._broken else "ok"
        return (
            f"{type(self).__name__}(index={self.index}, size={self.size}, {self.state()}, {state})"
        )
