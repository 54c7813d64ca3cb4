"""Builds the parts named by a Config: the broker client and the equity source."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from agent import logs
from agent.broker.deriv import READ_SCOPES, TRANSFER_SCOPES, DerivClient
from agent.config import Config, ConfigError
from agent.engine.reconcile import Reconciler
from agent.equity.base import EquitySource
from agent.ledger.db import Ledger
from agent.timeutil import Clock, parse_duration


def make_broker(config: Config, transfers: bool = True) -> DerivClient:
    """Reads the token from the environment (MissingSecret names the variable if it is not set)."""
    scopes = READ_SCOPES + TRANSFER_SCOPES if transfers else READ_SCOPES
    logs.register_secret(config.broker.token())  # whatever echoes it later prints *** instead
    return DerivClient(config.broker.url, config.broker.resolved_app_id(), config.broker.token(),
                       timeout=config.broker.timeout, required_scopes=scopes)


def make_reconciler(config: Config, ledger: Ledger, broker: DerivClient, clock: Clock) -> Reconciler:
    return Reconciler(ledger, broker, clock, settle_window=timedelta(seconds=config.broker.settle_window))


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
