"""An in-memory broker with Deriv's MT5 transfer rules: for fast concurrency tests and property tests.

What it models (the same rules as `agent.broker.fake.FakeDeriv`):
- Deriv (funding) accounts and MT5 accounts with exact Decimal balances;
- two-leg transfers, as Deriv runs them: `mt5_deposit` debits the funding account and writes its statement row
  at once, the MT5 credit lands `deposit_credit_delay` later; `mt5_withdrawal` debits the MT5 account at once,
  the funding credit and its statement row land `withdrawal_credit_delay` later. Due legs are applied at the
  start of every public method and by `settle_due()`, in order of their due time, stamped with that time;
- per-transfer min/max, the currency's decimal places, a daily count of MT5 transfers per funding account per
  UTC day (both kinds together), NoMoney, CurrencyShouldMatch, PermissionDenied, with Deriv's error codes;
- statement rows with Deriv's shape (transaction_id, transaction_time, app_id, from/to, longcode), newest
  first, with date range, action_type filter and offset/limit paging;
- one-shot injected faults per call name (see `inject`), and a `latency` slept outside the lock so concurrent
  transfer calls interleave.

What it does not model: WebSocket framing, req_id matching, reconnects with backoff, tokens and scopes, and
Deriv's JSON schemas (loginid patterns are not checked). Those are DerivClient's job and are tested against
fake.py. `timeout` is accepted and ignored: a slow reply is injected with the "late_apply" fault instead.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NoReturn, TypeVar

from agent import money
from agent.broker.base import check_send_guard
from agent.broker.deriv import Session
from agent.broker.errors import BadReply, BrokerError, LostReply, NotSent
from agent.broker.fake import Account  # the same account record as the Deriv-protocol server
from agent.timeutil import Clock

T = TypeVar("T")

CALLS = ("connect", "balance", "mt5_deposit", "mt5_withdrawal", "statement", "website_status", "get_limits",
         "mt5_get_settings")
MODES = ("error", "error_after_apply", "lost_before_apply", "lost_after_apply", "late_apply", "malformed",
         "not_sent")
ACTION_TYPES = ("buy", "sell", "deposit", "withdrawal", "escrow", "adjustment", "virtual_credit", "transfer")
MAX_EPOCH = 9_999_999_999


@dataclass
class Fault:
    """One injected fault, used by the next call named `call` (one-shot).

    mode: error (raise BrokerError(code), nothing applied) | error_after_apply (apply, raise BrokerError(code)) |
    lost_before_apply (raise LostReply ConnectionClosed, nothing applied) | lost_after_apply (apply, raise
    LostReply ConnectionClosed) | late_apply (raise LostReply Timeout now, apply the whole request `delay` later,
    with every check made then) | malformed (apply, raise BadReply) | not_sent (raise NotSent, nothing applied).
    "Apply" means what the request would have done, including being refused by the broker's rules. For calls
    that move nothing (balance, statement, ...) every mode just raises its error. The ConnectionClosed modes
    and not_sent also drop the connection; the next call reconnects. "connect" takes error and not_sent.
    """

    call: str
    mode: str
    code: str = "WrongResponse"
    delay: timedelta = timedelta(0)


@dataclass(order=True)
class _Leg:
    due: datetime
    seq: int
    apply: Callable[[datetime], None] = field(compare=False)


class MemoryBroker:
    """Implements agent.broker.base.Broker in memory. Thread-safe: one lock around all state."""

    def __init__(self, clock: Clock | None = None, *, app_id: int = 1089, min_transfer: Decimal = Decimal(1),
                 max_transfer: Decimal = Decimal(2500), daily_transfers: int = 6,
                 deposit_credit_delay: timedelta = timedelta(0), withdrawal_credit_delay: timedelta = timedelta(0),
                 latency: float = 0.0) -> None:
        self.clock = clock or Clock()
        self.app_id = app_id
        self.min_transfer = min_transfer
        self.max_transfer = max_transfer
        self.daily_transfers = daily_transfers
        self.deposit_credit_delay = deposit_credit_delay
        self.withdrawal_credit_delay = withdrawal_credit_delay
        self.latency = latency  # real seconds slept in each transfer call that leaves, before the broker acts
        self.faults: deque[Fault] = deque()
        # (call, from, to, amount) of every transfer call that reached the broker, refused ones included
        # (a not_sent fault or a float amount never leaves, so it is not here)
        self.sent: list[tuple[str, str, str, Decimal]] = []
        self.session: Session | None = None
        self._accounts: dict[str, Account] = {}
        self._statement: dict[str, list[dict[str, Any]]] = {}  # funding loginid -> rows, oldest first
        self._by_day: dict[tuple[str, str], int] = {}  # (funding loginid, UTC date) -> MT5 transfers
        self._legs: list[_Leg] = []  # a heap by (due, seq)
        self._seq = itertools.count()
        self._next_txn = 1000
        self._connected = False
        self._lock = threading.Lock()

    # ---- set-up and inspection (tests) ----

    def add_account(self, loginid: str, currency: str, balance: Decimal | str, mt5: bool = False) -> None:
        with self._lock:
            self._accounts[loginid] = Account(loginid, currency, money.parse_amount(balance, currency), mt5)

    def inject(self, call: str, mode: str, code: str = "WrongResponse", delay: timedelta = timedelta(0)) -> None:
        if call not in CALLS:
            raise ValueError(f"unknown call {call!r}; one of {', '.join(CALLS)}")
        if mode not in MODES or (call == "connect" and mode not in ("error", "not_sent")):
            raise ValueError(f"mode {mode!r} does not apply to {call}")
        with self._lock:
            self.faults.append(Fault(call, mode, code, delay))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def settle_due(self) -> int:
        """Apply every pending leg whose time has come; returns how many were applied."""
        with self._lock:
            return self._settle()

    def in_flight(self) -> int:
        """Legs not applied yet (second legs of transfers, and late_apply requests), after applying due ones."""
        with self._lock:
            self._settle()
            return len(self._legs)

    def balance_of(self, loginid: str) -> Decimal:
        """Any account's balance, due legs applied first. KeyError for an unknown account."""
        with self._lock:
            self._settle()
            return self._accounts[loginid].balance

    def transfers(self, loginid: str) -> list[dict[str, Any]]:
        """The account's statement rows as visible now, oldest first (MT5 and unknown accounts: none)."""
        with self._lock:
            self._settle()
            return [_copy(row) for row in self._statement.get(loginid, [])]

    def adjust(self, loginid: str, delta: Decimal | str) -> None:
        """Trading P/L on an MT5 account. The balance stops at zero (negative balance protection)."""
        with self._lock:
            self._settle()
            account = self._accounts[loginid]
            account.balance = max(Decimal(0), account.balance + money.parse_amount(delta, account.currency))

    # ---- connection ----

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self) -> Session:
        with self._lock:
            return self._connect()

    def close(self) -> None:
        with self._lock:
            self._drop()

    # ---- the Broker calls ----

    def balance(self, loginid: str | None = None) -> tuple[Decimal, str]:
        def body() -> tuple[Decimal, str]:
            account = self._funding(loginid)
            return account.balance, account.currency
        return self._read("balance", body)

    def mt5_deposit(self, from_binary: str, to_mt5: str, amount: Decimal, timeout: float | None = None) -> int:
        """Top-up. Returns the broker's binary_transaction_id."""
        return self._transfer("mt5_deposit", from_binary, to_mt5, amount, deposit=True)

    def mt5_withdrawal(self, from_mt5: str, to_binary: str, amount: Decimal, timeout: float | None = None) -> int:
        """Sweep. Returns the broker's binary_transaction_id."""
        return self._transfer("mt5_withdrawal", from_mt5, to_binary, amount, deposit=False)

    def statement(self, date_from: int, date_to: int, limit: int = 999, offset: int = 0,
                  loginid: str | None = None, action_type: str | None = "transfer") -> list[dict[str, Any]]:
        """Rows with date_from <= transaction_time <= date_to, newest first. Arguments Deriv's send schema
        refuses raise NotSent, as DerivClient does before sending."""
        for name, value, high in (("date_from", date_from, MAX_EPOCH), ("date_to", date_to, MAX_EPOCH),
                                  ("limit", limit, 999), ("offset", offset, None)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (high and value > high):
                raise NotSent(f"statement request fails Deriv's send schema: {name}")
        if action_type is not None and action_type not in ACTION_TYPES:
            raise NotSent("statement request fails Deriv's send schema: action_type")

        def body() -> list[dict[str, Any]]:
            account = self._funding(loginid)
            rows = [r for r in reversed(self._statement.get(account.loginid, []))
                    if date_from <= r["transaction_time"] <= date_to
                    and (action_type is None or r["action_type"] == action_type)]
            return [_copy(r) for r in rows[offset:offset + limit]]
        return self._read("statement", body)

    def website_status(self) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            config = {}
            for code in sorted({a.currency for a in self._accounts.values()} | {"USD"}):
                limits = {"min": self.min_transfer, "max": self.max_transfer}
                config[code] = {"fractional_digits": money.places(code),
                                "transfer_between_accounts": {"fees": {}, "limits": dict(limits),
                                                              "limits_mt5": dict(limits)}}
            return {"currencies_config": config, "site_status": "up"}
        return self._read("website_status", body)

    def get_limits(self) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            account = self._funding(None)
            used = self._by_day.get(self._day_key(account.loginid, self.clock.now()), 0)
            return {"daily_transfers": {"mt5": {"allowed": self.daily_transfers,
                                                "available": max(0, self.daily_transfers - used)}}}
        return self._read("get_limits", body)

    def mt5_get_settings(self, login: str) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            account = self._accounts.get(login)
            if account is None or not account.mt5:
                raise BrokerError("MT5AccountInaccessible", "MT5 account is not available.")
            return {"login": account.loginid, "balance": account.balance, "currency": account.currency}
        return self._read("mt5_get_settings", body)

    # ---- internals: every method below runs with self._lock held ----

    def _connect(self) -> Session:
        if self._connected and self.session is not None:
            return self.session
        fault = self._take_fault("connect")
        if fault is not None:
            if fault.mode == "not_sent":
                raise NotSent("cannot connect to the broker (injected)")
            raise BrokerError(fault.code, "Injected fault on connect.")
        funding = [a for a in self._accounts.values() if not a.mt5]
        first = funding[0] if funding else None
        self.session = Session(loginid=first.loginid if first else "", currency=first.currency if first else "",
                               scopes=("read", "payments"), account_list=tuple(a.loginid for a in funding))
        self._connected = True
        return self.session

    def _auto_connect(self) -> None:
        try:
            self._connect()
        except BrokerError as exc:
            exc.before_send = True  # as DerivClient.call: the request itself never left, whatever the code
            raise

    def _drop(self) -> None:
        self._connected = False
        self.session = None

    def _take_fault(self, call: str) -> Fault | None:
        for fault in self.faults:
            if fault.call == call:
                self.faults.remove(fault)
                return fault
        return None

    def _settle(self) -> int:
        now = self.clock.now()
        applied = 0
        while self._legs and self._legs[0].due <= now:
            leg = heapq.heappop(self._legs)
            leg.apply(leg.due)
            applied += 1
        return applied

    def _schedule(self, due: datetime, apply: Callable[[datetime], None]) -> None:
        heapq.heappush(self._legs, _Leg(due, next(self._seq), apply))

    def _funding(self, loginid: str | None) -> Account:
        if loginid is None:
            loginid = next((a.loginid for a in self._accounts.values() if not a.mt5), None)
        account = self._accounts.get(loginid) if loginid is not None else None
        if account is None or account.mt5:
            raise BrokerError("PermissionDenied", "Permission denied.")
        return account

    @staticmethod
    def _day_key(loginid: str, at: datetime) -> tuple[str, str]:
        return loginid, at.astimezone(UTC).date().isoformat()

    def _read(self, call: str, body: Callable[[], T]) -> T:
        with self._lock:
            self._auto_connect()
            self._settle()
            fault = self._take_fault(call)
            if fault is not None:
                self._raise_fault(call, fault)
            return body()

    def _raise_fault(self, call: str, fault: Fault) -> NoReturn:
        if fault.mode in ("error", "error_after_apply"):
            raise BrokerError(fault.code, f"Injected fault on {call}.")
        if fault.mode in ("lost_before_apply", "lost_after_apply"):
            self._drop()
            raise LostReply("ConnectionClosed", f"the connection closed before the reply to {call} (injected)")
        if fault.mode == "late_apply":
            raise LostReply("Timeout", f"no reply to {call} (injected)")
        if fault.mode == "malformed":
            raise BadReply(f"{call} reply fails Deriv's receive schema (injected)")
        self._drop()
        raise NotSent(f"sending {call} failed (injected)")

    def _transfer(self, call: str, source: str, target: str, amount: Decimal, deposit: bool) -> int:
        if isinstance(amount, (bool, float)):
            # DerivClient refuses to put a binary float on the wire: nothing is sent
            raise money.MoneyError("refusing to put a binary float on the wire")
        binary_id, mt5_id = (source, target) if deposit else (target, source)
        with self._lock:
            self._auto_connect()
            self._settle()
            check_send_guard(call)
            fault = self._take_fault(call)
            if fault is not None and fault.mode == "not_sent":
                self._raise_fault(call, fault)
            self.sent.append((call, source, target, Decimal(amount)))
        if self.latency > 0:
            time.sleep(self.latency)  # outside the lock: concurrent callers interleave here
        with self._lock:
            self._settle()
            if fault is None:
                return self._execute(call, binary_id, mt5_id, amount, self.clock.now())
            if fault.mode in ("error", "lost_before_apply"):
                self._raise_fault(call, fault)
            if fault.mode == "late_apply":
                def apply_later(at: datetime) -> None:
                    try:
                        self._execute(call, binary_id, mt5_id, amount, at)
                    except BrokerError:
                        pass  # refused when it arrived: nothing moved, and nobody is waiting for the reply
                self._schedule(self.clock.now() + fault.delay, apply_later)
                self._raise_fault(call, fault)
            try:
                self._execute(call, binary_id, mt5_id, amount, self.clock.now())
            except BrokerError:
                pass  # the broker refused it, but the caller never learns that: the fault's reply is what it sees
            self._raise_fault(call, fault)

    def _execute(self, call: str, binary_id: str, mt5_id: str, amount: Decimal, at: datetime) -> int:
        """The broker's rules, then the first leg now and the second leg scheduled. Raises BrokerError."""
        deposit = call == "mt5_deposit"
        error_code = "MT5DepositError" if deposit else "MT5WithdrawalError"
        binary = self._accounts.get(binary_id)
        mt5 = self._accounts.get(mt5_id)
        if binary is None or binary.mt5:
            raise BrokerError("PermissionDenied", "Permission denied.")
        if mt5 is None or not mt5.mt5:
            raise BrokerError(error_code, "MT5 account is not available.")
        if mt5.currency != binary.currency:
            raise BrokerError("CurrencyShouldMatch", "Currency provided is different from account currency.")
        try:
            value = money.parse_amount(amount, binary.currency)
        except money.MoneyError:
            raise BrokerError(error_code, f"Invalid amount. Amount provided can not have more than "
                                          f"{money.places(binary.currency)} decimal places.") from None
        if value < self.min_transfer or value > self.max_transfer:
            raise BrokerError(error_code, f"The amount must be between {self.min_transfer} and "
                                          f"{self.max_transfer} {binary.currency}.")
        key = self._day_key(binary.loginid, at)
        if self._by_day.get(key, 0) >= self.daily_transfers:
            raise BrokerError("MaximumTransfers", f"You can only perform up to {self.daily_transfers} transfers a "
                                                  "day. Please try again tomorrow.")
        source = binary if deposit else mt5
        if source.balance < value:
            raise BrokerError("NoMoney" if deposit else error_code,
                              "Your account balance is insufficient for this transaction.")
        self._by_day[key] = self._by_day.get(key, 0) + 1
        self._next_txn += 1
        txn = self._next_txn
        source.balance -= value
        if deposit:
            self._write_row(binary, mt5, -value, txn, at)
            self._credit(mt5, value, at + self.deposit_credit_delay, None)
        else:
            self._credit(binary, value, at + self.withdrawal_credit_delay, (mt5, txn))
        return txn

    def _credit(self, account: Account, value: Decimal, due: datetime, row: tuple[Account, int] | None) -> None:
        """The second leg: credit `account` at `due`, with its statement row when it is a funding account."""
        def land(at: datetime) -> None:
            account.balance += value
            if row is not None:
                self._write_row(account, row[0], value, row[1], at)
        self._schedule(due, land)  # even when due now: applied, in due order, before anyone can look

    def _write_row(self, binary: Account, mt5: Account, amount: Decimal, txn: int, at: datetime) -> None:
        deposit = amount < 0
        digits = "".join(ch for ch in mt5.loginid if ch.isdigit())
        self._statement.setdefault(binary.loginid, []).append({
            "action_type": "transfer", "amount": amount, "balance_after": binary.balance, "transaction_id": txn,
            "transaction_time": int(at.timestamp()), "app_id": self.app_id,
            "from": {"loginid": binary.loginid if deposit else mt5.loginid},
            "to": {"loginid": mt5.loginid if deposit else binary.loginid},
            "longcode": f"Transfer {'to' if deposit else 'from'} MT5 account {digits}",
            "reference_id": None, "contract_id": None, "payout": None, "shortcode": None,
        })


def _copy(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in row.items()}
