"""A fake of the official MetaTrader5 package (Windows-only) with the same surface, for tests on Linux.

Same function names, RES_* constants, namedtuple results with the real field names in the real order, and
last_error() as (code, text). Behaviour is scripted by the JSON file named in $FAKE_MT5_SCRIPT, re-read on
every call so that a test can change the terminal's state while the probe runs:
  {"mode": "ok" | "not_found" | "no_ipc" | "ipc_timeout" | "auth_failed" | "disconnected" | "wrong_login"
           | "hang",
   "delay": seconds, "account": {field: value, ...}}
"""

import json
import os
import time
from collections import namedtuple

__version__ = "5.0.5120-fake"

RES_S_OK = 1
RES_E_FAIL = -1
RES_E_INVALID_PARAMS = -2
RES_E_NO_MEMORY = -3
RES_E_NOT_FOUND = -4
RES_E_INVALID_VERSION = -5
RES_E_AUTH_FAILED = -6
RES_E_UNSUPPORTED = -7
RES_E_AUTO_TRADING_DISABLED = -8
RES_E_INTERNAL_FAIL = -10000
RES_E_INTERNAL_FAIL_SEND = -10001
RES_E_INTERNAL_FAIL_RECEIVE = -10002
RES_E_INTERNAL_FAIL_INIT = -10003
RES_E_INTERNAL_FAIL_CONNECT = -10004
RES_E_INTERNAL_FAIL_TIMEOUT = -10005

AccountInfo = namedtuple("AccountInfo", [
    "login", "trade_mode", "leverage", "limit_orders", "margin_so_mode", "trade_allowed", "trade_expert",
    "margin_mode", "currency_digits", "fifo_close", "balance", "credit", "profit", "equity", "margin",
    "margin_free", "margin_level", "margin_so_call", "margin_so_so", "margin_initial", "margin_maintenance",
    "assets", "liabilities", "commission_blocked", "name", "server", "currency", "company"])
TerminalInfo = namedtuple("TerminalInfo", [
    "community_account", "community_connection", "connected", "dlls_allowed", "trade_allowed",
    "tradeapi_disabled", "email_enabled", "ftp_enabled", "notifications_enabled", "mqid", "build", "maxbars",
    "codepage", "ping_last", "community_balance", "retransmission", "company", "name", "language", "path",
    "data_path", "commondata_path"])

TradeDeal = namedtuple("TradeDeal", [
    "ticket", "order", "time", "time_msc", "type", "entry", "magic", "position_id", "reason", "volume", "price",
    "commission", "swap", "profit", "fee", "symbol", "comment", "external_id"])

DEAL_TYPE_BUY = 0
DEAL_TYPE_SELL = 1
DEAL_TYPE_BALANCE = 2
DEAL_ENTRY_IN = 0
DEAL_ENTRY_OUT = 1

_state = {"initialized": False, "login": None, "error": (RES_S_OK, "Success")}


def _script():
    path = os.environ.get("FAKE_MT5_SCRIPT")
    if not path:
        return {"mode": "ok"}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _fail(code, text):
    _state["error"] = (code, text)
    return None


def _ok():
    _state["error"] = (RES_S_OK, "Success")


def initialize(path=None, *, login=None, password=None, server=None, timeout=60000, portable=False):
    script = _script()
    mode = script.get("mode", "ok")
    time.sleep(float(script.get("delay", 0)))
    if mode == "not_found":
        _fail(RES_E_INTERNAL_FAIL_INIT, "IPC initialize failed, MetaTrader 5 x64 not found")
        return False
    if mode == "auth_failed":
        _fail(RES_E_AUTH_FAILED, "Authorization failed")
        return False
    if mode == "ipc_timeout":
        time.sleep(min(timeout / 1000.0, float(script.get("ipc_delay", 1))))
        _fail(RES_E_INTERNAL_FAIL_TIMEOUT, "IPC timeout")
        return False
    _state["initialized"] = True
    _state["login"] = login
    _ok()
    return True


def shutdown():
    _state["initialized"] = False
    _ok()
    return True


def version():
    if not _state["initialized"]:
        return _fail(RES_E_INTERNAL_FAIL_CONNECT, "No IPC connection")
    _ok()
    return (500, 5120, "12 Jun 2026")


def last_error():
    return _state["error"]


def _account(script):
    login = script.get("account", {}).get("login", _state["login"] or 130002534)
    if script.get("mode") == "wrong_login":
        login = 999999
    fields = dict(login=login, trade_mode=2, leverage=500, limit_orders=200, margin_so_mode=0, trade_allowed=True,
                  trade_expert=True, margin_mode=2, currency_digits=2, fifo_close=False, balance=1000.0, credit=0.0,
                  profit=-49.88, equity=950.12, margin=10.0, margin_free=940.12, margin_level=9501.2,
                  margin_so_call=100.0, margin_so_so=50.0, margin_initial=0.0, margin_maintenance=0.0, assets=0.0,
                  liabilities=0.0, commission_blocked=0.0, name="Test Trader", server="DerivSVG-Server",
                  currency="USD", company="Deriv.com Limited")
    fields.update({k: v for k, v in script.get("account", {}).items() if k in fields})
    return AccountInfo(**fields)


def account_info():
    script = _script()
    mode = script.get("mode", "ok")
    if mode == "hang":
        time.sleep(3600)
    if not _state["initialized"]:
        return _fail(RES_E_INTERNAL_FAIL_CONNECT, "No IPC connection")
    if mode == "no_ipc":
        return _fail(RES_E_INTERNAL_FAIL_CONNECT, "No IPC connection")
    if mode == "ipc_timeout":
        return _fail(RES_E_INTERNAL_FAIL_TIMEOUT, "IPC timeout")
    _ok()
    return _account(script)


def terminal_info():
    script = _script()
    if not _state["initialized"]:
        return _fail(RES_E_INTERNAL_FAIL_CONNECT, "No IPC connection")
    _ok()
    return TerminalInfo(community_account=False, community_connection=False,
                        connected=script.get("mode") != "disconnected", dlls_allowed=False, trade_allowed=True,
                        tradeapi_disabled=False, email_enabled=False, ftp_enabled=False, notifications_enabled=False,
                        mqid=False, build=5120, maxbars=100000, codepage=0, ping_last=41250, community_balance=0.0,
                        retransmission=0.0, company="Deriv.com Limited", name="Deriv MT5", language="English",
                        path="C:\\Program Files\\MetaTrader 5", data_path="C:\\Program Files\\MetaTrader 5",
                        commondata_path="C:\\Users\\trader\\AppData\\Roaming\\MetaQuotes\\Terminal\\Common")


def history_deals_get(date_from=None, date_to=None, group=None, ticket=None, position=None):
    """Deals from the script's "deals" list (dicts of TradeDeal fields; missing ones default), whose `time`
    (epoch seconds) falls in [date_from, date_to]; a tuple, or None with last_error() set, as the real one."""
    script = _script()
    if not _state["initialized"] or script.get("mode") in ("no_ipc", "hang"):
        return _fail(RES_E_INTERNAL_FAIL_CONNECT, "No IPC connection")

    def seconds(value):
        return int(value.timestamp()) if hasattr(value, "timestamp") else int(value)

    low, high = seconds(date_from), seconds(date_to)
    defaults = dict(ticket=0, order=0, time=0, time_msc=0, type=DEAL_TYPE_BALANCE, entry=DEAL_ENTRY_IN, magic=0,
                    position_id=0, reason=0, volume=0.0, price=0.0, commission=0.0, swap=0.0, profit=0.0, fee=0.0,
                    symbol="", comment="", external_id="")
    deals = []
    for number, spec in enumerate(script.get("deals", []), start=1):
        fields = {**defaults, "ticket": number, **{k: v for k, v in spec.items() if k in defaults}}
        fields["time_msc"] = fields["time_msc"] or fields["time"] * 1000
        if low <= fields["time"] <= high:
            deals.append(TradeDeal(**fields))
    _ok()
    return tuple(deals)


def login(*args, **kwargs):
    raise AssertionError("fund-agent must never call login(): initialize() with the account does it")
