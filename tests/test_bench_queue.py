"""The hot-path benchmark measures equal work: every reference implementation of every scenario
(the hand-written floor, the API skeleton, the Construct-per-access version) leaves guest memory
exactly as the library does, chain for chain. Speed is never asserted here (a shared, noisy
machine); only that the comparison is honest and that the script runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import mmap
import struct
from collections.abc import Callable
from pathlib import Path

import bench_queue
import checked_floor
import pytest

import virtio_schema
from virtio_schema.chain import ReadableChain
from virtio_schema.errors import DriverError
from virtio_schema.queue import (
    AvailIndexJump,
    BufferAddressOverflow,
    BufferIdOutOfRange,
    ChainLengthOverflow,
    ChainNeverEnds,
    ChainTooLong,
    DescIndexOutOfRange,
    HeadOutOfRange,
    IndirectWithNext,
    InvalidIndirectLength,
    NestedIndirect,
    QueueBroken,
    ReadableAfterWritable,
    UnmappedBuffer,
    UnmappedIndirectTable,
)
from virtio_schema.records import BLK_REQ_HDR

ROUNDS = 3

Impl = Callable[[bench_queue.Rig, int], int]


def _table(packed: bool) -> dict[str, dict[str, Impl]]:
    return bench_queue.PACKED if packed else bench_queue.SCENARIOS


CASES = [
    pytest.param(packed, name, impl, id=f"{'packed' if packed else 'split'}-{name}-{impl}")
    for packed in (False, True)
    for name, impls in _table(packed).items()
    for impl in impls
    if impl != "library"
]


@functools.cache
def _run(packed: bool, name: str, impl: str | None) -> tuple[int, str]:
    """Chains served and a digest of the whole guest memory after ``ROUNDS`` rounds of ``impl``
    on a fresh rig (``None``: no round at all, the rig as built)."""
    rig = bench_queue.build(name, packed=packed)
    n = 0 if impl is None else _table(packed)[name][impl](rig, ROUNDS)
    return n, hashlib.sha256(rig.mem).hexdigest()


@pytest.mark.parametrize(("packed", "name", "impl"), CASES)
def test_a_reference_leaves_guest_memory_as_the_library_does(
    packed: bool, name: str, impl: str
) -> None:
    served, digest = _run(packed, name, "library")
    assert served == ROUNDS * bench_queue.QSIZE
    assert digest != _run(packed, name, None)[1], "the library changed nothing: nothing to compare"
    assert _run(packed, name, impl) == (served, digest)


def test_the_script_prints_its_table_and_targets_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One repeat of scenario a in a child process running the variant this pass runs (the
    compiled one imports the checked floor compiled by mypyc, compiled first if need be)."""
    variant = "compiled" if virtio_schema.COMPILED else "pure"
    out = tmp_path / "bench.json"
    args = ["--quick", "--repeats", "1", "--format", "split", "--scenario", "a-echo-64"]
    assert bench_queue.main([*args, "--variant", variant, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{variant} ns" in printed
    assert "split a-echo-64        library" in printed
    doc = json.loads(out.read_text())
    figures = doc["scenarios"]["split/a-echo-64"][variant]
    assert figures["library_ns"] > 0
    assert figures["floor_ns"] > 0
    assert figures["checked_ns"] > 0
    assert figures["lib_over_floor"] == pytest.approx(figures["library_ns"] / figures["floor_ns"])
    kinds = {t["target"] for t in doc["targets"]}
    expected = {f"memory peak flat ({variant})"}
    if variant == "compiled":
        assert "split/a-echo-64 compiled <= 1.0x floor" in printed
        expected.add("split/a-echo-64 compiled <= 1.0x floor")
    assert kinds == expected
    assert all(isinstance(t["met"], bool) for t in doc["targets"])


def test_a_child_that_cannot_run_its_variant_says_how_to_run_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compiled child where the kernel runs interpreted: one line naming ``dev.py bench``."""
    if virtio_schema.COMPILED:
        pytest.skip("the compiled kernel is importable here")
    monkeypatch.setenv(bench_queue.VARIANT_ENV, "compiled")
    monkeypatch.setenv(bench_queue.COMMAND_ENV, "bench_queue.py --quick")
    with pytest.raises(SystemExit, match=r"python3 dev\.py bench bench_queue\.py --quick"):
        bench_queue.check_variant()


# --- the checked floor rejects what the library rejects ------------------------------------------
#
# The checked floor claims to make every check the library makes on these chains, so that its
# figure is what validation alone costs. Each malformed ring below is one the library refuses; the
# checked floor must refuse it too.

_DESC = struct.Struct("<QLHH")
_U16 = struct.Struct("<H")


def _head(rig: bench_queue.Rig) -> int:
    """The offset in the rig's memory of the first chain's head descriptor."""
    head: int = _U16.unpack_from(rig.mem, rig.avail_off + 4)[0]
    return rig.desc_off + 16 * head


def _edit(rig: bench_queue.Rig, at: int, **fields: int) -> None:
    """Rewrite fields (addr, len, flags, next) of the descriptor at offset ``at``."""
    rec = dict(zip(("addr", "len", "flags", "next"), _DESC.unpack_from(rig.mem, at), strict=True))
    rec.update(fields)
    _DESC.pack_into(rig.mem, at, rec["addr"], rec["len"], rec["flags"], rec["next"])


def _indirect_table(rig: bench_queue.Rig) -> int:
    """The offset of the first chain's indirect table (scenario b)."""
    at = _head(rig)
    addr: int = _DESC.unpack_from(rig.mem, at)[0]
    return addr - rig.base


def _corrupt(rig: bench_queue.Rig, kind: str) -> None:
    """Make the first chain (or the ring) malformed in the way ``kind`` names."""
    at = _head(rig)
    second = rig.desc_off + 16 * (_DESC.unpack_from(rig.mem, at)[3])
    end = rig.base + len(rig.mem)
    match kind:
        case "head out of range":
            _U16.pack_into(rig.mem, rig.avail_off + 4, rig.size)
        case "avail index jump":
            _U16.pack_into(rig.mem, rig.avail_off + 2, rig.size + 1)
        case "next out of range":
            _edit(rig, at, next=rig.size)
        case "readable after writable":
            _edit(rig, at, flags=NEXT | WRITE)
            _edit(rig, second, flags=0)
        case "unmapped buffer":
            _edit(rig, at, addr=end)
        case "buffer past 2**64":
            _edit(rig, at, addr=(1 << 64) - 8)
        case "chain loops":
            _edit(rig, second, flags=NEXT | WRITE, next=(second - rig.desc_off) // 16)
        case "chain longer than 4 GiB":
            _edit(rig, at, len=0xFFFFFFFF)
            _edit(rig, second, len=0xFFFFFFFF)
        case "indirect with next":
            _edit(rig, at, flags=INDIRECT | NEXT)
        case "indirect length":
            _edit(rig, at, len=24)
        case "empty indirect table":
            _edit(rig, at, len=0)
        case "unmapped indirect table":
            _edit(rig, at, addr=end)
        case "nested indirect":
            _edit(rig, _indirect_table(rig), flags=INDIRECT)
        case "next out of range in the table":
            _edit(rig, _indirect_table(rig), next=16)
        case _:
            raise AssertionError(kind)


def _edit_packed(rig: bench_queue.Rig, slot: int, **fields: int) -> None:
    """Rewrite fields (addr, len, id, flags) of ring slot ``slot`` in both lap images the packed
    rig re-arms the ring from (``flags`` gives the chain bits: each lap keeps its AVAIL/USED)."""
    images = []
    for image in rig.laps:
        img = bytearray(image)
        names = ("addr", "len", "id", "flags")
        rec = dict(zip(names, _DESC.unpack_from(img, 16 * slot), strict=True))
        wrap_bits = rec["flags"] & 0x8080
        rec.update(fields)
        rec["flags"] |= wrap_bits
        _DESC.pack_into(img, 16 * slot, rec["addr"], rec["len"], rec["id"], rec["flags"])
        images.append(bytes(img))
    rig.laps = (images[0], images[1])


def _corrupt_packed(rig: bench_queue.Rig, kind: str) -> None:
    """Make the packed ring's first chain (slot 0; echo: slots 0 and 1) malformed."""
    end = rig.base + len(rig.mem)
    match kind:
        case "readable after writable":
            _edit_packed(rig, 0, flags=NEXT | WRITE)
            _edit_packed(rig, 1, flags=0)
        case "unmapped buffer":
            _edit_packed(rig, 0, addr=end)
        case "buffer past 2**64":
            _edit_packed(rig, 0, addr=(1 << 64) - 8)
        case "chain longer than 4 GiB":
            _edit_packed(rig, 0, len=0xFFFFFFFF)
            _edit_packed(rig, 1, len=0xFFFFFFFF)
        case "buffer id out of range (echo)":
            _edit_packed(rig, 1, id=rig.size)
        case "buffer id out of range (blk)":
            _edit_packed(rig, 0, id=rig.size)
        case "chain never ends":
            for slot in range(rig.size):
                flags = _DESC.unpack_from(rig.laps[0], 16 * slot)[3]
                _edit_packed(rig, slot, flags=(flags & 0x7F7F) | NEXT)
        case "indirect with next":
            _edit_packed(rig, 0, flags=INDIRECT | NEXT)
        case "indirect length":
            _edit_packed(rig, 0, len=24)
        case "empty indirect table":
            _edit_packed(rig, 0, len=0)
        case "unmapped indirect table":
            _edit_packed(rig, 0, addr=end)
        case "nested indirect":  # a packed table's entries hold (addr, len, id, flags)
            table = _DESC.unpack_from(rig.laps[0], 0)[0] - rig.base
            addr, length, buf_id, _flags = _DESC.unpack_from(rig.mem, table)
            _DESC.pack_into(rig.mem, table, addr, length, buf_id, INDIRECT)
        case _:
            raise AssertionError(kind)


NEXT, WRITE, INDIRECT = 1, 2, 4
# each malformed ring: the library's error, and the checked floor's reason
ECHO_KINDS: dict[str, tuple[type[DriverError], str]] = {
    "head out of range": (HeadOutOfRange, "head out of range"),
    "avail index jump": (AvailIndexJump, "avail index jump"),
    "next out of range": (DescIndexOutOfRange, "next out of range"),
    "readable after writable": (ReadableAfterWritable, "readable after writable"),
    "unmapped buffer": (UnmappedBuffer, "unmapped buffer"),
    "buffer past 2**64": (BufferAddressOverflow, "buffer past 2"),
    "chain loops": (ChainTooLong, "chain too long"),
    "chain longer than 4 GiB": (ChainLengthOverflow, "chain longer than 4 GiB"),
}
BLK_KINDS: dict[str, tuple[type[DriverError], str]] = {
    "head out of range": (HeadOutOfRange, "head out of range"),
    "avail index jump": (AvailIndexJump, "avail index jump"),
    "indirect with next": (IndirectWithNext, "indirect with next"),
    "indirect length": (InvalidIndirectLength, "indirect table length"),
    "empty indirect table": (InvalidIndirectLength, "indirect table length"),
    "unmapped indirect table": (UnmappedIndirectTable, "unmapped indirect table"),
    "nested indirect": (NestedIndirect, "nested indirect"),
    "next out of range in the table": (DescIndexOutOfRange, "next out of range"),
}
PACKED_ECHO_KINDS: dict[str, tuple[type[DriverError], str]] = {
    "readable after writable": (ReadableAfterWritable, "readable after writable"),
    "unmapped buffer": (UnmappedBuffer, "unmapped buffer"),
    "buffer past 2**64": (BufferAddressOverflow, "buffer past 2"),
    "chain longer than 4 GiB": (ChainLengthOverflow, "chain longer than 4 GiB"),
    "buffer id out of range (echo)": (BufferIdOutOfRange, "buffer id out of range"),
    "chain never ends": (ChainNeverEnds, "chain never ends"),
}
PACKED_BLK_KINDS: dict[str, tuple[type[DriverError], str]] = {
    "indirect with next": (IndirectWithNext, "indirect with next"),
    "indirect length": (InvalidIndirectLength, "indirect table length"),
    "empty indirect table": (InvalidIndirectLength, "indirect table length"),
    "unmapped indirect table": (UnmappedIndirectTable, "unmapped indirect table"),
    "nested indirect": (NestedIndirect, "nested indirect"),
    "buffer id out of range (blk)": (BufferIdOutOfRange, "buffer id out of range"),
}
REJECT_CASES = [
    *(pytest.param(False, name, kind, *why, id=f"split-{name}-{kind}")
      for name in ("a-echo-64", "c-copy-64k") for kind, why in ECHO_KINDS.items()),
    *(pytest.param(False, "b-blk-indirect", kind, *why, id=f"split-b-blk-indirect-{kind}")
      for kind, why in BLK_KINDS.items()),
    *(pytest.param(True, name, kind, *why, id=f"packed-{name}-{kind}")
      for name in ("a-echo-64", "c-copy-64k") for kind, why in PACKED_ECHO_KINDS.items()),
    *(pytest.param(True, "b-blk-indirect", kind, *why, id=f"packed-b-blk-indirect-{kind}")
      for kind, why in PACKED_BLK_KINDS.items()),
]  # fmt: skip


def _library_serves_one(rig: bench_queue.Rig, name: str) -> None:
    """One chain of scenario ``name`` through the library, as the benchmark serves it."""
    rig.kick(1)
    chain = rig.queue.next_chain()
    assert chain is not None
    with chain:
        r = ReadableChain(chain)
        if name == "b-blk-indirect":
            r.read_record(BLK_REQ_HDR)
            w = r.into_writable()
            w.write(bytes(14 * 512))
            w.write(b"\0")
        else:
            buf = bytearray(65536 if name == "c-copy-64k" else 64)
            r.readinto(buf)
            r.into_writable().write(buf)


@pytest.mark.parametrize(("packed", "name", "kind", "error", "reason"), REJECT_CASES)
def test_the_checked_floor_rejects_what_the_library_rejects(
    packed: bool, name: str, kind: str, error: type[DriverError], reason: str
) -> None:
    corrupt = _corrupt_packed if packed else _corrupt
    lib_rig = bench_queue.build(name, packed=packed)
    corrupt(lib_rig, kind)
    with pytest.raises(DriverError) as raised:
        _library_serves_one(lib_rig, name)
    got = raised.value.cause if isinstance(raised.value, QueueBroken) else raised.value
    assert type(got) is error
    rig = bench_queue.build(name, packed=packed)
    corrupt(rig, kind)
    with pytest.raises(ValueError, match=reason):
        _table(packed)[name]["checked"](rig, 1)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_the_checked_floor_serves_a_well_formed_ring(packed: bool) -> None:
    """The control for the cases above: unedited, every scenario's ring is served."""
    for name in ("a-echo-64", "b-blk-indirect", "c-copy-64k"):
        rig = bench_queue.build(name, packed=packed)
        assert _table(packed)[name]["checked"](rig, 1) == bench_queue.QSIZE


@pytest.mark.parametrize("n", [1, 4096, 65536, 65537])
def test_page_buffer_is_zeroed_writable_and_page_aligned(n: int) -> None:
    """c's implementations copy through it: its start on a page boundary is the point."""
    view = checked_floor.page_buffer(n)
    assert len(view) == n
    assert not view.readonly
    assert view.tobytes() == bytes(n)
    anchor = ctypes.c_char.from_buffer(view)
    try:
        assert ctypes.addressof(anchor) % mmap.PAGESIZE == 0
    finally:
        del anchor
