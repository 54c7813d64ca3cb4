"""A simulated MT5 account: a seeded random walk of floating P/L on top of a balance that transfers move."""

from __future__ import annotations

import random
import threading
from decimal import Decimal

from agent import money
from agent.equity.base import Snapshot, login_digits
from agent.timeutil import Clock


class SimulatedSource:
    name = "simulated"

    def __init__(self, clock: Clock, *, seed: int = 1, start_equity: Decimal = Decimal("450"),
                 volatility: Decimal = Decimal("40"), drift: Decimal = Decimal("-5"), currency: str = "USD") -> None:
        self.clock = clock
        self.start_equity = start_equity
        self.volatility = volatility
        self.drift = drift
        self.currency = currency
        self._random = random.Random(seed)
        self._balance: dict[str, Decimal] = {}
        self._profit: dict[str, Decimal] = {}
        self._lock = threading.Lock()

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        digits = login_digits(mt5_login)
        with self._lock:
            balance = self._balance.setdefault(digits, self.start_equity)
            profit = self._profit.get(digits)
            if profit is None:
                profit = Decimal(0)
            else:
                step = Decimal(str(round(self._random.gauss(0, 1), 4))) * self.volatility + self.drift
                profit = money.round_down(profit + step, self.currency)
            self._profit[digits] = profit
            equity = balance + profit
            if equity < 0:  # a stop-out closes the positions: the loss is realised
                self._balance[digits] = balance = Decimal(0)
                self._profit[digits] = profit = Decimal(0)
                equity = Decimal(0)
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
