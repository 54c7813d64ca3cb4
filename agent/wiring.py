"""Builds the parts named by a Config: the broker client and the equity source."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from agent import logs
from agent.broker.base import Broker
from agent.broker.deriv import READ_SCOPES, TRANSFER_SCOPES, DerivClient
from agent.config import Config, ConfigError
from agent.engine.reconcile import Reconciler
from agent.equity.base import EquitySource
from agent.instance_lock import InstanceLock, LockHeld, describe, holder, new_owner_id
from agent.ledger.db import Ledger, sqlite_path
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


def make_reconciler(config: Config, ledger: Ledger, broker: Broker, clock: Clock,
                    access: LedgerAccess | None = None) -> Reconciler:
    return Reconciler(ledger, broker, clock, settle_window=timedelta(seconds=config.broker.settle_window),
                      owner=access.owner if access else None, live_owner=access.live_owner if access else None)


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
