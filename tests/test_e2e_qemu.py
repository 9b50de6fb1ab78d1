"""End to end: Linux's virtio drivers in a QEMU guest (TCG) against our vhost-user back-ends.

Each test builds a busybox initramfs whose ``/init`` runs a workload and prints ``E2E-...`` marker
lines, starts the example back-end as a separate process (the documented command line), boots the
guest with a hard timeout, and checks the guest's results and the host-side state (the image file,
the recorded random stream, the back-end's log).

Skipped, with the reason, where QEMU, a static busybox or the Debian cloud kernel is missing;
``.ci/run`` installs them and sets ``VIRTIO_SCHEMA_REQUIRE_E2E=1``, which turns a skip into a failure.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from virtio_schema.schema import Feature
from virtio_schema.testing.process import BackendProcess
from virtio_schema.testing.qemu import (
    INIT_EPILOGUE,
    INIT_PRELUDE,
    GuestResult,
    GuestTools,
    build_initramfs,
    run_guest,
)

GUEST_TIMEOUT = 150.0
DISK_MIB = 8
PATTERN_OFFSET = (1 << 20) + 3 * 4096  # 4 KiB aligned, not 64 KiB aligned
PATTERN_LEN = 64 * 1024


def _boot(
    guest: GuestTools,
    tmp: Path,
    workload: str,
    modules: list[str],
    device_args: list[str],
    files: dict[str, bytes] | None = None,
) -> GuestResult:
    initrd = build_initramfs(
        tmp / "initrd.cpio",
        init_script=INIT_PRELUDE + "echo E2E-BEGIN\n" + workload + INIT_EPILOGUE,
        busybox=guest.busybox,
        modules=guest.kit.module_paths(["virtio_pci", *modules]),
        files=files,
    )
    return run_guest(guest.kit, initrd, device_args, timeout=GUEST_TIMEOUT)


def _serve_and_boot(
    guest: GuestTools,
    tmp: Path,
    example: str,
    args: list[str],
    workload: str,
    modules: list[str],
    device_args: list[str],
    files: dict[str, bytes] | None = None,
) -> tuple[GuestResult, BackendProcess]:
    """Start the example back-end as documented (``python -m virtio_schema.examples.<example>
    --vhost-user SOCK *args``), boot the guest with chardev ``dev0`` on its socket plus
    ``device_args`` (which name ``chardev=dev0``), then stop the back-end. Returns the guest's
    result and the stopped back-end (for its log)."""
    sock = tmp / f"{example}.sock"
    backend = BackendProcess(
        ["-m", f"virtio_schema.examples.{example}", "--vhost-user", str(sock), *args],
        sock,
        tmp / "backend.log",
    )
    try:
        chardev = ["-chardev", f"socket,id=dev0,path={sock}"]
        result = _boot(guest, tmp, workload, modules, chardev + device_args, files)
    finally:
        backend.stop()
    return result, backend


def _explain(result: GuestResult, backend: BackendProcess) -> str:
    return (
        f"guest exit={result.returncode} timed_out={result.timed_out} after {result.seconds:.1f}s\n"
        f"--- guest console (tail) ---\n{result.tail()}\n--- back-end log (tail) ---\n"
        + "\n".join(backend.log().splitlines()[-30:])
    )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


BLK_WORKLOAD = f"""
for f in /sys/bus/virtio/devices/*/features; do echo "E2E-FEATURES $(cat $f)"; done
sha256sum /dev/vda | sed 's/^/E2E-SHA-DISK /'
dd if=/data/pattern of=/dev/vda bs=4096 seek={PATTERN_OFFSET // 4096} oflag=direct conv=notrunc 2>/dev/null && echo E2E-WROTE
dd if=/dev/vda bs=4096 skip={PATTERN_OFFSET // 4096} count={PATTERN_LEN // 4096} iflag=direct 2>/dev/null | sha256sum | sed 's/^/E2E-SHA-PATTERN /'
for i in 0 1 2 3 4 5 6 7; do
  (dd if=/dev/vda bs=65536 skip=$((i * {DISK_MIB * 2})) count={DISK_MIB * 2} iflag=direct 2>/dev/null | sha256sum | sed "s/^/E2E-SLICE-$i /") &
done
wait
"""

BLK_VARIANTS = {
    "default": "",
    "no-indirect": ",indirect_desc=off",
    "no-event-idx": ",event_idx=off",
    "neither": ",indirect_desc=off,event_idx=off",
    "packed": ",packed=on",
    "packed-no-indirect-no-event-idx": ",packed=on,indirect_desc=off,event_idx=off",
}


@pytest.mark.parametrize("variant", list(BLK_VARIANTS))
def test_linux_virtio_blk_reads_writes_and_reads_in_parallel(
    guest: GuestTools, short_tmp: Path, variant: str
) -> None:
    rng = random.Random(variant)
    original = rng.randbytes(DISK_MIB << 20)
    pattern = rng.randbytes(PATTERN_LEN)
    image = short_tmp / "disk.img"
    image.write_bytes(original)
    result, backend = _serve_and_boot(
        guest,
        short_tmp,
        "blk",
        [str(image)],
        BLK_WORKLOAD,
        ["virtio_blk"],
        ["-device", f"vhost-user-blk-pci,chardev=dev0,num-queues=1{BLK_VARIANTS[variant]}"],
        files={"/data/pattern": pattern},
    )
    why = _explain(result, backend)
    assert not result.timed_out, why
    assert result.lines("E2E-DONE") == [""], why
    # the whole disk as the guest read it
    assert result.lines("E2E-SHA-DISK") == [f"{_sha(original)}  /dev/vda"], why
    # the O_DIRECT write, read back by the guest
    assert result.lines("E2E-WROTE") == [""], why
    assert result.lines("E2E-SHA-PATTERN") == [f"{_sha(pattern)}  -"], why
    # the image on the host holds exactly the written bytes
    expected = bytearray(original)
    expected[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_LEN] = pattern
    assert image.read_bytes() == bytes(expected), "image differs from original + pattern"
    # 8 parallel O_DIRECT readers, each a 1 MiB slice of the modified disk
    slice_len = (DISK_MIB << 20) // 8
    for i in range(8):
        want = _sha(bytes(expected[i * slice_len : (i + 1) * slice_len]))
        assert result.lines(f"E2E-SLICE-{i}") == [f"{want}  -"], why
    # the variation really happened: the features the driver acked
    acked = [
        int(line.rsplit(" ", 1)[1], 16)
        for line in backend.log().splitlines()
        if "features acked" in line
    ]
    assert acked, why
    last = acked[-1]
    assert bool(last & Feature.INDIRECT_DESC) == (
        "indirect" not in variant and variant != "neither"
    )
    assert bool(last & Feature.EVENT_IDX) == ("event-idx" not in variant and variant != "neither")


def test_firmware_start_stop_then_linux_restart(guest: GuestTools, short_tmp: Path) -> None:
    """SeaBIOS starts and stops the device before Linux starts it again (observed with QEMU 7.2): the
    back-end serves both, across new ring addresses (and a new memory table where the front-end
    sends one: with CONFIGURE_MEM_SLOTS, QEMU 7.2 keeps the regions it added)."""
    image = short_tmp / "disk.img"
    data = random.Random(5).randbytes(DISK_MIB << 20)
    image.write_bytes(data)
    result, backend = _serve_and_boot(
        guest,
        short_tmp,
        "blk",
        [str(image)],
        "sha256sum /dev/vda | sed 's/^/E2E-SHA-DISK /'\n",
        ["virtio_blk"],
        ["-device", "vhost-user-blk-pci,chardev=dev0"],
    )
    why = _explain(result, backend)
    assert result.lines("E2E-SHA-DISK") == [f"{_sha(data)}  /dev/vda"], why
    log = backend.log()
    assert log.count("ring 0 started") >= 2, why  # firmware, then Linux
    assert log.count("ring 0 stopped") >= 1, why
    assert "closing the connection" not in log, why
    # protocol feature STATUS: QEMU 7.2 sets FEATURES_OK with the features, DRIVER_OK at each
    # start, and 0 at each stop (before GET_VRING_BASE, whose answer carried the position across)
    assert "device status 0x0f" in log, why
    assert "device status 0x00" in log, why


def test_linux_virtio_rng_reads_the_bytes_the_device_produced(
    guest: GuestTools, short_tmp: Path
) -> None:
    record = short_tmp / "rng.bin"
    result, backend = _serve_and_boot(
        guest,
        short_tmp,
        "rng",
        ["--seed", "1234", "--record", str(record)],
        "cat /sys/class/misc/hw_random/rng_current | sed 's/^/E2E-RNG-CURRENT /'\n"
        "dd if=/dev/hwrng bs=64 count=4 2>/dev/null | od -An -tx1 -v | tr -d ' \\n' | sed 's/^/E2E-HWRNG-BYTES /'\n"
        "echo\n",
        ["virtio_rng"],
        ["-device", "vhost-user-rng-pci,chardev=dev0"],
    )
    why = _explain(result, backend)
    assert not result.timed_out, why
    current = result.lines("E2E-RNG-CURRENT")
    assert current, why
    assert current[0].startswith("virtio_rng"), why
    (hexdata,) = result.lines("E2E-HWRNG-BYTES")
    got = bytes.fromhex(hexdata)
    assert len(got) == 256, why
    produced = record.read_bytes()
    assert got in produced, "the guest read bytes the device never produced"
    # the stream is the seeded generator's: the device produced nothing else
    assert produced == random.Random(1234).randbytes(len(produced))


# The counters are printed once they have been still for a second: a frame the kernel sends just
# before the read would otherwise be counted by the guest but still sit in the ring at power-off.
NET_WORKLOAD = """
ip link set eth0 up
sleep 4
s=/sys/class/net/eth0/statistics
prev=
for i in 1 2 3 4 5 6 7 8 9 10; do
  tx=$(cat $s/tx_packets); rx=$(cat $s/rx_packets)
  [ "$tx $rx" = "$prev" ] && break
  prev="$tx $rx"
  sleep 1
done
echo "E2E-NET-TX $tx"
echo "E2E-NET-RX $rx"
"""


@pytest.mark.parametrize("mode", ["sink", "reflect"])
def test_linux_virtio_net_frames_reach_the_device(
    guest: GuestTools, short_tmp: Path, mode: str
) -> None:
    """Linux's virtio_net over ``-netdev vhost-user``: bringing the link up makes the kernel send
    frames of its own (IPv6 neighbour discovery; no address is configured); the device counts them,
    and in ``reflect`` mode the guest's receive counter shows them coming back.

    ``vectors=0`` (INTx instead of MSI-X): QEMU 7.2 under TCG crashes in vhost-net's MSI-X guest
    notifier setup (``msix_set_vector_notifiers`` from ``vhost_net_start``) with any back-end."""
    stats = short_tmp / "stats.json"
    result, backend = _serve_and_boot(
        guest,
        short_tmp,
        "net",
        ["--mode", mode, "--stats", str(stats)],
        NET_WORKLOAD,
        ["virtio_net"],
        [
            "-netdev",
            "vhost-user,id=net0,chardev=dev0",
            "-device",
            "virtio-net-pci,netdev=net0,vectors=0",
        ],
    )
    why = _explain(result, backend)
    assert not result.timed_out, why
    (tx,) = result.lines("E2E-NET-TX")
    (rx,) = result.lines("E2E-NET-RX")
    counters = json.loads(stats.read_text())
    assert int(tx) > 0, why
    assert counters["tx_frames"] == int(tx), why  # every frame the guest sent reached the device
    assert counters["bad_chains"] == 0, why
    if mode == "reflect":
        assert counters["rx_frames"] == counters["tx_frames"], why
        assert int(rx) == counters["rx_frames"], why  # and came back to the guest
    else:
        assert int(rx) == 0, why
