"""Notifications through an outbox: at least once, never lost, never blocking money work.

Each event's notification is staged in the transaction that writes the event (agent.ledger.outbox), so a crash
between a state change and its notification loses nothing and concurrent writers cannot make one be skipped.
The notifier fans staged rows out to the configured channels and a sender thread delivers due rows, each claimed
so that hosts sharing a ledger never send the same row at once; each carries a stable `id` so a receiver can drop
the repeats that at-least-once delivery can cause.
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

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from agent import logs
from agent.config import ConfigError, MissingSecret
from agent.ledger import outbox as staging
from agent.ledger.db import Ledger, upsert
from agent.ledger.models import DecisionRow, Halt, NotifyCursor, OutboxRow, TransferEvent
from agent.ledger.outbox import STAGED
from agent.timeutil import Clock

log = logging.getLogger("agent.notify")

EVENTS = ("transfer_confirmed", "transfer_failed", "transfer_unknown", "halt", "kill_switch",
          "policy_reload_failed", "source_down")
# the per-table cursors of the releases that derived events from ledger ids (caught up once, then removed)
LEGACY_SOURCES: dict[str, Any] = {"transfer_events": TransferEvent, "halts": Halt, "decisions": DecisionRow}
FIRST_START = "outbox"  # notify_cursors row: notifications have been configured on this ledger since then
# staged rows are never delivered: the delivered_at test lets them be found through ix_outbox_due, not by a scan
STAGED_ROWS = (OutboxRow.delivered_at.is_(None), OutboxRow.channel == STAGED)
CLAIM = timedelta(minutes=2)  # a claimed row that no host finished sending is due again after this
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

    # ---- fanning staged events out to the channels ----

    def collect(self, limit: int = 500) -> int:
        """Turn staged events (written with the event, see agent.ledger.outbox) into one row per channel that
        wants them, removing each staged row in the same transaction. Claimed with SKIP LOCKED on PostgreSQL, so
        hosts sharing the ledger each fan out different events and none twice. Returns the rows added."""
        if not self.channels:
            return 0
        with self.ledger.reader() as session:  # the common case, nothing staged, costs no write transaction
            if session.scalars(select(OutboxRow.id).where(*STAGED_ROWS).limit(1)).first() is None \
                    and session.get(NotifyCursor, FIRST_START) is not None and not self._legacy_cursors(session):
                return 0
        added = 0
        with self.ledger.session() as session:
            if session.get(NotifyCursor, FIRST_START) is None:
                added += self._first_start(session)
            query = select(OutboxRow).where(*STAGED_ROWS).order_by(OutboxRow.id).limit(limit)
            if self.ledger.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)
            for staged in session.scalars(query).all():
                body = json.loads(staged.payload)
                added += self._enqueue(session, staged.event_id, staged.event, body)
                session.delete(staged)  # a work item, not ledger evidence: the channel rows replace it
            session.commit()
        return added

    def _first_start(self, session: Session) -> int:
        """The first pass with channels on this ledger: what happened before notifications were configured is not
        news (its staged rows are dropped), except what a ledger written by a release that derived events from
        per-table cursors had not reported yet (caught up once, then those cursors are removed)."""
        legacy = self._legacy_cursors(session)
        added = 0
        if legacy:
            added = self._catch_up(session, legacy)
        else:
            session.execute(delete(OutboxRow).where(*STAGED_ROWS))
        upsert(session, NotifyCursor, {"source": FIRST_START, "last_id": 0}, ["source"])
        return added

    @staticmethod
    def _legacy_cursors(session: Session) -> list[NotifyCursor]:
        return list(session.scalars(select(NotifyCursor).where(NotifyCursor.source.in_(list(LEGACY_SOURCES)))))

    def _catch_up(self, session: Session, cursors: list[NotifyCursor]) -> int:
        added = 0
        for cursor in cursors:
            model = LEGACY_SOURCES[cursor.source]
            rows = session.scalars(select(model).where(model.id > cursor.last_id).order_by(model.id)).all()
            for row in rows:
                for event, body in staging.events_of(session, cursor.source, row):
                    event_id = f"{cursor.source}-{row.id}"
                    # a staged row of the same event (written since the upgrade) fans out to the same rows
                    session.execute(delete(OutboxRow).where(OutboxRow.event_id == event_id,
                                                            OutboxRow.channel == STAGED))
                    added += self._enqueue(session, event_id, event, {"id": event_id, **body})
            session.delete(cursor)
        return added

    def _enqueue(self, session: Session, event_id: str, event: str, body: dict[str, Any]) -> int:
        added = 0
        for channel in self.channels:
            if event not in channel.events:
                continue
            session.add(OutboxRow(event_id=event_id, channel=channel.name, event=event, payload=json.dumps(body),
                                  created_at=self.clock.now(), attempts=0, next_attempt_at=self.clock.now()))
            added += 1
        return added

    # ---- delivery ----

    def _claim(self, names: list[str], limit: int) -> list[tuple[OutboxRow, datetime]]:
        """The due rows, oldest first, claimed: their next attempt is pushed CLAIM ahead in a short transaction
        (SKIP LOCKED on PostgreSQL), so no other host sends them meanwhile and no lock is held while sending. A
        host that dies mid-send leaves them due again after CLAIM: at least once, never by two hosts at once."""
        now = self.clock.now()
        due = (OutboxRow.delivered_at.is_(None), OutboxRow.next_attempt_at <= now, OutboxRow.channel.in_(names))
        with self.ledger.reader() as session:  # the common case, nothing due, costs no write transaction
            if session.scalars(select(OutboxRow.id).where(*due).limit(1)).first() is None:
                return []
        with self.ledger.session() as session:
            query = select(OutboxRow).where(*due).order_by(OutboxRow.id).limit(limit)
            if self.ledger.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = session.scalars(query).all()
            claimed = [(row, row.next_attempt_at) for row in rows]
            for row in rows:
                row.next_attempt_at = now + CLAIM
            session.commit()
        return claimed

    def deliver(self, limit: int = 50) -> int:
        """Send the due rows, oldest first. A failing row only delays itself: it is given its own back-off and
        the rows after it (on its channel and on the others) are still attempted. Only a receiver that cannot be
        reached at all holds the rest of its channel's rows to the next pass, so that one dead receiver costs
        one connect timeout per pass rather than one per row."""
        by_name = {c.name: c for c in self.channels}
        if not by_name:
            return 0
        # rows of a channel no longer configured are left alone (not due here): they must not take the slots
        claimed = self._claim(list(by_name), limit)
        sent = 0
        unreachable: set[str] = set()
        for row, was_due in claimed:
            channel = by_name[row.channel]
            if row.channel in unreachable:
                self._release(row, was_due)
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

    def _release(self, row: OutboxRow, was_due: datetime) -> None:
        """Give back a claimed row that was not attempted: due again at once, as it was before the claim."""
        with self.ledger.session() as session:
            session.execute(update(OutboxRow).where(OutboxRow.id == row.id, OutboxRow.delivered_at.is_(None),
                                                    OutboxRow.next_attempt_at == row.next_attempt_at)
                            .values(next_attempt_at=was_due).execution_options(synchronize_session=False))
            session.commit()


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
