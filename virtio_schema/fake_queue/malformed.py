"""Malformed chains for hostile-driver tests, the same calls on both ring formats.

Theory of operation. A device test names the kind of chain a hostile driver could make
(:class:`Malformed`) and calls ``push_malformed(kind)`` on either fake driver
(:meth:`FakeDriver.push_malformed <virtio_schema.fake_queue.FakeDriver.push_malformed>`,
:meth:`FakePackedDriver.push_malformed <virtio_schema.fake_queue.FakePackedDriver.push_malformed>`);
the call returns the id the driver gave the chain, the one the used entry names (a split head, a
packed buffer id). Most kinds are the same buffers in both formats: :func:`malformed_chain` lays
them out as ``(addr, len, flags)`` entries in chain order (and fills the indirect tables they point
to, through the driver's own table packer), and each driver writes them as its ring format wants,
``NEXT`` between them. The kinds whose chain differs by format (a ``next`` out of range or in a
loop, an id out of range) are built by each driver; a kind a format cannot express (a ``next`` in a
packed ring; in a split ring, a direct descriptor before an indirect one, which is legal there)
makes that driver raise :class:`NotInThisFormat` (:func:`check_format`) before it touches the
ring.

What the device sees for each kind is in the :class:`Malformed` docstring: the table a device
author's test is written against.

Imports: :mod:`virtio_schema.errors`, :mod:`virtio_schema.ring`, :mod:`virtio_schema.schema`,
:mod:`virtio_schema.fake_queue.memory`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from virtio_schema.errors import DeviceUsageError
from virtio_schema.fake_queue.memory import FakeMemory
from virtio_schema.ring import DESC
from virtio_schema.schema import DescFlags, Feature

__all__ = [
    "Malformed",
    "MalformedChain",
    "NotInThisFormat",
    "check_features",
    "check_format",
    "malformed_chain",
]

# The flag bits and the descriptor size are the same in both ring formats (virtio 1.2, 2.7.5 and
# 2.8.10; the queue's walk asserts it)
_WRITE: Final = int(DescFlags.WRITE)
_INDIRECT: Final = int(DescFlags.INDIRECT)
_INDIRECT_DESC: Final = int(Feature.INDIRECT_DESC)
_DESC_SIZE: Final = DESC.size
_BUF: Final = 16  # the length of the buffers these chains carry
_GAP: Final = 0x1000  # how far past the end of memory an unmapped buffer starts
_ADDR_END: Final = 1 << 64
_MAX_INDIRECT_ENTRIES: Final = 65535

Entry = tuple[int, int, int]
"""One descriptor of a chain, format-neutral: ``(addr, len, flags)`` without ``NEXT``."""


class Malformed(enum.Enum):
    """A malformed chain a fake driver builds with ``push_malformed(kind)``, and what the device
    sees when it takes it.

    Three outcomes, by kind and format:

    - **the walk sets** :attr:`DescChain.error <virtio_schema.queue.DescChain.error>`: the chain
      comes out of ``next_chain()`` with ``error`` set (the class below), reading or writing it
      raises that error, and it goes back to the driver with a used length of 0 (the driver's
      ``used()`` reports ``UsedChain(id, 0, ())``); the queue goes on.
    - **the access raises** :class:`~virtio_schema.queue.UnmappedBuffer`: ``error`` is ``None``
      (the walk does not translate buffers); a ``ReadableChain``/``WritableChain`` raises it when
      the device's access reaches the first byte outside guest memory, after moving the bytes
      before it (a write counts them: the used length is what landed). The queue goes on.
    - **the ring breaks**: ``next_chain()`` raises :class:`~virtio_schema.queue.QueueBroken`
      (``cause``: the class below), now and on every later call until ``reset()``/``restore()``.
      The chain is never handed out, and nothing goes back. The fake driver does not follow a
      reset: go on with a fresh :func:`~virtio_schema.fake_queue.make_queue`.

    ======================= ========================== ============================
    kind                    split                      packed
    ======================= ========================== ============================
    NEXT_OUT_OF_RANGE       ``DescIndexOutOfRange``    :class:`NotInThisFormat`
    LOOP                    ``ChainTooLong``           ring: ``ChainNeverEnds``
    TOO_LONG                ``ChainTooLong``           ``ChainTooLong``
    READABLE_AFTER_WRITABLE ``ReadableAfterWritable``  ``ReadableAfterWritable``
    ADDRESS_WRAP            ``BufferAddressOverflow``  ``BufferAddressOverflow``
    LENGTH_OVERFLOW         ``ChainLengthOverflow``    ``ChainLengthOverflow``
    UNMAPPED_READABLE       access: ``UnmappedBuffer`` access: ``UnmappedBuffer``
    UNMAPPED_WRITABLE       access: ``UnmappedBuffer`` access: ``UnmappedBuffer``
    STRADDLING_READABLE     access: ``UnmappedBuffer`` access: ``UnmappedBuffer``
    STRADDLING_WRITABLE     access: ``UnmappedBuffer`` access: ``UnmappedBuffer``
    INDIRECT_NOT_NEGOTIATED ``IndirectNotNegotiated``  ``IndirectNotNegotiated``
    INDIRECT_EMPTY          ``InvalidIndirectLength``  ``InvalidIndirectLength``
    INDIRECT_BAD_LENGTH     ``InvalidIndirectLength``  ``InvalidIndirectLength``
    INDIRECT_TOO_LARGE      ``IndirectTableTooLarge``  ``IndirectTableTooLarge``
    INDIRECT_WITH_NEXT      ``IndirectWithNext``       ``IndirectWithNext``
    INDIRECT_NOT_ALONE      :class:`NotInThisFormat`   ``IndirectWithNext``
    NESTED_INDIRECT         ``NestedIndirect``         ``NestedIndirect``
    UNMAPPED_INDIRECT       ``UnmappedIndirectTable``  ``UnmappedIndirectTable``
    ID_OUT_OF_RANGE         ring: ``HeadOutOfRange``   ring: ``BufferIdOutOfRange``
    ======================= ========================== ============================

    Needs: the indirect kinds other than INDIRECT_NOT_NEGOTIATED need INDIRECT_DESC in the
    queue's features (without it the walk reports ``IndirectNotNegotiated`` first), and
    INDIRECT_NOT_NEGOTIATED needs it off; a driver refuses the wrong features with a
    :class:`~virtio_schema.errors.DeviceUsageError`, as it refuses a kind whose chain does not fit
    the ring (most take two descriptors; packed LOOP takes the whole, empty, ring).

    No kind for a zero-length buffer: the specification allows one (Linux sends them), and the
    queue accepts it (DESIGN.md, "Policies").
    """

    NEXT_OUT_OF_RANGE = "next-out-of-range"
    """Split: a descriptor with NEXT whose ``next`` is the queue size, one past the table. A
    packed chain has no ``next`` field (its descriptors are consecutive slots):
    :class:`NotInThisFormat`."""
    LOOP = "loop"
    """A chain whose end is never reached. Split: a ``next`` loop back to the head (over two
    descriptors; one, pointing at itself, in a queue of size 1): ``ChainTooLong`` once the walk
    has accepted ``size`` buffers. Packed (no ``next`` to loop with): NEXT on every slot of the
    ring, so the chain's last descriptor, which holds its buffer id, cannot be found:
    ``ChainNeverEnds``, a ring error. Needs an empty packed ring."""
    TOO_LONG = "too-long"
    """An indirect table of ``size + 1`` entries: one buffer more than the chain length limit
    (virtio 1.2, 2.7.5.3.1 and 2.8.19; exactly ``size`` is legal). A direct chain cannot be longer
    than the ring without a loop (split, LOOP) or without never ending (packed, LOOP)."""
    READABLE_AFTER_WRITABLE = "readable-after-writable"
    """A writable buffer, then a readable one (virtio 1.2, 2.7.4.2)."""
    ADDRESS_WRAP = "address-wrap"
    """A buffer whose ``addr + len`` passes 2**64."""
    LENGTH_OVERFLOW = "length-overflow"
    """Two buffers of 2**31 bytes each (outside guest memory, never touched): 2**32 in total, one
    more than a used length can say."""
    UNMAPPED_READABLE = "unmapped-readable"
    """A readable buffer wholly outside guest memory, then a writable buffer in it."""
    UNMAPPED_WRITABLE = "unmapped-writable"
    """A readable buffer in guest memory, then a writable buffer wholly outside it."""
    STRADDLING_READABLE = "straddling-readable"
    """A readable buffer of 16 bytes whose first 8 are the last 8 bytes of guest memory (the end
    of its highest region), then a writable buffer in it. Reading moves the 8 mapped bytes, then
    raises."""
    STRADDLING_WRITABLE = "straddling-writable"
    """A readable buffer in guest memory, then a writable buffer of 16 bytes whose first 8 are
    the last 8 bytes of guest memory. A write lands (and counts) up to 8 bytes, then raises."""
    INDIRECT_NOT_NEGOTIATED = "indirect-not-negotiated"
    """A well-formed indirect table, on a queue without INDIRECT_DESC."""
    INDIRECT_EMPTY = "indirect-empty"
    """An indirect descriptor of length 0 (an empty table)."""
    INDIRECT_BAD_LENGTH = "indirect-bad-length"
    """An indirect descriptor of length 24, not a multiple of 16."""
    INDIRECT_TOO_LARGE = "indirect-too-large"
    """An indirect descriptor of 65536 entries (1 MiB), one more than the most a table may have;
    refused before the table is read."""
    INDIRECT_WITH_NEXT = "indirect-with-next"
    """An indirect descriptor with NEXT, followed by a writable buffer (virtio 1.2, 2.7.5.3.1;
    packed, 2.8.19)."""
    INDIRECT_NOT_ALONE = "indirect-not-alone"
    """Packed: a readable buffer, then an indirect descriptor: in a packed ring an indirect
    descriptor must be the chain's only one (virtio 1.2, 2.8.19). A split chain may end with one
    (2.7.5.3.1), so there the chain is well-formed: :class:`NotInThisFormat`."""
    NESTED_INDIRECT = "nested-indirect"
    """An indirect table whose entry is an indirect descriptor again (virtio 1.2, 2.7.5.3.1)."""
    UNMAPPED_INDIRECT = "unmapped-indirect"
    """An indirect descriptor whose table is wholly outside guest memory. Unlike a buffer's,
    the walk detects it: it must read the table."""
    ID_OUT_OF_RANGE = "id-out-of-range"
    """The id that names the chain is the queue size, not below it. Split: an available ring entry
    naming head ``size`` (no descriptor is written): ``HeadOutOfRange``. Packed: a chain of one
    descriptor with buffer id ``size``: ``BufferIdOutOfRange``. Both are ring errors: the chain
    could not be returned. ``push_malformed`` returns that id."""


_NOT_IN: Final[dict[tuple[Malformed, bool], str]] = {
    (Malformed.NEXT_OUT_OF_RANGE, True): (
        "a packed chain has no next field: its descriptors are consecutive ring slots"
    ),
    (Malformed.INDIRECT_NOT_ALONE, False): (
        "a split chain may end with an indirect descriptor after direct ones (virtio 1.2,"
        " 2.7.5.3.1): that chain is well-formed"
    ),
}


class NotInThisFormat(DeviceUsageError):
    """A :class:`Malformed` kind the ring format cannot express (see each kind's docstring)."""

    def __init__(self, kind: Malformed, packed: bool, reason: str) -> None:
        self.kind = kind
        self.packed = packed
        fmt = "packed" if packed else "split"
        super().__init__(f"{kind} has no {fmt} equivalent: {reason}")


def check_format(kind: Malformed, *, packed: bool) -> None:
    """Raise :class:`NotInThisFormat` if ``kind`` has no chain in the ring format."""
    reason = _NOT_IN.get((kind, packed))
    if reason is not None:
        raise NotInThisFormat(kind, packed, reason)


@dataclass
class MalformedChain:
    """A format-neutral malformed chain: ``entries`` in chain order (the ring format links them),
    and the fake memory ``allocations`` (buffers, tables) the driver frees when it comes back."""

    entries: list[Entry]
    allocations: list[int] = field(default_factory=list)

    def release(self, memory: FakeMemory) -> None:
        """Free the allocations (the chain was not published after all)."""
        for addr in self.allocations:
            memory.free(addr)
        self.allocations.clear()


_NEEDS_INDIRECT: Final = frozenset(
    {
        Malformed.TOO_LONG,
        Malformed.INDIRECT_EMPTY,
        Malformed.INDIRECT_BAD_LENGTH,
        Malformed.INDIRECT_TOO_LARGE,
        Malformed.INDIRECT_WITH_NEXT,
        Malformed.INDIRECT_NOT_ALONE,
        Malformed.NESTED_INDIRECT,
        Malformed.UNMAPPED_INDIRECT,
    }
)


def check_features(kind: Malformed, features: int) -> None:
    """Raise :class:`~virtio_schema.errors.DeviceUsageError` if ``kind`` cannot be shown on a
    queue with ``features`` (the indirect kinds need INDIRECT_DESC, INDIRECT_NOT_NEGOTIATED needs it
    off)."""
    indirect = bool(features & _INDIRECT_DESC)
    if kind is Malformed.INDIRECT_NOT_NEGOTIATED and indirect:
        raise DeviceUsageError(f"{kind} needs a queue without INDIRECT_DESC")
    if kind in _NEEDS_INDIRECT and not indirect:
        raise DeviceUsageError(f"{kind} needs INDIRECT_DESC in the queue's features")


def malformed_chain(
    kind: Malformed,
    memory: FakeMemory,
    size: int,
    table: Callable[[Sequence[Entry]], int],
) -> MalformedChain:
    """The chain of ``kind`` for a queue of ``size``, its buffers allocated in ``memory``;
    ``table`` packs an indirect table in the driver's format and returns its address. For the
    kinds whose chain is the same in both formats (not NEXT_OUT_OF_RANGE, LOOP, ID_OUT_OF_RANGE:
    the drivers build those). A chain longer than ``size`` is refused with a
    :class:`~virtio_schema.errors.DeviceUsageError`, allocating nothing."""
    out = MalformedChain([])
    try:
        out.entries = _entries(kind, memory, size, table, out.allocations)
    except BaseException:
        out.release(memory)
        raise
    if len(out.entries) > size:
        out.release(memory)
        raise DeviceUsageError(
            f"{kind} takes {len(out.entries)} descriptors, more than the queue size {size}"
        )
    return out


def _entries(
    kind: Malformed,
    memory: FakeMemory,
    size: int,
    table: Callable[[Sequence[Entry]], int],
    allocs: list[int],
) -> list[Entry]:
    def readable(data: bytes) -> Entry:
        addr = memory.alloc_buffer(data)
        allocs.append(addr)
        return (addr, len(data), 0)

    def writable() -> Entry:
        addr = memory.alloc_buffer(_BUF)
        allocs.append(addr)
        return (addr, _BUF, _WRITE)

    def indirect(entries: Sequence[Entry], length: int | None = None) -> Entry:
        addr = table(entries)
        allocs.append(addr)
        return (addr, _DESC_SIZE * len(entries) if length is None else length, _INDIRECT)

    outside = memory.end + _GAP  # past every region: no byte of it is guest memory
    if kind is Malformed.TOO_LONG:
        return [indirect([readable(b"too long")] * (size + 1))]
    if kind is Malformed.READABLE_AFTER_WRITABLE:
        return [writable(), readable(b"readable after writable")]
    if kind is Malformed.ADDRESS_WRAP:
        return [(_ADDR_END - _BUF // 2, _BUF, 0)]
    if kind is Malformed.LENGTH_OVERFLOW:
        return [(outside, 1 << 31, 0), (outside + (1 << 31), 1 << 31, _WRITE)]
    if kind is Malformed.UNMAPPED_READABLE:
        return [(outside, _BUF, 0), writable()]
    if kind is Malformed.UNMAPPED_WRITABLE:
        return [readable(b"unmapped writable"), (outside, _BUF, _WRITE)]
    if kind is Malformed.STRADDLING_READABLE or kind is Malformed.STRADDLING_WRITABLE:
        half = _BUF // 2
        tail = memory.alloc_at(memory.end - half, half)  # the mapped half is the chain's
        allocs.append(tail)
        if kind is Malformed.STRADDLING_READABLE:
            memory.write(tail, b"mapped!!")
            return [(tail, _BUF, 0), writable()]
        return [readable(b"straddling write"), (tail, _BUF, _WRITE)]
    if kind is Malformed.INDIRECT_NOT_NEGOTIATED:
        return [indirect([readable(b"not negotiated")])]
    if kind is Malformed.INDIRECT_EMPTY:
        return [indirect([readable(b"empty")], 0)]
    if kind is Malformed.INDIRECT_BAD_LENGTH:
        return [indirect([readable(b"bad length"), writable()], _DESC_SIZE + _DESC_SIZE // 2)]
    if kind is Malformed.INDIRECT_TOO_LARGE:  # the length is refused before the table is read
        return [indirect([readable(b"too large")], _DESC_SIZE * (_MAX_INDIRECT_ENTRIES + 1))]
    if kind is Malformed.INDIRECT_WITH_NEXT:
        return [indirect([readable(b"with next")]), writable()]
    if kind is Malformed.INDIRECT_NOT_ALONE:
        return [readable(b"not alone"), indirect([writable()])]
    if kind is Malformed.NESTED_INDIRECT:
        return [indirect([indirect([readable(b"nested")])])]
    if kind is Malformed.UNMAPPED_INDIRECT:
        return [(outside, _DESC_SIZE, _INDIRECT)]
    raise AssertionError(f"{kind} is built by the ring format's driver")
