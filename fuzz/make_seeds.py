#!/usr/bin/env python3
"""Write the seed corpus of the queue fuzz target (fuzz/corpus/queue/): well-formed and malformed
rings in the harness's memory layout, each followed by a sequence of device operations.

    python fuzz/make_seeds.py

Input format (see virtio_schema.testing.fuzz): size selector, feature flags, next_avail, next_used,
8 KiB of memory at MEM_BASE (descriptor table at +0x0, avail ring at +0x100, used ring at +0x200,
buffers from +0x400), then operations.
"""

from __future__ import annotations

import struct
from pathlib import Path

from virtio_schema.testing.fuzz import AVAIL_OFF, DESC_OFF, MEM_BASE, MEM_SIZE

OUT = Path(__file__).resolve().parent / "corpus" / "queue"
NEXT, WRITE, INDIRECT = 1, 2, 4


def desc(mem: bytearray, base: int, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
    struct.pack_into("<QLHH", mem, base + 16 * i, addr, length, flags, nxt)


def avail(mem: bytearray, size: int, start: int, heads: list[int]) -> None:
    for k, h in enumerate(heads):
        struct.pack_into("<H", mem, AVAIL_OFF + 4 + 2 * ((start + k) % size), h)
    struct.pack_into("<H", mem, AVAIL_OFF + 2, (start + len(heads)) & 0xFFFF)


def case(size_sel: int, flags: int, start: int, mem: bytearray, ops: bytes) -> bytes:
    return bytes([size_sel, flags]) + struct.pack("<HH", start, start) + bytes(mem) + ops


def b(addr_off: int) -> int:
    return MEM_BASE + addr_off


POP, READ, WRITE_OP, RET, WITH, NOTIF, POKE, RESET = 0, 3, 4, 5, 6, 7, 8, 9


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, bytes] = {}
    ops_serve = bytes(
        [POP, POP, POP, READ, 0, 1, READ, 1, 0, 40, WRITE_OP, 0, 16, *b"x" * 16,
         RET, 1, 0x10, 0, WITH, 0, RET, 0, 1, 0, NOTIF, 0, POP, NOTIF, 1, POP]
    )  # fmt: skip
    # 1. direct + indirect + single-writable chains, size 8, indirect + event idx
    for name, start in (("basic", 0), ("wrap", 0xFFFE)):
        mem = bytearray(MEM_SIZE)
        desc(mem, DESC_OFF, 0, b(0x400), 16, NEXT, 1)
        desc(mem, DESC_OFF, 1, b(0x500), 512, WRITE | NEXT, 2)
        desc(mem, DESC_OFF, 2, b(0x700), 1, WRITE, 0)
        desc(mem, DESC_OFF, 3, b(0x800), 48, INDIRECT, 0)
        desc(mem, 0x800, 0, b(0x900), 16, NEXT, 1)
        desc(mem, 0x800, 1, b(0xA00), 256, WRITE | NEXT, 2)
        desc(mem, 0x800, 2, b(0xB00), 1, WRITE, 0)
        desc(mem, DESC_OFF, 4, b(0xC00), 64, WRITE, 0)
        avail(mem, 8, start, [0, 3, 4])
        seeds[f"split-{name}"] = case(3, 3, start, mem, ops_serve)
    # 2. malformed chains: loop, readable after writable, bad next, nested indirect
    mem = bytearray(MEM_SIZE)
    desc(mem, DESC_OFF, 0, b(0x400), 8, NEXT, 1)
    desc(mem, DESC_OFF, 1, b(0x408), 8, NEXT, 0)  # loop 0 -> 1 -> 0
    desc(mem, DESC_OFF, 2, b(0x500), 8, WRITE | NEXT, 3)
    desc(mem, DESC_OFF, 3, b(0x508), 8, 0, 0)  # readable after writable
    desc(mem, DESC_OFF, 4, b(0x600), 8, NEXT, 200)  # next out of range
    desc(mem, DESC_OFF, 5, b(0x800), 32, INDIRECT, 0)
    desc(mem, 0x800, 0, b(0x900), 16, INDIRECT, 0)  # nested indirect
    avail(mem, 8, 0, [0, 2, 4, 5])
    seeds["split-malformed"] = case(
        3, 1, 0, mem, bytes([POP, POP, POP, POP, RET, 0, 0, 0, WITH, 0, WITH, 0, WITH, 0])
    )
    # 3. an avail index jump (ring-level: the queue latches broken) then a reset
    mem = bytearray(MEM_SIZE)
    desc(mem, DESC_OFF, 0, b(0x400), 8, WRITE, 0)
    avail(mem, 4, 0, [0])
    struct.pack_into("<H", mem, AVAIL_OFF + 2, 100)
    seeds["split-jump"] = case(2, 0, 0, mem, bytes([POP, POP, RESET, 1, POKE, 2, 1, 2, 1, 0, POP]))
    # 4. packed rings (flags bit 4): size 5, a chain straddling the ring's end, an indirect chain
    av, us = 1 << 7, 1 << 15
    mem = bytearray(MEM_SIZE)

    def pdesc(i: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        struct.pack_into("<QLHH", mem, DESC_OFF + 16 * i, addr, length, buf_id, flags)

    # ring positions 3, 4 (lap 1: AVAIL set) then 0 (lap 2 after the wrap: USED set, AVAIL clear)
    pdesc(3, b(0x400), 16, 0, av | NEXT)
    pdesc(4, b(0x500), 64, 0, av | WRITE | NEXT)
    pdesc(0, b(0x600), 1, 4, us | WRITE)
    # start state: avail at 3 (wrap 1), used at 3 (wrap 1); then one indirect chain at slot 1
    struct.pack_into("<QLHH", mem, 0x800, b(0x900), 16, 0, 0)
    struct.pack_into("<QLHH", mem, 0x810, b(0xA00), 32, 0, WRITE)
    pdesc(1, b(0x800), 32, 2, us | INDIRECT)
    ops_packed = bytes([POP, POP, READ, 0, 1, WRITE_OP, 1, 8, *b"y" * 8, RET, 0, 1, 0, WITH, 0,
                        POP, NOTIF, 0, POP, 10, 11])  # fmt: skip
    seeds["packed-wrap-indirect"] = (
        bytes([4, 4 | 1 | 2]) + struct.pack("<HH", 3, 3) + bytes(mem) + ops_packed
    )
    seeds["packed-in-order-batch"] = (
        bytes([4, 4 | 1 | 8]) + struct.pack("<HH", 3, 3) + bytes(mem) + bytes([POP, POP, 10, POP])
    )
    # regression: the queue breaks (an avail index jump) while the device holds a chain, then the
    # device writes into that chain: before the fix the write reached guest memory
    base = seeds["split-basic"][: 6 + MEM_SIZE]
    jump = bytes([POKE]) + struct.pack("<HB", AVAIL_OFF + 2, 2) + bytes([100, 0])  # avail.idx = 100
    regressions = {
        "chain-write-after-queue-broke": base + bytes([POP, *jump, POP, WRITE_OP, 0, 8, *b"z" * 8])
    }
    for name, data in regressions.items():
        (OUT.parent.parent / "regressions" / f"{name}.bin").write_bytes(data)
    for name, data in seeds.items():
        (OUT / f"{name}.bin").write_bytes(data)
    print(f"wrote {len(seeds)} seeds to {OUT}")


if __name__ == "__main__":
    main()
