"""The outbox with several writers and several senders (runs on both ledgers; the interleavings that SQLite's
single writer cannot produce run on PostgreSQL only): an event's notification is staged in the event's own
transaction, so none is skipped whatever order ids commit in, none is sent for a rolled-back event, and two
hosts sharing a ledger never both send one row."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from conftest import POSTGRES, Receiver, ledger_url
from sqlalchemy import func, select

from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.ledger.models import Halt, NotifyCursor, OutboxRow
from agent.ledger.outbox import STAGED
from agent.notify import Channel, Outbox, webhook_channel
from agent.timeutil import ManualClock

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger.open(ledger_url(tmp_path / "ledger.db"))
    yield ledger
    ledger.close()


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.stop()


def halt(ledger: Ledger, reason: str) -> None:
    with ledger.session() as session:
        queries.add_halt(session, "MTR1", "operator", reason, NOW, "operator:ann")
        session.commit()


def messages(receiver: Receiver) -> list[str]:
    return [body["message"].rsplit(": ", 1)[1] for body in receiver.received]


@pytest.mark.skipif(not POSTGRES, reason="ids from a sequence: on SQLite a new id is always the highest")
def test_an_event_whose_id_commits_after_a_higher_one_is_still_sent(ledger, receiver):
    """Two hosts: B's halt took id 1000 and committed; A's took a lower id earlier and commits now. A cursor over
    ids had moved past A's id and never sent it."""
    outbox = Outbox(ledger, [webhook_channel({"url": receiver.url + "/hook"})], ManualClock(NOW))
    outbox.collect()
    with ledger.session() as session:
        session.add(Halt(id=1000, account="MTR1", kind="operator", scope="top_up", reason="higher id, commits first",
                         created_at=NOW, created_by="operator:bob"))
        session.commit()
    assert outbox.collect() == 1 and outbox.deliver() == 1
    halt(ledger, "lower id, commits last")
    with ledger.reader() as session:
        assert session.scalar(select(func.min(Halt.id))) < 1000
    assert outbox.collect() == 1 and outbox.deliver() == 1
    assert messages(receiver) == ["higher id, commits first", "lower id, commits last"]


def test_an_event_rolled_back_is_never_sent(ledger, receiver):
    outbox = Outbox(ledger, [webhook_channel({"url": receiver.url + "/hook"})], ManualClock(NOW))
    outbox.collect()
    with ledger.session() as session:
        queries.add_halt(session, "MTR1", "operator", "never happened", NOW, "operator:ann")
        session.flush()
        session.rollback()
    halt(ledger, "happened")
    assert outbox.collect() == 1 and outbox.deliver() == 1
    assert messages(receiver) == ["happened"]


def test_history_before_notifications_were_configured_is_not_news(ledger, receiver):
    halt(ledger, "before any channel")
    outbox = Outbox(ledger, [webhook_channel({"url": receiver.url + "/hook"})], ManualClock(NOW))
    assert outbox.collect() == 0
    halt(ledger, "after")
    assert outbox.collect() == 1 and outbox.deliver() == 1
    assert messages(receiver) == ["after"]
    with ledger.reader() as session:  # staged rows are work items: fanned out, they are gone
        assert session.scalar(select(func.count()).where(OutboxRow.channel == STAGED)) == 0


def test_a_ledger_of_the_cursor_release_is_caught_up_once(ledger, receiver):
    with ledger.session() as session:  # the previous release's cursors, one halt behind
        session.add_all([NotifyCursor(source="transfer_events", last_id=0), NotifyCursor(source="halts", last_id=0),
                         NotifyCursor(source="decisions", last_id=0)])
        session.commit()
    halt(ledger, "written by the previous release")
    outbox = Outbox(ledger, [webhook_channel({"url": receiver.url + "/hook"})], ManualClock(NOW))
    assert outbox.collect() == 1  # once, though it is both past the old cursor and staged
    assert outbox.collect() == 0
    halt(ledger, "written by this release")
    assert outbox.collect() == 1 and outbox.deliver() == 2
    assert messages(receiver) == ["written by the previous release", "written by this release"]
    with ledger.reader() as session:
        assert [c.source for c in session.scalars(select(NotifyCursor))] == ["outbox"]


def test_two_hosts_fan_out_and_send_every_event_exactly_once(tmp_path, receiver):
    url = ledger_url(tmp_path / "ledger.db")
    ledgers = [Ledger.open(url), Ledger.open(url)]
    sent: Counter[str] = Counter()
    lock = threading.Lock()

    def send(payload: dict) -> None:
        time.sleep(0.002)  # a receiver that takes a moment: the two senders overlap
        with lock:
            sent[payload["id"]] += 1

    clock = ManualClock(NOW)
    hosts = [Outbox(ledger, [Channel("webhook", frozenset({"halt"}), send)], clock) for ledger in ledgers]
    hosts[0].collect()
    for n in range(60):
        halt(ledgers[n % 2], f"halt {n}")
    errors: list[BaseException] = []

    def work(outbox: Outbox) -> None:
        try:
            for _ in range(40):
                outbox.collect(limit=7)
                outbox.deliver(limit=5)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(outbox,)) for outbox in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(sent) == 60 and set(sent.values()) == {1}, sent.most_common(3)
    with ledgers[0].reader() as session:
        rows = session.scalars(select(OutboxRow)).all()
    assert len(rows) == 60 and all(r.delivered_at is not None and r.attempts == 1 for r in rows)
    for ledger in ledgers:
        ledger.close()
