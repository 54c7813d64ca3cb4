"""The HTTP endpoint: health, metrics, and the EA's intake (secret, size, format, loopback)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from decimal import Decimal

import pytest

from agent.config import ConfigError
from agent.equity.base import NoReading
from agent.equity.intake import IntakeStore, WithIntake
from agent.http_api import HttpApi, parse_listen

STATUS = {"schema": 1, "login": 130002534, "server": "DerivSVG-Server", "currency": "USD", "balance": 1000.00,
          "equity": 950.12, "margin": 10.00, "margin_free": 940.12, "margin_level": 9501.20, "positions": 2,
          "connected": True, "time": int(time.time())}


@pytest.fixture
def api():
    store = IntakeStore()
    server = HttpApi(("127.0.0.1", 0), lambda: (False, {"status": "unhealthy"}), lambda: "fund_agent_up 1\n",
                     store, "s3cret-intake")
    server.start()
    yield server, store
    server.stop()


def post(port: int, body: bytes, secret: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Fund-Agent-Secret"] = secret
    request = urllib.request.Request(f"http://127.0.0.1:{port}/status", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_health_and_metrics(api):
    server, _ = api
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=3)
    assert info.value.code == 503
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=3) as response:
        assert response.read() == b"fund_agent_up 1\n"
        assert response.headers["Content-Type"].startswith("text/plain")


def test_intake_takes_a_good_status_and_the_source_uses_it(api):
    server, store = api
    status, body = post(server.port, json.dumps(STATUS).encode(), "s3cret-intake")
    assert status == 200, body
    snapshot = WithIntake(None, store).read("MTR130002534")
    assert snapshot.equity == Decimal("950.12") and snapshot.source == "ea-file"
    with pytest.raises(NoReading):
        WithIntake(None, store).read("MTR999")


def test_intake_refuses_wrong_secret_bad_json_and_keeps_a_final_disconnect(api):
    server, store = api
    assert post(server.port, json.dumps(STATUS).encode(), "wrong")[0] == 401
    assert post(server.port, json.dumps(STATUS).encode(), None)[0] == 401
    assert post(server.port, b'{"schema":1,"login":130002534,"equ', "s3cret-intake")[0] == 400
    assert server.intake_rejected == 3
    final = {**STATUS, "connected": False, "time": STATUS["time"] + 1}
    assert post(server.port, json.dumps(final).encode(), "s3cret-intake")[0] == 200
    assert store.get("130002534").connected is False  # the last word replaces the last good reading


def test_listen_is_loopback_only_unless_allowed():
    assert parse_listen("127.0.0.1:8787", False) == ("127.0.0.1", 8787)
    assert parse_listen("[::1]:8787", False) == ("::1", 8787)
    with pytest.raises(ConfigError):
        parse_listen("0.0.0.0:8787", False)
    assert parse_listen("0.0.0.0:8787", True) == ("0.0.0.0", 8787)


def test_intake_refuses_a_status_dated_in_the_future_so_it_cannot_shadow_later_ones(api):
    server, store = api
    ahead = {**STATUS, "time": int(time.time()) + 86400, "equity": 100.0}
    status, body = post(server.port, json.dumps(ahead).encode(), "s3cret-intake")
    assert status == 400 and "in the future" in body["message"]
    assert store.get("130002534") is None
    status, _ = post(server.port, json.dumps({**STATUS, "time": int(time.time())}).encode(), "s3cret-intake")
    assert status == 200 and store.get("130002534").equity == Decimal("950.12")
