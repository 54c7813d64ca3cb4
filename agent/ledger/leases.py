"""Account leases with fencing tokens: which agent acts on which account when several hosts share one ledger.

- A host claims free or expired leases with `SELECT ... FOR UPDATE SKIP LOCKED` (two hosts never claim the same
  row in one round), renews its own every `renew_every` seconds, and times them with the database's clock
  (PostgreSQL's `clock_timestamp()`), so that the hosts' clocks do not matter.
- Every claim adds one to the account's token. A money write checks, in its own transaction, that the lease row
  still names this holder and token and has not expired (`check`); on PostgreSQL it takes the row `FOR SHARE`,
  so a claim cannot commit between the check and the write. A frozen host that wakes up finds another token and
  writes nothing.
- Locally, a host stops acting on an account as soon as a renewal fails or the time left on the lease (measured
  from the start of the last successful renewal, on the monotonic clock) is shorter than the margin the caller
  needs (the broker timeout): it never starts a transfer it might not finish under its claim.
- Share: when several live hosts manage the same accounts, each claims at most its share of the free ones per
  round (ceil(free / live hosts)), so that hosts started together spread the accounts; a host alone takes all.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from agent.ledger.db import Ledger
from agent.ledger.models import AccountLease, AgentHost

log = logging.getLogger("agent.leases")

DEFAULT_TTL = 15.0  # seconds: how long a lease outlives its last renewal (failover happens within ~this)
DEFAULT_RENEW_EVERY = 3.0
# Hosts' clocks stamp transfers; the intent check allows 1 s between two hosts (tick.HOST_CLOCK_SKEW), so each
# host must be within half of that of the database's clock, or it acts on nothing.
MAX_HOST_SKEW = 0.5
# Deriv closes a connection after 120 s without traffic (DESIGN section 3): a frame that a frozen agent had not yet
# written when it froze can no longer be executed once its connection has been idle that long.
BROKER_IDLE_CLOSE = 120.0


def _boottime() -> float:
    """A clock that keeps counting while the machine is suspended or the VM paused (CLOCK_MONOTONIC stops):
    a lease that ran out during a suspend must look run out on waking."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


LOCAL_CLOCK: Callable[[], float] = _boottime if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic


class ClockSkew(Exception):
    """This host's clock differs from the database's by more than MAX_HOST_SKEW."""


class Fenced(Exception):
    """A money write by a holder whose lease is no longer current: refused, nothing written."""


def db_now(session: Session) -> datetime:
    """The database's clock (PostgreSQL); SQLite is a file on this host, so this host's clock is its clock."""
    if session.get_bind().dialect.name == "postgresql":
        value = session.execute(select(func.clock_timestamp())).scalar_one()
        return value.astimezone(UTC)
    return datetime.now(UTC)


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@dataclass
class LeaseInfo:
    account: str
    holder: str | None
    host: str | None
    token: int
    expires_at: datetime | None
    live: bool


def holders(session: Session, now: datetime | None = None) -> dict[str, LeaseInfo]:
    """Every lease row, for `status` and `/metrics`."""
    now = now or db_now(session)
    rows = session.scalars(select(AccountLease).order_by(AccountLease.account)).all()
    return {r.account: LeaseInfo(r.account, r.holder, r.host, r.token, r.expires_at,
                                 live=r.holder is not None and r.expires_at is not None and r.expires_at > now)
            for r in rows}


class Leases:
    def __init__(self, ledger: Ledger, holder: str, host: str, *, ttl: float = DEFAULT_TTL,
                 renew_every: float = DEFAULT_RENEW_EVERY,
                 monotonic: Callable[[], float] = LOCAL_CLOCK, max_skew: float | None = MAX_HOST_SKEW) -> None:
        if renew_every * 2 >= ttl:
            raise ValueError("leases: renew at least twice per lifetime")
        self.ledger = ledger
        self.holder = holder
        self.host = host
        self.ttl = ttl
        self.renew_every = renew_every
        self._monotonic = monotonic
        self.max_skew = max_skew
        self._lock = threading.Lock()
        self._tokens: dict[str, int] = {}  # account -> token of our current claim
        self._deadline = 0.0  # monotonic time before which every lease in _tokens is certainly still ours
        self.fenced_writes = 0  # money writes refused because the claim was no longer current
        self.claims = 0
        self.losses = 0
        self.lock_wait_seconds = 0.0  # time spent waiting for lease rows (row locks) in sync and check
        self.last_error: str | None = None
        self._stopped = False  # release_all ran: a sync still in progress must not claim anything again

    # ---- local view ----

    def holds(self, account: str, margin: float = 0.0) -> bool:
        """True while this host holds `account` with more than `margin` seconds left."""
        with self._lock:
            return account in self._tokens and self._monotonic() + margin < self._deadline

    def held(self) -> set[str]:
        with self._lock:
            return set(self._tokens) if self._monotonic() < self._deadline else set()

    def time_left(self) -> float:
        with self._lock:
            return max(0.0, self._deadline - self._monotonic())

    # ---- the database side ----

    def sync(self, accounts: Iterable[str], greedy: bool = False) -> tuple[set[str], set[str]]:
        """Heartbeat, renew our leases, claim our share of the free ones among `accounts` (all of them when
        `greedy`: a one-off `run --once`). Returns (claimed, lost). A failure leaves us holding nothing (locally)
        until a later sync succeeds."""
        wanted = sorted(set(accounts))
        started = self._monotonic()
        try:
            claimed, lost, tokens = self._sync(wanted, greedy)
        except Exception as exc:
            with self._lock:
                self._deadline = 0.0
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            log.error("lease renewal failed: %s: acting on no account until it succeeds", type(exc).__name__)
            raise
        with self._lock:
            self._tokens = tokens
            self._deadline = started + self.ttl  # the renewal began no earlier than `started`
        self.last_error = None
        self.claims += len(claimed)
        self.losses += len(lost)
        for account in sorted(claimed):
            log.info("lease on %s claimed (token %s)", account, tokens[account])
        for account in sorted(lost):
            log.warning("lease on %s lost to another agent", account)
        return claimed, lost

    def _sync(self, wanted: list[str], greedy: bool) -> tuple[set[str], set[str], dict[str, int]]:
        with self.ledger.session() as session:
            before_read = time.time()
            now = db_now(session)
            skew = abs(now.timestamp() - (before_read + time.time()) / 2)
            if self.max_skew is not None and skew > self.max_skew:
                raise ClockSkew(f"this host's clock is {skew:.2f} s off the database's (at most {self.max_skew} s): "
                                "run NTP")
            expires = now + timedelta(seconds=self.ttl)
            self._heartbeat(session, now)
            known = set(session.scalars(select(AccountLease.account).where(AccountLease.account.in_(wanted))))
            for account in wanted:
                if account not in known:
                    session.add(AccountLease(account=account, holder=None, host=None, token=0))
            session.flush()
            with self._lock:
                before = dict(self._tokens)
            # Renew what is still ours (holder and token unchanged: nobody claimed it since, even if it lapsed);
            # UPDATE ... RETURNING reads and renews in one step, so a claim by another host cannot fall between.
            renewed = session.execute(update(AccountLease).where(AccountLease.holder == self.holder,
                                                                 AccountLease.account.in_(wanted))
                                      .values(expires_at=expires)
                                      .returning(AccountLease.account, AccountLease.token)
                                      .execution_options(synchronize_session=False)).all()
            tokens = {a: int(t) for a, t in renewed if before.get(a, int(t)) == int(t)}
            lost = {a for a in before if a not in tokens}
            # ours on paper but no longer wanted here (a policy removed): handed back
            session.execute(update(AccountLease).where(AccountLease.holder == self.holder,
                                                       AccountLease.account.not_in(wanted))
                            .values(holder=None, host=None, expires_at=now)
                            .execution_options(synchronize_session=False))
            claimed = self._claim(session, wanted, tokens, now, expires, greedy)
            if self._stopped:
                session.rollback()
                return set(), set(before), {}
            session.commit()
        return claimed, lost, tokens

    def _heartbeat(self, session: Session, now: datetime) -> None:
        row = session.get(AgentHost, self.holder)
        if row is None:
            session.add(AgentHost(holder=self.holder, host=self.host, started_at=now, seen_at=now))
        else:
            row.seen_at = now

    def _claim(self, session: Session, wanted: list[str], tokens: dict[str, int], now: datetime,
               expires: datetime, greedy: bool) -> set[str]:
        live = session.execute(select(func.count()).select_from(AgentHost)
                               .where(AgentHost.seen_at > now - timedelta(seconds=self.ttl))).scalar_one()
        query = (select(AccountLease).where(AccountLease.account.in_(wanted),
                                            (AccountLease.holder.is_(None)) | (AccountLease.expires_at <= now))
                 .order_by(AccountLease.account))
        if _is_postgres(session):
            query = query.with_for_update(skip_locked=True)
        waited = time.monotonic()
        free = list(session.scalars(query))
        self.lock_wait_seconds += time.monotonic() - waited
        share = len(free) if live <= 1 or greedy else math.ceil(len(free) / live)
        claimed = set()
        for row in free[:share]:
            row.token = int(row.token) + 1
            row.holder = self.holder
            row.host = self.host
            row.expires_at = expires
            row.claimed_at = now
            tokens[row.account] = row.token
            claimed.add(row.account)
        return claimed

    def release_all(self) -> None:
        """A clean stop: hand every lease back at once, so another host need not wait for them to expire."""
        with self._lock:
            self._stopped = True
            self._tokens = {}
            self._deadline = 0.0
        try:
            with self.ledger.session() as session:
                now = db_now(session)
                session.execute(update(AccountLease).where(AccountLease.holder == self.holder)
                                .values(holder=None, host=None, expires_at=now)
                                .execution_options(synchronize_session=False))
                host = session.get(AgentHost, self.holder)
                if host is not None:
                    session.delete(host)
                session.commit()
        except Exception as exc:  # noqa: BLE001 - they expire on their own
            log.warning("leases not released (%s): they expire within %.0f s", type(exc).__name__, self.ttl)

    def check(self, session: Session, account: str, margin: float = 0.0) -> None:
        """The fence: in the caller's transaction, prove that our claim on `account` is current (with more than
        `margin` seconds left on the database's clock), or raise Fenced. On PostgreSQL the lease row is held FOR
        SHARE until the caller commits."""
        with self._lock:
            token = self._tokens.get(account)
        query = select(AccountLease).where(AccountLease.account == account)
        if _is_postgres(session):
            query = query.with_for_update(read=True)
        waited = time.monotonic()
        row = session.scalars(query).first()
        self.lock_wait_seconds += time.monotonic() - waited
        now = db_now(session)
        if (token is None or row is None or row.holder != self.holder or int(row.token) != token
                or row.expires_at is None or row.expires_at <= now + timedelta(seconds=margin)):
            self.fenced_writes += 1
            who = f"{row.host or row.holder} (token {row.token})" if row is not None and row.holder else "nobody"
            message = f"{account}: this agent's lease is not current (held by {who}): write refused"
            log.warning("fenced write: %s", message)
            raise Fenced(message)


def foreign_send_possible(ledger: Ledger, owner: str | None, ttl: float = DEFAULT_TTL,
                          idle_close: float = BROKER_IDLE_CLOSE) -> str | None:
    """Whether another agent that made a `sent` transfer might still put its frame on the wire: it may be frozen
    (SIGSTOP, a paused VM) between its last check and the send, so neither its lease nor its heartbeat proves
    it never will. It cannot once its connection has been idle longer than the broker keeps idle connections,
    counted from the end of its last possible lease. Returns why to wait, or None. A clean stop deletes the
    agent's heartbeat row: it waited for its transfers first."""
    if owner is None:
        return None
    with ledger.reader() as session:
        now = db_now(session)
        row = session.get(AgentHost, owner)
        if row is None:
            return None
        safe_at = row.seen_at + timedelta(seconds=ttl + idle_close)
        if now < safe_at:
            return (f"its agent ({row.host}) was last seen {row.seen_at.isoformat()} and might still send it until "
                    f"{safe_at.isoformat()} (lease + the broker's idle close): absence proves nothing before then")
    return None


def lease_live_owner(ledger: Ledger, owner: str | None, ttl: float = DEFAULT_TTL) -> str | None:
    """For a process without leases (an operator's `reconcile` on a shared ledger): the agent that made an
    in-flight transfer is alive while its heartbeat is fresh; then the row is left to it."""
    if owner is None:
        return None
    with ledger.reader() as session:
        now = db_now(session)
        row = session.get(AgentHost, owner)
        if row is not None and row.seen_at > now - timedelta(seconds=ttl):
            return f"the fund-agent on {row.host} ({owner})"
    return None
