"""A simulated MT5 account: a seeded random walk of closed-trade P/L on a balance that transfers also move.

`pnl_sink`, when given, is told of each step's P/L, so that a simulated broker (the demo's, the soak's) holds
the same MT5 balance as the simulation and a sweep the simulation allows is one the broker allows too.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from decimal import Decimal

from agent import money
from agent.equity.base import Snapshot, login_digits
from agent.timeutil import Clock


class SimulatedSource:
    name = "simulated"

    def __init__(self, clock: Clock, *, seed: int = 1, start_equity: Decimal = Decimal("450"),
                 volatility: Decimal = Decimal("40"), drift: Decimal = Decimal("-5"), currency: str = "USD",
                 pnl_sink: Callable[[str, Decimal], None] | None = None) -> None:
        self.pnl_sink = pnl_sink
        self.clock = clock
        self.start_equity = start_equity
        self.volatility = volatility
        self.drift = drift
        self.currency = currency
        self._random = random.Random(seed)
        self._balance: dict[str, Decimal] = {}
        self._lock = threading.Lock()

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        digits = login_digits(mt5_login)
        with self._lock:
            first = digits not in self._balance
            balance = self._balance.setdefault(digits, self.start_equity)
            step = Decimal(0)
            if not first:
                step = Decimal(str(round(self._random.gauss(0, 1), 4))) * self.volatility + self.drift
                step = max(money.round_down(step, self.currency), -balance)  # a stop-out ends at zero
            balance += step
            self._balance[digits] = balance
            equity = balance
        if step and self.pnl_sink is not None:
            self.pnl_sink(mt5_login, step)
        return Snapshot(login=digits, balance=balance, equity=equity, margin=Decimal(0),
                        margin_free=equity, margin_level=Decimal(0), currency=self.currency, positions=0,
                        connected=True, taken_at=self.clock.now(), source=self.name)

    def apply_transfer(self, mt5_login: str, signed_amount: Decimal) -> None:
        """A confirmed top-up (+) or sweep (-) moves the simulated balance, as it would on the MT5 server."""
        digits = login_digits(mt5_login)
        with self._lock:
            self._balance[digits] = self._balance.get(digits, self.start_equity) + signed_amount

    def close(self) -> None:
        pass
