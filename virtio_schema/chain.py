"""Walk a descriptor chain as bytes: ``ReadableChain`` and ``WritableChain``.

Theory of operation. A :class:`~virtio_schema.queue.DescChain` holds validated buffer descriptors
(driver addresses and lengths, :class:`~virtio_schema.queue.walk.ChainBuffers`). A
``ReadableChain`` walks its device-readable buffers, a ``WritableChain`` its device-writable ones,
each with a cursor (:class:`_Cursor`: the current buffer, the bytes consumed of it, the bytes left
in the part). The cursor moves in one place, :meth:`_Cursor.take`, as rust-vmm's
``DescriptorChainConsumer::consume`` does: it hands out the next *piece* of the chain, at most
``limit`` bytes of the current buffer (and, for a copy, of the buffers after it that continue it
in driver memory: a blk request's data buffers often do) as a view of guest memory, translated
when it is reached (the memory's :data:`~virtio_schema.mem.Locate` lookup, else a translation),
and moves past it. A buffer that crosses two regions of guest memory comes out as two pieces (and
``next()``, which hands out one buffer at a time, as two device ranges). Every operation is a
loop over pieces: copies (``readinto``, ``write``), records, transfers to a file's
``write``/``readinto``, vectored ``preadv``/``pwritev`` (a batch of pieces), ``next()``. An
operation that moves fewer bytes than it took (a short transfer, an error) puts the
cursor back where it was and takes again what moved. Both classes speak the standard binary I/O
protocol (``read``/``readinto``/``readall``, ``write``), so ``shutil.copyfileobj`` works in both
directions, and both move schema-typed records (:meth:`ReadableChain.read_record`,
:meth:`WritableChain.write_record`) across buffer boundaries.

Rules of this module:

1. Lengths come from the chain (validated once); guest memory is touched only to move data, so
   :meth:`remaining` never reads it.
2. No copy the caller did not ask for: ``next()`` hands out views of guest memory and ``readinto``
   copies straight from guest memory into the caller's buffer.
3. A writable chain never writes outside the buffers the driver offered (a piece never passes the
   end of its buffer), and reports exactly the bytes written (``write``, ``write_record``,
   ``write_from`` and ``write_from_fd`` count themselves, also when a later buffer turns out
   unmapped; writes through ranges from ``next()`` are counted with
   :meth:`WritableChain.add_written`). Counts go through the chain's public ``written``, which
   refuses a total beyond the writable space.

Imports: :mod:`virtio_schema.queue`, :mod:`virtio_schema.mem`, :mod:`virtio_schema.layout`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Self, TypeVar, final

from virtio_schema.errors import DeviceUsageError, DriverError
from virtio_schema.layout import Layout
from virtio_schema.mem import DeviceRange, DriverMem, DriverRange, Locate
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

# A slice assignment INTO a bytearray from another buffer first copies the source into a temporary
# bytearray (CPython's bytearray_ass_subscript); through a memoryview of the target it is one
# memcpy. The view costs about as much as the extra copy of 1 KiB, so small reads keep the
# bytearray.
_VIEW_COPY_MIN = 1024
# Most buffers one preadv/pwritev is given (Linux's UIO_MAXIOV); longer chains go in batches.
_IOV_MAX = 1024
_OFF_MAX = (1 << 63) - 1  # the largest file offset (off_t)

# os.preadv / os.pwritev: (fd, buffers, offset) -> bytes moved
_VectoredIO = Callable[[int, list[memoryview], int], int]
_END = (memoryview(b""), 0, 0, 0)  # what _take returns at the end of a part


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


@final
class _Cursor:
    """A position in one part (readable or writable) of a chain's buffers, and the one primitive
    that moves it, :meth:`take`. Each walker makes and fills its own (a plain record: no
    ``__init__``, whose call through the interpreter's class machinery would cost more than the
    fields). A class of its own, so that the primitive always runs on one type: interpreted, an
    attribute access specializes for the type it meets, and a method shared by the readable and
    writable walkers would meet both by turns."""

    __slots__ = ("addrs", "chain", "cur", "cur_addr", "end", "i", "left", "lens", "locate", "pos")

    chain: DescChain
    locate: Locate | None  # the memory's untracked region lookup: the fast path of take
    addrs: list[int]  # the chain's buffers (both parts): driver addresses and lengths, validated
    lens: list[int]
    end: int  # the part is the buffers before this index
    i: int  # the position: index of the current buffer, ...
    pos: int  # ... bytes consumed of it, ...
    left: int  # ... and bytes left in the part
    # the general path of take (no locate, or a buffer across regions): the last translation,
    # from driver address cur_addr on (cur_addr is set, and read, only with cur)
    cur: DeviceRange | None
    cur_addr: int

    def take(self, limit: int, join: bool = True) -> tuple[memoryview, int, int, int]:
        """THE primitive: the next piece of the part, and the position moved past it.

        A piece is at most ``limit`` (> 0) bytes that lie in one memory region: the rest of the
        current buffer and, if ``join``, of the buffers after it that continue it in driver
        memory (a copy moves a run of adjacent buffers at once; :meth:`_Walker.next` does not
        join, it hands out a buffer at a time). It is returned as ``(view, off, n, addr)``: its
        ``n`` bytes are ``view[off : off + n]`` (a view of guest memory, sliced by the caller for
        one copy or handed out), at driver address ``addr``; ``n`` is 0 at the end of the part.
        The position steps past the buffers a piece finishes, and over zero-length buffers.
        Raises :class:`~virtio_schema.queue.UnmappedBuffer` (the position unmoved) if the piece's
        first byte is not in memory."""
        i = self.i
        pos = self.pos
        lens = self.lens
        while True:
            if i >= self.end:
                self.i = i
                self.pos = 0
                return _END
            length = lens[i]
            if pos < length:
                break
            i += 1
            pos = 0
        addr = self.addrs[i] + pos
        n = length - pos
        if n > limit:
            n = limit
        elif join and n < limit and i + 1 < self.end and self.addrs[i + 1] == addr + n:
            return self._take_run(i, addr, n, limit)
        locate = self.locate
        found = None if locate is None else locate(addr, n)
        if found is None:
            view, off, n = self._translate(addr, n, length - pos)
        else:
            view, off = found
        self.left -= n
        pos += n
        if pos < length:
            self.i = i
            self.pos = pos
        else:  # step past a finished buffer now: the next piece starts clean
            self.i = i + 1
            self.pos = 0
        return view, off, n, addr

    def _take_run(self, i: int, addr: int, n: int, limit: int) -> tuple[memoryview, int, int, int]:
        """:meth:`take` of a piece that goes on past buffer ``i`` (whose last ``n`` bytes start
        at ``addr``) into the buffers continuing it in driver memory, up to ``limit`` bytes; a
        run one lookup does not find in one region is taken a buffer at a time."""
        addrs = self.addrs
        lens = self.lens
        last = i
        pos = lens[i]
        while last + 1 < self.end and addrs[last + 1] == addr + n and n < limit:
            last += 1
            pos = lens[last]
            if n + pos > limit:
                pos = limit - n
            n += pos
        locate = self.locate
        found = None if locate is None else locate(addr, n)
        if found is None:
            return self.take(n, False)
        self.left -= n
        if pos < lens[last]:
            self.i = last
            self.pos = pos
        else:
            self.i = last + 1
            self.pos = 0
        return found[0], found[1], n, addr

    def _translate(self, addr: int, n: int, rest: int) -> tuple[memoryview, int, int]:
        """The general path of :meth:`take`: ``(view, off, k)`` for the first ``k`` of the ``n``
        bytes at ``addr`` that one translation covers (``k`` < ``n`` where a region ends). The
        translation covers the ``rest`` of the buffer as far as one region goes, and is kept for
        the next pieces."""
        cur = self.cur
        if cur is None or not self.cur_addr <= addr < self.cur_addr + len(cur.view):
            cur = _translate_prefix(self.chain.driver_mem, self.chain, addr, rest)
            self.cur = cur
            self.cur_addr = addr
        off = addr - self.cur_addr
        return cur.view, off, min(n, len(cur.view) - off)

    def mark(self) -> tuple[int, int, int]:
        """The position, for :meth:`rewind`."""
        return self.i, self.pos, self.left

    def rewind(self, mark: tuple[int, int, int]) -> None:
        """Move back to ``mark`` (what was taken since then counts as not consumed)."""
        self.i, self.pos, self.left = mark

    def skip(self, n: int) -> None:
        """Move on by ``n`` bytes (what a transfer moved), piece by piece."""
        while n > 0:
            k = self.take(n)[2]
            if not k:
                break
            n -= k

    def pieces(self, n: int) -> list[memoryview]:
        """Views of the next pieces, at most ``_IOV_MAX`` of them and ``n`` (> 0) bytes in all,
        taken (the caller rewinds what it does not use). If one is unmapped, the views are
        released, the position is put back, and the error raised."""
        mark = self.mark()
        views: list[memoryview] = []
        try:
            while n > 0 and len(views) < _IOV_MAX:
                view, off, k, _ = self.take(n)
                if not k:
                    break
                views.append(view[off : off + k])
                n -= k
        except BaseException:
            for view in views:
                view.release()
            self.rewind(mark)
            raise
        return views

    def remaining(self) -> Remaining:
        """Bytes and buffers left, from the validated lengths (no guest-memory access)."""
        n = 0
        pos = self.pos  # consumed of the current buffer; nothing of the later ones
        for length in self.lens[self.i : self.end]:
            if length > pos:
                n += 1
            pos = 0
        return Remaining(self.left, n)


class _Walker:
    """The common half of both chain walkers: the chain, the cursor over the walker's part of it,
    and the operations of both directions, each a loop over :meth:`_Cursor.take`."""

    __slots__ = ("_cursor", "chain")

    WRITES: ClassVar[bool] = False
    """Which part of the chain the walker has: the writable buffers, or the readable ones."""
    chain: DescChain
    _cursor: _Cursor

    def __init__(self, chain: DescChain) -> None:
        if chain.error is not None:
            raise chain.error
        if chain.returned:
            raise ChainAlreadyReturned(chain.queue_index, chain.head)
        self.chain = chain
        buffers = chain.buffers
        cursor = self._cursor = _Cursor()
        cursor.chain = chain
        cursor.locate = chain.locate
        cursor.addrs = buffers.addrs
        cursor.lens = buffers.lens
        cursor.pos = 0
        cursor.cur = None
        if self.WRITES:  # the part: the writable buffers after the readable ones
            cursor.i = buffers.n_readable
            cursor.end = len(buffers.addrs)
            cursor.left = buffers.writable_len
        else:
            cursor.i = 0
            cursor.end = buffers.n_readable
            cursor.left = buffers.readable_len

    def _landed(self, n: int) -> None:
        """``n`` bytes moved by a transfer; a writable chain counts them as written."""

    def _part(self, n: int | None) -> int:
        """``n`` bytes, or all that are left if ``None``, but no more than are left."""
        left = self._cursor.left
        return left if n is None or n > left else n

    def remaining(self) -> Remaining:
        """Bytes and buffers left, from the validated lengths (no guest-memory access)."""
        return self._cursor.remaining()

    def _transfer(self, n: int, op: Callable[[memoryview], int | None]) -> int:
        """Hand the next ``n`` bytes (or fewer, at the end), piece by piece, to ``op`` (a file's
        ``readinto`` or ``write``), each piece a view of guest memory dropped right after the
        call. Stops at the first short transfer; returns the bytes ``op`` reported. If ``op``
        raises, its piece counts as not consumed."""
        chain = self.chain
        if not chain.usable:
            chain.check_usable()
        cursor = self._cursor
        done = 0
        try:
            while done < n:
                mark = cursor.mark()
                view, off, k, _ = cursor.take(n - done)
                if not k:
                    break
                try:
                    got = op(view[off : off + k]) or 0
                except BaseException:
                    cursor.rewind(mark)
                    raise
                done += got
                if got < k:  # a short transfer: the cursor moves by what op took
                    cursor.rewind(mark)
                    cursor.skip(got)
                    break
        finally:
            self._landed(done)
        return done

    def _vectored(self, io: _VectoredIO, fd: int, offset: int, n: int) -> int:
        """Move up to ``n`` bytes between the pieces and the file ``fd`` at ``offset`` with one
        ``io`` call (``os.preadv`` into guest memory, ``os.pwritev`` out of it) per ``_IOV_MAX``
        pieces; the cursor moves by what the kernel reports. Stops at a short transfer; an error
        consumes nothing of its batch."""
        chain = self.chain
        if not chain.usable:
            chain.check_usable()
        if not 0 <= offset <= _OFF_MAX - n:  # (Linux reads offset -1 as "the file position")
            raise DeviceUsageError(f"file offset {offset} (+{n} bytes) outside 0..2**63-1")
        cursor = self._cursor
        done = 0
        try:
            while done < n:
                mark = cursor.mark()
                views = cursor.pieces(n - done)
                if not views:
                    break
                want = 0
                for view in views:
                    want += len(view)
                try:
                    got = io(fd, views, offset + done)
                except BaseException:
                    cursor.rewind(mark)
                    raise
                finally:  # the views die here: nothing keeps guest memory exported
                    for view in views:
                        view.release()
                done += got
                if got < want:
                    cursor.rewind(mark)
                    cursor.skip(got)
                    break
        finally:  # what moved counts, also if a later batch fails
            self._landed(done)
        return done

    def next(self, limit: int | None = None) -> DeviceRange | None:
        """The next device range: the rest of the current buffer (or of the part of it in one
        memory region), cut to ``limit`` bytes if given; ``None`` at the end. Zero-length buffers
        are skipped. Ranges from a writable chain count as written only via ``add_written``."""
        chain = self.chain
        if not chain.usable:
            chain.check_usable()
        if limit is not None and limit <= 0:
            raise DeviceUsageError(f"next(limit={limit}): the limit must be positive")
        cursor = self._cursor
        _, _, n, addr = cursor.take(cursor.left if limit is None else limit, False)
        if not n:
            return None
        # the piece lies in one region, so this translation (a tracked range) covers it
        dr = chain.driver_mem.translate(DriverRange(addr, addr + n))
        if dr is None:  # pragma: no cover - a DriverMem whose locate and translate disagree
            raise UnmappedBuffer(chain.queue_index, chain.head, addr, n)
        return dr


class ReadableChain(_Walker):
    """The device-readable part of a chain, as a binary stream.

    Raises the chain's :attr:`~virtio_schema.queue.DescChain.error` at construction if it is
    malformed. ``with ReadableChain(chain) as r:`` returns the chain on exit if it was not converted
    to a :class:`WritableChain` or returned.
    """

    __slots__ = ()

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
        if not chain.usable:
            chain.check_usable()
        out: bytearray | memoryview
        if type(buffer) is bytearray:
            if len(buffer) >= _VIEW_COPY_MIN:
                with memoryview(buffer) as view:  # released before returning (see below)
                    return self.readinto(view)
            out = buffer
        elif type(buffer) is memoryview and buffer.ndim == 1 and buffer.format == "B":
            out = buffer
        else:  # any other writable buffer: one byte view of it, released before returning (an
            # exception's traceback must not keep the caller's object exported)
            with memoryview(buffer) as view, view.cast("B") as flat:
                return self.readinto(flat)
        cursor = self._cursor
        stop = len(out)
        done = 0
        while done < stop:
            view, off, n, _ = cursor.take(stop - done)
            if not n:
                break
            out[done : done + n] = view[off : off + n]
            done += n
        return done

    def _gather(self, first: memoryview, size: int) -> bytearray:
        """A copy of ``first`` and the pieces after it, ``size`` bytes in all or fewer at the
        end. A length claimed by the driver is not allocated up front: the copy grows only by
        what really arrives (an unmapped buffer ends the read before a huge allocation)."""
        out = bytearray(first)
        while len(out) < size:
            view, off, n, _ = self._cursor.take(size - len(out))
            if not n:
                break
            out += view[off : off + n]
        return out

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all remaining if negative); ``b""`` at the end."""
        chain = self.chain
        if not chain.usable:
            chain.check_usable()
        cursor = self._cursor
        if size is None or size < 0 or size > cursor.left:
            size = cursor.left
        view, off, n, _ = cursor.take(size) if size else _END
        if not n:
            return b""
        if n == size:  # the bytes sit in one buffer: one copy, straight out
            return bytes(view[off : off + n])
        return bytes(self._gather(view[off : off + n], size))

    def readall(self) -> bytes:
        """Every remaining readable byte."""
        return self.read(-1)

    def read_record(self, layout: Layout[R]) -> R:
        """Read one record of ``layout`` (e.g. a virtio-blk request header), across buffer
        boundaries. Raises :class:`InsufficientData` if the chain has fewer bytes left."""
        chain = self.chain
        if not chain.usable:
            chain.check_usable()
        size = layout.size
        cursor = self._cursor
        if cursor.left < size:
            raise InsufficientData(chain.queue_index, chain.head, size, cursor.left)
        view, off, n, _ = cursor.take(size) if size else _END
        if n == size:  # the record sits in one buffer: unpacked where it is
            return layout.unpack_from(view, off)
        return layout.unpack_from(self._gather(view[off : off + n], size))

    def read_to(self, write: Callable[[memoryview], int | None], n: int | None = None) -> int:
        """Zero-copy out: pass up to ``n`` readable bytes (default: all) to ``write`` (e.g. a
        file's ``write``), piece by piece (a run of buffers adjacent in guest memory is one
        piece), straight from guest memory. Returns the bytes written; stops early if ``write``
        takes fewer than offered."""
        return self._transfer(self._part(n), write)

    def read_to_fd(self, fd: int, offset: int, n: int | None = None) -> int:
        """Zero-copy out, vectored: write up to ``n`` readable bytes (default: all) into the file
        ``fd`` at ``offset`` (a disk image), straight from guest memory: one ``os.pwritev`` for up
        to 1024 buffers. The file position is neither used nor moved, so queues served by
        different threads can share the file. Returns the bytes written, stopping at a short
        write; an ``OSError`` propagates (the bytes of earlier batches stay consumed)."""
        return self._vectored(os.pwritev, fd, offset, self._part(n))

    def return_complete(self) -> None:
        """Return the chain (0 bytes written). Raises :class:`DataRemaining` afterwards if
        readable bytes were left unread (the chain is returned either way)."""
        left = self._cursor.left
        self.chain.return_written(0)
        if left:
            raise DataRemaining(self.chain.queue_index, self.chain.head, left)

    def into_writable(self, *, ignore_remaining: bool = False) -> WritableChain:
        """The writable part of the same chain. Strict by default: raises
        :class:`DataRemaining` if readable bytes are left (the chain is not returned then)."""
        left = self._cursor.left
        if left and not ignore_remaining:
            raise DataRemaining(self.chain.queue_index, self.chain.head, left)
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

    WRITES = True

    def writable(self) -> bool:
        return True

    @property
    def written(self) -> int:
        """Bytes written so far (reported to the driver on return)."""
        return self.chain.written

    def add_written(self, n: int) -> None:
        """Count ``n`` bytes written through ranges from :meth:`next`."""
        self.chain.add_written(n)

    def _landed(self, n: int) -> None:
        """Count ``n`` bytes a transfer moved into the writable buffers."""
        if n:
            self.chain.add_written(n)

    def write(self, data: ReadBuffer) -> int:
        """Write as much of ``data`` as fits; returns the count (0 when the chain is full)."""
        chain = self.chain
        if not chain.usable:
            chain.check_usable()
        src: bytes | bytearray | memoryview
        if (
            type(data) is bytes
            or type(data) is bytearray
            or (type(data) is memoryview and data.ndim == 1 and data.format == "B")
        ):
            src = data
        else:  # any other buffer: one byte view of it, released before returning (an
            # exception's traceback must not keep the caller's object exported)
            with memoryview(data) as view, view.cast("B") as flat:
                return self.write(flat)
        # src is sliced through one memoryview (slicing bytes would copy each piece), unless one
        # piece takes it all
        cursor = self._cursor
        stop = len(src)
        done = 0
        whole: memoryview | None = None
        try:
            while done < stop:
                view, off, n, _ = cursor.take(stop - done)
                if not n:
                    break
                if n == stop:
                    view[off : off + n] = src
                else:
                    if whole is None:
                        whole = memoryview(src)
                    view[off : off + n] = whole[done : done + n]
                done += n
        finally:  # what landed counts, also if a later buffer turns out unmapped midway
            if whole is not None:
                whole.release()  # the caller's bytearray can be resized again at once
            if done:
                chain.add_written(done)
        return done

    def write_from(self, readinto: Callable[[memoryview], int | None], n: int | None = None) -> int:
        """Zero-copy in: let ``readinto`` (e.g. a file's) fill up to ``n`` writable bytes
        (default: all) straight in guest memory, piece by piece (a run of buffers adjacent in
        guest memory is one piece). The bytes it reports count as written; stops early at a
        short read (end of file)."""
        return self._transfer(self._part(n), readinto)

    def write_from_fd(self, fd: int, offset: int, n: int | None = None) -> int:
        """Zero-copy in, vectored: read up to ``n`` bytes (default: all the writable space) from
        the file ``fd`` at ``offset`` (a disk image) straight into guest memory: one
        ``os.preadv`` for up to 1024 buffers. The file position is neither used nor moved. The
        bytes read count as written; stops early at a short read (end of file). An ``OSError``
        propagates (the bytes of earlier batches stay written and counted)."""
        return self._vectored(os.preadv, fd, offset, self._part(n))

    def write_all(self, data: ReadBuffer) -> None:
        """Write all of ``data`` or raise :class:`InsufficientSpace` (writing nothing)."""
        n = len(memoryview(data).cast("B"))
        left = self._cursor.left
        if n > left:
            raise InsufficientSpace(self.chain.queue_index, self.chain.head, n, left)
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
