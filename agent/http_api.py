"""The service's small HTTP endpoint: GET /healthz, GET /metrics, POST /status (the EA's intake).

Loopback only unless the operator says otherwise; the intake needs the shared secret in X-Fund-Agent-Secret.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.config import ConfigError
from agent.equity.base import NoReading
from agent.equity.ea_file import parse_status
from agent.equity.intake import IntakeStore
from agent.policy.evaluate import MAX_CLOCK_SKEW
from agent.timeutil import iso, utcnow

log = logging.getLogger("agent.http")
MAX_BODY = 64 * 1024


def parse_listen(text: str, allow_remote: bool) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise ConfigError(f"http.listen must be HOST:PORT, got {text!r}")
    if not allow_remote:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise ConfigError(f"http.listen {text!r} is not a loopback address; set http.allow_remote: true to "
                              "expose it (and put it behind a firewall)")
    return host, int(port)


class HttpApi:
    def __init__(self, listen: tuple[str, int], health: Callable[[], tuple[bool, dict[str, Any]]],
                 metrics: Callable[[], str], intake: IntakeStore | None = None,
                 intake_secret: str | None = None) -> None:
        self.health = health
        self.metrics = metrics
        self.intake = intake
        self.intake_secret = intake_secret
        self.intake_accepted = 0
        self.intake_rejected = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fund-agent"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                log.debug("http %s", format % args)

            def _reply(self, status: int, body: str, content_type: str = "application/json") -> None:
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/healthz":
                    ok, body = api.health()
                    self._reply(200 if ok else 503, json.dumps(body))
                elif self.path == "/metrics":
                    self._reply(200, api.metrics(), "text/plain; version=0.0.4; charset=utf-8")
                else:
                    self._reply(404, json.dumps({"error": "not found"}))

            def do_POST(self) -> None:  # noqa: N802
                if self.path != "/status":
                    self._reply(404, json.dumps({"error": "not found"}))
                    return
                status, message = api.take_status(self.headers.get("X-Fund-Agent-Secret"),
                                                  self.headers.get("Content-Length"), self.rfile)
                self._reply(status, json.dumps({"ok": status == 200, "message": message}))

        self.server = ThreadingHTTPServer(listen, Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread: threading.Thread | None = None

    def take_status(self, secret: str | None, length: str | None, stream: Any) -> tuple[int, str]:
        if self.intake is None or not self.intake_secret:
            return 404, "the status intake is not enabled (http.intake_secret_env)"
        if secret is None or not hmac.compare_digest(secret.encode(), self.intake_secret.encode()):
            self.intake_rejected += 1
            return 401, "missing or wrong X-Fund-Agent-Secret"
        if length is None or not length.isdigit() or int(length) > MAX_BODY:
            self.intake_rejected += 1
            return 413 if length and length.isdigit() else 411, "a JSON body of at most 64 KiB is needed"
        raw = stream.read(int(length))
        try:
            data = json.loads(raw)
            login = data.get("login") if isinstance(data, dict) else None
            # a final "connected": false (the EA's OnDeinit) is kept: it must replace the last good reading
            snapshot = parse_status(raw, str(login) if isinstance(login, int) else "", "POSTed status",
                                    allow_disconnected=True)
        except (ValueError, NoReading) as exc:
            self.intake_rejected += 1
            return 400, str(exc)
        if snapshot.taken_at > utcnow() + MAX_CLOCK_SKEW:
            # kept, it would shadow every later, correct reading until the clocks agree again
            self.intake_rejected += 1
            return 400, (f"status is dated {iso(snapshot.taken_at)}, in the future: refused (check the terminal's "
                         "clock)")
        self.intake.put(snapshot)
        self.intake_accepted += 1
        return 200, f"status of {snapshot.login} taken"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
