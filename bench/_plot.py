"""The benchmark scripts' tables as a bar chart (``--plot FILE.svg``), drawn by hand as SVG.

No plotting library: the chart is horizontal bars, one per table row, a colour per series (the
library variant, say) and a legend, which ElementTree writes in a few lines; a dependency (and
an extra to install it) would buy nothing here, and the tests check the chart with the standard
library alone. The benchmark scripts import this module only; nothing in ``virtio_schema`` does.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = ["Bar", "bar_svg", "write_plot"]

ROW = 18  # px per bar
CHAR = 7.3  # px per character of the 12 px monospace font
PLOT_WIDTH = 480  # px of the longest bar
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf"]


class Bar(NamedTuple):
    """One row of a table: its label, its figure and the series it belongs to (its colour)."""

    label: str
    value: float
    series: str = ""


def _text(parent: ET.Element, x: float, y: float, text: str, anchor: str = "start") -> None:
    t = ET.SubElement(parent, "text", x=f"{x:g}", y=f"{y:g}")
    if anchor != "start":
        t.set("text-anchor", anchor)
    t.text = text


def bar_svg(title: str, unit: str, bars: Sequence[Bar]) -> str:
    """An SVG document: ``title``, then a horizontal bar per entry of ``bars`` in their order,
    each labelled on the left and with its value and ``unit`` at its end, on one linear scale
    from 0 to the largest value; a legend of the series when there are several."""
    series = list(dict.fromkeys(b.series for b in bars))
    colour = {s: COLOURS[n % len(COLOURS)] for n, s in enumerate(series)}
    top = 2 * ROW + (ROW if len(series) > 1 else 0)
    label_w = (max((len(b.label) for b in bars), default=0) + 2) * CHAR
    value_w = (max((len(f"{b.value:,.1f} {unit}") for b in bars), default=0) + 2) * CHAR
    width = max(10 + label_w + PLOT_WIDTH + value_w, 20 + len(title) * CHAR)
    height = top + ROW * (len(bars) + 1)
    scale = PLOT_WIDTH / max([b.value for b in bars if b.value > 0] or [1.0])

    svg = ET.Element("svg", xmlns="http://www.w3.org/2000/svg", width=f"{width:.0f}",
                     height=f"{height:.0f}", viewBox=f"0 0 {width:.0f} {height:.0f}")  # fmt: skip
    ET.SubElement(svg, "style").text = "text { font: 12px monospace; fill: #222; }"
    _text(svg, 10, ROW, title)
    if len(series) > 1:
        x = 10.0
        for s in series:
            ET.SubElement(svg, "rect", x=f"{x:g}", y=f"{ROW + 6:g}", width="10", height="10",
                          fill=colour[s])  # fmt: skip
            _text(svg, x + 14, 2 * ROW + 2, s)
            x += 14 + (len(s) + 3) * CHAR
    x0 = 10 + label_w
    for k, b in enumerate(bars):
        y = top + k * ROW
        g = ET.SubElement(svg, "g", {"class": "bar"})
        ET.SubElement(
            g, "title"
        ).text = f"{b.label}{f' ({b.series})' if b.series else ''}: {b.value:,.1f} {unit}"
        _text(g, x0 - CHAR, y + ROW - 5, b.label, anchor="end")
        w = max(b.value, 0) * scale
        ET.SubElement(g, "rect", x=f"{x0:g}", y=f"{y + 2:g}", width=f"{w:.1f}",
                      height=f"{ROW - 4}", fill=colour[b.series])  # fmt: skip
        _text(g, x0 + w + CHAR, y + ROW - 5, f"{b.value:,.1f} {unit}")
    ET.indent(svg, space=" ")
    return ET.tostring(svg, encoding="unicode") + "\n"


def write_plot(path: str | Path, title: str, unit: str, bars: Sequence[Bar]) -> None:
    """Write :func:`bar_svg` of ``bars`` to ``path``."""
    Path(path).write_text(bar_svg(title, unit, bars), encoding="utf-8")
