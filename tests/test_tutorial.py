"""docs/tutorial.rst stays true: its code runs, its tests pass, and it passes ``mypy --strict``.

The page's ``.. code-block:: python`` blocks are one module, in order (the page says so). They are
taken out of the page as ``tests/test_docs_vhost_user.py`` takes its examples, joined, written to
a file, loaded as a module (not ``__main__``: its server does not start), and:

* each ``test_*`` function the page defines is run, on both ring formats, as the page's own
  ``@pytest.mark.parametrize("packed", ...)`` would run it;
* the module passes ``mypy --strict`` under the project's configuration (the project's
  ``typings/`` stubs for Construct), and a mistake the page says mypy catches is reported;
* the page's device is served over a real vhost-user socket to the library's test front-end, with
  QEMU's whole-space configuration writes, and across a reconnect (step 6): the new connection's
  fresh device fills the eventq buffers the first one had not used.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from test_docs_vhost_user import python_blocks
from test_vhost_user import serving

from virtio_schema.schema import Feature
from virtio_schema.testing.frontend import (
    Frontend,
    GuestRam,
    SplitRingDriver,
    kick,
    make_eventfd,
    wait_signalled,
)
from virtio_schema.vhost_user import VhostUserDevice
from virtio_schema.vhost_user.messages import CONFIG_HDR, ConfigHdrRec, Request

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "tutorial.rst"
MISTAKE = (  # the record of another layout (step 4)
    "EVENT.pack(Event(EV_LED, 1, 1))",
    "EVENT.pack(Config(EV_LED, 1, 1, b''))",
)


def _source() -> str:
    return "\n\n".join(python_blocks(PAGE))


def _page_tests() -> list[str]:
    """The names of the test functions the page defines, in order."""
    return re.findall(r"^def (test_\w+)\(", _source(), re.MULTILINE)


def _load(tmp_path: Path) -> ModuleType:
    path = tmp_path / "keyboard.py"
    path.write_text(_source())
    spec = importlib.util.spec_from_file_location("keyboard", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mypy(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "pyproject.toml",
         "--cache-dir", str(tmp_path / "mypy_cache"), str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_the_page_is_one_module_in_six_blocks_with_its_own_tests() -> None:
    blocks = python_blocks(PAGE)
    assert len(blocks) == 6
    assert blocks[0].startswith("from __future__ import annotations\n")
    assert len(_page_tests()) >= 5


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("name", _page_tests())
def test_the_page_test_passes(name: str, packed: bool, tmp_path: Path) -> None:
    test: Callable[[bool], None] = getattr(_load(tmp_path), name)
    test(packed)


def test_the_page_passes_mypy_strict_and_mypy_reports_the_mistake_it_names(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keyboard.py"
    path.write_text(_source())
    result = _mypy(path, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    right, wrong = MISTAKE
    source = _source()
    assert source.count(right) == 1
    path.write_text(source.replace(right, wrong))
    line = source[: source.index(right)].count("\n") + 1
    result = _mypy(path, tmp_path)
    assert result.returncode == 1
    assert f"keyboard.py:{line}: error:" in result.stdout, result.stdout


# --- over a real vhost-user socket ----------------------------------------------------------------


def _connect(
    stack: ExitStack, path: str, ram: GuestRam, rings: list[SplitRingDriver]
) -> tuple[Frontend, list[tuple[int, int]]]:
    """A front-end connection that starts both rings where the driver's used index is, as QEMU
    does (also after a reconnect, having no position from the dead back-end)."""
    fe = stack.enter_context(Frontend(path))
    fe.get_features()
    fe.set_protocol_features(fe.get_protocol_features())
    assert fe.get_queue_num() == 2
    fe.set_owner()
    fe.set_features(int(Feature.VERSION_1 | Feature.PROTOCOL_FEATURES))
    assert fe.use_ram(ram, need_reply=True) == 0
    fds = [(make_eventfd(), make_eventfd()) for _ in rings]
    for index, (ring, (kick_fd, call_fd)) in enumerate(zip(rings, fds, strict=True)):
        stack.callback(os.close, kick_fd)
        stack.callback(os.close, call_fd)
        fe.set_vring_num(index, ring.size)
        fe.set_vring_base(index, ring.used_idx)
        fe.set_vring_addr(ring.vring_addr(index))
        fe.set_vring_call(index, call_fd)
        fe.set_vring_kick(index, kick_fd)
        fe.set_vring_enable(index, 1)
    return fe, fds


def _ask(fe: Frontend, select: int, subsel: int, size: int) -> bytes:
    """The driver's question through QEMU: each one-byte write is a SET_CONFIG of the whole
    space at offset 0 with the bytes last read; then the answer, read whole."""
    for offset, value in ((0, select), (1, subsel)):
        got = fe.get_config(0, size)
        assert got is not None
        space = bytearray(got[1])
        space[offset] = value
        fe.send(Request.SET_CONFIG, CONFIG_HDR.pack(ConfigHdrRec(0, size, 0)) + space,
                need_reply=True)  # fmt: skip
        assert fe.ack(Request.SET_CONFIG) == 0
    got = fe.get_config(0, size)
    assert got is not None
    return got[1]


def _events(kb: Any, ring: SplitRingDriver, call_fd: int, count: int) -> list[Any]:
    got: list[Any] = []
    while len(got) < count:
        assert wait_signalled(call_fd), "no used-buffer notification on the eventq"
        got += [kb.EVENT.unpack(used.data) for used in ring.used()]
    return got


def test_the_page_device_over_a_socket_and_a_fresh_device_after_a_reconnect(
    short_tmp: Path,
) -> None:
    kb = _load(short_tmp)
    devices: list[Any] = []

    def factory() -> VhostUserDevice:  # what the page's __main__ does, once per connection
        device = kb.KeyboardDevice()
        device.keyboard.press(kb.KEY_A)
        devices.append(device)
        return device  # type: ignore[no-any-return]

    press = [
        kb.Event(kb.EV_KEY, kb.KEY_A, 1),
        kb.Event(kb.EV_SYN, 0, 0),
        kb.Event(kb.EV_KEY, kb.KEY_A, 0),
        kb.Event(kb.EV_SYN, 0, 0),
    ]
    with ExitStack() as stack:
        server = stack.enter_context(serving(short_tmp / "kbd.sock", factory, io_timeout=2.0))
        ram = stack.enter_context(GuestRam(name="tutorial"))
        eventq, statusq = SplitRingDriver(ram, 16), SplitRingDriver(ram, 16)
        with ExitStack() as first:
            fe, fds = _connect(first, server.path, ram, [eventq, statusq])
            answer = kb.CONFIG.unpack(_ask(fe, kb.ID_NAME, 0, kb.CONFIG.size))
            assert answer.u[: answer.size] == b"tutorial keyboard"
            keys = kb.CONFIG.unpack(_ask(fe, kb.EV_BITS, kb.EV_KEY, kb.CONFIG.size))
            assert keys.u[kb.KEY_A // 8] >> (kb.KEY_A % 8) & 1
            for _ in range(6):
                eventq.publish([], [kb.EVENT.size])
            kick(fds[kb.EVENTQ][0])
            assert _events(kb, eventq, fds[kb.EVENTQ][1], 4) == press
            statusq.publish([kb.EVENT.pack(kb.Event(kb.EV_LED, 1, 1))], [])
            kick(fds[kb.STATUSQ][0])
            assert wait_signalled(fds[kb.STATUSQ][1])
            assert [used.len for used in statusq.used()] == [0]
            assert devices[0].keyboard.leds == {1: True}
        # the connection is gone (a dead back-end process); two eventq buffers were not used
        assert eventq.in_flight == 2
        with ExitStack() as second:
            fe, fds = _connect(second, server.path, ram, [eventq, statusq])
            assert len(devices) == 2  # a fresh device: it knows no LED
            assert devices[1].keyboard.leds == {}
            assert _events(kb, eventq, fds[kb.EVENTQ][1], 2) == press[:2]
            for _ in range(2):
                eventq.publish([], [kb.EVENT.size])
            kick(fds[kb.EVENTQ][0])
            assert _events(kb, eventq, fds[kb.EVENTQ][1], 2) == press[2:]
        assert server.errors == []
