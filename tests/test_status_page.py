"""The status page (GET / on the service's listener): rendered by headless Chromium (Debian's package), its
numbers match `fund-agent status --format json`, a screenshot is kept; read-only, escaped, token-guarded."""

from __future__ import annotations

import html.parser
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import MT5, TOKEN, run_cli, write_status

from agent.config import load_config
from agent.http_api import HttpApi
from agent.ledger.db import Ledger
from agent.policy.load import load_policies, policy_files
from agent.status_page import page_data, render_page
from agent.timeutil import utcnow

ENV = {"DERIV_API_TOKEN": TOKEN}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


def chromium() -> str:
    """The browser, or skip saying why (the test never downloads one)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if found:
            try:
                subprocess.run([found, "--version"], capture_output=True, timeout=30, check=True)
            except (OSError, subprocess.SubprocessError) as exc:
                pytest.skip(f"{found} does not start ({exc}); install Debian's chromium package")
            return found
    pytest.skip("no Chromium on this machine: `apt-get install chromium` (Debian) to run the status page test")


def browse(browser: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
                          capture_output=True, text=True, timeout=120)


class _Fields(html.parser.HTMLParser):
    """data-field / data-window values per account from the DOM Chromium dumped."""

    def __init__(self) -> None:
        super().__init__()
        self.accounts: dict[str, dict[str, str]] = {}
        self._account: str | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("data-account"):
            self._account = a["data-account"]
            self.accounts[self._account] = {}
        elif self._account and a.get("data-field") == "last_equity_age_s":
            self.accounts[self._account]["last_equity_age_s"] = a.get("data-value") or ""
        elif self._account and (a.get("data-field") or a.get("data-window")):
            self._field = a.get("data-field") or f"window:{a['data-window']}"

    def handle_data(self, data: str) -> None:
        if self._account and self._field:
            self.accounts[self._account][self._field] = self.accounts[self._account].get(self._field, "") + data

    def handle_endtag(self, tag: str) -> None:
        self._field = None


def serve_page(workspace: Path, token: str | None = None) -> tuple[HttpApi, Ledger]:
    config = load_config(workspace / "fund-agent.yaml")
    policies, _ = load_policies(policy_files(config.policies))
    ledger = Ledger.open(config.database)

    def page() -> str:
        with ledger.reader() as session:
            return render_page(page_data(session, policies, utcnow()), "test-host")

    api = HttpApi(("127.0.0.1", 0), lambda: (True, {}), lambda: "", page=page, token=token)
    api.start()
    return api, ledger


def test_the_page_renders_in_chromium_and_matches_status_json(workspace, fake, tmp_path):
    browser = chromium()
    write_status(workspace / "status", equity="450.00")
    assert run_cli("run", "--once", cwd=workspace, env=ENV).returncode == 0  # a top-up: a transfer to mark
    write_status(workspace / "status", equity="1000.00")
    run_cli("run", "--once", cwd=workspace, env=ENV)
    status = json.loads(run_cli("status", "--format", "json", cwd=workspace).stdout)
    api, ledger = serve_page(workspace)
    try:
        url = f"http://127.0.0.1:{api.port}/"
        dom = browse(browser, url, tmp_path / "profile-dom", "--dump-dom")
        assert dom.returncode == 0 and "<section" in dom.stdout, dom.stderr[-2000:]
        shot = tmp_path / "status-page.png"
        done = browse(browser, url, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1000,1400")
        assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", done.stderr[-2000:]
        print(f"status page screenshot: {shot}")
    finally:
        api.stop()
        ledger.close()
    fields = _Fields()
    fields.feed(dom.stdout)
    assert set(fields.accounts) == {row["account"] for row in status}
    for row in status:
        shown = fields.accounts[row["account"]]
        assert shown["last_equity"] == row["last_equity"]
        assert abs(int(shown["last_equity_age_s"]) - row["last_equity_age_s"]) <= 5  # read seconds apart
        for name, used in row["windows"].items():
            assert shown[f"window:{name}"] == used
    assert "<polyline" in dom.stdout and 'class="mark top_up"' in dom.stdout  # the sparkline, the top-up marked
    assert 'http-equiv="refresh"' in dom.stdout
    assert "src=" not in dom.stdout and "href=" not in dom.stdout  # nothing loaded from anywhere


def test_the_page_needs_the_bearer_token_when_one_is_set(workspace):
    api, ledger = serve_page(workspace, token="status-token-Zx9Qw8")
    try:
        url = f"http://127.0.0.1:{api.port}/"
        for path in ("", "metrics"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + path, timeout=5)
            assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"].startswith("Bearer")
            assert b"status-token" not in refused.value.read()
        wrong = urllib.request.Request(url, headers={"Authorization": "Bearer nope"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(wrong, timeout=5)
        good = urllib.request.Request(url, headers={"Authorization": "Bearer status-token-Zx9Qw8"})
        with urllib.request.urlopen(good, timeout=5) as response:
            body = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/html")
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert "status-token-Zx9Qw8" not in body and "<!DOCTYPE html>" in body
        with urllib.request.urlopen(url + "healthz", timeout=5) as response:  # probes need no token
            assert response.status == 200
    finally:
        api.stop()
        ledger.close()


def test_every_value_is_escaped():
    now = utcnow()
    evil = '<script>alert("x")</script>'
    row = {"account": MT5 + evil, "policy": evil, "policy_sha256": "0" * 64, "policy_file": "p.yaml",
           "last_equity": evil, "last_equity_age_s": 3, "last_evaluation_at": None, "last_decision": evil,
           "windows": {evil: evil}, "halted": True,
           "halts": [{"id": 1, "kind": "operator", "scope": "top_up", "reason": evil, "since": "x", "by": evil}],
           "unresolved": [], "last_error": None, "currency": "USD", "problems": [evil], "fresh": True,
           "series": [(now - timedelta(hours=1), Decimal("450")), (now, Decimal("500"))],
           "transfers_24h": [{"created_at": "bad", "kind": evil, "amount": "1", "currency": "USD", "state": "x"}]}
    decision = {"at": evil, "account": evil, "action": evil, "amount": evil, "currency": evil, "equity": evil,
                "reason": evil}
    page = render_page({"rows": [row], "decisions": [decision], "now": now, "since": now - timedelta(days=1)},
                       host_id=evil)
    assert "<script" not in page and "&lt;script&gt;" in page


def test_the_service_renders_its_own_page(workspace, fake):
    from types import SimpleNamespace

    from agent.status_page import render_for_service

    write_status(workspace / "status", equity="450.00")
    assert run_cli("run", "--once", cwd=workspace, env=ENV).returncode == 0
    config = load_config(workspace / "fund-agent.yaml")
    policies, _ = load_policies(policy_files(config.policies))
    ledger = Ledger.open(config.database)
    try:
        service = SimpleNamespace(policies={p.mt5: p for p in policies}, ledger=ledger,
                                  config=SimpleNamespace(host_id="vps-<1>"))
        page = render_for_service(service)  # type: ignore[arg-type]
    finally:
        ledger.close()
    assert "vps-&lt;1&gt;" in page and f'data-account="{MT5}"' in page and "550.00" in page


def test_the_running_service_serves_the_page_behind_its_token(workspace, fake):
    import os
    import socket
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = workspace / "fund-agent.yaml"
    config.write_text(config.read_text() + f"http:\n  listen: 127.0.0.1:{port}\n  status_token_env: PAGE_TOKEN\n")
    write_status(workspace / "status", equity="700.00")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DERIV_", "FUND_AGENT_"))}
    env.update({"DERIV_API_TOKEN": TOKEN, "PAGE_TOKEN": "page-token-Mn7Bv6"})
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run"], cwd=workspace, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    body = ""
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/",
                                         headers={"Authorization": "Bearer page-token-Mn7Bv6"})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "data-account" not in body:
            try:
                with urllib.request.urlopen(request, timeout=3) as response:
                    body = response.read().decode()
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        assert f'data-account="{MT5}"' in body, body[:500]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3)
        assert refused.value.code == 401
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert "page-token-Mn7Bv6" not in err and "page-token-Mn7Bv6" not in body
