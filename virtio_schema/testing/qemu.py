"""Run a Linux guest under QEMU against a vhost-user device: kernel, initramfs and a bounded run.

For end-to-end tests of devices (this project's and yours): the guest is a Debian cloud kernel and
a busybox initramfs built here, with a shell script as ``/init`` that loads the virtio modules, runs
a workload and powers off. Everything the guest prints on its serial console comes back to the
caller, so a test can look for its own markers and show the console when something fails.

* :func:`find_kernel` locates (and with ``fetch=True`` downloads with ``apt-get download`` and
  unpacks with ``dpkg-deb -x``) the kernel and its modules into a cache directory;
* :func:`build_initramfs` writes a newc cpio archive (no ``cpio`` binary needed) with the static
  busybox, the requested modules in dependency order, extra files and the ``/init`` script;
* :func:`run_guest` starts ``qemu-system-x86_64 -accel tcg`` with memfd guest memory shared with
  vhost-user back-ends, under a hard timeout, and kills exactly the process it started;
  :func:`start_guest` does the same without waiting (a :class:`RunningGuest` with a watchdog), for
  tests that talk to the running VM, optionally with its memory in a file (``mem_path``, e.g. in
  ``/dev/shm``) and a QMP socket (``qmp``).

Nothing here runs unless called; importing it needs only the standard library.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from virtio_schema._cli import progress

__all__ = [
    "DEFAULT_CACHE",
    "INIT_EPILOGUE",
    "INIT_PRELUDE",
    "GuestResult",
    "GuestTools",
    "KernelKit",
    "RunningGuest",
    "build_initramfs",
    "find_busybox",
    "find_guest_tools",
    "find_kernel",
    "qemu_binary",
    "qemu_command",
    "run_guest",
    "start_guest",
]

DEFAULT_CACHE = Path(
    os.environ.get("VIRTIO_SCHEMA_GUEST_CACHE", Path.home() / ".cache" / "virtio_schema")
)
"""Where the downloaded kernel is unpacked (``VIRTIO_SCHEMA_GUEST_CACHE`` overrides)."""

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True)
class KernelKit:
    """A kernel image and its module tree."""

    vmlinuz: Path
    modules: Path  # .../lib/modules/<version>
    version: str

    def module_paths(self, names: list[str]) -> list[Path]:
        """The ``.ko`` files for ``names`` and everything they depend on, in load order (read
        from each module's ``depends=`` modinfo string: Debian's package ships no modules.dep)."""
        index = {
            ko.name.removesuffix(".ko").replace("-", "_"): ko for ko in self.modules.rglob("*.ko")
        }
        order: list[Path] = []

        def visit(name: str) -> None:
            ko = index.get(name.replace("-", "_"))
            if ko is None:
                raise FileNotFoundError(f"module {name} not in {self.modules}")
            if ko in order:
                return
            for dep in _modinfo_depends(ko):
                visit(dep)
            order.append(ko)

        for name in names:
            visit(name)
        return order


def _modinfo_depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    end = data.index(b"\0", at + 1)
    value = data[at + len(b"\0depends=") : end].decode()
    return [d for d in value.split(",") if d]


def qemu_binary() -> str | None:
    """Path of ``qemu-system-x86_64``, or ``None``."""
    return shutil.which("qemu-system-x86_64")


def find_busybox() -> Path | None:
    """A statically linked busybox (Debian package ``busybox-static``), or ``None``."""
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.exists() and b"ld-linux" not in p.read_bytes()[:8192]:  # no ELF interpreter
            return p
    return None


@dataclass(frozen=True)
class GuestTools:
    """What booting a guest needs from the host: the kernel kit and a static busybox."""

    kit: KernelKit
    busybox: Path


def find_guest_tools(*, fetch: bool = False) -> GuestTools | str:
    """The kernel kit and busybox, or a sentence saying what is missing and which Debian package
    or command provides it (for a test's skip reason). ``fetch`` as for :func:`find_kernel`."""
    if qemu_binary() is None:
        return "qemu-system-x86_64 not installed (Debian package qemu-system-x86)"
    busybox = find_busybox()
    if busybox is None:
        return "no static busybox (Debian package busybox-static)"
    kit = find_kernel(fetch=fetch)
    if kit is None:
        return "no Debian cloud kernel in the cache (run .ci/run as root, or python3 dev.py guest)"
    return GuestTools(kit, busybox)


def find_kernel(cache: Path = DEFAULT_CACHE, *, fetch: bool = False) -> KernelKit | None:
    """The cached cloud kernel, fetching it first if asked and possible; ``None`` if absent."""
    root = cache / "kernel"
    kit = _kit_in(root)
    if kit is not None or not fetch:
        return kit
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return None
    dep = subprocess.run(
        ["apt-cache", "depends", "--important", KERNEL_META_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    names = [
        line.split(":", 1)[1].strip()
        for line in dep.stdout.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    ]
    if not names:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(
            ["apt-get", "download", names[0]], cwd=tmp, capture_output=True, text=True, check=False
        )
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not debs:
            return None
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    return _kit_in(root)


def _kit_in(root: Path) -> KernelKit | None:
    images = sorted(root.glob("boot/vmlinuz-*"))
    if not images:
        return None
    version = images[-1].name.removeprefix("vmlinuz-")
    modules = root / "lib" / "modules" / version
    if not modules.is_dir():
        return None
    return KernelKit(images[-1], modules, version)


# --- initramfs -----------------------------------------------------------------------------------


class _Cpio:
    """A newc-format cpio archive writer (the format the kernel unpacks as initramfs)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.data += b"070701" + b"".join(b"%08X" % f for f in fields)
        self.data += name.encode() + b"\0"
        self.data += b"\0" * (-len(self.data) % 4)
        self.data += body
        self.data += b"\0" * (-len(self.data) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, body)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


def build_initramfs(
    out: Path,
    *,
    init_script: str,
    busybox: Path,
    modules: list[Path] = (),  # type: ignore[assignment]
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write an initramfs to ``out``: busybox at ``/bin/busybox``, ``modules`` under
    ``/lib/modules`` (their load order is written to ``/lib/modules/order``), ``files`` at the
    given absolute paths, and ``init_script`` as ``/init``."""
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "data"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    names = []
    for ko in modules:
        cpio.file(f"lib/modules/{ko.name}", ko.read_bytes())
        names.append(ko.name)
    cpio.file("lib/modules/order", ("\n".join(names) + "\n").encode())
    for path, body in (files or {}).items():
        cpio.file(path.lstrip("/"), body)
    cpio.file("init", init_script.encode(), 0o755)
    out.write_bytes(cpio.finish())
    return out


INIT_PRELUDE = """#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m || echo "E2E-INSMOD-FAILED $m"; done
"""
"""The start of every ``/init``: busybox applets, the pseudo file systems, the modules."""

INIT_EPILOGUE = """
sync
echo E2E-DONE
poweroff -f
"""
"""The end of every ``/init``: flush and power off (QEMU then exits)."""


# --- running -----------------------------------------------------------------------------------


@dataclass
class GuestResult:
    """What a guest run produced."""

    console: str
    returncode: int | None
    timed_out: bool
    seconds: float

    def lines(self, marker: str) -> list[str]:
        """The console lines starting with ``marker`` (marker removed, stripped)."""
        out = []
        for line in self.console.splitlines():
            line = line.strip("\r")
            if line.startswith(marker):
                out.append(line[len(marker) :].strip())
        return out

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-n:])


def qemu_command(
    kit: KernelKit,
    initrd: Path,
    device_args: list[str],
    *,
    memory_mib: int = 256,
    append: str = "",
    qemu: str | None = None,
    mem_path: Path | None = None,
    qmp: Path | None = None,
    smp: int = 1,
    hotplug_slots: int = 0,
) -> list[str]:
    """The QEMU command line :func:`run_guest` and :func:`start_guest` run.

    Guest memory is a shared memfd, or with ``mem_path`` a shared file (e.g. in ``/dev/shm``) that
    another process, such as :mod:`virtio_schema.inspect`, can map; ``qmp`` adds a QMP server on
    that unix socket path (QEMU creates it and does not wait for a client). ``smp``: virtual
    CPUs. ``hotplug_slots``: DIMM slots for memory added while the guest runs (up to 1 GiB in
    all; QMP ``object_add`` of a shared memory backend, then ``device_add pc-dimm``)."""
    binary = qemu or qemu_binary()
    if binary is None:
        raise FileNotFoundError("qemu-system-x86_64 is not installed")
    if mem_path is None:
        backend = f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on"
    else:
        backend = f"memory-backend-file,id=mem,size={memory_mib}M,mem-path={mem_path},share=on"
    cmd = [
        binary,
        "-accel", "tcg",
        "-machine", "pc,memory-backend=mem",
        "-m", f"{memory_mib}M" + (f",slots={hotplug_slots},maxmem=1G" if hotplug_slots else ""),
        "-object", backend,
        "-smp", str(smp),
        "-display", "none",
        "-vga", "none",
        "-serial", "stdio",
        "-monitor", "none",
        "-no-reboot",
        "-nodefaults",
        "-kernel", str(kit.vmlinuz),
        "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 loglevel=4 {append}".strip(),
    ]  # fmt: skip
    if qmp is not None:
        cmd += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return cmd + device_args


_PROGRESS_EVERY = 10.0
"""Seconds between two progress lines of a running guest (on a terminal only: a test's or a log's
output stays the summary)."""


class RunningGuest:
    """A QEMU process started by :func:`start_guest`, with its console collected as it runs.

    A watchdog kills the process (by its PID, SIGKILL) ``timeout`` seconds after the start,
    whatever the caller is doing; :meth:`kill` ends it earlier. Use it as a context manager (the
    exit kills) or call :meth:`kill` in a ``finally`` block."""

    def __init__(self, cmd: list[str], timeout: float) -> None:
        self.timeout = timeout
        self._t0 = time.monotonic()
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self.timed_out = False
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._reader = threading.Thread(target=self._read, name="qemu-console", daemon=True)
        self._reader.start()
        self._watchdog = threading.Timer(timeout, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        shown = self._t0
        while chunk := os.read(out.fileno(), 65536):
            with self._lock:
                self._chunks.append(chunk)
            now = time.monotonic()
            if now - shown >= _PROGRESS_EVERY:  # a long guest run shows it is alive (a terminal)
                shown = now
                last = chunk.decode(errors="replace").strip().splitlines()[-1:] or [""]
                progress(
                    f"guest (QEMU pid {self.proc.pid}) at {now - self._t0:.0f} s: {last[0][:100]}"
                )

    def _expire(self) -> None:
        if self.proc.poll() is None:
            self.timed_out = True
            self.proc.kill()

    def console(self) -> str:
        """Everything the guest printed so far."""
        with self._lock:
            data = b"".join(self._chunks)
        return data.decode(errors="replace")

    def wait_for(self, marker: str, timeout: float | None = None) -> bool:
        """Wait until a console line starts with ``marker``; ``False`` if QEMU exits or
        ``timeout`` (default: until the watchdog) passes first."""
        end = self._t0 + self.timeout if timeout is None else time.monotonic() + timeout
        while True:
            text = self.console()
            if any(line.strip("\r").startswith(marker) for line in text.splitlines()):
                return True
            if self.proc.poll() is not None or time.monotonic() >= end:
                return False
            time.sleep(0.05)

    def wait(self) -> GuestResult:
        """Wait for QEMU to exit (at most until the watchdog kills it) and return the result."""
        self.proc.wait()
        return self._finish()

    def kill(self) -> GuestResult:
        """Kill QEMU now (if still running) and return the result so far."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        return self._finish()

    def _finish(self) -> GuestResult:
        self._watchdog.cancel()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return GuestResult(
            self.console(), self.proc.returncode, self.timed_out, time.monotonic() - self._t0
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def start_guest(
    kit: KernelKit,
    initrd: Path,
    device_args: list[str],
    *,
    timeout: float = 180.0,
    memory_mib: int = 256,
    append: str = "",
    qemu: str | None = None,
    mem_path: Path | None = None,
    qmp: Path | None = None,
    smp: int = 1,
    hotplug_slots: int = 0,
) -> RunningGuest:
    """Start the guest without waiting for it (see :func:`qemu_command` for the options): for a
    test that talks to the running VM (QMP, reading its memory) before it ends it."""
    cmd = qemu_command(
        kit, initrd, device_args, memory_mib=memory_mib, append=append, qemu=qemu,
        mem_path=mem_path, qmp=qmp, smp=smp, hotplug_slots=hotplug_slots,
    )  # fmt: skip
    return RunningGuest(cmd, timeout)


def run_guest(
    kit: KernelKit,
    initrd: Path,
    device_args: list[str],
    *,
    timeout: float = 180.0,
    memory_mib: int = 256,
    append: str = "",
    qemu: str | None = None,
    mem_path: Path | None = None,
    qmp: Path | None = None,
    smp: int = 1,
) -> GuestResult:
    """Boot the guest with ``device_args`` (``-chardev``/``-device`` pairs for vhost-user
    devices) and wait for it to power off, at most ``timeout`` seconds (then QEMU is killed)."""
    guest = start_guest(
        kit, initrd, device_args, timeout=timeout, memory_mib=memory_mib, append=append,
        qemu=qemu, mem_path=mem_path, qmp=qmp, smp=smp,
    )  # fmt: skip
    try:
        return guest.wait()
    finally:
        guest.kill()
