"""One persistent, authorized WebSocket connection to the Deriv API v3 (websocket-client).

- every request gets an integer req_id unique in this process (never reused across connections or clients, so a
  late reply can only ever match its own request) and is validated against Deriv's send schema;
- a reader thread matches replies by req_id and fails every waiting request when the socket closes;
- every reply is believed only when it is consistent (`_check`): exactly one of `error` or the call's result,
  msg_type and echo_req naming this call and this req_id, a well-formed error code, the receive schema; the
  values the agent acts on (transaction ids, balances, statement rows) are range-checked too. Anything else is
  BadReply: the outcome is unknown, never "nothing moved";
- `ping` keeps the connection alive; a lost connection is re-opened with backoff and re-authorized on the
  next call (never silently: a request in flight when it dropped ends as LostReply);
- every error raised before a request's frame is handed to the socket (connect, authorize, schema, send) carries
  `before_send=True`, the client's proof that nothing moved, whatever its code.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import websocket

from agent import money
from agent.broker import schemas
from agent.broker.base import check_send_guard
from agent.broker.errors import AGENT_ONLY_CODES, BadReply, BrokerError, LostReply, NotSent
from agent.crash import crash_point

log = logging.getLogger("agent.broker")

TRANSFER_SCOPES = ("payments",)
READ_SCOPES = ("read",)

# req_ids come from one counter for the whole process: never reset on a reconnect, never shared by two clients
_REQ_IDS = itertools.count(1)
_REQ_IDS_LOCK = threading.Lock()


def _next_req_id() -> int:
    with _REQ_IDS_LOCK:
        return next(_REQ_IDS)


# What a believable reply carries (see DerivClient._check)
MAX_ID = 2**63 - 1  # ids are SQLite INTEGERs: a larger one could never be stored
MAX_AMOUNT = 10**15  # |balance|, |amount|, |balance_after| at or above it is absurd
MAX_TIME = 2**41  # transaction_time, epoch seconds
_ERROR_CODE = re.compile(r"[A-Za-z0-9_]{1,64}")
_CURRENCY = re.compile(r"[A-Za-z]{3,12}")
_LOGINID = re.compile(r"[A-Z]{2,4}[0-9]{1,10}")
_WORD = re.compile(r"[A-Za-z0-9_]{1,40}")
# keys of the v3 envelope, present on errors and results alike
_ENVELOPE = frozenset({"echo_req", "msg_type", "req_id", "passthrough", "subscription"})
_KNOWN_CALLS = frozenset(schemas.KNOWN_CALLS)
_TRANSFER_CALLS = frozenset({"mt5_deposit", "mt5_withdrawal"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return _is_int(value) and 1 <= value <= MAX_ID


def _is_amount(value: Any) -> bool:
    """An exact, finite number of plausible size (never a float, never a bool)."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            return False
    elif not _is_int(value):
        return False
    return -MAX_AMOUNT < value < MAX_AMOUNT  # exact comparisons: no Decimal context, no overflow


def _shown(value: Any) -> str:
    """A reply value fit for a message: a short plain word as itself, anything else by its type only."""
    if isinstance(value, str) and _WORD.fullmatch(value):
        return repr(value)
    if _is_int(value) and -MAX_ID <= value <= MAX_ID:
        return str(value)
    return f"<{type(value).__name__}>"


def _clean(text: str, secret: str | None = None, limit: int = 300) -> str:
    """One printable line, the token never in it."""
    if secret:
        text = text.replace(secret, "<token>")
    return "".join(ch if ch.isprintable() else " " for ch in text)[:limit]


@cache
def _result_keys(call: str) -> frozenset[str]:
    """The keys only a successful reply to `call` carries (its result and, for transfers, the txn id)."""
    properties = schemas.validator(call, "receive").schema.get("properties") or {}
    return frozenset(properties) - _ENVELOPE | {call}


@dataclass(frozen=True)
class Session:
    loginid: str
    currency: str
    scopes: tuple[str, ...]
    account_list: tuple[str, ...]


@dataclass
class _Waiter:
    event: threading.Event
    reply: dict[str, Any] | None = None
    error: BrokerError | None = None


def with_app_id(url: str, app_id: int) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("app_id="))
    query = (query + "&" if query else "") + urlencode({"app_id": app_id})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


class DerivClient:
    def __init__(self, url: str, app_id: int, token: str, *, timeout: float = 15.0,
                 required_scopes: tuple[str, ...] = READ_SCOPES + TRANSFER_SCOPES, ping_interval: float = 30.0,
                 max_backoff: float = 60.0) -> None:
        self._url = with_app_id(url, app_id)
        self.app_id = app_id
        self._token = token
        self.timeout = timeout
        self.required_scopes = required_scopes
        self.ping_interval = ping_interval
        self.max_backoff = max_backoff
        self.session: Session | None = None
        self._ws: websocket.WebSocket | None = None
        self._send_lock = threading.Lock()
        self._connect_lock = threading.Lock()  # one connect at a time
        self._lock = threading.Lock()  # short sections: the socket, the waiters
        self._waiters: dict[int, _Waiter] = {}
        self._reader: threading.Thread | None = None
        self._pinger: threading.Thread | None = None
        self._closing = threading.Event()
        self._failures = 0
        self._next_attempt = 0.0
        self.reconnects = 0
        self.unmatched_replies = 0  # replies whose req_id is not an int: ignored, the first one logged

    # ---- connection ----

    @property
    def connected(self) -> bool:
        return self._ws is not None and self.session is not None

    def connect(self) -> Session:
        """Open and authorize, or raise. Backoff applies between failed attempts."""
        with self._connect_lock:
            if self.connected:
                assert self.session is not None
                return self.session
            wait = self._next_attempt - time.monotonic()
            if wait > 0:
                raise NotSent(f"not connected to the broker; next attempt in {wait:.0f}s")
            try:
                self._open()
                session = self._authorize()
            except BrokerError:
                self._drop("connect failed")
                self._failures += 1
                delay = min(self.max_backoff, 2 ** min(self._failures, 10)) * random.uniform(0.5, 1.0)
                self._next_attempt = time.monotonic() + delay
                raise
            if self._failures or self.reconnects:
                log.info("broker connection restored and re-authorized")
            self._failures = 0
            self.session = session
            return session

    def _open(self) -> None:
        try:
            ws = websocket.create_connection(self._url, timeout=self.timeout, enable_multithread=True)
        except websocket.WebSocketBadStatusException as exc:
            body = exc.resp_body.decode("utf-8", "replace") if isinstance(exc.resp_body, bytes) else ""
            if exc.status_code == 401 or "InvalidAppID" in body:
                # a wrong app_id needs an operator, not a retry loop (nothing was sent)
                raise BrokerError("InvalidAppID", f"the broker refused app_id {self.app_id} (HTTP "
                                  f"{exc.status_code}); check broker.app_id or $DERIV_APP_ID") from None
            raise NotSent(f"the broker refused the connection (HTTP {exc.status_code})") from None
        except (OSError, websocket.WebSocketException) as exc:
            raise NotSent(f"cannot connect to the broker: {type(exc).__name__}: {exc}") from None
        ws.settimeout(None)  # the reader blocks; per-request deadlines are kept by the waiters
        self._ws = ws
        self._closing.clear()
        self._reader = threading.Thread(target=self._read_loop, args=(ws,), name="deriv-reader", daemon=True)
        self._reader.start()
        if self._pinger is None or not self._pinger.is_alive():
            self._pinger = threading.Thread(target=self._ping_loop, name="deriv-ping", daemon=True)
            self._pinger.start()

    def _authorize(self) -> Session:
        reply = self._request({"authorize": self._token}, "authorize", self.timeout)
        auth = reply.get("authorize") or {}
        scopes = tuple(auth.get("scopes") or ())
        missing = [s for s in self.required_scopes if s not in scopes]
        if missing:
            raise BrokerError("MissingScope", f"the API token lacks the {', '.join(missing)} scope(s) "
                              f"(it has: {', '.join(scopes) or 'none'}); create a token with "
                              f"{' + '.join(self.required_scopes)}")
        accounts = tuple(a.get("loginid", "") for a in auth.get("account_list") or ())
        return Session(loginid=str(auth.get("loginid", "")), currency=str(auth.get("currency", "")),
                       scopes=scopes, account_list=accounts)

    def close(self) -> None:
        self._closing.set()
        self._drop("closed by the agent")

    def _drop(self, why: str) -> None:
        with self._lock:
            ws, self._ws = self._ws, None
            self.session = None
        if ws is not None:
            try:
                ws.abort()
            except Exception:  # noqa: BLE001 - best effort: the socket may already be gone
                pass
            try:
                ws.shutdown()
            except Exception:  # noqa: BLE001
                pass
        self._fail_waiters(why)

    def _fail_waiters(self, why: str) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.error = LostReply("ConnectionClosed", f"the connection closed before the reply ({why})")
            waiter.event.set()

    def _read_loop(self, ws: websocket.WebSocket) -> None:
        why = "the broker closed the connection"
        try:
            while True:
                opcode, data = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                if opcode != websocket.ABNF.OPCODE_TEXT:
                    continue
                if self._ws is not ws:
                    break  # this socket was dropped: nothing it still carries may answer a request
                self._dispatch(ws, data)
        except Exception as exc:  # noqa: BLE001 - any end of the socket ends this connection
            why = f"connection lost: {type(exc).__name__}"
        if self._ws is ws:
            if not self._closing.is_set():
                log.warning("broker connection lost (%s); will reconnect on the next request", why)
                self.reconnects += 1
            self._drop(why)

    def _dispatch(self, ws: websocket.WebSocket, data: bytes) -> None:
        try:
            reply = money.loads(data)
        except ValueError:
            log.error("broker sent a frame that is not JSON; ignored")
            return
        if not isinstance(reply, dict):
            log.error("broker sent a JSON value that is not an object; ignored")
            return
        # never log the frame, nor a value taken from it: an authorize reply's echo_req may carry the token
        req_id = reply.get("req_id")
        if not _is_int(req_id):
            self.unmatched_replies += 1
            if self.unmatched_replies == 1:
                log.warning("broker sent a reply whose req_id is %s, not an integer; ignored (further ones are "
                            "counted, not logged)", "missing" if req_id is None else type(req_id).__name__)
            else:
                log.debug("another reply without an integer req_id; ignored")
            return
        with self._lock:
            if self._ws is not ws:
                log.warning("reply with req_id %s on a dropped connection; ignored", _shown(req_id))
                return
            waiter = self._waiters.pop(req_id, None)
        if waiter is None:
            log.warning("reply with req_id %s matches no waiting request (late or unsolicited); ignored",
                        _shown(req_id))
            return
        waiter.reply = reply
        waiter.event.set()

    def _ping_loop(self) -> None:
        while not self._closing.wait(self.ping_interval):
            if not self.connected:
                continue
            try:
                self.call({"ping": 1})
            except LostReply as exc:
                # no pong: the connection is dead even if no FIN ever came; start afresh on the next request
                log.warning("ping got no reply (%s); dropping the connection", exc.code)
                self._drop("ping timed out")
            except BrokerError as exc:
                log.warning("ping failed: %s", exc.code)

    # ---- requests ----

    def call(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request on the authorized connection and return its checked reply.

        Any error raised before the request's frame is handed to the socket has `before_send` set, keeping its
        code (an InvalidToken or MissingScope still needs an operator): the request cannot have been executed.
        """
        call = schemas.call_of(request)
        if call is None:
            raise NotSent("request names no known API call")
        try:
            self.connect()
        except BrokerError as exc:
            # connecting or (re-)authorizing failed: even a Timeout or a lost authorize reply is about the
            # authorize request, this one never left
            exc.before_send = True
            raise
        return self._request(request, call, timeout if timeout is not None else self.timeout)

    def call_many(self, requests: Sequence[dict[str, Any]], timeout: float | None = None
                  ) -> list[dict[str, Any] | BrokerError]:
        """Send several read requests back to back on the one connection and wait for all their replies (matched
        by req_id, whatever order they come in): one round trip instead of one per request. Returns, in the
        requests' order, each reply checked exactly as `call` checks it, or the BrokerError that request ended
        with (one refusal does not hide the others' answers). A failure to connect raises, as in `call`.
        Transfers are never sent this way: each has its own guard and its own wait."""
        calls = [schemas.call_of(request) for request in requests]
        for call in calls:
            if call is None or call in _TRANSFER_CALLS:
                raise NotSent(f"call_many takes read requests only, not {call or 'an unknown call'}")
        try:
            self.connect()
        except BrokerError as exc:
            exc.before_send = True  # as in `call`: none of these requests left
            raise
        limit = timeout if timeout is not None else self.timeout
        deadline = time.monotonic() + limit
        started: list[tuple[str, int, _Waiter] | BrokerError] = []
        for request, call in zip(requests, calls, strict=True):
            assert call is not None
            try:
                started.append((call, *self._start(request, call)))
            except BrokerError as exc:
                started.append(exc)
        results: list[dict[str, Any] | BrokerError] = []
        for item in started:
            if isinstance(item, BrokerError):
                results.append(item)
                continue
            call, req_id, waiter = item
            try:
                results.append(self._finish(call, req_id, waiter, max(0.0, deadline - time.monotonic()), limit))
            except BrokerError as exc:
                results.append(exc)
        return results

    def _request(self, request: dict[str, Any], call: str, timeout: float) -> dict[str, Any]:
        req_id, waiter = self._start(request, call)
        return self._finish(call, req_id, waiter, timeout, timeout)

    def _start(self, request: dict[str, Any], call: str) -> tuple[int, _Waiter]:
        """Register the request's waiter and hand its frame to the socket; NotSent when it did not leave."""
        with self._lock:
            ws = self._ws
            if ws is None:
                raise NotSent("not connected to the broker")
            req_id = _next_req_id()
            waiter = _Waiter(threading.Event())
            self._waiters[req_id] = waiter
        message = {**request, "req_id": req_id}
        bad = schemas.problems(call, "send", message)
        if bad:
            self._forget(req_id)
            raise NotSent(f"{call} request fails Deriv's send schema: {'; '.join(bad)}")
        text = money.dumps(message)
        transfer_call = call in _TRANSFER_CALLS
        try:
            with self._send_lock:
                if transfer_call:
                    try:
                        check_send_guard(call)  # the last moment at which not sending is still certain
                    except NotSent:
                        self._forget(req_id)
                        raise
                ws.send(text)
        except NotSent:
            raise
        except Exception as exc:  # noqa: BLE001 - a frame that did not leave proves nothing moved
            self._forget(req_id)
            self._drop(f"send failed: {type(exc).__name__}")
            raise NotSent(f"sending {call} failed: {type(exc).__name__}") from None
        if transfer_call:
            crash_point("after_send")
        return req_id, waiter

    def _finish(self, call: str, req_id: int, waiter: _Waiter, wait: float, timeout: float) -> dict[str, Any]:
        """Wait up to `wait` seconds for the reply and check it (`timeout` is the limit the message names)."""
        if not waiter.event.wait(wait):
            self._forget(req_id)
            raise LostReply("Timeout", f"no reply to {call} within {timeout:g}s")
        if waiter.error is not None:
            raise waiter.error
        assert waiter.reply is not None
        return self._check(call, waiter.reply, req_id, secret=self._token)

    def _forget(self, req_id: int) -> None:
        with self._lock:
            self._waiters.pop(req_id, None)

    @staticmethod
    def _check(call: str, reply: Any, req_id: int | None = None, *, secret: str | None = None) -> dict[str, Any]:
        """Believe a reply only when it is consistent; raise the broker's error only when that is well-formed.

        - exactly one of `error` or the call's result key (an error frame carrying any success field, or a frame
          with neither, proves nothing);
        - msg_type is the call's, on errors too (Deriv echoes the call name); echo_req, when present, names this
          call and no other, and this req_id;
        - an error's code is a plain word (at most 64 of [A-Za-z0-9_]) and not one of the agent's own codes;
        - a result passes Deriv's receive schema.
        Anything else is BadReply (outcome unknown, never nothing-moved). Messages are one line, never a reply
        body, never the token.
        """

        def bad(why: str) -> BadReply:
            return BadReply(_clean(f"{call} reply {why}", secret))

        if not isinstance(reply, dict):
            raise bad("is not an object")
        if call not in _KNOWN_CALLS:
            raise bad("is for a call the client does not know")
        top_id = reply.get("req_id")
        if "req_id" in reply and not _is_int(top_id):
            raise bad(f"has a req_id that is {_shown(top_id)}, not an integer")
        if req_id is not None and top_id != req_id:
            raise bad(f"has req_id {_shown(top_id)}, not {req_id}")
        msg_type = reply.get("msg_type")
        if not (isinstance(msg_type, str) and msg_type == call):
            raise bad(f"has msg_type {_shown(msg_type)}")
        if "echo_req" in reply:
            echo = reply["echo_req"]
            if not isinstance(echo, dict):
                raise bad("has an echo_req that is not an object")
            named = [key for key in echo if key in _KNOWN_CALLS]
            if named != [call]:
                raise bad(f"echoes a request for {', '.join(_shown(k) for k in named) or 'no known call'}")
            if "req_id" in echo:
                echoed = echo["req_id"]
                expected = req_id if req_id is not None else top_id
                if not _is_int(echoed) or (expected is not None and echoed != expected):
                    raise bad(f"echoes req_id {_shown(echoed)}, not {_shown(expected)}")
        has_error = "error" in reply
        has_result = call in reply
        if has_error and has_result:
            raise bad("carries both an error and a result")
        if not has_error and not has_result:
            raise bad("carries neither an error nor a result")
        if has_error:
            extra = sorted(k for k in reply if isinstance(k, str) and k in _result_keys(call))
            if extra:
                raise bad(f"carries an error and a result field ({', '.join(extra)})")
            error = reply["error"]
            if not isinstance(error, dict):
                raise bad("has an error that is not an object")
            code = error.get("code")
            if not (isinstance(code, str) and _ERROR_CODE.fullmatch(code)):
                raise bad("has an error without a well-formed code")
            if code in AGENT_ONLY_CODES:
                raise bad(f"has the agent's own error code {code}")
            message = error.get("message")
            raise BrokerError(code, _clean(message, secret) if isinstance(message, str) else "")
        try:
            bad_fields = schemas.problems(call, "receive", reply)
        except Exception as exc:  # noqa: BLE001 - a value the validator cannot even compare is not believed
            raise bad(f"cannot be checked against Deriv's receive schema ({type(exc).__name__})") from None
        if bad_fields:
            raise bad(f"fails Deriv's receive schema: {'; '.join(bad_fields[:3])}")
        return reply

    @staticmethod
    def _transaction_id(call: str, reply: dict[str, Any]) -> int:
        """The binary_transaction_id of a checked transfer reply: success exactly 1, id a positive 64-bit int."""
        success = reply.get(call)
        if not (_is_int(success) and success == 1):
            raise BadReply(f"{call} reply without success")
        txn = reply.get("binary_transaction_id")
        if not _is_id(txn):
            raise BadReply(f"{call} reply has binary_transaction_id {_shown(txn)}, not an integer in "
                           f"1..{MAX_ID}")
        return txn

    @staticmethod
    def _balance_of(reply: dict[str, Any], loginid: str | None = None) -> tuple[Decimal, str]:
        body = reply.get("balance")
        if not isinstance(body, dict):
            raise BadReply("balance reply without a balance")
        value = body.get("balance")
        if not _is_amount(value) or value < 0:
            raise BadReply(f"balance reply has balance {_shown(value)}: not a plausible amount")
        currency = body.get("currency")
        if not (isinstance(currency, str) and _CURRENCY.fullmatch(currency)):
            raise BadReply(f"balance reply has currency {_shown(currency)}: not a currency code")
        if loginid and body.get("loginid") != loginid:
            shown = body.get("loginid")
            shown = repr(shown) if isinstance(shown, str) and _LOGINID.fullmatch(shown) else _shown(shown)
            raise BadReply(f"balance reply is for {shown}, not {loginid}")
        return Decimal(value), currency

    @staticmethod
    def _rows_of(reply: dict[str, Any]) -> list[dict[str, Any]]:
        """Every row checked: one malformed row makes the whole reply BadReply (never dropped silently)."""
        body = reply.get("statement")
        if not isinstance(body, dict):
            raise BadReply("statement reply without a statement")
        rows = body.get("transactions")
        if not isinstance(rows, list):
            raise BadReply("statement reply without transactions")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise BadReply(f"statement row {i} is not an object")
            if not _is_id(row.get("transaction_id")):
                raise BadReply(f"statement row {i} has transaction_id {_shown(row.get('transaction_id'))}, "
                               f"not an integer in 1..{MAX_ID}")
            for key in ("amount", "balance_after"):
                if not _is_amount(row.get(key)):
                    raise BadReply(f"statement row {i} has {key} {_shown(row.get(key))}: not a plausible amount")
            when = row.get("transaction_time")
            if not (_is_int(when) and 0 <= when < MAX_TIME):
                raise BadReply(f"statement row {i} has transaction_time {_shown(when)}: not a plausible time")
        return rows

    # ---- the calls fund-agent uses ----

    def balance(self, loginid: str | None = None) -> tuple[Decimal, str]:
        request: dict[str, Any] = {"balance": 1}
        if loginid:
            # always named: right after a reconnect the session is not known yet when the request is built,
            # and without `account` Deriv answers for the token's default account
            request["account"] = loginid
        return self._balance_of(self.call(request), loginid)

    def balance_and_limits(self, loginid: str, website_status: bool = True
                           ) -> tuple[tuple[Decimal, str] | BrokerError, dict[str, Any] | BrokerError,
                                      dict[str, Any] | BrokerError | None]:
        """`balance` of `loginid`, `get_limits` and (when asked) `website_status`, sent together on the one
        connection: (balance, get_limits body, website_status body or None), each the value or the BrokerError
        that call ended with. What a transfer decision reads, in one round trip instead of three."""
        requests: list[dict[str, Any]] = [{"balance": 1, "account": loginid}, {"get_limits": 1}]
        if website_status:
            requests.append({"website_status": 1})
        replies = self.call_many(requests)
        balance: tuple[Decimal, str] | BrokerError
        if isinstance(replies[0], BrokerError):
            balance = replies[0]
        else:
            try:
                balance = self._balance_of(replies[0], loginid)
            except BrokerError as exc:
                balance = exc
        limits = replies[1] if isinstance(replies[1], BrokerError) else replies[1].get("get_limits") or {}
        status: dict[str, Any] | BrokerError | None = None
        if website_status:
            status = replies[2] if isinstance(replies[2], BrokerError) else replies[2].get("website_status") or {}
        return balance, limits, status

    def _transfer(self, request: dict[str, Any], call: str, timeout: float | None) -> int:
        return self._transaction_id(call, self.call(request, timeout))

    def mt5_deposit(self, from_binary: str, to_mt5: str, amount: Decimal, timeout: float | None = None) -> int:
        """Top-up. Returns the broker's binary_transaction_id."""
        return self._transfer({"mt5_deposit": 1, "from_binary": from_binary, "to_mt5": to_mt5,
                               "amount": amount}, "mt5_deposit", timeout)

    def mt5_withdrawal(self, from_mt5: str, to_binary: str, amount: Decimal, timeout: float | None = None) -> int:
        """Sweep. Returns the broker's binary_transaction_id."""
        return self._transfer({"mt5_withdrawal": 1, "from_mt5": from_mt5, "to_binary": to_binary,
                               "amount": amount}, "mt5_withdrawal", timeout)

    def statement(self, date_from: int, date_to: int, limit: int = 999, offset: int = 0,
                  loginid: str | None = None, action_type: str | None = "transfer") -> list[dict[str, Any]]:
        """Statement rows, newest first. Deriv caps `limit` at 999; page with `offset`."""
        request: dict[str, Any] = {"statement": 1, "description": 1, "date_from": date_from, "date_to": date_to,
                                   "limit": limit, "offset": offset}
        if action_type:
            request["action_type"] = action_type
        if loginid:
            request["loginid"] = loginid  # always named, as in balance(): never the token's default by accident
        return self._rows_of(self.call(request))

    def website_status(self) -> dict[str, Any]:
        return self.call({"website_status": 1}).get("website_status") or {}

    def get_limits(self) -> dict[str, Any]:
        return self.call({"get_limits": 1}).get("get_limits") or {}

    def mt5_get_settings(self, login: str) -> dict[str, Any]:
        return self.call({"mt5_get_settings": 1, "login": login}).get("mt5_get_settings") or {}
