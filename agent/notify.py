"""Notifications through an outbox: at least once, never lost, never blocking money work.

Events are derived from rows the ledger already holds (transfer_events, halts, decisions) past a cursor kept
in the same database, so a crash between a state change and its notification loses nothing: the outbox rows
and the cursor move in one transaction. A sender thread delivers due rows; each carries a stable `id` so a
receiver can drop the repeats that at-least-once delivery can cause.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent import logs
from agent.config import ConfigError, MissingSecret
from agent.ledger import queries
from agent.ledger.db import Ledger
from agent.ledger.models import DecisionRow, Halt, NotifyCursor, OutboxRow, Transfer, TransferEvent
from agent.timeutil import Clock, iso

log = logging.getLogger("agent.notify")

EVENTS = ("transfer_confirmed", "transfer_failed", "transfer_unknown", "halt", "kill_switch",
          "policy_reload_failed", "source_down")
SOURCES: dict[str, Any] = {"transfer_events": TransferEvent, "halts": Halt, "decisions": DecisionRow}
MAX_BACKOFF = timedelta(hours=1)
FIRST_BACKOFF = 5.0  # seconds; doubled per failed attempt (10 s after the first), capped at MAX_BACKOFF
# query parameters of a webhook URL whose values are credentials (matched as substrings: api_key, access_token...)
SECRET_PARAMS = ("token", "key", "secret", "password", "passwd", "sig", "auth")
_UNSAFE_IN_URL = re.compile(r"[^\x21-\x7e]|[/?#]")  # whitespace, control, non-ASCII, or a path/query delimiter


class DeliveryError(Exception):
    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable  # the receiver could not be reached at all (refused, timeout, DNS)


def backoff(attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt: 10 s, 20 s, 40 s ... capped at MAX_BACKOFF."""
    return min(MAX_BACKOFF, timedelta(seconds=FIRST_BACKOFF * 2 ** min(max(attempts, 1), 12)))


def describe(exc: BaseException, limit: int = 500) -> str:
    """One line for a log or the outbox row: the exception class and its message, secrets redacted."""
    text = f"{type(exc).__name__}: {exc}"
    text = re.sub(r"\s+", " ", logs.redact(text)).strip()  # redact first: a secret may hold whitespace
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Channel:
    name: str
    events: frozenset[str]
    send: Callable[[dict[str, Any]], None] = field(repr=False)


def _post_json(url: str, body: dict[str, Any], timeout: float, what: str,
               headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "fund-agent",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - configured URL
            if not 200 <= response.status < 300:
                raise DeliveryError(f"{what} answered HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"{what} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeliveryError(f"{what} unreachable: {type(reason).__name__}", unreachable=True) from None
    except Exception as exc:  # noqa: BLE001 - http.client's InvalidURL, BadStatusLine...: their text may hold the URL
        raise DeliveryError(f"{what} failed: {type(exc).__name__}") from None


def _register_url_secrets(url: str) -> None:
    """The credentials a webhook URL may carry: the userinfo password and token/key/secret query values."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        logs.register_secret(parts.password)
        logs.register_secret(urllib.parse.unquote(parts.password))
    for pair in re.split(r"[&;]", parts.query):
        name, _, value = pair.partition("=")
        if value and any(word in urllib.parse.unquote_plus(name).lower() for word in SECRET_PARAMS):
            logs.register_secret(value)
            logs.register_secret(urllib.parse.unquote_plus(value))


def webhook_channel(settings: dict[str, Any]) -> Channel:
    url = settings.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError("notify.webhook.url must be an http(s) URL")
    try:  # never echo the URL in an error: it may carry a credential
        _register_url_secrets(url)
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError("notify.webhook.url is not a valid URL (host or port)") from None
    if re.search(r"[^\x21-\x7e]", url):
        raise ConfigError("notify.webhook.url must not contain whitespace, control or non-ASCII characters "
                          "(percent-encode them)")
    headers: dict[str, str] = {}
    if parts.username is not None or parts.password is not None:
        # urllib cannot send userinfo itself (it would take it for part of the host): send it as Basic auth
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {credentials}"
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host if port is None else f"{host}:{port}"
        url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    events = _events(settings, "notify.webhook")
    return Channel("webhook", events, lambda payload: _post_json(url, payload, 5.0, "webhook", headers))


def telegram_channel(settings: dict[str, Any]) -> Channel:
    env = str(settings.get("token_env", "TELEGRAM_BOT_TOKEN"))
    token = os.environ.get(env, "").strip()
    if not token:
        raise MissingSecret(env, "Telegram bot token")
    logs.register_secret(token)  # whatever echoes it later (an exception, a URL) prints *** instead
    if _UNSAFE_IN_URL.search(token):  # it goes into the URL path: never show it, name where it came from
        raise ConfigError(f"environment variable {env} does not hold a usable Telegram bot token: it contains "
                          "whitespace, a control or non-ASCII character, '/', '?' or '#'")
    chat_id = str(settings.get("chat_id", "")).strip()
    if not chat_id:
        raise ConfigError("notify.telegram.chat_id is required")
    api = str(settings.get("api_url", "https://api.telegram.org")).rstrip("/")
    events = _events(settings, "notify.telegram")

    def send(payload: dict[str, Any]) -> None:
        text = f"fund-agent {payload['event']} {payload['account'] or ''}: {payload['message']}".strip()
        # the token is part of the URL: never let the URL reach an error message or a log line
        _post_json(f"{api}/bot{token}/sendMessage", {"chat_id": chat_id, "text": text[:4000]}, 5.0, "telegram")

    return Channel("telegram", events, send)


def _events(settings: dict[str, Any], where: str) -> frozenset[str]:
    events = settings.get("events", list(EVENTS))
    if not isinstance(events, list) or any(e not in EVENTS for e in events):
        raise ConfigError(f"{where}.events must be a list of: {', '.join(EVENTS)}")
    return frozenset(events)


def channels_from_config(notify: dict[str, Any]) -> list[Channel]:
    out = []
    unknown = sorted(set(notify) - {"webhook", "telegram"})
    if unknown:
        raise ConfigError(f"notify.{unknown[0]}: unknown channel (webhook or telegram)")
    if notify.get("webhook"):
        out.append(webhook_channel(notify["webhook"]))
    if notify.get("telegram"):
        out.append(telegram_channel(notify["telegram"]))
    return out


class Outbox:
    def __init__(self, ledger: Ledger, channels: list[Channel], clock: Clock) -> None:
        self.ledger = ledger
        self.channels = channels
        self.clock = clock
        self.delivered = 0
        self.failures = 0

    # ---- deriving events from the ledger ----

    def collect(self) -> int:
        """Turn new ledger rows into outbox rows, advancing the cursors in the same transaction."""
        if not self.channels:
            return 0
        added = 0
        with self.ledger.session() as session:
            for source, model in SOURCES.items():
                cursor = session.get(NotifyCursor, source)
                if cursor is None:  # first start: history before notifications were configured is not news
                    top = session.execute(select(func.coalesce(func.max(model.id), 0))).scalar_one()
                    session.add(NotifyCursor(source=source, last_id=int(top)))
                    continue
                rows = session.scalars(select(model).where(model.id > cursor.last_id).order_by(model.id)
                                       .limit(500)).all()
                for row in rows:
                    for event, payload in self._events_of(session, source, row):
                        added += self._enqueue(session, f"{source}-{row.id}", event, payload)
                    cursor.last_id = row.id
            session.commit()
        return added

    def _events_of(self, session: Session, source: str, row: Any) -> list[tuple[str, dict[str, Any]]]:
        if source == "transfer_events":
            if row.state not in ("confirmed", "failed", "unknown"):
                return []
            transfer = session.get(Transfer, row.transfer_id)
            record = queries.transfer_record(transfer) if transfer else None
            message = f"transfer {row.transfer_id} is {row.state}"
            if record:
                message = (f"{record['kind']} {record['amount']} {record['currency']} ({record['funding']} / "
                           f"{record['account']}) {row.state}")
                if record["broker_txn_id"]:
                    message += f", broker txn {record['broker_txn_id']}"
                if row.state != "confirmed" and record["error_code"]:
                    message += f": {record['error_code']}: {record['error_message']}"
            return [(f"transfer_{row.state}", self._payload(f"transfer_{row.state}", row.at,
                                                            transfer.account if transfer else None, message,
                                                            record))]
        if source == "halts":
            event = "kill_switch" if row.kind == "kill_switch" else "halt"
            return [(event, self._payload(event, row.created_at, row.account,
                                          f"{row.kind} halt ({row.scope}) by {row.created_by}: {row.reason}", None))]
        if row.bound_by == "policy_reload":
            return [("policy_reload_failed", self._payload("policy_reload_failed", row.at, row.account, row.reason,
                                                           None))]
        if row.bound_by == "no_reading":
            previous = session.scalars(select(DecisionRow.bound_by).where(
                DecisionRow.account == row.account, DecisionRow.id < row.id).order_by(DecisionRow.id.desc())
                .limit(1)).first()
            if previous != "no_reading":
                return [("source_down", self._payload("source_down", row.at, row.account, row.reason, None))]
        return []

    @staticmethod
    def _payload(event: str, at: datetime, account: str | None, message: str,
                 transfer: dict[str, Any] | None) -> dict[str, Any]:
        return {"event": event, "time": iso(at), "account": account, "message": message, "transfer": transfer}

    def _enqueue(self, session: Session, event_id: str, event: str, payload: dict[str, Any]) -> int:
        added = 0
        for channel in self.channels:
            if event not in channel.events:
                continue
            body = {"id": event_id, **payload}
            session.add(OutboxRow(event_id=event_id, channel=channel.name, event=event, payload=json.dumps(body),
                                  created_at=self.clock.now(), attempts=0, next_attempt_at=self.clock.now()))
            added += 1
        return added

    # ---- delivery ----

    def deliver(self, limit: int = 50) -> int:
        """Send the due rows, oldest first. A failing row only delays itself: it is given its own back-off and
        the rows after it (on its channel and on the others) are still attempted. Only a receiver that cannot be
        reached at all holds the rest of its channel's rows to the next pass, so that one dead receiver costs
        one connect timeout per pass rather than one per row."""
        now = self.clock.now()
        by_name = {c.name: c for c in self.channels}
        if not by_name:
            return 0
        with self.ledger.reader() as session:
            # rows of a channel no longer configured are left alone (not due here): they must not take the slots
            due = session.scalars(select(OutboxRow).where(OutboxRow.delivered_at.is_(None),
                                                          OutboxRow.next_attempt_at <= now,
                                                          OutboxRow.channel.in_(list(by_name)))
                                  .order_by(OutboxRow.id).limit(limit)).all()
        sent = 0
        unreachable: set[str] = set()
        for row in due:
            channel = by_name.get(row.channel)
            if channel is None or row.channel in unreachable:
                continue
            error = None
            try:
                channel.send(json.loads(row.payload))
            except Exception as exc:  # noqa: BLE001 - whatever one row raises must not stop the others
                error = describe(exc)
                if isinstance(exc, DeliveryError) and exc.unreachable:
                    unreachable.add(row.channel)
            with self.ledger.session() as session:
                stored = session.get(OutboxRow, row.id)
                if stored is None:
                    continue
                stored.attempts += 1
                if error is None:
                    stored.delivered_at = self.clock.now()
                    stored.last_error = None
                    sent += 1
                    self.delivered += 1
                else:
                    self.failures += 1
                    stored.last_error = error
                    stored.next_attempt_at = self.clock.now() + backoff(stored.attempts)
                    log.warning("notification %s via %s not delivered (attempt %d): %s", row.event_id,
                                row.channel, stored.attempts, error)
                session.commit()
        return sent


class Notifier:
    """Runs collect + deliver on its own thread, so a slow or dead receiver never delays a transfer."""

    def __init__(self, outbox: Outbox, interval: float = 1.0) -> None:
        self.outbox = outbox
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.outbox.channels:
            return
        self._thread = threading.Thread(target=self._loop, name="notifier", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last_error, last_logged = "", 0.0
        while not self._stop.is_set():
            try:
                self.outbox.collect()
                self.outbox.deliver()
                last_error = ""
            except Exception as exc:  # noqa: BLE001 - the notifier must never die; the outbox keeps the work
                # one redacted line, no traceback; the same error again is repeated once a minute, not each pass
                error = describe(exc)
                if error != last_error or time.monotonic() - last_logged >= 60:
                    log.error("notifier pass failed; retrying: %s", error)
                    last_error, last_logged = error, time.monotonic()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        try:  # a last pass, so that what happened just before a clean stop is not held until the next start
            self.outbox.collect()
            self.outbox.deliver()
        except Exception as exc:  # noqa: BLE001
            log.error("final notifier pass failed: %s", describe(exc))
