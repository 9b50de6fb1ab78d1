"""A read-only virtqueue inspector for memory dumps and live guests.

    python -m virtio_schema.inspect --mem FILE [--mem-base GPA]
        (--desc ADDR --avail ADDR --used ADDR --size N [--packed] | --qmp SOCKET --path QOM_PATH
        [--queue K]) [--index K ...] [--json] [--hexdump N] [--decode blk|net]

``--mem`` is guest memory as a file: a raw dump, or the live memory of a QEMU guest started with
``-object memory-backend-file,mem-path=/dev/shm/NAME,share=on``, mapped read-only (``PROT_READ``)
at guest-physical ``--mem-base``. ``--desc/--avail/--used`` are the ring's guest addresses (for a
packed ring: the descriptor ring and the driver and device event areas). Instead, ``--qmp`` asks
the running QEMU (QMP socket, QEMU 7.2 or later; see :mod:`virtio_schema.qmp`) for queue ``--queue``
of the virtio device at ``--path`` (``x-query-virtio`` lists the paths): the ring format from the
negotiated features (``x-query-virtio-status``), addresses and size from
``x-query-virtio-queue-status``, shown with QEMU's own indices for the queue, or, while a vhost
back-end runs the device, from ``x-query-virtio-vhost-queue-status`` (asking the former would make
QEMU stop the back-end's ring: see :func:`ring_from_qmp`).

It prints the ring's flags and indices (``used_event``/``avail_event``, or the packed event areas),
the chains between the last used and the current avail index ("in flight"), and every avail slot
asked for with ``--index``: the head, each descriptor in chain order with its flags by name, an
indirect table's descriptors under the indirect descriptor, the readable and writable totals, and,
for a malformed chain, the library's own error for it (the same validation as the device path:
:meth:`virtio_schema.queue.Queue.check_chain`). Stale rings full of garbage are the normal case: every
walk is bounded and a bad chain never stops the output.

``--svg FILE`` also draws the ring (:func:`ring_svg`): every descriptor as a row, the avail
ring's slots with the used and avail indices, each chain's descriptors linked in chain order to
its buffers, and the broken entries marked with the reason as a tooltip.

It never writes: the memory is mapped read-only, and the queue object built over it is only asked to
validate chains (never to take or return one).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from virtio_schema._cli import parser
from virtio_schema.errors import VirtioError
from virtio_schema.mem import DeviceRange, DriverRange, GuestMemory
from virtio_schema.qmp import QMPClient, QMPError
from virtio_schema.queue import CheckedChain, PackedQueue, Queue, QueueMemory, RingError
from virtio_schema.records import BLK_REQ_HDR, NET_HDR
from virtio_schema.ring import DESC, PACKED_DESC
from virtio_schema.schema import (
    BlkType,
    DescFlags,
    EventFlags,
    Feature,
    PackedDescFlags,
    avail_ring,
    used_ring,
)

__all__ = ["InspectError", "QemuRing", "inspect_ring", "main", "ring_from_qmp", "ring_svg"]

_DESC_NAMES = [(int(DescFlags.NEXT), "next"), (int(DescFlags.WRITE), "write"),
               (int(DescFlags.INDIRECT), "indirect")]  # fmt: skip
_PACKED_NAMES = [*_DESC_NAMES, (int(PackedDescFlags.AVAIL), "avail"),
                 (int(PackedDescFlags.USED), "used")]  # fmt: skip


class InspectError(VirtioError):
    """The inspector cannot read what it was asked to (an address outside the memory file...)."""


class _NullNotify:
    def notify(self) -> None:  # pragma: no cover - the inspector never returns a chain
        pass


@dataclass(frozen=True)
class QemuRing:
    """Where a running QEMU says a queue's ring is, and its own indices for the queue."""

    desc: int
    avail: int
    used: int
    size: int
    packed: bool
    indirect: bool
    """The driver negotiated INDIRECT_DESC."""
    indices: dict[str, Any]
    """QEMU's view for the report: ``path``, ``queue``, ``vhost`` (a vhost back-end runs the
    ring) and, where QEMU is the device, its ``last_avail_idx``, ``shadow_avail_idx``,
    ``used_idx`` and ``inuse`` (from ``x-query-virtio-queue-status``)."""


def ring_from_qmp(socket_path: str, path: str, queue: int, *, timeout: float = 10.0) -> QemuRing:
    """Ask QEMU over QMP where queue ``queue`` of the device at QOM ``path`` lives.

    Only reads: for a device whose vhost back-end is running, the addresses come from
    ``x-query-virtio-vhost-queue-status`` (``x-query-virtio-queue-status`` would make QEMU 7.2
    stop the back-end's ring, see :mod:`virtio_schema.qmp`), and QEMU has no indices of its own to
    show. Raises :class:`InspectError` if QEMU cannot be asked or does not know the queue, or if
    the driver has not set the ring up (address 0)."""
    indices: dict[str, Any] = {"path": path, "queue": queue}
    try:
        with QMPClient(socket_path, timeout=timeout) as qmp:
            vs = qmp.virtio_status(path)
            indices["vhost"] = vs.vhost_started
            if vs.vhost_started:
                vq = qmp.vhost_queue_status(path, queue)
                desc, avail, used, num = vq.desc, vq.avail, vq.used, vq.num
            else:
                qs = qmp.queue_status(path, queue)
                desc, avail, used, num = qs.desc, qs.avail, qs.used, qs.num
                indices.update(
                    last_avail_idx=qs.last_avail_idx, shadow_avail_idx=qs.shadow_avail_idx,
                    used_idx=qs.used_idx, inuse=qs.inuse,
                )  # fmt: skip
    except QMPError as exc:
        raise InspectError(f"QMP: {exc}") from None
    if desc == 0 or num == 0:
        raise InspectError(
            f"queue {queue} of {path} has no ring (desc {desc:#x}, size {num}):"
            " the driver has not set it up"
        )
    indirect = "VIRTIO_RING_F_INDIRECT_DESC" in vs.guest_features
    return QemuRing(desc, avail, used, num, vs.packed, indirect, indices)


def _flag_names(flags: int, table: list[tuple[int, str]]) -> list[str]:
    names = [name for bit, name in table if flags & bit]
    known = 0
    for bit, _ in table:
        known |= bit
    if flags & ~known:
        names.append(f"{flags & ~known:#x}")
    return names


def _range(mem: GuestMemory, addr: int, length: int, what: str, size: int) -> DeviceRange:
    try:
        dr = mem.translate(DriverRange.from_addr_len(addr, length))
    except VirtioError as exc:
        raise InspectError(f"{what} at {addr:#x}: {exc}") from None
    if dr is None:
        region = mem.regions[0]
        raise InspectError(
            f"{what} at {addr:#x}+{length:#x} is outside the memory file"
            f" ({region.start:#x}..{region.end:#x}, {size} bytes)"
        )
    return dr


def _entry(table: memoryview, i: int, packed: bool) -> tuple[dict[str, Any], int, int, int]:
    """One descriptor record for display, with its (addr, len, flags)."""
    if packed:
        addr, length, buf_id, flags = PACKED_DESC.struct.unpack_from(table, 16 * i)
        entry: dict[str, Any] = {"index": i, "addr": addr, "len": length, "id": buf_id}
        entry["flags"] = _flag_names(flags, _PACKED_NAMES)
    else:
        addr, length, flags, nxt = DESC.struct.unpack_from(table, 16 * i)
        entry = {"index": i, "addr": addr, "len": length, "next": nxt}
        entry["flags"] = _flag_names(flags, _DESC_NAMES)
    return entry, addr, length, flags


def _walk_raw(
    mem: GuestMemory, table: memoryview, start: int, limit: int, size: int, packed: bool
) -> list[dict[str, Any]]:
    """The descriptors as they are, in chain order, bounded by ``size`` (and each indirect
    table's own length); this only displays, the library's walk gives the verdict."""
    out: list[dict[str, Any]] = []
    i = start
    for _ in range(size + 1):
        if not 0 <= i < limit:
            break
        entry, addr, length, flags = _entry(table, i, packed)
        if flags & DescFlags.INDIRECT and length >= 16 and length % 16 == 0:
            dr = None
            with contextlib.suppress(VirtioError):
                dr = mem.translate(DriverRange.from_addr_len(addr, length))
            if dr is not None:
                entries = min(length // 16, 65535)
                if packed:  # all len/16 entries, in order (NEXT is ignored in a packed table)
                    entry["indirect"] = [
                        _entry(dr.view, k, True)[0] for k in range(min(entries, size + 1))
                    ]
                else:
                    entry["indirect"] = _walk_raw(mem, dr.view, 0, entries, size, False)
        out.append(entry)
        if not flags & DescFlags.NEXT:
            break
        if packed:
            i = (i + 1) % limit
            if i == start:
                break
        else:
            i = entry["next"]
    return out


def _chain_report(chain: CheckedChain) -> dict[str, Any]:
    if chain.error is not None:
        return {"error": str(chain.error), "readable": None, "writable": None}
    b = chain.buffers
    return {"error": None, "readable": b.readable_len, "writable": b.writable_len}


def inspect_ring(
    mem: GuestMemory,
    *,
    desc: int,
    avail: int,
    used: int,
    size: int,
    packed: bool = False,
    indirect: bool = True,
    indices: Sequence[int] = (),
    hexdump: int = 0,
    decode: str | None = None,
    table: bool = False,
) -> dict[str, Any]:
    """The inspector's findings as one JSON-ready document. Chains are validated as the device
    would validate them with INDIRECT_DESC negotiated or not (``indirect``). With ``table``, the
    document also holds every descriptor of the table or ring as it is (``table``) and, for a
    split ring, every avail ring entry (``avail_ring``): what :func:`ring_svg` draws."""
    features = (Feature.INDIRECT_DESC if indirect else 0) | (Feature.RING_PACKED if packed else 0)
    mem_size = mem.regions[0].size if mem.regions else 0
    if packed:
        qmem = QueueMemory(
            _range(mem, desc, 16 * size, "descriptor ring", mem_size),
            _range(mem, avail, 4, "driver event area", mem_size),
            _range(mem, used, 4, "device event area", mem_size),
        )
    else:
        qmem = QueueMemory(
            _range(mem, desc, 16 * size, "descriptor table", mem_size),
            _range(mem, avail, avail_ring(size).sizeof(), "available ring", mem_size),
            _range(mem, used, used_ring(size).sizeof(), "used ring", mem_size),
        )
    try:
        queue: Queue | PackedQueue = (PackedQueue if packed else Queue)(
            qmem, size, mem, features=features, notify=_NullNotify()
        )
    except VirtioError as exc:
        raise InspectError(str(exc)) from None
    doc: dict[str, Any] = {"format": "packed" if packed else "split", "size": size}
    doc["addresses"] = {"desc": desc, "avail": avail, "used": used}
    chains: list[dict[str, Any]] = []
    if isinstance(queue, Queue):
        a, u = queue.avail_ring, queue.used_ring
        doc["avail"] = {"flags": a.flags(), "idx": a.idx(), "used_event": a.used_event()}
        doc["used"] = {"flags": u.flags(), "idx": u.idx(), "avail_event": u.avail_event()}
        in_flight = (a.idx() - u.idx()) & 0xFFFF
        doc["in_flight"] = in_flight
        if table:
            doc["table"] = [_entry(queue.desc_table.view, i, False)[0] for i in range(size)]
            doc["avail_ring"] = [a.ring(k) for k in range(size)]
        wanted = [(u.idx() + k) & 0xFFFF for k in range(min(in_flight, size))]
        wanted += [k for k in indices if k not in wanted]
        for avail_idx in wanted:
            head = a.ring(avail_idx % size)
            entry: dict[str, Any] = {"avail_idx": avail_idx, "head": head}
            if head >= size:
                entry.update(
                    descriptors=[], error=f"head {head} is not below the queue size {size}"
                )
            else:
                entry["descriptors"] = _walk_raw(
                    mem, queue.desc_table.view, head, size, size, False
                )
                entry.update(_chain_report(queue.check_chain(head)))
            chains.append(entry)
    else:
        if table:
            doc["table"] = [_entry(queue.ring.view, i, True)[0] for i in range(size)]
        for name, area in (
            ("driver_event", queue.driver_event),
            ("device_event", queue.device_event),
        ):
            off_wrap, flags = area.off_wrap(), area.flags()
            try:
                mode = EventFlags(flags).name.lower()
            except ValueError:
                mode = f"{flags:#x}"
            doc[name] = {"off": off_wrap & 0x7FFF, "wrap": off_wrap >> 15, "flags": mode}
        for pos in indices:
            slot = pos % size
            entry = {"avail_idx": slot, "head": slot}
            entry["descriptors"] = _walk_raw(mem, queue.ring.view, slot, size, size, True)
            try:
                chain = queue.check_chain(slot)
                entry.update(_chain_report(chain))
                entry["head"] = chain.head
            except RingError as exc:  # a chain the device could not even return
                entry.update(error=str(exc))
            chains.append(entry)
    if hexdump:
        for entry in chains:
            for d in entry["descriptors"]:
                for item in [d, *d.get("indirect", [])]:
                    try:
                        item["hex"] = mem.read(item["addr"], min(item["len"], hexdump)).hex()
                    except VirtioError:
                        item["hex"] = None
    for entry in chains:  # what the device would meet when it reads or writes the buffers
        for d in entry["descriptors"]:
            for item in [d, *d.get("indirect", [])]:
                if "indirect" in item["flags"] or not item["len"]:
                    continue
                try:
                    dr = mem.translate(DriverRange.from_addr_len(item["addr"], item["len"]))
                except VirtioError:
                    dr = None
                item["mapped"] = dr is not None
                if dr is None and entry.get("error") is None:
                    entry["error"] = (
                        f"buffer {item['addr']:#x}+{item['len']:#x} (descriptor {item['index']})"
                        " is not in guest memory: the device would fail on it (UnmappedBuffer)"
                    )
    if decode is not None:
        for entry in chains:
            entry["decoded"] = _decode_header(mem, entry["descriptors"], decode)
    doc["chains"] = chains
    return doc


def _decode_header(mem: GuestMemory, descriptors: list[dict[str, Any]], kind: str) -> Any:
    """The device header at the start of the chain's first readable buffer, through the device
    schemas (virtio-blk request header, virtio-net header); ``None`` if there is none to read."""
    layout = BLK_REQ_HDR if kind == "blk" else NET_HDR
    flat = [e for d in descriptors for e in (d.get("indirect") or [d])]
    first = next(
        (e for e in flat if "write" not in e["flags"] and "indirect" not in e["flags"]), None
    )
    if first is None or first["len"] < layout.size:
        return None
    try:
        rec = layout.unpack(mem.read(first["addr"], layout.size))
    except VirtioError:
        return None
    out: dict[str, Any] = rec._asdict()
    if kind == "blk":
        try:
            out["type_name"] = BlkType(out["type"]).name
        except ValueError:
            out["type_name"] = None
    return out


def _desc_line(d: dict[str, Any]) -> str:
    return f"[{d['index']}] addr={d['addr']:#x} len={d['len']} flags={','.join(d['flags'])}"


def _hexdump(data: bytes) -> list[str]:
    """``data`` as hexdump lines: offset, 16 bytes in hex, the printable ones as text."""
    lines = []
    for at in range(0, len(data), 16):
        row = data[at : at + 16]
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        lines.append(f"{at:04x}  {row.hex(' '):<47}  |{text}|")
    return lines


def _print_hex(d: dict[str, Any], indent: str) -> None:
    """The descriptor's first bytes, if ``--hexdump`` asked for them."""
    if "hex" not in d or "indirect" in d["flags"]:
        return
    if d["hex"] is None:
        print(f"{indent}(the buffer is not in guest memory)")
        return
    for line in _hexdump(bytes.fromhex(d["hex"])):
        print(indent + line)


def _print_text(doc: dict[str, Any]) -> None:
    where = ", ".join(f"{k} {v:#x}" for k, v in doc["addresses"].items())
    print(f"{doc['format']} ring, size {doc['size']} ({where})")
    for key in ("qemu", "avail", "used", "driver_event", "device_event"):
        if key in doc:
            print(f"  {key}: " + " ".join(f"{k}={v}" for k, v in doc[key].items()))
    if "in_flight" in doc:
        print(f"  in flight: {doc['in_flight']}")
    for c in doc["chains"]:
        print(f"chain avail_idx={c['avail_idx']} head={c['head']}")
        for d in c["descriptors"]:
            print("    " + _desc_line(d))
            _print_hex(d, "      ")
            for e in d.get("indirect", []):
                print("        " + _desc_line(e))
                _print_hex(e, "          ")
        if c.get("decoded"):
            print("    header: " + " ".join(f"{k}={v}" for k, v in c["decoded"].items()))
        if c.get("error"):
            print(f"    error: {c['error']}")
        else:
            print(f"    readable {c['readable']} bytes, writable {c['writable']} bytes")


# --- the ring as a drawing (--svg) ----------------------------------------------------------------
# Hand-written SVG through ElementTree (escaping, well-formed by construction): no plotting library
# at run time. Everything is placed on a grid of rows; the document of inspect_ring(table=True) is
# the only input, so a drawing shows exactly what the text and JSON outputs report.

_ROW = 18  # px per row
_CHAR = 7.3  # px per character of the 12 px monospace font
_STYLE = """
text { font: 12px monospace; fill: #222; }
.heading { font-weight: bold; }
.avail rect, .desc rect { fill: #fff; stroke: #ccc; }
.avail.inflight rect, .desc.inflight rect { fill: #e3efff; }
.avail.asked rect, .desc.asked rect { fill: #f1f1f1; }
.broken rect, rect.broken { fill: #ffd9d9; stroke: #c00; stroke-width: 1.5; }
.broken text, text.broken { fill: #a00; }
.marker { fill: #555; }
.link { fill: none; stroke-width: 1.5; }
.buffer-link { fill: none; stroke-width: 1; stroke-dasharray: 3 3; }
"""
_CHAIN_COLOURS = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"]
_BROKEN_COLOUR = "#c00"  # the last arrow marker


def _svg_text(parent: ET.Element, x: float, y: float, text: str, cls: str | None = None) -> None:
    t = ET.SubElement(parent, "text", x=f"{x:g}", y=f"{y:g}")
    if cls:
        t.set("class", cls)
    t.text = text


def _svg_row(
    parent: ET.Element, cls: str, ident: str, x: float, y: float, cells: list[tuple[float, str]],
    width: float, reasons: list[str],
) -> None:  # fmt: skip
    """One row of a table: a ``<g>`` with its box, its cells' texts and, for a broken entry,
    the reasons as its ``<title>`` (the tooltip)."""
    g = ET.SubElement(parent, "g", id=ident)
    g.set("class", cls + (" broken" if reasons else ""))
    if reasons:
        ET.SubElement(g, "title").text = "\n".join(reasons)
    ET.SubElement(g, "rect", x=f"{x:g}", y=f"{y:g}", width=f"{width:g}", height=str(_ROW))
    for dx, text in cells:
        _svg_text(g, x + dx + 4, y + _ROW - 5, text)


def _svg_link(
    parent: ET.Element, x1: float, y1: float, x2: float, y2: float, colour: str, arrow: int
) -> None:
    """A straight arrow from the row at ``y1`` to the row at ``y2`` (rows' top edges)."""
    path = f"M{x1:g},{y1 + _ROW / 2:g} L{x2:g},{y2 + _ROW / 2:g}"
    attrs = {"d": path, "stroke": colour, "class": "link", "marker-end": f"url(#arrow-{arrow})"}
    ET.SubElement(parent, "path", attrs)


def _buffer_text(d: dict[str, Any]) -> str:
    kind = "indirect table" if "indirect" in d["flags"] else (
        "writable" if "write" in d["flags"] else "readable")  # fmt: skip
    unmapped = " (not in guest memory)" if d.get("mapped") is False else ""
    return f"[{d['index']}] {d['addr']:#x}+{d['len']} {kind}{unmapped}"


def ring_svg(doc: dict[str, Any]) -> str:
    """A drawing of the ring as an SVG document, from :func:`inspect_ring`'s document made with
    ``table=True``.

    Every descriptor of the table (packed: of the ring) is a row: index, addr, len, flags, and
    ``next`` (packed: the buffer ``id``). For a split ring the avail ring stands beside it, one
    row per slot with its head, the slots from ``used.idx`` to ``avail.idx`` (in flight) shaded,
    and the positions of ``used.idx``, ``avail.idx`` and, when QEMU told them, its
    ``last_avail_idx`` pointed at. Each chain of the document (in flight, or asked for with
    ``--index``) has a colour: its avail slot is linked to its head, each descriptor to the next
    in chain order, and each descriptor to its buffer in the chain list on the right (an indirect
    table's descriptors under it). A chain the inspector reports an error for is drawn in red,
    its avail slot and its descriptors too, with the error as the tooltip (``<title>``)."""
    if "table" not in doc:
        raise ValueError("ring_svg draws a document of inspect_ring(..., table=True)")
    size: int = doc["size"]
    packed = doc["format"] == "packed"
    table: list[dict[str, Any]] = doc["table"]
    chains: list[dict[str, Any]] = doc["chains"]
    in_flight: int = doc.get("in_flight", 0)
    used_idx: int = doc["used"]["idx"] if not packed else 0

    def flying(c: dict[str, Any]) -> bool:
        return not packed and (c["avail_idx"] - used_idx) & 0xFFFF < min(in_flight, size)

    # which rows belong to which chains, and why a row is broken
    desc_reasons: dict[int, list[str]] = {}
    desc_state: dict[int, str] = {}
    slot_reasons: dict[int, list[str]] = {}
    for c in chains:
        state = "inflight" if flying(c) else "asked"
        for d in c["descriptors"]:
            if desc_state.get(d["index"]) != "inflight":
                desc_state[d["index"]] = state
            if c.get("error"):
                desc_reasons.setdefault(d["index"], [])
                if c["error"] not in desc_reasons[d["index"]]:
                    desc_reasons[d["index"]].append(c["error"])
        if c.get("error") and not packed:
            slot_reasons.setdefault(c["avail_idx"] % size, []).append(c["error"])

    # header lines
    where = ", ".join(f"{k} {v:#x}" for k, v in doc["addresses"].items())
    header = [f"{doc['format']} ring, size {size} ({where})"]
    for key in ("qemu", "avail", "used", "driver_event", "device_event"):
        if key in doc:
            header.append(f"{key}: " + " ".join(f"{k}={v}" for k, v in doc[key].items()))
    if not packed:
        header.append(f"in flight: {in_flight} (avail.idx - used.idx)")
    top = _ROW * (len(header) + 2) + 10

    # the positions in the avail ring (split), pointed at by labels left of it
    marks: dict[int, list[str]] = {}
    if not packed:
        avail_idx = doc["avail"]["idx"]
        marks.setdefault(used_idx % size, []).append(f"used.idx {used_idx}")
        marks.setdefault(avail_idx % size, []).append(f"avail.idx {avail_idx}")
        if "last_avail_idx" in doc.get("qemu", {}):
            last = doc["qemu"]["last_avail_idx"]
            marks.setdefault(last % size, []).append(f"QEMU last_avail_idx {last}")
    labels = {k: ", ".join(names) + " \u2192" for k, names in marks.items()}

    # columns: labels, avail ring (split), descriptor table, chain links, chain list
    avail_x = 10.0 + (max(map(len, labels.values())) + 2) * _CHAR if labels else 10.0
    avail_w = 16 * _CHAR
    desc_x = avail_x + avail_w + 30 if not packed else 10.0
    cols = [("index", 6), ("addr", 20), ("len", 11), ("flags", 24), ("id" if packed else "next", 6)]
    desc_w = sum(w for _, w in cols) * _CHAR
    arcs_x = desc_x + desc_w
    list_x = arcs_x + 40 + 12 * min(len(chains), 6)

    # the chain list: a heading and a verdict line per chain, a line per buffer, a blank line
    placed: list[tuple[int, int, dict[str, Any], dict[str, Any] | None, int]] = []
    r = 0
    for n, c in enumerate(chains):
        placed.append((r, n, c, None, 0))
        r += 2
        for d in c["descriptors"]:
            placed.append((r, n, c, d, 1))
            r += 1
            for e in d.get("indirect", []):
                placed.append((r, n, c, e, 2))
                r += 1
        r += 1
    texts = [len(_buffer_text(d)) + 4 * depth for _, _, _, d, depth in placed if d is not None]
    texts += [min(len(f"error: {c['error']}"), 150) + 4 for c in chains if c.get("error")]
    width = list_x + (max([60, *texts]) + 8) * _CHAR
    height = top + _ROW * (max(size, r) + 2)

    svg = ET.Element("svg", xmlns="http://www.w3.org/2000/svg", width=f"{width:.0f}",
                     height=f"{height:.0f}", viewBox=f"0 0 {width:.0f} {height:.0f}")  # fmt: skip
    ET.SubElement(svg, "style").text = _STYLE
    defs = ET.SubElement(svg, "defs")
    for n, colour in enumerate([*_CHAIN_COLOURS, _BROKEN_COLOUR]):
        m = ET.SubElement(defs, "marker", id=f"arrow-{n}", viewBox="0 0 10 10", refX="9",
                          refY="5", markerWidth="6", markerHeight="6", orient="auto")  # fmt: skip
        ET.SubElement(m, "path", d="M0,0 L10,5 L0,10 z", fill=colour)
    for k, line in enumerate(header):
        _svg_text(svg, 10, 20 + k * _ROW, line, "heading" if k == 0 else None)

    def row_y(i: int) -> float:
        return top + _ROW * (i + 1)

    # the avail ring (split): a row per slot, the positions pointed at
    if not packed:
        _svg_text(svg, avail_x + 4, top + _ROW - 5, "avail: slot, head", "heading")
        flight_slots = {(used_idx + k) % size for k in range(min(in_flight, size))}
        asked = {c["avail_idx"] % size for c in chains} - flight_slots
        for k, head in enumerate(doc["avail_ring"]):
            cls = "avail" + (" inflight" if k in flight_slots else " asked" if k in asked else "")
            _svg_row(svg, cls, f"avail-{k}", avail_x, row_y(k), [(0, f"[{k}]"), (7 * _CHAR,
                     str(head))], avail_w, slot_reasons.get(k, []))  # fmt: skip
        for k, label in sorted(labels.items()):
            x = avail_x - (len(label) + 1) * _CHAR
            _svg_text(svg, x, row_y(k) + _ROW - 5, label, "marker")

    # the descriptor table (packed: ring)
    x = 0.0
    for name, w in cols:
        _svg_text(svg, desc_x + x + 4, top + _ROW - 5, name, "heading")
        x += w * _CHAR
    for d in table:
        i = d["index"]
        cells, x = [], 0.0
        last = d["id"] if packed else d["next"]
        for text, (_, w) in zip([f"{i}", f"{d['addr']:#x}", f"{d['len']}",
                                 ",".join(d["flags"]), f"{last}"], cols, strict=True):  # fmt: skip
            cells.append((x, text))
            x += w * _CHAR
        cls = "desc" + (f" {desc_state[i]}" if i in desc_state else "")
        _svg_row(svg, cls, f"desc-{i}", desc_x, row_y(i), cells, desc_w, desc_reasons.get(i, []))

    # each chain: its slot to its head, its descriptors in chain order, each to its buffer line
    for r, n, c, d, depth in placed:
        error = c.get("error")
        colour_n = len(_CHAIN_COLOURS) if error else n % len(_CHAIN_COLOURS)
        colour = [*_CHAIN_COLOURS, _BROKEN_COLOUR][colour_n]
        y = row_y(r)
        if d is None:
            g = ET.SubElement(svg, "g", id=f"chain-{n}")
            g.set("class", "chain" + (" broken" if error else ""))
            if error:
                ET.SubElement(g, "title").text = error
            what = f"slot {c['avail_idx']}" if packed else f"avail_idx {c['avail_idx']}"
            state = "in flight" if flying(c) else "asked for"
            heading = f"chain {what}, head {c['head']} ({state})"
            _svg_text(g, list_x, y + _ROW - 5, heading, "heading" + (" broken" if error else ""))
            verdict = f"error: {error}" if error else (
                f"readable {c['readable']} bytes, writable {c['writable']} bytes")  # fmt: skip
            _svg_text(g, list_x + 4 * _CHAR, y + 2 * _ROW - 5, verdict[:150])
            descs = c["descriptors"]
            if not packed and descs:  # the avail slot points at the head
                _svg_link(g, avail_x + avail_w, row_y(c["avail_idx"] % size), desc_x,
                          row_y(descs[0]["index"]), colour, colour_n)  # fmt: skip
            bend = arcs_x + 14 + 12 * (n % 6)
            for a, b in itertools.pairwise(descs):  # chain order
                ya, yb = row_y(a["index"]) + _ROW / 2, row_y(b["index"]) + _ROW / 2
                path = f"M{arcs_x:g},{ya:g} C{bend:g},{ya:g} {bend:g},{yb:g} {arcs_x:g},{yb:g}"
                ET.SubElement(g, "path", {"d": path, "stroke": colour, "class": "link",
                                          "marker-end": f"url(#arrow-{colour_n})"})  # fmt: skip
            continue
        x = list_x + 4 * depth * _CHAR
        g = ET.SubElement(svg, "g", id=f"buffer-{n}-{r}")
        g.set("class", "buffer" + (" broken" if d.get("mapped") is False else ""))
        if d.get("mapped") is False:
            ET.SubElement(g, "title").text = "the buffer is not in guest memory"
        _svg_text(g, x, y + _ROW - 5, _buffer_text(d))
        if depth == 1:  # a descriptor of the table: linked to its buffer's line
            yd = row_y(d["index"]) + _ROW / 2
            path = f"M{arcs_x:g},{yd:g} L{x - 4:g},{y + _ROW / 2:g}"
            ET.SubElement(g, "path", {"d": path, "stroke": colour, "class": "buffer-link"})
    ET.indent(svg, space=" ")
    return ET.tostring(svg, encoding="unicode") + "\n"


def _addr(text: str) -> int:
    return int(text, 0)


DESCRIPTION = """\
Show a virtqueue of a memory dump or of a running QEMU guest, read-only: the
ring's flags and indices, the chains between the last used and the current
avail index (in flight) and every slot asked for with --index, each descriptor
in chain order with its flags by name, and for a malformed chain the library's
own error for it (the same validation as the device path). Stale rings full of
garbage are the normal case: every walk is bounded.

Give the ring by address (--desc, --avail, --used, --size), or let QEMU say
where it is over QMP (--qmp, --path, --queue; QEMU 7.2 or later)."""

EPILOG = """\
a live guest: QEMU with its memory in a file and a QMP socket, then the
inspector on the first queue of its virtio-blk device (id blk0):

  qemu-system-x86_64 -accel tcg -m 256M -machine pc,memory-backend=mem \\
      -object memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/vm,share=on \\
      -drive if=none,id=d0,file=disk.img -device virtio-blk-pci,drive=d0,id=blk0 \\
      -qmp unix:/tmp/qmp.sock,server=on,wait=off ...
  %(prog)s --mem /dev/shm/vm --qmp /tmp/qmp.sock \\
      --path /machine/peripheral/blk0/virtio-backend --queue 0 --decode blk

QMP's x-query-virtio lists the devices' paths. A memory dump, by address:

  %(prog)s --mem dump.bin --size 256 \\
      --desc 0x7e4000 --avail 0x7e5000 --used 0x7e6000 --hexdump 32"""


def main(argv: list[str] | None = None) -> int:
    """The command line: ``--help`` describes it."""
    p = parser("virtio_schema.inspect", DESCRIPTION, EPILOG)
    p.add_argument(
        "--mem",
        required=True,
        metavar="FILE",
        help="guest memory as a file: a raw dump, or a live guest's /dev/shm memory backend",
    )
    p.add_argument(
        "--mem-base",
        type=_addr,
        default=0,
        metavar="GPA",
        help="guest-physical address of the file's first byte (default 0)",
    )
    by_addr = p.add_argument_group("the ring by address")
    by_addr.add_argument(
        "--desc", type=_addr, metavar="ADDR", help="descriptor table (packed: descriptor ring)"
    )
    by_addr.add_argument(
        "--avail", type=_addr, metavar="ADDR", help="avail ring (packed: driver event area)"
    )
    by_addr.add_argument(
        "--used", type=_addr, metavar="ADDR", help="used ring (packed: device event area)"
    )
    by_addr.add_argument("--size", type=int, metavar="N", help="queue size")
    by_addr.add_argument("--packed", action="store_true", help="a packed ring")
    by_addr.add_argument(
        "--no-indirect",
        dest="indirect",
        action="store_false",
        help="the driver did not negotiate INDIRECT_DESC (an indirect descriptor is then an error)",
    )
    by_qmp = p.add_argument_group("the ring from a running QEMU (QMP, QEMU 7.2 and later)")
    by_qmp.add_argument("--qmp", metavar="SOCKET", help="QEMU's QMP unix socket")
    by_qmp.add_argument(
        "--path", metavar="QOM_PATH", help="the device's QOM path (x-query-virtio lists them)"
    )
    by_qmp.add_argument("--queue", type=int, default=0, metavar="K", help="queue index (default 0)")
    by_qmp.add_argument(
        "--qmp-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for each QMP reply (default 10)",
    )
    p.add_argument(
        "--index",
        type=int,
        action="append",
        default=[],
        metavar="K",
        help="also show the chain at avail slot K (repeatable; packed: descriptor slot K)",
    )
    p.add_argument("--json", action="store_true", help="print the findings as one JSON document")
    p.add_argument(
        "--svg",
        metavar="FILE",
        help="also draw the ring into FILE as SVG: every descriptor, the avail and used"
        " positions, the chains and their buffers, broken entries marked",
    )
    p.add_argument(
        "--hexdump",
        type=int,
        default=0,
        metavar="N",
        help="show the first N bytes of every buffer",
    )
    p.add_argument(
        "--decode",
        choices=["blk", "net"],
        default=None,
        help="decode each chain's device header (virtio-blk request, virtio-net header)",
    )
    args = p.parse_args(argv)
    by_address = (args.desc, args.avail, args.used, args.size)
    qemu: dict[str, Any] | None = None
    if args.qmp is not None:
        if any(v is not None for v in by_address) or args.packed or not args.indirect:
            p.error("--qmp reads the ring's addresses, size and format from QEMU: drop"
                    " --desc/--avail/--used/--size/--packed/--no-indirect")  # fmt: skip
        if args.path is None:
            p.error("--qmp needs --path (the device's QOM path; x-query-virtio lists them)")
        try:
            ring = ring_from_qmp(args.qmp, args.path, args.queue, timeout=args.qmp_timeout)
        except InspectError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        args.desc, args.avail, args.used, args.size = ring.desc, ring.avail, ring.used, ring.size
        args.packed, args.indirect = ring.packed, ring.indirect
        qemu = ring.indices
    elif any(v is None for v in by_address):
        p.error("give the ring as --desc, --avail, --used and --size, or --qmp with --path")
    fd = os.open(args.mem, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            print(f"error: {args.mem} is empty", file=sys.stderr)
            return 2
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        with GuestMemory([(args.mem_base, mm)], writable=False) as mem:
            doc = inspect_ring(
                mem, desc=args.desc, avail=args.avail, used=args.used, size=args.size,
                packed=args.packed, indirect=args.indirect, indices=args.index,
                hexdump=args.hexdump, decode=args.decode, table=args.svg is not None,
            )  # fmt: skip
    except InspectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        mm.close()
    if qemu is not None:
        doc["qemu"] = qemu
    if args.svg is not None:
        with open(args.svg, "w", encoding="utf-8") as f:
            f.write(ring_svg(doc))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
