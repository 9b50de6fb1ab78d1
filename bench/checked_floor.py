"""The checked floor of ``bench_queue.py``: the hand-written floor plus every check the library
makes on the benchmark's chains, fused into the loop, with no API.

What validation alone costs: the floor's loop with every check the library makes on these chains
(the avail index and head, each descriptor's flags, lengths and next index, the chain length, the
indirect table's rules, readable-before-writable, each buffer inside guest memory, the bytes
written within the writable space) and the used-buffer notification decision with its
store->load fence, but no chain object, no reader or writer, no bookkeeping: two function calls
per chain, the walk (entry by entry) and the request. Both formats, scenarios a, b and c. A
malformed chain raises ``ValueError`` (tests/test_bench_queue.py feeds it some). Like the
library, it reads each descriptor once and keeps the records: a chain is validated whole before
any of its buffers is touched.

It is its own module, plain typed code with no import from the project, so that mypyc compiles it
as it is: ``bench_queue.py`` measures it interpreted next to the pure-Python library and compiled
(``bench_queue.compile_checked_floor``, cached under ``build/bench-mypyc/``) next to the compiled library, as the
limit a compiled library with the same checks could reach.
"""

from __future__ import annotations

import mmap
import struct
import threading
from collections.abc import Callable

_H = struct.Struct("<H")
_D = struct.Struct("<QLHH")
_U = struct.Struct("<LL")
_LEN_ID = struct.Struct("<LH")  # a used descriptor's len and id (offsets 8 and 12)

Record = tuple[int, int, int, int]
"""One descriptor as read: (addr, len, flags, next) split, (addr, len, id, flags) packed."""


def page_buffer(n: int) -> memoryview:
    """``n`` zero bytes starting on a page boundary, as a writable byte view (anonymous memory,
    its pages mapped before it is returned)."""
    area = mmap.mmap(-1, max(n, 1))
    view = memoryview(area)
    for at in range(0, n, mmap.PAGESIZE):
        view[at] = 0
    return view[:n]


def _scratch(kind: str) -> tuple[memoryview, memoryview | None]:
    """The device's buffer for the readable bytes and, for blk, the data it writes."""
    buf = page_buffer(65536) if kind == "copy" else memoryview(bytearray(64))
    data = memoryview(bytes(14 * 512)) if kind == "blk" else None
    return buf, data


_FENCE = threading.Lock()


def _checked_walk(
    mem: memoryview, base: int, desc: int, head: int, size: int
) -> tuple[list[Record], int, int]:
    """The records of the chain at ``head`` (readable ones first), the number of readable ones
    and the writable bytes; ``ValueError`` for anything the library rejects."""
    unpack = _D.unpack_from
    table, limit, i = desc, size, head
    descs: list[Record] = []
    n_readable = rlen = wlen = count = 0
    indirect = False
    while True:
        rec = unpack(mem, table + 16 * i)
        addr, length, flags, nxt = rec
        if flags & 4:  # INDIRECT (negotiated by the rig)
            if indirect:
                raise ValueError("nested indirect")
            if flags & 1:
                raise ValueError("indirect with next")
            if not length or length & 15 or length >> 4 > 65535:
                raise ValueError("indirect table length")
            table = addr - base
            if table < 0 or table + length > len(mem):
                raise ValueError("unmapped indirect table")
            limit, i, indirect = length >> 4, 0, True
            continue
        count += 1
        if addr + length > 1 << 64:
            raise ValueError("buffer past 2**64")
        if flags & 2:
            wlen += length
        else:
            if len(descs) > n_readable:
                raise ValueError("readable after writable")
            rlen += length
            n_readable += 1
        descs.append(rec)
        if not flags & 1:
            break
        if count >= size:
            raise ValueError("chain too long")
        if nxt >= limit:
            raise ValueError("next out of range")
        i = nxt
    if rlen + wlen > 0xFFFFFFFF:
        raise ValueError("chain longer than 4 GiB")
    return descs, n_readable, wlen


_BLK_HDR = struct.Struct("<LLQ")  # type, reserved, sector


def _checked_request(
    mem: memoryview,
    base: int,
    descs: list[Record],
    n_readable: int,
    wlen: int,
    buf: memoryview,
    data: memoryview | None,
) -> int:
    """The device's work on a walked chain, both formats; returns the used length. Echo and copy
    (``data`` is None): the readable buffer into ``buf``, then back into the writable one. Blk:
    the 16-byte header read as a record, ``data`` across the data buffers, a status byte. Every
    buffer inside guest memory, the used length within the writable space."""
    end = len(mem)
    addr, ln = descs[0][0], descs[0][1]
    off = addr - base
    if data is None:
        if n_readable != 1 or len(descs) != 2:
            raise ValueError("not an echo chain")
        if ln > len(buf):
            raise ValueError("readable bytes left over")  # into_writable()'s check
        if off < 0 or off + ln > end:
            raise ValueError("unmapped buffer")
        buf[:ln] = mem[off : off + ln]
        addr, wln = descs[1][0], descs[1][1]
        written = ln if ln < wln else wln
        off = addr - base
        if off < 0 or off + written > end:
            raise ValueError("unmapped buffer")
        mem[off : off + written] = buf[:written]
    else:
        if n_readable != 1 or ln < 16 or off < 0 or off + 16 > end:
            raise ValueError("no request header")
        _BLK_HDR.unpack_from(mem, off)
        total = len(data)
        done = 0
        k = 1
        for addr, ln, _x, _y in descs[1:-1]:  # the data, as far as it goes
            m = ln if ln < total - done else total - done
            off = addr - base
            if off < 0 or off + m > end:
                raise ValueError("unmapped buffer")
            mem[off : off + m] = data[done : done + m]
            done += m
            k += 1
        addr, ln = descs[k][0], descs[k][1]
        off = addr - base
        if k != len(descs) - 1 or done != total or not ln or off < 0 or off >= end:
            raise ValueError("not a blk read chain")
        mem[off] = 0  # the status byte
        written = total + 1
    if written > wlen:
        raise ValueError("written past the writable space")
    return written


def _checked_packed_walk(
    mem: memoryview, base: int, ring: int, pos: int, size: int
) -> tuple[list[Record], int, int, int, int]:
    """The packed chain at slot ``pos`` (its first descriptor is available): the records
    (readable ones first), the number of readable ones, the writable bytes, the buffer id and
    the slots used; ``ValueError`` for anything the library rejects. Like the library, a bad
    descriptor does not stop the walk: the ring-level faults (no end, a bad buffer id) win."""
    unpack = _D.unpack_from
    descs: list[Record] = []
    n_readable = rlen = wlen = count = slots = 0
    error: ValueError | None = None
    while True:
        rec = unpack(mem, ring + 16 * pos)
        addr, length, buf_id, flags = rec
        slots += 1
        try:
            if flags & 4:  # INDIRECT (negotiated by the rig): alone in its chain
                if flags & 1 or slots > 1:
                    raise ValueError("indirect with next")
                if not length or length & 15 or length >> 4 > 65535:
                    raise ValueError("indirect table length")
                table = addr - base
                if table < 0 or table + length > len(mem):
                    raise ValueError("unmapped indirect table")
                for i in range(length >> 4):  # every entry, NEXT ignored
                    entry = unpack(mem, table + 16 * i)
                    baddr, blen, _bid, bflags = entry
                    if bflags & 4:
                        raise ValueError("nested indirect")
                    count += 1
                    if count > size:
                        raise ValueError("chain too long")
                    if baddr + blen > 1 << 64:
                        raise ValueError("buffer past 2**64")
                    if bflags & 2:
                        wlen += blen
                    else:
                        if len(descs) > n_readable:
                            raise ValueError("readable after writable")
                        rlen += blen
                        n_readable += 1
                    descs.append(entry)
            else:
                count += 1
                if count > size:
                    raise ValueError("chain too long")
                if addr + length > 1 << 64:
                    raise ValueError("buffer past 2**64")
                if flags & 2:
                    wlen += length
                else:
                    if len(descs) > n_readable:
                        raise ValueError("readable after writable")
                    rlen += length
                    n_readable += 1
                descs.append(rec)
        except ValueError as exc:
            error = error or exc
        if not flags & 1:
            break
        if slots >= size:
            raise ValueError("chain never ends")
        pos += 1
        if pos == size:
            pos = 0
    if buf_id >= size:
        raise ValueError("buffer id out of range")
    if error is not None:
        raise error
    if rlen + wlen > 0xFFFFFFFF:
        raise ValueError("chain longer than 4 GiB")
    return descs, n_readable, wlen, buf_id, slots


def checked_split(
    mem: memoryview,
    base: int,
    offsets: tuple[int, int, int],
    size: int,
    kick: Callable[[], None],
    notify: Callable[[], None],
    rounds: int,
    kind: str = "echo",
) -> int:
    """The split checked floor on the ring at ``offsets`` (descriptor table, avail, used) in
    ``mem``: echo (a), copy (c) or blk (b), with the checks of :func:`_checked_walk` and
    :func:`_checked_request`, and the notification decision from ``avail.flags`` after the fence.
    ``kick`` makes the next batch available, once per round."""
    desc, av, us = offsets
    unpack_h, pack_u, pack_h = _H.unpack_from, _U.pack_into, _H.pack_into
    acquire, release = _FENCE.acquire, _FENCE.release
    buf, data = _scratch(kind)
    last = used = n = 0
    mask = size - 1
    for _ in range(rounds):
        kick()
        while (idx := unpack_h(mem, av + 2)[0]) != last:
            if ((idx - last) & 0xFFFF) > size:
                raise ValueError("avail index jump")
            head = unpack_h(mem, av + 4 + 2 * (last & mask))[0]
            if head >= size:
                raise ValueError("head out of range")
            last = (last + 1) & 0xFFFF
            descs, n_readable, wlen = _checked_walk(mem, base, desc, head, size)
            written = _checked_request(mem, base, descs, n_readable, wlen, buf, data)
            pack_u(mem, us + 4 + 8 * (used & mask), head, written)
            used = (used + 1) & 0xFFFF
            pack_h(mem, us + 2, used)
            acquire()  # used.idx before avail.flags (store->load)
            release()
            if not unpack_h(mem, av)[0] & 1:  # NO_INTERRUPT clear: notify
                notify()
            n += 1
    return n


def checked_packed(
    mem: memoryview,
    base: int,
    offsets: tuple[int, int, int],
    size: int,
    kick: Callable[[], None],
    notify: Callable[[], None],
    rounds: int,
    kind: str = "echo",
) -> int:
    """The packed checked floor on the ring at ``offsets`` (descriptor ring, driver event area,
    device event area): echo and copy (a readable and a writable buffer) or blk (one indirect
    table), with the checks of :func:`_checked_packed_walk` and :func:`_checked_request`, and the
    notification decision from the driver event area after the fence."""
    ring, drv, _dev = offsets  # the driver event area: off_wrap, then flags
    unpack_h, pack_lid, pack_h = _H.unpack_from, _LEN_ID.pack_into, _H.pack_into
    acquire, release = _FENCE.acquire, _FENCE.release
    buf, data = _scratch(kind)
    pos = used = n = 0
    wrap = uwrap = True
    for _ in range(rounds):
        kick()
        while True:
            fl = unpack_h(mem, ring + 16 * pos + 14)[0]
            if bool(fl & 0x80) != wrap or bool(fl & 0x8000) == wrap:
                break
            descs, n_readable, wlen, buf_id, slots = _checked_packed_walk(
                mem, base, ring, pos, size
            )
            written = _checked_request(mem, base, descs, n_readable, wlen, buf, data)
            u = ring + 16 * used
            pack_lid(mem, u + 8, written, buf_id)
            pack_h(mem, u + 14, (0x8080 if uwrap else 0) | (0x0002 if written else 0))
            used += slots
            pos += slots
            if pos >= size:
                pos -= size
                wrap = not wrap
            if used >= size:
                used -= size
                uwrap = not uwrap
            acquire()  # the used descriptor before the driver event area (store->load)
            release()
            if unpack_h(mem, drv + 2)[0] != 1:  # not DISABLE: notify
                notify()
            n += 1
    return n
