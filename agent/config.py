"""fund-agent.yaml: where the ledger, the policies, the broker and the equity source are.

Secrets are never in this file: only the names of the environment variables that hold them.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent import logs
from agent.config_schema import SOURCES, KeyPath, describe, dotted, is_number, node_lines, problems_of
from agent.config_schema import one_line as _one_line
from agent.policy.load import Problem, YamlTooComplex, compose_guarded, construct_guarded, read_limited
from agent.safe_io import UnsafeInput
from agent.timeutil import DurationError, parse_duration

DEFAULT_URL = "wss://ws.derivws.com/websockets/v3"
MAX_CONFIG_BYTES = 1024 * 1024
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TOP_KEYS = ("database", "database_password_env", "host_id", "policies", "broker", "equity", "http", "notify",
            "reload_every", "logging")
BROKER_KEYS = ("url", "app_id", "token_env", "timeout", "settle_window")
EQUITY_KEYS = ("source", "dir", "terminals", "probe_command", "probe_timeout",  # mt5 / ea-file
               "seed", "start_equity", "volatility", "drift")  # simulated
TERMINAL_KEYS = ("path", "server", "password_env", "portable")
HTTP_KEYS = ("listen", "allow_remote", "intake_secret_env", "status_token_env")
LOGGING_KEYS = ("file", "max_bytes", "backups", "level")
NOTIFY_KEYS = {"webhook": ("url", "events"), "telegram": ("token_env", "chat_id", "api_url", "events")}


class ConfigError(Exception):
    """One line for the user (the first problem); `problems` holds every problem found, in line order."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


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
class LoggingConfig:
    file: Path | None = None  # a rotating log file beside stderr, for hosts with no journal (Windows)
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    level: str | None = None  # None: --log-level or the command's default


def default_host_id() -> str:
    return socket.gethostname() or "localhost"


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
    database_password_env: str | None = None  # NAME of the variable holding the PostgreSQL password
    host_id: str = field(default_factory=default_host_id)  # names this agent in leases, the ledger, status
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def find_config(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("FUND_AGENT_CONFIG")
    if env:
        return Path(env)
    return Path("fund-agent.yaml")


def database_problem(value: str) -> str | None:
    """Why a `database:` value cannot be used (checked with the config, not at the first query), or None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        return "not a database URL: use sqlite:///ledger.db or postgresql+psycopg://USER@HOST:PORT/DB"
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        return f"{backend} is not supported: use sqlite:///ledger.db or postgresql+psycopg://USER@HOST:PORT/DB"
    if backend == "postgresql" and url.get_driver_name() not in ("psycopg", "psycopg2"):
        return "use the psycopg driver: postgresql+psycopg://USER@HOST:PORT/DB"
    if url.password is not None:
        return ("a password is written in the URL: secrets never go in this file; name the variable that holds it "
                "with database_password_env (or use PGPASSWORD / ~/.pgpass)")
    return None


def _database_url(value: str, base: Path) -> str:
    """sqlite:///relative.db is relative to the config file's folder."""
    prefix = "sqlite:///"
    if value.startswith(prefix) and not value.startswith("sqlite:////"):
        rest = value[len(prefix):]
        if rest and rest != ":memory:" and not rest.startswith("file:"):
            return prefix + str((base / rest).resolve())
    return value


def load_config(path: Path) -> Config:
    """Read, parse and check fund-agent.yaml. Every problem is one ConfigError line naming the key
    (`FILE:LINE: key: message`), never another exception. Then the secrets the config names by environment
    variable are registered for redaction, so that every command hides them from its first log line on."""
    try:
        data = read_limited(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError(f"{path}: the config file is a dangling symlink") from None
        raise ConfigError(f"{path}: config file not found (give --config PATH or set FUND_AGENT_CONFIG)") from None
    except UnsafeInput as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from None
    try:
        root = compose_guarded(text)
        if root is None or not isinstance(root, yaml.MappingNode):
            line = root.start_mark.line + 1 if root is not None else 1
            raise ConfigError(f"{path}:{line}: the config must be a mapping of keys to values")
        lines, duplicates = node_lines(root)
        _defuse_scalars(root)
        raw = construct_guarded(root)
    except YamlTooComplex as exc:
        raise ConfigError(f"{path}:{exc.line}: {exc.message}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        kind = "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise ConfigError(f"{path}:{line}: {kind}: {_one_line(exc.problem or exc.context or exc)}") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:  # e.g. a date 2024-13-45, a huge int
        raise ConfigError(f"{path}: YAML error: {_one_line(exc)}") from None
    problems = sorted([Problem(str(path), line, message) for line, message in duplicates]
                      + problems_of(raw, lines, str(path)), key=lambda p: p.line)
    if problems:
        raise ConfigError(str(problems[0]), problems)
    config = parse_config(raw, path.resolve().parent, path, lines)
    register_config_secrets(config)
    return config


def check_config(path: Path) -> list[Problem]:
    """Every problem of a config file (for `fund-agent check`); [] when it loads."""
    try:
        load_config(path)
    except ConfigError as exc:
        return exc.problems or [Problem(str(path), 0, str(exc)[len(str(path)) + 2:]
                                        if str(exc).startswith(f"{path}: ") else str(exc))]
    return []


def register_config_secrets(config: Config) -> None:
    """Register for redaction the value of every environment variable the config names that is set."""
    names = [config.broker.token_env]
    for key in ("intake_secret_env", "status_token_env"):
        if isinstance(config.http.get(key), str):
            names.append(config.http[key])
    if config.database_password_env:
        names.append(config.database_password_env)
    telegram = config.notify.get("telegram")
    if isinstance(telegram, dict):
        names.append(str(telegram.get("token_env") or "TELEGRAM_BOT_TOKEN"))
    terminals = config.equity.options.get("terminals")
    if isinstance(terminals, dict):
        names.extend(spec["password_env"] for spec in terminals.values()
                     if isinstance(spec, dict) and isinstance(spec.get("password_env"), str))
    for name in names:
        value = os.environ.get(name)
        if value:
            logs.register_secret(value)
            logs.register_secret(value.strip())


def _defuse_scalars(root: yaml.Node) -> None:
    """Read dates and over-long integers as text: no config key takes them, and constructing them could raise
    ValueError (a date 2024-13-45, an int of 5,000 digits) where the key-naming checks give a clear line."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            if node.tag == "tag:yaml.org,2002:timestamp" or (node.tag == "tag:yaml.org,2002:int"
                                                             and len(node.value) > 40):
                node.tag = "tag:yaml.org,2002:str"
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(part for pair in node.value for part in pair)


class _Checker:
    """Typed reads of the constructed config; each failure is one ConfigError naming the key."""

    def __init__(self, path: Path | None, lines: dict[KeyPath, int] | None) -> None:
        self.path = path
        # dotted key -> line, for the messages of the typed reads below
        self.lines = {dotted(k): v for k, v in (lines or {}).items() if k}

    def fail(self, dotted: str, message: str) -> ConfigError:
        if self.path is None:
            return ConfigError(f"{dotted}: {message}")
        key = dotted
        while key and key not in self.lines:
            key = key.rpartition(".")[0]
        line = self.lines.get(key)
        return ConfigError(f"{self.path}:{line}: {dotted}: {message}" if line else f"{self.path}: {dotted}: {message}")

    def section(self, raw: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
        """A mapping (absent or empty: {})."""
        dotted = f"{where}.{key}" if where else key
        value = raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(dotted, f"must be a mapping of keys to values, got {describe(value)}")
        return value

    def known(self, raw: dict[str, Any], where: str, allowed: tuple[str, ...]) -> None:
        for key in raw:
            if key not in allowed:
                dotted = f"{where}.{key}" if where else str(key)
                raise self.fail(dotted, f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def text(self, raw: dict[str, Any], key: str, where: str, default: str | None, what: str) -> str | None:
        dotted = f"{where}.{key}" if where else key
        if key not in raw:
            return default
        value = raw[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(dotted, f"expected {what}, got {describe(value) if value != '' else 'empty text'}")
        return value

    def env_name(self, raw: dict[str, Any], key: str, where: str, default: str | None) -> str | None:
        name = self.text(raw, key, where, default, "the name of an environment variable")
        if name is not None and not ENV_NAME.match(name):
            raise self.fail(f"{where}.{key}", "is not an environment variable name (letters, digits and _; the "
                                              "value is not shown: write the NAME of the variable that holds the "
                                              "secret, never the secret)")
        return name

    def duration(self, raw: dict[str, Any], key: str, where: str, default: str, zero_ok: bool = False) -> float:
        dotted = f"{where}.{key}" if where else key
        value = raw.get(key, default)
        if zero_ok and not isinstance(value, bool) and value in (0, "0", "0s"):
            return 0.0
        try:
            seconds = parse_duration(value).total_seconds()
        except DurationError as exc:
            raise self.fail(dotted, str(exc)) from None
        if seconds <= 0 and not zero_ok:
            raise self.fail(dotted, f"must be longer than 0s, got {_one_line(value, 40)}")
        return seconds

    def boolean(self, raw: dict[str, Any], key: str, where: str) -> None:
        if key in raw and not isinstance(raw[key], bool):
            raise self.fail(f"{where}.{key}", f"expected true or false, got {describe(raw[key])}")

    def number(self, raw: dict[str, Any], key: str, where: str) -> None:
        if key not in raw:
            return
        if not is_number(raw[key]):
            raise self.fail(f"{where}.{key}", f"expected a number, got {describe(raw[key])}")


def parse_config(raw: dict[str, Any], base: Path, path: Path | None = None,
                 lines: dict[KeyPath, int] | None = None) -> Config:
    check = _Checker(path, lines)
    if not isinstance(raw, dict):
        raise check.fail("config", "must be a mapping of keys to values")
    check.known(raw, "", TOP_KEYS)
    database_text = check.text(raw, "database", "", "sqlite:///ledger.db", "a database URL like sqlite:///ledger.db")
    why = database_problem(database_text or "")
    if why:
        raise check.fail("database", why)
    database = _database_url(database_text or "", base)
    policies = base / (check.text(raw, "policies", "", "policies/", "a folder or file name") or "")

    broker_raw = check.section(raw, "broker")
    check.known(broker_raw, "broker", BROKER_KEYS)
    app_id = broker_raw.get("app_id")
    if app_id is not None:
        digits = app_id if isinstance(app_id, str) else str(app_id) if type(app_id) is int else ""
        if not (digits.isascii() and digits.isdigit() and 0 < len(digits) <= 12 and int(digits) > 0):
            raise check.fail("broker.app_id", f"must be a number like 1089, got {describe(app_id)}")
        app_id = int(digits)
    timeout = check.duration(broker_raw, "timeout", "broker", "15s")
    settle_window = check.duration(broker_raw, "settle_window", "broker", "2m")
    token_env = check.env_name(broker_raw, "token_env", "broker", "DERIV_API_TOKEN") or "DERIV_API_TOKEN"
    url = check.text(broker_raw, "url", "broker", DEFAULT_URL, "a websocket URL like " + DEFAULT_URL) or ""
    if not url.startswith(("wss://", "ws://")):
        raise check.fail("broker.url", "must start with wss:// (or ws:// for a local test server)")
    broker = BrokerConfig(url=url, app_id=app_id, token_env=token_env, timeout=timeout,
                          settle_window=settle_window)

    equity_raw = dict(check.section(raw, "equity"))
    check.known(equity_raw, "equity", EQUITY_KEYS)
    source = equity_raw.pop("source", "mt5")
    if not isinstance(source, str) or source not in SOURCES:
        raise check.fail("equity.source", f"must be one of {', '.join(SOURCES)}, got {describe(source)}")
    eq_dir = check.text(equity_raw, "dir", "equity", None, "a folder name")
    equity_raw.pop("dir", None)
    if source == "ea-file" and not eq_dir:
        raise check.fail("equity.dir", "is required with the ea-file source")
    terminals = check.section(equity_raw, "terminals", "equity")
    for login, spec in terminals.items():
        where = f"equity.terminals.{login}"
        if not isinstance(spec, dict):
            raise check.fail(where, f"must be a mapping of path, server, password_env, got {describe(spec)}")
        check.known(spec, where, TERMINAL_KEYS)
        check.text(spec, "path", where, None, "a file name")
        check.text(spec, "server", where, None, "a server name")
        check.env_name(spec, "password_env", where, None)
        check.boolean(spec, "portable", where)
    check.text(equity_raw, "probe_command", "equity", None, "a command line")
    if "probe_timeout" in equity_raw:
        check.duration(equity_raw, "probe_timeout", "equity", "10s")
    if "seed" in equity_raw and (type(equity_raw["seed"]) is not int or abs(equity_raw["seed"]) >= 2 ** 63):
        raise check.fail("equity.seed", f"expected a whole number, got {describe(equity_raw['seed'])}")
    for key in ("start_equity", "volatility", "drift"):
        check.number(equity_raw, key, "equity")
    equity = EquityConfig(source=source, dir=(base / eq_dir) if eq_dir else None, options=equity_raw)

    http = dict(check.section(raw, "http"))
    check.known(http, "http", HTTP_KEYS)
    listen = check.text(http, "listen", "http", None, "HOST:PORT like 127.0.0.1:8787")
    if listen is not None:
        port = listen.rpartition(":")[2]
        if not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
            raise check.fail("http.listen", f"must be HOST:PORT like 127.0.0.1:8787, got {_one_line(repr(listen), 60)}")
    check.boolean(http, "allow_remote", "http")
    check.env_name(http, "intake_secret_env", "http", None)
    check.env_name(http, "status_token_env", "http", None)

    notify = dict(check.section(raw, "notify"))
    check.known(notify, "notify", tuple(NOTIFY_KEYS))
    for channel, keys in NOTIFY_KEYS.items():
        settings = check.section(notify, channel, "notify")
        where = f"notify.{channel}"
        check.known(settings, where, keys)
        if channel == "webhook" and settings:  # the URL is never echoed: it may carry a credential
            if not isinstance(settings.get("url"), str):
                raise check.fail(f"{where}.url", f"expected an http(s) URL, got {describe(settings.get('url'))}")
        if channel == "telegram":
            check.env_name(settings, "token_env", where, None)
            check.text(settings, "api_url", where, None, "an http(s) URL")
            chat_id = settings.get("chat_id")
            if chat_id is not None and (isinstance(chat_id, bool) or not isinstance(chat_id, (str, int))):
                raise check.fail(f"{where}.chat_id", f"expected a chat id, got {describe(chat_id)}")
        events = settings.get("events")
        if events is not None and (not isinstance(events, list) or not all(isinstance(e, str) for e in events)):
            raise check.fail(f"{where}.events", f"expected a list of event names, got {describe(events)}")

    reload_every = check.duration(raw, "reload_every", "", "2s", zero_ok=True)
    password_env = check.env_name(raw, "database_password_env", "", None)
    host_id = check.text(raw, "host_id", "", None, "a name for this agent") or default_host_id()
    log_raw = check.section(raw, "logging")
    check.known(log_raw, "logging", LOGGING_KEYS)
    log_file = check.text(log_raw, "file", "logging", None, "a file name")
    logging_ = LoggingConfig(file=(base / log_file) if log_file else None,
                             max_bytes=int(log_raw.get("max_bytes", LoggingConfig.max_bytes)),
                             backups=int(log_raw.get("backups", LoggingConfig.backups)),
                             level=log_raw.get("level"))
    return Config(path=path, database=database, policies=policies, broker=broker, equity=equity,
                  http=http, notify=notify, reload_every=reload_every, database_password_env=password_env,
                  host_id=host_id, logging=logging_)
