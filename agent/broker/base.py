"""The broker interface the engine depends on.

Why an interface and not DerivClient directly:
- Deriv calls the MT5 transfer calls (`mt5_deposit`, `mt5_withdrawal`) of its WebSocket API v3 legacy; when it
  replaces them, another implementation must slot in without touching the engine, the reconciler or the
  equity sources;
- the tests need a broker without a socket: `agent.broker.memory.MemoryBroker` keeps the same business rules in
  memory (fast concurrency and property tests), while `agent.broker.fake.FakeDeriv` stays the wire-level
  stand-in that DerivClient itself is tested against.

Every implementation keeps DerivClient's contract: amounts are exact Decimals (never floats); errors are
`agent.broker.errors` exceptions whose class and code say whether money may have moved (NotSent and the
NOTHING_MOVED codes: nothing moved; LostReply and BadReply: unknown, settle it from the statement); statement
rows have Deriv's shape (action_type, amount, balance_after, transaction_id, transaction_time, app_id,
from/to {"loginid"}, longcode), newest first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

from agent.broker.errors import NotSent

# The last word before a transfer's frame leaves: a callable that returns a reason not to send (e.g. this host's
# lease on the account is about to run out), checked by every implementation immediately before it hands the
# request to the wire. Set per thread/context by the engine around one transfer.
_send_guard: ContextVar[Callable[[], str | None] | None] = ContextVar("send_guard", default=None)


@contextmanager
def send_guard(guard: Callable[[], str | None] | None) -> Iterator[None]:
    token = _send_guard.set(guard)
    try:
        yield
    finally:
        _send_guard.reset(token)


def check_send_guard(call: str) -> None:
    """Raise NotSent (nothing moved: the frame never left) when the current guard says not to send."""
    guard = _send_guard.get()
    if guard is None:
        return
    reason = guard()
    if reason:
        raise NotSent(f"{call} not sent: {reason}")


@runtime_checkable
class Broker(Protocol):
    app_id: int  # the app_id that appears on the broker's statement rows of the transfers this client makes

    @property
    def connected(self) -> bool:
        """True while a usable (authorized) connection is open."""
        ...

    def connect(self) -> object:
        """Open and authorize, or raise a BrokerError. Calls connect on their own when needed."""
        ...

    def close(self) -> None: ...

    def balance(self, loginid: str | None = None) -> tuple[Decimal, str]:
        """(balance, currency) of a Deriv (funding) account; None = the authorized account."""
        ...

    def mt5_deposit(self, from_binary: str, to_mt5: str, amount: Decimal, timeout: float | None = None) -> int:
        """Top-up: funding -> MT5. Returns the broker's binary_transaction_id."""
        ...

    def mt5_withdrawal(self, from_mt5: str, to_binary: str, amount: Decimal, timeout: float | None = None) -> int:
        """Sweep: MT5 -> funding. Returns the broker's binary_transaction_id."""
        ...

    def statement(self, date_from: int, date_to: int, limit: int = 999, offset: int = 0,
                  loginid: str | None = None, action_type: str | None = "transfer") -> list[dict[str, Any]]:
        """Statement rows with date_from <= transaction_time <= date_to (epoch seconds), newest first."""
        ...

    def website_status(self) -> dict[str, Any]:
        """Holds currencies_config: per currency, fractional_digits and transfer_between_accounts.limits_mt5."""
        ...

    def get_limits(self) -> dict[str, Any]:
        """Holds daily_transfers.mt5: allowed and available MT5 transfers this UTC day."""
        ...

    def mt5_get_settings(self, login: str) -> dict[str, Any]:
        """Holds at least login, balance and currency of an MT5 account."""
        ...


STATEMENT_PAGE = 999  # Deriv's cap on a statement request's `limit`


def statement_all(broker: Broker, date_from: datetime, date_to: datetime, loginid: str) -> list[dict[str, Any]]:
    """Every transfer row of `loginid`'s statement in [date_from, date_to], newest first, read page by page."""
    rows: list[dict[str, Any]] = []
    offset = 0
    while True:
        page = broker.statement(int(date_from.timestamp()), int(date_to.timestamp()), limit=STATEMENT_PAGE,
                                offset=offset, loginid=loginid)
        rows.extend(page)
        if len(page) < STATEMENT_PAGE:
            return rows
        offset += len(page)
