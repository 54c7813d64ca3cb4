"""What a replay would have done: the CONTRACT's JSON object, a CSV of transfers, and tables."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

from agent import money
from agent.backtest.replay import Result
from agent.output import render
from agent.timeutil import iso

FORMATS = ("table", "json", "csv")
CSV_COLUMNS = ["policy", "account", "time", "kind", "amount", "equity", "reason"]


def amount(value: Decimal, currency: str) -> str:
    """A decimal string with the currency's places; an equity finer than that keeps its own digits."""
    try:
        return money.fmt(value, currency)
    except money.MoneyError:
        return format(value, "f")


def record(result: Result) -> dict[str, Any]:
    """CONTRACT.md section 4, `backtest --format json`: exactly these keys."""
    cur = result.policy.currency
    top_up, sweep = result.total("top_up"), result.total("sweep")
    return {
        "policy": result.policy.name,
        "account": result.policy.mt5,
        "transfers": [{"time": iso(t.time), "kind": t.kind, "amount": amount(t.amount, cur),
                       "equity": amount(t.equity, cur), "reason": t.reason} for t in result.transfers],
        "totals": {"top_up": amount(top_up, cur), "sweep": amount(sweep, cur), "net": amount(top_up - sweep, cur),
                   "count_top_up": sum(1 for t in result.transfers if t.kind == "top_up"),
                   "count_sweep": sum(1 for t in result.transfers if t.kind == "sweep")},
        "lowest_funding_balance": (amount(result.lowest_funding_balance, cur)
                                   if result.lowest_funding_balance is not None else None),
        "kill_switch_trips": [{"time": iso(at), "reason": reason} for at, reason in result.kill_switch_trips],
        "caps_bound": dict(sorted(result.caps_bound.items())),
    }


def notes(result: Result) -> list[str]:
    """What the JSON object has no key for: a fall to zero, a source without floating P/L."""
    out = list(result.history.notes)
    if result.fell_to_zero is not None:
        at, equity = result.fell_to_zero
        out.append(f"{result.policy.name}: simulated equity fell to {amount(equity, result.policy.currency)} at "
                   f"{iso(at)}: the account would have been wiped out; the replay stopped there")
    return out


def as_json(results: list[Result]) -> str:
    return "\n".join(json.dumps(record(r)) for r in results)


def as_csv(results: list[Result]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in results:
        for row in record(result)["transfers"]:
            writer.writerow([result.policy.name, result.policy.mt5, row["time"], row["kind"], row["amount"],
                             row["equity"], row["reason"]])
    return buffer.getvalue().rstrip("\n")


def duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if hours or days else []
    return " ".join([*parts, f"{minutes}m"])


def summary(result: Result) -> dict[str, str]:
    """The totals and findings of one replay, as label -> text (a table row each)."""
    data = record(result)
    totals = data["totals"]
    cur = result.policy.currency
    funding = ("not modelled (no --funding-balance)" if result.funding_start is None else
               f"{data['lowest_funding_balance']} (start {amount(result.funding_start, cur)})")
    caps = ", ".join(f"{name} x{count}" for name, count in data["caps_bound"].items()) or "none"
    trips = "; ".join(f"{t['time']} {t['reason']}" for t in data["kill_switch_trips"]) or "none"
    assert result.start is not None and result.end is not None
    return {
        "history": f"{result.history.label}: {len(result.history.readings)} readings",
        "replayed": f"{iso(result.start)} .. {iso(result.until) + ' (exclusive)' if result.until else iso(result.end)}"
                    f", {result.ticks} ticks "
                    f"({result.stale_ticks} without a fresh reading)",
        "topped up": f"{totals['top_up']} {cur} in {totals['count_top_up']} transfers",
        "swept": f"{totals['sweep']} {cur} in {totals['count_sweep']} transfers",
        "net": f"{totals['net']} {cur}",
        "lowest funding balance": funding,
        "time below top-up floor": duration(result.time_below_floor) if result.policy.top_up else "no top_up rule",
        "caps that bound": caps,
        "kill-switch trips": trips,
        "fell to zero": (f"{iso(result.fell_to_zero[0])} at {amount(result.fell_to_zero[1], cur)}"
                         if result.fell_to_zero else "no"),
    }


def as_table(results: list[Result], compare: bool = False) -> str:
    if compare and len(results) > 1:
        names = [f"{r.policy.name}" for r in results]
        rows = [summary(r) for r in results]
        records = [{"": label, **{name: row[label] for name, row in zip(names, rows, strict=True)}}
                   for label in rows[0]]
        parts = [render(records, "table", ["", *names], title="backtest: side by side")]
        for result in results:
            parts.append(_transfers_table(result))
        return "\n\n".join(parts)
    parts = []
    for result in results:
        head = f"backtest {result.policy.name} ({result.policy.mt5}, {result.policy.path})"
        lines = [head] + [f"  {label}: {text}" for label, text in summary(result).items()]
        parts.append("\n".join(lines) + "\n" + _transfers_table(result))
    return "\n\n".join(parts)


def _transfers_table(result: Result) -> str:
    rows = record(result)["transfers"]
    return render(rows, "table", ["time", "kind", "amount", "equity", "reason"],
                  title=f"{result.policy.name}: simulated transfers")
