"""`status` reads every account in a few set-based queries (issue 12): the rows must be exactly those of the
per-account reads it replaced (queries.usage, active_halts, unresolved, the newest decision and failure), for
transfers, halts, peaks and runs of evaluations in every combination."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from conftest import ledger_url
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.ledger import journal, queries
from agent.ledger.db import Ledger
from agent.ledger.models import DecisionRow, EquityPeak, Halt, Transfer
from agent.policy.evaluate import usage_details
from agent.policy.load import parse_policy
from agent.policy.model import Policy
from agent.status import account_status, status_rows
from agent.timeutil import iso

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def policy(mt5: str) -> Policy:
    text = (REPO / "policies" / "example.yaml").read_text().replace("MTR130002534", mt5)
    return parse_policy(text.replace("name: example", f"name: p{mt5}"), f"{mt5}.yaml")


def per_account(session: Session, policy: Policy, now: datetime) -> dict[str, Any]:
    """The status of one account as it was read before: one query per question, ORM rows."""
    newest = (DecisionRow.at.desc(), DecisionRow.id.desc())
    last = session.scalars(select(DecisionRow).where(DecisionRow.account == policy.mt5)
                           .order_by(*newest).limit(1)).first()
    with_equity = session.scalars(select(DecisionRow).where(DecisionRow.account == policy.mt5,
                                                            DecisionRow.equity.is_not(None))
                                  .order_by(*newest).limit(1)).first()
    last_failed = session.scalars(select(Transfer).where(Transfer.account == policy.mt5,
                                                         Transfer.error_code.is_not(None))
                                  .order_by(Transfer.id.desc()).limit(1)).first()
    halts = queries.active_halts(session, policy.mt5)
    last_at = last.run_last_at or last.at if last is not None else None
    last_decision = None
    if last is not None:
        shown = (journal.last(queries.decision_record(last), last.at, last.run_evals) if last.run_count > 1
                 else {"action": last.action, "reason": last.reason})
        last_decision = f"{shown['action']}: {shown['reason']}"
    age = last_equity = None
    if with_equity is not None:
        equity_at, last_equity, equity_age = journal.last_reading(with_equity.at, with_equity.equity,
                                                                  with_equity.equity_age_s, with_equity.run_evals)
        if equity_age is not None:
            age = int((now - equity_at).total_seconds()) + equity_age
    return {
        "account": policy.mt5, "policy": policy.name, "policy_sha256": policy.sha256, "policy_file": policy.path,
        "last_equity": last_equity, "last_equity_age_s": age,
        "last_evaluation_at": iso(last_at) if last_at else None, "last_decision": last_decision,
        "windows": usage_details(policy, queries.usage(session, policy.mt5, now), now),
        "halted": bool(halts),
        "halts": [{"id": h.id, "kind": h.kind, "scope": h.scope, "reason": h.reason, "since": iso(h.created_at),
                   "by": h.created_by} for h in halts],
        "unresolved": [queries.transfer_record(t) for t in queries.unresolved(session, policy.mt5)],
        "last_error": (f"transfer {last_failed.id}: {last_failed.error_code}: {last_failed.error_message}"
                       if last_failed else None),
    }


def seed(session: Session, accounts: list[str], rnd: random.Random) -> None:
    txn = 5000
    for i, account in enumerate(accounts):
        if i % 7 == 3:
            continue  # nothing recorded at all
        for k in range(rnd.randint(1, 5), 0, -1):
            at = NOW - timedelta(minutes=k * 3 + rnd.randint(0, 2), seconds=rnd.randint(0, 59))
            equity = None if (i % 5 == 1 and k == 1) else f"{rnd.randint(100, 9000)}.{rnd.randint(0, 99):02d}"
            age = None if equity is None or i % 11 == 4 else rnd.randint(0, 40)
            action = rnd.choice(["none", "none", "top_up", "error"])
            row = DecisionRow(at=at, account=account, policy=f"p{account}", policy_sha256="0" * 64, action=action,
                              currency="USD", equity=equity, equity_age_s=age,
                              reason=f"equity {equity} is within the band" if equity else "no reading")
            if action == "none" and equity and k == 1 and i % 3 != 2:  # the newest row is a run
                entries, previous = b"", at
                row.run_count = rnd.randint(2, 5)
                for e in range(row.run_count - 1):
                    later = previous + timedelta(seconds=60)
                    taken = later - timedelta(seconds=rnd.randint(0, 20)) if age is not None else None
                    entries += journal.encode_entry(previous, journal.Evaluation(
                        later, taken, None if e % 2 else f"{rnd.randint(100, 9000)}.00"), age is not None)
                    previous = later
                row.run_last_at, row.run_evals = previous, entries
            session.add(row)
        for k in range(rnd.randint(0, 8)):
            at = NOW - timedelta(hours=rnd.randint(1, 24 * 40))
            state = rnd.choice(["confirmed", "confirmed", "failed", "failed"])
            error = rnd.choice(["NotSent", "MT5Error", "NotExecuted"]) if state == "failed" else None
            txn += 1
            session.add(Transfer(created_at=at, updated_at=at + timedelta(seconds=5), account=account,
                                 funding="CR4000128", kind=rnd.choice(["top_up", "sweep"]),
                                 amount_minor=rnd.randint(1000, 90000), currency="USD", state=state,
                                 broker_txn_id=txn if state == "confirmed" else None, policy=f"p{account}",
                                 policy_sha256="0" * 64, equity="450.00", reason="test", sent_at=at,
                                 error_code=error, error_message=f"message {k}" if error else None))
        if i % 6 == 0:
            at = NOW - timedelta(minutes=rnd.randint(1, 300))
            session.add(Transfer(created_at=at, updated_at=at, account=account, funding="CR4000128", kind="top_up",
                                 amount_minor=5000, currency="USD", state=rnd.choice(["pending", "sent", "unknown"]),
                                 policy=f"p{account}", policy_sha256="0" * 64, equity="450.00", reason="open"))
        if i % 4 == 1:
            for kind, cleared in (("operator", False), ("kill_switch", True), ("kill_switch", i % 8 == 1),
                                  ("unresolved", i % 3 == 0)):
                at = NOW - timedelta(hours=rnd.randint(1, 100))
                session.add(Halt(account=account, kind=kind, scope="all" if kind == "operator" else "top_up",
                                 reason=f"why {kind}", created_at=at, created_by="ops",
                                 cleared_at=at + timedelta(minutes=5) if cleared else None,
                                 cleared_by="ops" if cleared else None))
        if i % 3 == 0:
            session.add(EquityPeak(account=account, peak=f"{5000 + i}.50", at=NOW - timedelta(days=1)))
        session.flush()


def test_status_reads_all_accounts_as_the_per_account_queries_did(tmp_path: Path) -> None:
    accounts = [f"MTR{130000000 + i}" for i in range(30)]
    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    try:
        with ledger.session() as session, session.begin():
            seed(session, accounts, random.Random(12))
        policies = [policy(account) for account in accounts]
        with ledger.reader() as session:
            assert session.scalar(select(func.count(DecisionRow.id)).where(DecisionRow.run_count > 1))
            expected = [per_account(session, p, NOW) for p in policies]
            rows = status_rows(session, policies, NOW)
            assert [account_status(session, p, NOW) for p in policies] == expected
        assert [{k: v for k, v in row.items() if k in expected[0]} for row in rows] == expected
        # the seed reaches every case
        assert any(r["halts"] for r in rows) and any(r["unresolved"] for r in rows)
        assert any(r["last_error"] for r in rows) and any(r["last_evaluation_at"] is None for r in rows)
        assert any(r["last_equity"] is None and r["last_evaluation_at"] for r in rows)
    finally:
        ledger.close()
