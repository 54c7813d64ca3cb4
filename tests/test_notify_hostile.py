"""Hostile cases for the notification outbox: secrets that do not fit in a URL, receivers that keep failing, and
whatever a failure writes to the log (never a token, raw or URL-encoded; never a traceback)."""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, quote_plus

import pytest
from conftest import Receiver, ledger_url

from agent import logs
from agent.config import ConfigError
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.ledger.models import OutboxRow
from agent.notify import MAX_BACKOFF, Channel, Notifier, Outbox, channels_from_config, telegram_channel, webhook_channel
from agent.timeutil import ManualClock


def forms(secret: str) -> list[str]:
    """The ways a secret can reach a log line: raw, URL-encoded (both quoters, both hex cases), repr'd."""
    out = {secret, quote(secret), quote(secret, safe=""), quote_plus(secret), quote_plus(secret, safe="/"),
           repr(secret)[1:-1]}
    return sorted(out | {_lower_hex(f) for f in out})


def _lower_hex(text: str) -> str:
    parts = text.split("%")
    return parts[0] + "".join("%" + p[:2].lower() + p[2:] for p in parts[1:])


def assert_hidden(text: str, secret: str) -> None:
    for form in forms(secret):
        assert form not in text, f"{form!r} leaked"


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


class PickyReceiver(Receiver):
    """Answers 500 to any POST whose body mentions `poison`, `status` to the others."""

    def __init__(self, poison: str = "poison") -> None:
        self.poison = poison
        self._status = 200
        super().__init__()

    @property
    def status(self) -> int:
        last = self.posts[-1][1] if self.posts else {}
        return 500 if self.poison in json.dumps(last) else self._status

    @status.setter
    def status(self, value: int) -> None:
        self._status = value


@pytest.fixture(autouse=True)
def own_secrets(monkeypatch):
    """The secrets a test registers do not outlive it (the registry is process-wide)."""
    monkeypatch.setattr(logs, "_secrets", set(logs._secrets))
    monkeypatch.setattr(logs, "_pattern", None)


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger.open(ledger_url(tmp_path / "l.db"))
    yield ledger
    ledger.close()


@pytest.fixture
def clock():
    return ManualClock(datetime(2026, 11, 25, 12, tzinfo=UTC))


@pytest.fixture
def receiver():
    receiver = PickyReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def logged(caplog):
    """caplog, plus what the JSON and the text formatters write for the same records."""
    caplog.set_level(logging.DEBUG)
    json_out, text_out = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(json_out), logging.StreamHandler(text_out)]
    handlers[0].setFormatter(logs.JsonFormatter())
    handlers[1].setFormatter(logs.TextFormatter())
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)

    def everything() -> str:
        return "\n".join([caplog.text, json_out.getvalue(), text_out.getvalue()])

    yield everything
    for handler in handlers:
        root.removeHandler(handler)


def halt(ledger: Ledger, clock: ManualClock, reason: str, kind: str = "operator") -> None:
    with ledger.session() as session:
        queries.add_halt(session, "MTR1", kind, reason, clock.now(), "operator:ann")
        session.commit()


def rows(ledger: Ledger) -> list[OutboxRow]:
    with ledger.session() as session:
        return list(session.query(OutboxRow).order_by(OutboxRow.id).all())


# ---- a token that cannot be part of a URL path is refused, unseen ----

@pytest.mark.parametrize("token", ["123456:AAH secret-tok", "123456:AAH/secret-tok", "123456:AAH?secret=tok",
                                   "123456:AAH#secret-tok", "123456:AAHsécret-tok", "123456:AAH\tsecret-tok",
                                   "123456:AAH\x01secret-tok"])
def test_a_token_that_cannot_be_in_a_url_is_refused_without_being_shown(monkeypatch, receiver, token):
    monkeypatch.setenv("TG_TOKEN", token)
    settings = {"token_env": "TG_TOKEN", "chat_id": "42", "api_url": receiver.url}
    for build in (lambda: telegram_channel(settings), lambda: channels_from_config({"telegram": settings})):
        with pytest.raises(ConfigError) as caught:
            build()
        message = str(caught.value)
        assert "TG_TOKEN" in message and "\n" not in message
        assert_hidden(message, token)
        assert "secret" not in message and "AAH" not in message
    assert receiver.posts == []


def test_a_webhook_url_with_whitespace_is_refused_without_being_shown():
    with pytest.raises(ConfigError) as caught:
        webhook_channel({"url": "https://hooks.example/x?token=abc def-ghi"})
    assert "abc" not in str(caught.value) and "notify.webhook.url" in str(caught.value)


# ---- failures never show the token, nor a traceback ----

TOKEN = "987654:AA+bb=cc%dd&ee!ff~gg"  # every character legal in a path, several of them changed by quote()


@pytest.mark.parametrize("dead", ["http 500", "connection refused"])
def test_a_failing_telegram_delivery_never_logs_the_token(monkeypatch, ledger, clock, receiver, logged, dead):
    monkeypatch.setenv("TG_TOKEN", TOKEN)
    api = receiver.url if dead == "http 500" else f"http://127.0.0.1:{closed_port()}"
    receiver.status = 500
    outbox = Outbox(ledger, [telegram_channel({"token_env": "TG_TOKEN", "chat_id": "42", "api_url": api})], clock)
    outbox.collect()
    halt(ledger, clock, "drawdown")
    outbox.collect()
    for _ in range(3):
        assert outbox.deliver() == 0
        clock.advance(MAX_BACKOFF)
    stored = rows(ledger)
    assert len(stored) == 1 and stored[0].attempts == 3 and stored[0].delivered_at is None
    error = stored[0].last_error or ""
    assert ("HTTP 500" if dead == "http 500" else "unreachable") in error
    text = logged()
    assert "not delivered" in text
    assert "Traceback" not in text
    for secret_holder in (text, error):
        assert_hidden(secret_holder, TOKEN)
    if dead == "http 500":
        assert receiver.posts and receiver.posts[0][0] == f"/bot{TOKEN}/sendMessage"


def test_an_unexpected_exception_from_a_channel_is_one_redacted_line(ledger, clock, receiver, logged):
    secret = "s3cret with spaces & /slashes?#é"
    logs.register_secret(secret)

    def send(payload: dict) -> None:  # what http.client does with a URL it cannot send: the URL in the message
        raise http.client.InvalidURL(f"URL can't contain control characters. '/bot{secret}/x' "
                                     f"(also {quote(secret)} and {quote_plus(secret)} and {secret!r})\nline two")

    outbox = Outbox(ledger, [Channel("telegram", frozenset({"halt"}), send)], clock)
    outbox.collect()
    halt(ledger, clock, "drawdown")
    outbox.collect()
    assert outbox.deliver() == 0
    [stored] = rows(ledger)
    assert stored.attempts == 1 and stored.last_error.startswith("InvalidURL: ")
    assert "\n" not in stored.last_error
    text = logged()
    assert "InvalidURL" in text and "Traceback" not in text
    assert_hidden(text, secret)
    assert_hidden(stored.last_error, secret)


def test_a_failing_notifier_pass_is_one_redacted_line_not_a_traceback_per_second(ledger, clock, caplog, logged):
    secret = "pass word/with?odd#chars"
    logs.register_secret(secret)

    class Broken(Outbox):
        def deliver(self, limit: int = 50) -> int:
            raise RuntimeError(f"cannot open https://x/bot{quote(secret)}/sendMessage")

    outbox = Broken(ledger, [Channel("webhook", frozenset({"halt"}), lambda payload: None)], clock)
    notifier = Notifier(outbox, interval=0.01)
    notifier.start()
    time.sleep(0.3)  # some thirty passes
    notifier.stop()
    failures = [r for r in caplog.records if "notifier pass failed" in r.getMessage()]
    assert 2 <= len(failures) <= 3  # the same error once (not each pass), then the final pass's line
    assert all(r.exc_info is None for r in caplog.records)
    text = logged()
    assert "RuntimeError" in text and "Traceback" not in text
    assert_hidden(text, secret)


# ---- one failing row delays only itself ----

def test_a_permanently_failing_row_does_not_stop_later_rows_nor_other_channels(monkeypatch, ledger, clock, receiver):
    monkeypatch.setenv("TG_TOKEN", "123456:tg-token-value")
    channels = [webhook_channel({"url": receiver.url + "/hook"}),
                telegram_channel({"token_env": "TG_TOKEN", "chat_id": "42", "api_url": receiver.url})]
    outbox = Outbox(ledger, channels, clock)
    outbox.collect()
    halt(ledger, clock, "poison: this one is always refused")
    halt(ledger, clock, "first after")
    halt(ledger, clock, "second after")
    assert outbox.collect() == 6
    assert outbox.deliver() == 4  # both channels: the poisoned row fails, the two after it go out
    delivered = [(r.channel, r.delivered_at is not None) for r in rows(ledger)]
    assert delivered == [("webhook", False), ("telegram", False), ("webhook", True), ("telegram", True),
                         ("webhook", True), ("telegram", True)]
    for _ in range(4):  # it keeps failing; what comes next is still delivered each time
        clock.advance(MAX_BACKOFF)
        halt(ledger, clock, "later")
        outbox.collect()
        assert outbox.deliver() == 2
    poisoned = rows(ledger)[:2]
    assert all(r.attempts == 5 and r.delivered_at is None for r in poisoned)
    hooks = [body["message"].split(": ", 1)[1] for path, body in receiver.posts if path == "/hook"]
    assert hooks[:3] == ["poison: this one is always refused", "first after", "second after"]


def test_a_channel_that_raises_anything_does_not_stop_the_rows_after_it(ledger, clock, receiver):
    hook = webhook_channel({"url": receiver.url + "/hook"})

    def send(payload: dict) -> None:
        if "poison" in payload["message"]:
            raise http.client.InvalidURL("not a DeliveryError")
        hook.send(payload)

    outbox = Outbox(ledger, [Channel("webhook", hook.events, send)], clock)
    outbox.collect()
    halt(ledger, clock, "poison")
    halt(ledger, clock, "fine")
    outbox.collect()
    assert outbox.deliver() == 1
    first, second = rows(ledger)
    assert first.attempts == 1 and first.delivered_at is None and first.next_attempt_at > clock.now()
    assert second.delivered_at is not None


def test_a_dead_channel_does_not_hold_the_other(monkeypatch, ledger, clock, receiver):
    monkeypatch.setenv("TG_TOKEN", "123456:tg-token-value")
    channels = [telegram_channel({"token_env": "TG_TOKEN", "chat_id": "42",
                                  "api_url": f"http://127.0.0.1:{closed_port()}"}),
                webhook_channel({"url": receiver.url + "/hook"})]
    outbox = Outbox(ledger, channels, clock)
    outbox.collect()
    for n in range(3):
        halt(ledger, clock, f"halt {n}")
    outbox.collect()
    assert outbox.deliver() == 3
    assert [b["message"][-6:] for p, b in receiver.posts] == ["halt 0", "halt 1", "halt 2"]
    telegram = [r for r in rows(ledger) if r.channel == "telegram"]
    assert all(r.delivered_at is None for r in telegram)
    # an unreachable receiver costs one attempt per pass; the rest of its rows wait for the next pass, still due
    assert [r.attempts for r in telegram] == [1, 0, 0]
    assert outbox.deliver() == 0 and outbox.deliver() == 0
    assert [r.attempts for r in rows(ledger) if r.channel == "telegram"] == [1, 1, 1]


def test_rows_of_a_channel_no_longer_configured_do_not_take_the_slots(ledger, clock, receiver):
    old = Outbox(ledger, [Channel("telegram", frozenset({"halt"}), lambda payload: None)], clock)
    old.collect()
    for n in range(5):
        halt(ledger, clock, f"old {n}")
    old.collect()  # five telegram rows, never delivered
    outbox = Outbox(ledger, [webhook_channel({"url": receiver.url + "/hook"})], clock)
    outbox.collect()
    halt(ledger, clock, "new")
    outbox.collect()
    assert outbox.deliver(limit=3) == 1


# ---- back-off ----

def test_back_off_grows_and_is_capped(ledger, clock, receiver):
    receiver.status = 500
    outbox = Outbox(ledger, [webhook_channel({"url": receiver.url + "/hook"})], clock)
    outbox.collect()
    halt(ledger, clock, "drawdown")
    outbox.collect()
    delays = []
    for attempt in range(1, 13):
        assert outbox.deliver() == 0
        [row] = rows(ledger)
        assert row.attempts == attempt
        delays.append(row.next_attempt_at - clock.now())
        clock.advance(delays[-1] - timedelta(seconds=1))
        assert outbox.deliver() == 0 and rows(ledger)[0].attempts == attempt  # not due yet: left alone
        clock.advance(timedelta(seconds=1))
    assert delays[0] == timedelta(seconds=10)
    assert all(b == min(MAX_BACKOFF, 2 * a) for a, b in zip(delays, delays[1:], strict=False))
    assert delays[-1] == MAX_BACKOFF == timedelta(hours=1)
    receiver.status = 200
    assert outbox.deliver() == 1


# ---- redact ----

@pytest.mark.parametrize("secret", ["pass word", "a b+c/d?e#f&g=h%i", "tøkén with ünïcode", "x\ty\nz line",
                                    "quote'and\"double"])
def test_redact_hides_a_secret_raw_and_url_encoded(secret):
    logs.register_secret(secret)
    text = " | ".join(forms(secret) + [json.dumps(secret), f"https://h/x?t={quote_plus(secret)}&u=1"])
    redacted = logs.redact(text)
    assert_hidden(redacted, secret)
    assert redacted.count("***") >= len(forms(secret))
    assert logs.redact("nothing here") == "nothing here"


def test_redact_replaces_a_secret_that_contains_another_whole():
    logs.register_secret("inner-secret")
    logs.register_secret("outer-inner-secret-tail")
    assert logs.redact("x outer-inner-secret-tail y inner-secret z") == "x *** y *** z"


def test_the_json_formatter_redacts_message_context_and_is_one_line():
    secret = "ctx secret/with?stuff"
    logs.register_secret(secret)
    record = logging.LogRecord("agent.notify", logging.WARNING, __file__, 1, "failed: %s", (quote(secret),), None)
    with logs.log_context(account=f"MTR1 {secret}"):
        line = logs.JsonFormatter().format(record)
        text = logs.TextFormatter().format(record)
    assert "\n" not in line and json.loads(line)["message"] == "failed: ***"
    assert json.loads(line)["account"] == "MTR1 ***"
    assert_hidden(line, secret)
    assert_hidden(text, secret)


def test_webhook_credentials_are_registered_and_still_sent(receiver):
    password, token = "p@ss w0rd!x", "abc def-123"
    url = (f"http://hookuser:{quote(password, safe='!')}@{receiver.url.removeprefix('http://')}/hook"
           f"?channel=ops&api_token={quote_plus(token)}")
    channel = webhook_channel({"url": url})
    assert logs.redact(f"{password} {quote(password)} {token} {quote(token)} {quote_plus(token)}") == \
        "*** *** *** *** ***"
    assert logs.redact("channel=ops hookuser") == "channel=ops hookuser"
    channel.send({"id": "x-1", "event": "halt", "message": "m"})
    assert receiver.posts[-1][0] == f"/hook?channel=ops&api_token={quote_plus(token)}"


def test_redact_is_safe_while_secrets_are_registered_from_another_thread():
    stop = threading.Event()
    errors: list[BaseException] = []

    def register() -> None:
        n = 0
        while not stop.is_set() and n < 300:
            logs.register_secret(f"thread-secret-{n:06d}")
            n += 1

    thread = threading.Thread(target=register)
    thread.start()
    try:
        for _ in range(200):
            try:
                logs.redact("thread-secret-000000 and more")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
    finally:
        stop.set()
        thread.join()
    assert errors == []


@pytest.mark.parametrize("url", ["http://user:hunter2-secret@host:notaport/hook", "http://[::1/hook?token=abcdefg"])
def test_a_malformed_webhook_url_is_refused_without_being_shown(url):
    with pytest.raises(ConfigError) as caught:
        webhook_channel({"url": url})
    assert "hunter2" not in str(caught.value) and "abcdefg" not in str(caught.value)
