"""The MT5 probe: a tiny program that owns one MetaTrader 5 terminal connection and answers JSON lines.

It imports only the standard library and the official `MetaTrader5` package, so it runs under any Windows
Python, including one under Wine on a Linux VPS (`wine python.exe mt5_probe.py`). fund-agent starts one probe
per account and kills it when it does not answer in time: the package holds the GIL for the length of each call
(up to its 60 s timeout) and keeps one IPC client per process, so it must never run inside the agent itself.

Requests, one JSON object a line on stdin:
  {"op": "init", "path": "C:\\MT5\\terminal64.exe", "login": 130002534, "server": "...", "password": "...",
   "timeout": 10000, "portable": false}
  {"op": "snapshot"}
  {"op": "deals", "from": <epoch seconds>, "to": <epoch seconds>}   (history_deals_get: the backtest)
  {"op": "shutdown"}
Replies, one a line on stdout: {"ok": true, ...} or {"ok": false, "code": <last_error code>, "error": "<text>"}.
The password arrives on stdin only: never in argv or the environment of the probe.
"""

import json
import sys
import time

RECOVERABLE = (-10001, -10002, -10003, -10004, -10005, -1)  # IPC and generic failures: re-initialize


def _error(mt5, what):
    try:
        code, text = mt5.last_error()
    except Exception:  # noqa: BLE001 - a broken package still gets a clear answer
        code, text = -1, "last_error() failed"
    return {"ok": False, "code": int(code), "error": f"{what}: {text}"}


def _plain(value):
    """Floats travel as their shortest repr text, so the agent reads them exactly as Python saw them."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _as_dict(record):
    if record is None:
        return None
    if hasattr(record, "_asdict"):
        return {k: _plain(v) for k, v in record._asdict().items()}
    return {k: _plain(getattr(record, k)) for k in dir(record) if not k.startswith("_")}


class Probe:
    def __init__(self, mt5):
        self.mt5 = mt5
        self.settings = None
        self.initialized = False
        self.failures = 0
        self.next_retry = 0.0

    def init(self, request):
        self.settings = {k: request[k] for k in ("path", "login", "server", "password", "timeout", "portable")
                         if request.get(k) is not None}
        return self._initialize()

    def _initialize(self):
        if self.settings is None:
            return {"ok": False, "code": -2, "error": "not initialized: send an init request first"}
        kwargs = dict(self.settings)
        path = kwargs.pop("path", None)
        ok = self.mt5.initialize(path, **kwargs) if path else self.mt5.initialize(**kwargs)
        if not ok:
            self.initialized = False
            self.failures += 1
            self.next_retry = time.monotonic() + min(60.0, 2.0 ** min(self.failures, 6))
            return _error(self.mt5, "initialize failed")
        self.initialized = True
        self.failures = 0
        return {"ok": True, "version": [_plain(v) for v in (self.mt5.version() or ())]}

    def _recover(self):
        """shutdown() then initialize(), with backoff between attempts. Never login() in a loop."""
        if time.monotonic() < self.next_retry:
            return {"ok": False, "code": -10004, "error": "terminal not reachable; waiting before the next try"}
        try:
            self.mt5.shutdown()
        except Exception:  # noqa: BLE001
            pass
        return self._initialize()

    def snapshot(self, request):
        if not self.initialized:
            recovered = self._recover()
            if not recovered["ok"]:
                return recovered
        account = self.mt5.account_info()
        if account is None:
            reply = _error(self.mt5, "account_info failed")
            if reply["code"] in RECOVERABLE:
                self.initialized = False
            return reply
        terminal = self.mt5.terminal_info()
        if terminal is None:
            reply = _error(self.mt5, "terminal_info failed")
            if reply["code"] in RECOVERABLE:
                self.initialized = False
            return reply
        expected = (self.settings or {}).get("login")
        if expected is not None and int(account.login) != int(expected):
            return {"ok": False, "code": -6, "error": f"the terminal is logged in to {account.login}, not {expected}"}
        return {"ok": True, "account": _as_dict(account), "terminal": _as_dict(terminal),
                "version": [_plain(v) for v in (self.mt5.version() or ())], "time": time.time()}

    def deals(self, request):
        """The account's deals in [from, to] (epoch seconds), as history_deals_get returns them."""
        if not self.initialized:
            recovered = self._recover()
            if not recovered["ok"]:
                return recovered
        from datetime import datetime, timezone

        # timezone.utc, not datetime.UTC: the probe runs under whatever Windows Python the terminal has
        start = datetime.fromtimestamp(int(request.get("from", 0)), tz=timezone.utc)  # noqa: UP017
        end = datetime.fromtimestamp(int(request.get("to", time.time() + 86400)), tz=timezone.utc)  # noqa: UP017
        deals = self.mt5.history_deals_get(start, end)
        if deals is None:
            return _error(self.mt5, "history_deals_get failed")
        return {"ok": True, "deals": [_as_dict(deal) for deal in deals]}

    def shutdown(self, request):
        try:
            self.mt5.shutdown()
        finally:
            self.initialized = False
        return {"ok": True}


def main():
    try:
        import MetaTrader5 as mt5
    except ImportError as exc:
        print(json.dumps({"ok": False, "code": -7, "error": f"cannot import MetaTrader5: {exc}"}), flush=True)
        return 1
    probe = Probe(mt5)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        request = {}
        try:
            request = json.loads(line)
            op = request.get("op")
            handler = {"init": probe.init, "snapshot": probe.snapshot, "deals": probe.deals,
                       "shutdown": probe.shutdown}.get(op)
            reply = handler(request) if handler else {"ok": False, "code": -2, "error": f"unknown op {op!r}"}
        except Exception as exc:  # noqa: BLE001 - the probe answers every line, whatever happens
            reply = {"ok": False, "code": -1, "error": f"probe error: {type(exc).__name__}: {exc}"}
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request["id"]
        print(json.dumps(reply), flush=True)
        if request.get("op") == "shutdown":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
