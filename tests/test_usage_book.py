"""The UsageBook is the ledger's accounting: queries.usage folds the account's rows through it.

Random ledgers must give the same Usage as the SQL aggregation the engine used before the book (kept here as
the reference, query for query), and small ledgers give what is worked out by hand.
"""

from __future__ import annotations

import sqlite3
import tempfile
from contextlib import closing
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from agent import money
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.ledger.models import EquityPeak, Halt, Transfer
from agent.policy.evaluate import KindUsage, Usage
from agent.policy.usage_book import HaltRecord, TransferRecord, UsageBook
from agent.timeutil import iso

ACCOUNT = "MTR130002534"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
D = Decimal
COUNTED = ("pending", "sent", "confirmed", "unknown")


def sql_usage(session: Session, account: str, now: datetime) -> Usage:
    """The aggregate queries queries.usage ran before the UsageBook existed (the reference)."""
    totals = session.execute(
        select(Transfer.kind, Transfer.state, func.count(Transfer.id),
               func.coalesce(func.sum(Transfer.amount_minor), 0), func.max(Transfer.created_at),
               func.max(Transfer.id), func.min(Transfer.currency))
        .where(Transfer.account == account).group_by(Transfer.kind, Transfer.state)).all()
    currency = next((row[6] for row in totals), "USD")
    week = session.execute(
        select(Transfer.kind, Transfer.created_at, Transfer.amount_minor)
        .where(Transfer.account == account, Transfer.state.in_(COUNTED),
               Transfer.created_at > now - timedelta(days=7)).order_by(Transfer.created_at)).all()
    newest = session.execute(
        select(Transfer.kind, Transfer.state, Transfer.error_code, Transfer.updated_at)
        .where(Transfer.account == account).order_by(Transfer.id.desc()).limit(24)).all()

    def tail(kind: str) -> tuple[int, object]:
        failures = []
        for row in newest:
            if row.kind != kind:
                continue
            if row.state != "failed":
                break
            if row.error_code not in ("NotSent", "NotExecuted"):
                failures.append(row)
        return len(failures), (failures[0] if failures else None)

    def kind_usage(kind: str) -> KindUsage:
        counted = [row for row in totals if row[0] == kind and row[1] in COUNTED]
        failures, last = tail(kind)
        return KindUsage(recent=tuple((at, money.from_minor(m, currency)) for k, at, m in week if k == kind),
                         total_count=sum(int(row[2]) for row in counted),
                         total_amount=money.from_minor(sum(int(row[3]) for row in counted), currency),
                         last_at=max((row[4] for row in counted), default=None), failures=failures,
                         last_failure_at=last.updated_at if last else None,  # type: ignore[attr-defined]
                         last_failure=last.error_code if last else None)  # type: ignore[attr-defined]

    top_up, sweep = kind_usage("top_up"), kind_usage("sweep")
    confirmed_sweeps = [row for row in totals if row[0] == "sweep" and row[1] == "confirmed"]
    since = select(func.count(Transfer.id)).where(Transfer.account == account, Transfer.kind == "top_up",
                                                  Transfer.state.in_(COUNTED))
    if confirmed_sweeps:
        since = since.where(Transfer.id > confirmed_sweeps[0][5])
    resumed = session.execute(select(func.max(Halt.cleared_at)).where(
        Halt.account == account, Halt.kind == "kill_switch", Halt.cleared_at.is_not(None))).scalar_one()
    net = top_up.total_amount - (money.from_minor(int(confirmed_sweeps[0][3]), currency) if confirmed_sweeps
                                 else D(0))
    if resumed is not None:
        since = since.where(Transfer.created_at > resumed)
        flows = dict(session.execute(
            select(Transfer.kind, func.coalesce(func.sum(Transfer.amount_minor), 0))
            .where(Transfer.account == account, Transfer.created_at > resumed,
                   ((Transfer.kind == "top_up") & Transfer.state.in_(COUNTED))
                   | ((Transfer.kind == "sweep") & (Transfer.state == "confirmed")))
            .group_by(Transfer.kind)).all())
        net = money.from_minor(int(flows.get("top_up", 0)) - int(flows.get("sweep", 0)), currency)
    halts = queries.active_halts(session, account)
    open_rows = queries.unresolved(session, account)
    last_moved = session.execute(
        select(Transfer.id, Transfer.updated_at).where(Transfer.account == account, Transfer.state == "confirmed")
        .order_by(Transfer.updated_at.desc(), Transfer.id.desc()).limit(1)).first()
    blocked = None
    if open_rows:
        t = open_rows[0]
        blocked = (f"transfer {t.id} ({t.kind} {money.fmt(queries.amount_of(t), t.currency)}) is {t.state}; "
                   "resolve it with `fund-agent reconcile` or `fund-agent resolve`")
    return Usage(top_up=top_up, sweep=sweep, consecutive_top_ups=int(session.execute(since).scalar_one()),
                 net_top_up=net, peak_equity=queries.peak_equity(session, account),
                 top_up_halt="; ".join(f"{h.kind} halt since {iso(h.created_at)}: {h.reason}" for h in halts) or None,
                 halt="; ".join(f"{h.kind} halt since {iso(h.created_at)}: {h.reason}" for h in halts
                                if h.scope == "all") or None,
                 unresolved=blocked, last_transfer=(int(last_moved[0]), last_moved[1]) if last_moved else None)


_TEMPLATE: list[sqlite3.Connection] = []


def _fresh() -> Engine:
    """A new in-memory copy of a migrated, empty ledger per example (rows are never deleted from a real one)."""
    if not _TEMPLATE:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ledger.db"
            Ledger.open(f"sqlite:///{path}").close()
            template = sqlite3.connect(":memory:", check_same_thread=False)
            with closing(sqlite3.connect(path)) as source:
                source.backup(template)
            _TEMPLATE.append(template)
    copy = sqlite3.connect(":memory:", check_same_thread=False)
    _TEMPLATE[0].backup(copy)
    return create_engine("sqlite://", creator=lambda: copy, poolclass=StaticPool)


transfer = st.tuples(
    st.sampled_from(["top_up", "sweep"]),
    st.sampled_from(["confirmed", "confirmed", "failed", "pending", "sent", "unknown"]),
    st.integers(1, 500_000),  # minor units
    st.integers(1, 3 * 86400),  # seconds after the previous one
    st.integers(0, 600),  # settled this long after it was made
    st.sampled_from([None, "MT5DepositError", "NotSent", "NotExecuted", "Timeout"]),
)
halt = st.tuples(st.sampled_from(["operator", "kill_switch", "unresolved"]), st.sampled_from(["top_up", "all"]),
                 st.integers(0, 40 * 86400), st.one_of(st.none(), st.integers(0, 40 * 86400)))


def _fill(session: Session, transfers: list[tuple], halts: list[tuple], peak: str | None) -> None:
    at = NOW - timedelta(days=30)
    open_seen = False
    for kind, state, minor, gap, settle, code in transfers:
        if state in ("pending", "sent", "unknown"):
            if open_seen:  # the database allows one unresolved transfer per account
                state = "confirmed"
            open_seen = True
        at += timedelta(seconds=gap)
        session.add(Transfer(created_at=at, updated_at=at + timedelta(seconds=settle), account=ACCOUNT,
                             funding="CR4000128", kind=kind, amount_minor=minor, currency="USD", state=state,
                             policy="p", policy_sha256="0" * 64, equity="100.00", reason="r",
                             error_code=code if state == "failed" else None))
    base = NOW - timedelta(days=40)
    for kind, scope, created, cleared in halts:
        session.add(Halt(account=ACCOUNT, kind=kind, scope=scope, reason=f"{kind} test", created_at=base
                         + timedelta(seconds=created), created_by="t",
                         cleared_at=None if cleared is None else base + timedelta(seconds=created + cleared)))
    if peak is not None:
        session.add(EquityPeak(account=ACCOUNT, peak=peak, at=NOW))
    session.commit()


@settings(max_examples=150, deadline=None)
@given(transfers=st.lists(transfer, max_size=40), halts=st.lists(halt, max_size=4),
       peak=st.one_of(st.none(), st.sampled_from(["1500.00", "99.5"])),
       later=st.integers(-10 * 86400, 10 * 86400))
def test_random_ledgers_give_the_same_usage_through_the_book_as_through_sql(transfers, halts, peak, later):
    engine = _fresh()
    with Session(engine) as session:
        _fill(session, transfers, halts, peak)
    now = NOW + timedelta(seconds=later)
    with Session(engine) as session:
        assert queries.usage(session, ACCOUNT, now) == sql_usage(session, ACCOUNT, now)
    engine.dispose()


def _book(*rows: tuple[int, str, str, str, int]) -> UsageBook:
    """(id, kind, state, amount, minutes before NOW) rows."""
    book = UsageBook("USD")
    for ident, kind, state, amount, ago in rows:
        at = NOW - timedelta(minutes=ago)
        book.add_transfer(TransferRecord(ident, kind, state, D(amount), at, at, "MT5DepositError"
                                         if state == "failed" else None))
    return book


def test_known_small_ledger_by_hand():
    # top-ups of 100 (8 days ago: outside the 7 day window), 200, then a sweep of 50, then a top-up of 300 that
    # failed and one of 400 that is still unknown
    book = _book((1, "top_up", "confirmed", "100.00", 8 * 1440), (2, "top_up", "confirmed", "200.00", 120),
                 (3, "sweep", "confirmed", "50.00", 60), (4, "top_up", "failed", "300.00", 30),
                 (5, "top_up", "unknown", "400.00", 10))
    usage = book.usage(NOW)
    assert usage.top_up.total_count == 3 and usage.top_up.total_amount == D("700.00")  # 100 + 200 + 400
    assert usage.top_up.window("per_24h", NOW) == (2, D("600.00"))
    assert usage.top_up.window("per_7d", NOW) == (2, D("600.00"))
    assert usage.top_up.failures == 0  # the newest top-up (5) may have moved money
    assert usage.consecutive_top_ups == 1  # only 5 came after the sweep (4 failed)
    assert usage.net_top_up == D("650.00")  # 700 - 50
    assert usage.unresolved is not None and usage.unresolved.startswith("transfer 5 (top_up 400.00) is unknown")
    assert usage.last_transfer == (3, NOW - timedelta(minutes=60))


def test_failures_back_off_and_a_resume_counts_afresh():
    book = _book((1, "top_up", "confirmed", "100.00", 300), (2, "top_up", "failed", "100.00", 20),
                 (3, "top_up", "failed", "100.00", 10))
    usage = book.usage(NOW)
    assert (usage.top_up.failures, usage.top_up.last_failure) == (2, "MT5DepositError")
    assert usage.top_up.retry_after() == NOW - timedelta(minutes=10) + timedelta(minutes=2)
    book.add_halt(HaltRecord(1, "kill_switch", "top_up", "too many", NOW - timedelta(minutes=5)))
    assert book.usage(NOW).top_up_halt is not None and book.usage(NOW).halt is None
    book.note_equity(D("900"))
    book.clear_halts(NOW - timedelta(minutes=1))
    usage = book.usage(NOW)
    assert usage.top_up_halt is None and usage.peak_equity is None  # the drawdown restarts from the next peak
    assert (usage.consecutive_top_ups, usage.net_top_up) == (0, D("0.00"))  # only what came after the resume


def test_confirming_moves_the_peak_by_the_transfer():
    book = UsageBook("USD")
    book.note_equity(D("1000"))
    book.add_transfer(TransferRecord(1, "sweep", "pending", D("300.00"), NOW, NOW))
    book.set_state(1, "confirmed", NOW)
    assert book.usage(NOW).peak_equity == D("700.00")
