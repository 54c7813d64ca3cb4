"""The notification outbox: derived from ledger rows, at least once, stable ids, no secret in errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from conftest import Receiver, ledger_url

from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.notify import Outbox, telegram_channel, webhook_channel
from agent.timeutil import ManualClock


@pytest.fixture
def setup(tmp_path, monkeypatch):
    receiver = Receiver()
    monkeypatch.setenv("TG_TOKEN", "123456:tg-s3cret-token")
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    clock = ManualClock(datetime(2026, 11, 25, 12, tzinfo=UTC))
    channels = [webhook_channel({"url": receiver.url + "/hook"}),
                telegram_channel({"token_env": "TG_TOKEN", "chat_id": "42", "api_url": receiver.url,
                                  "events": ["kill_switch"]})]
    outbox = Outbox(ledger, channels, clock)
    outbox.collect()  # sets the cursors
    yield receiver, ledger, clock, outbox
    receiver.server.shutdown()
    ledger.close()


def test_events_are_delivered_with_stable_ids_and_routed_per_channel(setup):
    receiver, ledger, clock, outbox = setup
    with ledger.session() as session:
        queries.add_halt(session, "MTR1", "kill_switch", "5 top-ups with no sweep", clock.now(), "agent")
        queries.add_halt(session, "MTR1", "operator", "review", clock.now(), "operator:ann")
        session.commit()
    assert outbox.collect() == 3  # kill_switch -> webhook + telegram; halt -> webhook only
    assert outbox.collect() == 0  # the cursor moved: nothing twice
    assert outbox.deliver() == 3
    hooks = [body for path, body in receiver.posts if path == "/hook"]
    assert [h["event"] for h in hooks] == ["kill_switch", "halt"]
    assert set(hooks[0]) == {"id", "event", "time", "account", "message", "transfer"}
    assert hooks[0]["time"] == "2026-11-25T12:00:00Z" and hooks[0]["transfer"] is None
    telegram = [(path, body) for path, body in receiver.posts if path.endswith("/sendMessage")]
    assert telegram[0][0] == "/bot123456:tg-s3cret-token/sendMessage" and telegram[0][1]["chat_id"] == "42"
    assert outbox.deliver() == 0


def test_a_dead_receiver_is_retried_later_and_errors_never_show_the_token(setup):
    receiver, ledger, clock, outbox = setup
    receiver.status = 500
    with ledger.session() as session:
        queries.add_halt(session, "MTR1", "kill_switch", "drawdown", clock.now(), "agent")
        session.commit()
    outbox.collect()
    assert outbox.deliver() == 0
    from agent.ledger.models import OutboxRow

    with ledger.session() as session:
        rows = session.query(OutboxRow).all()
    assert all(r.delivered_at is None and r.attempts == 1 for r in rows)
    assert all("tg-s3cret-token" not in (r.last_error or "") for r in rows)
    assert any("HTTP 500" in (r.last_error or "") for r in rows)
    receiver.status = 200
    assert outbox.deliver() == 0  # not due yet: backing off
    clock.advance(timedelta(seconds=11))
    assert outbox.deliver() == 2
    ids = [body["id"] for path, body in receiver.posts if path == "/hook"]
    assert ids[0] == ids[-1]  # the retry carries the same id: a receiver can drop the repeat
