"""Hostile HTTP clients over raw sockets: each gets a reply or a closed connection, and one log line, never a
traceback; stalled clients are cut off by the timeout; statuses for logins no policy manages are refused."""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
import time

import pytest

from agent.equity.intake import IntakeStore
from agent.http_api import HttpApi

SECRET = "s3cret-intake"
TIMEOUT = 0.6


def status_body(login: int = 130002534, **extra: object) -> bytes:
    body = {"schema": 1, "login": login, "server": "DerivSVG-Server", "currency": "USD", "balance": 1000,
            "equity": 950.12, "margin": 10, "margin_free": 940.12, "margin_level": 9501.2, "positions": 2,
            "connected": True, "time": int(time.time()), **extra}
    return json.dumps(body).encode()


@pytest.fixture
def api(caplog):
    caplog.set_level(logging.DEBUG, logger="agent.http")
    store = IntakeStore()
    server = HttpApi(("127.0.0.1", 0), lambda: (True, {"status": "ok"}), lambda: "fund_agent_up 1\n", store, SECRET,
                     managed=lambda: {"130002534"}, timeout=TIMEOUT, max_connections=4)
    server.start()
    yield server, store
    server.stop()


def request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send one raw request and read the reply until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def post_head(length: bytes, secret: str = SECRET) -> bytes:
    return (b"POST /status HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"X-Fund-Agent-Secret: " + secret.encode() + b"\r\nContent-Length: " + length + b"\r\n\r\n")


def reply_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("agent.http") and r.levelno >= logging.WARNING]


def wait_for_warnings(caplog, count: int, within: float = 3.0) -> list[logging.LogRecord]:
    deadline = time.monotonic() + within
    while len(warnings(caplog)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # and no second line straight after
    return warnings(caplog)


def assert_one_clean_line(caplog, capsys) -> logging.LogRecord:
    found = wait_for_warnings(caplog, 1)
    assert len(found) == 1, [r.getMessage() for r in found]
    record = found[0]
    assert record.exc_info is None and "\n" not in record.getMessage()
    assert "Traceback" not in caplog.text
    assert "Traceback" not in capsys.readouterr().err
    return record


NESTED_22: object = 1
for _ in range(22):
    NESTED_22 = [NESTED_22]


@pytest.mark.parametrize("body", [b"[" * 60_000, b'{"a":' * 13_000, status_body(server=NESTED_22)])
def test_a_deeply_nested_body_gets_400_and_one_line(api, caplog, capsys, body):
    server, store = api
    status, reply = reply_of(request(server.port, post_head(str(len(body)).encode()), body))
    assert status == 400 and "nested" in reply["message"] and reply["ok"] is False
    assert "400" in assert_one_clean_line(caplog, capsys).getMessage()
    assert store.get("130002534") is None and server.intake_rejected == 1


@pytest.mark.parametrize("length", [b"\xb2", b"\xc2\xb2", b"\xb9\xb2", b"-1", b"+12", b"1_0", b"0x10", b"12 34"])
def test_a_content_length_that_is_not_ascii_digits_gets_400_and_one_line(api, caplog, capsys, length):
    server, _ = api
    status, reply = reply_of(request(server.port, post_head(length), b"{}"))
    assert status == 400 and "Content-Length" in reply["message"]
    assert_one_clean_line(caplog, capsys)


@pytest.mark.parametrize("length, expected", [(b"65537", 413), (b"9" * 5000, 413), (b"000000000000000000002", 400)])
def test_content_length_bounds(api, caplog, length, expected):
    server, _ = api
    status, _ = reply_of(request(server.port, post_head(length), b"{}"))
    assert status == expected


def test_conflicting_content_lengths_and_chunked_bodies_are_refused(api):
    server, _ = api
    body = status_body()
    head = post_head(str(len(body)).encode())
    doubled = head.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n")
    assert reply_of(request(server.port, doubled, body))[0] == 400
    chunked = head.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert reply_of(request(server.port, chunked, body))[0] == 411


def test_a_reset_connection_is_one_line(api, caplog, capsys):
    server, _ = api
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"POST /status HTTP/1.1\r\nContent-Length: 500\r\n")  # headers never finished
    time.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST instead of FIN
    record = assert_one_clean_line(caplog, capsys)
    assert "dropped" in record.getMessage() or "ConnectionReset" in record.getMessage()


def test_a_reset_during_the_body_is_one_line(api, caplog, capsys):
    server, _ = api
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(post_head(b"1000") + b'{"schema":')
    time.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert_one_clean_line(caplog, capsys)


def closed_within(sock: socket.socket, seconds: float, dribble: bytes = b"") -> float:
    """Wait (sending `dribble` a byte at a time) until the server closes; the seconds it took."""
    started = time.monotonic()
    sock.settimeout(0.05)
    pending = list(dribble)
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(1024) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except ConnectionError:
            return time.monotonic() - started
        if pending:
            try:
                sock.sendall(bytes([pending.pop(0)]))
            except ConnectionError:
                return time.monotonic() - started
            time.sleep(0.05)
    raise AssertionError(f"the server kept a stalled connection open for {seconds}s")


def test_a_silent_client_is_closed_by_the_timeout(api, caplog, capsys):
    server, _ = api
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /status HTT")
        assert closed_within(sock, TIMEOUT + 2) < TIMEOUT + 1
    assert "timed out" in assert_one_clean_line(caplog, capsys).getMessage()


def test_a_slow_loris_dribbling_headers_is_closed_by_the_timeout(api, caplog, capsys):
    server, _ = api
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /status HTTP/1.1\r\n")
        took = closed_within(sock, TIMEOUT + 3, dribble=b"X-Slow: " + b"a" * 200)  # a byte every ~0.1 s
        assert took < TIMEOUT + 1
    assert_one_clean_line(caplog, capsys)


def test_a_body_that_never_arrives_is_closed_by_the_timeout(api, caplog, capsys):
    server, store = api
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(post_head(b"500") + b'{"schema":1')
        assert closed_within(sock, TIMEOUT + 2) < TIMEOUT + 1
    assert_one_clean_line(caplog, capsys)
    assert store.get("130002534") is None


def test_stalled_clients_cannot_take_every_thread(api, caplog):
    server, _ = api
    stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(6)]
    try:
        time.sleep(0.2)
        assert any("connections at once" in r.getMessage() for r in warnings(caplog))
    finally:
        for sock in stalled:
            sock.close()
    time.sleep(TIMEOUT + 0.3)  # the stalled ones time out and free their slots
    raw = request(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.0 200")


def test_an_unmanaged_login_gets_404_and_is_counted(api, caplog, capsys):
    server, store = api
    body = status_body(login=130009999)
    status, reply = reply_of(request(server.port, post_head(str(len(body)).encode()), body))
    assert status == 404 and "not managed" in reply["message"] and "\n" not in reply["message"]
    assert server.intake_unmanaged == 1 and server.intake_accepted == 0
    assert store.get("130009999") is None
    assert_one_clean_line(caplog, capsys)
    body = status_body()
    status, reply = reply_of(request(server.port, post_head(str(len(body)).encode()), body))
    assert status == 200 and store.get("130002534") is not None and server.intake_accepted == 1


def test_without_a_managed_set_any_login_is_taken(caplog):
    store = IntakeStore()
    server = HttpApi(("127.0.0.1", 0), lambda: (True, {}), lambda: "", store, SECRET, timeout=TIMEOUT)
    server.start()
    try:
        body = status_body(login=130009999)
        assert reply_of(request(server.port, post_head(str(len(body)).encode()), body))[0] == 200
    finally:
        server.stop()


def test_a_managed_set_that_cannot_be_read_is_503(caplog):
    def broken() -> set[str]:
        raise RuntimeError("policies are being reloaded")

    server = HttpApi(("127.0.0.1", 0), lambda: (True, {}), lambda: "", IntakeStore(), SECRET, managed=broken,
                     timeout=TIMEOUT)
    body = status_body()
    assert server.take_status(SECRET, str(len(body)), io.BytesIO(body))[0] == 503
    server.server.server_close()


def test_a_future_dated_post_is_still_refused(api):
    server, store = api
    body = status_body(time=int(time.time()) + 86400)
    status, reply = reply_of(request(server.port, post_head(str(len(body)).encode()), body))
    assert status == 400 and "in the future" in reply["message"] and store.get("130002534") is None


def test_garbage_request_lines_and_a_failing_endpoint_are_one_line(caplog, capsys):
    def broken_health() -> tuple[bool, dict]:
        raise RuntimeError("boom\nsecond line")

    server = HttpApi(("127.0.0.1", 0), broken_health, lambda: "", IntakeStore(), SECRET, timeout=TIMEOUT)
    server.start()
    caplog.set_level(logging.DEBUG, logger="agent.http")
    try:
        assert b"400" in request(server.port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")  # an HTTP/0.9 reply
        assert_one_clean_line(caplog, capsys)
        caplog.clear()
        assert request(server.port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 500")
        found = wait_for_warnings(caplog, 1)
        assert len(found) == 1 and "boom\\nsecond line" in found[0].getMessage()
        assert "Traceback" not in caplog.text and "Traceback" not in capsys.readouterr().err
    finally:
        server.stop()
