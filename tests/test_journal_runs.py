"""The compact decision journal (issue 12): a run of repeated no-op evaluations is one row, and nothing is lost.

The same evaluations are recorded twice, once compacted and once with every evaluation a row of its own; the
`decisions` records (each run expanded) must be the same, field by field, ids aside. `verify` stays clean, names
an edited run, and `db prune` keeps it clean.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import FUNDING, MT5, ledger_url, make_workspace, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_shared_funding import policy_for

from agent.audit import verify as verifymod
from agent.audit.maintenance import prune
from agent.broker.memory import MemoryBroker
from agent.engine.tick import Engine
from agent.equity.base import NoReading, Snapshot
from agent.ledger import journal, queries
from agent.ledger.db import Ledger
from agent.timeutil import ManualClock

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


class Terminal:
    """Equity, the reading's age and whether there is a reading at all, as the test sets them."""

    name = "terminal"

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.equity: Decimal | None = Decimal("1500")
        self.age = timedelta(0)

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        if self.equity is None:
            raise NoReading("terminal not running")
        return Snapshot(login=mt5_login, balance=self.equity, equity=self.equity, margin=Decimal(0),
                        margin_free=self.equity, margin_level=Decimal(0), currency="USD", positions=0,
                        connected=True, taken_at=self.clock.now() - self.age, source=self.name)

    def close(self) -> None:
        pass


EQUITIES = ["1500", "1500", "1500", "1500.25", "2400", "350", None]  # 350: below the floor, a top-up
STEP = st.tuples(st.sampled_from(EQUITIES), st.sampled_from([0, 0, 3, 700]), st.sampled_from([1, 30, 60, 61, 3600]),
                 st.sampled_from(["tick", "tick", "tick", "halt", "resume"]))


def record(steps: list[tuple[str | None, int, int, str]], path: Path, compact: bool) -> list[dict]:
    clock = ManualClock(START)
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "100000.00")
    broker.add_account(MT5, "USD", "1500.00", mt5=True)
    terminal = Terminal(clock)
    ledger = Ledger.open(ledger_url(path))
    saved = journal.RUN_CAP
    journal.RUN_CAP = journal.RUN_CAP if compact else 1  # 1: no evaluation ever joins a row
    try:
        engine = Engine(ledger, broker, terminal, clock, owner="test")
        policy = policy_for(MT5)
        for equity, age, seconds, action in steps:
            terminal.equity = Decimal(equity) if equity is not None else None
            terminal.age = timedelta(seconds=age)
            if action == "halt":
                with ledger.session() as session:
                    queries.add_halt(session, MT5, "operator", "by hand", clock.now(), "operator:test")
                    session.commit()
            elif action == "resume":
                with ledger.session() as session:
                    queries.clear_halts(session, MT5, clock.now(), "operator:test")
                    session.commit()
            engine.tick(policy)
            clock.advance(timedelta(seconds=seconds))
        with ledger.reader() as session:
            rows = queries.list_decisions(session, queries.Filters())
            records = queries.decision_records(rows, queries.Filters())
            problems = verifymod.verify(session.connection()).problems
        assert problems == [], problems
        return [{k: v for k, v in r.items() if k != "id"} for r in records]
    finally:
        journal.RUN_CAP = saved
        ledger.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=30))
def test_compaction_keeps_every_evaluation(tmp_path_factory: pytest.TempPathFactory,
                                           steps: list[tuple[str | None, int, int, str]]) -> None:
    base = tmp_path_factory.mktemp("runs")
    compacted = record(steps, base / "compact.db", compact=True)
    plain = record(steps, base / "plain.db", compact=False)
    assert compacted == plain
    assert len(compacted) == len(steps)


@given(st.lists(st.tuples(st.integers(0, 10**8), st.integers(-10**7, 10**9),
                          st.one_of(st.none(), st.sampled_from(["1500", "1500.25", "-3.5", "1e3"]))), max_size=50),
       st.booleans())
def test_entries_decode_to_what_was_encoded(items: list[tuple[int, int, str | None]], with_reading: bool) -> None:
    first = datetime(2026, 11, 25, 9, 0, 0, 123456, tzinfo=UTC)
    previous, entries, expected = first, b"", []
    for step, age, equity in items:
        at = previous + timedelta(microseconds=step)
        evaluation = journal.Evaluation(at, at - timedelta(microseconds=age) if with_reading else None, equity)
        entries += journal.encode_entry(previous, evaluation, with_reading)
        expected.append(evaluation)
        previous = at
    assert list(journal.decode(entries, first, with_reading)) == expected


def test_a_run_is_one_row_and_decisions_prints_every_evaluation(tmp_path: Path, fake) -> None:
    """Twenty evaluations of a steady account: one row; `decisions` prints twenty, `--runs` one with its count."""
    workspace = make_workspace(tmp_path, fake)
    steps = [("1500", 0, 60, "tick")] * 20
    record(steps, workspace / "ledger.db", compact=True)
    out = run_cli("decisions", "--format", "json", cwd=workspace)
    assert out.returncode == 0, out.stderr
    every = json.loads(out.stdout)
    assert len(every) == 20 and len({r["at"] for r in every}) == 20 and {r["id"] for r in every} == {1}
    runs = json.loads(run_cli("decisions", "--runs", "--format", "json", cwd=workspace).stdout)
    assert len(runs) == 1 and runs[0]["run_count"] == 20 and runs[0]["run_last_at"] == every[-1]["at"]
    since = every[5]["at"]
    ranged = json.loads(run_cli("decisions", "--since", since, "--format", "json", cwd=workspace).stdout)
    assert ranged == every[5:]
    totals = json.loads(run_cli("decisions", "--totals", "--format", "json", cwd=workspace).stdout)
    assert [t["count"] for t in totals] == [20]
    status = json.loads(run_cli("status", "--format", "json", cwd=workspace).stdout)
    assert status[0]["last_evaluation_at"] == every[-1]["at"]


def sqlite_only(path: Path) -> None:
    if not ledger_url(path).startswith("sqlite"):
        pytest.skip("tampers with the SQLite file directly")


def test_verify_names_an_edited_run_and_prune_keeps_it_clean(tmp_path: Path) -> None:
    sqlite_only(tmp_path / "ledger.db")
    # three hours of one-a-minute evaluations: runs end at each UTC hour (sealed), the newest stays open
    steps = [("1500", 0, 60, "tick")] * 180
    record(steps, tmp_path / "ledger.db", compact=True)
    db = tmp_path / "ledger.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT id, run_count, run_sealed FROM decisions ORDER BY id").fetchall()
    assert [r[1] for r in rows] == [60, 60, 60] and [r[2] for r in rows] == [1, 1, 0]
    ledger = Ledger(f"sqlite:///{db}")
    try:
        with ledger.reader() as session:
            assert verifymod.verify(session.connection()).ok
        count, _ = prune(ledger, START + timedelta(minutes=90), START + timedelta(hours=3))
        assert count == 1  # the first hour's run; the second ends after the cutoff and stays
        with ledger.reader() as session:
            assert verifymod.verify(session.connection()).ok
            kept = queries.decision_records(queries.list_decisions(session, queries.Filters()), queries.Filters())
        assert len(kept) == 120
    finally:
        ledger.close()
    for sql, named in (("UPDATE decisions SET run_evals = substr(run_evals, 1, length(run_evals) - 3) "
                        "WHERE id = 2", "decisions id 2: row differs from what was chained"),
                       ("UPDATE decisions SET run_count = 61 WHERE id = 3", "decisions id 3: its run counts 61"),
                       ("UPDATE decisions SET run_sealed = 0 WHERE id = 2", "decisions id 2:")):
        copy = tmp_path / f"copy-{abs(hash(sql))}.db"
        copy.write_bytes(db.read_bytes())
        with sqlite3.connect(copy) as conn:
            conn.execute(sql)
        tampered = Ledger(f"sqlite:///{copy}")
        try:
            with tampered.reader() as session:
                problems = [str(p) for p in verifymod.verify(session.connection()).problems]
        finally:
            tampered.close()
        assert problems and problems[0].startswith(named), (sql, problems)
