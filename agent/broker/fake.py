"""A Deriv-protocol WebSocket server on 127.0.0.1: the demo's broker and the tests' broker.

It speaks the v3 envelope (msg_type, echo_req, req_id, passthrough; errors as {"error": {code, message}}),
validates every request against Deriv's official send schema and every normal reply against the receive
schema, and applies Deriv's business rules for MT5 transfers: balances, token scopes, per-transfer min/max,
the currency's decimal places, a daily count of MT5 transfers per UTC day, statement rows with
transaction_id, from/to, longcode and app_id. Faults can be injected per call, deterministically.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from agent import money
from agent.broker import schemas
from agent.timeutil import Clock

log = logging.getLogger("agent.broker.fake")

SCOPE_OF = {"mt5_deposit": ("payments",), "mt5_withdrawal": ("payments",),
            "transfer_between_accounts": ("payments",), "balance": ("read", "trading_information"),
            "statement": ("read", "trading_information"), "mt5_login_list": ("read",),
            "mt5_get_settings": ("read",), "get_limits": ("read",)}
PUBLIC_CALLS = {"ping", "time", "website_status", "authorize", "forget", "forget_all", "logout"}


@dataclass
class Account:
    loginid: str
    currency: str
    balance: Decimal
    mt5: bool = False


@dataclass
class Fault:
    """One injected fault, used by the next matching request.

    mode: error (reply `code`, apply nothing) | error_after_apply (apply, then reply `code`) |
    drop_after_apply (apply, close with no reply) | drop_before_apply (close, apply nothing) |
    delay_reply (apply now, reply after `delay` s) | late_apply (reply nothing now, apply after `delay` s) |
    malformed (apply, reply a body that fails the receive schema) |
    late_leg (apply the first leg now and reply success; the second leg lands `delay` s later: a deposit's MT5
    credit, or a withdrawal's funding credit with its statement row) | late_leg_error (the same, replying `code`)
    """

    call: str
    mode: str
    code: str = "WrongResponse"
    delay: float = 0.0


@dataclass
class FakeState:
    accounts: dict[str, Account] = field(default_factory=dict)
    tokens: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # token -> (loginid, scopes)
    statement: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # loginid -> rows, oldest first
    next_txn_id: int = 1000
    transfers_by_day: dict[str, int] = field(default_factory=dict)  # CR loginid + UTC date -> count
    # other Deriv accounts of the token's user (one user, several funding accounts): transfers may come from them
    siblings: dict[str, set[str]] = field(default_factory=dict)


class FakeDeriv:
    def __init__(self, clock: Clock | None = None, *, min_transfer: Decimal = Decimal(1),
                 max_transfer: Decimal = Decimal(2500), daily_transfers: int = 6, idle_timeout: float = 120.0,
                 app_ids: set[int] | None = None) -> None:
        self.clock = clock or Clock()
        self.min_transfer = min_transfer
        self.max_transfer = max_transfer
        self.daily_transfers = daily_transfers
        self.idle_timeout = idle_timeout
        self.app_ids = app_ids  # None = any numeric app_id is accepted
        self.state = FakeState()
        self.faults: deque[Fault] = deque()
        # the newest requests received, for tests (tokens included); bounded so a long soak does not grow it
        self.requests: deque[dict[str, Any]] = deque(maxlen=10_000)
        self.bad_replies: list[str] = []  # replies the fake produced that failed the receive schema (a bug)
        self.lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._connections: set[ServerConnection] = set()
        self.port = 0
        self._late_leg_delay = 0.0  # set while a late_leg fault's transfer is applied
        self._later: list[tuple[float, Any]] = []  # second legs to land later: (delay s, apply)

    # ---- set-up ----

    def add_account(self, loginid: str, currency: str, balance: Decimal | str, mt5: bool = False) -> None:
        with self.lock:
            self.state.accounts[loginid] = Account(loginid, currency, money.parse_amount(balance, currency), mt5)

    def add_token(self, token: str, loginid: str, scopes: tuple[str, ...] = ("read", "payments"),
                  siblings: tuple[str, ...] = ()) -> None:
        """`siblings`: the user's other Deriv accounts; their transfers count in the same daily count."""
        with self.lock:
            self.state.tokens[token] = (loginid, scopes)
            self.state.siblings.setdefault(loginid, set()).update(siblings)

    def inject(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def adjust(self, loginid: str, delta: Decimal) -> None:
        """Trading P/L on an MT5 account (the demo's simulation closes trades)."""
        with self.lock:
            account = self.state.accounts[loginid]
            account.balance = max(Decimal(0), account.balance + delta)

    def balance_of(self, loginid: str) -> Decimal:
        with self.lock:
            return self.state.accounts[loginid].balance

    def transfers(self, loginid: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.state.statement.get(loginid, []))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websockets/v3"

    # ---- lifecycle ----

    def start(self) -> str:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fake-deriv", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the Deriv-protocol server did not start")
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the server and start it again on the same port, keeping accounts and statements (a broker
        restart): every connection is lost and clients must reconnect and authorize again."""
        import time

        self.stop()
        time.sleep(down_for)
        self.start()

    def drop_connections(self) -> None:
        """Close every client connection now (a network blip)."""
        if self._loop is None:
            return
        for conn in list(self._connections):
            asyncio.run_coroutine_threadsafe(conn.close(1011, "server restart"), self._loop)

    def __enter__(self) -> FakeDeriv:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        asyncio.run(self._serve(ready))

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handle, "127.0.0.1", self.port, process_request=self._check_app_id,
                         ping_interval=None, max_size=2**20) as server:
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await self._stop.wait()

    def _check_app_id(self, connection: ServerConnection, request: Any) -> Any:
        query = parse_qs(urlsplit(request.path).query)
        values = query.get("app_id", [])
        ok = len(values) == 1 and values[0].isdigit() and (self.app_ids is None or int(values[0]) in self.app_ids)
        if not ok:
            return connection.respond(HTTPStatus.UNAUTHORIZED, '{"error":"InvalidAppID"}')
        return None

    async def _handle(self, conn: ServerConnection) -> None:
        self._connections.add(conn)
        assert conn.request is not None  # the handshake is done before the handler runs
        query = parse_qs(urlsplit(conn.request.path).query)
        app_id = int(query["app_id"][0])
        session: dict[str, Any] = {"app_id": app_id, "token": None}
        try:
            while True:
                try:
                    text = await asyncio.wait_for(conn.recv(), timeout=self.idle_timeout)
                except TimeoutError:
                    await conn.close(1000, "idle")
                    return
                await self._on_message(conn, session, text)
        except ConnectionClosed:
            return
        finally:
            self._connections.discard(conn)

    # ---- protocol ----

    async def _on_message(self, conn: ServerConnection, session: dict[str, Any], text: str | bytes) -> None:
        try:
            request = money.loads(text)
        except ValueError:
            await self._send(conn, {"error": {"code": "BadRequest", "message": "The request is not valid JSON."},
                                    "msg_type": "error", "echo_req": {}})
            return
        if not isinstance(request, dict):
            await self._send(conn, {"error": {"code": "BadRequest", "message": "Request must be an object."},
                                    "msg_type": "error", "echo_req": {}})
            return
        with self.lock:
            self.requests.append(request)
        call = schemas.call_of(request)
        envelope: dict[str, Any] = {"echo_req": _redact(request), "msg_type": call or "error"}
        for key in ("req_id", "passthrough"):
            if key in request:
                envelope[key] = request[key]
        if call is None:
            await self._send(conn, {**envelope, "error": {"code": "UnrecognisedRequest",
                                                          "message": "Unrecognised request."}})
            return
        bad = schemas.problems(call, "send", request)
        if bad:
            await self._send(conn, {**envelope, "error": {"code": "InputValidationFailed",
                                                          "message": "Input validation failed: " + bad[0]}})
            return
        fault = self._take_fault(call)
        if fault is not None and fault.mode in ("error", "drop_before_apply"):
            if fault.mode == "drop_before_apply":
                await conn.close(1011, "fault")
                return
            await self._send(conn, {**envelope, "error": {"code": fault.code, "message": "Injected fault."}})
            return
        if fault is not None and fault.mode == "late_apply":
            async def apply_later() -> None:
                await asyncio.sleep(fault.delay)
                self._dispatch(call, request, session)
            asyncio.get_running_loop().create_task(apply_later())
            return
        if fault is not None and fault.mode in ("late_leg", "late_leg_error"):
            self._late_leg_delay = fault.delay
        try:
            body = self._dispatch(call, request, session)
        finally:
            self._late_leg_delay = 0.0
        for delay, leg in self._take_later():
            async def land_later(delay: float = delay, leg: Any = leg) -> None:
                await asyncio.sleep(delay)
                with self.lock:
                    leg()
            asyncio.get_running_loop().create_task(land_later())
        if fault is not None and fault.mode == "late_leg_error":
            body = {"error": {"code": fault.code, "message": "Injected fault: the second leg is late."}}
            fault = None
        if fault is not None and fault.mode == "late_leg":
            fault = None
        if fault is not None:
            if fault.mode == "drop_after_apply":
                await conn.close(1011, "fault")
                return
            if fault.mode == "error_after_apply":
                body = {"error": {"code": fault.code, "message": "Injected fault after applying."}}
            elif fault.mode == "malformed":
                body = {call: 1, "binary_transaction_id": "not-a-number"}
            elif fault.mode == "delay_reply":
                await asyncio.sleep(fault.delay)
        reply = {**envelope, **body}
        if "error" not in reply and (fault is None or fault.mode != "malformed"):
            problems = schemas.problems(call, "receive", reply)
            if problems:  # a bug in this server: record it so tests fail loudly
                self.bad_replies.append(f"{call}: {problems}")
        await self._send(conn, reply)
        if call == "logout":
            session["token"] = None

    def _take_fault(self, call: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.call == call:
                    self.faults.remove(fault)
                    return fault
        return None

    async def _send(self, conn: ServerConnection, reply: dict[str, Any]) -> None:
        try:
            await conn.send(money.dumps(reply))
        except ConnectionClosed:
            pass

    def _dispatch(self, call: str, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            if call not in PUBLIC_CALLS:
                token = session.get("token")
                if token is None:
                    return _err("AuthorizationRequired", "Please log in.")
                scopes = self.state.tokens[token][1]
                needed = SCOPE_OF.get(call, ("read",))
                if not any(s in scopes for s in needed):
                    return _err("PermissionDenied", f"Permission denied, requires {', '.join(needed)} scope(s).")
            handler = getattr(self, f"_call_{call}", None)
            if handler is None:
                return _err("UnrecognisedRequest", "Unrecognised request.")
            return handler(request, session)

    def _now(self) -> datetime:
        return self.clock.now()

    def _login(self, session: dict[str, Any]) -> str:
        return self.state.tokens[session["token"]][0]

    def _call_ping(self, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        return {"ping": "pong"}

    def _call_time(self, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        return {"time": int(self._now().timestamp())}

    def _call_authorize(self, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        token = request["authorize"]
        if token not in self.state.tokens:
            return _err("InvalidToken", "The token is invalid.")
        session["token"] = token
        loginid, scopes = self.state.tokens[token]
        account = self.state.accounts[loginid]
        account_list = [{"loginid": a.loginid, "currency": a.currency, "is_virtual": 0, "is_disabled": 0,
                         "landing_company_name": "svg", "account_type": "trading", "account_category": "trading"}
                        for a in self.state.accounts.values() if not a.mt5]
        return {"authorize": {"loginid": loginid, "currency": account.currency, "balance": account.balance,
                              "scopes": list(scopes), "account_list": account_list, "is_virtual": 0,
                              "landing_company_name": "svg", "email": "operator@example.com", "country": "id",
                              "fullname": "Test Operator", "user_id": 1, "linked_to": [],
                              "local_currencies": {}, "upgradeable_landing_companies": []}}

    def _call_logout(self, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        return {"logout": 1}

    def _call_balance(self, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        loginid = request.get("account") or self._login(session)
        if loginid in ("current", "all"):
            loginid = self._login(session)
        account = self.state.accounts.get(loginid)
        if account is None or account.mt5:
            return _err("PermissionDenied", "Permission denied.")
        return {"balance": {"balance": account.balance, "currency": account.currency, "loginid": loginid}}

    def _call_website_status(self, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        currencies = {}
        for code in sorted({a.currency for a in self.state.accounts.values()} | {"USD"}):
            currencies[code] = {
                "fractional_digits": money.places(code), "is_deposit_suspended": 0, "is_suspended": 0,
                "is_withdrawal_suspended": 0, "name": code, "stake_default": 10,
                "type": "crypto" if money.places(code) > 2 else "fiat",
                "transfer_between_accounts": {
                    "fees": {}, "limits": {"min": self.min_transfer, "max": self.max_transfer},
                    "limits_mt5": {"min": self.min_transfer, "max": self.max_transfer}},
            }
        general = {"applies_to": "rest", "hourly": 14400, "minutely": 180}
        return {"website_status": {
            "api_call_limits": {
                "max_proposal_subscription": {"applies_to": "subscribing", "max": 75},
                "max_requestes_general": general,
                "max_requests_outcome": {**general, "applies_to": "portfolio"},
                "max_requests_pricing": {**general, "applies_to": "proposal"}},
            "currencies_config": currencies, "clients_country": "id", "site_status": "up",
            "terms_conditions_version": "Version 4.2.0 2020-08-07"}}

    def _daily_key(self, loginid: str) -> str:
        return f"{loginid}:{self._now().date().isoformat()}"

    def _call_get_limits(self, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        used = self.state.transfers_by_day.get(self._daily_key(self._login(session)), 0)
        return {"get_limits": {"daily_transfers": {"mt5": {"allowed": self.daily_transfers,
                                                           "available": max(0, self.daily_transfers - used)}}}}

    def _call_mt5_get_settings(self, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        account = self.state.accounts.get(request["login"])
        if account is None or not account.mt5:
            return _err("MT5AccountInaccessible", "MT5 account is not available.")
        return {"mt5_get_settings": {"login": account.loginid, "balance": account.balance,
                                     "currency": account.currency, "account_type": "real",
                                     "display_balance": money.fmt(account.balance, account.currency)}}

    def _call_statement(self, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        loginid = request.get("loginid") or self._login(session)
        rows = list(reversed(self.state.statement.get(loginid, [])))  # newest first
        if "action_type" in request:
            rows = [r for r in rows if r["action_type"] == request["action_type"]]
        if "date_from" in request:
            rows = [r for r in rows if r["transaction_time"] >= request["date_from"]]
        if "date_to" in request:
            rows = [r for r in rows if r["transaction_time"] <= request["date_to"]]
        offset = int(request.get("offset", 0))
        limit = int(request.get("limit", 100))
        page = rows[offset:offset + limit]
        if not request.get("description"):
            page = [{k: v for k, v in r.items() if k != "longcode"} for r in page]
        return {"statement": {"count": len(page), "transactions": page}}

    def _call_mt5_deposit(self, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        return self._transfer(session, request.get("from_binary") or self._login(session), request["to_mt5"],
                              request.get("amount"), deposit=True)

    def _call_mt5_withdrawal(self, request: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
        return self._transfer(session, request["to_binary"], request["from_mt5"], request["amount"],
                              deposit=False)

    def _transfer(self, session: dict[str, Any], binary_id: str, mt5_id: str, amount: Any,
                  deposit: bool) -> dict[str, Any]:
        call = "mt5_deposit" if deposit else "mt5_withdrawal"
        error_code = "MT5DepositError" if deposit else "MT5WithdrawalError"
        login = self._login(session)
        binary = self.state.accounts.get(binary_id)
        mt5 = self.state.accounts.get(mt5_id)
        if binary is None or binary.mt5 or (binary_id != login
                                            and binary_id not in self.state.siblings.get(login, set())):
            return _err("PermissionDenied", "Permission denied.")
        if mt5 is None or not mt5.mt5:
            return _err(error_code, "MT5 account is not available.")
        if amount is None:
            return _err("InputValidationFailed", "Input validation failed: amount")
        if mt5.currency != binary.currency:
            return _err("CurrencyShouldMatch", "Currency provided is different from account currency.")
        try:
            value = money.parse_amount(amount, binary.currency)
        except money.MoneyError:
            return _err(error_code, f"Invalid amount. Amount provided can not have more than "
                                    f"{money.places(binary.currency)} decimal places.")
        if value < self.min_transfer or value > self.max_transfer:
            return _err(error_code, f"The amount must be between {self.min_transfer} and {self.max_transfer} "
                                    f"{binary.currency}.")
        key = self._daily_key(login)
        if self.state.transfers_by_day.get(key, 0) >= self.daily_transfers:
            return _err("MaximumTransfers", f"You can only perform up to {self.daily_transfers} transfers a "
                                            "day. Please try again tomorrow.")
        source, target = (binary, mt5) if deposit else (mt5, binary)
        if source.balance < value:
            return _err("NoMoney" if deposit else error_code, "Your account balance is insufficient for this "
                                                               "transaction.")
        self.state.transfers_by_day[key] = self.state.transfers_by_day.get(key, 0) + 1
        self.state.next_txn_id += 1
        txn = self.state.next_txn_id
        digits = "".join(ch for ch in mt5.loginid if ch.isdigit())
        app_id = session["app_id"]

        def binary_leg() -> None:  # the funding account's side, with its statement row
            binary.balance += -value if deposit else value
            self.state.statement.setdefault(binary.loginid, []).append({
                "action_type": "transfer", "amount": -value if deposit else value,
                "balance_after": binary.balance, "transaction_id": txn,
                "transaction_time": int(self._now().timestamp()), "app_id": app_id,
                "from": {"loginid": binary.loginid if deposit else mt5.loginid},
                "to": {"loginid": mt5.loginid if deposit else binary.loginid},
                "longcode": f"Transfer {'to' if deposit else 'from'} MT5 account {digits}",
                "reference_id": None, "contract_id": None, "payout": None, "shortcode": None,
            })

        def mt5_leg() -> None:
            mt5.balance += value if deposit else -value

        # Deriv moves the source side first: the funding debit for a deposit, the MT5 debit for a withdrawal.
        first, second = (binary_leg, mt5_leg) if deposit else (mt5_leg, binary_leg)
        first()
        if self._late_leg_delay > 0:
            self._later.append((self._late_leg_delay, second))
        else:
            second()
        return {call: 1, "binary_transaction_id": txn}

    def _take_later(self) -> list[tuple[float, Any]]:
        with self.lock:
            later, self._later = self._later, []
        return later


def _err(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _redact(request: dict[str, Any]) -> dict[str, Any]:
    """Deriv echoes the request; we never echo a token back."""
    return {k: ("<not shown>" if k == "authorize" else v) for k, v in request.items()}
