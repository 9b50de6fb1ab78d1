"""The command lines of the inspector and the example devices read well: ``--help`` names the
program as it is run, describes it in plain text (no reStructuredText, no private names), says what
every option does, and ends with the command line of the driver's side (QEMU, testpmd) laid out
as it is typed. The inspector's ``--hexdump`` shows the bytes in its text output too, and the demo
reports progress on a terminal only."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtio_schema import _cli, inspect
from virtio_schema.examples import blk, demo, net, rng, vsock
from virtio_schema.examples import input as input_device
from virtio_schema.fake_queue import make_queue

ENTRY_POINTS: dict[str, Callable[[list[str] | None], int]] = {
    "virtio_schema.examples.blk": blk.main,
    "virtio_schema.examples.rng": rng.main,
    "virtio_schema.examples.net": net.main,
    "virtio_schema.examples.demo": demo.main,
    "virtio_schema.examples.input": input_device.main,
    "virtio_schema.examples.vsock": vsock.main,
    "virtio_schema.inspect": inspect.main,
}
FRONT_ENDS = ("qemu-system-", "dpdk-testpmd")
"""What the epilog's command line of the other side starts with."""

OPTION = re.compile(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$")
"""An option's line in argparse's help: its invocation, then (if it fits) its help text."""


def _help(module: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal: one width for all
    monkeypatch.setattr(sys, "argv", ["pytest"])  # not a console script: the python -m name
    with pytest.raises(SystemExit) as exit_:
        ENTRY_POINTS[module](["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _options(text: str) -> list[tuple[str, str]]:
    """(invocation, help) of every option and positional argument the help lists."""
    lines = text.splitlines()
    found: list[tuple[str, str]] = []
    positional = False
    for i, line in enumerate(lines):
        if not line.startswith(" "):
            positional = line == "positional arguments:"
            continue
        m = OPTION.match(line)
        if m is None and positional and line.startswith("  ") and line[2] != " ":
            m = re.match(r"^  (\S+)(?:\s{2,}(\S.*))?$", line)
        if m is None:
            continue
        help_ = m.group(2) or ""
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if not help_ and following.startswith("    ") and not following.strip().startswith("-"):
            help_ = following.strip()  # a long invocation: the help starts on the next line
        found.append((m.group(1), help_))
    return found


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_help_names_the_program_as_it_is_run(
    module: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _help(module, capsys, monkeypatch)
    assert text.startswith(f"usage: python -m {module} ")
    assert "%(prog)" not in text


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_help_is_plain_text_without_markup_or_private_names(
    module: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _help(module, capsys, monkeypatch)
    assert "``" not in text
    assert "::" not in text
    assert re.search(r":\w+:`", text) is None, "a Sphinx role (:meth:`...`)"
    assert re.findall(r"\b\w+\._\w+", text) == [], "a private name"


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_every_option_says_what_it_does(
    module: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    options = _options(_help(module, capsys, monkeypatch))
    assert len(options) > 1
    assert [option for option, help_ in options if not help_] == []


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_the_epilog_lays_out_the_drivers_command_line_in_lines(
    module: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = _help(module, capsys, monkeypatch).splitlines()
    last_option = max(i for i, line in enumerate(lines) if OPTION.match(line))
    epilog = [line.strip() for line in lines[last_option + 1 :]]
    starts = [i for i, line in enumerate(epilog) if line.startswith(FRONT_ENDS)]
    assert starts, "no QEMU or testpmd command line after the options"
    first = starts[0]
    assert epilog[first].endswith("\\"), "the command goes on, one option group a line"
    assert epilog[first + 1].startswith("-")


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_python_dash_m_runs_the_entry_point(module: str) -> None:
    """``python -m MODULE --help``, the documented way to run each, reaches its ``main``."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m {module}"), proc.stdout[:300]


def test_a_console_script_is_named_as_it_was_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/virtio-schema-blk", "--help"])
    assert _cli.program("virtio_schema.examples.blk") == "virtio-schema-blk"
    monkeypatch.setattr(sys, "argv", ["/work/virtio_schema/examples/blk.py"])
    assert _cli.program("virtio_schema.examples.blk") == "python -m virtio_schema.examples.blk"


# --- the inspector's --hexdump in text ------------------------------------------------------------


def _inspect_text(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    fq = make_queue(4)
    d = fq.driver
    d.publish([b"Hello, virtio!\x00\x01\xfe\xff" + bytes(range(0x30, 0x38))], [8])
    path = tmp_path / "mem.bin"
    path.write_bytes(bytes(d.memory.buffers[0]))
    base = d.memory.memory.regions[0].start
    rc = inspect.main(
        ["--mem", str(path), "--mem-base", hex(base), "--desc", hex(d.desc_addr),
         "--avail", hex(d.avail_addr), "--used", hex(d.used_addr), "--size", "4", *extra]
    )  # fmt: skip
    assert rc == 0
    return capsys.readouterr().out


def test_hexdump_shows_each_buffers_first_bytes_under_its_descriptor_in_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _inspect_text(tmp_path, capsys, "--hexdump", "20").splitlines()
    readable = next(i for i, line in enumerate(lines) if "len=26" in line)
    assert lines[readable + 1].split() == [
        "0000", "48", "65", "6c", "6c", "6f", "2c", "20", "76", "69", "72", "74", "69", "6f", "21",
        "00", "01", "|Hello,", "virtio!..|",
    ]  # fmt: skip
    assert lines[readable + 2].split() == ["0010", "fe", "ff", "30", "31", "|..01|"]
    writable = next(i for i, line in enumerate(lines) if "len=8" in line)
    assert "write" in lines[writable]
    assert lines[writable + 1].split()[0] == "0000"  # what the driver left there, 8 bytes
    assert len(lines[writable + 1].split()) == 1 + 8 + 1


def test_without_hexdump_the_text_shows_no_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _inspect_text(tmp_path, capsys)
    assert "Hello" not in text
    assert re.search(r"^\s+0000 ", text, flags=re.MULTILINE) is None


# --- progress on a terminal only ------------------------------------------------------------------


@pytest.fixture
def quiet_blk_log_restored() -> Iterator[None]:
    """demo.main quiets the device's log (the summary counts malformed chains): undone after."""
    log = logging.getLogger("virtio_schema.examples.blk")
    level = log.level
    yield
    log.setLevel(level)


@pytest.mark.usefixtures("quiet_blk_log_restored")
def test_the_demo_reports_progress_on_a_terminal_only(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert demo.main(["--requests", "1000", "--size-mib", "1"]) == 0
    assert "requests served and verified" not in capsys.readouterr().out
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(demo, "PROGRESS_EVERY", 0.0)  # a line per step however fast the machine
    assert demo.main(["--requests", "1000", "--size-mib", "1"]) == 0
    out = capsys.readouterr().out
    steps = re.findall(r"^  (\d+)/1000 requests served and verified$", out, flags=re.MULTILINE)
    assert len(steps) == 2
    assert out.index("requests served and verified") < out.index("requests served :")
