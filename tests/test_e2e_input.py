"""End to end: Linux's ``virtio_input`` driver in a QEMU guest (TCG) against the example keyboard.

The keyboard (:mod:`virtio_schema.examples.input`) runs as a separate process with its documented
command line, behind QEMU's ``-device vhost-user-input-pci``. The guest loads ``virtio_input`` and
``evdev``, finds the keyboard's ``/dev/input/eventN`` by its name, lights and puts out LEDs by
writing ``EV_LED`` events and a ``SYN_REPORT`` to it (Linux sends the LED changes to the device on
the statusq), checks what Linux learnt from the configuration space (ids, serial, event types,
LEDs), then opens the event device for reading and says so on the console; the test then sends
the back-end SIGUSR1, and it types "virtio ok". The guest reads exactly the events typing it
makes (``dd``, 24-byte ``struct input_event``\\ s) and prints them in hex; the test decodes them
and compares them with the device's key strokes, and finds the LED changes in the back-end's log.

QEMU 7.2 (Debian 12) cannot run this guest here: its ``vhost-user-input`` refuses to start
without KVM ("vhost initialization failed: requires kvm", ``backends/vhost-user.c``; the check was
removed after 7.2), and this machine has no usable KVM. QEMU 10 (Debian 13) runs it under TCG:
``VIRTIO_SCHEMA_INPUT_QEMU`` names the QEMU binary (or a wrapper script) to use;
``.ci/qemu-for-input`` makes one (Debian 13's QEMU in a debootstrap folder) and ``.ci/run`` sets
it. Without it, with a QEMU that refuses, the test is skipped with that reason, and fails in CI
(``VIRTIO_SCHEMA_REQUIRE_E2E=1``) like the other end-to-end tests whose QEMU, busybox or kernel
is missing.
"""

from __future__ import annotations

import os
import signal
import struct
from pathlib import Path

from conftest import require_e2e

from virtio_schema.examples.input import LED_CAPSL, LED_NUML, keystrokes
from virtio_schema.schema import InputEventType
from virtio_schema.testing.process import BackendProcess
from virtio_schema.testing.qemu import (
    INIT_EPILOGUE,
    INIT_PRELUDE,
    GuestResult,
    GuestTools,
    build_initramfs,
    start_guest,
)

GUEST_TIMEOUT = 60.0
QEMU_ENV = "VIRTIO_SCHEMA_INPUT_QEMU"
QEMU_72_NEEDS_KVM = "vhost initialization failed: requires kvm"
NAME = "virtio-schema keyboard"
SERIAL = "e2e-kbd-1"
TEXT = "virtio ok"
INPUT_EVENT = struct.Struct("<qqHHi")
"""Linux's ``struct input_event`` on x86-64: ``struct timeval`` (two 64-bit fields), then
``__u16 type``, ``__u16 code``, ``__s32 value``: 24 bytes."""
LEDS = [(LED_CAPSL, 1), (LED_NUML, 1), (LED_CAPSL, 0)]
"""What the guest writes to the keyboard's LEDs, in order."""
LED_BYTES = INPUT_EVENT.size * (len(LEDS) + 1)
"""The LED events and the SYN_REPORT after them, in one write."""
EVENTS = len(keystrokes(TEXT))
"""The events typing TEXT makes, as many as the guest reads."""

WORKLOAD = f"""
ev=
for d in /sys/class/input/event*; do
  [ "$(cat $d/device/name 2>/dev/null)" = "{NAME}" ] && ev=${{d##*/}}
done
echo "E2E-EVDEV $ev"
c=/sys/class/input/$ev/device
caps="ev=$(cat $c/capabilities/ev) led=$(cat $c/capabilities/led)"
echo "E2E-IDS $(cat $c/id/bustype) $(cat $c/uniq) $caps"
dd if=/data/leds of=/dev/input/$ev bs={LED_BYTES} 2>/dev/null && echo E2E-LEDS-WRITTEN
timeout 30 dd if=/dev/input/$ev of=/tmp/events bs={INPUT_EVENT.size} count={EVENTS} 2>/dev/null &
pid=$!
i=0
while ! ls -l /proc/$pid/fd 2>/dev/null | grep -q /dev/input/$ev && [ $i -lt 250 ]; do
  usleep 20000; i=$((i+1))
done
echo E2E-READING
wait $pid
od -An -tx1 -v /tmp/events | tr -d ' \\n' | sed 's/^/E2E-EVENTS /'
echo
"""


def _explain(result: GuestResult, backend: BackendProcess) -> str:
    return (
        f"guest exit={result.returncode} timed_out={result.timed_out} after {result.seconds:.1f}s\n"
        f"--- guest console (tail) ---\n{result.tail()}\n--- back-end log (tail) ---\n"
        + "\n".join(backend.log().splitlines()[-30:])
    )


def test_linux_reads_the_typed_text_and_the_device_records_the_led_changes(
    guest: GuestTools, short_tmp: Path
) -> None:
    try:
        modules = guest.kit.module_paths(["virtio_pci", "virtio_input", "evdev"])
    except FileNotFoundError as exc:
        require_e2e(f"the guest kernel lacks a module: {exc}")
    # the LED events, then SYN_REPORT: without it the input core holds them back and hands them
    # to whoever reads at the next report (the keystrokes' first), the reader opened later too
    leds = b"".join(INPUT_EVENT.pack(0, 0, InputEventType.LED, code, v) for code, v in LEDS)
    leds += INPUT_EVENT.pack(0, 0, InputEventType.SYN, 0, 0)
    initrd = build_initramfs(
        short_tmp / "initrd.cpio",
        init_script=INIT_PRELUDE + "echo E2E-BEGIN\n" + WORKLOAD + INIT_EPILOGUE,
        busybox=guest.busybox,
        modules=modules,
        files={"/data/leds": leds},
    )
    sock = short_tmp / "input.sock"
    args = ["--name", NAME, "--serial", SERIAL, "--type", TEXT, "--type-on-signal"]
    backend = BackendProcess(
        ["-m", "virtio_schema.examples.input", "--vhost-user", str(sock), *args],
        sock,
        short_tmp / "backend.log",
        timeout=GUEST_TIMEOUT + 30,
    )
    device = [
        "-chardev",
        f"socket,id=dev0,path={sock}",
        "-device",
        "vhost-user-input-pci,chardev=dev0",
    ]
    try:
        qemu = os.environ.get(QEMU_ENV) or None
        with start_guest(guest.kit, initrd, device, timeout=GUEST_TIMEOUT, qemu=qemu) as vm:
            reading = vm.wait_for("E2E-READING")
            if not reading and QEMU_72_NEEDS_KVM in vm.console():
                require_e2e(
                    f"this QEMU's vhost-user-input needs KVM ({QEMU_72_NEEDS_KVM!r}: QEMU 7.2),"
                    f" which this machine lacks; set {QEMU_ENV} to a later QEMU (10.0 runs it:"
                    " .ci/qemu-for-input makes one)"
                )
            if reading:
                backend.proc.send_signal(signal.SIGUSR1)  # type TEXT, now that the guest reads
            result = vm.wait()
    finally:
        backend.stop()
    why = _explain(result, backend)
    assert reading, why
    assert not result.timed_out, why
    (evdev,) = result.lines("E2E-EVDEV")
    assert evdev.startswith("event"), why
    # the configuration space as Linux read it: virtual bus, the serial, EV_SYN|EV_KEY|EV_LED
    # (no EV_REP: no autorepeat), the three LEDs
    assert result.lines("E2E-IDS") == [f"0006 {SERIAL} ev=20003 led=7"], why
    assert result.lines("E2E-LEDS-WRITTEN") == [""], why
    (hexdata,) = result.lines("E2E-EVENTS")
    data = bytes.fromhex(hexdata)
    got = [INPUT_EVENT.unpack_from(data, at)[2:] for at in range(0, len(data), INPUT_EVENT.size)]
    assert got == [tuple(e) for e in keystrokes(TEXT)], why
    assert result.lines("E2E-DONE") == [""], why
    log = backend.log()
    names = {LED_CAPSL: "CAPSL", LED_NUML: "NUML"}
    want = [f"LED {names[code]} {'on' if v else 'off'}" for code, v in LEDS]
    assert [
        line.split("virtio-input: ")[1] for line in log.splitlines() if ": LED " in line
    ] == want, why
    assert f"{len(got)} events delivered, 0 waiting, 0 bad chains" in log, why
