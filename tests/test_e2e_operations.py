"""End to end: what happens to a running guest's devices in real deployments (docs/operations.rst).

A disk that grows under the running guest (the configuration change notification on the back-end
channel), a guest with two vCPUs doing file-system I/O on two request queues (multi-queue), memory
hot-added to the guest, the back-end killed and restarted under a writing guest (inflight
tracking), and a live migration between two QEMUs (the dirty log), as Linux in QEMU (TCG) sees
them, against the example blk back-end started as a separate process.
Every guest has a hard timeout; skipped with the reason where QEMU, busybox or the kernel is
missing (a failure in CI, which installs them).
"""

from __future__ import annotations

import hashlib
import random
import re
import signal
import time
from pathlib import Path

import pytest

from virtio_schema.qmp import QMPClient
from virtio_schema.testing.process import BackendProcess
from virtio_schema.testing.qemu import (
    INIT_EPILOGUE,
    INIT_PRELUDE,
    GuestResult,
    GuestTools,
    build_initramfs,
    start_guest,
)

GUEST_TIMEOUT = 150.0
SECTOR = 512


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _blk_backend(tmp: Path, image: Path, *args: str) -> BackendProcess:
    sock = tmp / "blk.sock"
    return BackendProcess(
        ["-m", "virtio_schema.examples.blk", "--vhost-user", str(sock), str(image), *args],
        sock,
        tmp / "backend.log",
        timeout=GUEST_TIMEOUT + 30,
    )


def _explain(result: GuestResult, backend: BackendProcess) -> str:
    return (
        f"guest exit={result.returncode} timed_out={result.timed_out} after {result.seconds:.1f}s\n"
        f"--- guest console (tail) ---\n{result.tail()}\n--- back-end log (tail) ---\n"
        + "\n".join(backend.log().splitlines()[-30:])
    )


# --- a disk that grows under the guest ----------------------------------------------------------

GROW_MIB = 1
RESIZE_WORKLOAD = f"""
before=$(cat /sys/block/vda/size)
echo "E2E-SIZE-BEFORE $before"
i=0
while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done
after=$(cat /sys/block/vda/size)
echo "E2E-SIZE-AFTER $after"
dd if=/dev/vda bs=4096 skip=$((before / 8)) count={GROW_MIB * 256} iflag=direct 2>/dev/null | sha256sum | sed 's/^/E2E-SHA-NEW /'
"""


def test_a_disk_grown_on_the_host_reaches_the_running_guest(
    guest: GuestTools, short_tmp: Path
) -> None:
    """The image grows while the guest runs: the back-end (``--watch``) sends a configuration
    change on the back-end channel, QEMU reads the new capacity and tells Linux, which shows it
    in ``/sys/block/vda/size`` and reads the new sectors, without a reboot."""
    rng = random.Random(20)
    image = short_tmp / "disk.img"
    image.write_bytes(rng.randbytes(8 << 20))
    grown = rng.randbytes(GROW_MIB << 20)
    initrd = build_initramfs(
        short_tmp / "initrd.cpio",
        init_script=INIT_PRELUDE + RESIZE_WORKLOAD + INIT_EPILOGUE,
        busybox=guest.busybox,
        modules=guest.kit.module_paths(["virtio_pci", "virtio_blk"]),
    )
    with _blk_backend(short_tmp, image, "--watch", "0.2") as backend:
        chardev = f"socket,id=dev0,path={short_tmp / 'blk.sock'}"
        device = ["-chardev", chardev, "-device", "vhost-user-blk-pci,chardev=dev0"]
        with start_guest(guest.kit, initrd, device, timeout=GUEST_TIMEOUT) as vm:
            assert vm.wait_for("E2E-SIZE-BEFORE"), vm.console()[-3000:]
            with image.open("ab") as f:
                f.write(grown)
            result = vm.wait()
        backend.stop()
    why = _explain(result, backend)
    assert result.lines("E2E-SIZE-BEFORE") == [str((8 << 20) // SECTOR)], why
    assert result.lines("E2E-SIZE-AFTER") == [str((9 << 20) // SECTOR)], why
    assert result.lines("E2E-SHA-NEW") == [f"{_sha(grown)}  -"], why
    assert result.lines("E2E-DONE") == [""], why
    assert "configuration change sent to the front-end" in backend.log(), why


# --- two request queues, two vCPUs ----------------------------------------------------------------

FILE_KIB = 512
MQ_WORKLOAD = """
echo "E2E-MQ $(ls /sys/block/vda/mq | tr '\\n' ' ')"
mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && echo E2E-MOUNTED
for cpu in 0 1; do
  (taskset -c $cpu dd if=/data/f$cpu of=/mnt/f$cpu bs=4096 oflag=direct 2>/dev/null;
   taskset -c $cpu dd if=/mnt/f$cpu bs=4096 iflag=direct 2>/dev/null | sha256sum | sed "s/^/E2E-SHA-F$cpu /") &
done
wait
umount /mnt && mount -t ext4 -o ro /dev/vda /mnt
for cpu in 0 1; do sha256sum /mnt/f$cpu | sed "s/^/E2E-SHA-AGAIN-F$cpu /"; done
umount /mnt
"""


@pytest.mark.parametrize("threads", [False, True], ids=["one-thread", "worker-threads"])
def test_two_vcpus_do_file_system_io_on_two_request_queues(
    guest: GuestTools, short_tmp: Path, threads: bool
) -> None:
    """QEMU's ``num-queues=2`` on a two-vCPU guest: Linux maps a request queue to each CPU; a
    writer pinned to each CPU writes and reads back its file on an ext2 file system (made by
    ``mke2fs``, mounted by the ext4 driver; O_DIRECT,
    so the requests leave from that CPU), and the back-end serves requests on both queues: on
    its one thread, or (``--threads``) each queue on a worker thread of its own."""
    image = short_tmp / "disk.img"
    image.write_bytes(bytes(32 << 20))
    rng = random.Random(21)
    files = {f"/data/f{cpu}": rng.randbytes(FILE_KIB << 10) for cpu in (0, 1)}
    initrd = build_initramfs(
        short_tmp / "initrd.cpio",
        init_script=INIT_PRELUDE + MQ_WORKLOAD + INIT_EPILOGUE,
        busybox=guest.busybox,
        modules=guest.kit.module_paths(["virtio_pci", "virtio_blk"]),
        files=files,
    )
    with _blk_backend(short_tmp, image, *(["--threads"] if threads else [])) as backend:
        chardev = f"socket,id=dev0,path={short_tmp / 'blk.sock'}"
        device = ["-chardev", chardev, "-device", "vhost-user-blk-pci,chardev=dev0,num-queues=2"]
        with start_guest(guest.kit, initrd, device, timeout=GUEST_TIMEOUT, smp=2) as vm:
            result = vm.wait()
        backend.stop()
    why = _explain(result, backend)
    assert result.lines("E2E-MQ") == ["0 1"], why
    assert result.lines("E2E-MOUNTED") == [""], why
    for cpu in (0, 1):
        want = _sha(files[f"/data/f{cpu}"])
        assert result.lines(f"E2E-SHA-F{cpu}") == [f"{want}  -"], why
        assert result.lines(f"E2E-SHA-AGAIN-F{cpu}") == [f"{want}  /mnt/f{cpu}"], why
    served = {
        int(m[1]): int(m[2])
        for m in re.finditer(r"queue (\d+): (\d+) requests served", backend.log())
    }
    assert served.keys() == {0, 1}, why
    assert min(served.values()) > 0, why
    assert ("a worker thread per queue" in backend.log()) == threads, why
    assert result.lines("E2E-DONE") == [""], why


# --- memory hot-added to the running guest -------------------------------------------------------

HOT_MIB = 128  # one memory block of the x86-64 guest (block_size_bytes)
HOT_PATTERN_SECTOR = 2048  # 1 MiB into the disk
HOTPLUG_WORKLOAD = """
before=$(ls -d /sys/devices/system/memory/memory* | wc -l)
echo "E2E-READY $before"
i=0
while [ $(ls -d /sys/devices/system/memory/memory* | wc -l) -le $before ] && [ $i -lt 600 ]; do usleep 100000; i=$((i+1)); done
for m in /sys/devices/system/memory/memory*; do
  [ "$(cat $m/state)" = offline ] && echo online_movable > $m/state && echo "E2E-ONLINED $(basename $m)"
done
for i in 1 2 3 4; do
  dd if=/dev/vda bs=1M skip=1 count=1 iflag=direct 2>/dev/null | sha256sum | sed 's/^/E2E-SHA-PATTERN /'
done
sha256sum /dev/vda | sed 's/^/E2E-SHA-DISK /'
"""


def test_memory_hot_added_to_the_running_guest_is_mapped_and_served(
    guest: GuestTools, short_tmp: Path
) -> None:
    """QMP ``object-add`` (a shared memory file) and ``device_add pc-dimm`` while the guest runs:
    QEMU sends the new region (ADD_MEM_REG), the guest onlines it (movable: user pages come
    from it first) and reads the disk with O_DIRECT into buffers there. The back-end's writes
    land in the hot-added memory: the test finds the disk's bytes in the DIMM's file."""
    rng = random.Random(22)
    disk = rng.randbytes(8 << 20)
    image = short_tmp / "disk.img"
    image.write_bytes(disk)
    pattern = disk[HOT_PATTERN_SECTOR * SECTOR : HOT_PATTERN_SECTOR * SECTOR + (1 << 20)]
    dimm = Path("/dev/shm") / f"{short_tmp.name}-dimm"
    initrd = build_initramfs(
        short_tmp / "initrd.cpio",
        init_script=INIT_PRELUDE + HOTPLUG_WORKLOAD + INIT_EPILOGUE,
        busybox=guest.busybox,
        modules=guest.kit.module_paths(["virtio_pci", "virtio_blk"]),
    )
    qmp_sock = short_tmp / "qmp.sock"
    try:
        with _blk_backend(short_tmp, image) as backend:
            chardev = f"socket,id=dev0,path={short_tmp / 'blk.sock'}"
            device = ["-chardev", chardev, "-device", "vhost-user-blk-pci,chardev=dev0"]
            with start_guest(
                guest.kit, initrd, device, timeout=GUEST_TIMEOUT, qmp=qmp_sock, hotplug_slots=4
            ) as vm:
                assert vm.wait_for("E2E-READY"), vm.console()[-3000:]
                with QMPClient(str(qmp_sock)) as qmp:
                    qmp.execute(
                        "object-add",
                        {"qom-type": "memory-backend-file", "id": "hot0",
                         "size": HOT_MIB << 20, "mem-path": str(dimm), "share": True},
                    )  # fmt: skip
                    qmp.execute(
                        "device_add", {"driver": "pc-dimm", "id": "dimm0", "memdev": "hot0"}
                    )
                result = vm.wait()
            backend.stop()
        hot = dimm.read_bytes()
    finally:
        dimm.unlink(missing_ok=True)
    why = _explain(result, backend)
    assert result.lines("E2E-ONLINED"), why
    assert result.lines("E2E-SHA-PATTERN") == [f"{_sha(pattern)}  -"] * 4, why
    assert result.lines("E2E-SHA-DISK") == [f"{_sha(disk)}  /dev/vda"], why
    added = re.findall(r"memory region added: gpa (0x[0-9a-f]+) size (0x[0-9a-f]+)", backend.log())
    assert (hex(1 << 32), hex(HOT_MIB << 20)) in added, why  # the DIMM, above 4 GiB
    # the back-end wrote into the hot-added memory: pages of the disk's bytes are in it
    pages = {pattern[k : k + 4096] for k in range(0, len(pattern), 4096)}
    found = sum(1 for k in range(0, len(hot), 4096) if hot[k : k + 4096] in pages)
    assert found > 0, f"no page of the data read is in the hot-added memory\n{why}"
    assert result.lines("E2E-DONE") == [""], why


# --- the back-end killed and restarted under a running guest ------------------------------------

CHUNK = 64 << 10
SLOTS = 64  # the workload cycles over this many 64 KiB chunks of the disk
PATTERNS = 4
ITERATIONS = 120
PROGRESS = 20  # the guest prints a progress line every this many iterations
KILL_AT = (1, 3, 5)  # ... and the back-end is killed after these progress lines


def _write_verify_loop(iterations: int) -> str:
    """The guest's workload: ``iterations`` times, write a pattern to a chunk with O_DIRECT and
    read it back, verified; a progress line every :data:`PROGRESS` iterations."""
    return f"""
for p in 0 1 2 3; do sha256sum /data/p$p | cut -d' ' -f1 > /tmp/sum$p; done
i=0
echo E2E-LOOP-START
while [ $i -lt {iterations} ]; do
  off=$((i % {SLOTS})); p=$((i % {PATTERNS}))
  dd if=/data/p$p of=/dev/vda bs={CHUNK} seek=$off oflag=direct conv=notrunc 2>/dev/null || echo "E2E-IOERR write $i"
  got=$(dd if=/dev/vda bs={CHUNK} skip=$off count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$got" = "$(cat /tmp/sum$p)" ] || echo "E2E-MISMATCH $i"
  i=$((i+1))
  [ $((i % {PROGRESS})) -eq 0 ] && echo "E2E-PROGRESS-$((i / {PROGRESS}))"
done
echo "E2E-ITERATIONS $i"
"""


def _written(disk: bytes, patterns: list[bytes], iterations: int) -> bytes:
    """The image after the workload's ``iterations``: each chunk holds the pattern of the last
    iteration that wrote it."""
    expected = bytearray(disk)
    for i in range(iterations):
        off = (i % SLOTS) * CHUNK
        expected[off : off + CHUNK] = patterns[i % PATTERNS]
    return bytes(expected)


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_the_back_end_killed_under_a_writing_guest_loses_no_request(
    guest: GuestTools, short_tmp: Path, ring: str
) -> None:
    """The guest writes and reads back 64 KiB chunks with O_DIRECT, verifying each; the blk
    back-end is killed with SIGKILL three times in the middle of it and started again. QEMU
    (``reconnect=1``) gives the new process the inflight region: what the dead one had taken
    is done again, the rest is served as usual. The guest sees no I/O error and no wrong byte,
    and the image holds exactly what it wrote."""
    rng = random.Random(23)
    disk = rng.randbytes(SLOTS * CHUNK + (1 << 20))
    image = short_tmp / "disk.img"
    image.write_bytes(disk)
    patterns = [rng.randbytes(CHUNK) for _ in range(PATTERNS)]
    initrd = build_initramfs(
        short_tmp / "initrd.cpio",
        init_script=INIT_PRELUDE + _write_verify_loop(ITERATIONS) + INIT_EPILOGUE,
        busybox=guest.busybox,
        modules=guest.kit.module_paths(["virtio_pci", "virtio_blk"]),
        files={f"/data/p{k}": p for k, p in enumerate(patterns)},
    )
    sock = short_tmp / "blk.sock"
    variant = ",packed=on" if ring == "packed" else ""
    device = [
        "-chardev", f"socket,id=dev0,path={sock},reconnect=1",
        "-device", f"vhost-user-blk-pci,chardev=dev0{variant}",
    ]  # fmt: skip
    backends: list[BackendProcess] = []

    def start_backend() -> None:
        log = short_tmp / f"backend-{len(backends)}.log"
        args = ["-m", "virtio_schema.examples.blk", "--vhost-user", str(sock), str(image)]
        backends.append(BackendProcess([*args, "--latency", "0.05"], sock, log,
                                       timeout=GUEST_TIMEOUT + 30))  # fmt: skip

    try:
        start_backend()
        with start_guest(guest.kit, initrd, device, timeout=GUEST_TIMEOUT) as vm:
            for mark in KILL_AT:
                assert vm.wait_for(f"E2E-PROGRESS-{mark}"), vm.console()[-3000:]
                backends[-1].stop(grace=0, sig=signal.SIGKILL)
                sock.unlink(missing_ok=True)  # the dead process's socket file
                start_backend()
            result = vm.wait()
    finally:
        for b in backends:
            b.stop()
    logs = "\n".join(f"--- back-end {k} ---\n" + b.log()[-3000:] for k, b in enumerate(backends))
    why = (
        f"guest exit={result.returncode} timed_out={result.timed_out} after {result.seconds:.1f}s\n"
        f"--- guest console (tail) ---\n{result.tail()}\n{logs}"
    )
    assert [b.proc.returncode for b in backends[:-1]] == [-signal.SIGKILL] * len(KILL_AT), why
    assert result.lines("E2E-ITERATIONS") == [str(ITERATIONS)], why
    assert result.lines("E2E-IOERR") == [], why
    assert result.lines("E2E-MISMATCH") == [], why
    assert "I/O error" not in result.console, why
    assert image.read_bytes() == _written(disk, patterns, ITERATIONS), "not what the guest wrote"
    for b in backends[1:]:  # every new process was given the region and served the ring
        assert "inflight region: 1 queues of 128" in b.log(), why
        assert "ring 0 started" in b.log(), why
    # each request takes 50 ms in the back-end (--latency): a kill all but always lands while
    # one is taken and not completed, and the next process takes it again
    again = [len(re.findall(r"requests in flight taken again", b.log())) for b in backends[1:]]
    assert sum(again) >= 1, why
    assert result.lines("E2E-DONE") == [""], why


# --- live migration between two QEMU processes, each with its own back-end -----------------------

MIGRATE_ITERATIONS = 160


def _migrate(qmp_path: Path, to: Path, timeout: float = 60.0) -> str:
    """QMP ``migrate`` to the unix socket ``to``; the final status (``completed`` or not)."""
    with QMPClient(str(qmp_path)) as qmp:
        qmp.execute("migrate", {"uri": f"unix:{to}"})
        end = time.monotonic() + timeout
        status = "none"
        while time.monotonic() < end:
            answer = qmp.execute("query-migrate")
            status = str(answer.get("status")) if isinstance(answer, dict) else "?"
            if status in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.2)
        return status


def test_a_guest_migrates_between_two_qemus_while_it_writes_and_verifies(
    guest: GuestTools, short_tmp: Path
) -> None:
    """The guest runs the write/read-back loop on a vhost-user-blk disk; QMP ``migrate`` moves
    it from one QEMU to another, each with its own blk back-end process on the same image. The
    source back-end logs every page it writes while the migration runs (SET_LOG_BASE, LOG_ALL),
    so the destination's memory holds the data and rings the device wrote: the guest goes on,
    on the destination, with every byte it wrote and read back verified, and the image is what
    it wrote."""
    rng = random.Random(24)
    disk = rng.randbytes(SLOTS * CHUNK + (1 << 20))
    image = short_tmp / "disk.img"
    image.write_bytes(disk)
    patterns = [rng.randbytes(CHUNK) for _ in range(PATTERNS)]
    initrd = build_initramfs(
        short_tmp / "initrd.cpio",
        init_script=INIT_PRELUDE + _write_verify_loop(MIGRATE_ITERATIONS) + INIT_EPILOGUE,
        busybox=guest.busybox,
        modules=guest.kit.module_paths(["virtio_pci", "virtio_blk"]),
        files={f"/data/p{k}": p for k, p in enumerate(patterns)},
    )
    mig = short_tmp / "mig.sock"

    def device(sock: Path) -> list[str]:
        return ["-chardev", f"socket,id=dev0,path={sock}",
                "-device", "vhost-user-blk-pci,chardev=dev0"]  # fmt: skip

    args = ["-m", "virtio_schema.examples.blk", str(image), "--vhost-user"]
    src_sock, dst_sock = short_tmp / "src.sock", short_tmp / "dst.sock"
    with (
        BackendProcess([*args, str(src_sock)], src_sock, short_tmp / "src.log",
                       timeout=GUEST_TIMEOUT + 30) as src_backend,
        BackendProcess([*args, str(dst_sock)], dst_sock, short_tmp / "dst.log",
                       timeout=GUEST_TIMEOUT + 30) as dst_backend,
        start_guest(guest.kit, initrd, [*device(dst_sock), "-incoming", f"unix:{mig}"],
                    timeout=GUEST_TIMEOUT, qmp=short_tmp / "dst.qmp") as dst,
        start_guest(guest.kit, initrd, device(src_sock), timeout=GUEST_TIMEOUT,
                    qmp=short_tmp / "src.qmp") as src,
    ):  # fmt: skip
        assert src.wait_for("E2E-PROGRESS-2"), src.console()[-3000:]
        status = _migrate(short_tmp / "src.qmp", mig)
        result = dst.wait()
        source = src.kill()
        src_backend.stop()
        dst_backend.stop()
    logs = f"--- source back-end ---\n{src_backend.log()[-3000:]}\n--- destination back-end ---\n"
    why = (
        f"migration {status}; destination exit={result.returncode} timed_out={result.timed_out}"
        f"\n--- source console (tail) ---\n{source.tail(20)}\n--- destination console (tail) ---\n"
        f"{result.tail()}\n{logs}{dst_backend.log()[-3000:]}"
    )
    assert status == "completed", why
    assert "dirty logging on" in src_backend.log(), why
    assert re.search(r"dirty log of \d+ pages", src_backend.log()), why
    both = source.console + result.console
    assert "E2E-IOERR" not in both, why
    assert "E2E-MISMATCH" not in both, why
    assert "I/O error" not in both, why
    assert result.lines("E2E-ITERATIONS") == [str(MIGRATE_ITERATIONS)], why  # on the destination
    assert result.lines("E2E-DONE") == [""], why
    assert image.read_bytes() == _written(disk, patterns, MIGRATE_ITERATIONS), "not what it wrote"
