"""An example virtio-input keyboard (virtio 1.2, 5.8), served over vhost-user: typing into a guest.

    python -m virtio_schema.examples.input --vhost-user SOCKET [--type TEXT [--type-delay SECONDS]]
        [--type-on-signal] [--name NAME] [--serial SERIAL]

and QEMU connects to it (guest memory shared, as for every vhost-user device; with QEMU 7.2 under
KVM only, see below)::

    qemu-system-x86_64 -m 256M \\
        -object memory-backend-memfd,id=mem,size=256M,share=on -machine pc,memory-backend=mem \\
        -chardev socket,id=kbd0,path=SOCKET -device vhost-user-input-pci,chardev=kbd0 ...

Linux's ``virtio_input`` driver makes it an evdev device (``/dev/input/eventN``, with the
``evdev`` module) and a keyboard of the console.

Theory of operation. The device is three small protocols:

* **Configuration space** (:data:`~virtio_schema.schema.VirtioInputConfig`, 136 bytes; virtio
  1.2, 5.8.4): the driver writes ``select`` and ``subsel``, then reads ``size`` and the 128-byte
  union, which answers that question: the name, the serial, the ids, or for ``EV_BITS`` the
  bitmap of the codes the device sends of the event type ``subsel``. A question the device has
  no answer for gets ``size`` 0 (5.8.5.2). The answer is computed when ``select``/``subsel``
  change (:meth:`InputDevice.set_config`), so reading it is a copy.
* **eventq** (queue 0, device to driver): the driver keeps it filled with device-writable
  buffers, one 8-byte :data:`~virtio_schema.schema.VirtioInputEvent` each. Events the device
  produces (:meth:`InputDevice.type_text`, :meth:`InputDevice.send`) wait in a deque and are
  written into those buffers as they come: when the driver posts buffers (a kick: ``handle``),
  when the ring is enabled, and every :attr:`~InputDevice.poll_interval` (``poll``). Nothing is
  dropped and nothing waits on the driver: an event without a buffer stays queued. A buffer too
  short for an event is returned unused (length 0) and counted; the event waits for the next
  buffer. A ring the driver breaks is logged once and left alone until it restarts.
* **statusq** (queue 1, driver to device): the driver sends events back, one per buffer: the
  keyboard LEDs (``EV_LED``). Each one is recorded (:attr:`InputDevice.led_events`) and logged
  (``LED CAPSL on``). A buffer that does not hold an event is logged, counted and returned.

The keyboard types a US layout (:data:`US_KEYMAP`): each character is a key press, ``SYN_REPORT``,
the release and ``SYN_REPORT`` again, inside left shift for capitals and shifted symbols. It sends
no ``EV_REP`` (the driver then does no autorepeat: what the guest reads is exactly what the device
sent). ``--type`` types once the driver has posted its first event buffers (plus
``--type-delay``); ``--type-on-signal`` types it instead each time the process receives SIGUSR1,
for a test rig that must first open the event device in the guest.

What QEMU does (``-device vhost-user-input-pci``): it keeps no configuration of its own and
forwards every driver access. A read is a GET_CONFIG of the whole 136 bytes; a driver's one-byte
write of ``select`` or ``subsel`` is a SET_CONFIG of the whole space at offset 0, carrying the
bytes QEMU last read (QEMU 7.2's ``vhost_input_set_config``; seen from QEMU 10.0). So the whole
space is declared writable (:attr:`InputDevice.writable_config`) and a write changes ``select``
and ``subsel`` only, never the device's answer. QEMU 7.2 starts this device only under KVM
("vhost initialization failed: requires kvm", ``backends/vhost-user.c``); QEMU 10.0 runs it under
TCG too, and offers the driver the back-end's feature bits (Linux then takes a packed ring).
"""

from __future__ import annotations

import collections
import logging
import signal
import sys
import time
from collections.abc import Iterable

from virtio_schema._cli import parser
from virtio_schema.chain import ReadableChain, WritableChain
from virtio_schema.errors import DriverError
from virtio_schema.examples.serving import add_server_arguments, make_server
from virtio_schema.queue import QueueBroken, VirtQueue
from virtio_schema.records import (
    INPUT_CONFIG,
    INPUT_DEVIDS,
    INPUT_EVENT,
    InputConfig,
    InputDevids,
    InputEvent,
)
from virtio_schema.schema import INPUT_CONFIG_UNION_BYTES, InputConfigSelect, InputEventType
from virtio_schema.vhost_user import VhostUserDevice

__all__ = [
    "DEVIDS",
    "EVENTQ",
    "KEYS",
    "LED_CAPSL",
    "LED_HISTORY",
    "LED_NAMES",
    "LED_NUML",
    "LED_SCROLLL",
    "NAME",
    "SERIAL",
    "STATUSQ",
    "US_KEYMAP",
    "InputDevice",
    "InputEvent",
    "keystrokes",
    "main",
]

log = logging.getLogger(__name__)

EVENTQ = 0
"""The event queue's index: events to the driver (virtio 1.2, 5.8.2)."""
STATUSQ = 1
"""The status queue's index: events from the driver (LEDs)."""

# --- Linux input-event-codes.h (evdev semantics are Linux's: virtio 1.2, 5.8) -------------------

SYN_REPORT = 0
KEY_LEFTSHIFT = 42
KEY_CAPSLOCK = 58
KEY_NUMLOCK = 69
KEY_SCROLLLOCK = 70
BUS_VIRTUAL = 0x06
LED_NUML = 0
"""``EV_LED`` code of the Num Lock LED."""
LED_CAPSL = 1
"""``EV_LED`` code of the Caps Lock LED."""
LED_SCROLLL = 2
"""``EV_LED`` code of the Scroll Lock LED."""

NAME = "virtio-schema keyboard"
"""The keyboard's name by default (``ID_NAME``: Linux's input device name)."""
SERIAL = "virtio-schema-0"
"""The keyboard's serial by default (``ID_SERIAL``: Linux's ``uniq``)."""
DEVIDS = InputDevids(BUS_VIRTUAL, 0x0000, 0x0001, 0x0001)
"""The ids the keyboard reports (``ID_DEVIDS``): a virtual bus, no vendor."""

LED_HISTORY = 1024
"""How many LED events :attr:`InputDevice.led_events` keeps."""

LED_NAMES = {LED_NUML: "NUML", LED_CAPSL: "CAPSL", LED_SCROLLL: "SCROLLL"}
"""The LEDs the keyboard has (``EV_LED`` codes), by their ``LED_*`` names."""


def _us_keymap() -> dict[str, tuple[int, bool]]:
    rows = [  # (key codes from, unshifted, shifted): runs of consecutive KEY_* codes
        (2, "1234567890-=", "!@#$%^&*()_+"),
        (16, "qwertyuiop[]", "QWERTYUIOP{}"),
        (30, "asdfghjkl;'`", 'ASDFGHJKL:"~'),
        (43, "\\zxcvbnm,./", "|ZXCVBNM<>?"),
    ]
    keymap: dict[str, tuple[int, bool]] = {}
    for first, plain, shifted in rows:
        for i, (p, s) in enumerate(zip(plain, shifted, strict=True)):
            keymap[p] = (first + i, False)
            keymap[s] = (first + i, True)
    keymap.update({" ": (57, False), "\n": (28, False), "\t": (15, False), "\b": (14, False)})
    return keymap


US_KEYMAP: dict[str, tuple[int, bool]] = _us_keymap()
"""Character -> (``KEY_*`` code, shifted) on a US keyboard: printable ASCII, space, newline
(Enter), tab and backspace."""

KEYS = frozenset(code for code, _ in US_KEYMAP.values()) | {
    KEY_LEFTSHIFT,
    KEY_CAPSLOCK,
    KEY_NUMLOCK,
    KEY_SCROLLLOCK,
}
"""The ``EV_KEY`` codes the keyboard has (``EV_BITS`` for ``EV_KEY``)."""


def keystrokes(text: str) -> list[InputEvent]:
    """The events that type ``text`` on a US keyboard: per character a press, ``SYN_REPORT``,
    the release and ``SYN_REPORT``, inside left shift where the character needs it. Raises
    ``ValueError`` (naming it) for a character the layout cannot type, before anything."""
    unknown = sorted({c for c in text if c not in US_KEYMAP})
    if unknown:
        raise ValueError(f"cannot type {unknown!r} on a US keyboard")
    key, syn = InputEventType.KEY, InputEvent(InputEventType.SYN, SYN_REPORT, 0)
    events: list[InputEvent] = []
    for c in text:
        code, shift = US_KEYMAP[c]
        shift_down = [InputEvent(key, KEY_LEFTSHIFT, 1)] if shift else []
        shift_up = [InputEvent(key, KEY_LEFTSHIFT, 0)] if shift else []
        events += [*shift_down, InputEvent(key, code, 1), syn]  # press
        events += [InputEvent(key, code, 0), *shift_up, syn]  # release
    return events


def _bitmap(codes: Iterable[int]) -> bytes:
    """A configuration bitmap: bit ``n`` is bit ``n % 8`` of byte ``n // 8`` (Linux's
    ``virtinput_cfg_bits``: "a simple stream of bytes, with the first byte carrying bits 0-7"),
    as long as its highest set bit needs."""
    out = bytearray()
    for code in codes:
        if code >= len(out) * 8:
            out.extend(bytes(code // 8 + 1 - len(out)))
        out[code // 8] |= 1 << (code % 8)
    return bytes(out)


class InputDevice(VhostUserDevice):
    """The virtio-input keyboard of the module docstring.

    :meth:`type_text` and :meth:`send` only queue events (a deque append): they may be called
    from any thread; the events are written into the driver's buffers on the server's thread,
    at the next kick or poll."""

    num_queues = 2
    poll_interval = 0.05
    """Queued events are delivered at least this often (seconds), kicks or not."""

    writable_config = (range(0, INPUT_CONFIG.size),)
    """QEMU writes the whole space at offset 0 for a driver's write of ``select`` or ``subsel``
    (module docstring): only those two bytes of a write are taken."""

    def __init__(
        self,
        *,
        name: str = NAME,
        serial: str = SERIAL,
        devids: InputDevids = DEVIDS,
    ) -> None:
        self.name = name.encode()[:INPUT_CONFIG_UNION_BYTES]
        self.serial = serial.encode()[:INPUT_CONFIG_UNION_BYTES]
        self.devids = devids
        self.ev_bits: dict[int, bytes] = {
            InputEventType.SYN: _bitmap([SYN_REPORT]),
            InputEventType.KEY: _bitmap(KEYS),
            InputEventType.LED: _bitmap(LED_NAMES),
        }
        """``EV_BITS`` answers: event type -> bitmap of its codes. ``EV_REP`` is left out."""
        self.select = 0
        self.subsel = 0
        self._config = self._answer()
        self.pending: collections.deque[InputEvent] = collections.deque()
        """Events produced and not yet written into an eventq buffer, oldest first."""
        self.delivered = 0
        """Events written into the driver's buffers."""
        self.bad_chains = 0
        """Chains that were malformed or could not hold an event (returned unused)."""
        self.leds: set[int] = set()
        """The LEDs the driver has lit (``LED_*`` codes)."""
        self.led_events: collections.deque[tuple[int, bool]] = collections.deque(maxlen=LED_HISTORY)
        """The ``EV_LED`` events from the statusq, in order: (code, on); the last
        :data:`LED_HISTORY` (a driver cannot make the device's memory grow)."""
        self.ready_at: float | None = None
        """When the driver first posted eventq buffers (``time.monotonic()``), or ``None``."""
        self._eventq: VirtQueue | None = None
        self._after_ready: tuple[float, str] | None = None

    # --- producing events -----------------------------------------------------------------------

    def send(self, events: Iterable[InputEvent]) -> None:
        """Queue ``events`` for the driver, in order (never dropped)."""
        self.pending.extend(events)

    def type_text(self, text: str) -> None:
        """Queue the key strokes that type ``text`` (:func:`keystrokes`)."""
        events = keystrokes(text)
        log.info("virtio-input: typing %r (%d events)", text, len(events))
        self.send(events)

    def type_when_ready(self, text: str, delay: float = 0.0) -> None:
        """Type ``text`` ``delay`` seconds after the driver first posts eventq buffers."""
        keystrokes(text)  # refuse an untypeable text now, not later
        self._after_ready = (delay, text)

    # --- configuration space --------------------------------------------------------------------

    def _answer(self) -> bytes:
        """The configuration space for the current ``select``/``subsel``."""
        select, subsel = self.select, self.subsel
        u = b""
        if select == InputConfigSelect.ID_NAME and subsel == 0:
            u = self.name
        elif select == InputConfigSelect.ID_SERIAL and subsel == 0:
            u = self.serial
        elif select == InputConfigSelect.ID_DEVIDS and subsel == 0:
            u = INPUT_DEVIDS.pack(self.devids)
        elif select == InputConfigSelect.EV_BITS:
            u = self.ev_bits.get(subsel, b"")
        # PROP_BITS, ABS_INFO (a keyboard has neither), UNSET, anything else: size 0
        # (virtio 1.2, 5.8.5.2: "size ... zero if it doesn't support a given select and subsel")
        union = u.ljust(INPUT_CONFIG_UNION_BYTES, b"\0")
        return INPUT_CONFIG.pack(InputConfig(select, subsel, len(u), union))

    def config(self) -> bytes:
        return self._config

    def set_config(self, offset: int, data: bytes) -> None:
        for field in ("select", "subsel"):
            at = INPUT_CONFIG.offsets[field] - offset
            if 0 <= at < len(data):
                setattr(self, field, data[at])
        self._config = self._answer()

    def reset(self) -> None:
        self.select = self.subsel = 0
        self._config = self._answer()
        self.leds.clear()

    # --- the queues -----------------------------------------------------------------------------

    def enabled(self, index: int, queue: VirtQueue) -> None:
        if index == EVENTQ:
            self._eventq = queue
            self._deliver()

    def disabled(self, index: int) -> None:
        if index == EVENTQ:
            self._eventq = None

    def handle(self, index: int, queue: VirtQueue) -> None:
        if index == EVENTQ:
            if self.ready_at is None:
                self.ready_at = time.monotonic()
                log.info("virtio-input: the driver posted event buffers")
            if queue.broken is None:  # a broken ring's kicks change nothing (logged once)
                self._eventq = queue
                self._deliver()
        elif index == STATUSQ:
            self._drain_status(queue)

    def poll(self) -> None:
        if self._after_ready is not None and self.ready_at is not None:
            delay, text = self._after_ready
            if time.monotonic() >= self.ready_at + delay:
                self._after_ready = None
                self.type_text(text)
        self._deliver()

    def _deliver(self) -> None:
        """Write queued events into the eventq's buffers, one per chain, until either runs out."""
        queue = self._eventq
        if queue is None or not self.pending:
            return
        try:
            with queue.batch():  # one used-index update and at most one notification
                while self.pending and (chain := queue.next_chain()) is not None:
                    with chain:  # returned on leaving, with the bytes written (0 if none)
                        try:
                            WritableChain(chain).write_record(INPUT_EVENT, self.pending[0])
                        except DriverError as exc:  # malformed, or too short: the event waits
                            self.bad_chains += 1
                            log.warning("virtio-input: eventq buffer returned unused: %s", exc)
                            continue
                    self.pending.popleft()
                    self.delivered += 1
        except QueueBroken as exc:  # the driver broke the ring: nothing more until a restart
            log.error("virtio-input: %s; the eventq is not served until it restarts", exc)
            self._eventq = None

    def _drain_status(self, queue: VirtQueue) -> None:
        while (chain := queue.next_chain()) is not None:
            with chain:
                try:
                    event = ReadableChain(chain).read_record(INPUT_EVENT)
                except DriverError as exc:
                    self.bad_chains += 1
                    log.warning("virtio-input: bad statusq buffer: %s", exc)
                    continue
            self._on_status(event)

    def _on_status(self, event: InputEvent) -> None:
        if event.type != InputEventType.LED:
            log.info("virtio-input: status event %s ignored", event)
            return
        on = event.value != 0
        self.led_events.append((event.code, on))
        if on:
            self.leds.add(event.code)
        else:
            self.leds.discard(event.code)
        name = LED_NAMES.get(event.code, f"#{event.code}")
        log.info("virtio-input: LED %s %s", name, "on" if on else "off")


DESCRIPTION = """\
Serve a virtio-input keyboard to a vhost-user front-end (QEMU): it types TEXT
into the guest (a US layout) and logs the LEDs the guest lights. In a Linux
guest it is /dev/input/eventN (modules virtio_input and evdev)."""

EPILOG = """\
example: the device, then QEMU connecting to it (guest memory must be
shareable: a memfd with share=on). QEMU 7.2 starts vhost-user-input under KVM
only ("requires kvm"); QEMU 10 runs it with -accel tcg too:

  %(prog)s --vhost-user /tmp/kbd.sock --type hello
  qemu-system-x86_64 -accel kvm -m 256M \\
      -object memory-backend-memfd,id=mem,size=256M,share=on \\
      -machine pc,memory-backend=mem \\
      -chardev socket,id=kbd0,path=/tmp/kbd.sock \\
      -device vhost-user-input-pci,chardev=kbd0 \\
      -kernel vmlinuz -initrd initrd -append console=ttyS0 -nographic

With --type-on-signal, kill -USR1 PID types TEXT (again) whenever asked."""


def main(argv: list[str] | None = None) -> int:
    """The command line: ``--help`` describes it."""
    p = parser("virtio_schema.examples.input", DESCRIPTION, EPILOG)
    add_server_arguments(p)
    p.add_argument("--name", default=NAME, help=f"the device's name (default {NAME!r})")
    p.add_argument("--serial", default=SERIAL, help=f"the device's serial (default {SERIAL!r})")
    p.add_argument("--type", metavar="TEXT", dest="text", default=None, help="text to type")
    p.add_argument(
        "--type-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="type TEXT this long after the driver posted its first event buffers (default 0)",
    )
    p.add_argument(
        "--type-on-signal",
        action="store_true",
        help="type TEXT each time the process receives SIGUSR1, instead of once the driver is"
        " ready (a test rig that must first open the event device in the guest)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = InputDevice(name=args.name, serial=args.serial)
    text = args.text
    if text is not None:
        try:
            keystrokes(text)
        except ValueError as exc:
            p.error(str(exc))
        if args.type_on_signal:  # the handler runs on this (the server's) thread: a deque append
            signal.signal(signal.SIGUSR1, lambda *_: device.type_text(text))
        else:
            device.type_when_ready(text, args.type_delay)
    server = make_server(args, lambda: device)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    server.serve_forever(max_connections=args.max_connections)
    log.info(
        "virtio-input: %d events delivered, %d waiting, %d bad chains, LED events %s",
        device.delivered, len(device.pending), device.bad_chains,
        [(LED_NAMES.get(code, code), on) for code, on in device.led_events],
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
