"""End to end: the inspector against QEMU's own view of a queue, and against our back-end's.

1. QEMU's own ``virtio-blk-pci`` (QEMU is the device, no vhost-user) serves a Linux guest whose
   memory is a file in ``/dev/shm``; after block I/O that puts a chain in every avail slot, the VM
   is stopped over QMP and, for every avail slot, the inspector (the documented command line, with
   ``--qmp`` for the ring's place) and QEMU's ``x-query-virtio-queue-element`` must name the same
   head and the same descriptors.
2. Our blk back-end serves a ``vhost-user-blk-pci`` guest; the inspector, reading the same shared
   memory, must find the ring where the back-end says it started it and the indices the back-end
   reports when QEMU stops the ring (GET_VRING_BASE). The back-end records the conversation
   (``--capture``): it must decode without an unknown, truncated or undecodable message.

Skipped, with the reason, where QEMU, a static busybox or the Debian cloud kernel is missing;
``VIRTIO_SCHEMA_REQUIRE_E2E=1`` turns a skip into a failure. Every QEMU and back-end process runs
under a watchdog and is killed by its PID at the end; the ``/dev/shm`` file is removed.

``VIRTIO_SCHEMA_UPDATE_DATA=1`` also writes what these runs saw to ``tests/data/`` (QEMU's QMP
answers, the vhost-user capture): the recordings the fast tests replay.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import require_e2e

from virtio_schema.qmp import JSON, QMPClient, QMPCommandError, QueueElement
from virtio_schema.testing.process import BackendProcess
from virtio_schema.testing.qemu import INIT_PRELUDE, GuestTools, build_initramfs, start_guest
from virtio_schema.vhost_user.messages import decode_capture, parse_capture

GUEST_TIMEOUT = 240.0
BACKEND_TIMEOUT = 300.0
INSPECT_TIMEOUT = 120.0
DATA = Path(__file__).parent / "data"
UPDATE_DATA = os.environ.get("VIRTIO_SCHEMA_UPDATE_DATA") == "1"
BLK0 = "/machine/peripheral/blk0/virtio-backend"
BLK1 = "/machine/peripheral/blk1/virtio-backend"

# Over 600 requests: more than the queue size (256 for QEMU's virtio-blk, 128 for vhost-user-blk),
# so every avail slot has held a chain; the 4 MiB reads at the end are split into several
# requests in flight together (several heads in use). Then the guest idles (no disk access)
# until the test kills it.
WORKLOAD = """
echo E2E-BEGIN
dd if=/dev/vda of=/dev/vda bs=4096 count=100 skip=8 seek=1200 iflag=direct oflag=direct conv=notrunc 2>/dev/null
dd if=/dev/vda of=/dev/null bs=65536 count=16 iflag=direct 2>/dev/null
for i in 0 1 2 3; do
  dd if=/dev/vda of=/dev/null bs=4096 count=120 skip=$((i * 256)) iflag=direct 2>/dev/null &
done
wait
dd if=/dev/vda of=/dev/null bs=4M count=2 iflag=direct 2>/dev/null
echo E2E-IO-DONE
while true; do sleep 1; done
"""


@pytest.fixture
def shm() -> Iterator[Path]:
    """The guest memory file QEMU creates; removed afterwards whatever happened."""
    if not Path("/dev/shm").is_dir():
        require_e2e("no /dev/shm for the guest's memory file")
    path = Path("/dev/shm") / f"vs-inspect-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _initrd(guest: GuestTools, tmp: Path) -> Path:
    return build_initramfs(
        tmp / "initrd.cpio",
        init_script=INIT_PRELUDE + WORKLOAD,
        busybox=guest.busybox,
        modules=guest.kit.module_paths(["virtio_pci", "virtio_blk"]),
    )


def _image(path: Path, mib: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(mib << 20))
    return path


def _inspect(*args: str) -> dict[str, Any]:
    """The inspector's documented command line, under a hard timeout."""
    proc = subprocess.run(
        [sys.executable, "-m", "virtio_schema.inspect", "--json", *args],
        capture_output=True,
        text=True,
        timeout=INSPECT_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


class RecordingQMP(QMPClient):
    """A QMP client that keeps every command with QEMU's answer (for ``tests/data``)."""

    def __init__(self, path: str) -> None:
        self.exchanges: list[dict[str, JSON]] = []
        super().__init__(path, timeout=30.0)

    def execute(self, command: str, arguments: Mapping[str, JSON] | None = None) -> JSON:
        entry: dict[str, JSON] = {"execute": command}
        if arguments is not None:
            entry["arguments"] = dict(arguments)
        self.exchanges.append(entry)
        try:
            value = super().execute(command, arguments)
        except QMPCommandError as exc:
            entry["error"] = {"class": exc.error_class, "desc": exc.desc}
            raise
        entry["return"] = value
        return value


_BITS = {"next": 1, "write": 2, "indirect": 4, "avail": 1 << 7, "used": 1 << 15}


def _mask(names: Iterator[str] | list[str] | frozenset[str]) -> int:
    """Flag names (the inspector adds unnamed bits as hex) as a mask of the bits QEMU names."""
    mask = 0
    for name in names:
        mask |= _BITS[name] if name in _BITS else int(name, 16)
    return mask & sum(_BITS.values())


def _ours(chain: dict[str, Any]) -> list[tuple[int, int, int]]:
    """The inspector's descriptors as QEMU walks them: an indirect head is replaced by its table
    (QEMU follows only an indirect descriptor at the head, and does not list it)."""
    descs = chain["descriptors"]
    if descs and "indirect" in descs[0]["flags"] and "indirect" in descs[0]:
        descs = descs[0]["indirect"]
    return [(d["addr"], d["len"], _mask(d["flags"])) for d in descs]


def _theirs(element: QueueElement) -> list[tuple[int, int, int]]:
    return [(d.addr, d.len, _mask(d.flags)) for d in element.chain_order()]


@pytest.mark.parametrize("variant", ["indirect", "direct"])
def test_inspector_and_qemu_agree_on_every_avail_slot(
    guest: GuestTools, short_tmp: Path, shm: Path, variant: str
) -> None:
    image = _image(short_tmp / "disk.img", 8, 1)
    spare = _image(short_tmp / "spare.img", 1, 2)
    qmp_sock = short_tmp / "qmp.sock"
    extra = ",indirect_desc=off" if variant == "direct" else ""
    vm = start_guest(
        guest.kit,
        _initrd(guest, short_tmp),
        [
            "-drive",
            f"file={image},format=raw,if=none,id=d0",
            "-device",
            f"virtio-blk-pci,drive=d0,id=blk0{extra}",
            # a second, packed-ring disk: the inspector must take the format from QEMU
            "-drive",
            f"file={spare},format=raw,if=none,id=d1",
            "-device",
            "virtio-blk-pci,drive=d1,id=blk1,packed=on",
        ],
        timeout=GUEST_TIMEOUT,
        mem_path=shm,
        qmp=qmp_sock,
    )
    try:
        assert vm.wait_for("E2E-IO-DONE"), vm.console()[-3000:]
        with RecordingQMP(str(qmp_sock)) as qmp:
            qmp.execute("stop")
            devices = {d.path: d.name for d in qmp.virtio_devices()}
            assert devices == {BLK0: "virtio-blk", BLK1: "virtio-blk"}
            assert not qmp.virtio_status(BLK0).packed
            assert qmp.virtio_status(BLK1).packed
            status = qmp.queue_status(BLK0, 0)
            packed_status = qmp.queue_status(BLK1, 0)
            elements: dict[int, QueueElement | QMPCommandError] = {}
            for k in range(status.num):
                try:
                    elements[k] = qmp.queue_element(BLK0, 0, k)
                except QMPCommandError as exc:  # e.g. an indirect table it cannot map
                    elements[k] = exc
            with pytest.raises(QMPCommandError, match="Packed"):
                qmp.queue_element(BLK1, 0, 0)
            with pytest.raises(QMPCommandError, match="virtqueue number"):
                qmp.queue_status(BLK0, 7)
            with pytest.raises(QMPCommandError, match="/nope"):
                qmp.virtio_status("/nope")
            events = list(qmp.events)
            exchanges = qmp.exchanges
        doc = _inspect(
            "--mem", str(shm), "--qmp", str(qmp_sock), "--path", BLK0, "--queue", "0",
            *(f"--index={k}" for k in range(status.num)),
        )  # fmt: skip
        packed_doc = _inspect("--mem", str(shm), "--qmp", str(qmp_sock), "--path", BLK1)
    finally:
        result = vm.kill()
    why = f"guest console (tail):\n{result.tail(20)}"
    assert not result.timed_out, why
    assert any(e.get("event") == "STOP" for e in events if isinstance(e, dict))

    # the ring is where QEMU says, and QEMU, being the device, has completed every request
    assert doc["format"] == "split"
    assert doc["size"] == status.num == 256
    assert doc["addresses"] == {"desc": status.desc, "avail": status.avail, "used": status.used}
    assert doc["qemu"]["last_avail_idx"] == status.last_avail_idx
    assert doc["avail"]["idx"] == doc["used"]["idx"] == status.last_avail_idx == status.used_idx
    assert doc["in_flight"] == 0
    assert status.last_avail_idx >= status.num, "not every avail slot has held a chain"

    # every slot: the same head and the same descriptors as QEMU's own decoding
    chains = {c["avail_idx"]: c for c in doc["chains"]}
    assert sorted(chains) == list(range(status.num))
    heads = set()
    indirect_heads = 0
    for k, element in elements.items():
        chain = chains[k]
        if isinstance(element, QMPCommandError):
            assert chain["error"] is not None, (k, element, chain)
            continue
        assert element.avail_idx == doc["avail"]["idx"]
        assert element.used_idx == doc["used"]["idx"]
        assert chain["head"] == element.head, k
        assert _ours(chain) == _theirs(element), (k, chain, element)
        heads.add(element.head)
        indirect_heads += "indirect" in chain["descriptors"][0]["flags"]
    assert len(heads) > 1, "requests were never in flight in parallel"
    if variant == "indirect":
        assert indirect_heads == status.num  # Linux uses a table for every request
    else:
        assert indirect_heads == 0
        assert any(len(_ours(c)) >= 3 for c in chains.values())

    # the packed disk: format and place from QEMU too
    assert packed_doc["format"] == "packed"
    assert packed_doc["size"] == packed_status.num
    assert packed_doc["addresses"] == {
        "desc": packed_status.desc,
        "avail": packed_status.avail,
        "used": packed_status.used,
    }
    assert packed_doc["driver_event"]["flags"] in {"enable", "disable", "desc"}

    if UPDATE_DATA and variant == "indirect":
        elements_kept = [e for e in exchanges if e["execute"] == "x-query-virtio-queue-element"]
        kept = [e for e in exchanges if e["execute"] != "x-query-virtio-queue-element"]
        kept += elements_kept[:4]
        record = {
            "comment": "QEMU's QMP answers, recorded by tests/test_e2e_inspect.py"
            " (VIRTIO_SCHEMA_UPDATE_DATA=1): blk0 split, blk1 packed",
            "greeting": qmp.greeting,
            "events": events,
            "exchanges": kept,
        }
        DATA.mkdir(exist_ok=True)
        (DATA / "qemu72_qmp.json").write_text(json.dumps(record, indent=1) + "\n")


_STARTED = re.compile(
    r"ring 0 started \(size (\d+), avail (\d+), desc (0x[0-9a-f]+), avail (0x[0-9a-f]+),"
    r" used (0x[0-9a-f]+)\)"
)


def test_inspector_reads_the_ring_our_blk_backend_serves(
    guest: GuestTools, short_tmp: Path, shm: Path
) -> None:
    image = _image(short_tmp / "disk.img", 8, 3)
    sock = short_tmp / "blk.sock"
    qmp_sock = short_tmp / "qmp.sock"
    capture = short_tmp / "capture.trace"
    backend = BackendProcess(
        ["-m", "virtio_schema.examples.blk", "--vhost-user", str(sock), str(image), "--trace",
         "--capture", str(capture)],
        sock,
        short_tmp / "backend.log",
        timeout=BACKEND_TIMEOUT,
    )  # fmt: skip
    vm = None
    try:
        vm = start_guest(
            guest.kit,
            _initrd(guest, short_tmp),
            [
                "-chardev",
                f"socket,id=c0,path={sock}",
                "-device",
                "vhost-user-blk-pci,chardev=c0,id=blk0",
            ],
            timeout=GUEST_TIMEOUT,
            mem_path=shm,
            qmp=qmp_sock,
        )
        assert vm.wait_for("E2E-IO-DONE"), vm.console()[-3000:]
        # live: the guest idles, the back-end serves; the inspector must not disturb it
        with RecordingQMP(str(qmp_sock)) as qmp:
            assert qmp.virtio_status(BLK0).vhost_started
            vhost = qmp.vhost_queue_status(BLK0, 0)  # reads QEMU's copy only
            exchanges = qmp.exchanges
        live = _inspect("--mem", str(shm), "--qmp", str(qmp_sock), "--path", BLK0)
        after_live = backend.log()
        with RecordingQMP(str(qmp_sock)) as qmp:
            qmp.execute("stop")  # QEMU stops the ring now: GET_VRING_BASE
            base = backend.wait_for_log(
                r"-> GET_VRING_BASE .* index=0 num=(\d+)", 30.0, after=len(after_live)
            )
            assert not qmp.virtio_status(BLK0).vhost_started
            status = qmp.queue_status(BLK0, 0)  # safe now: no back-end running the ring
            with pytest.raises(QMPCommandError, match="not started"):
                qmp.vhost_queue_status(BLK0, 0)
            exchanges += qmp.exchanges[1:]  # without the second qmp_capabilities
            events = list(qmp.events)
            greeting = qmp.greeting
        stopped = _inspect("--mem", str(shm), "--qmp", str(qmp_sock), "--path", BLK0)
    finally:
        result = vm.kill() if vm is not None else None
        backend.stop()
    log = backend.log()
    why = f"back-end log (tail):\n{log[-3000:]}\nguest:\n{result.tail(20) if result else ''}"
    started = _STARTED.findall(log)
    assert started, why
    size, _, desc, avail, used = started[-1]  # the last start is Linux's (after the firmware's)

    # the ring is where the back-end started it (QEMU's addresses, the back-end's translation)
    for doc in (live, stopped):
        assert doc["format"] == "split"
        assert doc["size"] == int(size), why
        assert doc["addresses"] == {"desc": int(desc, 16), "avail": int(avail, 16),
                                    "used": int(used, 16)}, why  # fmt: skip
    assert (vhost.desc, vhost.avail, vhost.used, vhost.num) == (
        int(desc, 16),
        int(avail, 16),
        int(used, 16),
        int(size),
    ), why
    # reading the live ring did not stop it (QEMU's x-query-virtio-queue-status would have)
    assert live["qemu"]["vhost"] is True
    assert "ring 0 stopped" not in after_live[after_live.rindex("ring 0 started") :], why
    assert stopped["qemu"]["vhost"] is False
    # the used ring the back-end wrote is all there: nothing in flight, every request answered
    assert live["in_flight"] == 0
    assert live["avail"]["idx"] == live["used"]["idx"]
    assert live["avail"]["idx"] >= int(size), "not every avail slot has held a chain"
    # the back-end's own count of chains taken (GET_VRING_BASE) is where the driver is
    assert base is not None, why
    assert int(base.group(1)) == live["avail"]["idx"] == stopped["avail"]["idx"], why
    assert status.last_avail_idx == int(base.group(1))  # QEMU took it from the back-end
    assert stopped["qemu"]["last_avail_idx"] == int(base.group(1))
    # the head of each in-ring chain: the inspector sees what the driver wrote
    assert all(c["head"] < int(size) for c in live["chains"])

    # the recorded conversation decodes cleanly, both directions
    text = capture.read_text()
    lines = decode_capture(text)
    assert len(lines) == len(parse_capture(text)) > 20
    for line in lines:
        assert "UNKNOWN(" not in line, line
        assert "<truncated" not in line, line
        assert "<undecodable" not in line, line
        assert " bytes after the message>" not in line, line
    assert any(" -> GET_VRING_BASE " in line and f"num={base.group(1)}" in line for line in lines)
    if UPDATE_DATA:
        DATA.mkdir(exist_ok=True)
        header = (
            "# A real vhost-user conversation: QEMU 7.2 (vhost-user-blk-pci, Linux 6.1 guest) with\n"
            "# python -m virtio_schema.examples.blk --capture; recorded by\n"
            "# tests/test_e2e_inspect.py (VIRTIO_SCHEMA_UPDATE_DATA=1). The firmware starts and\n"
            "# stops the ring, Linux starts it, the VM is stopped over QMP (GET_VRING_BASE).\n"
            "# Format: CONN DIR NFDS HEX (virtio_schema.vhost_user.messages, 'Captures').\n"
        )
        (DATA / "qemu72_vhost_user_blk.trace").write_text(header + text)
        record = {
            "comment": "QEMU's QMP answers for vhost-user-blk-pci (blk0) served by our back-end,"
            " running, then stopped; recorded by tests/test_e2e_inspect.py",
            "greeting": greeting,
            "events": events,
            "exchanges": exchanges,
        }
        (DATA / "qemu72_qmp_vhost_user.json").write_text(json.dumps(record, indent=1) + "\n")
