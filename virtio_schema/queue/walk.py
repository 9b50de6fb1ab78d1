"""The chain validator: one walk over a descriptor chain, for both ring formats.

Theory of operation. A ring format knows where a chain's descriptors are: the split ring follows
``next`` from the head through the descriptor table, the packed ring reads consecutive slots; an
indirect table is walked by ``next`` (split) or entry by entry (packed). Each format supplies that
as a :class:`DescSource`, a cursor that reads the descriptor it stands on once, as one whole record,
into plain fields. :meth:`Validator.walk` drives the cursor and judges every descriptor against the
validation catalogue (:mod:`virtio_schema.queue.errors`), collecting the buffers into a
:class:`ChainBuffers` record, which the queue wraps in a :class:`~virtio_schema.queue.DescChain`.

Rules of this module:

1. Every rule a chain can break is checked here and nowhere else: the chain length limit, the
   address range of a buffer (``addr + len`` within 2**64), readable-before-writable, the
   indirect rules (negotiated, not nested, not with NEXT, alone in a packed chain, a non-empty
   multiple of 16 bytes, at most 65535 entries, mapped), and the total length. A source raises only
   what is about its own order (a split ``next`` out of range; a packed chain without end, which
   is a ring error). One rule is left to the access: whether a buffer lies in guest memory. The
   walk translates only the indirect table it must read; a buffer is translated by the chain
   reader or writer when the device reaches it (:class:`~virtio_schema.queue.UnmappedBuffer` if
   it is not mapped), so the walk, the hot path, costs no region lookup per buffer, a buffer the
   device never touches costs nothing, and a mapping that changed since the walk is still caught
   (see :attr:`DescChain.error <virtio_schema.queue.DescChain.error>`).
2. Work is bounded: at most ``size`` buffers are accepted per chain (the chain length limit of
   virtio 1.2, 2.7.5.2 and 2.8.17, direct and indirect alike) and at most one table is followed, so a
   source reads at most ``size + 2`` descriptors whatever the ring holds.
3. The walk keeps no state between chains and does no I/O: the indirect table is located through
   the queue's :class:`~virtio_schema.mem.DriverMem`.

Imports: :mod:`virtio_schema.mem`, :mod:`virtio_schema.schema`, :mod:`virtio_schema.queue.errors`.
"""

from __future__ import annotations

from typing import Final, final

from virtio_schema.mem import DriverMem, DriverRange, Locate
from virtio_schema.queue.errors import (
    BufferAddressOverflow,
    ChainError,
    ChainLengthOverflow,
    ChainTooLong,
    IndirectNotNegotiated,
    IndirectTableTooLarge,
    IndirectWithNext,
    InvalidIndirectLength,
    NestedIndirect,
    ReadableAfterWritable,
    UnmappedIndirectTable,
)
from virtio_schema.schema import DescFlags, PackedDescFlags

__all__ = [
    "ADDR_END",
    "INDIRECT",
    "MAX_INDIRECT_ENTRIES",
    "MAX_TOTAL_LEN",
    "NEXT",
    "WRITE",
    "ChainBuffers",
    "CheckedChain",
    "DescSource",
    "Validator",
]

MAX_TOTAL_LEN: Final = (1 << 32) - 1
"""Largest total length of a chain's buffers (the used length is a u32)."""
ADDR_END: Final = 1 << 64
"""One past the last driver address: ``addr + len`` must not pass it."""
MAX_INDIRECT_ENTRIES: Final = 65535
"""Most entries an indirect table may have."""
SAFE_ADDR: Final = (1 << 62) - 1
"""No buffer at or below this address reaches :data:`ADDR_END` (lengths are u32): the walk tests
it first, a machine comparison where compiled, before the exact test on a 65-bit sum."""
DESC_SIZE: Final = 16
"""Bytes per descriptor in both formats (checked against the ring layouts in ``ring``)."""

# The flag bits the walk reads have the same values in both formats (virtio 1.2, 2.7.5 and 2.8.10)
NEXT: Final = int(DescFlags.NEXT)
WRITE: Final = int(DescFlags.WRITE)
INDIRECT: Final = int(DescFlags.INDIRECT)
assert (
    int(PackedDescFlags.NEXT),
    int(PackedDescFlags.WRITE),
    int(PackedDescFlags.INDIRECT),
) == (NEXT, WRITE, INDIRECT)


@final
class ChainBuffers:
    """The validated buffers of one chain, readable ones first (a named, typed record).

    ``addrs[k]``, ``lens[k]`` and ``desc_index[k]`` describe buffer ``k``: its driver address, its
    length and where its descriptor was (the index in the descriptor table or indirect table, or
    the ring position of a packed descriptor). Buffers from ``table_start`` on came from an
    indirect table (``table_start`` is ``-1`` when none did)."""

    addrs: list[int]
    lens: list[int]
    desc_index: list[int]
    n_readable: int
    readable_len: int
    writable_len: int
    table_start: int

    def __init__(self) -> None:
        self.addrs = []
        self.lens = []
        self.desc_index = []
        self.n_readable = 0
        self.readable_len = 0
        self.writable_len = 0
        self.table_start = -1

    def __len__(self) -> int:
        return len(self.addrs)


@final
class CheckedChain:
    """A validated chain as a queue's ``check_chain`` reports it: ``head`` (split) or buffer id
    (packed), the ``buffers`` (empty if ``error`` is set), the ``error`` it breaks first, and
    the ring ``slots`` it takes (packed; 1 for split)."""

    def __init__(
        self, head: int, buffers: ChainBuffers, error: ChainError | None, slots: int
    ) -> None:
        self.head = head
        self.buffers = buffers
        # kept without its traceback: its frames (and the callers' locals, views of guest
        # memory among them) would live as long as the chain
        self.error = None if error is None else error.with_traceback(None)
        self.slots = slots


class DescSource:
    """A cursor over the descriptors of one chain, in the ring format's order.

    The walk gets it standing on the chain's first descriptor (each format's ``start`` puts it
    there). Moving to a descriptor, the cursor reads it once into ``at`` (its index or ring
    position), ``addr``, ``length`` and ``flags``, and counts it in ``reads`` (the queues'
    :attr:`~virtio_schema.queue.Queue.descriptors_read`, which the hostile-driver tests and the
    fuzz harness bound). :meth:`advance` moves to the next descriptor; :meth:`table` gives the
    format's cursor over an indirect table, standing on its first entry. Formats subclass it;
    the walk never asks which one it has."""

    at: int
    addr: int
    length: int
    flags: int
    reads: int

    def __init__(self) -> None:
        self.at = 0
        self.addr = 0
        self.length = 0
        self.flags = 0
        self.reads = 0

    def advance(self) -> bool:
        """Read the chain's next descriptor; ``False`` if the current one ends the chain."""
        raise NotImplementedError

    def table(self, view: memoryview, offset: int, entries: int) -> DescSource:
        """The cursor over the indirect table of ``entries`` (> 0) descriptors at
        ``view[offset:]``, standing on (having read) its first entry."""
        raise NotImplementedError


@final
class Validator:
    """The validation catalogue of one queue, applied to a chain at a time by :meth:`walk`.

    ``size`` is the queue size (the chain length limit), ``indirect`` says whether INDIRECT_DESC
    was negotiated, ``indirect_alone`` whether an indirect descriptor must be the chain's only one
    (packed, virtio 1.2, 2.8.19) rather than only its last (split, 2.7.5.3.1). ``locate`` is the
    memory's untracked region lookup, if it has one (:data:`~virtio_schema.mem.Locate`)."""

    def __init__(
        self,
        queue: int,
        size: int,
        driver_mem: DriverMem,
        locate: Locate | None,
        *,
        indirect: bool,
        indirect_alone: bool,
    ) -> None:
        self.queue = queue
        self.size = size
        self.driver_mem = driver_mem
        self.locate = locate
        self.indirect = indirect
        self.indirect_alone = indirect_alone

    def walk(self, head: int, source: DescSource) -> ChainBuffers:
        """The buffers of the chain that ``source`` reads, from the descriptor it stands on
        (named ``head`` in errors), or the
        :class:`~virtio_schema.queue.ChainError` that names the first rule it breaks."""
        chain = ChainBuffers()
        addrs = chain.addrs
        lens = chain.lens
        where = chain.desc_index
        size = self.size
        n_readable = readable_len = writable_len = 0
        while True:
            flags = source.flags
            if flags & INDIRECT:
                source = self._enter_table(head, source, chain)
                continue
            # one buffer: within the chain length limit (virtio 1.2, 2.7.5.2 and 2.8.17), inside
            # the address space, and readable only before every writable one (2.7.4.2)
            n = len(addrs)
            if n >= size:
                raise ChainTooLong(self.queue, head, size)
            addr = source.addr
            length = source.length
            if addr > SAFE_ADDR and addr + length > ADDR_END:
                raise BufferAddressOverflow(self.queue, head, source.at, addr, length)
            if flags & WRITE:
                writable_len += length
            elif n > n_readable:
                raise ReadableAfterWritable(self.queue, head, source.at)
            else:
                readable_len += length
                n_readable += 1
            addrs.append(addr)
            lens.append(length)
            where.append(source.at)
            if not source.advance():
                break
        if readable_len + writable_len > MAX_TOTAL_LEN:
            raise ChainLengthOverflow(self.queue, head, readable_len + writable_len)
        chain.n_readable = n_readable
        chain.readable_len = readable_len
        chain.writable_len = writable_len
        return chain

    def _enter_table(self, head: int, source: DescSource, chain: ChainBuffers) -> DescSource:
        """Check the INDIRECT descriptor ``source`` stands on (virtio 1.2, 2.7.5.3 and 2.8.19)
        and return the cursor on its table's first entry."""
        at = source.at
        addr = source.addr
        length = source.length
        if not self.indirect:
            raise IndirectNotNegotiated(self.queue, head, at)
        if chain.table_start >= 0:
            raise NestedIndirect(self.queue, head, at)
        if source.flags & NEXT:
            raise IndirectWithNext(self.queue, head, at)
        if self.indirect_alone and chain.addrs:
            raise IndirectWithNext(self.queue, head, at, "is INDIRECT after other descriptors")
        if length == 0 or length % DESC_SIZE:
            raise InvalidIndirectLength(self.queue, head, at, length)
        entries = length // DESC_SIZE
        if entries > MAX_INDIRECT_ENTRIES:
            raise IndirectTableTooLarge(self.queue, head, at, length)
        if addr > SAFE_ADDR and addr + length > ADDR_END:
            raise UnmappedIndirectTable(self.queue, head, at, addr, length)
        view, offset = self._table_memory(head, at, addr, length)
        chain.table_start = len(chain.addrs)
        return source.table(view, offset, entries)

    def _table_memory(self, head: int, at: int, addr: int, length: int) -> tuple[memoryview, int]:
        """A view holding the table ``[addr, addr + length)`` and the table's offset in it: the
        memory's untracked region lookup where it has one, else a translation."""
        if self.locate is not None:
            found = self.locate(addr, length)
            if found is not None:
                return found
        dr = self.driver_mem.translate(DriverRange(addr, addr + length))
        if dr is None:
            raise UnmappedIndirectTable(self.queue, head, at, addr, length)
        return dr.view, 0
