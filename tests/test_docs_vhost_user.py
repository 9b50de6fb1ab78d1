"""docs/vhost_user.rst stays true: its examples type-check and run, its ring tables are the code's.

The device examples are taken from the page itself (each ``code-block`` is found by the marker
comment on its first line), written to a file and checked with ``mypy --strict`` under the
project's configuration (so the project's ``typings/`` stubs are used), then run against the
library's fake driver (:func:`~virtio_schema.fake_queue.make_queue`): no server, no socket.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from virtio_schema.fake_queue import make_queue
from virtio_schema.vhost_user import VhostUserDevice
from virtio_schema.vhost_user.rings import RingEvent, RingState, hooks, transition

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "vhost_user.rst"

ONE_QUEUE = "# one-queue example"
TWO_QUEUE = "# two-queue example"


def python_blocks(page: Path) -> list[str]:
    """The ``.. code-block:: python`` blocks of a docs page, dedented, in order."""
    blocks: list[str] = []
    lines = page.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() != ".. code-block:: python":
            continue
        body: list[str] = []
        for following in lines[i + 1 :]:
            if following.strip() and not following.startswith("   "):
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip() + "\n")
    return blocks


def _example(marker: str) -> str:
    (code,) = [block for block in python_blocks(PAGE) if block.startswith(marker + "\n")]
    return code


def _load(marker: str, tmp_path: Path) -> ModuleType:
    """The example as a module (not ``__main__``: its server does not start)."""
    path = tmp_path / (marker.strip("# ").replace("-", "_").replace(" ", "_") + ".py")
    path.write_text(_example(marker))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _device(module: ModuleType, name: str) -> VhostUserDevice:
    device = getattr(module, name)()
    assert isinstance(device, VhostUserDevice)
    return device


# --- the examples type-check -------------------------------------------------------------------


@pytest.mark.parametrize("marker", [ONE_QUEUE, TWO_QUEUE])
def test_the_example_passes_mypy_strict_with_the_project_configuration(
    marker: str, tmp_path: Path
) -> None:
    path = tmp_path / "example.py"
    path.write_text(_example(marker))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "pyproject.toml",
         "--cache-dir", str(tmp_path / "mypy_cache"), str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# --- the examples run --------------------------------------------------------------------------


def test_the_one_queue_example_answers_in_the_same_chain(tmp_path: Path) -> None:
    device = _device(_load(ONE_QUEUE, tmp_path), "UpperDevice")
    fq = make_queue(size=4)
    fq.driver.publish([b"ping"], [16])
    device.handle(0, fq.queue)
    (used,) = fq.driver.used()
    assert used.data == b"PING"


def test_the_two_queue_example_echoes_a_request_into_a_buffer_of_queue_1(tmp_path: Path) -> None:
    device = _device(_load(TWO_QUEUE, tmp_path), "EchoDevice")
    requests, replies = make_queue(size=4), make_queue(size=4, index=1)
    device.enabled(0, requests.queue)
    device.enabled(1, replies.queue)
    replies.driver.publish([], [16])
    requests.driver.publish([b"ping"], [])
    device.handle(0, requests.queue)
    (request,) = requests.driver.used()
    assert request.len == 0
    (reply,) = replies.driver.used()
    assert reply.data == b"ping"


def test_the_two_queue_example_sends_a_waiting_reply_on_the_turn_of_queue_1(
    tmp_path: Path,
) -> None:
    device = _device(_load(TWO_QUEUE, tmp_path), "EchoDevice")
    requests, replies = make_queue(size=4), make_queue(size=4, index=1)
    device.enabled(0, requests.queue)
    device.enabled(1, replies.queue)
    requests.driver.publish([b"early"], [])
    device.handle(0, requests.queue)
    assert replies.driver.used() == []
    replies.driver.publish([], [16])  # the driver adds a buffer and kicks queue 1
    device.handle(1, replies.queue)
    (reply,) = replies.driver.used()
    assert reply.data == b"early"


def test_the_two_queue_example_takes_waiting_requests_on_the_turn_of_queue_1(
    tmp_path: Path,
) -> None:
    device = _device(_load(TWO_QUEUE, tmp_path), "EchoDevice")
    requests, replies = make_queue(size=2), make_queue(size=2, index=1)
    device.enabled(0, requests.queue)
    device.enabled(1, replies.queue)
    for word in (b"a", b"b"):
        requests.driver.publish([word], [])
    device.handle(0, requests.queue)  # no reply buffer: both wait in the device, it is full
    assert len(requests.driver.used()) == 2
    for word in (b"c", b"d"):
        requests.driver.publish([word], [])  # no kick comes for these after the next turn
    for _ in range(2):
        replies.driver.publish([], [16])
    device.handle(1, replies.queue)
    assert [used.data for used in replies.driver.used()] == [b"a", b"b"]
    assert len(requests.driver.used()) == 2  # c and d taken to wait for buffers
    for _ in range(2):
        replies.driver.publish([], [16])
    device.handle(1, replies.queue)
    assert [used.data for used in replies.driver.used()] == [b"c", b"d"]


def test_the_two_queue_example_resumes_on_the_next_turn_when_queue_1_budget_was_spent(
    tmp_path: Path,
) -> None:
    device = _device(_load(TWO_QUEUE, tmp_path), "EchoDevice")
    requests, replies = make_queue(size=4), make_queue(size=4, index=1)
    device.enabled(0, requests.queue)
    device.enabled(1, replies.queue)
    replies.queue.set_budget(1)  # what is left of queue 1's turn, as the back-end counts it
    for word in (b"x", b"y"):
        replies.driver.publish([], [16])
        requests.driver.publish([word], [])
    device.handle(0, requests.queue)
    assert [used.data for used in replies.driver.used()] == [b"x"]
    replies.queue.set_budget(4)  # queue 1's own turn renews its budget
    device.handle(1, replies.queue)
    assert [used.data for used in replies.driver.used()] == [b"y"]


def test_the_two_queue_example_writes_nothing_to_a_disabled_reply_queue(tmp_path: Path) -> None:
    device = _device(_load(TWO_QUEUE, tmp_path), "EchoDevice")
    requests, replies = make_queue(size=4), make_queue(size=4, index=1)
    device.enabled(0, requests.queue)
    device.enabled(1, replies.queue)
    device.disabled(1)
    replies.driver.publish([], [16])
    requests.driver.publish([b"ping"], [])
    device.handle(0, requests.queue)
    assert replies.driver.used() == []
    assert replies.driver.used_idx == 0


# --- the ring tables are the code's --------------------------------------------------------------


def _section(title: str) -> str:
    text = PAGE.read_text()
    start = text.index(f"\n{title}\n{'-' * len(title)}\n")
    end = re.search(r"\n[^\n]+\n-{3,}\n", text[start + len(title) + 2 :])
    assert end is not None
    return text[start : start + len(title) + 2 + end.start()]


def test_the_ring_state_table_says_which_states_are_started_and_enabled() -> None:
    rows = re.findall(r"^``(.+?)``\s+(yes|no)\s+(yes|no)\s", _section("Ring states"), re.MULTILINE)
    documented = {
        RingState(name): (started == "yes", enabled == "yes") for name, started, enabled in rows
    }
    assert documented == {s: (s.started, s.enabled) for s in RingState}


def test_the_ring_transition_table_is_the_code_table_with_its_hooks() -> None:
    section = _section("Ring states")
    table = section[section.index(".. list-table:: Ring transitions") :]
    rows: list[list[str]] = []
    for line in table.splitlines()[1:]:
        if line.startswith("   * - "):
            rows.append([line.removeprefix("   * - ")])
        elif line.startswith("     - "):
            rows[-1].append(line.removeprefix("     - "))
        elif line.strip() and not line.startswith("   :"):
            break
    header, *body = rows
    events = [RingEvent(name) for name in header[1:]]
    documented: dict[tuple[RingState, RingEvent], tuple[RingState, tuple[str, ...]]] = {}
    for state_name, *cells in body:
        for event, cell in zip(events, cells, strict=True):
            new_name, _, calls = cell.partition("; ")
            documented[RingState(state_name), event] = (
                RingState(new_name),
                tuple(re.findall(r"``(\w+)``", calls)),
            )
    assert documented == {
        (state, event): (transition(state, event), hooks(state, transition(state, event)))
        for state in RingState
        for event in RingEvent
    }
