"""The service's small HTTP endpoint: GET / (the status page), GET /healthz, GET /metrics, POST /status (the EA's
intake).

Loopback only unless the operator says otherwise; the intake needs the shared secret in X-Fund-Agent-Secret.
Hostile clients get a bounded hearing: each connection has `timeout` seconds to deliver its whole request, the
body is at most 64 KiB of JSON nested at most 20 deep, and every refused request or dropped connection is one
warning line in the log (never a traceback).
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.config import ConfigError
from agent.equity.base import NoReading
from agent.equity.ea_file import load_status, status_from_data
from agent.equity.intake import IntakeStore
from agent.policy.evaluate import MAX_CLOCK_SKEW
from agent.safe_io import one_line
from agent.timeutil import iso, utcnow

log = logging.getLogger("agent.http")
MAX_BODY = 64 * 1024
DEFAULT_TIMEOUT = 10.0  # seconds a connection has to deliver its whole request
MAX_CONNECTIONS = 32
_ASCII_DIGITS = re.compile(r"[0-9]+")  # not str.isdigit(): that is True for "²" and int() then fails


def parse_listen(text: str, allow_remote: bool) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not _ASCII_DIGITS.fullmatch(port) or len(port) > 5 or int(port) > 65535:
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


class _DeadlineReader(io.RawIOBase):
    """A socket's input with one deadline for the whole request: a client dribbling a byte at a time (slow
    loris) is cut off as surely as one that sends nothing."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__()
        self.sock = sock
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"request not complete within {self.timeout:g}s")
        self.sock.settimeout(min(self.timeout, left))
        return self.sock.recv_into(buffer)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listen: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        super().__init__(listen, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """At most max_connections at once: a flood of stalled clients cannot take a thread each."""
        if not self._slots.acquire(blocking=False):
            log.warning("http %s: more than %d connections at once: closed", client_address[0],
                        self.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """The base class prints a traceback to stderr; one log line is enough (and the handler catches the
        usual network failures before they get here)."""
        exc = sys.exc_info()[1]
        host = client_address[0] if isinstance(client_address, tuple) and client_address else client_address
        log.warning("http %s: request failed: %s", host, one_line(f"{exc.__class__.__name__}: {exc}"))


class HttpApi:
    def __init__(self, listen: tuple[str, int], health: Callable[[], tuple[bool, dict[str, Any]]],
                 metrics: Callable[[], str], intake: IntakeStore | None = None,
                 intake_secret: str | None = None, managed: Callable[[], set[str]] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                 page: Callable[[], str] | None = None, token: str | None = None) -> None:
        self.health = health
        self.metrics = metrics
        self.page = page  # the status page; None: GET / is 404
        self.token = token  # bearer token for GET / and /metrics (required when bound beyond loopback)
        self.intake = intake
        self.intake_secret = intake_secret
        self.managed = managed  # numeric logins ("130002534") some policy manages; None: take any login
        self.timeout = timeout
        self.intake_accepted = 0
        self.intake_rejected = 0
        self.intake_unmanaged = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fund-agent"

            def setup(self) -> None:
                super().setup()  # sets the socket timeout (self.timeout) for the replies
                self.rfile.close()
                self.rfile = io.BufferedReader(_DeadlineReader(self.connection, api.timeout))

            def handle(self) -> None:
                try:
                    super().handle()
                except (ConnectionError, TimeoutError) as exc:  # reset, broken pipe, aborted, timed out
                    self.log_error("connection dropped: %s", exc.__class__.__name__)
                except OSError as exc:
                    self.log_error("connection failed: %s", exc.__class__.__name__)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                log.debug("http %s", one_line(format % args))

            def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
                """Bad request lines, timeouts, dropped connections: one warning line each."""
                log.warning("http %s: %s", self.client_address[0], one_line(format % args))

            def _reply(self, status: int, body: str, content_type: str = "application/json",
                       extra: dict[str, str] | None = None) -> None:
                data = body.encode("utf-8")
                self.connection.settimeout(api.timeout)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                if content_type.startswith("text/html"):  # nothing but the page itself: no script, no fetch
                    self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                     "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
                    self.send_header("X-Frame-Options", "DENY")
                for name, value in (extra or {}).items():
                    self.send_header(name, value)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def _refuse(self, status: int, message: str) -> None:
                self.log_error("%s %s refused: %d %s", self.command, one_line(self.path, 80), status, message)
                self._reply(status, json.dumps({"ok": False, "message": message}))

            def _failed(self, exc: Exception) -> None:
                log.error("http %s: %s %s failed: %s", self.client_address[0], self.command,
                          one_line(self.path, 80), one_line(f"{exc.__class__.__name__}: {exc}"))
                self._reply(500, json.dumps({"ok": False, "message": "internal error"}))

            def _authorized(self) -> bool:
                """The bearer token, compared in constant time; never logged or echoed."""
                if not api.token:
                    return True
                given = self.headers.get("Authorization") or ""
                scheme, _, value = given.partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    value.strip().encode("utf-8", "surrogatepass"), api.token.encode("utf-8", "surrogatepass"))

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                try:
                    if self.path in ("/", "/metrics") and not self._authorized():
                        message = "a bearer token is needed (Authorization: Bearer ...)"
                        self.log_error("GET %s refused: 401 %s", one_line(self.path, 80), message)
                        self._reply(401, json.dumps({"ok": False, "message": message}),
                                    extra={"WWW-Authenticate": 'Bearer realm="fund-agent"'})
                        return
                    if self.path == "/" and api.page is not None:
                        self._reply(200, api.page(), "text/html; charset=utf-8")
                        return
                    if self.path == "/healthz":
                        ok, body = api.health()
                        self._reply(200 if ok else 503, json.dumps(body))
                        return
                    if self.path == "/metrics":
                        self._reply(200, api.metrics(), "text/plain; version=0.0.4; charset=utf-8")
                        return
                except (ConnectionError, TimeoutError):
                    raise
                except Exception as exc:  # a bug behind the endpoint: 500 and one line, not a hung client
                    self._failed(exc)
                    return
                self._refuse(404, "not found")

            def do_POST(self) -> None:  # noqa: N802
                if self.path != "/status":
                    self._refuse(404, "not found")
                    return
                lengths = {value.strip(" \t") for value in self.headers.get_all("Content-Length") or []}
                if len(lengths) > 1:
                    self._refuse(400, "conflicting Content-Length headers")
                    return
                if self.headers.get("Transfer-Encoding") is not None:
                    self._refuse(411, "a chunked body is not accepted; send Content-Length")
                    return
                try:
                    status, message = api.take_status(self.headers.get("X-Fund-Agent-Secret"),
                                                      self.headers.get("Content-Length"), self.rfile)
                except (ConnectionError, TimeoutError):
                    raise
                except Exception as exc:
                    self._failed(exc)
                    return
                if status != 200:
                    self._refuse(status, message)
                    return
                self._reply(status, json.dumps({"ok": True, "message": message}))

        Handler.timeout = timeout
        self.server = _Server(listen, Handler, max_connections)
        self.port = self.server.server_address[1]
        self._thread: threading.Thread | None = None

    def take_status(self, secret: str | None, length: str | None, stream: Any) -> tuple[int, str]:
        if self.intake is None or not self.intake_secret:
            return 404, "the status intake is not enabled (http.intake_secret_env)"
        if secret is None or not hmac.compare_digest(secret.encode("utf-8", "surrogatepass"),
                                                     self.intake_secret.encode("utf-8", "surrogatepass")):
            self.intake_rejected += 1
            return 401, "missing or wrong X-Fund-Agent-Secret"
        if length is None:
            self.intake_rejected += 1
            return 411, "a JSON body of at most 64 KiB is needed (Content-Length is missing)"
        digits = length.strip(" \t")
        if not _ASCII_DIGITS.fullmatch(digits):
            self.intake_rejected += 1
            return 400, f"Content-Length {one_line(repr(length), 40)} is not a plain decimal number"
        digits = digits.lstrip("0") or "0"
        if len(digits) > 9 or int(digits) > MAX_BODY:
            self.intake_rejected += 1
            return 413, "a JSON body of at most 64 KiB is needed"
        raw = stream.read(int(digits))
        try:
            data = load_status(raw, "POSTed status")
            login = data.get("login")
            # a final "connected": false (the EA's OnDeinit) is kept: it must replace the last good reading
            snapshot = status_from_data(data, None, "POSTed status", allow_disconnected=True)
        except NoReading as exc:
            self.intake_rejected += 1
            return 400, str(exc)
        if self.managed is not None:
            try:
                managed = self.managed()
            except Exception as exc:  # the policies are being reloaded, or broken: no way to tell
                log.warning("http: cannot tell which logins are managed: %s", one_line(exc))
                self.intake_rejected += 1
                return 503, "the service cannot tell which logins it manages right now; try again"
            if snapshot.login not in managed:
                self.intake_unmanaged += 1
                return 404, f"login {login} is not managed by any policy: status not taken"
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
