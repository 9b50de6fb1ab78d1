"""The benchmark scripts' bar charts (``bench/_plot.py``, ``--plot FILE.svg``): a parseable SVG
with one bar per table row, drawn with the standard library alone. No benchmark runs here."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import bench_multiqueue
import bench_queue
import pytest
from _plot import Bar, bar_svg, write_plot

NS = {"svg": "http://www.w3.org/2000/svg"}


def _bars(root: ET.Element) -> list[ET.Element]:
    return [g for g in root.iterfind(".//svg:g", NS) if g.get("class") == "bar"]


def test_the_plot_has_one_bar_per_row_in_order_on_one_scale(tmp_path: Path) -> None:
    rows = [
        Bar("split a-echo-64 floor", 1890.0, "pure"),
        Bar("split a-echo-64 floor", 1859.0, "compiled"),
        Bar("split a-echo-64 library", 14497.0, "pure"),
        Bar("split a-echo-64 library", 3541.0, "compiled"),
    ]
    out = tmp_path / "plot.svg"
    write_plot(out, "ns per chain <lower is better>", "ns", rows)
    root = ET.parse(out).getroot()  # well-formed, the title's "<" escaped
    bars = _bars(root)
    assert len(bars) == len(rows)
    titles = [g.findtext("svg:title", namespaces=NS) for g in bars]
    assert titles[2] == "split a-echo-64 library (pure): 14,497.0 ns"
    rects = [g.find("svg:rect", NS) for g in bars]
    assert all(r is not None for r in rects)
    widths = [float(r.get("width", "")) for r in rects if r is not None]
    assert max(widths) == widths[2]  # the largest value is the longest bar
    assert widths[0] / widths[2] == pytest.approx(1890 / 14497, rel=1e-3)
    # one colour per series, and a legend naming them
    fills = [r.get("fill") for r in rects if r is not None]
    assert fills[0] == fills[2] != fills[1] == fills[3]
    texts = {t.text for t in root.iterfind("svg:text", NS)}
    assert {"pure", "compiled"} <= texts


def test_an_empty_table_and_zero_figures_still_draw() -> None:
    for rows in ([], [Bar("nothing", 0.0)]):
        root = ET.fromstring(bar_svg("empty", "ns", rows))
        assert len(_bars(root)) == len(rows)


@pytest.mark.parametrize("main", [bench_queue.main, bench_multiqueue.main])
def test_the_scripts_refuse_a_plot_they_could_not_write_before_measuring(
    main: Callable[[list[str]], int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--plot", str(tmp_path / "missing" / "plot.svg")])
    assert exc.value.code == 2
    assert "--plot: no directory" in capsys.readouterr().err
