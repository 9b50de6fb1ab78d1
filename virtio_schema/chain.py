"""Walk a descriptor chain as bytes: ``ReadableChain`` and ``WritableChain``.

Theory of operation. A :class:`~virtio_schema.queue.DescChain` holds validated buffer descriptors
(driver addresses and lengths). A ``ReadableChain`` walks its device-readable buffers, a
``WritableChain`` its device-writable ones, translating each buffer through the chain's
:class:`~virtio_schema.mem.DriverMem` only when it is reached. A buffer that crosses two regions of
guest memory comes out as two device ranges. Both classes speak the standard binary I/O protocol
(``read``/``readinto``/``readall``, ``write``), so ``shutil.copyfileobj`` works in both directions,
and both move schema-typed records (:meth:`ReadableChain.read_record`,
:meth:`WritableChain.write_record`) across buffer boundaries.

Rules of this module:

1. Lengths come from the chain (validated once); guest memory is touched only to move data, so
   :meth:`remaining` never reads it.
2. No copy the caller did not ask for: ``next()`` hands out views of guest memory and ``readinto``
   copies straight from guest memory into the caller's buffer.
3. A writable chain never writes outside the buffers the driver offered, and reports exactly the
   bytes written (``write`` and ``write_record`` count themselves; writes through ranges from
   ``next()`` are counted with :meth:`WritableChain.add_written`).

Imports: :mod:`virtio_schema.queue`, :mod:`virtio_schema.mem`, :mod:`virtio_schema.layout`.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Self, TypeVar

from virtio_schema.errors import DeviceUsageError, DriverError
from virtio_schema.layout import Layout
from virtio_schema.mem import DeviceRange, DriverMem, DriverRange
from virtio_schema.queue import ChainDescriptor, DescChain, UnmappedBuffer

if TYPE_CHECKING:
    from virtio_schema._buffers import ReadBuffer, WriteBuffer

__all__ = [
    "DataRemaining",
    "InsufficientData",
    "InsufficientSpace",
    "ReadableChain",
    "Remaining",
    "WritableChain",
]

R = TypeVar("R", bound=tuple[Any, ...])


class Remaining(NamedTuple):
    """What is left of a chain's readable or writable part."""

    bytes: int
    """Bytes not yet read / written."""
    descriptors: int
    """Buffers with bytes left (a partly consumed buffer counts)."""


class DataRemaining(DriverError):
    """The chain still had readable bytes where the device expected the end of them."""

    def __init__(self, queue: int, head: int, remaining: int) -> None:
        self.remaining = remaining
        super().__init__(f"queue {queue}, chain at head {head}: {remaining} readable bytes unread")


class InsufficientData(DriverError):
    """The readable part of a chain is shorter than a record the device must read."""

    def __init__(self, queue: int, head: int, need: int, have: int) -> None:
        self.need = need
        self.have = have
        super().__init__(
            f"queue {queue}, chain at head {head}: need {need} readable bytes, {have} left"
        )


class InsufficientSpace(DriverError):
    """The writable part of a chain is too small for what the device must write."""

    def __init__(self, queue: int, head: int, need: int, have: int) -> None:
        self.need = need
        self.have = have
        super().__init__(
            f"queue {queue}, chain at head {head}: need {need} writable bytes, {have} left"
        )


def _translate_prefix(mem: DriverMem, chain: DescChain, addr: int, length: int) -> DeviceRange:
    """The longest prefix of ``[addr, addr+length)`` that one translation covers (a buffer that
    crosses memory regions is walked region by region). ``length`` > 0."""
    whole = mem.translate(DriverRange(addr, addr + length))
    if whole is not None:
        return whole
    first = mem.translate(DriverRange(addr, addr + 1))
    if first is None:
        raise UnmappedBuffer(chain.queue_index, chain.head, addr, length)
    lo, hi = 1, length  # translate(addr, lo) works, translate(addr, hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mem.translate(DriverRange(addr, addr + mid)) is not None:
            lo = mid
        else:
            hi = mid
    best = mem.translate(DriverRange(addr, addr + lo))
    assert best is not None
    return best


class _Walker:
    """Position in a list of buffers; the common half of both chain walkers."""

    __slots__ = ("_cur", "_cur_addr", "_cur_dr", "_descs", "_i", "_left", "_mem", "_pos", "chain")

    def __init__(self, chain: DescChain, descs: tuple[ChainDescriptor, ...]) -> None:
        self.chain = chain
        self._mem = chain.driver_mem
        self._descs = descs
        self._i = 0  # index of the current buffer
        self._pos = 0  # bytes consumed of the current buffer
        self._cur: memoryview | None = None  # translated piece of the current buffer
        self._cur_dr: DeviceRange | None = None  # the range _cur is the view of
        self._cur_addr = 0  # driver address of _cur[0]
        self._left = sum(d.len for d in descs)

    def remaining(self) -> Remaining:
        """Bytes and buffers left, from the validated lengths (no guest-memory access)."""
        descs = self._descs
        n = 0
        for k in range(self._i, len(descs)):
            if descs[k].len > (self._pos if k == self._i else 0):
                n += 1
        return Remaining(self._left, n)

    def _piece(self, limit: int) -> memoryview | None:
        """A view of up to ``limit`` (> 0) bytes at the current position, advancing past it."""
        descs = self._descs
        while self._i < len(descs):
            d = descs[self._i]
            if self._pos >= d.len:
                self._i += 1
                self._pos = 0
                self._cur = self._cur_dr = None
                continue
            addr = d.addr + self._pos
            cur = self._cur
            if cur is None or not self._cur_addr <= addr < self._cur_addr + len(cur):
                dr = _translate_prefix(self._mem, self.chain, addr, d.len - self._pos)
                self._cur_dr = dr
                cur = self._cur = dr.view
                self._cur_addr = addr
            off = addr - self._cur_addr
            n = min(limit, len(cur) - off)
            self._pos += n
            self._left -= n
            return cur[off : off + n]
        return None

    def next(self, limit: int | None = None) -> DeviceRange | None:
        """The next device range: the rest of the current buffer (or of the part of it in one
        memory region), cut to ``limit`` bytes if given; ``None`` at the end. Zero-length buffers
        are skipped. Ranges from a writable chain count as written only via ``add_written``."""
        if not self.chain.usable:
            self.chain.check_usable()
        if limit is not None and limit <= 0:
            raise DeviceUsageError(f"next(limit={limit}): the limit must be positive")
        if not self._left:
            return None
        view = self._piece(self._left if limit is None else limit)
        if view is None:  # pragma: no cover - _left > 0 means a piece exists
            return None
        n = len(view)
        addr = self._descs[self._i].addr + self._pos - n
        view.release()
        cur_dr = self._cur_dr
        assert cur_dr is not None
        return cur_dr.sub(addr - self._cur_addr, n)


class ReadableChain(_Walker):
    """The device-readable part of a chain, as a binary stream.

    Raises the chain's :attr:`~virtio_schema.queue.DescChain.error` at construction if it is
    malformed. ``with ReadableChain(chain) as r:`` returns the chain on exit if it was not converted
    to a :class:`WritableChain` or returned.
    """

    __slots__ = ()

    def __init__(self, chain: DescChain) -> None:
        super().__init__(chain, chain.readable())

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteBuffer) -> int:
        """Copy up to ``len(buffer)`` bytes straight from guest memory into ``buffer``; returns
        the count (0 at the end)."""
        if not self.chain.usable:
            self.chain.check_usable()
        out = memoryview(buffer).cast("B")
        total = 0
        want = len(out)
        while total < want:
            view = self._piece(want - total)
            if view is None:
                break
            n = len(view)
            out[total : total + n] = view
            total += n
        return total

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all remaining if negative); ``b""`` at the end."""
        if size is None or size < 0:
            size = self._left
        buf = bytearray(min(size, self._left))
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    def readall(self) -> bytes:
        """Every remaining readable byte."""
        return self.read(-1)

    def read_record(self, layout: Layout[R]) -> R:
        """Read one record of ``layout`` (e.g. a virtio-blk request header), across buffer
        boundaries. Raises :class:`InsufficientData` if the chain has fewer bytes left."""
        if not self.chain.usable:
            self.chain.check_usable()
        if self._left < layout.size:
            raise InsufficientData(self.chain.queue_index, self.chain.head, layout.size, self._left)
        buf = bytearray(layout.size)
        self.readinto(buf)
        return layout.unpack_from(buf)

    def return_complete(self) -> None:
        """Return the chain (0 bytes written). Raises :class:`DataRemaining` afterwards if
        readable bytes were left unread (the chain is returned either way)."""
        left = self._left
        self.chain.return_written(0)
        if left:
            raise DataRemaining(self.chain.queue_index, self.chain.head, left)

    def into_writable(self, *, ignore_remaining: bool = False) -> WritableChain:
        """The writable part of the same chain. Strict by default: raises
        :class:`DataRemaining` if readable bytes are left (the chain is not returned then)."""
        if self._left and not ignore_remaining:
            raise DataRemaining(self.chain.queue_index, self.chain.head, self._left)
        return WritableChain(self.chain)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.chain.returned:
            self.chain.return_written(0)


class WritableChain(_Walker):
    """The device-writable part of a chain, as a binary stream; counts the bytes written.

    Raises the chain's error at construction if it is malformed. Leaving a ``with`` block returns
    the chain with the bytes written so far.
    """

    __slots__ = ()

    def __init__(self, chain: DescChain) -> None:
        super().__init__(chain, chain.writable())

    def writable(self) -> bool:
        return True

    @property
    def written(self) -> int:
        """Bytes written so far (reported to the driver on return)."""
        return self.chain.written

    def add_written(self, n: int) -> None:
        """Count ``n`` bytes written through ranges from :meth:`next`."""
        self.chain.written = self.chain.written + n

    def write(self, data: ReadBuffer) -> int:
        """Write as much of ``data`` as fits; returns the count (0 when the chain is full)."""
        chain = self.chain
        if not chain.usable:
            chain.check_usable()
        src = memoryview(data).cast("B")
        total = 0
        want = len(src)
        try:
            while total < want:
                view = self._piece(want - total)
                if view is None:
                    break
                n = len(view)
                view[:] = src[total : total + n]
                total += n
        finally:  # bytes that landed count, even if a later buffer turned out unmapped
            if total:
                chain.written = chain.written + total
        return total

    def write_all(self, data: ReadBuffer) -> None:
        """Write all of ``data`` or raise :class:`InsufficientSpace` (writing nothing)."""
        n = len(memoryview(data).cast("B"))
        if n > self._left:
            raise InsufficientSpace(self.chain.queue_index, self.chain.head, n, self._left)
        self.write(data)

    def write_record(self, layout: Layout[R], record: R) -> None:
        """Write one record of ``layout`` across buffer boundaries (all or nothing)."""
        self.write_all(layout.pack(record))

    def return_written(self) -> None:
        """Return the chain with the bytes written so far."""
        self.chain.return_written()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.chain.returned:
            self.chain.return_written()
