"""One bad account never stops the others: an unexpected error stays with its account, with a decision row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation

from conftest import FUNDING, MT5, ledger_url
from test_shared_funding import Readings, policy_for

from agent.broker.memory import MemoryBroker
from agent.engine.tick import Engine
from agent.equity.base import Snapshot
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.timeutil import ManualClock

OTHER = "MTR130002535"


class OneBrokenTerminal(Readings):
    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        if mt5_login == MT5:
            raise InvalidOperation("[<class 'decimal.InvalidOperation'>]")  # what a bug deep in a source raises
        return super().read(mt5_login)


def test_an_unexpected_error_in_one_account_leaves_the_others_evaluated(tmp_path):
    clock = ManualClock(datetime(2026, 11, 25, 9, 0, tzinfo=UTC))
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "10000.00")
    broker.add_account(MT5, "USD", "450.00", mt5=True)
    broker.add_account(OTHER, "USD", "450.00", mt5=True)
    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    try:
        engine = Engine(ledger, broker, OneBrokenTerminal(clock, {MT5: "450", OTHER: "450"}), clock, owner="t")
        broken = engine.tick_safely(policy_for(MT5))
        clock.advance(timedelta(seconds=1))
        fine = engine.tick_safely(policy_for(OTHER))
        assert broken.decision.bound_by == "error" and "InvalidOperation" in broken.decision.reason
        assert not broken.ok
        assert fine.ok and fine.transfer["state"] == "confirmed"
        with ledger.reader() as session:
            rows = queries.list_decisions(session, queries.Filters(account=MT5))
        assert [(r.action, r.bound_by) for r in rows] == [("error", "error")]
    finally:
        ledger.close()
    assert broker.balance_of(OTHER) == Decimal("1000.00") and broker.balance_of(MT5) == Decimal("450.00")
