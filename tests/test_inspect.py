"""The read-only virtqueue inspector on rings built by the fake driver and dumped to a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_queue import BAD_CHAINS, BadChain, _bad_queue, _catalogue

from virtio_schema import inspect
from virtio_schema.fake_queue import FakeDriver, FakePackedDriver, make_queue
from virtio_schema.ring import PackedDesc
from virtio_schema.schema import DescFlags, Feature, PackedDescFlags


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    return tmp_path / "mem.bin"


def _run(
    capsys: pytest.CaptureFixture[str], mem: Path, base: int, driver: Any, *extra: str
) -> dict[str, Any]:
    if isinstance(driver, FakePackedDriver):
        addrs = [
            hex(driver.ring_addr),
            hex(driver.driver_event_addr),
            hex(driver.device_event_addr),
        ]
        extra = ("--packed", *extra)
    else:
        addrs = [hex(driver.desc_addr), hex(driver.avail_addr), hex(driver.used_addr)]
    rc = inspect.main(
        ["--mem", str(mem), "--mem-base", hex(base), "--desc", addrs[0], "--avail", addrs[1],
         "--used", addrs[2], "--size", str(driver.size), "--json", *extra]
    )  # fmt: skip
    assert rc == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def _save(driver: FakeDriver | FakePackedDriver, path: Path) -> int:
    path.write_bytes(bytes(driver.memory.buffers[0]))
    return driver.memory.memory.regions[0].start


def test_in_flight_chains_direct_indirect_and_malformed(
    dump: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fq = make_queue(8, features=Feature.INDIRECT_DESC)
    d = fq.driver
    d.publish([b"hello"], [16])
    d.publish([b"x" * 16], [512, 1], indirect=True)
    a, b = d.take_descriptor(), d.take_descriptor()
    buf = d.alloc_buffer(16)
    d.write_desc(a, buf, 16, DescFlags.WRITE | DescFlags.NEXT, b)
    d.write_desc(b, buf, 16, 0, 0)  # readable after writable
    d.push_head(a)
    doc = _run(capsys, dump, _save(d, dump), d)
    assert doc["avail"]["idx"] == 3
    assert doc["in_flight"] == 3
    direct, indirect, bad = doc["chains"]
    assert [x["flags"] for x in direct["descriptors"]] == [["next"], ["write"]]
    assert (direct["readable"], direct["writable"], direct["error"]) == (5, 16, None)
    (ind,) = indirect["descriptors"]
    assert ind["flags"] == ["indirect"]
    assert [e["len"] for e in ind["indirect"]] == [16, 512, 1]
    assert indirect["writable"] == 513
    assert "readable descriptor" in bad["error"]
    assert [x["index"] for x in bad["descriptors"]] == [a, b]  # the rest of the output is there
    fq.queue.reset()


def test_a_loop_is_shown_bounded_with_the_library_error(
    dump: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fq = make_queue(4)
    d = fq.driver
    i, j = d.take_descriptor(), d.take_descriptor()
    buf = d.alloc_buffer(8)
    d.write_desc(i, buf, 8, DescFlags.NEXT, j)
    d.write_desc(j, buf, 8, DescFlags.NEXT, i)
    d.push_head(i)
    (chain,) = _run(capsys, dump, _save(d, dump), d)["chains"]
    assert "longer than 4" in chain["error"]
    assert len(chain["descriptors"]) <= 5


def test_wrapped_indices_and_an_explicit_index(
    dump: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from virtio_schema.queue import QueueState

    fq = make_queue(4, state=QueueState(65534, 65534))
    d = fq.driver
    for _ in range(2):
        d.publish([b"ab"], [4])
    doc = _run(capsys, dump, _save(d, dump), d, "--index", "65534")
    assert [c["avail_idx"] for c in doc["chains"]] == [65534, 65535]
    assert doc["avail"]["idx"] == 0  # wrapped


def test_mem_base_offsets_are_honoured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fq = make_queue(4)
    fq.driver.publish([b"abc"], [4])
    path = tmp_path / "m.bin"
    base = _save(fq.driver, path)
    assert base != 0
    doc = _run(capsys, path, base, fq.driver, "--hexdump", "3")
    assert doc["chains"][0]["descriptors"][0]["hex"] == b"abc".hex()


def test_memory_file_smaller_than_the_ring_names_the_address_and_the_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(bytes(4096))
    rc = inspect.main(
        ["--mem", str(path), "--desc", "0x2000", "--avail", "0x3000", "--used", "0x4000",
         "--size", "8"]
    )  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "0x2000" in err
    assert "4096 bytes" in err


def test_packed_ring_slot_with_its_buffer_id(
    dump: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fq = make_queue(6, packed=True, features=Feature.INDIRECT_DESC)
    d = fq.driver
    bid = d.publish([b"req"], [8, 1])
    buf = d.alloc_buffer(8)
    d.push_raw([PackedDesc(buf, 8, 5, int(PackedDescFlags.WRITE | PackedDescFlags.NEXT)),
                PackedDesc(buf, 8, 5, 0)])  # fmt: skip  # readable after writable
    doc = _run(capsys, dump, _save(d, dump), d, "--index", "0", "--index", "3")
    good, bad = doc["chains"]
    assert good["head"] == bid
    assert next(x["flags"] for x in good["descriptors"]) == ["next", "avail"]
    assert good["error"] is None
    assert good["writable"] == 9
    assert "readable descriptor" in bad["error"]
    assert doc["driver_event"]["flags"] == "enable"


def test_decode_blk_shows_the_request_header_of_each_chain(
    dump: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from virtio_schema.records import BLK_REQ_HDR, BlkReqHdr
    from virtio_schema.schema import BlkType

    fq = make_queue(8, features=Feature.INDIRECT_DESC)
    d = fq.driver
    d.publish([BLK_REQ_HDR.pack(BlkReqHdr(BlkType.IN, 0, 2048))], [4096, 1], indirect=True)
    d.publish([BLK_REQ_HDR.pack(BlkReqHdr(BlkType.FLUSH, 0, 0))], [1])
    d.publish([b"short"], [1])  # too short for a header: nothing decoded, no error
    doc = _run(capsys, dump, _save(d, dump), d, "--decode", "blk")
    first, second, third = (c["decoded"] for c in doc["chains"])
    assert (first["type_name"], first["sector"]) == ("IN", 2048)
    assert second["type_name"] == "FLUSH"
    assert third is None


# --- every malformed chain of the validation catalogue (the rows of tests/test_queue.py) -------


@pytest.mark.parametrize(("case", "packed"), _catalogue(BAD_CHAINS))
def test_every_malformed_chain_of_the_catalogue_shows_the_library_error(
    case: BadChain, packed: bool, dump: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fq, chain, pushed, _ = _bad_queue(case, packed)
    assert chain.error is not None
    d = fq.driver
    where = pushed.head if packed else 0  # packed: the ring slot; split: the avail entry
    negotiated = () if case.features & Feature.INDIRECT_DESC else ("--no-indirect",)
    doc = _run(capsys, dump, _save(d, dump), d, "--index", str(where), *negotiated)
    (shown,) = [c for c in doc["chains"] if c["avail_idx"] == where]
    assert shown["head"] == (pushed.id if packed else pushed.head)
    # the same validation as the device path (whose queue has another index)
    assert shown["error"] == str(chain.error).replace(f"queue {chain.queue_index},", "queue 0,")
    # and the rest of the output is still there
    assert doc["size"] == case.size
    assert doc["format"] == ("packed" if packed else "split")
    chain.return_written()
