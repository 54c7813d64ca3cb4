"""`fund-agent status`: what an operator needs to know per account, read from the ledger alone."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.ledger import queries
from agent.ledger.models import DecisionRow, Transfer
from agent.policy.evaluate import usage_details
from agent.policy.model import Policy
from agent.timeutil import iso, utcnow

if TYPE_CHECKING:
    from agent.config import Config


def fresh_limit(policy: Policy) -> timedelta:
    """How old the last reading may be while the account is still watched: the reading's own allowed age plus
    two scheduling intervals (one evaluation may be in progress or just missed)."""
    if policy.schedule.every is not None:
        interval = policy.schedule.every
    else:
        from agent.cronspec import crontab_trigger

        trigger = crontab_trigger(policy.schedule.cron or "* * * * *", timezone="UTC")
        first = trigger.get_next_fire_time(None, utcnow())
        second = trigger.get_next_fire_time(first, first + timedelta(seconds=1)) if first else None
        interval = (second - first) if first and second else timedelta(days=1)
    return policy.schedule.max_equity_age + interval * 2


def problems(row: dict[str, Any], limit: timedelta) -> list[str]:
    """Why a monitoring probe should fail on this account (empty: all is well)."""
    out = [f"halted ({h['kind']} since {h['since']}: {h['reason']})" for h in row["halts"]]
    out += [f"transfer {t['id']} is {t['state']} since {t['updated_at']}" for t in row["unresolved"]]
    age = row["last_equity_age_s"]
    if age is None:
        out.append("no equity reading recorded")
    elif age > limit.total_seconds():
        out.append(f"no fresh reading: the last is {age}s old (limit {int(limit.total_seconds())}s)")
    return out


def status_rows(session: Session | None, policies: list[Policy], now: datetime) -> list[dict[str, Any]]:
    """account_status of every policy, with its currency, `fresh` and `problems` (what `status --check`, the
    status page and `status --format json` all show)."""
    rows = [account_status(session, p, now) for p in policies]
    leases = _lease_holders(session)
    for row, policy in zip(rows, policies, strict=True):
        row["held_by"] = leases.get(policy.mt5)
        limit = fresh_limit(policy)
        row["currency"] = policy.currency
        row["problems"] = problems(row, limit)
        row["fresh"] = row["last_equity_age_s"] is not None and row["last_equity_age_s"] <= limit.total_seconds()
    return rows


def _lease_holders(session: Session | None) -> dict[str, str | None]:
    """Several hosts on one ledger: which agent holds each account's lease now (host_id and owner id), None
    when nobody does. A ledger without leases (one host) shows nothing."""
    if session is None:
        return {}
    from sqlalchemy import inspect

    from agent.ledger.leases import holders

    if not inspect(session.get_bind()).has_table("account_leases"):
        return {}
    return {account: (f"{info.host} ({info.holder})" if info.live else None)
            for account, info in holders(session).items()}


def read_status(config: Config, policies: list[Policy], now: datetime | None = None) -> list[dict[str, Any]]:
    """status_rows from the configured ledger, read-only (no ledger yet: nothing has happened)."""
    from agent.ledger.db import Ledger

    now = now or utcnow()
    opened = Ledger.open_readonly(config.database, password_env=config.database_password_env)
    if opened is None:
        return status_rows(None, policies, now)
    try:
        with opened.reader() as session:
            return status_rows(session, policies, now)
    finally:
        opened.close()


def account_status(session: Session | None, policy: Policy, now: datetime) -> dict[str, Any]:
    """`session` None: no ledger exists yet, so nothing has happened on the account."""
    if session is None:
        return {"account": policy.mt5, "policy": policy.name, "policy_sha256": policy.sha256,
                "policy_file": policy.path, "last_equity": None, "last_equity_age_s": None,
                "last_evaluation_at": None, "last_decision": None,
                "windows": usage_details(policy, queries.Usage(), now), "halted": False, "halts": [],
                "unresolved": [], "last_error": None}
    # Newest first by (at, id): the (account, at) index answers it from its end, instead of sorting the account's
    # whole decision history (5,000 rows an account made `status` take a minute at 1,000 accounts).
    newest = (DecisionRow.at.desc(), DecisionRow.id.desc())
    last = session.scalars(select(DecisionRow).where(DecisionRow.account == policy.mt5)
                           .order_by(*newest).limit(1)).first()
    with_equity = session.scalars(select(DecisionRow).where(DecisionRow.account == policy.mt5,
                                                            DecisionRow.equity.is_not(None))
                                  .order_by(*newest).limit(1)).first()
    last_failed = session.scalars(select(Transfer).where(Transfer.account == policy.mt5,
                                                         Transfer.error_code.is_not(None))
                                  .order_by(Transfer.id.desc()).limit(1)).first()
    usage = queries.usage(session, policy.mt5, now)
    halts = queries.active_halts(session, policy.mt5)
    open_rows = queries.unresolved(session, policy.mt5)
    age = None
    if with_equity is not None and with_equity.equity_age_s is not None:
        age = int((now - with_equity.at).total_seconds()) + with_equity.equity_age_s
    return {
        "account": policy.mt5,
        "policy": policy.name,
        "policy_sha256": policy.sha256,
        "policy_file": policy.path,
        "last_equity": with_equity.equity if with_equity else None,
        "last_equity_age_s": age,
        "last_evaluation_at": iso(last.at) if last else None,
        "last_decision": f"{last.action}: {last.reason}" if last else None,
        "windows": usage_details(policy, usage, now),
        "halted": bool(halts),
        "halts": [{"id": h.id, "kind": h.kind, "scope": h.scope, "reason": h.reason, "since": iso(h.created_at),
                   "by": h.created_by} for h in halts],
        "unresolved": [queries.transfer_record(t) for t in open_rows],
        "last_error": (f"transfer {last_failed.id}: {last_failed.error_code}: {last_failed.error_message}"
                       if last_failed else None),
    }


def render_text(rows: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for row in rows:
        equity = row["last_equity"] or "n/a"
        age = f" ({row['last_equity_age_s']}s old)" if row["last_equity_age_s"] is not None else ""
        lines.append(f"{row['account']}  policy {row['policy']} ({row['policy_sha256'][:12]})")
        lines.append(f"  equity {equity}{age}; last evaluation {row['last_evaluation_at'] or 'never'}")
        if row.get("held_by"):
            lines.append(f"  held by {row['held_by']}")
        if row["last_decision"]:
            lines.append(f"  last decision: {row['last_decision']}")
        for name, used in row["windows"].items():
            lines.append(f"  {name}: {used}")
        lines.append("  halted: " + ("; ".join(f"{h['kind']} since {h['since']} by {h['by']}: {h['reason']}"
                                              for h in row["halts"]) if row["halted"] else "no"))
        for t in row["unresolved"]:
            lines.append(f"  UNRESOLVED transfer {t['id']}: {t['kind']} {t['amount']} {t['currency']} is "
                         f"{t['state']} since {t['updated_at']}")
        if row["last_error"]:
            lines.append(f"  last error: {row['last_error']}")
        if row.get("problems"):
            lines.append("  attention: " + "; ".join(row["problems"]))
    return "\n".join(lines)
