"""A one-line rate chart with a zero baseline: bar heights are proportional to the rate itself.

Textual's ``Sparkline`` stretches the data's minimum to its maximum, so a 190→199/s wobble
fills the whole height and a single sample (or all zeros) draws as solid blocks. Here the
bottom is always 0/s: a steady rate is a flat row of tall bars, an idle pipeline a flat
baseline. One bar per sample, the newest on the right.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.reactive import reactive
from textual.widget import Widget

#: Eighths of a cell, lowest first; an idle (0/s) sample is the lowest.
BARS = "▁▂▃▄▅▆▇█"


def bars(data: Sequence[float], width: int) -> str:
    """The newest ``width`` samples as bars from 0 to the largest shown, right-aligned."""
    shown = list(data)[-width:] if width > 0 else []
    top = max(shown, default=0.0)
    if top <= 0:
        return BARS[0] * len(shown)
    steps = len(BARS) - 1
    return "".join(BARS[round(max(0.0, v) / top * steps)] for v in shown)


class RateSparkline(Widget):
    """A rate history (one sample per refresh) drawn by :func:`bars`."""

    DEFAULT_CSS = """
    RateSparkline {
        height: 1;
        color: $primary;
    }
    """

    data: reactive[tuple[float, ...]] = reactive(())

    def render(self) -> str:
        return bars(self.data, self.size.width).rjust(self.size.width)
