"""The status page (`GET /` on the service's HTTP listener): one self-contained, read-only HTML page per scrape.

Per account: equity and its age, a sparkline of the last day's equity (from the decisions table) with the
transfers marked, window usage against limits, halts, unresolved transfers; then the last decisions. It
refreshes itself (meta refresh), loads nothing from anywhere (inline CSS and SVG: it works offline and under a
`default-src 'none'` policy), and every value from the ledger or a policy goes through html.escape.

The numbers are those of `fund-agent status --format json`: both come from agent.status.status_rows.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from html import escape
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.ledger import journal, queries
from agent.ledger.models import DecisionRow, Transfer
from agent.status import status_rows
from agent.timeutil import iso, utcnow

if TYPE_CHECKING:
    from agent.policy.model import Policy
    from agent.service import Service

REFRESH_S = 30
SPARK_W, SPARK_H, PAD = 320, 64, 4
LAST_DECISIONS = 20
SERIES_MAX = 2000  # readings per account in the sparkline; more are thinned (every n-th)


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def page_data(session: Session | None, policies: list[Policy], now: datetime) -> dict[str, Any]:
    """What the page shows, read in one session."""
    rows = status_rows(session, policies, now)
    since = now - timedelta(days=1)
    for row in rows:
        row["series"], row["transfers_24h"] = [], []
        if session is None:
            continue
        readings = [(at, equity) for runs in session.execute(
            select(DecisionRow.at, DecisionRow.equity, DecisionRow.equity_age_s, DecisionRow.run_evals)
            .where(DecisionRow.account == row["account"], DecisionRow.equity.is_not(None), DecisionRow.at >= since)
            .order_by(DecisionRow.at)) for at, equity, _age in journal.readings(*runs)]  # each run expanded
        step = max(1, len(readings) // SERIES_MAX)
        for at, equity in readings[::step]:
            try:
                row["series"].append((at, Decimal(equity)))
            except InvalidOperation:  # a reading the ledger kept as text that is no number: left out
                continue
        transfers = session.scalars(select(Transfer).where(Transfer.account == row["account"],
                                                           Transfer.created_at >= since)
                                    .order_by(Transfer.created_at)).all()
        row["transfers_24h"] = [queries.transfer_record(t) for t in transfers]
    decisions: list[dict[str, Any]] = []
    if session is not None:
        managed = [p.mt5 for p in policies]
        recent = session.scalars(select(DecisionRow).where(DecisionRow.account.in_(managed))
                                 .order_by(DecisionRow.id.desc()).limit(LAST_DECISIONS)).all()
        # each row is a run of evaluations: the newest evaluations first, runs expanded
        everything = queries.decision_records(list(reversed(recent)), queries.Filters())
        decisions = list(reversed(everything))[:LAST_DECISIONS]
    return {"rows": rows, "decisions": decisions, "now": now, "since": since}


def _x(at: datetime, since: datetime, now: datetime) -> Decimal:
    span = Decimal(int((now - since).total_seconds())) or Decimal(1)
    offset = Decimal(int((at - since).total_seconds()))
    return (Decimal(PAD) + offset / span * (SPARK_W - 2 * PAD)).quantize(Decimal("0.1"))


def sparkline(series: list[tuple[datetime, Decimal]], transfers: list[dict[str, Any]], since: datetime,
              now: datetime, currency: str) -> str:
    """An inline SVG of the equity over [since, now], a marker per transfer (▲ top-up, ▼ sweep)."""
    if not series:
        return f'<svg class="spark" width="{SPARK_W}" height="{SPARK_H}" role="img"><text x="8" y="36">' \
               'no readings in the last 24h</text></svg>'
    since = max(since, min(series[0][0], now - timedelta(minutes=5)))  # span the readings there are, not 24h
    low = min(v for _, v in series)
    high = max(v for _, v in series)
    spread = (high - low) or Decimal(1)

    def y(value: Decimal) -> Decimal:
        return (Decimal(SPARK_H - PAD) - (value - low) / spread * (SPARK_H - 2 * PAD)).quantize(Decimal("0.1"))

    points = " ".join(f"{_x(at, since, now)},{y(v)}" for at, v in series)
    marks = []
    for t in transfers:
        try:
            at = datetime.fromisoformat(t["created_at"].replace("Z", "+00:00"))
        except (ValueError, AttributeError):
            continue
        x = _x(max(at, since), since, now)
        up = t["kind"] == "top_up"
        color = "#1a7f37" if up else "#bc4c00"
        tip = f"{t['kind']} {t['amount']} {t['currency']} {t['state']} at {t['created_at']}"
        marks.append(f'<line class="mark {_e(t["kind"])}" x1="{x}" x2="{x}" y1="0" y2="{SPARK_H}" '
                     f'stroke="{color}" stroke-dasharray="3,2"><title>{_e(tip)}</title></line>')
    label = f"equity {low}..{high} {currency} over the last 24h"
    return (f'<svg class="spark" width="{SPARK_W}" height="{SPARK_H}" viewBox="0 0 {SPARK_W} {SPARK_H}" '
            f'role="img" aria-label="{_e(label)}"><title>{_e(label)}</title>'
            f'<polyline fill="none" stroke="#0969da" stroke-width="1.5" points="{points}"/>'
            + "".join(marks) + "</svg>")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1rem;color:#1f2328;background:#fff}
h1{font-size:1.2rem;margin:0 0 .5rem} h2{font-size:1.05rem;margin:.2rem 0}
.acct{border:1px solid #d0d7de;border-radius:6px;padding:.6rem .8rem;margin:.6rem 0}
.bad{border-color:#cf222e;background:#fff5f5} .ok{color:#1a7f37} .warn{color:#cf222e;font-weight:600}
.equity{font-size:1.4rem;font-weight:600} table{border-collapse:collapse;font-size:13px}
td,th{border-bottom:1px solid #eaeef2;padding:2px 6px;text-align:left;vertical-align:top}
.muted{color:#656d76} .spark{display:block;margin:.3rem 0;max-width:100%}
"""


def render_page(data: dict[str, Any], host_id: str = "", refresh_s: int = REFRESH_S) -> str:
    now: datetime = data["now"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fund-agent {_e(host_id)}</title><style>{_CSS}</style></head><body>",
        f'<h1>fund-agent <span class="muted">{_e(host_id)}</span></h1>',
        f'<p class="muted">as of <time id="now">{_e(iso(now))}</time>; refreshes every {int(refresh_s)}s</p>',
    ]
    if not data["rows"]:
        parts.append("<p class=\"warn\">no policy in force</p>")
    for row in data["rows"]:
        parts.append(_account(row, data["since"], now))
    parts.append("<h2>Last decisions</h2><table id=\"decisions\"><tr><th>at</th><th>account</th><th>action</th>"
                 "<th>amount</th><th>equity</th><th>reason</th></tr>")
    for d in data["decisions"]:
        amount = f"{d['amount']} {d['currency'] or ''}" if d["amount"] else ""
        parts.append(f"<tr><td>{_e(d['at'])}</td><td>{_e(d['account'])}</td><td>{_e(d['action'])}</td>"
                     f"<td>{_e(amount)}</td><td>{_e(d['equity'])}</td><td>{_e(d['reason'])}</td></tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def _account(row: dict[str, Any], since: datetime, now: datetime) -> str:
    account = _e(row["account"])
    bad = bool(row["problems"])
    age = row["last_equity_age_s"]
    out = [f'<section class="acct{" bad" if bad else ""}" id="acct-{account}" data-account="{account}">',
           f'<h2>{account} <span class="muted">policy {_e(row["policy"])}</span></h2>',
           f'<div><span class="equity" data-field="last_equity">{_e(row["last_equity"] or "n/a")}</span> '
           f'{_e(row["currency"])} <span class="muted" data-field="last_equity_age_s" data-value="{_e(age)}">'
           f'{_e(f"{age}s old" if age is not None else "no reading")}</span></div>',
           sparkline(row["series"], row["transfers_24h"], since, now, row["currency"])]
    if bad:
        out.append("<ul class=\"warn\">" + "".join(f"<li>{_e(p)}</li>" for p in row["problems"]) + "</ul>")
    else:
        out.append('<p class="ok">fresh, not halted, nothing unresolved</p>')
    if row["windows"]:
        out.append('<table class="windows"><tr><th>window</th><th>used / limit</th></tr>')
        for name, used in row["windows"].items():
            out.append(f'<tr><td>{_e(name)}</td><td data-window="{_e(name)}">{_e(used)}</td></tr>')
        out.append("</table>")
    for h in row["halts"]:
        out.append(f'<p class="warn halt">halted ({_e(h["kind"])}) since {_e(h["since"])} by {_e(h["by"])}: '
                   f'{_e(h["reason"])}</p>')
    for t in row["unresolved"]:
        out.append(f'<p class="warn unresolved" data-transfer="{_e(t["id"])}">transfer {_e(t["id"])}: '
                   f'{_e(t["kind"])} {_e(t["amount"])} {_e(t["currency"])} is {_e(t["state"])} since '
                   f'{_e(t["updated_at"])}</p>')
    if row["last_decision"]:
        out.append(f'<p class="muted">last decision: {_e(row["last_decision"])}</p>')
    out.append("</section>")
    return "".join(out)


def render_for_service(service: Service) -> str:
    """The page from the service's own ledger and policies in force."""
    policies = sorted(service.policies.values(), key=lambda p: p.mt5)
    now = utcnow()
    if service.ledger is None:
        data = page_data(None, policies, now)
    else:
        with service.ledger.reader() as session:
            data = page_data(session, policies, now)
    return render_page(data, service.config.host_id)
