"""A fuzz harness for both queue formats: raw ring memory plus a sequence of device operations.

:func:`run_queue_case` decodes one input (any bytes are a valid input) into a ring format (split or
packed), a queue size, negotiated features (INDIRECT_DESC, EVENT_IDX, IN_ORDER), a starting
position, 8 KiB of raw guest memory holding the rings and the buffers, and up to 64 operations: the
device pops chains, reads and writes them, returns them in any order, toggles notifications, resets
or restores the queue; the "driver" rewrites arbitrary bytes between device operations. After every
operation it checks the invariants of the threat model and raises :class:`InvariantViolation` (a
crash, for the fuzzer) when one fails:

* only :class:`~virtio_schema.errors.VirtioError` subclasses come out of the public API (anything
  else propagates as it is, which the fuzzer reports);
* a ``next_chain()`` reads at most ``size + 2`` descriptors (split: the chain limit, one over it to
  notice, and one indirect descriptor) or ``2 * size + 2`` (packed: ``size`` slots and at most
  ``size`` indirect entries), as the queue's ``descriptors_read`` counts them;
* the device writes nothing outside the used ring (packed: the descriptor ring and the device event
  area) and the writable buffers of chains it held;
* once broken, the queue writes nothing at all until reset/restore.

The harness drives the queue through its public API only (:class:`FuzzedQueue`), so it runs the
same on the pure-Python and the compiled kernel. The queue is made by ``make_queue``
(:func:`~virtio_schema.queue.create_queue` unless a test passes a :class:`QueueFactory`: the
harness's own tests hand it a misbehaving queue to show that each check can fail).

``fuzz/fuzz_queue.py`` runs it under atheris; the test suite replays the corpus and every saved
finding through the same function, so a finding becomes a regression test by saving its input.
"""

from __future__ import annotations

import contextlib
import struct
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from virtio_schema.chain import ReadableChain, WritableChain
from virtio_schema.errors import VirtioError
from virtio_schema.mem import DeviceRange, DriverMem, DriverRange, GuestMemory
from virtio_schema.queue import (
    DescChain,
    DriverNotify,
    QueueMemory,
    QueueState,
    RingError,
    create_queue,
)
from virtio_schema.records import BLK_REQ_HDR
from virtio_schema.schema import Feature, avail_ring, used_ring
from virtio_schema.util import NotificationCounter

__all__ = [
    "MEM_BASE",
    "MEM_SIZE",
    "CaseStats",
    "FuzzedQueue",
    "InvariantViolation",
    "QueueFactory",
    "run_queue_case",
]

MEM_BASE = 0x1000
MEM_SIZE = 8192
DESC_OFF = 0x0
AVAIL_OFF = 0x100
USED_OFF = 0x200
MAX_OPS = 64


class InvariantViolation(AssertionError):
    """The library broke a promise of its threat model on this input."""


class _Reader:
    """Consumes the fuzz input; past its end every read returns zeros (any input is valid)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("<H", self.take(2))[0]
        return value

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)


class FuzzedQueue(Protocol):
    """What the harness does with a queue: the public API both formats share."""

    @property
    def broken(self) -> RingError | None: ...

    @property
    def descriptors_read(self) -> int: ...

    def next_chain(self) -> DescChain | None: ...

    def pending(self) -> int: ...

    def disable_notifications(self) -> None: ...

    def enable_notifications(self) -> bool: ...

    def reset(self) -> None: ...

    def restore(self, state: QueueState) -> None: ...

    def batch(self) -> AbstractContextManager[None]: ...


class QueueFactory(Protocol):
    """How the harness makes its queue: :func:`~virtio_schema.queue.create_queue`'s signature."""

    def __call__(
        self,
        memory: QueueMemory,
        size: int,
        driver_mem: DriverMem,
        *,
        features: int,
        notify: DriverNotify,
        state: QueueState | None = None,
    ) -> FuzzedQueue: ...


@dataclass
class CaseStats:
    """What one case did (for the fuzz run's summary and for tests)."""

    ops: int = 0
    chains: int = 0
    malformed: int = 0
    broken: bool = False
    returned: int = 0


def run_queue_case(data: bytes, *, make_queue: QueueFactory = create_queue) -> CaseStats:
    """Run one fuzz case; raises :class:`InvariantViolation` if the library misbehaves.
    ``make_queue`` builds the queue under test (the real one by default)."""
    r = _Reader(data)
    sel = r.u8()
    flags = r.u8()
    packed = bool(flags & 4)
    size = (sel % 16) + 1 if packed else 1 << (sel % 5)  # packed 1..16, split 1..16 (powers of 2)
    features = (
        (Feature.INDIRECT_DESC if flags & 1 else 0)
        | (Feature.EVENT_IDX if flags & 2 else 0)
        | (Feature.RING_PACKED if packed else 0)
        | (Feature.IN_ORDER if flags & 8 else 0)
    )
    a, u = r.u16(), r.u16()
    if packed:
        state = QueueState(a % size, u % size, not flags & 16, not flags & 32)
    else:
        state = QueueState(a, u)
    mem = bytearray(r.take(MEM_SIZE))
    stats = CaseStats()
    gm = GuestMemory([(MEM_BASE, mem)])
    try:
        _run(r, mem, gm, size, int(features), state, stats, make_queue)
    finally:
        gm.close()
    return stats


def _run(
    r: _Reader,
    mem: bytearray,
    gm: GuestMemory,
    size: int,
    features: int,
    state: QueueState,
    stats: CaseStats,
    make_queue: QueueFactory,
) -> None:
    def area(off: int, length: int) -> DeviceRange:
        dr = gm.translate(DriverRange.from_addr_len(MEM_BASE + off, length))
        assert dr is not None
        return dr

    packed = bool(features & Feature.RING_PACKED)
    used_len = 4 if packed else used_ring(size).sizeof()
    qmem = QueueMemory(
        area(DESC_OFF, 16 * size),
        area(AVAIL_OFF, 4 if packed else avail_ring(size).sizeof()),
        area(USED_OFF, used_len),
    )
    queue = make_queue(qmem, size, gm, features=features, notify=NotificationCounter(), state=state)
    # the device writes the used ring (split), or used descriptors in the ring and its event
    # area (packed); a packed chain reads at most size slots plus size indirect entries
    device_spans = [(USED_OFF, USED_OFF + used_len)]
    if packed:
        device_spans.append((DESC_OFF, DESC_OFF + 16 * size))
    max_reads = 2 * size + 2 if packed else size + 2
    held: list[DescChain] = []

    def allowed_spans() -> list[tuple[int, int]]:
        spans = list(device_spans)
        for c in held:
            if c.error is None and not c.returned:
                for d in c.writable():
                    start = d.addr - MEM_BASE
                    spans.append((start, start + d.len))
        return spans

    def check(before: bytes, spans: list[tuple[int, int]], what: str) -> None:
        if before == mem:
            return
        masked = bytearray(before)
        for s, e in spans:  # bytes the device may write take their new values
            s, e = max(s, 0), min(e, MEM_SIZE)
            if s < e:
                masked[s:e] = mem[s:e]
        if masked != mem:
            i = next(k for k in range(MEM_SIZE) if masked[k] != mem[k])
            raise InvariantViolation(f"{what}: byte {MEM_BASE + i:#x} changed outside")

    try:
        for _ in range(MAX_OPS):
            if r.exhausted:
                break
            op = r.u8() % 12
            stats.ops += 1
            before = bytes(mem)
            spans = allowed_spans()
            was_broken = queue.broken is not None
            try:
                if op in (0, 1, 2):
                    reads_before = queue.descriptors_read
                    chain = queue.next_chain()
                    if chain is not None:
                        stats.chains += 1
                        stats.malformed += chain.error is not None
                        held.append(chain)
                        spans = allowed_spans()
                    reads = queue.descriptors_read - reads_before
                    if reads > max_reads:
                        raise InvariantViolation(f"next_chain read {reads} descriptors")
                elif op == 3 and held:
                    c = held[r.u8() % len(held)]
                    rc = ReadableChain(c)
                    if r.u8() & 1:
                        rc.read_record(BLK_REQ_HDR)
                    else:
                        rc.read(r.u8())
                elif op == 4 and held:
                    c = held[r.u8() % len(held)]
                    WritableChain(c).write(r.take(r.u8() % 64))
                elif op in (5, 6) and held:
                    c = held.pop(r.u8() % len(held))
                    spans = allowed_spans() + [
                        (d.addr - MEM_BASE, d.addr - MEM_BASE + d.len)
                        for d in (c.writable() if c.error is None and not c.returned else ())
                    ]
                    if op == 5:
                        c.return_written(min(r.u16(), c.writable_len) if c.error is None else 0)
                    else:
                        with c:
                            pass
                    stats.returned += 1
                elif op == 7:
                    if r.u8() & 1:
                        queue.disable_notifications()
                    else:
                        queue.enable_notifications()
                elif op == 8:
                    # the driver rewrites bytes at will (any ring byte may change at any moment)
                    off = r.u16() % MEM_SIZE
                    chunk = r.take(r.u8() % 32)
                    mem[off : off + len(chunk)] = chunk[: MEM_SIZE - off]
                    continue
                elif op == 9:
                    if r.u8() & 1:
                        queue.reset()
                    elif packed:
                        queue.restore(QueueState(r.u16() % size, r.u16() % size, True, False))
                    else:
                        queue.restore(QueueState(r.u16(), r.u16()))
                    was_broken = False
                elif op == 10 and held:
                    # return everything held, oldest first, in one batch
                    spans = allowed_spans()
                    with queue.batch():
                        while held:
                            c = held.pop(0)
                            c.return_written(0)
                            stats.returned += 1
                elif op == 11:
                    queue.pending()
            except VirtioError:
                pass
            if queue.broken is not None:
                stats.broken = True
            if was_broken and queue.broken is not None:
                spans = []  # a broken queue touches nothing
            check(before, spans, f"op {op}")
    finally:
        for c in held:
            if not c.returned:
                with contextlib.suppress(VirtioError):
                    c.return_written(0)
