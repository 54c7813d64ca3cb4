"""The `deriv` equity source: the MT5 *balance* from the Deriv API, for set-ups with no terminal at hand.

Deriv exposes no equity: this reading has no floating P/L and no margin. Policies see equity = balance, and
`check`/`plan` warn when a policy relies on the margin level.
"""

from __future__ import annotations

from decimal import Decimal

from agent.broker.deriv import DerivClient
from agent.broker.errors import BrokerError
from agent.equity.base import NoReading, Snapshot, login_digits
from agent.timeutil import Clock

SOURCE_NAME = "deriv (balance only: no floating P/L, no margin)"


class DerivBalanceSource:
    name = "deriv"

    def __init__(self, broker: DerivClient, clock: Clock) -> None:
        self.broker = broker
        self.clock = clock

    def read(self, mt5_login: str, max_age_hint: float | None = None) -> Snapshot:
        try:
            settings = self.broker.mt5_get_settings(mt5_login)
        except BrokerError as exc:
            raise NoReading(f"Deriv mt5_get_settings failed: {exc.code}: {exc.message}") from None
        balance = settings.get("balance")
        currency = settings.get("currency")
        if isinstance(balance, bool) or not isinstance(balance, (int, Decimal)) or not isinstance(currency, str):
            raise NoReading("Deriv mt5_get_settings gave no balance or currency")
        login = str(settings.get("login", mt5_login))
        if login_digits(login) != login_digits(mt5_login):
            raise NoReading(f"Deriv answered for {login}, not {mt5_login}")
        amount = Decimal(balance)
        return Snapshot(login=login_digits(mt5_login), balance=amount, equity=amount, margin=None, margin_free=None,
                        margin_level=None, currency=currency, positions=None, connected=True,
                        taken_at=self.clock.now(), source=SOURCE_NAME)

    def close(self) -> None:
        pass
