"""``virtio_schema.testing.process.BackendProcess``: start, log, stop by PID, watchdog."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from virtio_schema.testing import qemu
from virtio_schema.testing.process import BackendProcess, BackendStartError

# a stand-in back-end: says hello, creates its "socket", then serves until SIGTERM
SERVER = """
import pathlib, signal, sys, time
print("hello from", sys.argv[1], flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
pathlib.Path(sys.argv[1]).touch()
print("serving", flush=True)
while True:
    time.sleep(0.05)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_starts_waits_for_the_socket_logs_and_stops_by_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with BackendProcess(["-c", SERVER, str(sock)], sock, tmp_path / "log") as be:
        assert sock.exists()
        assert _alive(be.pid)
        found = be.wait_for_log(r"serving", timeout=10)
        assert found is not None
        assert f"hello from {sock}" in be.log()
        assert be.wait_for_log(r"never printed", timeout=0.1) is None
        status = be.stop()
    assert status == 3  # its SIGTERM handler ran: a clean stop, not a kill
    assert be.proc.poll() == 3


def test_a_back_end_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    stubborn = SERVER.replace("sys.exit(3)", "None")
    be = BackendProcess(["-c", stubborn, str(sock)], sock, tmp_path / "log")
    try:
        be.wait_for_log(r"serving", timeout=10)
        assert be.stop(grace=0.5) == -signal.SIGKILL
    finally:
        be.stop()


def test_a_back_end_that_exits_early_raises_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(BackendStartError, match="no such option"):
        BackendProcess(
            ["-c", "import sys; print('no such option'); sys.exit(2)"],
            tmp_path / "never.sock",
            tmp_path / "log",
        )


def test_no_socket_in_time_raises_and_leaves_no_process(tmp_path: Path) -> None:
    with pytest.raises(BackendStartError) as info:
        BackendProcess(
            ["-c", "import time; print('busy', flush=True); time.sleep(60)"],
            tmp_path / "never.sock",
            tmp_path / "log",
            start_timeout=0.5,
        )
    assert "busy" in str(info.value)


def test_the_watchdog_kills_a_back_end_the_test_forgot(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    be = BackendProcess(["-c", SERVER, str(sock)], sock, tmp_path / "log", timeout=0.5)
    try:
        deadline = time.monotonic() + 20
        while be.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert be.proc.returncode == -signal.SIGKILL
    finally:
        be.stop()


def test_another_program_than_python_can_be_the_back_end(tmp_path: Path) -> None:
    sh = shutil.which("sh")
    assert sh is not None
    sock = tmp_path / "s.sock"
    script = 'echo "C back-end on $1"; touch "$1"; exec sleep 60'
    with BackendProcess(["-c", script, "sh", str(sock)], sock, tmp_path / "log", program=sh) as be:
        assert be.wait_for_log(rf"C back-end on {sock}", timeout=10) is not None
        assert be.stop() == -signal.SIGTERM


def test_stop_sends_the_signal_asked_for(tmp_path: Path) -> None:
    sh = shutil.which("sh")
    assert sh is not None
    sock = tmp_path / "s.sock"
    with BackendProcess(["-c", 'touch "$1"; exec sleep 60', "sh", str(sock)], sock, tmp_path / "log",
                        program=sh) as be:  # fmt: skip
        assert be.stop(sig=signal.SIGINT) == -signal.SIGINT


# --- the guest harness: progress of a long run (virtio_schema.testing.qemu) ---------------------


@pytest.mark.parametrize("tty", [False, True], ids=["captured", "terminal"])
def test_a_running_guest_shows_progress_on_a_terminal_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tty: bool
) -> None:
    """A stand-in for QEMU prints console lines for a while: on a terminal the harness prints a
    progress line with the latest one; elsewhere (a test's captured output, a log) nothing."""
    script = "for i in 1 2 3 4 5 6; do echo console line $i; sleep 0.1; done"
    monkeypatch.setattr(qemu, "_PROGRESS_EVERY", 0.15)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    with qemu.RunningGuest(["sh", "-c", script], timeout=30) as guest:
        result = guest.wait()
    assert result.returncode == 0
    out = capsys.readouterr().out
    if tty:
        assert f"guest (QEMU pid {guest.pid}) at " in out, out
        assert ": console line " in out, out
    else:
        assert out == ""
