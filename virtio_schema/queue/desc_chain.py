"""``DescChain``: one descriptor chain the device took from a queue, returned exactly once.

Rules of this module:

1. A chain is parsed and validated completely when the queue hands it out: every descriptor was read
   once, as a whole record, and the results are kept here, so nothing re-reads the descriptor table
   (the driver may have rewritten it since).
2. A chain goes back to the driver exactly once: :meth:`DescChain.return_written`, or leaving a
   ``with`` block, or (as a last resort, with a :class:`ResourceWarning`) being garbage-collected.
   Returning twice or claiming more bytes than the chain's writable space is a
   :class:`~virtio_schema.errors.DeviceUsageError`.
3. A malformed chain (``error`` is set) still goes back, always with a used length of 0; reading
   its descriptors raises the error.

Both queue formats create ``DescChain`` objects through the small ``_ChainOwner`` protocol, so the
chain, util and example layers never know which format they serve.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol, final

from virtio_schema.queue.errors import (
    ChainAlreadyReturned,
    ChainError,
    QueueBroken,
    RingError,
    WrittenTooMuch,
)
from virtio_schema.queue.walk import ChainBuffers

if TYPE_CHECKING:
    from virtio_schema.mem import DriverMem, Locate

__all__ = ["ChainDescriptor", "DescChain"]

_get_ident: Final = threading.get_ident  # bound once: every chain records the thread that took it


class ChainDescriptor(NamedTuple):
    """One buffer of a chain, as validated when the chain was taken from the queue."""

    addr: int
    """Driver address of the buffer."""
    len: int
    """Length in bytes (0 is legal)."""
    writable: bool
    """Device-writable (``WRITE`` flag) or device-readable."""
    desc_index: int
    """Index in the descriptor table, or in the indirect table if ``indirect``."""
    indirect: bool
    """The descriptor came from an indirect table."""


class _ChainOwner(Protocol):
    """What a queue offers its chains (both formats)."""

    index: int

    @property
    def driver_mem(self) -> DriverMem: ...

    _generation: int
    _broken: RingError | None
    _in_order: bool
    _locate: Locate | None

    def _return_chain(self, chain: DescChain, written: int) -> None: ...

    def _check_return(self, chain: DescChain) -> None: ...

    def _orphan(self, chain: DescChain) -> None: ...


@final
class DescChain:
    """A descriptor chain taken from a queue by ``next_chain()``.

    Typical use::

        with queue.next_chain() as chain:      # returned on leaving the block
            ...                                # read/write through ReadableChain/WritableChain
            chain.written = n                  # bytes written into the writable buffers

    Attributes are read-only except :attr:`written`.
    """

    __slots__ = (
        "_gen",
        "_queue",
        "_returned",
        "_slots",
        "_tid",
        "_written",
        "buffers",
        "error",
        "head",
        "locate",
        "readable_len",
        "writable_len",
    )

    head: int
    """Head index (split) or buffer id (packed): what the used entry names."""
    buffers: ChainBuffers
    """The validated buffers (empty for a malformed chain): what the chain readers walk."""
    locate: Locate | None
    """The memory's untracked region lookup (:data:`~virtio_schema.mem.Locate`), if it has one:
    the chain readers' fast path for a copy done at once."""
    error: ChainError | None
    """Why the chain is malformed, or ``None``: the first rule the walk found broken when the
    queue handed the chain out (:class:`~virtio_schema.queue.walk.Validator`, one walk for both
    formats), one of :class:`~virtio_schema.queue.DescIndexOutOfRange` (split: a ``next`` past its
    table), :class:`~virtio_schema.queue.ChainTooLong`,
    :class:`~virtio_schema.queue.ReadableAfterWritable`,
    :class:`~virtio_schema.queue.BufferAddressOverflow` (``addr + len`` past 2**64),
    :class:`~virtio_schema.queue.ChainLengthOverflow`,
    :class:`~virtio_schema.queue.IndirectNotNegotiated`,
    :class:`~virtio_schema.queue.NestedIndirect`, :class:`~virtio_schema.queue.IndirectWithNext`,
    :class:`~virtio_schema.queue.InvalidIndirectLength`,
    :class:`~virtio_schema.queue.IndirectTableTooLarge` and
    :class:`~virtio_schema.queue.UnmappedIndirectTable` (a table not inside one region of guest
    memory: the walk reads the table, so it translates it).

    Never set for a buffer outside guest memory, wholly or in part: the walk does not translate
    buffers. The :class:`~virtio_schema.chain.ReadableChain` or
    :class:`~virtio_schema.chain.WritableChain` raises :class:`~virtio_schema.queue.UnmappedBuffer`
    (a :class:`~virtio_schema.queue.ChainError` too) when the device's access reaches the first
    unmapped byte, after moving the bytes before it (written ones count in :attr:`written`); the
    chain goes back with what was written. Translation waits for the access because a device pays
    nothing for a buffer it never touches (the walk is the hot path: a region lookup per buffer
    would cost on every chain), and because an answer at walk time would not hold: guest memory
    can change between the walk and the access (a vhost-user memory table update), so the access
    checks anyway.

    Ring errors never land here: for a head out of range
    (:class:`~virtio_schema.queue.HeadOutOfRange`), an avail index jump, and a packed chain that
    never ends or whose buffer id is out of range, ``next_chain()`` hands out no chain and raises
    :class:`~virtio_schema.queue.QueueBroken`."""
    readable_len: int
    """Total bytes of the device-readable buffers."""
    writable_len: int
    """Total bytes of the device-writable buffers."""

    def __init__(
        self,
        queue: _ChainOwner,
        head: int,
        buffers: ChainBuffers,
        error: ChainError | None = None,
        slots: int = 1,
    ) -> None:
        """Made by the queues only: ``buffers`` as :class:`~virtio_schema.queue.walk.Validator`
        validated them, or ``error`` (and empty buffers); ``slots`` is how many ring slots the
        chain took (packed; 1 for split)."""
        self._queue = queue
        self._gen = queue._generation
        self.head = head
        self.buffers = buffers
        self.locate = queue._locate
        self.readable_len = buffers.readable_len
        self.writable_len = buffers.writable_len
        # kept without its traceback: its frames (and the callers' locals, views of guest
        # memory among them) would live as long as the chain
        self.error = None if error is None else error.with_traceback(None)
        self._slots = slots
        self._written = 0
        self._returned = False
        self._tid = _get_ident()

    # --- what the chain holds ------------------------------------------------------------------

    @property
    def queue_index(self) -> int:
        """Index of the queue the chain came from."""
        return self._queue.index

    @property
    def driver_mem(self) -> DriverMem:
        """The memory the chain's addresses are translated through."""
        return self._queue.driver_mem

    @property
    def returned(self) -> bool:
        return self._returned

    @property
    def usable(self) -> bool:
        """The chain's buffers may still be accessed: not returned, and its queue not broken
        (after a ring violation the library touches no guest memory until reset)."""
        return not self._returned and self._queue._broken is None

    def check_usable(self) -> None:
        """Raise :class:`ChainAlreadyReturned` or :class:`QueueBroken` if not :attr:`usable`."""
        if self._returned:
            raise ChainAlreadyReturned(self._queue.index, self.head)
        broken = self._queue._broken
        if broken is not None:
            raise QueueBroken(self._queue.index, broken)

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self._returned:
            raise ChainAlreadyReturned(self._queue.index, self.head)

    def descriptors(self) -> tuple[ChainDescriptor, ...]:
        """All buffers in chain order: readable ones first, then writable ones. Raises
        :attr:`error` for a malformed chain."""
        self._check()
        b = self.buffers
        return tuple(
            ChainDescriptor(
                b.addrs[k], b.lens[k], k >= b.n_readable, b.desc_index[k], 0 <= b.table_start <= k
            )
            for k in range(len(b.addrs))
        )

    def readable(self) -> tuple[ChainDescriptor, ...]:
        """The device-readable buffers, in order."""
        return self.descriptors()[: self.buffers.n_readable]

    def writable(self) -> tuple[ChainDescriptor, ...]:
        """The device-writable buffers, in order."""
        return self.descriptors()[self.buffers.n_readable :]

    def __iter__(self) -> Iterator[ChainDescriptor]:
        return iter(self.descriptors())

    def __len__(self) -> int:
        """Number of buffers (0 for a malformed chain)."""
        return len(self.buffers.addrs)

    # --- giving it back ------------------------------------------------------------------------

    @property
    def written(self) -> int:
        """Bytes written into the writable buffers; the used length reported on return."""
        return self._written

    @written.setter
    def written(self, n: int) -> None:
        self.add_written(n - self._written)

    def add_written(self, n: int) -> None:
        """Count ``n`` more bytes written: ``written += n`` (the chain writers count through
        it). Refuses a total beyond the writable space and a returned chain; a malformed chain
        counts nothing (it goes back with 0)."""
        if self._returned:
            raise ChainAlreadyReturned(self._queue.index, self.head)
        if self.error is not None:
            return
        total = self._written + n
        if not 0 <= total <= self.writable_len:
            raise WrittenTooMuch(self._queue.index, self.head, total, self.writable_len)
        self._written = total

    def return_written(self, n: int | None = None) -> None:
        """Return the chain to the driver with ``n`` bytes written (default: :attr:`written`).

        A malformed chain is returned with 0 whatever ``n`` says. Raises
        :class:`~virtio_schema.queue.errors.ChainAlreadyReturned` on a second return and
        :class:`~virtio_schema.queue.errors.WrittenTooMuch` if ``n`` exceeds :attr:`writable_len`.
        """
        if self._returned:
            raise ChainAlreadyReturned(self._queue.index, self.head)
        if n is None:
            n = self._written
        elif self.error is None and not 0 <= n <= self.writable_len:
            raise WrittenTooMuch(self._queue.index, self.head, n, self.writable_len)
        queue = self._queue
        if queue._in_order:
            queue._check_return(self)
        self._returned = True
        self._written = n
        self._queue._return_chain(self, 0 if self.error is not None else n)

    def __enter__(self) -> DescChain:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._returned:
            self.return_written()

    def __del__(self) -> None:
        if self._returned:
            return
        self._returned = True
        warnings.warn(
            f"queue {self._queue.index}: chain at head {self.head} was never returned;"
            " returning it with length 0",
            ResourceWarning,
            stacklevel=1,
        )
        if _get_ident() == self._tid:
            self._queue._return_chain(self, 0)
        else:  # collected on another thread: the queue returns it at its next call
            self._queue._orphan(self)

    def __repr__(self) -> str:
        state = "returned" if self._returned else "held"
        bad = f", error={self.error}" if self.error is not None else ""
        return (
            f"DescChain(queue={self._queue.index}, head={self.head}, {len(self.buffers)} buffers,"
            f" r={self.readable_len}, w={self.writable_len}, {state}{bad})"
        )
