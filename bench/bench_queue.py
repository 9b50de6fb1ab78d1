#!/usr/bin/env python3
"""The hot path, measured: the library, pure Python and compiled, against a hand-written struct loop
and a Construct-per-access implementation, on the same guest memory, in the same run.

    python3 dev.py bench bench_queue.py [--quick] [--repeats N] [--json FILE] [--plot FILE.svg]
        [--format split|packed|both] [--scenario S ...] [--variant pure|compiled|both]

(``dev.py bench`` compiles the kernel and puts it in the tree for the run; ``--variant pure`` runs
without it: ``.venv/bin/python bench/bench_queue.py --variant pure``.)

Scenarios (each device iteration: take a chain, read it, write it, return it):

* ``a-echo-64``: one readable and one writable descriptor of 64 bytes;
* ``b-blk-indirect``: Linux virtio-blk style, one indirect table of 16 descriptors (16-byte header
  read as a record, 14 writable 512-byte data buffers, 1 status byte);
* ``c-copy-64k``: 64 KiB read into the caller's buffer and 64 KiB written back (copy throughput);
* ``d-batch-256``: ``a`` in batches of 256 chains with ``BufferedNotify`` and one flush per batch.

The hand-written floor copies through a ``memoryview`` of its buffer made once: a slice assignment
into a ``bytearray`` from another buffer first copies the source into a temporary (CPython), so
the view is the fastest pure-Python copy.

In c every implementation copies through a buffer that starts on a page boundary
(:func:`page_buffer`). Where ``malloc`` puts a ``bytearray`` changes from one allocation to the
next, and a 64 KiB copy into a buffer 16 bytes past a cache line took 1.6-2.1x as long
on this machine: with a ``bytearray`` each, the comparison measured the allocator's luck.

Two more references split what the library costs over the floor into its two parts:

* the *checked floor* (a, b, c, both formats; ``checked_floor.py``): the floor plus every check
  the library makes on these chains and its notification decision with the store->load fence,
  fused into the loop with no API (two calls per chain: the walk, entry by entry, and the
  request). Interpreted, it is what a hand-written device that validates like the library costs
  in CPython, whatever its API; compiled by mypyc (in the compiled child), it is the limit a
  compiled library with the same checks could reach;
* the *API skeleton* (a, split): the library's shape (a chain object, a reader, a writer: the same six
  calls per chain) with nothing inside: no validation, no bookkeeping, no notification decision.
  It is the least any API of that shape costs in CPython.

The driver side costs the same for every implementation and almost nothing: descriptors and the
available ring are laid out once, and each round the "driver" only moves ``avail.idx`` forward by a
batch (the device returns every chain, so the same heads are valid again).

The two variants run in two child processes, one with ``VIRTIO_SCHEMA_PURE_PYTHON=1``, one with
the compiled kernel (and the checked floor compiled by mypyc, cached in ``build/bench-mypyc/``);
the children refuse to run a variant they did not get. Every figure is the median of
``--repeats`` runs: in each repeat the two children take turns (the first alternating), and within
each child the implementations of a scenario take turns, so the ratios compare runs made at the
same time; memory pages are mapped before the timed loop. Everything but the library and the
checked floor is interpreted in both children (the floor, the skeleton and Construct run the same
code in each: a check of the machine's drift between the two). The table gives, per variant, ns
per chain, MB/s of payload and the ratio to that child's hand-written floor (lower is better).
A memory check runs scenario ``a`` for a long time under ``tracemalloc`` in each variant and
reports the peak before and after (a flat peak means no per-chain growth). The script ends with
issue 19's targets for the compiled library (a, d <= 1.0x floor; b <= 0.8x; c >= 95% of the
floor's throughput), each with the compiled checked floor's figure beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import construct

from virtio_schema._variant import PURE_PYTHON_ENV
from virtio_schema.chain import ReadableChain
from virtio_schema.fake_queue import FakeMemory, make_queue
from virtio_schema.queue import VirtQueue
from virtio_schema.records import BLK_REQ_HDR, BlkReqHdr
from virtio_schema.schema import (
    DescFlags,
    Descriptor,
    Feature,
    PackedDescriptor,
    UsedElem,
    VirtioBlkReqHdr,
)
from virtio_schema.util import BufferedNotify, NotificationCounter

HERE = Path(__file__).resolve().parent
if os.environ.get("VIRTIO_SCHEMA_BENCH_FLOOR"):  # the compiled child: the compiled checked floor
    sys.path.insert(0, os.environ["VIRTIO_SCHEMA_BENCH_FLOOR"])
import checked_floor  # noqa: E402 (found on the path just set, in the compiled child)
from _plot import Bar, write_plot  # noqa: E402
from checked_floor import page_buffer  # noqa: E402

QSIZE = 256
"""Chains made available per round (one batch)."""


class NullNotify:
    """The notifier of scenarios a-c: the library still decides per return whether to notify
    (barrier, flag read), but the notification itself costs nothing, as in the floor."""

    def notify(self) -> None:
        pass


@dataclass
class Rig:
    """A queue with ``QSIZE`` identical chains laid out once, and the raw views the references use."""

    queue: VirtQueue
    mem: memoryview  # the whole fake memory region
    base: int  # its driver address
    desc_off: int
    avail_off: int
    used_off: int
    notifier: NotificationCounter
    payload: int  # payload bytes moved per chain (read + written)
    packed: bool
    size: int  # the queue size (QSIZE times descriptors per chain)
    laps: tuple[bytes, bytes] = (b"", b"")  # packed: the ring armed for wrap 1 and for wrap 0
    lap: int = 0

    def kick(self, n: int) -> None:
        """The driver makes ``n`` more chains available (split: move avail.idx; packed: one round
        is one lap of the ring, so re-arm the whole ring for the next lap with one copy)."""
        if self.packed:
            image = self.laps[self.lap & 1]
            self.mem[self.desc_off : self.desc_off + len(image)] = image
            self.lap += 1
            return
        idx = struct.unpack_from("<H", self.mem, self.avail_off + 2)[0]
        struct.pack_into("<H", self.mem, self.avail_off + 2, (idx + n) & 0xFFFF)


def build(scenario: str, *, packed: bool = False) -> Rig:
    if packed:
        return build_packed(scenario)
    features = Feature.INDIRECT_DESC
    fmem = FakeMemory(96 << 20)
    size = QSIZE if scenario == "b-blk-indirect" else 2 * QSIZE
    fq = make_queue(size, features=features, memory=fmem)
    d = fq.driver
    heads = []
    if scenario != "d-batch-256":
        fq.queue.notifier = NullNotify()
    # publish QSIZE chains once; the device returns them and the driver re-offers the same heads
    for _ in range(QSIZE):
        if scenario in ("a-echo-64", "d-batch-256"):
            head = d.publish([bytes(64)], [64])
        elif scenario == "b-blk-indirect":
            hdr = BLK_REQ_HDR.pack(BlkReqHdr(0, 0, 8))
            head = d.publish([hdr], [512] * 14 + [1], indirect=True)
        elif scenario == "c-copy-64k":
            head = d.publish([bytes(65536)], [65536])
        else:
            raise SystemExit(f"unknown scenario {scenario}")
        assert head is not None
        heads.append(head)
    # every avail slot holds one of the heads (the ring is size slots, a round uses QSIZE of them);
    # rewind avail.idx so each round makes QSIZE chains available again
    for slot in range(size):
        d.avail.set_ring(slot, heads[slot % QSIZE])
    d.set_avail_idx(0)
    region = fmem.buffers[0]
    base = fmem.memory.regions[0].start
    payload = PAYLOAD[scenario]
    return Rig(
        fq.queue,
        memoryview(region),
        base,
        d.desc_addr - base,
        d.avail_addr - base,
        d.used_addr - base,
        fq.notifier,
        payload,
        packed,
        size,
    )


PAYLOAD = {"a-echo-64": 128, "d-batch-256": 128, "b-blk-indirect": 16 + 14 * 512 + 1,
           "c-copy-64k": 2 * 65536}  # fmt: skip


def build_packed(scenario: str) -> Rig:
    """The packed rig: QSIZE chains fill exactly one lap of the ring."""
    fmem = FakeMemory(96 << 20)
    size = QSIZE if scenario == "b-blk-indirect" else 2 * QSIZE
    fq = make_queue(size, packed=True, features=Feature.INDIRECT_DESC, memory=fmem)
    d = fq.driver
    if scenario != "d-batch-256":
        fq.queue.notifier = NullNotify()
    for _ in range(QSIZE):
        if scenario in ("a-echo-64", "d-batch-256"):
            got = d.publish([bytes(64)], [64])
        elif scenario == "b-blk-indirect":
            got = d.publish([BLK_REQ_HDR.pack(BlkReqHdr(0, 0, 8))], [512] * 14 + [1], indirect=True)
        else:
            got = d.publish([bytes(65536)], [65536])
        assert got is not None
    base = fmem.memory.regions[0].start
    off = d.ring_addr - base
    region = memoryview(fmem.buffers[0])
    lap1 = bytes(region[off : off + 16 * size])  # AVAIL set, USED clear: available on lap 1
    lap0 = bytearray(lap1)
    for slot in range(size):
        (flags,) = struct.unpack_from("<H", lap0, 16 * slot + 14)
        struct.pack_into("<H", lap0, 16 * slot + 14, (flags & 0x7F7F) | 0x8000)
    return Rig(
        fq.queue, region, base, off, d.driver_event_addr - base, d.device_event_addr - base,
        fq.notifier, PAYLOAD[scenario], True, size, (lap1, bytes(lap0)),
    )  # fmt: skip


# --- the library -------------------------------------------------------------------------------


def lib_echo(rig: Rig, rounds: int) -> int:
    q = rig.queue
    buf = bytearray(64)
    n = 0
    for _ in range(rounds):
        rig.kick(QSIZE)
        while (chain := q.next_chain()) is not None:
            r = ReadableChain(chain)
            r.readinto(buf)
            r.into_writable().write(buf)
            chain.return_written()
            n += 1
    return n


def lib_blk(rig: Rig, rounds: int) -> int:
    q = rig.queue
    data = bytes(14 * 512)
    ok = b"\0"
    n = 0
    for _ in range(rounds):
        rig.kick(QSIZE)
        while (chain := q.next_chain()) is not None:
            r = ReadableChain(chain)
            r.read_record(BLK_REQ_HDR)
            w = r.into_writable()
            w.write(data)
            w.write(ok)
            chain.return_written()
            n += 1
    return n


def lib_copy(rig: Rig, rounds: int) -> int:
    q = rig.queue
    buf = page_buffer(65536)
    n = 0
    for _ in range(rounds):
        rig.kick(QSIZE)
        while (chain := q.next_chain()) is not None:
            r = ReadableChain(chain)
            r.readinto(buf)
            r.into_writable().write(buf)
            chain.return_written()
            n += 1
    return n


def lib_batch(rig: Rig, rounds: int) -> int:
    q = rig.queue
    notify = BufferedNotify(rig.notifier)
    q.notifier = notify
    buf = bytearray(64)
    n = 0
    for _ in range(rounds):
        rig.kick(QSIZE)
        with notify, q.batch():
            while (chain := q.next_chain()) is not None:
                r = ReadableChain(chain)
                r.readinto(buf)
                r.into_writable().write(buf)
                chain.return_written()
                n += 1
    return n


# --- the hand-written floor: struct and memoryviews, no validation ------------------------------

_H = struct.Struct("<H")
_D = struct.Struct("<QLHH")
_U = struct.Struct("<LL")


def floor_echo(rig: Rig, rounds: int) -> int:
    mem, base = rig.mem, rig.base
    desc, av, us = rig.desc_off, rig.avail_off, rig.used_off
    unpack_h, unpack_d, pack_u, pack_h = _H.unpack_from, _D.unpack_from, _U.pack_into, _H.pack_into
    buf = memoryview(bytearray(64))  # a view made once: copies into it are one memcpy
    last = used = n = 0
    mask = rig.size - 1
    for _ in range(rounds):
        rig.kick(QSIZE)
        idx = unpack_h(mem, av + 2)[0]
        while last != idx:
            head = unpack_h(mem, av + 4 + 2 * (last & mask))[0]
            last = (last + 1) & 0xFFFF
            addr, ln, _fl, nxt = unpack_d(mem, desc + 16 * head)
            off = addr - base
            buf[:] = mem[off : off + ln]
            waddr, _wln, _wfl, _ = unpack_d(mem, desc + 16 * nxt)
            off = waddr - base
            mem[off : off + 64] = buf
            pack_u(mem, us + 4 + 8 * (used & mask), head, 64)
            used = (used + 1) & 0xFFFF
            pack_h(mem, us + 2, used)
            n += 1
    return n


# --- the API skeleton: the library's shape with nothing inside -----------------------------------
#
# What any API with a chain object, a reader and a writer costs in CPython before it checks
# anything: the floor's struct calls, spread over the same six calls per chain the library's users
# make (next_chain, ReadableChain, readinto, into_writable, write, return_written), with no
# validation, no bookkeeping and no notification decision. Scenario a, split ring only.


class _SkelChain:
    __slots__ = ("head", "q", "r", "w")

    def __init__(self, q: _SkelQueue, head: int, r: tuple[int, int], w: tuple[int, int]) -> None:
        self.q, self.head, self.r, self.w = q, head, r, w

    def return_written(self, n: int) -> None:
        self.q.give_back(self.head, n)


class _SkelReader:
    __slots__ = ("c",)

    def __init__(self, c: _SkelChain) -> None:
        self.c = c

    def readinto(self, buf: bytearray) -> int:
        (addr, length), q = self.c.r, self.c.q
        off = addr - q.base
        buf[:length] = q.mem[off : off + length]
        return length

    def into_writable(self) -> _SkelWriter:
        return _SkelWriter(self.c)


class _SkelWriter:
    __slots__ = ("c",)

    def __init__(self, c: _SkelChain) -> None:
        self.c = c

    def write(self, data: bytearray) -> int:
        (addr, _length), q = self.c.w, self.c.q
        off = addr - q.base
        q.mem[off : off + len(data)] = data
        return len(data)


class _SkelQueue:
    def __init__(self, rig: Rig) -> None:
        self.mem, self.base = rig.mem, rig.base
        self.desc, self.avail, self.used_off = rig.desc_off, rig.avail_off, rig.used_off
        self.last = self.used = 0
        self.mask = rig.size - 1

    def next_chain(self) -> _SkelChain | None:
        mem = self.mem
        if _H.unpack_from(mem, self.avail + 2)[0] == self.last:
            return None
        head = _H.unpack_from(mem, self.avail + 4 + 2 * (self.last & self.mask))[0]
        self.last = (self.last + 1) & 0xFFFF
        addr, length, _flags, nxt = _D.unpack_from(mem, self.desc + 16 * head)
        waddr, wlength, _wflags, _ = _D.unpack_from(mem, self.desc + 16 * nxt)
        return _SkelChain(self, head, (addr, length), (waddr, wlength))

    def give_back(self, head: int, n: int) -> None:
        _U.pack_into(self.mem, self.used_off + 4 + 8 * (self.used & self.mask), head, n)
        self.used = (self.used + 1) & 0xFFFF
        _H.pack_into(self.mem, self.used_off + 2, self.used)


def skeleton_echo(rig: Rig, rounds: int) -> int:
    q = _SkelQueue(rig)
    buf = bytearray(64)
    n = 0
    for _ in range(rounds):
        rig.kick(QSIZE)
        while (chain := q.next_chain()) is not None:
            r = _SkelReader(chain)
            r.readinto(buf)
            r.into_writable().write(buf)
            chain.return_written(64)
            n += 1
    return n


def floor_blk(rig: Rig, rounds: int) -> int:
    mem, base = rig.mem, rig.base
    desc, av, us = rig.desc_off, rig.avail_off, rig.used_off
    unpack_h, unpack_d, pack_u, pack_h = _H.unpack_from, _D.unpack_from, _U.pack_into, _H.pack_into
    hdr_unpack = struct.Struct("<LLQ").unpack_from
    data = bytes(14 * 512)
    last = used = n = 0
    mask = rig.size - 1
    for _ in range(rounds):
        rig.kick(QSIZE)
        idx = unpack_h(mem, av + 2)[0]
        while last != idx:
            head = unpack_h(mem, av + 4 + 2 * (last & mask))[0]
            last = (last + 1) & 0xFFFF
            taddr, _tlen, _fl, _nx = unpack_d(mem, desc + 16 * head)
            table = taddr - base
            haddr, _hl, _hf, i = unpack_d(mem, table)
            hdr_unpack(mem, haddr - base)
            pos = 0
            written = 0
            while True:
                addr, ln, fl, nxt = unpack_d(mem, table + 16 * i)
                off = addr - base
                if pos < len(data):
                    mem[off : off + ln] = data[pos : pos + ln]
                    pos += ln
                else:
                    mem[off] = 0
                written += ln
                if not fl & 1:
                    break
                i = nxt
            pack_u(mem, us + 4 + 8 * (used & mask), head, written)
            used = (used + 1) & 0xFFFF
            pack_h(mem, us + 2, used)
            n += 1
    return n


def floor_copy(rig: Rig, rounds: int) -> int:
    mem, base = rig.mem, rig.base
    desc, av, us = rig.desc_off, rig.avail_off, rig.used_off
    unpack_h, unpack_d, pack_u, pack_h = _H.unpack_from, _D.unpack_from, _U.pack_into, _H.pack_into
    buf = page_buffer(65536)
    last = used = n = 0
    mask = rig.size - 1
    for _ in range(rounds):
        rig.kick(QSIZE)
        idx = unpack_h(mem, av + 2)[0]
        while last != idx:
            head = unpack_h(mem, av + 4 + 2 * (last & mask))[0]
            last = (last + 1) & 0xFFFF
            addr, ln, _fl, nxt = unpack_d(mem, desc + 16 * head)
            off = addr - base
            buf[:] = mem[off : off + ln]
            waddr, wln, _wfl, _ = unpack_d(mem, desc + 16 * nxt)
            off = waddr - base
            mem[off : off + wln] = buf
            pack_u(mem, us + 4 + 8 * (used & mask), head, wln)
            used = (used + 1) & 0xFFFF
            pack_h(mem, us + 2, used)
            n += 1
    return n


def floor_batch(rig: Rig, rounds: int) -> int:
    mem, base = rig.mem, rig.base
    desc, av, us = rig.desc_off, rig.avail_off, rig.used_off
    unpack_h, unpack_d, pack_u, pack_h = _H.unpack_from, _D.unpack_from, _U.pack_into, _H.pack_into
    buf = memoryview(bytearray(64))
    last = used = n = 0
    mask = rig.size - 1
    notifier = rig.notifier
    for _ in range(rounds):
        rig.kick(QSIZE)
        idx = unpack_h(mem, av + 2)[0]
        while last != idx:
            head = unpack_h(mem, av + 4 + 2 * (last & mask))[0]
            last = (last + 1) & 0xFFFF
            addr, ln, _fl, nxt = unpack_d(mem, desc + 16 * head)
            off = addr - base
            buf[:] = mem[off : off + ln]
            waddr, _wln, _wfl, _ = unpack_d(mem, desc + 16 * nxt)
            off = waddr - base
            mem[off : off + 64] = buf
            pack_u(mem, us + 4 + 8 * (used & mask), head, 64)
            used = (used + 1) & 0xFFFF
            n += 1
        pack_h(mem, us + 2, used)
        notifier.notify()
    return n


# --- the packed floor: the same, on the packed ring ---------------------------------------------

_LEN_ID = struct.Struct("<LH")  # a used descriptor's len and id (offsets 8 and 12)


def floor_packed(rig: Rig, rounds: int, *, kind: str = "echo") -> int:
    """Chains of one readable and one writable descriptor (echo, copy, batch) or one indirect
    descriptor (blk); used descriptors written id/len first, flags last."""
    mem, base, desc = rig.mem, rig.base, rig.desc_off
    unpack_d, pack_lid, pack_h = _D.unpack_from, _LEN_ID.pack_into, _H.pack_into
    size = rig.size
    buf = page_buffer(65536) if kind == "copy" else memoryview(bytearray(64))
    data = bytes(14 * 512)
    pos = used = n = 0
    wrap = uwrap = True
    notifier = rig.notifier
    for _ in range(rounds):
        rig.kick(QSIZE)
        while True:
            at = desc + 16 * pos
            addr, ln, bid, fl = unpack_d(mem, at)
            if bool(fl & 0x80) != wrap or bool(fl & 0x8000) == wrap:
                break
            if kind == "blk":
                table = addr - base
                written = 0
                for i in range(ln >> 4):
                    baddr, blen, _id, _bfl = unpack_d(mem, table + 16 * i)
                    off = baddr - base
                    if i == 0:
                        continue  # the header, read by the device as a record
                    if i <= 14:
                        mem[off : off + blen] = data[(i - 1) * 512 : i * 512]
                    else:
                        mem[off] = 0
                    written += blen
                slots = 1
            else:
                off = addr - base
                buf[:ln] = mem[off : off + ln]
                waddr, wln, wid, _wfl = unpack_d(mem, at + 16)
                off = waddr - base
                mem[off : off + wln] = buf[:wln]
                written, bid, slots = wln, wid, 2
            u = desc + 16 * used
            pack_lid(mem, u + 8, written, bid)
            flags = (0x8080 if uwrap else 0) | (0x0002 if written else 0)  # WRITE: bytes written
            pack_h(mem, u + 14, flags)
            used += slots
            pos += slots
            if pos >= size:
                pos -= size
                wrap = not wrap
            if used >= size:
                used -= size
                uwrap = not uwrap
            n += 1
        if kind == "batch":
            notifier.notify()
    return n


def naive_packed(rig: Rig, rounds: int, *, kind: str = "echo") -> int:
    """The packed loop with every descriptor parsed and every used descriptor built by Construct."""
    mem, base, desc = rig.mem, rig.base, rig.desc_off
    size = rig.size
    pos = used = n = 0
    wrap = uwrap = True
    for _ in range(rounds):
        rig.kick(QSIZE)
        while True:
            at = desc + 16 * pos
            d = PackedDescriptor.parse(mem[at : at + 16])
            if bool(d.flags & 0x80) != wrap or bool(d.flags & 0x8000) == wrap:
                break
            if kind == "blk":
                table = d.addr - base
                written = 0
                for i in range(d.len >> 4):
                    e = PackedDescriptor.parse(mem[table + 16 * i : table + 16 * i + 16])
                    off = e.addr - base
                    if i == 0:
                        VirtioBlkReqHdr.parse(mem[off : off + 16])
                        continue
                    mem[off : off + e.len] = bytes(e.len)
                    written += e.len
                bid, slots = d.id, 1
            else:
                data = construct.Bytes(d.len).parse(mem[d.addr - base : d.addr - base + d.len])
                w = PackedDescriptor.parse(mem[at + 16 : at + 32])
                mem[w.addr - base : w.addr - base + w.len] = construct.Bytes(w.len).build(
                    (data * (w.len // len(data) + 1))[: w.len]
                )
                written, bid, slots = w.len, w.id, 2
            u = desc + 16 * used
            flags = (0x8080 if uwrap else 0) | (0x0002 if written else 0)  # WRITE: bytes written
            mem[u + 8 : u + 16] = PackedDescriptor.build(  # addr is not the device's to write
                {"addr": 0, "len": written, "id": bid, "flags": flags}
            )[8:]
            used += slots
            pos += slots
            if pos >= size:
                pos -= size
                wrap = not wrap
            if used >= size:
                used -= size
                uwrap = not uwrap
            n += 1
    return n


# --- the naive version: every access parsed or built with Construct ------------------------------

_U16C = construct.Int16ul


def naive_echo(rig: Rig, rounds: int, *, batch: bool = False) -> int:
    mem, base = rig.mem, rig.base
    desc, av, us = rig.desc_off, rig.avail_off, rig.used_off
    last = used = n = 0
    notifier = rig.notifier
    for _ in range(rounds):
        rig.kick(QSIZE)
        idx = _U16C.parse(mem[av + 2 : av + 4])
        while last != idx:
            head = _U16C.parse(mem[av + 4 + 2 * (last % rig.size) : av + 6 + 2 * (last % rig.size)])
            last = (last + 1) & 0xFFFF
            d = Descriptor.parse(mem[desc + 16 * head : desc + 16 * head + 16])
            data = bytes(mem[d.addr - base : d.addr - base + d.len])
            w = Descriptor.parse(mem[desc + 16 * d.next : desc + 16 * d.next + 16])
            mem[w.addr - base : w.addr - base + len(data)] = data
            slot = us + 4 + 8 * (used % rig.size)
            mem[slot : slot + 8] = UsedElem.build({"id": head, "len": len(data)})
            used = (used + 1) & 0xFFFF
            if not batch:
                mem[us + 2 : us + 4] = _U16C.build(used)
            n += 1
        if batch:
            mem[us + 2 : us + 4] = _U16C.build(used)
            notifier.notify()
    return n


def naive_blk(rig: Rig, rounds: int) -> int:
    mem, base = rig.mem, rig.base
    desc, av, us = rig.desc_off, rig.avail_off, rig.used_off
    data = bytes(14 * 512)
    last = used = n = 0
    for _ in range(rounds):
        rig.kick(QSIZE)
        idx = _U16C.parse(mem[av + 2 : av + 4])
        while last != idx:
            head = _U16C.parse(mem[av + 4 + 2 * (last % rig.size) : av + 6 + 2 * (last % rig.size)])
            last = (last + 1) & 0xFFFF
            t = Descriptor.parse(mem[desc + 16 * head : desc + 16 * head + 16])
            table = t.addr - base
            i, pos, written = 0, 0, 0
            while True:
                d = Descriptor.parse(mem[table + 16 * i : table + 16 * i + 16])
                off = d.addr - base
                if i == 0:
                    VirtioBlkReqHdr.parse(mem[off : off + 16])
                elif pos < len(data):
                    mem[off : off + d.len] = data[pos : pos + d.len]
                    pos += d.len
                    written += d.len
                else:
                    mem[off] = 0
                    written += 1
                if not d.flags & DescFlags.NEXT:
                    break
                i = d.next
            slot = us + 4 + 8 * (used % rig.size)
            mem[slot : slot + 8] = UsedElem.build({"id": head, "len": written})
            used = (used + 1) & 0xFFFF
            mem[us + 2 : us + 4] = _U16C.build(used)
            n += 1
    return n


def naive_copy(rig: Rig, rounds: int) -> int:
    mem, base = rig.mem, rig.base
    desc, av, us = rig.desc_off, rig.avail_off, rig.used_off
    last = used = n = 0
    for _ in range(rounds):
        rig.kick(QSIZE)
        idx = _U16C.parse(mem[av + 2 : av + 4])
        while last != idx:
            head = _U16C.parse(mem[av + 4 + 2 * (last % rig.size) : av + 6 + 2 * (last % rig.size)])
            last = (last + 1) & 0xFFFF
            d = Descriptor.parse(mem[desc + 16 * head : desc + 16 * head + 16])
            data = construct.Bytes(d.len).parse(mem[d.addr - base : d.addr - base + d.len])
            w = Descriptor.parse(mem[desc + 16 * d.next : desc + 16 * d.next + 16])
            mem[w.addr - base : w.addr - base + w.len] = construct.Bytes(w.len).build(data)
            slot = us + 4 + 8 * (used % rig.size)
            mem[slot : slot + 8] = UsedElem.build({"id": head, "len": w.len})
            used = (used + 1) & 0xFFFF
            mem[us + 2 : us + 4] = _U16C.build(used)
            n += 1
    return n


def _checked(kind: str, packed: bool) -> Callable[[Rig, int], int]:
    """The checked floor (``checked_floor.py``: interpreted, or compiled in the compiled child)
    of scenario ``kind`` on a rig."""

    def run(rig: Rig, rounds: int) -> int:
        serve = checked_floor.checked_packed if packed else checked_floor.checked_split
        offsets = (rig.desc_off, rig.avail_off, rig.used_off)

        def kick() -> None:
            rig.kick(QSIZE)

        notify = rig.queue.notifier.notify
        return serve(rig.mem, rig.base, offsets, rig.size, kick, notify, rounds, kind)

    return run


SCENARIOS: dict[str, dict[str, Callable[[Rig, int], int]]] = {
    "a-echo-64": {
        "library": lib_echo,
        "floor": floor_echo,
        "skeleton": skeleton_echo,
        "checked": _checked("echo", False),
        "construct": naive_echo,
    },
    "b-blk-indirect": {
        "library": lib_blk,
        "floor": floor_blk,
        "checked": _checked("blk", False),
        "construct": naive_blk,
    },
    "c-copy-64k": {
        "library": lib_copy,
        "floor": floor_copy,
        "checked": _checked("copy", False),
        "construct": naive_copy,
    },
    "d-batch-256": {
        "library": lib_batch,
        "floor": floor_batch,
        "construct": lambda rig, rounds: naive_echo(rig, rounds, batch=True),
    },
}
PACKED: dict[str, dict[str, Callable[[Rig, int], int]]] = {
    "a-echo-64": {
        "library": lib_echo,
        "floor": floor_packed,
        "checked": _checked("echo", True),
        "construct": naive_packed,
    },
    "b-blk-indirect": {
        "library": lib_blk,
        "floor": lambda rig, rounds: floor_packed(rig, rounds, kind="blk"),
        "checked": _checked("blk", True),
        "construct": lambda rig, rounds: naive_packed(rig, rounds, kind="blk"),
    },
    "c-copy-64k": {
        "library": lib_copy,
        "floor": lambda rig, rounds: floor_packed(rig, rounds, kind="copy"),
        "checked": _checked("copy", True),
        "construct": naive_packed,
    },
    "d-batch-256": {
        "library": lib_batch,
        "floor": lambda rig, rounds: floor_packed(rig, rounds, kind="batch"),
        "construct": naive_packed,
    },
}
ROUNDS = {"a-echo-64": 40, "b-blk-indirect": 12, "c-copy-64k": 4, "d-batch-256": 40}
IMPLS = ("floor", "checked", "skeleton", "library", "construct")
"""Every implementation, in the order they take turns and are printed."""


def _prefault(rig: Rig) -> None:
    """Touch every page of the rig's memory (each byte written with its own value): the pages the
    device writes first would otherwise fault in inside the timed loop, kernel time that has
    nothing to do with the implementation and that moves from run to run."""
    mem = rig.mem
    for at in range(0, len(mem), 4096):
        mem[at] = mem[at]


def measure_once(
    scenario: str, impls: Sequence[str], rounds: int, packed: bool = False
) -> dict[str, float]:
    """Seconds per chain of each implementation, one run each (a fresh rig each), taking turns."""
    table = (PACKED if packed else SCENARIOS)[scenario]
    times: dict[str, float] = {}
    for impl in impls:
        fn = table[impl]
        fn(build(scenario, packed=packed), 1)  # warm up (and check it works) on its own rig
        rig = build(scenario, packed=packed)  # the references keep their ring position locally
        _prefault(rig)
        gc.collect()
        t0 = time.perf_counter()
        n = fn(rig, rounds)
        times[impl] = (time.perf_counter() - t0) / n
    return times


def memory_check(rounds: int) -> dict[str, float]:
    """Peak traced memory of scenario a after ``rounds`` and after 10x as many (KiB)."""
    rig = build("a-echo-64")
    lib_echo(rig, 5)
    gc.collect()
    tracemalloc.start()
    lib_echo(rig, rounds)
    short = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    lib_echo(rig, rounds * 10)
    long = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"peak_kib_short": short / 1024, "peak_kib_long": long / 1024}


# --- the two variants: one child process each ------------------------------------------------------
#
# The library runs pure Python in one child (VIRTIO_SCHEMA_PURE_PYTHON=1) and compiled in the
# other; the compiled child also imports the checked floor compiled by mypyc. The parent sends both
# children the same commands in turn (one line of JSON each: one repeat of one scenario, the
# implementations taking turns within it) and takes the medians, so the two variants are measured
# in the same run, alternately, as the implementations are within each child.

VARIANTS = ("pure", "compiled")
VARIANT_ENV = "VIRTIO_SCHEMA_BENCH_VARIANT"  # the variant a child must be running
FLOOR_ENV = "VIRTIO_SCHEMA_BENCH_FLOOR"  # where the compiled checked floor is, in that child
COMMAND_ENV = "VIRTIO_SCHEMA_BENCH_COMMAND"  # the parent's command line (relative to bench/)
ROOT = HERE.parent
FLOOR_CACHE = ROOT / "build" / "bench-mypyc"


def compile_checked_floor() -> Path:
    """The directory holding ``checked_floor`` compiled by mypyc (compiled first unless this
    source was, with this Python and mypy: the directory is named by their hash)."""
    import mypy.version

    source = HERE / "checked_floor.py"
    digest = hashlib.sha256(source.read_bytes())
    digest.update(f"{sys.version}\0{mypy.version.__version__}".encode())
    out = FLOOR_CACHE / digest.hexdigest()[:20]
    if any(out.glob("checked_floor*.so")):
        return out
    print(f"compiling the checked floor with mypyc into {out} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="checked-floor-") as work:
        shutil.copy2(source, work)
        setup = (
            "from mypyc.build import mypycify; from setuptools import setup; "
            "setup(name='checked_floor', ext_modules=mypycify(['checked_floor.py'], opt_level='3'),"
            " script_args=['build_ext', '--inplace'])"
        )
        done = subprocess.run(
            [sys.executable, "-c", setup], cwd=work, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"mypyc could not compile checked_floor.py:\n{done.stderr[-3000:]}")
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for built in Path(work).glob("*.so"):
            shutil.copy2(built, partial)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    return out


def variant_env(variant: str, command: str) -> dict[str, str]:
    """The environment of a child that runs ``variant`` of the library (compiled: with the
    compiled checked floor, compiled first if need be); ``command`` is the benchmark's command
    line, for the message of a child that cannot run its variant."""
    env = dict(os.environ)
    env[VARIANT_ENV] = variant
    env[COMMAND_ENV] = command
    env.pop(FLOOR_ENV, None)
    if variant == "pure":
        env[PURE_PYTHON_ENV] = "1"
    else:
        env.pop(PURE_PYTHON_ENV, None)
        env[FLOOR_ENV] = str(compile_checked_floor())
    return env


def not_compiled(command: str) -> SystemExit:
    """The one-line error of a run that asked for the compiled kernel where it is not importable."""
    return SystemExit(
        "the compiled kernel is not importable here (virtio_schema.COMPILED is False): run the"
        f" benchmark as `python3 dev.py bench {command}`, which compiles the kernel and puts it"
        " in the tree for the run (or use --variant pure)"
    )


def check_variant() -> None:
    """In a child: stop with one line if the library (or the checked floor) is not the variant
    the parent asked for."""
    want = os.environ.get(VARIANT_ENV)
    if want is None:
        return
    import virtio_schema

    if want == "compiled" and not virtio_schema.COMPILED:
        raise not_compiled(os.environ.get(COMMAND_ENV, "bench_queue.py"))
    if want == "pure" and virtio_schema.COMPILED:
        raise SystemExit(f"{PURE_PYTHON_ENV}=1 did not force the pure-Python kernel")
    floor_compiled = str(checked_floor.__file__).endswith(".so")
    if floor_compiled != (want == "compiled"):
        raise SystemExit(f"the checked floor is not the {want} one: {checked_floor.__file__}")


@contextlib.contextmanager
def backend_variant(variant: str, command: str) -> Iterator[None]:
    """``os.environ`` set, for the block, so that a back-end process started in it (inheriting
    the environment) runs ``variant`` of the library: the compiled one must be importable here
    (the child finds the package where this process does)."""
    import virtio_schema

    if variant == "compiled" and not virtio_schema.COMPILED:
        raise not_compiled(command)
    saved = os.environ.get(PURE_PYTHON_ENV)
    if variant == "pure":
        os.environ[PURE_PYTHON_ENV] = "1"
    else:
        os.environ.pop(PURE_PYTHON_ENV, None)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(PURE_PYTHON_ENV, None)
        else:
            os.environ[PURE_PYTHON_ENV] = saved


class Child:
    """A child process running one variant, serving one command (a line of JSON) at a time."""

    def __init__(self, variant: str, command: str) -> None:
        self.variant = variant
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child"]
        self.proc = subprocess.Popen(
            cmd,
            env=variant_env(variant, command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, **command: object) -> dict[str, float]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise SystemExit(f"the {self.variant} child stopped (exit status {rc}); see above")
        answer: dict[str, float] = json.loads(line)
        return answer

    def close(self) -> None:
        """End the child (its end of the pipe closes) and wait for it."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def child_main() -> int:
    """Serve the parent's commands (one line of JSON each) until its end of the pipe closes."""
    check_variant()
    for line in sys.stdin:
        command = json.loads(line)
        if command["what"] == "memory":
            answer = memory_check(command["rounds"])
        else:
            answer = measure_once(
                command["scenario"], command["impls"], command["rounds"], command["packed"]
            )
        print(json.dumps(answer), flush=True)
    return 0


Figures = dict[str, dict[str, float]]
"""Per variant: each implementation's median ns per chain (``<impl>_ns``) and the ratios."""


def measure_variants(
    children: Sequence[Child], scenario: str, impls: Sequence[str], rounds: int, repeats: int,
    packed: bool,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Median seconds per chain of each implementation in each variant: the children take turns
    (the first one alternating from repeat to repeat), the implementations take turns in each."""
    times: dict[str, dict[str, list[float]]] = {
        c.variant: {impl: [] for impl in impls} for c in children
    }
    for rep in range(repeats):
        order = children if rep % 2 == 0 else list(reversed(children))
        for child in order:
            got = child.ask(what="measure", scenario=scenario, impls=list(impls), rounds=rounds,
                            packed=packed)  # fmt: skip
            for impl, t in got.items():
                times[child.variant][impl].append(t)
    return {v: {impl: statistics.median(t) for impl, t in per.items()} for v, per in times.items()}


def figures_of(per: dict[str, float], payload: int) -> dict[str, float]:
    """One variant's figures of one scenario: ns per chain, MB/s and the ratios to the floor."""
    out = {f"{impl}_ns": t * 1e9 for impl, t in per.items()}
    out["lib_over_floor"] = per["library"] / per["floor"]
    out["library_mb_s"] = payload / per["library"] / 1e6
    out["floor_mb_s"] = payload / per["floor"] / 1e6
    out["construct_over_lib"] = per["construct"] / per["library"]
    if "checked" in per:
        out["checked_over_floor"] = per["checked"] / per["floor"]
        out["lib_over_checked"] = per["library"] / per["checked"]
    if "skeleton" in per:
        out["lib_over_skeleton"] = per["library"] / per["skeleton"]
    return out


def _print_header(variants: Sequence[str]) -> None:
    cols = "".join(f"{v + ' ns':>12}{'MB/s':>9}{'x floor':>9}" for v in variants)
    print(f"{'ring scenario':<23}{'impl':<11}{cols}")


def _print_rows(
    key: str, impls: Sequence[str], per: dict[str, dict[str, float]], payload: int
) -> None:
    for impl in impls:
        cols = ""
        for times in per.values():
            t = times[impl]
            ratio = f"{t / times['floor']:.2f}" if impl != "floor" else ""
            cols += f"{t * 1e9:>12.0f}{payload / t / 1e6:>9.1f}{ratio:>9}"
        print(f"{key.replace('/', ' '):<23}{impl:<11}{cols}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--scenario", action="append", default=None)
    p.add_argument("--format", choices=["split", "packed", "both"], default="both")
    p.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    p.add_argument(
        "--plot", default=None, metavar="FILE.svg", help="also draw the table as a bar chart"
    )
    args = p.parse_args(argv)
    if args.plot is not None and not Path(args.plot).resolve().parent.is_dir():
        p.error(f"--plot: no directory for {args.plot}")
    repeats = args.repeats or (3 if args.quick else 7)
    scale = 0.25 if args.quick else 1.0
    variants = list(VARIANTS) if args.variant == "both" else [args.variant]
    command = " ".join(["bench_queue.py", *argv])
    children = [Child(v, command) for v in variants]
    bars: list[Bar] = []  # ns per chain of every row of the table, for --plot
    try:
        results: dict[str, Figures] = {}
        names = args.scenario or list(SCENARIOS)
        _print_header(variants)
        formats = {"split": [False], "packed": [True], "both": [False, True]}[args.format]
        for packed in formats:
            for name in names:
                rounds = max(1, int(ROUNDS[name] * scale))
                table = (PACKED if packed else SCENARIOS)[name]
                impls = [i for i in IMPLS if i in table]
                per = measure_variants(children, name, impls, rounds, repeats, packed)
                key = f"{'packed' if packed else 'split'}/{name}"
                results[key] = {v: figures_of(t, PAYLOAD[name]) for v, t in per.items()}
                _print_rows(key, impls, per, PAYLOAD[name])
                bars += [Bar(f"{key.replace('/', ' ')} {impl}", times[impl] * 1e9, variant)
                         for impl in impls for variant, times in per.items()]  # fmt: skip
        rounds = int(20 * scale) or 1
        mem = {c.variant: c.ask(what="memory", rounds=rounds) for c in children}
    finally:
        for child in children:
            child.close()
    for variant, m in mem.items():
        print(
            f"memory ({variant}): peak {m['peak_kib_short']:.0f} KiB after {rounds} rounds of"
            f" {QSIZE}, {m['peak_kib_long']:.0f} KiB after 10x as many"
        )
    targets = check_targets(results, mem)
    print("targets of issue 19 (reported, never asserted):")
    for t in targets:
        print(f"  {'met    ' if t['met'] else 'not met'} {t['target']}: {t['measured']}")
    if args.json:
        with open(args.json, "w") as f:
            doc = {"scenarios": results, "memory": mem, "queue_size": QSIZE, "targets": targets}
            json.dump(doc, f, indent=2)
    if args.plot:
        write_plot(args.plot, f"bench_queue.py: ns per chain, {QSIZE} chains per round"
                   " (lower is better)", "ns", bars)  # fmt: skip
    return 0


Target = dict[str, str | bool]
"""One of the issue's targets: ``target`` (what), ``measured`` (this run's figure), ``met``."""


def _target(target: str, measured: str, met: bool) -> Target:
    return {"target": target, "measured": measured, "met": met}


# compiled library / interpreted floor, at most (c: throughput share, at least)
TIME_TARGETS = {"a-echo-64": 1.0, "b-blk-indirect": 0.8, "d-batch-256": 1.0}
THROUGHPUT_TARGET = 0.95


def check_targets(results: dict[str, Figures], mem: dict[str, dict[str, float]]) -> list[Target]:
    """Issue 19's timed targets against this run's figures, for the compiled library (the pure
    variant's target is in instructions, ``instructions.py``): a and d at most 1.0x the
    interpreted floor's time, b at most 0.8x, c at least 95% of its throughput; each with the
    compiled checked floor's figure beside it (the limit: the same checks with no API). Then a
    flat memory peak in each variant (the long run's within 25% + 1 KiB of the short run's)."""
    out: list[Target] = []
    for key, per in results.items():
        r = per.get("compiled")
        if r is None:
            continue
        scenario = key.split("/")[1]
        checked = r.get("checked_over_floor")
        vs = r.get("lib_over_checked")
        if checked is None or vs is None:
            checked = vs = 0.0
        if scenario in TIME_TARGETS:
            bound = TIME_TARGETS[scenario]
            ratio = r["lib_over_floor"]
            why = (
                f" (compiled checked floor {checked:.2f}x; library/checked {vs:.2f})" if vs else ""
            )
            out.append(_target(f"{key} compiled <= {bound:.1f}x floor", f"{ratio:.2f}x{why}",
                               ratio <= bound))  # fmt: skip
        else:
            share = r["library_mb_s"] / r["floor_mb_s"]
            why = (
                f" (compiled checked floor {1 / checked:.0%}; library/checked {vs:.2f})"
                if checked
                else ""
            )
            out.append(_target(f"{key} compiled >= {THROUGHPUT_TARGET:.0%} of floor throughput",
                               f"{share:.0%}{why}", share >= THROUGHPUT_TARGET))  # fmt: skip
    for variant, m in mem.items():
        short, long = m["peak_kib_short"], m["peak_kib_long"]
        flat = long <= short * 1.25 + 1
        out.append(_target(f"memory peak flat ({variant})", f"{short:.0f} -> {long:.0f} KiB", flat))
    return out


if __name__ == "__main__":
    sys.exit(main())
