"""End to end: Linux's ``vmw_vsock_virtio_transport`` in a QEMU guest (TCG) against the example
vsock device (:mod:`virtio_schema.examples.vsock`, behind QEMU's ``-device vhost-user-vsock-pci``).

The host side follows Firecracker's "hybrid vsock": a host program connects to the device's unix
socket ``UDS``, writes ``CONNECT <port>\\n``, reads ``OK <host_port>\\n`` and then has a byte stream to
the guest's listening vsock port; a guest connection to host (CID 2) port ``P`` reaches whoever
listens on the unix socket ``UDS_P``. The guest side is ``tests/data/vsock_tool.c`` (busybox has no
AF_VSOCK), built here with ``gcc -static``; both sides send the same deterministic stream
(:func:`stream`) and compare CRC-32s, and each sends its ``<bytes> <crc32>`` line back after the
other's half-close (``shutdown(SHUT_WR)``), so every transfer is checked at both ends.

One guest serves the whole module (each boot under TCG costs seconds): the fixture ``vsock_guest``
starts the device and the guest, whose ``/init`` reads commands from a second serial port
(``ttyS1``, a unix socket on the host: a control channel that does not depend on the device under
test) and runs each as ``vsock_tool`` in the background; the tool tags its ``VSOCK-RESULT`` lines
with the command's id, and the shell ends with ``E2E-END <id> <exit status>``. Each test drives its
own commands, so tests stay separate (and each may run alone); a failure shows the guest console
and the device's log. The module's last test kills the device process and replugs the vsock
device over QMP (the guest's QEMU has a QMP socket; the device is ``vsock0`` on chardev ``vs0``):
from then on a new device process serves the guest. Throughput of the 4 MiB transfers is printed
and recorded (``record_property``), never asserted.

Skipped with the reason where QEMU, busybox, the kernel (or its vsock modules) or a static-capable
gcc is missing; a failure in CI (``VIRTIO_SCHEMA_REQUIRE_E2E=1``).
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import pytest
from conftest import require_e2e

from virtio_schema.qmp import QMPClient
from virtio_schema.testing.process import BackendProcess
from virtio_schema.testing.qemu import (
    INIT_EPILOGUE,
    INIT_PRELUDE,
    GuestTools,
    RunningGuest,
    build_initramfs,
    start_guest,
)

TOOL_SOURCE = Path(__file__).parent / "data" / "vsock_tool.c"
GUEST_CID = 3
HOST_CID = 2
MODULES = ["virtio_pci", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"]
GUEST_TIMEOUT = 900.0
"""The whole module's guest (the watchdog); every step has its own, shorter, timeout."""
BOOT_TIMEOUT = 120.0
STEP_TIMEOUT = 120.0
MIB = 1 << 20
RecordProperty = Callable[[str, object], None]

# --- the stream and the checksum (the same as in vsock_tool.c) ---------------------------------

_MASK64 = (1 << 64) - 1


@functools.lru_cache(maxsize=32)
def stream(nbytes: int, seed: int) -> bytes:
    """``nbytes`` of the tool's stream: xorshift64 (13, 7, 17) from ``seed ^ 0x9E3779B97F4A7C15``
    (1 if that is 0), each step's state as 8 little-endian bytes."""
    x = (seed ^ 0x9E3779B97F4A7C15) or 1
    words = []
    for _ in range((nbytes + 7) // 8):
        x ^= (x << 13) & _MASK64
        x ^= x >> 7
        x ^= (x << 17) & _MASK64
        words.append(x)
    return struct.pack(f"<{len(words)}Q", *words)[:nbytes]


def summary(data: bytes) -> str:
    """What each side replies after the other's half-close: ``<bytes> <crc32>``."""
    return f"{len(data)} {zlib.crc32(data):08x}"


# --- the guest tool ------------------------------------------------------------------------------


def build_tool(out: Path) -> Path | str:
    """tests/data/vsock_tool.c built as the static binary ``out``; or why it cannot be (a
    missing compiler or static C library: a skip reason). A build error raises."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return "gcc not installed (Debian package gcc), needed for the guest's vsock_tool"
    cmd = [gcc, "-static", "-O2", "-Wall", "-Werror", "-o", str(out), str(TOOL_SOURCE)]
    built = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if built.returncode != 0 and "cannot find -lc" in built.stderr:
        return "no static C library for gcc -static (Debian package libc6-dev)"
    if built.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{built.stderr}")
    return out


@pytest.mark.parametrize(("nbytes", "seed"), [(0, 1), (1, 0), (1000, 7), (MIB + 5, 12345)])
def test_the_tool_makes_the_same_stream_and_checksum_as_this_module(
    vsock_tool: Path, nbytes: int, seed: int
) -> None:
    """The tool's ``selftest`` makes the stream in odd-sized pieces and prints its CRC-32, which
    must be :func:`summary` of :func:`stream`: the two ends of every transfer agree (host only)."""
    run = subprocess.run(
        [str(vsock_tool), "selftest", str(nbytes), str(seed)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"VSOCK-RESULT - selftest {summary(stream(nbytes, seed))}\n"


# --- the guest: a command shell on a second serial port --------------------------------------------

GUEST_SHELL = """
cp /data/vsock_tool /bin/vsock_tool && chmod 755 /bin/vsock_tool
exec 3<>/dev/ttyS1
stty raw -echo clocal <&3
echo E2E-READY
while read -r id args <&3; do
  [ "$id" = quit ] && break
  (VSOCK_TAG=$id vsock_tool $args; echo "E2E-END $id $?") &
done
wait
"""
"""The guest's ``/init`` between the prelude and the epilogue: each line ``ID ARGS`` read from
``ttyS1`` runs ``vsock_tool ARGS`` in the background, tagged ``ID``; ``quit`` ends the guest."""


@dataclass
class Outcome:
    """A finished guest command: its exit status and its ``VSOCK-RESULT`` lines (tag removed)."""

    rc: int
    results: list[str]

    def one(self, what: str) -> list[str]:
        """The fields of the only result line starting with ``what`` (an AssertionError else)."""
        found = [r.split()[1:] for r in self.results if r.split()[:1] == [what]]
        assert len(found) == 1, f"expected one {what!r} line in {self.results}"
        return found[0]


def start_device(tmp: Path, log: str) -> BackendProcess:
    """The device, ``--guest-cid 3``, on ``TMP/vsock.sock`` with the host side on
    ``TMP/vsock.uds`` (the same command line every time), logging to ``TMP/LOG``."""
    return BackendProcess(
        ["-m", "virtio_schema.examples.vsock", "--vhost-user", str(tmp / "vsock.sock"),
         "--guest-cid", str(GUEST_CID), "--uds", str(tmp / "vsock.uds")],
        tmp / "vsock.sock", tmp / log, timeout=GUEST_TIMEOUT + 30,
    )  # fmt: skip


_QEMU_MESSAGE = re.compile(r"qemu-system-[\w.-]+: [^\n]*\n")
"""A message of QEMU's own in the console (see :meth:`VsockGuest.lines`)."""


class VsockGuest:
    """The running guest, its command channel, its QMP socket and the device serving it (the
    last of ``devices``: a test may replace the device process)."""

    def __init__(
        self, vm: RunningGuest, control: socket.socket, devices: list[BackendProcess], tmp: Path
    ) -> None:
        self.vm = vm
        self.devices = devices
        self.tmp = tmp
        self.uds = tmp / "vsock.uds"
        self.qmp = tmp / "qmp.sock"
        self._control = control
        self._ids = 0

    @property
    def device(self) -> BackendProcess:
        return self.devices[-1]

    def start(self, args: str) -> str:
        """Run ``vsock_tool ARGS`` in the guest, in the background; its id."""
        self._ids += 1
        tag = f"c{self._ids}"
        self._control.sendall(f"{tag} {args}\n".encode())
        return tag

    def lines(self) -> list[str]:
        """The guest's console lines so far, without QEMU's own messages: QEMU writes them
        (``qemu-system-x86_64: ...``, e.g. the errors of a dead back-end) to the same stdout as
        the guest's serial console, a whole line at a time but possibly in the middle of a
        guest line."""
        text = _QEMU_MESSAGE.sub("", self.vm.console())
        return [line.strip("\r") for line in text.splitlines()]

    def wait_for(self, marker: str, timeout: float) -> bool:
        """Wait until a guest console line starts with ``marker``; ``False`` if QEMU exits or
        ``timeout`` passes first."""
        end = time.monotonic() + timeout
        while True:
            if any(line.startswith(marker) for line in self.lines()):
                return True
            if self.vm.proc.poll() is not None or time.monotonic() >= end:
                return False
            time.sleep(0.05)

    def wait_result(self, tag: str, what: str, timeout: float = STEP_TIMEOUT) -> None:
        """Wait for command ``tag``'s result line ``what`` (e.g. ``listening``)."""
        assert self.wait_for(f"VSOCK-RESULT {tag} {what}", timeout), (
            f"no {what!r} from {tag}\n{self.explain()}"
        )

    def finish(self, tag: str, timeout: float = STEP_TIMEOUT) -> Outcome:
        """Wait for command ``tag`` to end; its outcome."""
        assert self.wait_for(f"E2E-END {tag} ", timeout), f"{tag} did not end\n{self.explain()}"
        rc = -1
        results = []
        for line in self.lines():
            if line.startswith(f"E2E-END {tag} "):
                rc = int(line.split()[2])
            elif line.startswith(f"VSOCK-RESULT {tag} "):
                results.append(line.split(" ", 2)[2])
        return Outcome(rc, results)

    def run(self, args: str, timeout: float = STEP_TIMEOUT) -> Outcome:
        return self.finish(self.start(args), timeout)

    def explain(self) -> str:
        """The guest console's and the device log's tails, and whether each still runs."""
        console = "\n".join(self.vm.console().splitlines()[-60:])
        qemu = self.vm.proc.poll()
        parts = [
            f"--- guest console (tail; QEMU {'running' if qemu is None else f'exit {qemu}'}) ---",
            console,
        ]
        for k, device in enumerate(self.devices):  # the earlier ones of a restart, then this one
            dev = device.proc.poll()
            log = "\n".join(device.log().splitlines()[-(40 if device is self.device else 15) :])
            parts += [
                f"--- device {k} log (tail; pid {device.pid}"
                f" {'running' if dev is None else f'exit {dev}'}) ---",
                log,
            ]
        return "\n".join(parts)


@pytest.fixture(scope="module")
def vsock_guest(guest: GuestTools, vsock_tool: Path) -> Iterator[VsockGuest]:
    """The device and a guest at its command prompt (:func:`running_guest`)."""
    try:
        guest.kit.module_paths(MODULES)
    except FileNotFoundError as exc:
        require_e2e(f"the guest kernel lacks a module: {exc}")
    with running_guest(guest, vsock_tool) as vg:
        yield vg


@contextlib.contextmanager
def running_guest(guest: GuestTools, vsock_tool: Path) -> Iterator[VsockGuest]:
    """The device (:func:`start_device`) and a guest at its command prompt, with a QMP socket
    (the vsock device is ``vsock0`` on the chardev ``vs0``); both stopped on leaving."""
    modules = guest.kit.module_paths(MODULES)
    with tempfile.TemporaryDirectory(prefix="vs-vsock-") as d:
        tmp = Path(d)
        initrd = build_initramfs(
            tmp / "initrd.cpio",
            init_script=INIT_PRELUDE + GUEST_SHELL + INIT_EPILOGUE,
            busybox=guest.busybox,
            modules=modules,
            files={"/data/vsock_tool": vsock_tool.read_bytes()},
        )
        control_path = tmp / "control.sock"
        args = [
            "-chardev", f"socket,id=vs0,path={tmp / 'vsock.sock'}",
            "-device", "vhost-user-vsock-pci,chardev=vs0,id=vsock0",
            "-chardev", f"socket,id=control,path={control_path}",
            "-serial", "chardev:control",
        ]  # fmt: skip
        devices = [start_device(tmp, "device.log")]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
                server.bind(str(control_path))
                server.listen(1)
                server.settimeout(30)
                with start_guest(
                    guest.kit, initrd, args, timeout=GUEST_TIMEOUT, qmp=tmp / "qmp.sock"
                ) as vm:
                    control, _ = server.accept()  # QEMU connects to it as it starts
                    with control:
                        vg = VsockGuest(vm, control, devices, tmp)
                        assert vm.wait_for("E2E-READY", BOOT_TIMEOUT), (
                            f"the guest did not boot to its prompt\n{vg.explain()}"
                        )
                        yield vg
                        control.sendall(b"quit\n")
                        vm.wait_for("E2E-DONE", 30)
        finally:
            for device in devices:
                device.stop()


# --- the host side -------------------------------------------------------------------------------


@dataclass
class HostConnection:
    """What a host-initiated connection (``CONNECT port``) saw."""

    ok: str  # the line before the stream ("" if the device closed first)
    received: bytes = b""
    seconds: float = 0.0  # from the end of the OK line to EOF


def host_connect(
    uds: Path, port: int, data: bytes | None = None, timeout: float = STEP_TIMEOUT
) -> HostConnection:
    """``CONNECT port`` through the device's unix socket; then, unless the device refused, send
    ``data`` (if any) and half-close, and read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(uds))
        s.sendall(f"CONNECT {port}\n".encode())
        buf = b""
        while b"\n" not in buf:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return HostConnection(buf.decode(errors="replace"), b"")
            buf += chunk
        ok, _, rest = buf.partition(b"\n")
        t0 = time.monotonic()
        if data is not None:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        received = [rest]
        while chunk := s.recv(1 << 16):
            received.append(chunk)
        return HostConnection(
            ok.decode(errors="replace"), b"".join(received), time.monotonic() - t0
        )


@dataclass
class Accepted:
    """A guest connection the host accepted: what came, how long it took (accept to EOF)."""

    data: bytes
    seconds: float


class HostListener:
    """Listens on ``path`` (``UDS_<port>``) for ``count`` guest connections, each served in a
    thread of its own: read to EOF (sleeping ``pause`` seconds before each read: a slow reader),
    reply :func:`summary` of what came, close. What came is in ``accepted``, socket errors (a
    timeout: fewer connections than ``count``) in ``errors``."""

    def __init__(self, path: Path, count: int, pause: float = 0.0) -> None:
        self.path = path
        self.count = count
        self.pause = pause
        self.accepted: list[Accepted] = []
        self.errors: list[OSError] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(count)
        self._server.settimeout(STEP_TIMEOUT)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        try:
            for _ in range(self.count):
                conn, _ = self._server.accept()
                t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._threads.append(t)
                t.start()
        except OSError as exc:
            self.errors.append(exc)

    def _serve(self, conn: socket.socket) -> None:
        t0 = time.monotonic()
        try:
            with conn:
                conn.settimeout(STEP_TIMEOUT)
                chunks = []
                while True:
                    time.sleep(self.pause)
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
                data = b"".join(chunks)
                seconds = time.monotonic() - t0
                conn.sendall(f"{summary(data)}\n".encode())  # the guest half-closed, still reads
                self.accepted.append(Accepted(data, seconds))
        except OSError as exc:
            self.errors.append(exc)

    def close(self, timeout: float = STEP_TIMEOUT) -> None:
        """Wait for the connections (at most ``timeout``), stop listening, remove the socket."""
        end = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, end - time.monotonic()))
        for t in self._threads[1:]:  # the ones started while the first was joined
            t.join(max(0.0, end - time.monotonic()))
        self._server.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds if seconds > 0 else float("inf")


# --- the tests -----------------------------------------------------------------------------------


def test_the_guest_learns_its_cid_from_the_device(vsock_guest: VsockGuest) -> None:
    """The driver reads ``guest_cid`` from the configuration space (``--guest-cid``)."""
    out = vsock_guest.run("cid")
    assert (out.rc, out.one("cid")) == (0, [str(GUEST_CID)]), vsock_guest.explain()


def test_the_host_sends_4_mib_to_a_guest_listener_and_gets_its_summary_after_half_close(
    vsock_guest: VsockGuest, record_property: RecordProperty
) -> None:
    """``CONNECT``, ``OK <port>``, 4 MiB to the guest, ``shutdown(SHUT_WR)``: the guest reads
    to EOF and replies with the byte count and CRC-32 it saw on the still-open reverse direction."""
    vg = vsock_guest
    data = stream(4 * MIB, 11)
    job = vg.start("listen 5001 1 sink")
    vg.wait_result(job, "listening")
    conn = host_connect(vg.uds, 5001, data)
    out = vg.finish(job)
    why = vg.explain()
    assert re.fullmatch(r"OK \d+", conn.ok), f"{conn.ok!r}\n{why}"
    assert conn.received.decode(errors="replace") == f"{summary(data)}\n", why
    assert out.rc == 0, why
    assert out.one("sink")[:2] == summary(data).split(), why
    rate = _mb_per_s(len(data), conn.seconds)
    record_property("host_to_guest_4MiB_MB_per_s", round(rate, 2))
    print(f"vsock host -> guest: 4 MiB in {conn.seconds:.2f} s, {rate:.1f} MB/s")


def test_a_guest_listener_sends_4_mib_to_the_host_and_closes(
    vsock_guest: VsockGuest, record_property: RecordProperty
) -> None:
    """A host-initiated connection carries data the other way: the guest writes 4 MiB and
    closes; the host reads exactly the stream, then EOF."""
    vg = vsock_guest
    data = stream(4 * MIB, 12)
    job = vg.start(f"listen 5002 1 send {len(data)} 12")
    vg.wait_result(job, "listening")
    conn = host_connect(vg.uds, 5002)
    out = vg.finish(job)
    why = vg.explain()
    assert re.fullmatch(r"OK \d+", conn.ok), f"{conn.ok!r}\n{why}"
    assert summary(conn.received) == summary(data), why
    assert conn.received == data, why
    assert out.rc == 0, why
    assert out.one("sent")[:2] == summary(data).split(), why
    rate = _mb_per_s(len(data), conn.seconds)
    record_property("guest_listener_to_host_4MiB_MB_per_s", round(rate, 2))
    print(f"vsock guest -> host (host-initiated): 4 MiB in {conn.seconds:.2f} s, {rate:.1f} MB/s")


def test_the_guest_sends_4_mib_to_a_host_listener_and_gets_its_summary_after_half_close(
    vsock_guest: VsockGuest, record_property: RecordProperty
) -> None:
    """The guest connects to CID 2 port 6001, which the device forwards to ``UDS_6001``; it
    sends 4 MiB and half-closes; the host reads to EOF, checks the stream and replies with its
    summary, which the guest reads and prints."""
    vg = vsock_guest
    data = stream(4 * MIB, 21)
    with HostListener(Path(f"{vg.uds}_6001"), 1) as listener:
        out = vg.run(f"connect {HOST_CID} 6001 {len(data)} 21")
    why = vg.explain()
    assert not listener.errors, f"{listener.errors}\n{why}"
    assert [summary(a.data) for a in listener.accepted] == [summary(data)], why
    assert listener.accepted[0].data == data, why
    assert out.rc == 0, f"{out}\n{why}"
    sent_bytes, sent_crc, usec, *reply = out.one("connected")
    assert [sent_bytes, sent_crc] == summary(data).split(), why
    assert reply == summary(data).split(), why  # the host's line, read after the half-close
    rate = _mb_per_s(len(data), listener.accepted[0].seconds)
    guest_rate = _mb_per_s(len(data), int(usec) / 1e6)
    record_property("guest_to_host_4MiB_MB_per_s", round(rate, 2))
    print(
        f"vsock guest -> host: 4 MiB in {listener.accepted[0].seconds:.2f} s, {rate:.1f} MB/s"
        f" (the guest's clock, connect to reply: {guest_rate:.1f} MB/s)"
    )


def test_four_connections_each_way_at_once(vsock_guest: VsockGuest) -> None:
    """Four guest connections to one host listener and four host connections to one guest
    listener, 1 MiB each, all at the same time: every stream arrives whole at its end."""
    vg = vsock_guest
    n = 4
    guest_sends = {30 + k: stream(MIB, 30 + k) for k in range(n)}
    host_sends = [stream(MIB, 40 + k) for k in range(n)]
    with HostListener(Path(f"{vg.uds}_6002"), n) as listener:
        server = vg.start(f"listen 5003 {n} sink")
        vg.wait_result(server, "listening")
        clients = [vg.start(f"connect {HOST_CID} 6002 {MIB} {seed}") for seed in guest_sends]
        conns: list[HostConnection | BaseException] = [ValueError("not run")] * n

        def connect(k: int) -> None:
            try:
                conns[k] = host_connect(vg.uds, 5003, host_sends[k])
            except OSError as exc:
                conns[k] = exc

        threads = [threading.Thread(target=connect, args=(k,), daemon=True) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(STEP_TIMEOUT)
        outs = [vg.finish(c) for c in clients]
        served = vg.finish(server)
    why = vg.explain()
    # host -> guest
    for k, conn in enumerate(conns):
        assert isinstance(conn, HostConnection), f"host connection {k}: {conn!r}\n{why}"
        assert re.fullmatch(r"OK \d+", conn.ok), f"{k}: {conn.ok!r}\n{why}"
        assert conn.received.decode(errors="replace") == f"{summary(host_sends[k])}\n", why
    assert served.rc == 0, why
    sinks = sorted(" ".join(r.split()[1:3]) for r in served.results if r.startswith("sink "))
    assert sinks == sorted(summary(d) for d in host_sends), why
    # guest -> host
    assert not listener.errors, f"{listener.errors}\n{why}"
    assert sorted(summary(a.data) for a in listener.accepted) == sorted(
        summary(d) for d in guest_sends.values()
    ), why
    for seed, out in zip(guest_sends, outs, strict=True):
        assert out.rc == 0, f"seed {seed}: {out}\n{why}"
        sent_bytes, sent_crc, _, *reply = out.one("connected")
        assert [sent_bytes, sent_crc] == reply == summary(guest_sends[seed]).split(), why


def test_connections_to_ports_nobody_listens_on_are_refused_and_the_device_serves_on(
    vsock_guest: VsockGuest,
) -> None:
    """A guest connection to a host port with no ``UDS_<port>`` listener fails with ECONNRESET
    (the device answers RST); a host ``CONNECT`` to a guest port with no listener is closed
    without an ``OK`` line; then a connection each way works."""
    vg = vsock_guest
    refused = vg.run(f"connect {HOST_CID} 6999 100 1")
    assert (refused.rc, refused.one("connect-failed")) == (1, ["ECONNRESET"]), vg.explain()
    conn = host_connect(vg.uds, 5999, b"never sent")
    assert (conn.ok, conn.received) == ("", b""), f"{conn}\n{vg.explain()}"
    # the device still serves, both ways
    data = stream(64 * 1024, 50)
    job = vg.start("listen 5004 1 sink")
    vg.wait_result(job, "listening")
    again = host_connect(vg.uds, 5004, data)
    assert vg.finish(job).rc == 0, vg.explain()
    assert again.received.decode(errors="replace") == f"{summary(data)}\n", vg.explain()
    with HostListener(Path(f"{vg.uds}_6003"), 1) as listener:
        out = vg.run(f"connect {HOST_CID} 6003 {len(data)} 50")
    assert out.rc == 0, f"{out}\n{vg.explain()}"
    assert [summary(a.data) for a in listener.accepted] == [summary(data)], vg.explain()


SLOW_BYTES = 2 * MIB
SLOW_PAUSE_MS = 20
"""A slow reader sleeps this long before each read of at most 64 KiB: some 32 pauses for
SLOW_BYTES, while the writer could fill the reader's buffers many times over."""


def test_a_slow_guest_reader_gets_every_byte(vsock_guest: VsockGuest) -> None:
    """The host writes 2 MiB as fast as the device takes them to a guest that reads slowly: the
    device may send the guest only what its credit allows (``buf_alloc - (rx_cnt - fwd_cnt)``,
    virtio 1.2, 5.10.6.3; Linux drops what overflows it), so it must stop reading the host's
    unix socket until the guest's credit updates come, and lose nothing."""
    vg = vsock_guest
    data = stream(SLOW_BYTES, 60)
    job = vg.start(f"listen 5005 1 sink {SLOW_PAUSE_MS}")
    vg.wait_result(job, "listening")
    conn = host_connect(vg.uds, 5005, data)
    out = vg.finish(job)
    why = vg.explain()
    assert re.fullmatch(r"OK \d+", conn.ok), f"{conn.ok!r}\n{why}"
    assert conn.received.decode(errors="replace") == f"{summary(data)}\n", why
    assert out.rc == 0, why
    assert out.one("sink")[:2] == summary(data).split(), why


def test_a_slow_host_reader_gets_every_byte(vsock_guest: VsockGuest) -> None:
    """The guest writes 2 MiB to a host program that reads slowly: the device must hold the
    guest back (no credit beyond what it can keep) rather than drop or reorder bytes."""
    vg = vsock_guest
    data = stream(SLOW_BYTES, 61)
    with HostListener(Path(f"{vg.uds}_6004"), 1, pause=SLOW_PAUSE_MS / 1000) as listener:
        out = vg.run(f"connect {HOST_CID} 6004 {len(data)} 61")
    why = vg.explain()
    assert not listener.errors, f"{listener.errors}\n{why}"
    assert [summary(a.data) for a in listener.accepted] == [summary(data)], why
    assert listener.accepted[0].data == data, why
    assert out.rc == 0, f"{out}\n{why}"
    assert out.one("connected")[3:] == summary(data).split(), why


def test_the_device_is_still_serving_and_logged_no_traceback(vsock_guest: VsockGuest) -> None:
    """After everything above (run before the restart, the last test): the device process runs,
    and its log has no Python traceback (a connection's failure must stay that connection's)."""
    assert vsock_guest.device.proc.poll() is None, vsock_guest.explain()
    assert "Traceback" not in vsock_guest.device.log(), vsock_guest.device.log()


# --- the device restarted under the running guest (the module's last test) ----------------------

REPLUG_TIMEOUT = 60.0
"""For the guest to eject the old device (DEVICE_DELETED) and to connect through the new one."""


def _wait_device_deleted(qmp: QMPClient, device_id: str, timeout: float) -> bool:
    """Wait for QMP's ``DEVICE_DELETED`` event of ``device_id`` (the guest ejected it)."""
    end = time.monotonic() + timeout
    while True:
        for event in qmp.events:
            if isinstance(event, dict) and event.get("event") == "DEVICE_DELETED":
                data = event.get("data")
                if isinstance(data, dict) and data.get("device") == device_id:
                    return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.2)
        qmp.execute("query-status")  # reads the events that came meanwhile


def _held_guest_connection(path: Path, nbytes: int, seed: int, timeout: float) -> socket.socket:
    """Accept one guest connection on ``path`` and read to its half-close (checking the
    stream): the guest now waits for a reply, which never comes. The open socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(timeout)
        conn, _ = server.accept()
    path.unlink()
    conn.settimeout(timeout)
    got = bytearray()
    while chunk := conn.recv(1 << 16):
        got += chunk
    assert summary(bytes(got)) == summary(stream(nbytes, seed)), "the held stream differs"
    return conn


def _peer_gone(conn: socket.socket, *, read: bool) -> str:
    """How a host socket whose peer (the device process) is gone ends: with ``read``, ``EOF``
    or the error of a read, else (or if the read gave data) the error of a write; ``''``: the
    socket still works."""
    conn.settimeout(10)
    try:
        if read and conn.recv(1 << 16) == b"":
            return "EOF"
    except OSError as exc:
        return type(exc).__name__
    try:
        conn.sendall(b"still there?\n")
    except OSError as exc:
        return type(exc).__name__
    return ""


def test_the_device_restarted_under_a_running_guest_and_the_guest_reconnects(
    vsock_guest: VsockGuest,
) -> None:
    """The device process dies (SIGKILL) with a stream open each way; a new process starts with
    the same command line, and the vsock PCI device is replugged over QMP (``device_del``, the
    guest ejects it, ``chardev-remove``, ``chardev-add``, ``device_add``): QEMU 7.2's
    vhost-user-vsock cannot reconnect its chardev, and keeps the event queue (the transport
    reset) to itself, so this is how a back-end is restarted under a running guest.

    The open streams end at both ends: on the host when the old process dies (EOF or a
    reset), in the guest when the device is ejected (Linux resets every connected socket:
    ECONNRESET), not before. The guest then probes the new device, reads its CID again and
    connects (retried until the device is there): a transfer each way, checked by CRC at both
    ends, goes through the new process, which logs the streams; the old process is gone."""
    vg = vsock_guest
    old = vg.device
    # 1. a stream each way, open: host -> guest mid-transfer (the guest sinks, the host holds
    #    its end open); guest -> host half-closed, the guest waiting for the host's reply
    sink = vg.start("listen 5020 1 sink")
    vg.wait_result(sink, "listening")
    to_guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held: socket.socket | None = None
    try:
        to_guest.settimeout(STEP_TIMEOUT)
        to_guest.connect(str(vg.uds))
        to_guest.sendall(b"CONNECT 5020\n")
        ok = b""
        while not ok.endswith(b"\n") and (chunk := to_guest.recv(1)):
            ok += chunk
        assert re.fullmatch(rb"OK \d+\n", ok), f"{ok!r}\n{vg.explain()}"
        to_guest.sendall(stream(256 * 1024, 80))
        client = vg.start(f"connect {HOST_CID} 6020 65536 81")
        held = _held_guest_connection(Path(f"{vg.uds}_6020"), 65536, 81, STEP_TIMEOUT)
        assert "guest connected to" in old.log(), vg.explain()

        # 2. the device process dies
        old.proc.kill()  # SIGKILL, by its PID
        assert old.proc.wait(10) == -9, vg.explain()
        t0 = time.monotonic()
        ends = {  # the guest -> host end already read EOF (the guest's half-close): it writes
            "host -> guest": _peer_gone(to_guest, read=True),
            "guest -> host": _peer_gone(held, read=False),
        }
    finally:
        to_guest.close()
        if held is not None:
            held.close()
    assert all(ends.values()), f"host ends still open after the device died: {ends}"
    # the guest is not told: its sockets stay open until the device goes
    assert not vg.wait_for(f"E2E-END {sink} ", 2.0), vg.explain()
    assert not vg.wait_for(f"E2E-END {client} ", 0.1), vg.explain()

    # 3. a new process, the same command line (its stale socket file removed first, because
    #    the harness takes the file's existence as "listening")
    old.stop()
    old.sock.unlink(missing_ok=True)
    vg.devices.append(start_device(vg.tmp, "device-1.log"))
    new = vg.device

    # 4. the replug
    with QMPClient(str(vg.qmp), timeout=30) as qmp:
        qmp.execute("device_del", {"id": "vsock0"})
        assert _wait_device_deleted(qmp, "vsock0", REPLUG_TIMEOUT), (
            f"no DEVICE_DELETED for vsock0 (QMP events {qmp.events})\n{vg.explain()}"
        )
        unplugged = time.monotonic() - t0
        qmp.execute("chardev-remove", {"id": "vs0"})
        qmp.execute(
            "chardev-add",
            {"id": "vs1", "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": str(new.sock)}}, "server": False}}},
        )  # fmt: skip
        qmp.execute("device_add", {"driver": "vhost-user-vsock-pci", "chardev": "vs1",
                                   "id": "vsock1"})  # fmt: skip
    plugged = time.monotonic() - t0
    lost_sink, lost_client = vg.finish(sink), vg.finish(client)
    why = vg.explain()
    assert (lost_sink.rc, lost_sink.one("error")) == (1, ["read", "ECONNRESET"]), why
    assert lost_sink.one("listen-done") == ["5020", "1", "1"], why
    assert (lost_client.rc, lost_client.one("error")) == (1, ["read", "ECONNRESET"]), why

    # 5. the guest connects again through the new device (retried: it probes it meanwhile)
    data_out, data_in = stream(MIB, 82), stream(MIB, 83)
    failures: list[str] = []
    with HostListener(Path(f"{vg.uds}_6021"), 1) as listener:
        end = time.monotonic() + REPLUG_TIMEOUT
        while True:
            out = vg.run(f"connect {HOST_CID} 6021 {len(data_out)} 82")
            if out.rc == 0 or time.monotonic() >= end:
                break
            failures.append(" ".join(out.results))
            time.sleep(0.5)
        reconnected = time.monotonic() - t0
    why = vg.explain()
    assert out.rc == 0, (
        f"no connection within {REPLUG_TIMEOUT} s ({len(failures)} tries:"
        f" {sorted(set(failures))}): {out}\n{why}"
    )
    assert out.one("connected")[3:] == summary(data_out).split(), why
    assert [summary(a.data) for a in listener.accepted] == [summary(data_out)], why
    assert vg.run("cid").one("cid") == [str(GUEST_CID)], why
    job = vg.start("listen 5021 1 sink")
    vg.wait_result(job, "listening")
    conn = host_connect(vg.uds, 5021, data_in)
    out = vg.finish(job)
    why = vg.explain()
    assert re.fullmatch(r"OK \d+", conn.ok), f"{conn.ok!r}\n{why}"
    assert conn.received.decode(errors="replace") == f"{summary(data_in)}\n", why
    assert (out.rc, out.one("sink")[:2]) == (0, summary(data_in).split()), why

    # 6. the new process served both (and stops cleanly: its stats line); the old one is gone
    assert old.proc.poll() == -9, why
    log = new.log()
    assert "front-end connected" in log, why
    assert re.search(r"guest connected to \S+_6021", log), why
    assert "the guest accepted" in log, why
    assert (new.proc.poll(), new.stop()) == (None, 0), why
    stats = re.findall(r"vsock: VsockStats\(streams=(\d+), refused=(\d+)", new.log())
    assert stats == [("2", "0")], new.log()
    assert "Traceback" not in new.log(), new.log()
    print(
        f"vsock restart: ejected {unplugged:.1f} s, replugged {plugged:.1f} s, connected"
        f" {reconnected:.1f} s after the old process died; host ends {ends};"
        f" failed connects: {failures}"
    )
