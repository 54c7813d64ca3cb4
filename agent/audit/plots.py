"""Charts as inline SVG text, for self-contained HTML pages (the audit report, the backtest's --html).

Values come in as Decimal and are turned into floats only here, at the last step, for drawing: no number that
a page prints comes from these floats. matplotlib's Agg backend is used (no display, no network); text is kept
as SVG text so the page stays small and searchable.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


@dataclass(frozen=True)
class Series:
    """One line: (time, value) points in time order; `step` draws it as a staircase (cumulative sums)."""

    label: str
    points: Sequence[tuple[datetime, Decimal]]
    step: bool = False


@dataclass(frozen=True)
class Marker:
    """One event on the time axis (a top-up, a sweep): drawn at (time, value) with a symbol and a colour."""

    at: datetime
    value: Decimal
    label: str  # the legend entry: markers with the same label share one entry
    symbol: str = "^"
    colour: str = "#2ca02c"


@dataclass(frozen=True)
class Span:
    """A shaded time range (a halt); `until` None means still open (shaded to the chart's right edge)."""

    since: datetime
    until: datetime | None
    label: str = "halt"
    colour: str = "#d62728"


@dataclass
class Bar:
    """One bar of a usage chart: `used` against `limit` (limit None: no limit)."""

    label: str
    used: Decimal
    limit: Decimal | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # no display: the service and CI have none
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text as text, not paths: smaller and searchable
    plt.rcParams["svg.hashsalt"] = "fund-agent"  # stable ids: the same data gives the same file
    return plt


def _svg(fig) -> str:  # type: ignore[no-untyped-def]
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    _pyplot().close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG is inlined into HTML


def timeseries_svg(title: str, series: Sequence[Series], markers: Sequence[Marker] = (),
                   spans: Sequence[Span] = (), y_label: str = "", width: float = 10.0, height: float = 3.6) -> str:
    """A time chart as an `<svg>` element: lines, event markers, shaded spans."""
    plt = _pyplot()
    import matplotlib.dates as mdates

    fig, ax = plt.subplots(figsize=(width, height))
    times = [t for s in series for t, _ in s.points] + [m.at for m in markers] + [s.since for s in spans]
    for index, line in enumerate(series):
        if not line.points:
            continue
        xs = [t for t, _ in line.points]
        ys = [float(v) for _, v in line.points]  # floats for drawing only
        colour = COLOURS[index % len(COLOURS)]
        if line.step:
            ax.step(xs, ys, where="post", label=line.label, color=colour, linewidth=1.4)
        else:
            ax.plot(xs, ys, label=line.label, color=colour, linewidth=1.2)
    seen: set[str] = set()
    groups: dict[tuple[str, str, str], list[Marker]] = {}
    for marker in markers:  # one scatter per kind of marker: hundreds of calls would dominate the drawing time
        groups.setdefault((marker.label, marker.symbol, marker.colour), []).append(marker)
    for (label, symbol, colour), group in groups.items():
        ax.scatter([m.at for m in group], [float(m.value) for m in group], marker=symbol, color=colour, s=46,
                   zorder=5, label=None if label in seen else label)
        seen.add(label)
    right = max(times) if times else None
    for span in spans:
        until = span.until or right or span.since
        ax.axvspan(span.since, until, color=span.colour, alpha=0.15,
                   label=None if span.label in seen else span.label)
        seen.add(span.label)
    ax.set_title(title)
    if y_label:
        ax.set_ylabel(y_label)
    if times:
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    else:
        ax.text(0.5, 0.5, "no data in this range", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize="small")
    return _svg(fig)


def bars_svg(title: str, bars: Sequence[Bar], x_label: str = "", width: float = 10.0) -> str:
    """Horizontal bars of use against a limit (window usage): the limit is a tick mark, over-limit bars red."""
    plt = _pyplot()
    height = max(1.6, 0.45 * len(bars) + 1.0)
    fig, ax = plt.subplots(figsize=(width, height))
    for index, bar in enumerate(bars):
        used = float(bar.used)  # floats for drawing only
        over = bar.limit is not None and bar.used > bar.limit
        ax.barh(index, used, color="#d62728" if over else "#1f77b4", height=0.6)
        if bar.limit is not None:
            ax.plot([float(bar.limit)] * 2, [index - 0.4, index + 0.4], color="black", linewidth=2)
    ax.set_yticks(range(len(bars)), [b.label for b in bars])
    ax.invert_yaxis()
    ax.set_title(title)
    if x_label:
        ax.set_xlabel(x_label)
    if not bars:
        ax.text(0.5, 0.5, "no limits in force", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig)
