"""`fund-agent verify --against-broker`: a broker statement with one transfer the ledger does not know and a
ledger transfer the statement does not show; both reported, exit 1; a read-scope token is enough."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import FUNDING, MT5, TOKEN, run_cli

from agent.audit.verify import unlinked_statement_rows
from agent.broker.deriv import DerivClient
from agent.engine.transfers import create_intent, settle
from agent.ledger.db import Ledger

pytestmark = pytest.mark.sqlite_only
READ_ONLY = {"DERIV_API_TOKEN": "read-only-token"}


def _record(ledger: Ledger, amount: str, txn: int, kind: str = "top_up") -> int:
    now = datetime.now(UTC)
    t = create_intent(ledger, at=now, account=MT5, funding=FUNDING, kind=kind, amount=Decimal(amount),
                      currency="USD", policy="example", policy_sha256="a" * 64, equity=Decimal("300"), reason="r")
    settle(ledger, t.id, "sent", now, "agent", expected="pending")
    settle(ledger, t.id, "confirmed", now, "agent", broker_txn_id=txn)
    return t.id


def _range() -> tuple[str, str]:
    today = datetime.now(UTC).date()
    return today.isoformat(), (today + timedelta(days=1)).isoformat()


def test_both_directions_are_reported(fake, workspace: Path) -> None:
    client = DerivClient(fake.url, 1089, TOKEN, timeout=5)
    try:
        known = client.mt5_deposit(FUNDING, MT5, Decimal("100.00"))
        swept = client.mt5_withdrawal(MT5, FUNDING, Decimal("30.50"))
        extra = client.mt5_deposit(FUNDING, MT5, Decimal("42.10"))  # moved, but the ledger never heard of it
    finally:
        client.close()
    ledger = Ledger.open(f"sqlite:///{workspace / 'ledger.db'}")
    try:
        _record(ledger, "100.00", known)
        _record(ledger, "30.50", swept, kind="sweep")
        missing = _record(ledger, "55.00", 987654321)  # confirmed in the ledger, absent at the broker
    finally:
        ledger.close()
    since, until = _range()
    result = run_cli("verify", "--against-broker", "--since", since, "--until", until, cwd=workspace,
                     env=READ_ONLY)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith(f"not in ledger: txn {extra} amount -42.10 account {FUNDING} (with {MT5}, at ")
    assert lines[1] == (f"not at broker: transfer {missing} top_up 55.00 USD {MT5} ({FUNDING}): txn 987654321 is "
                        f"not in {FUNDING}'s statement")


def test_agreement_exits_0_and_needs_a_range(fake, workspace: Path) -> None:
    client = DerivClient(fake.url, 1089, TOKEN, timeout=5)
    try:
        txn = client.mt5_deposit(FUNDING, MT5, Decimal("100.00"))
    finally:
        client.close()
    ledger = Ledger.open(f"sqlite:///{workspace / 'ledger.db'}")
    try:
        _record(ledger, "100.00", txn)
    finally:
        ledger.close()
    since, until = _range()
    result = run_cli("verify", "--against-broker", "--since", since, "--until", until, cwd=workspace,
                     env=READ_ONLY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: the ledger and the broker agree from ")
    usage = run_cli("verify", "--against-broker", "--since", since, cwd=workspace, env=READ_ONLY)
    assert usage.returncode == 2 and "--against-broker needs --since and --until" in usage.stderr


def test_statement_is_read_in_pages(fake, workspace: Path) -> None:
    """More rows than one page (999): every one is read."""
    base = int(datetime.now(UTC).timestamp())
    rows = fake.state.statement.setdefault(FUNDING, [])
    for i in range(1001):
        rows.append({"action_type": "transfer", "amount": Decimal("-1.00"), "balance_after": Decimal("1"),
                     "transaction_id": 700000 + i, "transaction_time": base, "app_id": 1089,
                     "from": {"loginid": FUNDING}, "to": {"loginid": MT5},
                     "longcode": "Transfer to MT5 account 130002534", "reference_id": 1})
    Ledger.open(f"sqlite:///{workspace / 'ledger.db'}").close()
    since, until = _range()
    result = run_cli("verify", "--against-broker", "--since", since, "--until", until, cwd=workspace,
                     env=READ_ONLY)
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == 1001


def test_unlinked_statement_rows_is_the_shared_comparison(tmp_path: Path) -> None:
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        _record(ledger, "10.00", 11)
        rows = [{"action_type": "transfer", "transaction_id": 11, "app_id": 1089, "amount": Decimal("-10.00")},
                {"action_type": "transfer", "transaction_id": 12, "app_id": 1089, "amount": Decimal("-5.00")},
                {"action_type": "transfer", "transaction_id": 13, "app_id": 4242, "amount": Decimal("-5.00")},
                {"action_type": "transfer", "transaction_id": 14, "app_id": None, "amount": Decimal("-5.00")}]
        with ledger.reader() as session:
            assert [r["transaction_id"] for r in unlinked_statement_rows(session, rows, 1089)] == [12]
            assert [r["transaction_id"] for r in unlinked_statement_rows(session, rows, 1089,
                                                                         include_unattributed=True)] == [12, 14]
    finally:
        ledger.close()


def test_a_confirmed_transfer_whose_txn_is_another_transfer_is_reported(tmp_path: Path) -> None:
    from agent.audit.verify import missing_at_broker
    from agent.ledger.models import Transfer

    ledger = Ledger.open(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        _record(ledger, "10.00", 21)
        with ledger.reader() as session:
            [t] = list(session.query(Transfer))
    finally:
        ledger.close()
    same = {"action_type": "transfer", "transaction_id": 21, "app_id": 1089, "amount": Decimal("-10.00"),
            "from": {"loginid": FUNDING}, "to": {"loginid": MT5}}
    assert missing_at_broker([t], [same], 1089) == []
    other = {**same, "amount": Decimal("-11.00")}
    [(found, why)] = missing_at_broker([t], [other], 1089)
    assert found.id == t.id and why == f"txn 21 at the broker is another transfer (amount -11.00, {FUNDING} -> {MT5})"
