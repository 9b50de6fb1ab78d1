"""The inspector's drawing of a ring (``--svg``, :func:`virtio_schema.inspect.ring_svg`).

The drawing in the debugging page (``docs/_static/inspect_example.svg``) is made by
:func:`example_svg` from a fake queue; a test regenerates it and compares, so the page shows what
the inspector draws today. After a deliberate change to the drawing, write it again with

    .venv/bin/python tests/test_inspect_svg.py
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from virtio_schema import inspect
from virtio_schema.fake_queue import FakeDriver, FakePackedDriver, make_queue
from virtio_schema.ring import PackedDesc
from virtio_schema.schema import DescFlags, Feature, PackedDescFlags

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "_static" / "inspect_example.svg"
NS = {"svg": "http://www.w3.org/2000/svg"}


def _split_doc() -> tuple[dict[str, Any], int]:
    """A split queue of 8: one chain served and used, then three in flight: a direct chain, an
    indirect one and a malformed one (readable after writable); with the head of the malformed."""
    fq = make_queue(8, features=Feature.INDIRECT_DESC)
    d = fq.driver
    d.publish([b"served"], [8])
    chain = fq.queue.next_chain()
    assert chain is not None
    chain.return_written(8)
    d.publish([b"hello"], [16])
    d.publish([b"x" * 16], [512, 1], indirect=True)
    a, b = d.take_descriptor(), d.take_descriptor()
    buf = d.alloc_buffer(16)
    d.write_desc(a, buf, 16, DescFlags.WRITE | DescFlags.NEXT, b)
    d.write_desc(b, buf, 16, 0, 0)  # readable after writable
    d.push_head(a)
    return _inspect(d), a


def _inspect(d: FakeDriver | FakePackedDriver, *indices: int) -> dict[str, Any]:
    if isinstance(d, FakePackedDriver):
        desc, avail, used = d.ring_addr, d.driver_event_addr, d.device_event_addr
    else:
        desc, avail, used = d.desc_addr, d.avail_addr, d.used_addr
    return inspect.inspect_ring(
        d.memory.memory,
        desc=desc,
        avail=avail,
        used=used,
        size=d.size,
        packed=isinstance(d, FakePackedDriver),
        indices=indices,
        table=True,
    )


def example_svg() -> str:
    """The drawing shown in docs/debugging.rst."""
    return inspect.ring_svg(_split_doc()[0])


def _groups(root: ET.Element, prefix: str) -> dict[str, ET.Element]:
    return {
        g.attrib["id"]: g
        for g in root.iterfind(".//svg:g", NS)
        if g.attrib.get("id", "").startswith(prefix)
    }


def _classes(g: ET.Element) -> set[str]:
    return set(g.attrib.get("class", "").split())


def _title(g: ET.Element) -> str:
    t = g.find("svg:title", NS)
    return "" if t is None or t.text is None else t.text


def test_split_ring_drawing_has_a_row_per_descriptor_and_marks_the_broken_chain() -> None:
    doc, broken_head = _split_doc()
    root = ET.fromstring(inspect.ring_svg(doc))  # well-formed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    rows = _groups(root, "desc-")
    assert sorted(rows) == sorted(f"desc-{i}" for i in range(8))
    assert len(_groups(root, "avail-")) == 8
    (bad,) = [c for c in doc["chains"] if c["error"]]
    assert "readable descriptor" in bad["error"]
    # the malformed chain's descriptors and its avail slot: marked, with the reason as tooltip
    broken = {i for i, g in rows.items() if "broken" in _classes(g)}
    assert broken == {f"desc-{d['index']}" for d in bad["descriptors"]}
    assert _title(rows[f"desc-{broken_head}"]) == bad["error"]
    slot = _groups(root, "avail-")[f"avail-{bad['avail_idx'] % 8}"]
    assert "broken" in _classes(slot)
    assert _title(slot) == bad["error"]
    # a sound row has no tooltip and no mark
    assert all(not _title(g) for i, g in rows.items() if i not in broken)


def test_split_ring_drawing_shows_the_positions_and_the_chains_in_flight() -> None:
    doc, _ = _split_doc()
    assert (doc["used"]["idx"], doc["avail"]["idx"], doc["in_flight"]) == (1, 4, 3)
    svg = inspect.ring_svg(doc)
    root = ET.fromstring(svg)
    assert "used.idx 1 \u2192" in svg
    assert "avail.idx 4 \u2192" in svg
    slots = _groups(root, "avail-")
    assert [k for k in range(8) if "inflight" in _classes(slots[f"avail-{k}"])] == [1, 2, 3]
    chains = _groups(root, "chain-")
    assert len(chains) == 3
    direct = doc["chains"][0]
    g = chains["chain-0"]
    texts = [t.text or "" for t in g.iterfind(".//svg:text", NS)]
    assert f"chain avail_idx 1, head {direct['head']} (in flight)" in texts
    assert "readable 5 bytes, writable 16 bytes" in texts
    # the slot links to the head, the head to its next descriptor: two arrows
    assert len(g.findall("svg:path", NS)) == 2
    rows = _groups(root, "desc-")
    for d in direct["descriptors"]:
        assert "inflight" in _classes(rows[f"desc-{d['index']}"])
    # every buffer of every chain has a line, an indirect table's entries too
    buffers = _groups(root, "buffer-")
    assert len(buffers) == sum(1 + len(d.get("indirect", [])) for c in doc["chains"]
                               for d in c["descriptors"])  # fmt: skip
    lines = [t.text or "" for g in buffers.values() for t in g.iterfind("svg:text", NS)]
    assert any(line.endswith("+512 writable") for line in lines)


def test_packed_ring_drawing_has_a_row_per_slot_and_marks_the_broken_chain() -> None:
    fq = make_queue(6, packed=True, features=Feature.INDIRECT_DESC)
    d = fq.driver
    d.publish([b"req"], [8, 1])
    buf = d.alloc_buffer(8)
    d.push_raw([PackedDesc(buf, 8, 5, int(PackedDescFlags.WRITE | PackedDescFlags.NEXT)),
                PackedDesc(buf, 8, 5, 0)])  # fmt: skip  # readable after writable
    doc = _inspect(d, 0, 3)
    root = ET.fromstring(inspect.ring_svg(doc))
    rows = _groups(root, "desc-")
    assert len(rows) == 6
    assert not _groups(root, "avail-")  # a packed ring has no avail ring
    broken = sorted(i for i, g in rows.items() if "broken" in _classes(g))
    assert broken == ["desc-3", "desc-4"]
    assert "readable descriptor" in _title(rows["desc-3"])
    assert "asked" in _classes(rows["desc-0"])


def test_the_command_line_writes_the_drawing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fq = make_queue(4)
    d = fq.driver
    d.publish([b"abc"], [4])
    mem, out = tmp_path / "mem.bin", tmp_path / "ring.svg"
    mem.write_bytes(bytes(d.memory.buffers[0]))
    base = d.memory.memory.regions[0].start
    rc = inspect.main(
        ["--mem", str(mem), "--mem-base", hex(base), "--desc", hex(d.desc_addr), "--avail",
         hex(d.avail_addr), "--used", hex(d.used_addr), "--size", "4", "--json", "--svg", str(out)]
    )  # fmt: skip
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    root = ET.parse(out).getroot()
    assert len(_groups(root, "desc-")) == 4
    assert len(_groups(root, "chain-")) == doc["in_flight"] == 1


def test_the_drawing_in_the_docs_is_what_the_inspector_draws() -> None:
    assert EXAMPLE.read_text() == example_svg(), (
        "docs/_static/inspect_example.svg is stale: .venv/bin/python tests/test_inspect_svg.py"
    )


if __name__ == "__main__":
    EXAMPLE.parent.mkdir(exist_ok=True)
    EXAMPLE.write_text(example_svg())
    print(f"wrote {EXAMPLE}", file=sys.stderr)
