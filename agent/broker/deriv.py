"""One persistent, authorized WebSocket connection to the Deriv API v3 (websocket-client).

- every request gets an integer req_id unique in this process (never reused across connections or clients, so a
  late reply can only ever match its own request) and is validated against Deriv's send schema;
- a reader thread matches replies by req_id and fails every waiting request when the socket closes;
- every reply is checked against the receive schema before it is believed;
- `ping` keeps the connection alive; a lost connection is re-opened with backoff and re-authorized on the
  next call (never silently: a request in flight when it dropped ends as LostReply);
- every error raised before a request's frame is handed to the socket (connect, authorize, schema, send) carries
  `before_send=True`, the client's proof that nothing moved, whatever its code.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import websocket

from agent import money
from agent.broker import schemas
from agent.broker.errors import BadReply, BrokerError, LostReply, NotSent
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
        req_id = reply.get("req_id")
        with self._lock:
            if self._ws is not ws:
                log.warning("reply with req_id %r on a dropped connection; ignored", req_id)
                return
            waiter = self._waiters.pop(req_id, None) if isinstance(req_id, int) else None
        if waiter is None:
            log.warning("reply with req_id %r matches no waiting request (late or unsolicited); ignored", req_id)
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

    def _request(self, request: dict[str, Any], call: str, timeout: float) -> dict[str, Any]:
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
        try:
            with self._send_lock:
                ws.send(text)
        except Exception as exc:  # noqa: BLE001 - a frame that did not leave proves nothing moved
            self._forget(req_id)
            self._drop(f"send failed: {type(exc).__name__}")
            raise NotSent(f"sending {call} failed: {type(exc).__name__}") from None
        if call in ("mt5_deposit", "mt5_withdrawal"):
            crash_point("after_send")
        if not waiter.event.wait(timeout):
            self._forget(req_id)
            raise LostReply("Timeout", f"no reply to {call} within {timeout:g}s")
        if waiter.error is not None:
            raise waiter.error
        assert waiter.reply is not None
        return self._check(call, waiter.reply)

    def _forget(self, req_id: int) -> None:
        with self._lock:
            self._waiters.pop(req_id, None)

    @staticmethod
    def _check(call: str, reply: dict[str, Any]) -> dict[str, Any]:
        if "error" in reply:
            error = reply["error"]
            if not isinstance(error, dict) or not isinstance(error.get("code"), str):
                raise BadReply(f"{call} error reply without a code")
            message = error.get("message")
            raise BrokerError(error["code"], str(message) if isinstance(message, str) else "")
        if reply.get("msg_type") != call:
            raise BadReply(f"{call} reply has msg_type {reply.get('msg_type')!r}")
        bad = schemas.problems(call, "receive", reply)
        if bad:
            raise BadReply(f"{call} reply fails Deriv's receive schema: {'; '.join(bad[:3])}")
        return reply

    # ---- the calls fund-agent uses ----

    def balance(self, loginid: str | None = None) -> tuple[Decimal, str]:
        request: dict[str, Any] = {"balance": 1}
        if loginid:
            # always named: right after a reconnect the session is not known yet when the request is built,
            # and without `account` Deriv answers for the token's default account
            request["account"] = loginid
        body = self.call(request).get("balance")
        if not isinstance(body, dict) or not isinstance(body.get("balance"), (int, Decimal)):
            raise BadReply("balance reply without a balance")
        if loginid and body.get("loginid") != loginid:
            raise BadReply(f"balance reply is for {body.get('loginid')!r}, not {loginid}")
        return Decimal(body["balance"]), str(body.get("currency", ""))

    def _transfer(self, request: dict[str, Any], call: str, timeout: float | None) -> int:
        reply = self.call(request, timeout)
        txn = reply.get("binary_transaction_id")
        if reply.get(call) != 1 or not isinstance(txn, int) or isinstance(txn, bool):
            raise BadReply(f"{call} reply without success and a binary_transaction_id")
        return txn

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
        body = self.call(request).get("statement") or {}
        rows = body.get("transactions")
        if not isinstance(rows, list):
            raise BadReply("statement reply without transactions")
        return rows

    def website_status(self) -> dict[str, Any]:
        return self.call({"website_status": 1}).get("website_status") or {}

    def get_limits(self) -> dict[str, Any]:
        return self.call({"get_limits": 1}).get("get_limits") or {}

    def mt5_get_settings(self, login: str) -> dict[str, Any]:
        return self.call({"mt5_get_settings": 1, "login": login}).get("mt5_get_settings") or {}
