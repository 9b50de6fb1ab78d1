"""The example virtio-input keyboard (:mod:`virtio_schema.examples.input`) against the fake driver.

Its three protocols: the configuration space (the driver writes ``select``/``subsel``, reads
``size`` and the union; here as QEMU 7.2 forwards it, the whole 136-byte space per write), the
eventq (events written exactly into device-writable buffers, waiting while there are none, never
dropped) and the statusq (LED events recorded); hostile chains on both queues; both ring formats.
The layouts are checked byte for byte against the specification (virtio 1.2, 5.8.4 and 5.8.6).
Last, the device served over a real vhost-user socket by the library's test front-end, sending
what QEMU 7.2 sends.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from construct import Struct
from test_vhost_user import serving

from virtio_schema.examples.input import (
    DEVIDS,
    EVENTQ,
    KEYS,
    LED_CAPSL,
    LED_NUML,
    LED_SCROLLL,
    STATUSQ,
    US_KEYMAP,
    InputDevice,
    InputEvent,
    keystrokes,
    main,
)
from virtio_schema.fake_queue import FakeDriver, FakePackedDriver, FakeQueue, make_queue
from virtio_schema.queue import VirtQueue
from virtio_schema.records import (
    INPUT_ABSINFO,
    INPUT_CONFIG,
    INPUT_DEVIDS,
    INPUT_EVENT,
    InputAbsInfo,
    InputConfig,
)
from virtio_schema.ring import PackedDesc
from virtio_schema.schema import (
    DescFlags,
    Feature,
    InputConfigSelect,
    InputEventType,
    PackedDescFlags,
    VirtioInputAbsInfo,
    VirtioInputConfig,
    VirtioInputDevids,
    VirtioInputEvent,
)
from virtio_schema.testing.frontend import (
    Frontend,
    GuestRam,
    SplitRingDriver,
    kick,
    make_eventfd,
    wait_signalled,
)
from virtio_schema.vhost_user.messages import CONFIG_HDR, ConfigHdrRec, Request

FQ = FakeQueue[VirtQueue, FakeDriver | FakePackedDriver]
EV = INPUT_EVENT.size
KEY, SYN, LED = InputEventType.KEY, InputEventType.SYN, InputEventType.LED
UNMAPPED = 0xFFFF_0000_0000
"""A driver address outside every region of the fake memory."""


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def eventq(packed: bool) -> Iterator[FQ]:
    fq = make_queue(16, features=Feature.INDIRECT_DESC | Feature.EVENT_IDX, packed=packed)
    yield fq
    fq.memory.close()


@pytest.fixture
def statusq(packed: bool) -> Iterator[FQ]:
    fq = make_queue(16, features=Feature.INDIRECT_DESC, packed=packed, index=STATUSQ)
    yield fq
    fq.memory.close()


def _events(data: bytes) -> list[InputEvent]:
    return [INPUT_EVENT.unpack_from(data, at) for at in range(0, len(data), EV)]


def _post(fq: FQ, n: int, size: int = EV) -> None:
    """The driver posts ``n`` device-writable buffers of ``size`` bytes (Linux: 8 each)."""
    for _ in range(n):
        assert fq.driver.publish([], [size]) is not None


def _push_unmapped(fq: FQ, flags: int) -> None:
    """A chain of one buffer at an address outside guest memory (malformed in both formats)."""
    d = fq.driver
    if isinstance(d, FakePackedDriver):
        d.push_raw([PackedDesc(UNMAPPED, EV, d.size - 1, flags)])
    else:
        i = d.take_descriptor()
        d.write_desc(i, UNMAPPED, EV, flags, 0)
        d.push_head(i)


# --- the layouts, byte for byte -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "fmt", "fields"),
    [
        (VirtioInputEvent, "<HHi", (("type", 0, 2), ("code", 2, 2), ("value", 4, 4))),
        (
            VirtioInputConfig,
            "<BBB5x128s",
            (("select", 0, 1), ("subsel", 1, 1), ("size", 2, 1), ("u", 8, 128)),
        ),
        (
            VirtioInputAbsInfo,
            "<iiiii",
            (("min", 0, 4), ("max", 4, 4), ("fuzz", 8, 4), ("flat", 12, 4), ("res", 16, 4)),
        ),
        (
            VirtioInputDevids,
            "<HHHH",
            (("bustype", 0, 2), ("vendor", 2, 2), ("product", 4, 2), ("version", 6, 2)),
        ),
    ],
    ids=["event", "config", "absinfo", "devids"],
)
def test_input_layouts_are_the_spec_structs(
    schema: Struct, fmt: str, fields: tuple[tuple[str, int, int], ...]
) -> None:
    """virtio 1.2, 5.8.4 / 5.8.6: sizes 8, 136, 20, 8; each field at the spec's offset, in its
    order, little-endian (distinct bytes 1, 2, 3 ... in field order); ``reserved[5]`` is zero."""
    values: dict[str, int | bytes] = {}
    counter = 1
    for name, _offset, size in fields:
        raw = bytes(range(counter, counter + size))
        values[name] = raw if name == "u" else int.from_bytes(raw, "little")
        counter += size
    built = schema.build(values)
    assert len(built) == schema.sizeof() == struct.calcsize(fmt)
    assert built == struct.pack(fmt, *values.values())
    for name, offset, size in fields:
        value = values[name]
        want = value if isinstance(value, bytes) else value.to_bytes(size, "little")
        assert built[offset : offset + size] == want, name
    if schema is VirtioInputConfig:
        assert built[3:8] == bytes(5)


def test_event_value_is_evdev_signed_and_abs_info_round_trips() -> None:
    assert INPUT_EVENT.pack(InputEvent(2, 0, -1)) == bytes.fromhex("02000000ffffffff")
    info = InputAbsInfo(0, 32767, 0, 0, 0)
    assert INPUT_ABSINFO.unpack(INPUT_ABSINFO.pack(info)) == info


# --- the configuration space ----------------------------------------------------------------------


def _qemu_write(dev: InputDevice, offset: int, value: int) -> None:
    """What QEMU 7.2 does for a driver's one-byte config write: the byte goes into its copy of
    the space (last read whole with GET_CONFIG), and the whole space goes to the back-end."""
    space = bytearray(dev.config())
    space[offset] = value
    dev.set_config(0, bytes(space))


def _query(dev: InputDevice, select: int, subsel: int) -> InputConfig:
    """Linux's ``virtinput_cfg_select`` through QEMU 7.2: select, subsel, then read."""
    _qemu_write(dev, INPUT_CONFIG.offsets["select"], select)
    _qemu_write(dev, INPUT_CONFIG.offsets["subsel"], subsel)
    cfg = INPUT_CONFIG.unpack(dev.config())
    assert (cfg.select, cfg.subsel) == (select, subsel)
    return cfg


def _bits(cfg: InputConfig) -> set[int]:
    return {n for n in range(cfg.size * 8) if cfg.u[n // 8] >> (n % 8) & 1}


def test_name_serial_and_ids_answer_with_their_size() -> None:
    dev = InputDevice(name="kbd 7", serial="sn-42")
    name = _query(dev, InputConfigSelect.ID_NAME, 0)
    assert (name.size, name.u) == (5, b"kbd 7".ljust(128, b"\0"))  # no NUL terminator counted
    serial = _query(dev, InputConfigSelect.ID_SERIAL, 0)
    assert serial.u[: serial.size] == b"sn-42"
    ids = _query(dev, InputConfigSelect.ID_DEVIDS, 0)
    assert ids.size == INPUT_DEVIDS.size
    assert INPUT_DEVIDS.unpack_from(ids.u) == DEVIDS


def test_ev_bits_answer_each_event_type() -> None:
    dev = InputDevice()
    keys = _query(dev, InputConfigSelect.EV_BITS, KEY)
    assert _bits(keys) == set(KEYS)
    assert {US_KEYMAP[c][0] for c in "virtio ok"} <= _bits(keys)
    leds = _query(dev, InputConfigSelect.EV_BITS, LED)
    assert (leds.size, _bits(leds)) == (1, {LED_NUML, LED_CAPSL, LED_SCROLLL})
    assert _bits(_query(dev, InputConfigSelect.EV_BITS, SYN)) == {0}
    # no autorepeat, no axes, no sound: size 0 (Linux then leaves those event types off)
    for kind in (InputEventType.REP, InputEventType.REL, InputEventType.ABS, InputEventType.SND):
        cfg = _query(dev, InputConfigSelect.EV_BITS, kind)
        assert (cfg.size, cfg.u) == (0, bytes(128))


@pytest.mark.parametrize(
    ("select", "subsel"),
    [
        (InputConfigSelect.UNSET, 0),
        (InputConfigSelect.PROP_BITS, 0),
        (InputConfigSelect.ABS_INFO, 0),
        (InputConfigSelect.ID_NAME, 1),  # the ids take subsel 0 only
        (InputConfigSelect.ID_DEVIDS, 3),
        (0x13, 0),
        (0xFF, 0xFF),
    ],
)
def test_a_question_without_answer_gets_size_0_and_a_zero_union(select: int, subsel: int) -> None:
    """virtio 1.2, 5.8.5.2: "size ... zero if it doesn't support a given select and subsel"."""
    dev = InputDevice()
    _query(dev, InputConfigSelect.ID_NAME, 0)  # a previous answer must not linger
    cfg = _query(dev, select, subsel)
    assert (cfg.size, cfg.u) == (0, bytes(128))


def test_a_whole_space_write_changes_select_and_subsel_only() -> None:
    """QEMU 7.2 sends back the size and union it last read (or anything): the device's answer
    follows ``select``/``subsel`` alone; a one-byte write of either field works too."""
    dev = InputDevice(name="kbd")
    junk = INPUT_CONFIG.pack(InputConfig(InputConfigSelect.ID_NAME, 0, 99, b"\xee" * 128))
    dev.set_config(0, junk)
    assert INPUT_CONFIG.unpack(dev.config()) == InputConfig(1, 0, 3, b"kbd".ljust(128, b"\0"))
    dev.set_config(INPUT_CONFIG.offsets["select"], bytes([InputConfigSelect.EV_BITS]))
    dev.set_config(INPUT_CONFIG.offsets["subsel"], bytes([LED]))
    assert INPUT_CONFIG.unpack(dev.config()).size == 1
    dev.set_config(INPUT_CONFIG.offsets["u"], b"\xff" * 128)  # touches neither field
    assert INPUT_CONFIG.unpack(dev.config())[:3] == (InputConfigSelect.EV_BITS, LED, 1)
    assert dev.writable_config == (range(0, INPUT_CONFIG.size),)


def test_reset_clears_the_selection_and_the_leds() -> None:
    dev = InputDevice()
    _query(dev, InputConfigSelect.ID_NAME, 0)
    dev.leds.add(LED_CAPSL)
    dev.reset()
    assert INPUT_CONFIG.unpack(dev.config())[:3] == (0, 0, 0)
    assert dev.leds == set()


# --- typing: the eventq ---------------------------------------------------------------------------


def test_keystrokes_press_syn_release_syn_inside_shift_where_needed() -> None:
    a, one = US_KEYMAP["a"][0], US_KEYMAP["1"][0]
    s = InputEvent(SYN, 0, 0)
    assert keystrokes("a") == [InputEvent(KEY, a, 1), s, InputEvent(KEY, a, 0), s]
    assert keystrokes("A!") == [
        InputEvent(KEY, 42, 1), InputEvent(KEY, a, 1), s, InputEvent(KEY, a, 0),
        InputEvent(KEY, 42, 0), s,
        InputEvent(KEY, 42, 1), InputEvent(KEY, one, 1), s, InputEvent(KEY, one, 0),
        InputEvent(KEY, 42, 0), s,
    ]  # fmt: skip
    assert [US_KEYMAP[c][0] for c in "v \n"] == [47, 57, 28]  # KEY_V, KEY_SPACE, KEY_ENTER


def test_an_untypeable_character_is_refused_before_anything_is_queued() -> None:
    dev = InputDevice()
    with pytest.raises(ValueError, match="é"):
        dev.type_text("café")
    assert not dev.pending


def test_typed_events_are_written_exactly_one_per_buffer(eventq: FQ) -> None:
    dev = InputDevice()
    dev.enabled(EVENTQ, eventq.queue)
    dev.type_text("Hi!")
    n = len(keystrokes("Hi!"))  # shift around H and !: 6 + 4 + 6
    assert n == 16
    _post(eventq, n)
    dev.handle(EVENTQ, eventq.queue)
    used = eventq.driver.used()
    assert [u.len for u in used] == [EV] * n
    assert _events(b"".join(u.data for u in used)) == keystrokes("Hi!")
    assert (dev.delivered, len(dev.pending), dev.bad_chains) == (n, 0, 0)


def test_events_wait_for_buffers_and_none_is_dropped(eventq: FQ) -> None:
    """No buffer: the events stay queued (the server is never held); as buffers come, they go
    out in order, across kicks and polls."""
    dev = InputDevice()
    dev.type_text("ok")  # 8 events, before the ring is even enabled
    dev.poll()
    dev.enabled(EVENTQ, eventq.queue)
    assert len(dev.pending) == 8
    got: list[InputEvent] = []
    for n in (3, 0, 2, 5):
        _post(eventq, n)
        dev.handle(EVENTQ, eventq.queue)
        got += _events(b"".join(u.data for u in eventq.driver.used()))
    assert got == keystrokes("ok")
    assert not dev.pending
    dev.type_text("k")  # two buffers left over from the last post: a poll fills them
    dev.poll()
    assert _events(b"".join(u.data for u in eventq.driver.used())) == keystrokes("k")[:2]
    assert list(dev.pending) == keystrokes("k")[2:]


def test_a_disabled_eventq_is_not_written(eventq: FQ) -> None:
    dev = InputDevice()
    dev.enabled(EVENTQ, eventq.queue)
    dev.disabled(EVENTQ)
    _post(eventq, 4)
    dev.type_text("x")
    dev.poll()
    assert eventq.driver.used() == []
    assert len(dev.pending) == 4


def test_an_event_is_written_across_two_descriptors(eventq: FQ) -> None:
    dev = InputDevice()
    dev.enabled(EVENTQ, eventq.queue)
    dev.send([InputEvent(KEY, 30, 1)])
    assert eventq.driver.publish([], [3, 5]) is not None
    dev.handle(EVENTQ, eventq.queue)
    (used,) = eventq.driver.used()
    assert used.len == EV
    assert _events(used.data) == [InputEvent(KEY, 30, 1)]


@pytest.mark.parametrize("how", ["too-short", "readable-only", "unmapped"])
def test_a_buffer_that_cannot_hold_an_event_is_returned_unused_and_the_event_waits(
    eventq: FQ, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """virtio 1.2, 5.8.6.1: eventq buffers MUST be device-writable and at least 8 bytes. One
    that is not goes back with length 0 (the driver keeps its slot), is counted and logged; the
    event goes into the next good buffer."""
    dev = InputDevice()
    dev.enabled(EVENTQ, eventq.queue)
    dev.send([InputEvent(KEY, 30, 1), InputEvent(SYN, 0, 0)])
    if how == "too-short":
        assert eventq.driver.publish([], [EV - 1]) is not None
    elif how == "readable-only":
        assert eventq.driver.publish([bytes(EV)], []) is not None
    else:
        _push_unmapped(eventq, DescFlags.WRITE)
    _post(eventq, 2)
    with caplog.at_level(logging.WARNING):
        dev.handle(EVENTQ, eventq.queue)
    bad, first, second = eventq.driver.used()
    assert bad.len == 0
    assert _events(first.data + second.data) == [InputEvent(KEY, 30, 1), InputEvent(SYN, 0, 0)]
    assert (dev.bad_chains, dev.delivered) == (1, 2)
    assert "eventq buffer returned unused" in caplog.text


def test_a_ring_the_driver_breaks_is_logged_once_and_left_alone(
    eventq: FQ, caplog: pytest.LogCaptureFixture
) -> None:
    """A ring-level violation (the avail index far ahead; a buffer id out of range) latches the
    queue broken: the device logs it once, keeps its events, and neither kicks nor polls touch
    the ring again (no exception, no log flood)."""
    dev = InputDevice()
    dev.enabled(EVENTQ, eventq.queue)
    d = eventq.driver
    if isinstance(d, FakePackedDriver):
        d.push_raw([PackedDesc(0, EV, 99, PackedDescFlags.WRITE)])
    else:
        d.set_avail_idx(d.avail_idx + 100)
    dev.type_text("x")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            dev.poll()
            dev.handle(EVENTQ, eventq.queue)
    assert caplog.text.count("not served until it restarts") == 1
    assert len(dev.pending) == 4


def test_type_when_ready_types_after_the_first_eventq_kick(eventq: FQ) -> None:
    dev = InputDevice()
    dev.type_when_ready("ok", delay=0.0)
    dev.enabled(EVENTQ, eventq.queue)
    dev.poll()
    assert not dev.pending  # no buffers posted yet: the driver is not ready
    _post(eventq, 8)
    dev.handle(EVENTQ, eventq.queue)
    assert dev.ready_at is not None
    dev.poll()
    assert _events(b"".join(u.data for u in eventq.driver.used())) == keystrokes("ok")
    dev.poll()
    assert dev.delivered == 8  # typed once


# --- LEDs: the statusq ----------------------------------------------------------------------------


def _status(fq: FQ, event: InputEvent) -> None:
    assert fq.driver.publish([INPUT_EVENT.pack(event)], []) is not None


def test_led_events_are_recorded_and_logged(statusq: FQ, caplog: pytest.LogCaptureFixture) -> None:
    dev = InputDevice()
    for code, value in [(LED_CAPSL, 1), (LED_NUML, 1), (LED_CAPSL, 0)]:
        _status(statusq, InputEvent(LED, code, value))
    _status(statusq, InputEvent(InputEventType.SND, 1, 1))  # not an LED: ignored
    with caplog.at_level(logging.INFO):
        dev.handle(STATUSQ, statusq.queue)
    assert list(dev.led_events) == [(LED_CAPSL, True), (LED_NUML, True), (LED_CAPSL, False)]
    assert dev.leds == {LED_NUML}
    lines = [r.getMessage() for r in caplog.records if "LED" in r.getMessage()]
    assert lines == [
        "virtio-input: LED CAPSL on",
        "virtio-input: LED NUML on",
        "virtio-input: LED CAPSL off",
    ]
    assert [u.len for u in statusq.driver.used()] == [0, 0, 0, 0]
    assert dev.bad_chains == 0


def test_hostile_status_chains_are_logged_returned_and_the_queue_goes_on(
    statusq: FQ, caplog: pytest.LogCaptureFixture
) -> None:
    """A status buffer the device may write (nothing to read), one too short, one outside guest
    memory, one with more than an event: the device neither crashes nor loses a slot, and the
    LED event after them is still recorded."""
    dev = InputDevice()
    assert statusq.driver.publish([], [EV]) is not None  # device-writable: no event to read
    assert statusq.driver.publish([bytes(EV - 1)], []) is not None  # too short
    _push_unmapped(statusq, 0)  # readable, outside guest memory
    long = INPUT_EVENT.pack(InputEvent(LED, LED_SCROLLL, 1)) + b"\xff" * 8
    assert statusq.driver.publish([long], []) is not None  # extra bytes: the first event counts
    _status(statusq, InputEvent(LED, LED_CAPSL, 7))  # any non-zero value is "on"
    with caplog.at_level(logging.WARNING):
        dev.handle(STATUSQ, statusq.queue)
    used = statusq.driver.used()
    assert len(used) == 5
    assert all(u.len == 0 for u in used)
    assert dev.bad_chains == 3
    assert caplog.text.count("bad statusq buffer") == 3
    assert list(dev.led_events) == [(LED_SCROLLL, True), (LED_CAPSL, True)]


def test_an_unknown_led_is_recorded_by_number(
    statusq: FQ, caplog: pytest.LogCaptureFixture
) -> None:
    dev = InputDevice()
    _status(statusq, InputEvent(LED, 9, 1))
    with caplog.at_level(logging.INFO):
        dev.handle(STATUSQ, statusq.queue)
    assert list(dev.led_events) == [(9, True)]
    assert "LED #9 on" in caplog.text


# --- the command line -----------------------------------------------------------------------------


def test_main_refuses_a_text_it_cannot_type(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--vhost-user", "/nonexistent/sock", "--type", "naïve"])
    assert exc.value.code == 2
    assert "cannot type" in capsys.readouterr().err


# --- over a real vhost-user socket, as QEMU drives it ---------------------------------------------


def _get_config(fe: Frontend) -> bytes:
    got = fe.get_config(0, INPUT_CONFIG.size)
    assert got is not None
    assert got[0] == ConfigHdrRec(0, INPUT_CONFIG.size, 0)
    return got[1]


def _set_config(fe: Frontend, space: bytes) -> int:
    """SET_CONFIG of the whole space at offset 0, flags 0 (front-end), NEED_REPLY: QEMU 7.2's
    ``vhost_input_set_config``."""
    payload = CONFIG_HDR.pack(ConfigHdrRec(0, len(space), 0)) + space
    fe.send(Request.SET_CONFIG, payload, need_reply=True)
    return fe.ack(Request.SET_CONFIG)


def test_qemu_7_2_config_traffic_probe_typing_and_leds_over_a_socket(short_tmp: Path) -> None:
    """The back-end accepts QEMU 7.2's whole-space SET_CONFIG (the front-end's write of one
    byte), answers the Linux driver's probe questions through GET_CONFIG, writes typed events
    into eventq buffers and records an LED event from the statusq, with real eventfds."""
    device = InputDevice(name="kbd over vhost-user")
    with ExitStack() as stack:
        server = stack.enter_context(serving(short_tmp / "in.sock", lambda: device, io_timeout=2.0))
        fe = stack.enter_context(Frontend(server.path))
        ram = stack.enter_context(GuestRam(name="vu-input"))
        offered = fe.get_features()
        assert offered & Feature.VERSION_1
        fe.set_protocol_features(fe.get_protocol_features())
        assert fe.get_queue_num() == 2
        fe.set_owner()
        # the driver's probe: select ID_NAME, subsel 0, read size and string (all via QEMU)
        for offset, value in ((0, InputConfigSelect.ID_NAME), (1, 0)):
            space = bytearray(_get_config(fe))
            space[offset] = value
            assert _set_config(fe, bytes(space)) == 0
        cfg = INPUT_CONFIG.unpack(_get_config(fe))
        assert cfg.u[: cfg.size] == b"kbd over vhost-user"
        # start both rings as QEMU does, then Linux fills the eventq
        fe.set_features(int(Feature.VERSION_1 | Feature.PROTOCOL_FEATURES))
        assert fe.use_ram(ram, need_reply=True) == 0
        rings = [SplitRingDriver(ram, 16), SplitRingDriver(ram, 16)]
        fds = [(make_eventfd(), make_eventfd()) for _ in rings]
        for kick_fd, call_fd in fds:
            stack.callback(os.close, kick_fd)
            stack.callback(os.close, call_fd)
        for index, (ring, (kick_fd, call_fd)) in enumerate(zip(rings, fds, strict=True)):
            fe.set_vring_num(index, 16)
            fe.set_vring_base(index, 0)
            fe.set_vring_addr(ring.vring_addr(index))
            fe.set_vring_call(index, call_fd)
            fe.set_vring_kick(index, kick_fd)
            fe.set_vring_enable(index, 1)
        device.type_text("ok")
        for _ in range(8):
            rings[EVENTQ].publish([], [EV])
        kick(fds[EVENTQ][0])
        got: list[InputEvent] = []
        while len(got) < 8:
            assert wait_signalled(fds[EVENTQ][1]), "no used-buffer notification on the eventq"
            got += _events(b"".join(u.data for u in rings[EVENTQ].used()))
        assert got == keystrokes("ok")
        rings[STATUSQ].publish([INPUT_EVENT.pack(InputEvent(LED, LED_CAPSL, 1))], [])
        kick(fds[STATUSQ][0])
        assert wait_signalled(fds[STATUSQ][1]), "no used-buffer notification on the statusq"
        assert [u.len for u in rings[STATUSQ].used()] == [0]
        assert list(device.led_events) == [(LED_CAPSL, True)]
        assert server.errors == []
