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

import os
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Self, TypeVar, cast

from virtio_schema.errors import DeviceUsageError, DriverError
from virtio_schema.layout import Layout
from virtio_schema.mem import DeviceRange, DriverMem, DriverRange
from virtio_schema.queue import ChainAlreadyReturned, DescChain, UnmappedBuffer

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

_READ_CHUNK = 1 << 18  # read() allocates at most this much ahead of the bytes that arrive
# A slice assignment INTO a bytearray from another buffer first copies the source into a temporary
# bytearray (CPython's bytearray_setslice); through a memoryview of the target it is one memcpy.
# The view costs about as much as the extra copy of 1 KiB, so small reads keep the bytearray.
_VIEW_COPY_MIN = 1024
# Most buffers one preadv/pwritev is given (Linux's UIO_MAXIOV); longer chains go in batches.
_IOV_MAX = 1024
_OFF_MAX = (1 << 63) - 1  # the largest file offset (off_t)


class Remaining(NamedTuple):
    """What is left of a chain's readable or writable part."""

    bytes: int
    """Bytes not yet read / written."""
    descriptors: int
    """Buffers with bytes left (a partly consumed buffer counts)."""


_new_remaining = tuple.__new__  # Remaining without its Python-level __new__ (remaining() is hot)


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
    """Position in a chain's list of buffers; the common half of both chain walkers.

    Copies (``readinto``, ``write``) take the fast path when the memory offers one
    (:data:`~virtio_schema.mem.Locate`): one region lookup and one slice copy per buffer, no
    object created. ``next()`` hands out tracked :class:`~virtio_schema.mem.DeviceRange` objects.
    """

    __slots__ = (
        "_addrs",
        "_cur",
        "_cur_addr",
        "_cur_dr",
        "_end",
        "_i",
        "_left",
        "_lens",
        "_locate",
        "_mem",
        "_moved",
        "_pos",
        "chain",
    )

    def __init__(self, chain: DescChain, start: int, end: int, total: int) -> None:
        queue = chain._queue
        self.chain = chain
        self._mem = queue.driver_mem
        self._locate = queue._locate
        self._addrs = chain._addrs  # the buffers' driver addresses and lengths, validated
        self._lens = chain._lens
        self._i = start  # index of the current buffer
        self._end = end
        self._pos = 0  # bytes consumed of the current buffer
        self._left = total
        self._moved = 0
        # slow path only: the translated piece of the current buffer, its range and address
        # (_cur_dr and _cur_addr are read only while _cur is set)
        self._cur: memoryview | None = None

    def remaining(self) -> Remaining:
        """Bytes and buffers left, from the validated lengths (no guest-memory access)."""
        n = 0
        pos = self._pos  # consumed of the current buffer; nothing of the later ones
        for length in self._lens[self._i : self._end]:
            if length > pos:
                n += 1
            pos = 0
        return _new_remaining(Remaining, (self._left, n))

    def _piece(self, limit: int) -> memoryview | None:
        """A view of up to ``limit`` (> 0) bytes at the current position, advancing past it
        (the general path: translate, split across regions)."""
        lens = self._lens
        while self._i < self._end:
            length = lens[self._i]
            if self._pos >= length:
                self._i += 1
                self._pos = 0
                self._cur = None
                continue
            addr = self._addrs[self._i] + self._pos
            cur = self._cur
            if cur is None or not self._cur_addr <= addr < self._cur_addr + len(cur):
                dr = _translate_prefix(self._mem, self.chain, addr, length - self._pos)
                self._cur_dr: DeviceRange = dr
                cur = self._cur = dr.view
                self._cur_addr: int = addr
            off = addr - self._cur_addr
            n = min(limit, len(cur) - off)
            self._pos += n
            self._left -= n
            return cur[off : off + n]
        return None

    def _span(self, want: int, to_end: bool) -> tuple[memoryview, int, int] | None:
        """The fast path of the copies: ``(region view, offset, n)`` for the next ``n`` bytes when
        they lie in the current buffer and one memory region, advancing past them; ``n`` is
        ``want``, or with ``to_end`` the rest of the current buffer if it is the last one.
        ``None`` (nothing consumed) otherwise: the caller takes the general path."""
        locate = self._locate
        i = self._i
        if locate is None or want <= 0 or i >= self._end:
            return None
        length = self._lens[i]
        pos = self._pos
        n = length - pos
        if n >= want:
            n = want
        elif not (to_end and n > 0 and i + 1 == self._end):
            return None
        loc = locate(self._addrs[i] + pos, n)
        if loc is None:
            return None
        if pos + n == length:  # step past a finished buffer now: the next copy starts clean
            self._i = i + 1
            self._pos = 0
        else:
            self._pos = pos + n
        self._left -= n
        return loc[0], loc[1], n

    def _copy(self, buf: bytes | bytearray | memoryview, into_guest: bool) -> int:
        """Copy between ``buf`` and the buffers from the current position, as far as both go.
        ``self._moved`` holds the count even if a buffer turns out unmapped midway; into guest
        memory, the bytes that landed count as written (on the chain) then too.

        ``buf`` is worked through one memoryview: its slices are views (slicing ``bytes`` would
        copy each piece) and copying into one is a single memcpy (see ``_VIEW_COPY_MIN``). A
        region found by ``locate`` is remembered (its view covers the whole region, see
        :data:`~virtio_schema.mem.Locate`), so the next buffers in it cost no lookup.

        The outer loop takes one piece at a time: the first (it may start inside a buffer), a
        last one that ``buf`` ends inside, and any that needs a lookup. Between them, the inner
        loop takes the whole buffers that lie in the known region and fit in ``buf``, one turn
        each: it is the cost of every multi-buffer copy (a blk request's data), so it does
        nothing else."""
        addrs, lens = self._addrs, self._lens
        locate = self._locate
        end = self._end
        mine = type(buf) is not memoryview
        whole = memoryview(buf) if mine else cast(memoryview, buf)
        stop = len(whole)  # the bytes of buf; those not yet moved are stop - total
        total = slow = 0  # bytes moved; of them, bytes moved by _piece (it counts _left itself)
        i, pos = self._i, self._pos
        self._moved = 0
        # the region the last lookup found, driver addresses [lo, lo + span): the buffers of a
        # chain mostly lie in one region, so the next ones are checked against it without a call.
        # Until the first lookup no range fits (span -1), not even an empty one at address 0
        region = whole
        lo = 0
        span = -1
        try:
            while total < stop and i < end:
                length = lens[i]
                n = length - pos
                if n > 0:
                    if n > stop - total:
                        n = stop - total
                    addr = addrs[i] + pos
                    off = addr - lo
                    if off < 0 or off + n > span:
                        loc = locate(addr, n) if locate is not None else None
                        if loc is None:  # the general path for this piece (it crosses a region)
                            self._i, self._pos = i, pos
                            view = self._piece(n)
                            assert view is not None
                            k = len(view)
                            if into_guest:
                                view[:] = whole[total : total + k]
                            else:
                                whole[total : total + k] = view
                            total += k
                            slow += k
                            i, pos = self._i, self._pos
                            continue
                        region, off = loc
                        lo = addr - off
                        span = len(region)
                    if into_guest:
                        region[off : off + n] = whole[total : total + n]
                    else:
                        whole[total : total + n] = region[off : off + n]
                    total += n
                    pos += n
                    if pos < length:  # buf is full: the position stays in this buffer
                        break
                i += 1  # the buffer is finished (or empty): step past it now
                pos = 0
                if total == stop:
                    break
                # the whole buffers in the known region that buf has room for: nothing else per
                # turn (the outer loop takes a last, partial piece, and any buffer outside)
                for i in range(i, end):  # noqa: B020 - i is the position, kept after the loop
                    n = lens[i]
                    off = addrs[i] - lo
                    t = total + n
                    if t > stop or off < 0 or off + n > span:
                        break
                    if into_guest:
                        region[off : off + n] = whole[total:t]
                    else:
                        whole[total:t] = region[off : off + n]
                    total = t
                else:
                    i = end
        finally:
            self._i, self._pos = i, pos
            self._left -= total - slow
            self._moved = total
            if into_guest and total:  # bytes that landed count, even if a later buffer failed
                self.chain._written += total
            if mine:
                whole.release()  # the caller's bytearray can be resized again at once
        return total

    def _transfer(self, n: int, op: Callable[[memoryview], int | None]) -> int:
        """Hand the next ``n`` bytes (or fewer, at the end), piece by piece, to ``op`` (a file's
        ``readinto`` or ``write``), each piece a view of guest memory dropped right after the
        call. Stops at the first short transfer; returns the bytes ``op`` reported."""
        chain = self.chain
        if chain._returned or chain._queue._broken is not None:
            chain.check_usable()
        addrs, lens = self._addrs, self._lens
        locate = self._locate
        done = 0
        while done < n and self._i < self._end:
            length = lens[self._i]
            pos = self._pos
            if pos >= length:
                self._i += 1
                self._pos = 0
                self._cur = None
                continue
            k = min(length - pos, n - done)
            loc = locate(addrs[self._i] + pos, k) if locate is not None else None
            if loc is not None:
                base, off = loc
                got = op(base[off : off + k]) or 0
                if pos + got == length:  # step past a finished buffer (see _span)
                    self._i += 1
                    self._pos = 0
                else:
                    self._pos = pos + got
                self._left -= got
            else:  # the general path: translate (and split where a region ends)
                view = self._piece(k)
                assert view is not None
                k = len(view)
                got = op(view) or 0
                self._pos -= k - got  # give back what op did not take
                self._left += k - got
            done += got
            if got < k:
                break
        return done

    def _vectored(self, fd: int, offset: int, n: int, into_guest: bool) -> int:
        """Move up to ``n`` bytes between the buffers and the file ``fd`` at ``offset`` with one
        ``os.preadv`` (into guest memory) or ``os.pwritev`` per ``_IOV_MAX`` buffers; the
        position moves by what the kernel reports. Stops at a short transfer."""
        self._moved = 0
        chain = self.chain
        if chain._returned or chain._queue._broken is not None:
            chain.check_usable()
        if not 0 <= offset <= _OFF_MAX - n:  # (Linux reads offset -1 as "the file position")
            raise DeviceUsageError(f"file offset {offset} (+{n} bytes) outside 0..2**63-1")
        io = os.preadv if into_guest else os.pwritev
        i = self._i
        locate = self._locate
        if locate is not None and i < self._end:  # the common case: all n in the next buffer
            length = self._lens[i]
            pos = self._pos
            if 0 < n <= length - pos:
                loc = locate(self._addrs[i] + pos, n)
                if loc is not None:
                    base, off = loc
                    with base[off : off + n] as view:
                        got = io(fd, [view], offset)
                    if pos + got == length:  # step past a finished buffer (see _span)
                        self._i = i + 1
                        self._pos = 0
                    else:
                        self._pos = pos + got
                    self._left -= got
                    self._moved = got
                    return got
        done = 0
        while done < n:
            views, ranges, want = self._gather(n - done)
            if not want:
                break
            try:
                got = io(fd, views, offset + done)
            finally:  # the views die here: nothing keeps guest memory exported
                for v in views:
                    v.release()
                if ranges:
                    for dr in ranges:
                        dr.release()
            self._skip(got)
            done += got
            self._moved = done  # (counted if a later batch fails)
            if got < want:
                break
        return done

    def _gather(self, n: int) -> tuple[list[memoryview], list[DeviceRange], int]:
        """Views of the next ``n`` bytes (fewer at the end): one per buffer, or per region of a
        buffer that crosses memory regions; at most ``_IOV_MAX``. Also the tracked ranges the
        general path translated, to release with the views, and the bytes the views hold. The
        position does not move."""
        views: list[memoryview] = []
        ranges: list[DeviceRange] = []
        addrs, lens = self._addrs, self._lens
        locate = self._locate
        i, pos = self._i, self._pos
        total = 0
        try:
            while n > 0 and i < self._end and len(views) < _IOV_MAX:
                length = lens[i]
                k = min(length - pos, n)
                if k > 0:
                    addr = addrs[i] + pos
                    loc = locate(addr, k) if locate is not None else None
                    if loc is not None:
                        base, off = loc
                        views.append(base[off : off + k])
                    else:  # the general path: the part of it in one region
                        dr = _translate_prefix(self._mem, self.chain, addr, k)
                        ranges.append(dr)
                        k = len(dr.view)
                        views.append(dr.view[:])
                    n -= k
                    pos += k
                    total += k
                if pos >= length:
                    i += 1
                    pos = 0
        except BaseException:  # an unmapped buffer: release what was gathered, then raise
            for v in views:
                v.release()
            for dr in ranges:
                dr.release()
            raise
        return views, ranges, total

    def _skip(self, n: int) -> None:
        """Move the position on by ``n`` bytes (what a vectored call moved), stepping past a
        buffer it finished, as every copy does."""
        lens = self._lens
        i, pos = self._i, self._pos
        self._left -= n
        while n > 0:
            k = lens[i] - pos
            if n < k:
                pos += n
                break
            n -= k
            i += 1
            pos = 0
        self._i, self._pos = i, pos
        self._cur = None

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
        addr = self._addrs[self._i] + self._pos - n
        view.release()
        return self._cur_dr.sub(addr - self._cur_addr, n)


class ReadableChain(_Walker):
    """The device-readable part of a chain, as a binary stream.

    Raises the chain's :attr:`~virtio_schema.queue.DescChain.error` at construction if it is
    malformed. ``with ReadableChain(chain) as r:`` returns the chain on exit if it was not converted
    to a :class:`WritableChain` or returned.
    """

    __slots__ = ()

    def __init__(self, chain: DescChain) -> None:
        if chain.error is not None:
            raise chain.error
        if chain._returned:
            raise ChainAlreadyReturned(chain.queue_index, chain.head)
        queue = chain._queue
        self.chain = chain
        self._mem = queue.driver_mem
        self._locate = queue._locate
        self._addrs = chain._addrs
        self._lens = chain._lens
        self._i = 0
        self._end = chain._n_readable
        self._pos = 0
        self._left = chain.readable_len
        self._moved = 0
        self._cur = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteBuffer) -> int:
        """Copy up to ``len(buffer)`` bytes straight from guest memory into ``buffer``; returns
        the count (0 at the end).

        Any writable buffer works. A ``bytearray`` or a one-dimensional byte ``memoryview`` is
        filled directly; other buffers are first viewed as bytes. (Copies into a ``bytearray``
        of 1 KiB and more go through a view of it: CPython's slice assignment into a
        ``bytearray`` would first copy the source into a temporary.)"""
        chain = self.chain
        if chain._returned or chain._queue._broken is not None:
            chain.check_usable()
        out: bytearray | memoryview | None = None
        if type(buffer) is bytearray or (
            type(buffer) is memoryview and buffer.ndim == 1 and buffer.format == "B"
        ):
            out = buffer
        if out is not None:
            # the hot path: _span's common case inlined (the call would cost as much as its
            # checks): all of ``out`` from the current buffer, or the rest of the last one
            want = len(out)
            i = self._i
            locate = self._locate
            if locate is not None and i < self._end:
                length = self._lens[i]
                pos = self._pos
                n = length - pos
                if 0 < want <= n or (0 < n < want and i + 1 == self._end):
                    if n > want:
                        n = want
                    loc = locate(self._addrs[i] + pos, n)
                    if loc is not None:
                        base, off = loc
                        if n < _VIEW_COPY_MIN or type(out) is memoryview:
                            out[:n] = base[off : off + n]
                        else:  # through a view that dies with the statement (_VIEW_COPY_MIN)
                            memoryview(out)[:n] = base[off : off + n]
                        if pos + n == length:  # step past a finished buffer (see _span)
                            self._i = i + 1
                            self._pos = 0
                        else:
                            self._pos = pos + n
                        self._left -= n
                        return n
            return self._copy(out, False)
        # any other writable buffer: one byte view of it, released before returning (an
        # exception's traceback must not keep the caller's object exported)
        with memoryview(buffer) as view, view.cast("B") as flat:
            return self._copy(flat, False)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all remaining if negative); ``b""`` at the end."""
        if size is None or size < 0:
            size = self._left
        size = min(size, self._left)
        chain = self.chain
        if chain._returned or chain._queue._broken is not None:
            chain.check_usable()
        span = self._span(size, False)
        if span is not None:  # the bytes sit in one buffer: one copy, straight out
            base, off, _ = span
            return bytes(base[off : off + size])
        if size <= _READ_CHUNK:
            buf = bytearray(size)
            n = self.readinto(buf)
            del buf[n:]
            return bytes(buf)
        # a length claimed by the driver is not allocated up front: the buffer grows only by
        # what really arrives (an unmapped buffer ends the read before a huge allocation)
        out = bytearray()
        chunk = bytearray(_READ_CHUNK)
        while len(out) < size:
            n = self.readinto(memoryview(chunk)[: min(_READ_CHUNK, size - len(out))])
            if not n:
                break
            out += chunk[:n]
        return bytes(out)

    def readall(self) -> bytes:
        """Every remaining readable byte."""
        return self.read(-1)

    def read_record(self, layout: Layout[R]) -> R:
        """Read one record of ``layout`` (e.g. a virtio-blk request header), across buffer
        boundaries. Raises :class:`InsufficientData` if the chain has fewer bytes left."""
        chain = self.chain
        if chain._returned or chain._queue._broken is not None:
            chain.check_usable()
        size = layout.size
        if self._left < size:
            raise InsufficientData(self.chain.queue_index, self.chain.head, size, self._left)
        span = self._span(size, False)
        if span is not None:  # the record sits in one buffer: unpack it where it is (the span
            # lies inside the region's view, so the struct call cannot fail: unpack_from's checks
            # and the call around them are skipped)
            return layout._new(layout.record, layout._unpack_from(span[0], span[1]))
        buf = bytearray(size)
        self.readinto(buf)
        return layout.unpack_from(buf)

    def read_to(self, write: Callable[[memoryview], int | None], n: int | None = None) -> int:
        """Zero-copy out: pass up to ``n`` readable bytes (default: all) to ``write`` (e.g. a
        file's ``write``), buffer by buffer, straight from guest memory. Returns the bytes
        written; stops early if ``write`` takes fewer than offered."""
        return self._transfer(self._left if n is None else min(n, self._left), write)

    def read_to_fd(self, fd: int, offset: int, n: int | None = None) -> int:
        """Zero-copy out, vectored: write up to ``n`` readable bytes (default: all) into the file
        ``fd`` at ``offset`` (a disk image), straight from guest memory: one ``os.pwritev`` for up
        to 1024 buffers. The file position is neither used nor moved, so queues served by
        different threads can share the file. Returns the bytes written, stopping at a short
        write; an ``OSError`` propagates (the bytes of earlier batches stay consumed)."""
        return self._vectored(fd, offset, self._left if n is None else min(n, self._left), False)

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
        chain = self.chain
        if chain._returned:
            raise ChainAlreadyReturned(chain.queue_index, chain.head)
        w = WritableChain.__new__(WritableChain)  # the chain is known good: no re-checks
        w.chain = chain
        w._mem = self._mem
        w._locate = self._locate
        w._addrs = addrs = self._addrs
        w._lens = self._lens
        w._i = chain._n_readable
        w._end = len(addrs)
        w._pos = 0
        w._left = chain.writable_len
        w._moved = 0
        w._cur = None
        return w

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
        if chain.error is not None:
            raise chain.error
        if chain._returned:
            raise ChainAlreadyReturned(chain.queue_index, chain.head)
        super().__init__(chain, chain._n_readable, len(chain._addrs), chain.writable_len)

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
        if chain._returned or chain._queue._broken is not None:
            chain.check_usable()
        src: bytes | bytearray | memoryview | None = None
        if (
            type(data) is bytes
            or type(data) is bytearray
            or (type(data) is memoryview and data.ndim == 1 and data.format == "B")
        ):
            src = data
        if src is not None:
            # the hot path: _span's common case inlined, as in ReadableChain.readinto
            want = len(src)
            i = self._i
            locate = self._locate
            if locate is not None and i < self._end:
                length = self._lens[i]
                pos = self._pos
                n = length - pos
                if 0 < want <= n or (0 < n < want and i + 1 == self._end):
                    if n > want:
                        n = want
                    loc = locate(self._addrs[i] + pos, n)
                    if loc is not None:
                        base, off = loc
                        base[off : off + n] = src if n == want else src[:n]
                        if pos + n == length:  # step past a finished buffer (see _span)
                            self._i = i + 1
                            self._pos = 0
                        else:
                            self._pos = pos + n
                        self._left -= n
                        chain._written += n
                        return n
            return self._copy(src, True)
        # any other buffer: one byte view of it, released before returning (an exception's
        # traceback must not keep the caller's object exported)
        with memoryview(data) as view, view.cast("B") as flat:
            return self._copy(flat, True)

    def write_from(self, readinto: Callable[[memoryview], int | None], n: int | None = None) -> int:
        """Zero-copy in: let ``readinto`` (e.g. a file's) fill up to ``n`` writable bytes
        (default: all) straight in guest memory, buffer by buffer. The bytes it reports count as
        written; stops early at a short read (end of file)."""
        got = self._transfer(self._left if n is None else min(n, self._left), readinto)
        self.chain._written += got
        return got

    def write_from_fd(self, fd: int, offset: int, n: int | None = None) -> int:
        """Zero-copy in, vectored: read up to ``n`` bytes (default: all the writable space) from
        the file ``fd`` at ``offset`` (a disk image) straight into guest memory: one
        ``os.preadv`` for up to 1024 buffers. The file position is neither used nor moved. The
        bytes read count as written; stops early at a short read (end of file). An ``OSError``
        propagates (the bytes of earlier batches stay written and counted)."""
        try:
            self._vectored(fd, offset, self._left if n is None else min(n, self._left), True)
        finally:
            got = self._moved
            self.chain._written += got
        return got

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
