"""The canonical encoding is fixed: the known ledger has the same head hash on SQLite and on PostgreSQL
(FUND_AGENT_TEST_LEDGER=postgresql), whatever the storage types. A change of this hash is a change of the
documented encoding: every ledger's chain would stop verifying."""

from __future__ import annotations

from pathlib import Path

from conftest import ledger_url
from test_audit_fixtures import build

from agent.audit.verify import verify
from agent.ledger.db import Ledger

HEAD = "45aca406e3c6e1e3de30050fe179c0565300abc819c2d64b04f8c1dfc9789792"


def test_the_known_ledger_has_the_documented_head(tmp_path: Path) -> None:
    url = build(tmp_path / "ledger.db", ledger_url(tmp_path / "ledger.db"))
    ledger = Ledger(url)
    try:
        with ledger.reader() as session:
            result = verify(session.connection())
    finally:
        ledger.close()
    assert result.ok, [str(p) for p in result.problems]
    assert (result.rows, result.head) == (139, HEAD)


def test_canonical_encoding_by_example() -> None:
    from datetime import UTC, datetime
    from decimal import Decimal

    from agent.audit.chain import canonical, link

    text = canonical("transfers", "create", [1, datetime(2026, 11, 2, 10, tzinfo=UTC), "MTR1", None, Decimal("600.00"),
                                             7, "é"])
    assert text == '["transfers","create","1","2026-11-02T10:00:00.000000Z","MTR1",null,"600.00","7","é"]'.encode()
    assert link(1, "0" * 64, "ab") == __import__("hashlib").sha256(b"1:" + b"0" * 64 + b":ab").hexdigest()
