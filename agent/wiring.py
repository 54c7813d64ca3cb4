"""Builds the parts named by a Config: the broker client and the equity source."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from agent import logs
from agent.broker.base import Broker
from agent.broker.deriv import READ_SCOPES, TRANSFER_SCOPES, DerivClient
from agent.config import Config, ConfigError
from agent.engine.reconcile import LiveOwner, Reconciler
from agent.equity.base import EquitySource
from agent.instance_lock import InstanceLock, LockHeld, describe, holder, new_owner_id
from agent.ledger.db import Ledger, sqlite_path
from agent.ledger.leases import (
    BROKER_IDLE_CLOSE,
    DEFAULT_RENEW_EVERY,
    DEFAULT_TTL,
    Leases,
    foreign_send_possible,
    lease_live_owner,
)
from agent.timeutil import Clock, parse_duration


def make_broker(config: Config, transfers: bool = True) -> DerivClient:
    """Reads the token from the environment (MissingSecret names the variable if it is not set)."""
    scopes = READ_SCOPES + TRANSFER_SCOPES if transfers else READ_SCOPES
    logs.register_secret(config.broker.token())  # whatever echoes it later prints *** instead
    return DerivClient(config.broker.url, config.broker.resolved_app_id(), config.broker.token(),
                       timeout=config.broker.timeout, required_scopes=scopes)


@dataclass
class LedgerAccess:
    """Whether this process holds the ledger's instance lock, and so who owns in-flight transfers.

    The holder of the lock is the only process that creates and sends transfers, so every other owner of a
    pending/sent row is gone. A process without the lock (an operator's `reconcile` beside the service) must
    leave the holder's in-flight rows alone."""

    owner: str
    lock: InstanceLock | None = None
    ledger_path: Path | None = None  # None: not a SQLite file, no lock file (one agent per ledger assumed)

    @property
    def holds_lock(self) -> bool:
        return self.lock is not None

    def live_owner(self, owner: str | None) -> str | None:
        if self.lock is not None or self.ledger_path is None:
            return None
        info = holder(self.ledger_path)  # read now: the holder writes it before it creates any transfer
        if info is None or owner is None or info.get("owner") in (None, owner):
            return f"the running fund-agent ({describe(info) or 'it holds the ledger lock'})"
        return None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def take_ledger(config: Config, command: str, *, required: bool) -> LedgerAccess:
    """Take the ledger's instance lock for `command`. With `required`, a lock held by another process is a
    LockHeld error naming it; otherwise the command goes on without the lock, leaving in-flight rows alone."""
    path = sqlite_path(config.database)
    if path is None:
        return LedgerAccess(owner=new_owner_id())
    lock = InstanceLock(path, command)
    try:
        lock.acquire()
    except LockHeld:
        if required:
            raise
        return LedgerAccess(owner=new_owner_id(), ledger_path=path)
    return LedgerAccess(owner=lock.owner, lock=lock, ledger_path=path)


def host_id(config: Config) -> str:
    return getattr(config, "host_id", None) or socket.gethostname()


def make_leases(config: Config, ledger: Ledger, owner: str) -> Leases:
    """Leases of a shared ledger. Their lifetime must exceed a transfer's longest wait (the broker timeout) plus
    a renewal period, or no account would ever have time enough left to start one."""
    ttl, renew = lease_timing(config)
    return Leases(ledger, owner, host_id(config), ttl=ttl, renew_every=renew)


def lease_timing(config: Config) -> tuple[float, float]:
    """(ttl, renew_every) in seconds; FUND_AGENT_LEASE_TTL / FUND_AGENT_LEASE_RENEW override them (tests and
    fast failover set-ups: a shorter ttl means a faster takeover and more renewals)."""
    renew = float(os.environ.get("FUND_AGENT_LEASE_RENEW", "") or DEFAULT_RENEW_EVERY)
    ttl = float(os.environ.get("FUND_AGENT_LEASE_TTL", "") or max(DEFAULT_TTL, 2 * config.broker.timeout + 3 * renew))
    return ttl, renew


def live_owner_check(config: Config, ledger: Ledger, access: LedgerAccess) -> LiveOwner:
    """Who holds an in-flight transfer, for a process that does not (an operator's `reconcile` or `resolve`):
    on a SQLite file the holder of its lock; on a shared ledger an agent whose heartbeat is fresh."""
    if access.ledger_path is not None or access.holds_lock:
        return access.live_owner
    ttl = lease_timing(config)[0]

    def shared(owner: str | None) -> str | None:
        return lease_live_owner(ledger, owner, ttl)

    return shared


def make_reconciler(config: Config, ledger: Ledger, broker: Broker, clock: Clock,
                    access: LedgerAccess | None = None, leases: Leases | None = None) -> Reconciler:
    live_owner = live_owner_check(config, ledger, access) if access is not None and leases is None else None
    foreign_send = None
    if sqlite_path(config.database) is None:  # a shared ledger: another agent may be frozen, not gone
        ttl, idle_close = lease_timing(config)[0], broker_idle_close()

        def foreign_send(owner: str | None) -> str | None:
            return foreign_send_possible(ledger, owner, ttl, idle_close)

    return Reconciler(ledger, broker, clock, settle_window=timedelta(seconds=config.broker.settle_window),
                      owner=access.owner if access else None, live_owner=live_owner,
                      fence=leases.check if leases is not None else None,
                      lease_holds=leases.holds if leases is not None else None, foreign_send=foreign_send)


def broker_idle_close() -> float:
    """How long the broker keeps an idle connection (Deriv: 120 s); FUND_AGENT_BROKER_IDLE_CLOSE for a test
    server configured otherwise."""
    return float(os.environ.get("FUND_AGENT_BROKER_IDLE_CLOSE", "") or BROKER_IDLE_CLOSE)


def make_source(config: Config, clock: Clock, broker: DerivClient | None = None) -> EquitySource:
    eq = config.equity
    if eq.source == "ea-file":
        from agent.equity.ea_file import EaFileSource

        assert eq.dir is not None
        return EaFileSource(eq.dir, clock)
    if eq.source == "simulated":
        from agent.equity.simulated import SimulatedSource

        opts = eq.options
        return SimulatedSource(clock, seed=int(opts.get("seed", 1)),
                               start_equity=Decimal(str(opts.get("start_equity", "450"))),
                               volatility=Decimal(str(opts.get("volatility", "40"))),
                               drift=Decimal(str(opts.get("drift", "0"))))
    if eq.source == "deriv":
        from agent.equity.deriv import DerivBalanceSource

        if broker is None:
            raise ConfigError("the deriv equity source needs the broker connection")
        return DerivBalanceSource(broker, clock)
    if eq.source == "mt5":
        from agent.equity.mt5 import Mt5Source, probe_command_from_options, terminals_from_options

        opts = eq.options
        deadline = float(parse_duration(str(opts.get("probe_timeout", "10s"))).total_seconds())
        return Mt5Source(clock, terminals_from_options(opts), probe_command_from_options(opts), deadline=deadline)
    raise ConfigError(f"equity.source {eq.source!r} is unknown")
