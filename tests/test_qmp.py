"""The QMP client, and the inspector's ``--qmp`` mode, against a fake QEMU.

The fake is a thread on a unix socket that speaks QMP the way QEMU 7.2 does (greeting, then one
JSON line per answer, echoing the command's ``id``, events before the answer they precede) and
answers with what a real QEMU 7.2 answered: ``tests/data/qemu72_qmp.json`` (QEMU's own
virtio-blk-pci: ``blk0`` split, ``blk1`` packed) and ``tests/data/qemu72_qmp_vhost_user.json``
(vhost-user-blk-pci served by our back-end, running then stopped), both recorded by
``tests/test_e2e_inspect.py``. Where the inspector must read a ring, the recorded answer keeps its
shape and gets the addresses of a ring the fake driver built.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtio_schema import inspect
from virtio_schema.fake_queue import FakeDriver, FakePackedDriver, make_queue
from virtio_schema.qmp import QMPClient, QMPCommandError, QMPError
from virtio_schema.schema import Feature

DATA = Path(__file__).parent / "data"
BLK0 = "/machine/peripheral/blk0/virtio-backend"
BLK1 = "/machine/peripheral/blk1/virtio-backend"

Exchange = dict[str, Any]


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / name).read_text())
    return doc


def _key(request: dict[str, Any]) -> str:
    return json.dumps([request.get("execute"), request.get("arguments")], sort_keys=True)


class FakeQMP:
    """QEMU's end of a QMP socket, answering from recorded exchanges (in order, per command and
    arguments; the last one repeats). ``mode`` breaks it on purpose: ``"silent"`` never answers
    a command, ``"mute"`` not even greets, ``"hangup"`` closes after the greeting, ``"garbage"``
    answers with a line that is not JSON."""

    def __init__(
        self, path: Path, recording: dict[str, Any], exchanges: list[Exchange], mode: str = ""
    ) -> None:
        self.greeting = recording["greeting"]
        self.events = recording["events"]
        self.answers: dict[str, list[Exchange]] = {}
        for e in exchanges:
            self.answers.setdefault(_key(e), []).append(e)
        self.mode = mode
        self.requests: list[dict[str, Any]] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(0.1)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        self._thread.join(15)
        self._listener.close()

    def _answer(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if request.get("execute") == "stop":
            out += self.events  # QEMU sends STOP before the answer
        queue = self.answers.get(_key(request))
        if not queue:
            name = request.get("execute")
            reply: dict[str, Any] = {
                "error": {
                    "class": "CommandNotFound",
                    "desc": f"The command {name} has not been found",
                }
            }
        else:
            e = queue.pop(0) if len(queue) > 1 else queue[0]
            reply = {"return": e["return"]} if "return" in e else {"error": e["error"]}
        if "id" in request:
            reply["id"] = request["id"]
        return [*out, reply]

    def _serve(self) -> None:
        while not self._done.is_set():  # one connection at a time, like QEMU's QMP socket
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._converse(conn)

    def _converse(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        if self.mode == "mute":
            self._done.wait(15)
            return
        conn.sendall(json.dumps(self.greeting).encode() + b"\r\n")
        if self.mode == "hangup":
            return
        buf = b""
        while not self._done.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                request = json.loads(line)
                self.requests.append(request)
                if self.mode and request["execute"] != "qmp_capabilities":
                    if self.mode == "garbage":
                        conn.sendall(b"{not json\r\n")
                    continue  # silent
                for msg in self._answer(request):
                    conn.sendall(json.dumps(msg).encode() + b"\r\n")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vs-qmp-") as d:
        yield Path(d)


@contextlib.contextmanager
def fake_qemu(
    sock_dir: Path,
    recording: dict[str, Any],
    exchanges: list[Exchange] | None = None,
    mode: str = "",
) -> Iterator[tuple[str, FakeQMP]]:
    path = sock_dir / "qmp.sock"
    fake = FakeQMP(
        path, recording, recording["exchanges"] if exchanges is None else exchanges, mode
    )
    try:
        yield str(path), fake
    finally:
        fake.close()
        path.unlink(missing_ok=True)


def _find(exchanges: list[Exchange], execute: str, **arguments: Any) -> Exchange:
    for e in exchanges:
        if e["execute"] == execute and e.get("arguments", {}) == arguments:
            return e
    raise LookupError(execute, arguments)


# --- the client --------------------------------------------------------------------------------


def test_greeting_capabilities_first_and_every_answer_matched_by_id(sock_dir: Path) -> None:
    rec = _load("qemu72_qmp.json")
    with fake_qemu(sock_dir, rec) as (path, fake), QMPClient(path) as qmp:
        version = rec["greeting"]["QMP"]["version"]["qemu"]
        assert qmp.version == (version["major"], version["minor"], version["micro"])
        devices = qmp.virtio_devices()
    assert fake.requests[0]["execute"] == "qmp_capabilities"
    ids = [r["id"] for r in fake.requests]
    assert len(set(ids)) == len(ids)
    recorded = _find(rec["exchanges"], "x-query-virtio")["return"]
    assert [(d.name, d.path) for d in devices] == [(d["name"], d["path"]) for d in recorded]


def test_typed_answers_carry_qemu_72s_values(sock_dir: Path) -> None:
    rec = _load("qemu72_qmp.json")
    ex = rec["exchanges"]
    with fake_qemu(sock_dir, rec) as (path, _), QMPClient(path) as qmp:
        split, packed = qmp.virtio_status(BLK0), qmp.virtio_status(BLK1)
        qs = qmp.queue_status(BLK0, 0)
        element = qmp.queue_element(BLK0, 0, 0)
    # features come as "NAME: description" strings; the packed layout is one of the transports
    for status, p in ((split, BLK0), (packed, BLK1)):
        raw = _find(ex, "x-query-virtio-status", path=p)["return"]
        names = {f.split(":")[0] for f in raw["guest-features"]["transports"]}
        assert status.packed == ("VIRTIO_F_RING_PACKED" in names)
        assert "VIRTIO_F_VERSION_1" in status.guest_features
        assert status.unknown_guest_features == raw["guest-features"]["unknown-dev-features"]
        assert status.vhost_started is False
    assert (split.packed, packed.packed) == (False, True)
    raw_qs = _find(ex, "x-query-virtio-queue-status", path=BLK0, queue=0)["return"]
    assert (qs.desc, qs.avail, qs.used, qs.num) == (
        raw_qs["vring-desc"], raw_qs["vring-avail"], raw_qs["vring-used"], raw_qs["vring-num"]
    )  # fmt: skip
    assert (qs.last_avail_idx, qs.used_idx) == (raw_qs["last-avail-idx"], raw_qs["used-idx"])
    assert qs.shadow_avail_idx == raw_qs["shadow-avail-idx"]
    raw_el = _find(ex, "x-query-virtio-queue-element", path=BLK0, queue=0, index=0)["return"]
    assert element.head == raw_el["index"] == raw_el["avail"]["ring"]
    # QEMU lists the chain backwards: for a blk request the status byte (write, no next) first
    assert [d.addr for d in element.chain_order()] == [d["addr"] for d in raw_el["descs"]][::-1]
    assert "next" not in element.descs[0].flags
    assert all("next" in d.flags for d in element.chain_order()[:-1])


def test_an_event_before_the_answer_is_kept_not_taken_for_it(sock_dir: Path) -> None:
    rec = _load("qemu72_qmp.json")
    with fake_qemu(sock_dir, rec) as (path, _), QMPClient(path) as qmp:
        assert qmp.execute("stop") == {}
        assert [e["event"] for e in qmp.events if isinstance(e, dict)] == ["STOP"]
        assert qmp.queue_status(BLK0, 0).num > 0  # the conversation goes on in step


def test_qemu_errors_are_command_errors_with_class_and_description(sock_dir: Path) -> None:
    rec = _load("qemu72_qmp.json")
    recorded = _find(rec["exchanges"], "x-query-virtio-queue-status", path=BLK0, queue=7)
    with fake_qemu(sock_dir, rec) as (path, _), QMPClient(path) as qmp:
        with pytest.raises(QMPCommandError) as info:
            qmp.queue_status(BLK0, 7)
        assert info.value.error_class == recorded["error"]["class"]
        assert info.value.desc == recorded["error"]["desc"]
        with pytest.raises(QMPCommandError, match="CommandNotFound"):
            qmp.execute("x-no-such-command")


def test_vhost_device_status_and_its_vhost_queue(sock_dir: Path) -> None:
    rec = _load("qemu72_qmp_vhost_user.json")
    raw = _find(rec["exchanges"], "x-query-virtio-vhost-queue-status", path=BLK0, queue=0)
    with fake_qemu(sock_dir, rec) as (path, _), QMPClient(path) as qmp:
        assert qmp.virtio_status(BLK0).vhost_started  # recorded while the back-end ran
        vq = qmp.vhost_queue_status(BLK0, 0)
        assert (vq.desc, vq.avail, vq.used, vq.num) == (
            raw["return"]["desc-phys"], raw["return"]["avail-phys"], raw["return"]["used-phys"],
            raw["return"]["num"],
        )  # fmt: skip
        assert not qmp.virtio_status(BLK0).vhost_started  # then stopped
        assert qmp.queue_status(BLK0, 0).num == vq.num
        with pytest.raises(QMPCommandError, match="not started"):
            qmp.vhost_queue_status(BLK0, 0)


def test_a_missing_field_is_named_never_a_key_error(sock_dir: Path) -> None:
    rec = _load("qemu72_qmp.json")
    exchanges = copy.deepcopy(rec["exchanges"])
    del _find(exchanges, "x-query-virtio-queue-status", path=BLK0, queue=0)["return"]["vring-desc"]
    with (
        fake_qemu(sock_dir, rec, exchanges) as (path, _),
        QMPClient(path) as qmp,
        pytest.raises(QMPError, match="vring-desc"),
    ):
        qmp.queue_status(BLK0, 0)


def test_a_silent_qemu_times_out_instead_of_hanging(sock_dir: Path) -> None:
    rec = _load("qemu72_qmp.json")
    with fake_qemu(sock_dir, rec, mode="silent") as (path, _), QMPClient(path, timeout=0.5) as qmp:
        t0 = time.monotonic()
        with pytest.raises(QMPError, match="no reply"):
            qmp.queue_status(BLK0, 0)
        assert time.monotonic() - t0 < 5


@pytest.mark.parametrize(
    ("mode", "message"), [("mute", "no reply"), ("hangup", "closed|Broken pipe|reset")]
)
def test_no_greeting_or_a_hangup_is_an_error(sock_dir: Path, mode: str, message: str) -> None:
    rec = _load("qemu72_qmp.json")
    with fake_qemu(sock_dir, rec, mode=mode) as (path, _), pytest.raises(QMPError, match=message):
        QMPClient(path, timeout=0.5)


def test_an_answer_that_is_not_json_is_an_error(sock_dir: Path) -> None:
    rec = _load("qemu72_qmp.json")
    with (
        fake_qemu(sock_dir, rec, mode="garbage") as (path, _),
        QMPClient(path) as qmp,
        pytest.raises(QMPError, match="not JSON"),
    ):
        qmp.virtio_devices()


def test_no_socket_is_an_error(sock_dir: Path) -> None:
    with pytest.raises(QMPError, match="cannot connect"):
        QMPClient(str(sock_dir / "absent.sock"), timeout=0.5)


# --- the inspector's --qmp mode ------------------------------------------------------------------


def _ring(driver: FakeDriver | FakePackedDriver) -> tuple[int, int, int]:
    if isinstance(driver, FakePackedDriver):
        return driver.ring_addr, driver.driver_event_addr, driver.device_event_addr
    return driver.desc_addr, driver.avail_addr, driver.used_addr


def _dump(driver: FakeDriver | FakePackedDriver, path: Path) -> int:
    path.write_bytes(bytes(driver.memory.buffers[0]))
    return driver.memory.memory.regions[0].start


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert inspect.main([*argv, "--json"]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def _with_ring(
    rec: dict[str, Any], execute: str, path: str, driver: FakeDriver | FakePackedDriver
) -> list[Exchange]:
    """The recorded exchanges, with the queue status of ``path`` pointing at the fake ring."""
    exchanges: list[Exchange] = copy.deepcopy(rec["exchanges"])
    ret = _find(exchanges, execute, path=path, queue=0)["return"]
    desc, avail, used = _ring(driver)
    if execute == "x-query-virtio-queue-status":
        ret.update({"vring-desc": desc, "vring-avail": avail, "vring-used": used,
                    "vring-num": driver.size})  # fmt: skip
    else:
        ret.update({"desc-phys": desc, "avail-phys": avail, "used-phys": used,
                    "num": driver.size})  # fmt: skip
    return exchanges


@pytest.mark.parametrize("packed", [False, True])
def test_qmp_mode_reads_the_ring_explicit_addresses_would(
    sock_dir: Path, capsys: pytest.CaptureFixture[str], packed: bool
) -> None:
    fq = make_queue(8, packed=packed, features=Feature.INDIRECT_DESC)
    fq.driver.publish([b"hello"], [16])
    fq.driver.publish([b"x" * 16], [512, 1], indirect=True)
    mem = sock_dir / "mem.bin"
    base = _dump(fq.driver, mem)
    rec = _load("qemu72_qmp.json")
    device = BLK1 if packed else BLK0  # the recorded packed and split devices
    exchanges = _with_ring(rec, "x-query-virtio-queue-status", device, fq.driver)
    common = ["--mem", str(mem), "--mem-base", hex(base), "--index", "0", "--index", "1"]
    desc, avail, used = _ring(fq.driver)
    explicit = _run(
        capsys, *common, "--desc", hex(desc), "--avail", hex(avail), "--used", hex(used),
        "--size", str(fq.driver.size), *(["--packed"] if packed else []),
    )  # fmt: skip
    with fake_qemu(sock_dir, rec, exchanges) as (path, fake):
        via_qmp = _run(capsys, *common, "--qmp", path, "--path", device, "--queue", "0")
    qemu = via_qmp.pop("qemu")
    assert via_qmp == explicit
    assert via_qmp["format"] == ("packed" if packed else "split")
    raw = _find(exchanges, "x-query-virtio-queue-status", path=device, queue=0)["return"]
    assert qemu == {
        "path": device, "queue": 0, "vhost": False, "last_avail_idx": raw["last-avail-idx"],
        "shadow_avail_idx": raw["shadow-avail-idx"], "used_idx": raw["used-idx"],
        "inuse": raw["inuse"],
    }  # fmt: skip
    assert [r["execute"] for r in fake.requests][1:] == [
        "x-query-virtio-status", "x-query-virtio-queue-status"
    ]  # fmt: skip
    fq.queue.reset()


def test_qmp_mode_never_asks_a_running_vhost_device_for_its_queue_status(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """QEMU 7.2 answers x-query-virtio-queue-status for a running vhost device by sending
    GET_VRING_BASE, which stops the back-end's ring: the inspector must use the vhost query."""
    fq = make_queue(8)
    fq.driver.publish([b"abc"], [4])
    mem = sock_dir / "mem.bin"
    base = _dump(fq.driver, mem)
    rec = _load("qemu72_qmp_vhost_user.json")
    exchanges = _with_ring(rec, "x-query-virtio-vhost-queue-status", BLK0, fq.driver)
    with fake_qemu(sock_dir, rec, exchanges) as (path, fake):
        doc = _run(capsys, "--mem", str(mem), "--mem-base", hex(base), "--qmp", path,
                   "--path", BLK0)  # fmt: skip
    assert "x-query-virtio-queue-status" not in [r["execute"] for r in fake.requests]
    assert doc["qemu"] == {"path": BLK0, "queue": 0, "vhost": True}
    assert doc["in_flight"] == 1
    assert doc["chains"][0]["error"] is None
    fq.queue.reset()


def test_qmp_mode_errors_name_the_cause(sock_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mem = sock_dir / "mem.bin"
    mem.write_bytes(bytes(4096))
    rec = _load("qemu72_qmp.json")
    exchanges = copy.deepcopy(rec["exchanges"])
    _find(exchanges, "x-query-virtio-queue-status", path=BLK0, queue=0)["return"]["vring-desc"] = 0
    with fake_qemu(sock_dir, rec, exchanges) as (path, _):
        assert inspect.main(["--mem", str(mem), "--qmp", path, "--path", "/nope"]) == 2
        err = _find(exchanges, "x-query-virtio-status", path="/nope")["error"]["desc"]
        assert err in capsys.readouterr().err  # QEMU's own words, passed on
        assert inspect.main(["--mem", str(mem), "--qmp", path, "--path", BLK0]) == 2
        assert "has no ring" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--qmp", "x.sock", "--path", BLK0, "--desc", "0x1000"],
        ["--qmp", "x.sock", "--path", BLK0, "--packed"],
        ["--qmp", "x.sock"],
        ["--desc", "0x1000", "--avail", "0x2000", "--used", "0x3000"],
    ],
)
def test_the_ring_comes_from_addresses_or_from_qmp_not_both(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        inspect.main(["--mem", "/dev/null", *argv])
    assert info.value.code == 2
    assert "--qmp" in capsys.readouterr().err


def test_qmp_mode_takes_indirect_desc_from_the_negotiated_features(sock_dir: Path) -> None:
    rec = _load("qemu72_qmp.json")
    raw = _find(rec["exchanges"], "x-query-virtio-status", path=BLK0)["return"]["guest-features"]
    names = {f.split(":")[0] for f in raw["transports"] + raw.get("dev-features", [])}
    with fake_qemu(sock_dir, rec) as (path, _):
        ring = inspect.ring_from_qmp(path, BLK0, 0)
    assert ring.indirect == ("VIRTIO_RING_F_INDIRECT_DESC" in names)
    assert ring.indirect  # Linux negotiates it with QEMU's virtio-blk
