"""`fund-agent report`: one self-contained HTML file (inline CSS and SVG, no script, nothing fetched at view
time) per account or for all: equity over time with every top-up and sweep marked, cumulative net funding,
window usage against the policy's limits, halts as shaded spans, the transfers and their totals.

Every number printed in the page is a Decimal string from the ledger; the charts get floats only inside
agent.audit.plots, for drawing.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from agent import money
from agent.audit import plots, questions
from agent.ledger import journal
from agent.ledger.models import DecisionRow, Halt, Transfer
from agent.ledger.queries import Filters, amount_of
from agent.policy.model import WINDOWS
from agent.policy.usage_book import COUNTED_STATES
from agent.timeutil import iso, utcnow

MAX_POINTS = 2000  # equity points per chart: more add nothing visible and make the file heavy

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; } .chart svg { max-width: 100%; height: auto; } .muted { color: #777; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(table_id: str, columns: Sequence[str], rows: Sequence[dict[str, Any]],
           numeric: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td class=\"num\">{_e(r.get(c))}</td>" if c in numeric
                                    else f"<td>{_e(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    if not rows:
        body = f"<tr><td colspan=\"{len(columns)}\" class=\"muted\">none</td></tr>"
    return f"<table id=\"{_e(table_id)}\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def accounts_in(session: Session, since: datetime, until: datetime) -> list[str]:
    found = set(session.scalars(select(Transfer.account).where(Transfer.created_at >= since,
                                                               Transfer.created_at < until).distinct()))
    found |= set(session.scalars(select(DecisionRow.account).where(DecisionRow.at >= since, DecisionRow.at < until)
                                 .distinct()))
    return sorted(found)


def equity_points(session: Session, account: str, since: datetime, until: datetime) -> list[tuple[datetime, Decimal]]:
    """The account's equity readings in [since, until), at most about MAX_POINTS of them (every n-th)."""
    where = (DecisionRow.account == account, DecisionRow.at < until,
             func.coalesce(DecisionRow.run_last_at, DecisionRow.at) >= since, DecisionRow.equity.is_not(None))
    # each row is a run of evaluations (agent/ledger/journal.py): the stride counts evaluations, not rows
    count = session.execute(select(func.coalesce(func.sum(DecisionRow.run_count), 0)).where(*where)).scalar_one()
    step = max(1, -(-int(count) // MAX_POINTS))
    query = (select(DecisionRow.at, DecisionRow.equity, DecisionRow.equity_age_s, DecisionRow.run_evals)
             .where(*where).order_by(DecisionRow.at, DecisionRow.id))
    points: list[tuple[datetime, Decimal]] = []
    seen = 0
    for run in session.execute(query):
        for at, equity, _age in journal.readings(*run):
            if not since <= at < until or equity is None:
                continue
            if seen % step == 0:
                points.append((at, Decimal(equity)))
            seen += 1
    return points


def window_usage(session: Session, policy: Any, until: datetime) -> list[dict[str, Any]]:
    """Each limited window of the policy at `until`: used (pending, sent, unknown and confirmed count, as the
    engine counts them) against the limit."""
    rows = []
    for kind in ("top_up", "sweep"):
        limits = getattr(policy.limits, kind).windows
        for name, window in limits.items():
            span = WINDOWS.get(name)
            where = [Transfer.account == policy.mt5, Transfer.kind == kind, Transfer.state.in_(sorted(COUNTED_STATES)),
                     Transfer.created_at < until]
            if span is not None:
                where.append(Transfer.created_at >= until - span)
            count, minor = session.execute(select(func.count(Transfer.id),
                                                  func.coalesce(func.sum(Transfer.amount_minor), 0))
                                           .where(*where)).one()
            used = money.from_minor(int(minor), policy.currency)
            if window.count is not None:
                rows.append({"kind": kind, "window": name, "measure": "count", "used": str(int(count)),
                             "limit": str(window.count), "used_value": Decimal(int(count)),
                             "limit_value": Decimal(window.count)})
            if window.amount is not None:
                rows.append({"kind": kind, "window": name, "measure": "amount",
                             "used": money.fmt(used, policy.currency),
                             "limit": money.fmt(window.amount, policy.currency), "used_value": used,
                             "limit_value": window.amount})
    return rows


def _account_section(session: Session, account: str, since: datetime, until: datetime,
                     policy: Any | None) -> str:
    transfers = list(session.scalars(select(Transfer).where(Transfer.account == account, Transfer.created_at >= since,
                                                            Transfer.created_at < until).order_by(Transfer.id)))
    halts = list(session.scalars(select(Halt).where(Halt.account == account, Halt.created_at < until,
                                                    or_(Halt.cleared_at.is_(None), Halt.cleared_at >= since))
                                 .order_by(Halt.id)))
    currency = transfers[0].currency if transfers else (policy.currency if policy else "")
    equity = equity_points(session, account, since, until)
    markers = []
    for t in transfers:
        settled = t.state == "confirmed"
        label = ("top-up" if t.kind == "top_up" else "sweep") + ("" if settled else f" ({t.state})")
        colour = ("#2ca02c" if t.kind == "top_up" else "#ff7f0e") if settled else "#7f7f7f"
        markers.append(plots.Marker(t.created_at, Decimal(t.equity), label, "^" if t.kind == "top_up" else "v",
                                    colour))
    spans = [plots.Span(max(h.created_at, since), min(h.cleared_at, until) if h.cleared_at else until,
                        f"halt ({h.kind})") for h in halts]
    # cumulative net funding: confirmed top-ups minus confirmed sweeps, from what was net before the range
    before = session.execute(select(Transfer.kind, func.coalesce(func.sum(Transfer.amount_minor), 0))
                             .where(Transfer.account == account, Transfer.state == "confirmed",
                                    Transfer.created_at < since).group_by(Transfer.kind)).all()
    minor = sum(int(m) if k == "top_up" else -int(m) for k, m in before)
    net_points = []
    scale_currency = currency or "USD"
    net_points.append((since, money.from_minor(minor, scale_currency)))
    for t in transfers:
        if t.state == "confirmed":
            minor += t.amount_minor if t.kind == "top_up" else -t.amount_minor
            net_points.append((t.created_at, money.from_minor(minor, scale_currency)))
    net_points.append((until, money.from_minor(minor, scale_currency)))
    equity_svg = plots.timeseries_svg(f"{account}: equity", [plots.Series("equity", equity)], markers, spans,
                                      y_label=currency)
    net_svg = plots.timeseries_svg(f"{account}: cumulative net funding (confirmed top-ups - sweeps)",
                                   [plots.Series("net funding", net_points, step=True)], (), spans, y_label=currency)
    usage = window_usage(session, policy, until) if policy is not None else []
    usage_svg = plots.bars_svg(f"{account}: window usage at {iso(until)}",
                               [plots.Bar(f"{u['kind']} {u['window']} {u['measure']}",
                                          u["used_value"] / u["limit_value"] * 100 if u["limit_value"] else
                                          Decimal(0), Decimal(100)) for u in usage],
                               x_label="% of the limit")
    records = [{"id": t.id, "created_at": iso(t.created_at), "kind": t.kind,
                "amount": money.fmt(amount_of(t), t.currency), "currency": t.currency, "state": t.state,
                "broker_txn_id": t.broker_txn_id, "funding": t.funding, "policy": t.policy, "equity": t.equity,
                "reason": t.reason} for t in transfers]
    totals = questions.transfer_totals(session, Filters(account=account, since=since, until=until))
    net = questions.net_flow(session, Filters(account=account, since=since, until=until))
    halt_rows = [{"id": h.id, "kind": h.kind, "scope": h.scope, "created_at": iso(h.created_at),
                  "created_by": h.created_by, "cleared_at": iso(h.cleared_at) if h.cleared_at else "active",
                  "reason": h.reason} for h in halts]
    policy_line = (f"policy {_e(policy.name)} ({_e(policy.path)}), funding {_e(policy.funding)}"
                   if policy is not None else "no policy file manages this account now: window limits not shown")
    return "\n".join([
        f"<section class=\"account\" data-account=\"{_e(account)}\"><h2>{_e(account)}</h2>",
        f"<p class=\"muted\">{policy_line}; {len(equity)} equity readings shown</p>",
        f"<div class=\"chart\">{equity_svg}</div>",
        f"<div class=\"chart\">{net_svg}</div>",
        "<h3>Window usage against the limits</h3>",
        f"<div class=\"chart\">{usage_svg}</div>",
        _table(f"usage-{account}", ["kind", "window", "measure", "used", "limit"], usage, ("used", "limit")),
        "<h3>Totals</h3>",
        _table(f"totals-{account}", ["kind", "currency", "state", "count", "amount"], totals, ("count", "amount")),
        _table(f"net-{account}", ["scope", "login", "currency", "top_up", "sweep", "net"],
               [n for n in net if n["scope"] == "account"], ("top_up", "sweep", "net")),
        "<h3>Halts</h3>",
        _table(f"halts-{account}", ["id", "kind", "scope", "created_at", "created_by", "cleared_at", "reason"],
               halt_rows),
        "<h3>Transfers</h3>",
        _table(f"transfers-{account}", ["id", "created_at", "kind", "amount", "currency", "state", "broker_txn_id",
                                        "funding", "policy", "equity", "reason"], records, ("amount", "equity")),
        "</section>",
    ])


def build_report(session: Session, account: str | None, since: datetime, until: datetime,
                 policies: Sequence[Any] = ()) -> str:
    by_account = {p.mt5: p for p in policies}
    accounts = [account] if account else accounts_in(session, since, until)
    filters = Filters(account=account, since=since, until=until)
    totals = questions.transfer_totals(session, filters)
    net = questions.net_flow(session, filters)
    title = f"fund-agent report: {account or 'all accounts'}, {iso(since)} to {iso(until)}"
    sections = [_account_section(session, a, since, until, by_account.get(a)) for a in accounts]
    return "\n".join([
        "<!DOCTYPE html>",
        "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        # nothing may be fetched when the file is opened: no script, no external style, font or image
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">",
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class=\"muted\">generated {_e(iso(utcnow()))} from the ledger; amounts are exact ledger values; "
        "times are UTC; the range includes its start and excludes its end</p>",
        "<h2>All accounts in this report</h2>",
        _table("totals", ["account", "kind", "currency", "state", "count", "amount"], totals, ("count", "amount")),
        _table("net", ["scope", "login", "currency", "top_up", "sweep", "net", "top_up_count", "sweep_count"], net,
               ("top_up", "sweep", "net", "top_up_count", "sweep_count")),
        *sections,
        "" if sections else "<p class=\"muted\">no decisions or transfers in this range</p>",
        "</body></html>",
    ])
