"""Regressions found by a review of the in-memory summary, the decision runs and the relaxed no-op commits
(issue 12): a resume between a tick's read and its write, PostgreSQL lock order, a clock stepped back, two
writers, a cached row id a failed commit gave up, prune beside a paused account, totals against the listing, the
report's point cap, the status page's last decisions, and which commits wait for the disk."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import FUNDING, MT5, ledger_url
from sqlalchemy import event, text
from test_journal_runs import START, Terminal, record
from test_shared_funding import Readings, policy_for

import agent.engine.tick as tickmod
from agent.audit import questions, report
from agent.audit import verify as verifymod
from agent.audit.maintenance import prune
from agent.broker.memory import MemoryBroker
from agent.engine.tick import Engine
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.policy.evaluate import Decision
from agent.status_page import page_data
from agent.timeutil import ManualClock


def _show(*_args: object, **_kwargs: object) -> None:
    """What the scratch versions printed: kept as a no-op (assertions say what must hold)."""


# ---- clock: Clock stepping back: a run whose first `at` is before the previous row's is never sealed.

def setup(path: Path, start: datetime):
    clock = ManualClock(start)
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "100000.00")
    broker.add_account(MT5, "USD", "1500.00", mt5=True)
    terminal = Terminal(clock)
    ledger = Ledger.open(ledger_url(path))
    engine = Engine(ledger, broker, terminal, clock, owner="test")
    return clock, terminal, ledger, engine


def dump(ledger):
    with ledger.reader() as session:
        rows = session.execute(queries.text(
            "SELECT id, at, run_count, run_last_at, run_sealed FROM decisions ORDER BY id")).all()
        problems = [str(p) for p in verifymod.verify(session.connection()).problems]
    return rows, problems


def test_clock_back_leaves_an_unsealed_run(tmp_path: Path) -> None:
    clock, terminal, ledger, engine = setup(tmp_path / "l.db", datetime(2026, 11, 25, 10, 30, tzinfo=UTC))
    policy = policy_for(MT5)
    engine.tick(policy)                       # row 1 at 10:30 (one evaluation)
    clock._now = datetime(2026, 11, 25, 10, 20, tzinfo=UTC)
    for _ in range(3):                        # row 2 at 10:20, joined by 10:21, 10:22
        engine.tick(policy)
        clock.advance(timedelta(minutes=1))
    clock.advance(timedelta(hours=1))         # 11:23: a new hour ends row 2's run
    engine.tick(policy)
    rows, problems = dump(ledger)
    _show(rows)
    _show(problems)
    ledger.close()
    assert problems == [], problems


# ---- page: The status page's 'Last decisions': a run shows as its first evaluation.

def test_last_decisions(tmp_path: Path) -> None:
    record([("1500", 0, 60, "tick")] * 30, tmp_path / "l.db", compact=True)   # 09:00 .. 09:29
    ledger = Ledger(ledger_url(tmp_path / "l.db"))
    with ledger.reader() as s:
        data = page_data(s, [policy_for(MT5)], START + timedelta(minutes=30))
    ledger.close()
    _show("last decisions:", [d["at"] for d in data["decisions"]], data["rows"][0]["last_evaluation_at"])
    assert data["decisions"][0]["at"] == "2026-11-25T09:29:00Z"


# ---- peak: A kill-switch resume committed between the tick's read and its write: the reading is not noted as the...

def test_resume_between_read_and_write(tmp_path: Path, monkeypatch) -> None:
    clock = ManualClock(datetime(2026, 11, 25, 10, 0, tzinfo=UTC))
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "100000.00")
    broker.add_account(MT5, "USD", "2000.00", mt5=True)
    source = Readings(clock, {MT5: "2000"})
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    engine = Engine(ledger, broker, source, clock, owner="test")
    policy = policy_for(MT5)
    engine.tick(policy)                                   # peak 2000
    with ledger.session() as s:
        queries.add_halt(s, MT5, "kill_switch", "drawdown", clock.now(), "agent")
        s.commit()
    clock.advance(timedelta(minutes=1))
    engine.tick(policy)                                   # read the book with the halt (version moved)
    clock.advance(timedelta(minutes=1))
    source.equity[MT5] = Decimal("1500")
    real = tickmod.evaluate

    def resume_meanwhile(*args, **kwargs):
        with ledger.session() as s:                       # `fund-agent resume` beside the service
            queries.clear_halts(s, MT5, clock.now(), "operator:test")
            s.commit()
        return real(*args, **kwargs)

    monkeypatch.setattr(tickmod, "evaluate", resume_meanwhile)
    engine.tick(policy)                                   # reading 1500, right after the resume
    monkeypatch.setattr(tickmod, "evaluate", real)
    with ledger.reader() as s:
        after_resume = queries.peak_equity(s, MT5)
    for equity in ("1000", "550"):
        clock.advance(timedelta(minutes=1))
        source.equity[MT5] = Decimal(equity)
        out = engine.tick(policy)
    with ledger.reader() as s:
        peak = queries.peak_equity(s, MT5)
        halts = [(h.kind, h.reason) for h in queries.active_halts(s, MT5)]
    ledger.close()
    _show("peak after the resume tick:", after_resume, "| peak at the end:", peak, "| halts:", halts,
          "| last decision:", out.decision.bound_by, out.decision.reason[:90])
    assert after_resume == Decimal("1500")
    assert halts and halts[0][0] == "kill_switch"


# ---- pgdeadlock: PostgreSQL: the tick's no-op journal transaction (decision row -> audit head lock -> new peak ->...

def test_resume_beside_a_new_peak(tmp_path: Path) -> None:
    url = ledger_url(tmp_path / "l.db")
    if not url.startswith("postgresql"):
        return
    now = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    ledger = Ledger.open(url)
    with ledger.session() as s:
        queries.note_equity(s, MT5, Decimal("1000"), now)
        queries.add_halt(s, MT5, "operator", "by hand", now, "op")
        s.commit()
    errors: dict[str, str] = {}
    heads_locked = threading.Event()
    resume_started = threading.Event()

    def tick() -> None:  # what Engine._record's journal() does for a no-op decision with a new peak
        try:
            with ledger.journal_session() as s:
                queries.record_decision(s, now, MT5, "p", "sha", Decision("none", None, "nothing to do"), "USD",
                                        Decimal("1200"), 0, taken_at=now, runs={})
                heads_locked.set()
                resume_started.wait(5)
                time.sleep(0.5)
                queries.note_equity(s, MT5, Decimal("1200"), now)
                s.commit()
        except Exception as exc:  # noqa: BLE001
            errors["tick"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"

    def resume() -> None:
        heads_locked.wait(5)
        try:
            with ledger.session() as s:
                resume_started.set()
                queries.clear_halts(s, MT5, now, "operator:test")
                s.commit()
        except Exception as exc:  # noqa: BLE001
            errors["resume"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"

    threads = [threading.Thread(target=tick), threading.Thread(target=resume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ledger.close()
    _show("errors:", errors)
    assert errors == {}


# ---- pgtwo: PostgreSQL (READ COMMITTED writers): a one-evaluation row extended by one writer while another, havin...

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def write_pgtwo(ledger, at, reason, runs):
    with ledger.journal_session() as s:
        queries.record_decision(s, at, MT5, "p", "sha", Decision("none", None, reason), "USD", Decimal("1500"), 0,
                                taken_at=at, runs=runs)
        s.commit()


def test_two_writers(tmp_path: Path, monkeypatch) -> None:
    url = ledger_url(tmp_path / "l.db")
    if not url.startswith("postgresql"):
        return
    ledger = Ledger.open(url)
    write_pgtwo(ledger, NOW, "nothing to do", {})                               # row 1, one evaluation
    read_done, extended = threading.Event(), threading.Event()
    real_seal = queries.seal_run

    def slow_seal(session, run, at):
        read_done.set()
        extended.wait(5)                                                   # the other writer extends row 1 now
        return real_seal(session, run, at)

    monkeypatch.setattr(queries, "seal_run", slow_seal)
    other = threading.Thread(target=write_pgtwo, args=(ledger, NOW + timedelta(seconds=2), "something else", {}))
    other.start()                                                          # writer B: a different decision
    read_done.wait(5)
    monkeypatch.setattr(queries, "seal_run", real_seal)
    write_pgtwo(ledger, NOW + timedelta(seconds=1), "nothing to do", {})         # writer A: joins row 1
    extended.set()
    other.join(10)
    with ledger.reader() as s:
        rows = s.execute(queries.text("SELECT id, run_count, run_sealed FROM decisions ORDER BY id")).all()
        problems = [str(p) for p in verifymod.verify(s.connection()).problems]
    ledger.close()
    _show([tuple(r) for r in rows], problems)
    assert problems == []


# ---- prune: Prune with a run sealed long after it ended (its account paused), other accounts' runs around the cut...

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def write_prune(ledger, runs, account, at, reason="nothing to do"):
    with ledger.journal_session() as s:
        queries.record_decision(s, at, account, "p", "sha", Decision("none", None, reason), "USD", Decimal("1500"),
                                0, taken_at=at, runs=runs)
        s.commit()


def paused_beside_busy(ledger: Ledger, runs: dict, seal_every: int | None = None) -> None:
    """Three hours of one-a-minute evaluations of B (its decision changes every 50 minutes) and A's first half
    hour; `seal_every`: end the runs whose hour is over every so many minutes, as the heartbeat does."""
    for m in range(0, 180):
        at = T0 + timedelta(minutes=m)
        if m < 30:
            write_prune(ledger, runs, "MTRA1", at)
        write_prune(ledger, runs, "MTRB2", at, "nothing" if m % 50 else "other")
        if seal_every and m % seal_every == 0:
            with ledger.journal_session() as s:
                queries.seal_ended_runs(s, at)
                s.commit()


@pytest.mark.parametrize("cut_minutes", [15, 29, 31, 45, 61, 90, 150, 179, 200])
def test_prune_paused_account(tmp_path: Path, cut_minutes: int) -> None:
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    runs: dict = {}
    paused_beside_busy(ledger, runs)
    write_prune(ledger, runs, "MTRA1", T0 + timedelta(minutes=180))    # A resumes: its 09:00-09:29 run sealed now
    with ledger.reader() as s:
        before = len(queries.decision_records(queries.list_decisions(s, queries.Filters()), queries.Filters()))
    count, _ = prune(ledger, T0 + timedelta(minutes=cut_minutes), T0 + timedelta(days=3))
    with ledger.reader() as s:
        problems = [str(p) for p in verifymod.verify(s.connection()).problems]
        kept = queries.decision_records(queries.list_decisions(s, queries.Filters()), queries.Filters())
    ledger.close()
    cutoff = T0 + timedelta(minutes=cut_minutes)
    _show(cut_minutes, "pruned rows", count, "evaluations", before, "->", len(kept), problems)
    assert problems == []
    # nothing at or after the cutoff is lost
    assert sum(r["at"] >= cutoff.strftime("%Y-%m-%dT%H:%M:%SZ") for r in kept) == sum(
        1 for m in range(181) for acct in ("A", "B")
        if (acct == "B" and m < 180 or acct == "A" and (m < 30 or m == 180)) and m >= cut_minutes)


# ---- report: report's equity chart: MAX_POINTS bounds rows, not the evaluations they expand to.

def test_points_bounded(tmp_path: Path, monkeypatch) -> None:
    record([("1500", 0, 60, "tick")] * 600, tmp_path / "l.db", compact=True)   # 10 h, 10 rows of 60
    ledger = Ledger(ledger_url(tmp_path / "l.db"))
    monkeypatch.setattr(report, "MAX_POINTS", 5)  # stands for 2,000 against a year of rows
    with ledger.reader() as s:
        points = report.equity_points(s, MT5, START, START + timedelta(days=1))
    ledger.close()
    _show("points:", len(points), "cap:", report.MAX_POINTS, "minutes:", sorted({p[0].hour for p in points}))
    assert len(points) <= report.MAX_POINTS


# ---- reuse: A no-op decision row whose commit failed stays in Engine.runs; SQLite gives its id to the next row (a...

OTHER = "MTR130002999"


def test_stale_cached_row_id_joins_another_accounts_row(tmp_path: Path) -> None:
    if not ledger_url(tmp_path / "l.db").startswith("sqlite"):
        return
    clock = ManualClock(datetime(2026, 11, 25, 10, 0, tzinfo=UTC))
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "100000.00")
    broker.add_account(MT5, "USD", "1500.00", mt5=True)
    broker.add_account(OTHER, "USD", "1500.00", mt5=True)
    source = Readings(clock, {MT5: "1500", OTHER: "1500"})
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    engine = Engine(ledger, broker, source, clock, owner="test")
    a, b = policy_for(MT5), policy_for(OTHER)
    engine.tick_safely(a)
    engine.tick_safely(b)                                 # rows 1 (A) and 2 (B)
    clock.advance(timedelta(hours=1))                     # a new hour: A's next evaluation is a new row (id 3)
    failures = {"journal": 1, "session": 1}

    def fail_commit(session):                              # e.g. SQLITE_FULL / disk I/O error at COMMIT
        if failures["journal"]:
            failures["journal"] -= 1
            raise OSError("disk I/O error")

    event.listen(ledger.journals, "before_commit", fail_commit)
    real_session = ledger.session

    def session_once():                                    # the error journal cannot get the write lock either
        if failures["session"]:
            failures["session"] -= 1
            raise OSError("database is locked")
        return real_session()

    ledger.session = session_once
    out = engine.tick_safely(a)
    _show("A's tick:", out.decision.bound_by, out.decision.reason[:80])
    engine.tick_safely(b)                                 # B's new row: SQLite gives it id 3 again
    engine.tick_safely(a)                                 # A: joins "its" cached row 3
    with ledger.reader() as s:
        rows = s.execute(text("SELECT id, account, at, run_count, run_last_at FROM decisions ORDER BY id")).all()
        records = queries.decision_records(queries.list_decisions(s, queries.Filters()), queries.Filters())
        problems = [str(p) for p in verifymod.verify(s.connection()).problems]
    ledger.close()
    for r in rows:
        _show(tuple(r))
    _show("A evaluations listed:", sum(r["account"] == MT5 for r in records),
          "B evaluations listed:", sum(r["account"] == OTHER for r in records))
    _show("verify:", problems)
    assert sum(r["account"] == MT5 for r in records) == 2  # A evaluated 3 times, one of which failed to commit
    assert sum(r["account"] == OTHER for r in records) == 2


# ---- sync: Which PRAGMA synchronous level each committed write ran under (SQLite), over idle ticks, a top-up, a kill

def test_money_rows_commit_full(tmp_path: Path) -> None:
    if not ledger_url(tmp_path / "l.db").startswith("sqlite"):
        return
    clock = ManualClock(datetime(2026, 11, 25, 10, 0, tzinfo=UTC))
    broker = MemoryBroker(clock)
    broker.add_account(FUNDING, "USD", "100000.00")
    broker.add_account(MT5, "USD", "1500.00", mt5=True)
    source = Readings(clock, {MT5: "900"})
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    seen: list[tuple[str, int]] = []

    @event.listens_for(ledger.engine, "before_cursor_execute")
    def spy(conn, cursor, statement, params, context, executemany):
        head = statement.lstrip().split(None, 3)
        if head and head[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            table = head[2] if head[0].upper() != "UPDATE" else head[1]
            level = conn.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone()[0]
            seen.append((table.strip('"'), level))

    engine = Engine(ledger, broker, source, clock, owner="test")
    policy = policy_for(MT5)
    for equity in ("900", "900", "450", "900", "900", "450", "900", "900", "200", "900"):
        source.equity[MT5] = Decimal(equity)
        o = engine.tick_safely(policy)
        _show(equity, o.decision.action, o.decision.reason[:100], o.transfer and o.transfer['state'])
        clock.advance(timedelta(minutes=45))
    with ledger.session() as s:  # an operator halt and resume beside it
        queries.add_halt(s, MT5, "operator", "x", clock.now(), "op")
        s.commit()
    engine.tick_safely(policy)
    ledger.close()
    money = {t: sorted({lvl for tt, lvl in seen if tt == t}) for t in
             ("transfers", "transfer_events", "halts", "funding_accounts", "decisions", "equity_peaks",
              "audit_chain", "account_versions")}
    _show(money)  # 1 = NORMAL, 2 = FULL
    assert money["transfers"] == [2] and money["transfer_events"] == [2] and money["halts"] == [2]


# ---- totals: `decisions --since` lists evaluations that `decisions --totals --since` does not count.

def test_totals_and_listing_agree(tmp_path: Path) -> None:
    record([("1500", 0, 60, "tick")] * 60, tmp_path / "l.db", compact=True)   # 09:00 .. 09:59, one run
    ledger = Ledger(ledger_url(tmp_path / "l.db"))
    for since, until in ((START + timedelta(minutes=30), None), (None, START + timedelta(minutes=30)),
                         (START + timedelta(minutes=10), START + timedelta(minutes=20))):
        filters = queries.Filters(since=since, until=until)
        with ledger.reader() as s:
            listed = len(queries.decision_records(queries.list_decisions(s, filters), filters))
            totals = questions.decision_totals(s, filters)
        assert [t["count"] for t in totals] == [listed], (since, until, totals, listed)
    ledger.close()


def test_runs_ended_by_the_heartbeat_do_not_hold_prune_back(tmp_path: Path) -> None:
    """A paused account's run, ended when its hour is over (the service's heartbeat), is pruned once the cutoff is
    past the next hour (its `run` link is chained then, after that hour's first rows), not held back for good."""
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    paused_beside_busy(ledger, {}, seal_every=5)
    count, _ = prune(ledger, T0 + timedelta(minutes=150), T0 + timedelta(days=3))
    with ledger.reader() as s:
        problems = [str(p) for p in verifymod.verify(s.connection()).problems]
        kept = queries.decision_records(queries.list_decisions(s, queries.Filters()), queries.Filters())
    ledger.close()
    assert problems == []
    assert not any(r["account"] == "MTRA1" for r in kept)  # A's 09:00-09:29 run went with its hour
    assert count >= 2


def _journal_ledger(tmp_path: Path) -> tuple[Ledger, Path]:
    db = tmp_path / "l.db"
    ledger = Ledger.open(f"sqlite:///{db}")
    runs: dict = {}
    for m in range(5):  # row 1: a top-up-like error decision; row 2: a run of four no-op evaluations
        at = T0 + timedelta(minutes=m)
        reason = "evaluation failed: boom" if m == 0 else "nothing to do"
        with ledger.journal_session() as s:
            queries.record_decision(s, at, "MTRA1", "p", "sha", Decision("none", None, reason), "USD",
                                    Decimal("1500"), 0, taken_at=at, runs=runs, action="error" if m == 0 else None)
            s.commit()
    return ledger, db


def _problems(ledger: Ledger) -> list[str]:
    with ledger.reader() as s:
        return [str(p) for p in verifymod.verify(s.connection()).problems]


@pytest.mark.parametrize(("sql", "named"), [
    ("UPDATE decisions SET run_evals = X'ffffffff' WHERE id = 2", "decisions id 2: its run does not decode"),
    ("UPDATE decisions SET run_count = 3 WHERE id = 2", "decisions id 2: its run counts 3"),
    ("UPDATE decisions SET run_count = 0 WHERE id = 1", "decisions id 1: its run counts 0"),
    ("UPDATE decisions SET run_count = -5 WHERE id = 1", "decisions id 1: its run counts -5"),
])
def test_an_edited_open_run_is_never_sealed_into_the_chain(tmp_path: Path, sql: str, named: str) -> None:
    """An open run edited behind the agent's back stays named by `verify` after the account's next decision: the
    agent does not chain a run it cannot read back as it wrote it."""
    if not ledger_url(tmp_path / "l.db").startswith("sqlite"):
        pytest.skip("tampers with the SQLite file directly")
    ledger, db = _journal_ledger(tmp_path)
    assert _problems(ledger) == []
    with sqlite3.connect(db) as conn:
        conn.execute(sql)
    assert _problems(ledger)[0].startswith(named)
    with ledger.journal_session() as s:  # the next, different decision ends the run
        queries.record_decision(s, T0 + timedelta(minutes=6), "MTRA1", "p", "sha",
                                Decision("none", None, "something else"), "USD", Decimal("1500"), 0,
                                taken_at=T0 + timedelta(minutes=6), runs={})
        s.commit()
    problems = _problems(ledger)
    ledger.close()
    assert problems and problems[0].startswith(named), problems
