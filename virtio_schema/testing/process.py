"""A device back-end as a child process, for end-to-end tests (this project's and yours).

:class:`BackendProcess` starts ``python ARGS...`` (e.g. ``-m virtio_schema.examples.blk
--vhost-user SOCK ...``), or another program's ``ARGS`` (e.g. a C reference back-end), with its
output in a log file, waits until its socket exists, and ends it
by its own PID: SIGTERM, then SIGKILL after a grace period. An optional watchdog kills it after a
hard timeout even if the test hangs. Nothing else is ever signalled.

Imports: the standard library only.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["BackendProcess", "BackendStartError"]


class BackendStartError(AssertionError):
    """The back-end exited, or did not create its socket in time; the message holds its log.
    (An ``AssertionError``, so that pytest shows it as a test failure with the log.)"""


class BackendProcess:
    """``python *args`` (or ``program *args``) as a child process that serves on ``sock``,
    logging to ``log``.

    ``timeout`` (seconds, optional) arms a watchdog that kills the process at the latest then.
    Use it as a context manager, or call :meth:`stop` in a ``finally`` block.
    """

    def __init__(
        self,
        args: Sequence[str],
        sock: Path,
        log: Path,
        *,
        timeout: float | None = None,
        start_timeout: float = 20.0,
        program: str = sys.executable,
    ) -> None:
        self.sock = sock
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [program, *args], stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._watchdog: threading.Timer | None = None
        if timeout is not None:
            self._watchdog = threading.Timer(timeout, self.proc.kill)
            self._watchdog.daemon = True
            self._watchdog.start()
        deadline = time.monotonic() + start_timeout
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BackendStartError(f"back-end did not start:\n{self.log()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything the back-end printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str] | None:
        """The last match of ``pattern`` in the log from offset ``after`` on, once there is one
        (``None`` after ``timeout`` seconds)."""
        end = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.log()[after:]))
            if found:
                return found[-1]
            if time.monotonic() >= end:
                return None
            time.sleep(0.05)

    def stop(self, grace: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """``sig`` (SIGTERM; e.g. SIGINT for a program that reports on it), then SIGKILL after
        ``grace`` seconds; the exit status (negative: a signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
