"""`fund-agent status`: what an operator needs to know per account, read from the ledger alone."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.ledger import queries
from agent.ledger.models import DecisionRow, Transfer
from agent.policy.evaluate import usage_details
from agent.policy.model import Policy
from agent.timeutil import iso


def account_status(session: Session | None, policy: Policy, now: datetime) -> dict[str, Any]:
    """`session` None: no ledger exists yet, so nothing has happened on the account."""
    if session is None:
        return {"account": policy.mt5, "policy": policy.name, "policy_sha256": policy.sha256,
                "policy_file": policy.path, "last_equity": None, "last_equity_age_s": None,
                "last_evaluation_at": None, "last_decision": None,
                "windows": usage_details(policy, queries.Usage(), now), "halted": False, "halts": [],
                "unresolved": [], "last_error": None}
    last = session.scalars(select(DecisionRow).where(DecisionRow.account == policy.mt5)
                           .order_by(DecisionRow.id.desc()).limit(1)).first()
    with_equity = session.scalars(select(DecisionRow).where(DecisionRow.account == policy.mt5,
                                                            DecisionRow.equity.is_not(None))
                                  .order_by(DecisionRow.id.desc()).limit(1)).first()
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
    return "\n".join(lines)
