"""fund-agent.yaml: where the ledger, the policies, the broker and the equity source are.

Secrets are never in this file: only the names of the environment variables that hold them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.timeutil import DurationError, parse_duration

DEFAULT_URL = "wss://ws.derivws.com/websockets/v3"
SOURCES = ("mt5", "ea-file", "deriv", "simulated")


class ConfigError(Exception):
    pass


class MissingSecret(ConfigError):
    def __init__(self, env: str, what: str) -> None:
        super().__init__(f"environment variable {env} is not set: it must hold the {what}")
        self.env = env


@dataclass(frozen=True)
class BrokerConfig:
    url: str = DEFAULT_URL
    app_id: int | None = None
    token_env: str = "DERIV_API_TOKEN"
    timeout: float = 15.0
    settle_window: float = 120.0  # how long a sent transfer may be absent from the statement before it failed

    def token(self) -> str:
        value = os.environ.get(self.token_env, "").strip()
        if not value:
            raise MissingSecret(self.token_env, "Deriv API token (scopes read + payments)")
        return value

    def resolved_app_id(self) -> int:
        if self.app_id is not None:
            return self.app_id
        env = os.environ.get("DERIV_APP_ID", "").strip()
        if not env.isdigit():
            raise ConfigError("broker.app_id is not set and $DERIV_APP_ID holds no number")
        return int(env)


@dataclass(frozen=True)
class EquityConfig:
    source: str = "simulated"
    dir: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    path: Path | None
    database: str
    policies: Path
    broker: BrokerConfig
    equity: EquityConfig
    http: dict[str, Any] = field(default_factory=dict)
    notify: dict[str, Any] = field(default_factory=dict)
    reload_every: float = 2.0  # seconds between checks of the policy files; 0: only on SIGHUP


def find_config(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("FUND_AGENT_CONFIG")
    if env:
        return Path(env)
    return Path("fund-agent.yaml")


def _database_url(value: str, base: Path) -> str:
    """sqlite:///relative.db is relative to the config file's folder."""
    prefix = "sqlite:///"
    if value.startswith(prefix) and not value.startswith("sqlite:////"):
        rest = value[len(prefix):]
        if rest and rest != ":memory:" and not rest.startswith("file:"):
            return prefix + str((base / rest).resolve())
    return value


def load_config(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (give --config PATH or set FUND_AGENT_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        raise ConfigError(f"{path}:{line}: YAML syntax error: {exc.problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of keys to values")
    return parse_config(raw, path.resolve().parent, path)


def parse_config(raw: dict[str, Any], base: Path, path: Path | None = None) -> Config:
    where = f"{path}: " if path else ""
    known = {"database", "policies", "broker", "equity", "http", "notify", "reload_every"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}unknown key {unknown[0]!r} (expected one of: {', '.join(sorted(known))})")
    database = _database_url(str(raw.get("database", "sqlite:///ledger.db")), base)
    policies = base / str(raw.get("policies", "policies/"))

    broker_raw = raw.get("broker") or {}
    if not isinstance(broker_raw, dict):
        raise ConfigError(f"{where}broker must be a mapping")
    extra = sorted(set(broker_raw) - {"url", "app_id", "token_env", "timeout", "settle_window"})
    if extra:
        raise ConfigError(f"{where}broker.{extra[0]}: unknown key")
    app_id = broker_raw.get("app_id")
    if app_id is not None and (isinstance(app_id, bool) or not str(app_id).isdigit()):
        raise ConfigError(f"{where}broker.app_id must be a number, got {app_id!r}")
    try:
        timeout = parse_duration(str(broker_raw.get("timeout", "15s"))).total_seconds()
    except DurationError as exc:
        raise ConfigError(f"{where}broker.timeout: {exc}") from None
    try:
        settle_window = parse_duration(str(broker_raw.get("settle_window", "2m"))).total_seconds()
    except DurationError as exc:
        raise ConfigError(f"{where}broker.settle_window: {exc}") from None
    token_env = str(broker_raw.get("token_env", "DERIV_API_TOKEN"))
    url = str(broker_raw.get("url", DEFAULT_URL))
    if not url.startswith(("wss://", "ws://")):
        raise ConfigError(f"{where}broker.url must start with wss:// (or ws:// for a local test server)")
    broker = BrokerConfig(url=url, app_id=int(app_id) if app_id is not None else None, token_env=token_env,
                          timeout=timeout, settle_window=settle_window)

    equity_raw = dict(raw.get("equity") or {})
    source = str(equity_raw.pop("source", "mt5"))
    if source not in SOURCES:
        raise ConfigError(f"{where}equity.source must be one of {', '.join(SOURCES)}, got {source!r}")
    eq_dir = equity_raw.pop("dir", None)
    if source == "ea-file" and not eq_dir:
        raise ConfigError(f"{where}equity.dir is required with the ea-file source")
    equity = EquityConfig(source=source, dir=(base / str(eq_dir)) if eq_dir else None, options=equity_raw)
    reload_text = str(raw.get("reload_every", "2s"))
    try:
        reload_every = 0.0 if reload_text in ("0", "0s") else parse_duration(reload_text).total_seconds()
    except DurationError as exc:
        raise ConfigError(f"{where}reload_every: {exc}") from None
    return Config(path=path, database=database, policies=policies, broker=broker, equity=equity,
                  http=dict(raw.get("http") or {}), notify=dict(raw.get("notify") or {}), reload_every=reload_every)
