"""The validation catalogue as exception classes: one class per rule a driver can break.

Two kinds of driver violation (virtio 1.2, 2.7 and 2.8; each class says which rule it stands for):

* :class:`ChainError`: one chain is malformed. The queue keeps working. What the walk finds, the
  chain is handed to the device with :attr:`DescChain.error` set, any attempt to read it raises the
  error, and the chain is returned to the driver with a used length of 0 so the driver never loses
  a slot. One kind is found later: :class:`UnmappedBuffer`, raised by the chain reader or writer
  when the device's access reaches a byte outside guest memory (the walk does not translate
  buffers: :attr:`DescChain.error` says why); the chain goes back with what was written.
* :class:`RingError`: the ring itself is inconsistent (the avail index jumped, a head index is out of
  range). The queue latches broken: :meth:`Queue.next_chain` raises :class:`QueueBroken` from then on,
  without touching guest memory again, until ``reset()`` or a restore. Never a busy loop.

Device-side misuse (returning a chain twice, writing past the writable space) raises
:class:`~virtio_schema.errors.DeviceUsageError` subclasses, also listed here.
"""

from __future__ import annotations

from virtio_schema.errors import DeviceUsageError, DriverError

__all__ = [
    "AvailIndexJump",
    "BufferAddressOverflow",
    "BufferIdOutOfRange",
    "ChainAlreadyReturned",
    "ChainError",
    "ChainLengthOverflow",
    "ChainNeverEnds",
    "ChainTooLong",
    "DescIndexOutOfRange",
    "HeadOutOfRange",
    "IndirectNotNegotiated",
    "IndirectTableTooLarge",
    "IndirectWithNext",
    "InvalidIndirectLength",
    "InvalidQueueState",
    "NestedIndirect",
    "OutOfOrderReturn",
    "QueueBroken",
    "ReadableAfterWritable",
    "RingError",
    "UnmappedBuffer",
    "UnmappedIndirectTable",
    "WrittenTooMuch",
]


class ChainError(DriverError):
    """A malformed descriptor chain (the queue goes on; the chain is returned with length 0)."""

    def __init__(self, queue: int, head: int, message: str) -> None:
        self.queue = queue
        self.head = head
        super().__init__(f"queue {queue}, chain at head {head}: {message}")


class RingError(DriverError):
    """An inconsistent ring: the queue latches broken."""

    def __init__(self, queue: int, message: str) -> None:
        self.queue = queue
        super().__init__(f"queue {queue}: {message}")


class QueueBroken(DriverError):
    """Raised by every ``next_chain()`` after a :class:`RingError`, until ``reset()``/restore.

    ``cause`` is the :class:`RingError` that broke the queue.
    """

    def __init__(self, queue: int, cause: RingError) -> None:
        self.queue = queue
        self.cause = cause
        super().__init__(f"queue {queue} is broken ({cause}); reset it to continue")


# --- ring-level: latch broken --------------------------------------------------------------------


class AvailIndexJump(RingError):
    """``avail.idx`` moved more than the queue size past the last index the device saw."""

    def __init__(self, queue: int, avail_idx: int, last_avail: int, size: int) -> None:
        self.avail_idx = avail_idx
        self.last_avail = last_avail
        super().__init__(
            queue,
            f"avail.idx {avail_idx} is {(avail_idx - last_avail) & 0xFFFF} entries past the last"
            f" seen index {last_avail}, more than the queue size {size}",
        )


class HeadOutOfRange(RingError):
    """An available ring entry names a head index >= queue size."""

    def __init__(self, queue: int, slot: int, head: int, size: int) -> None:
        self.slot = slot
        self.index = head
        super().__init__(queue, f"avail.ring[{slot}] = {head} is not below the queue size {size}")


class ChainNeverEnds(RingError):
    """Packed ring: ``NEXT`` on ``size`` consecutive slots, so the chain's end (and its buffer id)
    cannot be found; the chain cannot be returned."""

    def __init__(self, queue: int, head: int, size: int) -> None:
        self.head = head
        super().__init__(queue, f"the chain at slot {head} has NEXT on all {size} slots")


class BufferIdOutOfRange(RingError):
    """Packed ring: a chain's buffer id (in its last descriptor) is not below the queue size."""

    def __init__(self, queue: int, head: int, buffer_id: int, size: int) -> None:
        self.head = head
        self.buffer_id = buffer_id
        super().__init__(
            queue, f"the chain at slot {head} has buffer id {buffer_id}, not below {size}"
        )


# --- chain-level: return the chain with length 0 -------------------------------------------------


class DescIndexOutOfRange(ChainError):
    """A ``next`` field >= the queue size (or >= the entries of an indirect table)."""

    def __init__(self, queue: int, head: int, at: int, next_index: int, limit: int) -> None:
        self.index = at
        self.next = next_index
        super().__init__(queue, head, f"descriptor {at} has next = {next_index}, not below {limit}")


class ChainTooLong(ChainError):
    """A chain of more descriptors than the queue size: a ``next`` loop or an oversized chain
    (virtio 1.2, 2.7.5.3.1). Exactly queue-size descriptors is legal."""

    def __init__(self, queue: int, head: int, limit: int) -> None:
        self.limit = limit
        super().__init__(
            queue, head, f"chain longer than {limit} descriptors (a next loop, or too long)"
        )


class ReadableAfterWritable(ChainError):
    """A device-readable descriptor after a device-writable one (virtio 1.2, 2.7.4.2)."""

    def __init__(self, queue: int, head: int, at: int) -> None:
        self.index = at
        super().__init__(queue, head, f"readable descriptor {at} follows a writable one")


class ChainLengthOverflow(ChainError):
    """The chain's buffers add up to more than 2**32 - 1 bytes (the used length is a u32)."""

    def __init__(self, queue: int, head: int, total: int) -> None:
        self.total = total
        super().__init__(queue, head, f"buffers total {total} bytes, more than 2**32 - 1")


class BufferAddressOverflow(ChainError):
    """A descriptor's ``addr + len`` passes the end of the 64-bit address space."""

    def __init__(self, queue: int, head: int, at: int, addr: int, length: int) -> None:
        self.index = at
        self.addr = addr
        self.length = length
        super().__init__(
            queue, head, f"descriptor {at}: addr {addr:#x} + len {length:#x} wraps past 2**64"
        )


class UnmappedBuffer(ChainError):
    """A descriptor's buffer is not (wholly) in device-accessible memory."""

    def __init__(self, queue: int, head: int, addr: int, length: int) -> None:
        self.addr = addr
        self.length = length
        super().__init__(
            queue, head, f"buffer {addr:#x}+{length:#x} is not in device-accessible memory"
        )


class IndirectNotNegotiated(ChainError):
    """An INDIRECT descriptor without the INDIRECT_DESC feature."""

    def __init__(self, queue: int, head: int, at: int) -> None:
        self.index = at
        super().__init__(queue, head, f"descriptor {at} is INDIRECT but INDIRECT_DESC is off")


class NestedIndirect(ChainError):
    """An INDIRECT descriptor inside an indirect table (virtio 1.2, 2.7.5.3.1)."""

    def __init__(self, queue: int, head: int, at: int) -> None:
        self.index = at
        super().__init__(queue, head, f"indirect table entry {at} is INDIRECT again")


class IndirectWithNext(ChainError):
    """A descriptor with both INDIRECT and NEXT (virtio 1.2, 2.7.5.3.1); in a packed ring also an
    indirect descriptor that is not alone in its chain (2.8.19)."""

    def __init__(
        self, queue: int, head: int, at: int, what: str = "has both INDIRECT and NEXT"
    ) -> None:
        self.index = at
        super().__init__(queue, head, f"descriptor {at} {what}")


class InvalidIndirectLength(ChainError):
    """An indirect table whose length is 0 or not a multiple of 16."""

    def __init__(self, queue: int, head: int, at: int, length: int) -> None:
        self.index = at
        self.length = length
        super().__init__(
            queue, head, f"indirect descriptor {at} has len {length}, not a non-zero multiple of 16"
        )


class IndirectTableTooLarge(ChainError):
    """An indirect table of more than 65535 entries."""

    def __init__(self, queue: int, head: int, at: int, length: int) -> None:
        self.index = at
        self.length = length
        super().__init__(
            queue, head, f"indirect descriptor {at}: {length // 16} entries, more than 65535"
        )


class UnmappedIndirectTable(ChainError):
    """An indirect table outside device-accessible memory (or wrapping past 2**64)."""

    def __init__(self, queue: int, head: int, at: int, addr: int, length: int) -> None:
        self.index = at
        self.addr = addr
        self.length = length
        super().__init__(
            queue,
            head,
            f"indirect table {addr:#x}+{length:#x} (descriptor {at}) is not in device memory",
        )


# --- device misuse --------------------------------------------------------------------------------


class ChainAlreadyReturned(DeviceUsageError):
    """A chain returned (or read) after it was already returned to the driver."""

    def __init__(self, queue: int, head: int) -> None:
        self.queue = queue
        self.head = head
        super().__init__(f"queue {queue}: chain at head {head} was already returned")


class InvalidQueueState(DeviceUsageError):
    """A :class:`QueueState` that does not fit the queue (e.g. a packed position >= size)."""


class OutOfOrderReturn(DeviceUsageError):
    """Under IN_ORDER, a chain returned before an older one still held (virtio 1.2, 2.7.10.1 /
    2.8.20: the device uses buffers in the order they were made available)."""

    def __init__(self, queue: int, head: int, expected: int) -> None:
        self.queue = queue
        self.head = head
        self.expected = expected
        super().__init__(
            f"queue {queue}: IN_ORDER was negotiated, but chain {head} was returned before chain"
            f" {expected}, which was taken earlier and is still held"
        )


class WrittenTooMuch(DeviceUsageError):
    """A used length larger than the chain's writable space."""

    def __init__(self, queue: int, head: int, written: int, writable: int) -> None:
        self.queue = queue
        self.head = head
        self.written = written
        self.writable = writable
        super().__init__(
            f"queue {queue}: chain at head {head} has {writable} writable bytes,"
            f" {written} claimed written"
        )
