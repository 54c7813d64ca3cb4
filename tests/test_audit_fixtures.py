"""A ledger of known content for the audit tests (no tests here: the builder and what it holds)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from agent.engine.transfers import create_intent, settle
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.ledger.models import DecisionRow

A, B, C = "MTR130002534", "MTR130002535", "MTR130009999"
F1, F2 = "CR4000128", "CR4000999"
POLICY = {A: "scalper", B: "swing", C: "other"}
FUNDING = {A: F1, B: F1, C: F2}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# (account, kind, amount, created, final state, broker txn)
TRANSFERS = [
    (A, "top_up", "600.00", "2026-11-02T10:00:00", "confirmed", 5001),
    (A, "sweep", "250.50", "2026-11-03T11:00:00", "confirmed", 5002),
    (B, "top_up", "100.00", "2026-11-03T12:00:00", "failed", None),
    (B, "top_up", "75.25", "2026-11-10T09:00:00", "confirmed", 5003),
    (C, "top_up", "1000.00", "2026-11-20T09:00:00", "confirmed", 5004),
    (C, "sweep", "40.00", "2026-12-01T09:00:00", "unknown", None),
]
NOOP_DECISIONS = 30  # per account, one an hour from 2026-10-01T00:00Z, equity 400 + i


def build(path: Path, url: str | None = None) -> str:
    url = url or f"sqlite:///{path}"
    ledger = Ledger.open(url)
    try:
        for account in (A, B, C):
            with ledger.session() as s:
                for i in range(NOOP_DECISIONS):
                    s.add(DecisionRow(at=at("2026-10-01T00:00:00") + timedelta(hours=i), account=account,
                                      policy=POLICY[account], policy_sha256="a" * 64, action="none", amount=None,
                                      currency="USD", equity=str(400 + i), equity_age_s=1, reason="in band"))
                s.commit()
        for account, kind, amount, created, final, txn in TRANSFERS:
            when = at(created)
            t = create_intent(ledger, at=when, account=account, funding=FUNDING[account], kind=kind,
                              amount=Decimal(amount), currency="USD", policy=POLICY[account], policy_sha256="a" * 64,
                              equity=Decimal("300.00") if kind == "top_up" else Decimal("3300.00"), reason="rule")
            with ledger.session() as s:
                s.add(DecisionRow(at=when, account=account, policy=POLICY[account], policy_sha256="a" * 64,
                                  action=kind, amount=amount, currency="USD",
                                  equity="300.00" if kind == "top_up" else "3300.00", equity_age_s=1, reason="rule",
                                  transfer_id=t.id))
                s.commit()
            if final == "failed":
                settle(ledger, t.id, "failed", when + timedelta(seconds=1), "agent", expected="pending",
                       error_code="NotSent", error_message="stopped")
                continue
            settle(ledger, t.id, "sent", when + timedelta(seconds=1), "agent", expected="pending")
            if final == "confirmed":
                settle(ledger, t.id, "confirmed", when + timedelta(seconds=2), "agent", broker_txn_id=txn)
            else:
                settle(ledger, t.id, "unknown", when + timedelta(seconds=2), "agent", error_code="Timeout",
                       error_message="no reply")
        with ledger.session() as s:
            queries.add_halt(s, A, "operator", "review", at("2026-11-04T08:00:00"), "operator:alice")
            s.commit()
        with ledger.session() as s:
            queries.clear_halts(s, A, at("2026-11-05T08:00:00"), "operator:alice")
            s.commit()
        with ledger.session() as s:
            queries.add_halt(s, C, "kill_switch", "net top-up above 900", at("2026-12-01T09:30:00"), "agent")
            s.commit()
    finally:
        ledger.close()
    return url


def write_config(directory: Path, database: str = "sqlite:///ledger.db", broker_url: str = "ws://127.0.0.1:9") -> Path:
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "fund-agent.yaml").write_text(
        f"database: {database}\npolicies: policies/\n"
        f"broker:\n  url: {broker_url}\n  app_id: 1089\n  token_env: DERIV_API_TOKEN\n  timeout: 5s\n"
        "equity:\n  source: ea-file\n  dir: status\n")
    return directory
