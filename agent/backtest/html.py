"""`backtest --html FILE`: one self-contained page (inline SVG, no script, nothing fetched at view time)."""

from __future__ import annotations

import html
from decimal import Decimal
from pathlib import Path

from agent.audit.plots import Marker, Series, Span, timeseries_svg
from agent.backtest import output
from agent.backtest.replay import Result, _recorded_offsets
from agent.timeutil import iso

MAX_POINTS = 3000  # a year of minutes is thinned for drawing; every transfer is still marked


def _curves(result: Result) -> tuple[list[tuple], list[tuple]]:
    """(time, recorded equity) and (time, simulated equity) for the replayed range, thinned for drawing."""
    readings = result.history.readings
    assert result.start is not None and result.end is not None
    offsets = _recorded_offsets(result.history, result.start)
    moves = sorted(result.transfers, key=lambda t: t.time)
    recorded, simulated = [], []
    made, j = Decimal(0), 0
    chosen = [i for i, r in enumerate(readings) if result.start <= r.at <= result.end]
    if result.fell_to_zero is not None:
        chosen = [i for i in chosen if readings[i].at <= result.fell_to_zero[0]]
    stride = max(1, len(chosen) // MAX_POINTS)
    keep = set(chosen[::stride]) | {m for m in chosen[-1:]}
    for i in chosen:
        reading = readings[i]
        while j < len(moves) and moves[j].time < reading.at:
            made += moves[j].amount if moves[j].kind == "top_up" else -moves[j].amount
            j += 1
        if i in keep:
            recorded.append((reading.at, reading.equity))
            simulated.append((reading.at, reading.equity - offsets[i] + made))
    return recorded, simulated


def _section(result: Result) -> str:
    recorded, simulated = _curves(result)
    markers = [Marker(t.time, t.equity, "top-up" if t.kind == "top_up" else "sweep",
                      symbol="^" if t.kind == "top_up" else "v",
                      colour="#2ca02c" if t.kind == "top_up" else "#9467bd") for t in result.transfers]
    spans = [Span(at, None, label="top-ups halted (kill switch)") for at, _ in result.kill_switch_trips[:1]]
    chart = timeseries_svg(f"{result.policy.name}: equity ({result.policy.currency})",
                           [Series("recorded equity", recorded), Series("simulated equity", simulated)],
                           markers, spans, y_label=result.policy.currency)
    rows = "".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(text)}</td></tr>"
                   for label, text in output.summary(result).items())
    cur = result.policy.currency
    transfers = "".join(
        f"<tr><td>{iso(t.time)}</td><td>{t.kind}</td><td>{output.amount(t.amount, cur)}</td>"
        f"<td>{output.amount(t.equity, cur)}</td><td>{html.escape(t.reason)}</td></tr>" for t in result.transfers)
    return (f"<section><h2>{html.escape(result.policy.name)} ({html.escape(result.policy.mt5)})</h2>"
            f"<table>{rows}</table>{chart}"
            f"<table><tr><th>time</th><th>kind</th><th>amount</th><th>equity</th><th>reason</th></tr>{transfers}"
            "</table></section>")


def render(results: list[Result]) -> str:
    notes = "".join(f"<p class=note>{html.escape(n)}</p>" for r in results for n in output.notes(r))
    body = "".join(_section(r) for r in results)
    return ("<!doctype html><html><head><meta charset=utf-8><title>fund-agent backtest</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;font-size:13px}.note{color:#a33}"
            "</style></head><body><h1>fund-agent backtest</h1><p>Simulated equity = recorded equity - recorded "
            "transfers so far + simulated transfers so far. Nothing was sent.</p>"
            f"{notes}{body}</body></html>\n")


def write_html(path: Path, results: list[Result]) -> None:
    path.write_text(render(results), encoding="utf-8")
