"""YAML policy files -> Policy, with every problem reported as FILE:LINE: message naming the key.

We validate the YAML node tree (not the constructed Python objects) so that every value keeps its line,
duplicate keys are visible, and amounts are read from their text, never through a binary float.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

try:
    from yaml._yaml import CParser as _CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _CParser = None

from agent import money
from agent.policy.model import (
    WINDOWS,
    KillSwitch,
    KindLimits,
    Limits,
    Policy,
    Schedule,
    Sweep,
    TopUp,
    Window,
)
from agent.safe_io import UnsafeInput, read_small_file
from agent.timeutil import DurationError, parse_duration

MT5_LOGIN = re.compile(r"^MT[DR]?[0-9]+$")
FUNDING_LOGIN = re.compile(r"^[A-Za-z]+[0-9]+$")
DEFAULT_EVERY = "60s"
DEFAULT_MAX_EQUITY_AGE = "60s"
MAX_FILE_BYTES = 1024 * 1024  # a policy (and fund-agent.yaml) is a few hundred bytes; refuse more than 1 MiB
MAX_DEPTH = 50  # YAML collections nested deeper than this are refused (a policy needs 4)
MAX_NODES = 1_000_000  # YAML values counting each alias use in full: an alias bomb is refused (1 MiB of plain
#                       YAML holds at most ~500,000 values, so only aliases can reach this)
MAX_AMOUNT = Decimal("1e15")  # amounts and percentages at or above this are out of range


@dataclass(frozen=True)
class Problem:
    path: str
    line: int  # 0: the problem is with the file as a whole (FILE: message)
    message: str
    # set on "two files name this MT5 account": callers put that account in force under neither file
    duplicate_of: tuple[str, str] | None = None  # (account, the first file that names it)

    def __str__(self) -> str:
        if self.line <= 0:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


class PolicyError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"


class _Reader:
    """Walks one document's node tree, collecting problems instead of stopping at the first."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[Problem] = []
        self.lines: dict[str, int] = {}
        self.currency: str | None = None

    def error(self, node_or_line: yaml.Node | int, message: str) -> None:
        line = node_or_line if isinstance(node_or_line, int) else node_or_line.start_mark.line + 1
        self.problems.append(Problem(self.path, line, message))

    def mapping(self, node: yaml.Node, where: str, allowed: set[str]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Keys of a mapping node -> (key node, value node); reports duplicates and unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{where or 'the document'} must be a mapping of keys to values")
            return {}
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{where}.{key}" if where else str(key)
            if not isinstance(key, str):
                self.error(key_node, f"{where or 'document'}: keys must be plain names")
                continue
            if key in out:
                first = out[key][0].start_mark.line + 1
                self.error(key_node, f"{dotted}: duplicate key (first given on line {first})")
                continue
            if key not in allowed:
                choices = ", ".join(sorted(allowed))
                self.error(key_node, f"{dotted}: unknown key (expected one of: {choices})")
                continue
            out[key] = (key_node, value_node)
            self.lines[dotted] = key_node.start_mark.line + 1
        return out

    # ---- scalar readers: each returns None after reporting a problem ----

    def scalar(self, node: yaml.Node, dotted: str, what: str) -> yaml.ScalarNode | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL:
            self.error(node, f"{dotted}: expected {what}, got {_kind(node)}")
            return None
        return node

    def amount(self, node: yaml.Node, dotted: str, allow_zero: bool = False) -> Decimal | None:
        scalar = self.scalar(node, dotted, "an amount")
        if scalar is None:
            return None
        if scalar.tag not in (_INT, _FLOAT, _STR):
            self.error(node, f"{dotted}: expected an amount, got {_kind(node)}")
            return None
        try:
            value = Decimal(scalar.value.strip().replace("_", ""))
        except InvalidOperation:
            self.error(node, f"{dotted}: expected an amount, got {scalar.value!r}")
            return None
        if not value.is_finite():
            self.error(node, f"{dotted}: expected a finite amount, got {scalar.value!r}")
            return None
        if abs(value) >= MAX_AMOUNT:
            self.error(node, f"{dotted}: amount {scalar.value} is out of range (must be below {MAX_AMOUNT:f})")
            return None
        if value < 0 or (value == 0 and not allow_zero):
            self.error(node, f"{dotted}: must be {'zero or more' if allow_zero else 'greater than zero'}, "
                             f"got {scalar.value}")
            return None
        if self.currency is not None:
            try:
                return money.quantize(value, self.currency)
            except money.MoneyError:
                self.error(node, f"{dotted}: {scalar.value} has more decimal places than {self.currency} "
                                 f"allows ({money.places(self.currency)})")
                return None
        return value

    def integer(self, node: yaml.Node, dotted: str, minimum: int = 1) -> int | None:
        scalar = self.scalar(node, dotted, "a whole number")
        if scalar is None:
            return None
        if scalar.tag != _INT or not re.fullmatch(r"[+]?[0-9_]+", scalar.value.strip()):
            self.error(node, f"{dotted}: expected a whole number, got {scalar.value!r}")
            return None
        digits = scalar.value.strip().lstrip("+").replace("_", "").lstrip("0") or "0"
        if len(digits) > 15:  # int() of thousands of digits is slow, then refused
            self.error(node, f"{dotted}: {scalar.value} is out of range (must be below {MAX_AMOUNT:f})")
            return None
        value = int(digits)
        if value < minimum:
            self.error(node, f"{dotted}: must be at least {minimum}, got {value}")
            return None
        return value

    def percent(self, node: yaml.Node, dotted: str, upper: Decimal | None = Decimal(100)) -> Decimal | None:
        scalar = self.scalar(node, dotted, "a percentage")
        if scalar is None:
            return None
        try:
            if scalar.tag not in (_INT, _FLOAT):
                raise InvalidOperation
            value = Decimal(scalar.value.replace("_", ""))
            if not value.is_finite():
                raise InvalidOperation
        except InvalidOperation:
            self.error(node, f"{dotted}: expected a percentage, got {scalar.value!r}")
            return None
        if abs(value) >= MAX_AMOUNT:
            self.error(node, f"{dotted}: percentage {scalar.value} is out of range (must be below {MAX_AMOUNT:f})")
            return None
        if value <= 0 or (upper is not None and value > upper):
            bound = f"between 0 and {upper}" if upper is not None else "above 0"
            self.error(node, f"{dotted}: percentage must be {bound}, got {scalar.value}")
            return None
        return value

    def duration(self, node: yaml.Node, dotted: str) -> timedelta | None:
        scalar = self.scalar(node, dotted, "a duration like 30s, 15m, 2h or 1d")
        if scalar is None:
            return None
        if scalar.tag != _STR:
            self.error(node, f"{dotted}: bad duration {scalar.value!r}: write a number and a unit s, m, h or d "
                             f"(e.g. 30s)")
            return None
        try:
            return parse_duration(scalar.value)
        except DurationError as exc:
            self.error(node, f"{dotted}: {exc}")
            return None

    def text(self, node: yaml.Node, dotted: str, pattern: re.Pattern[str] | None = None,
             what: str = "text") -> str | None:
        scalar = self.scalar(node, dotted, what)
        if scalar is None:
            return None
        if scalar.tag != _STR:
            self.error(node, f"{dotted}: expected {what}, got {scalar.value!r}")
            return None
        if pattern is not None and not pattern.match(scalar.value):
            self.error(node, f"{dotted}: {scalar.value!r} does not match {pattern.pattern}")
            return None
        return scalar.value


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "nothing"
    if node.tag == _BOOL:
        return f"a boolean ({node.value})"
    return repr(node.value)


class YamlTooComplex(yaml.YAMLError):
    """YAML refused before it could exhaust the stack or memory: nested too deeply, or an alias bomb."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _DepthGuard(Composer):
    """PyYAML's composer, refusing collections nested deeper than MAX_DEPTH (it recurses: 10,000 nested
    lists would raise RecursionError). Duplicate keys are reported by the callers from the node tree."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:  # type: ignore[override]
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlTooComplex(mark.line + 1, f"YAML nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


class GuardedLoader(_DepthGuard, yaml.SafeLoader):
    """SafeLoader with the depth guard (pure Python)."""


if _CParser is not None:
    class _FastGuardedLoader(_DepthGuard, _CParser, SafeConstructor, Resolver):  # type: ignore[misc, valid-type]
        """libyaml's scanner and parser (about 5x faster: 1 MiB in one to two seconds) under the guarded Python
        composer, SafeConstructor and the default resolver: the same nodes and values as GuardedLoader."""

        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            _DepthGuard.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _Loader: type = _FastGuardedLoader
else:  # pragma: no cover - PyYAML built without libyaml
    _Loader = GuardedLoader

_NoDuplicatesLoader = GuardedLoader  # the old name


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph that aliases would expand past MAX_NODES nodes, or that contains itself."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise YamlTooComplex(node.start_mark.line + 1, "a YAML alias refers to a collection that contains it")
        busy.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        for child in children:  # depth is at most MAX_DEPTH: recursion is safe here
            total += size(child)
            if total > MAX_NODES:
                raise YamlTooComplex(node.start_mark.line + 1, f"YAML expands to more than {MAX_NODES} values "
                                                               "(aliases that multiply, e.g. a billion laughs)")
        busy.discard(key)
        sizes[key] = total
        return total

    size(root)


def compose_guarded(text: str) -> yaml.Node | None:
    """The node tree of one YAML document, refusing deep nesting and alias bombs (YamlTooComplex).
    Other problems raise yaml.YAMLError (a MarkedYAMLError when the line is known)."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
    finally:
        getattr(loader, "dispose", lambda: None)()
    if root is not None:
        _check_expansion(root)
    return root


def construct_guarded(node: yaml.Node) -> Any:
    """Python values from a node tree that compose_guarded accepted (as yaml.safe_load would give)."""
    loader = GuardedLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _valid_cron(expression: str) -> str | None:
    from agent.cronspec import crontab_trigger

    try:
        crontab_trigger(expression, timezone="UTC")
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def parse_policy(text: str, path: str) -> Policy:
    """Validate one policy document. Raises PolicyError listing every problem found."""
    reader = _Reader(path)
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    try:
        root = compose_guarded(text)
    except YamlTooComplex as exc:
        raise PolicyError([Problem(path, exc.line, exc.message)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PolicyError([Problem(path, line, f"YAML syntax error: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([Problem(path, 1, f"YAML error: {exc}")]) from None
    if root is None:
        raise PolicyError([Problem(path, 1, "empty policy file: expected a mapping with version, account, ...")])
    if not isinstance(root, yaml.MappingNode):
        raise PolicyError([Problem(path, root.start_mark.line + 1, "the policy must be a mapping of keys to "
                                                                     f"values, got {_kind(root)}")])
    top = reader.mapping(root, "", {"version", "name", "account", "schedule", "top_up", "sweep", "limits",
                                    "kill_switch"})

    def need(section: dict[str, tuple[yaml.Node, yaml.Node]], key: str, where: str, line: int) -> yaml.Node | None:
        if key not in section:
            reader.error(line, f"{where + '.' if where else ''}{key}: required key is missing")
            return None
        return section[key][1]

    # version
    version_node = need(top, "version", "", 1)
    if version_node is not None:
        if not (isinstance(version_node, yaml.ScalarNode) and version_node.tag == _INT
                and version_node.value.strip() == "1"):
            reader.error(version_node, f"version: unsupported version {getattr(version_node, 'value', '?')!r} "
                                       "(only 1 is known)")

    name = Path(path).stem
    if "name" in top:
        name = reader.text(top["name"][1], "name", what="a name") or name

    # account (first: the currency decides how amounts are read)
    mt5 = funding = currency = None
    account_node = need(top, "account", "", 1)
    if account_node is not None:
        account = reader.mapping(account_node, "account", {"mt5", "funding", "currency"})
        line = top["account"][0].start_mark.line + 1
        if (node := need(account, "mt5", "account", line)) is not None:
            mt5 = reader.text(node, "account.mt5", MT5_LOGIN, "an MT5 login like MTR130002534")
        if (node := need(account, "funding", "account", line)) is not None:
            funding = reader.text(node, "account.funding", FUNDING_LOGIN, "a Deriv login like CR4000128")
        if (node := need(account, "currency", "account", line)) is not None:
            code = reader.text(node, "account.currency", what="a currency code")
            if code is not None:
                if code in money.CURRENCY_PLACES:
                    currency = code
                else:
                    reader.error(node, f"account.currency: unknown currency code {code!r}")
    reader.currency = currency

    schedule = _schedule(reader, top)
    top_up = _top_up(reader, top)
    sweep = _sweep(reader, top)
    limits = _limits(reader, top)
    kill = _kill_switch(reader, top)

    # Rules that tie two keys: reported at the line of the key the message names first.
    if top_up is not None and sweep is not None:
        if sweep.when_equity_above <= top_up.target_equity:
            reader.error(reader.lines["sweep.when_equity_above"],
                         f"sweep.when_equity_above ({sweep.when_equity_above}) must be above "
                         f"top_up.target_equity ({top_up.target_equity}): the top-up and sweep bands overlap")
        elif sweep.target_equity <= top_up.when_equity_below:
            reader.error(reader.lines["sweep.target_equity"],
                         f"sweep.target_equity ({sweep.target_equity}) must be above "
                         f"top_up.when_equity_below ({top_up.when_equity_below}): the top-up and sweep bands "
                         "overlap")
    if reader.problems:
        raise PolicyError(sorted(reader.problems, key=lambda p: p.line))
    assert mt5 and funding and currency and schedule
    return Policy(name=name, mt5=mt5, funding=funding, currency=currency, schedule=schedule, top_up=top_up,
                  sweep=sweep, limits=limits, kill_switch=kill, path=path, sha256=sha, lines=reader.lines)


def _section(reader: _Reader, top: dict, key: str, allowed: set[str]) -> dict | None:
    if key not in top:
        return None
    return reader.mapping(top[key][1], key, allowed)


def _schedule(reader: _Reader, top: dict) -> Schedule | None:
    sec = _section(reader, top, "schedule", {"every", "cron", "max_equity_age"}) or {}
    every = cron = None
    if "every" in sec and "cron" in sec:
        reader.error(sec["cron"][0], "schedule.cron: give either schedule.every or schedule.cron, not both")
    elif "cron" in sec:
        cron = reader.text(sec["cron"][1], "schedule.cron", what="a cron expression")
        if cron is not None and (why := _valid_cron(cron)) is not None:
            reader.error(sec["cron"][1], f"schedule.cron: bad cron expression {cron!r}: {why}")
            cron = None
    if "every" in sec:
        every = reader.duration(sec["every"][1], "schedule.every")
        if every is not None and every.total_seconds() <= 0:
            reader.error(sec["every"][1], "schedule.every: must be longer than 0s")
    elif "cron" not in sec:
        every = parse_duration(DEFAULT_EVERY)
    age: timedelta | None = parse_duration(DEFAULT_MAX_EQUITY_AGE)
    if "max_equity_age" in sec:
        age = reader.duration(sec["max_equity_age"][1], "schedule.max_equity_age")
        if age is not None and age.total_seconds() <= 0:
            reader.error(sec["max_equity_age"][1], "schedule.max_equity_age: must be longer than 0s")
    if age is None:
        return None
    return Schedule(every=every, cron=cron, max_equity_age=age)


def _band(reader: _Reader, sec: dict, kind: str, trigger: str) -> dict[str, Any] | None:
    """Fields shared by top_up and sweep; None if a required one is missing or invalid."""
    out: dict[str, Any] = {}
    line = reader.lines[kind]
    ok = True
    for key in (trigger, "target_equity"):
        if key not in sec:
            reader.error(line, f"{kind}.{key}: required key is missing")
            ok = False
        else:
            out[key] = reader.amount(sec[key][1], f"{kind}.{key}")
            ok = ok and out[key] is not None
    for key in ("min_amount", "max_amount"):
        if key in sec:
            out[key] = reader.amount(sec[key][1], f"{kind}.{key}")
            ok = ok and out[key] is not None
    if "cooldown" in sec:
        out["cooldown"] = reader.duration(sec["cooldown"][1], f"{kind}.cooldown")
        ok = ok and out["cooldown"] is not None
    if out.get("min_amount") is not None and out.get("max_amount") is not None:
        if out["min_amount"] > out["max_amount"]:
            reader.error(sec["min_amount"][0], f"{kind}.min_amount ({out['min_amount']}) must not be above "
                                               f"{kind}.max_amount ({out['max_amount']})")
            ok = False
    return out if ok else None


def _top_up(reader: _Reader, top: dict) -> TopUp | None:
    keys = {"when_equity_below", "target_equity", "min_amount", "max_amount", "cooldown"}
    sec = _section(reader, top, "top_up", keys)
    if sec is None:
        return None
    fields = _band(reader, sec, "top_up", "when_equity_below")
    if fields is None:
        return None
    if fields["target_equity"] <= fields["when_equity_below"]:
        reader.error(sec["target_equity"][0], f"top_up.target_equity ({fields['target_equity']}) must be above "
                                              f"top_up.when_equity_below ({fields['when_equity_below']})")
        return None
    return TopUp(**fields)


def _sweep(reader: _Reader, top: dict) -> Sweep | None:
    keys = {"when_equity_above", "target_equity", "min_amount", "max_amount", "cooldown", "min_margin_level"}
    sec = _section(reader, top, "sweep", keys)
    if sec is None:
        return None
    fields = _band(reader, sec, "sweep", "when_equity_above")
    if "min_margin_level" in sec:
        level = reader.percent(sec["min_margin_level"][1], "sweep.min_margin_level", upper=None)
        if fields is not None:
            fields["min_margin_level"] = level
        if level is None:
            return None
    if fields is None:
        return None
    if fields["target_equity"] >= fields["when_equity_above"]:
        reader.error(sec["target_equity"][0], f"sweep.target_equity ({fields['target_equity']}) must be below "
                                              f"sweep.when_equity_above ({fields['when_equity_above']})")
        return None
    return Sweep(**fields)


def _windows(reader: _Reader, node: yaml.Node, where: str) -> KindLimits:
    sec = reader.mapping(node, where, set(WINDOWS))
    windows: dict[str, Window] = {}
    for name, (_, value) in sec.items():
        dotted = f"{where}.{name}"
        inner = reader.mapping(value, dotted, {"count", "amount"})
        if not inner and isinstance(value, yaml.MappingNode):
            reader.error(value, f"{dotted}: give count and/or amount")
        count = reader.integer(inner["count"][1], f"{dotted}.count") if "count" in inner else None
        amount = reader.amount(inner["amount"][1], f"{dotted}.amount") if "amount" in inner else None
        windows[name] = Window(count=count, amount=amount)
    return KindLimits(windows=windows)


def _limits(reader: _Reader, top: dict) -> Limits:
    sec = _section(reader, top, "limits", {"top_up", "sweep", "funding_reserve"})
    if not sec:
        return Limits()
    top_up = _windows(reader, sec["top_up"][1], "limits.top_up") if "top_up" in sec else KindLimits()
    sweep = _windows(reader, sec["sweep"][1], "limits.sweep") if "sweep" in sec else KindLimits()
    reserve = Decimal(0)
    if "funding_reserve" in sec:
        reserve = reader.amount(sec["funding_reserve"][1], "limits.funding_reserve", allow_zero=True) or Decimal(0)
    return Limits(top_up=top_up, sweep=sweep, funding_reserve=reserve)


def _kill_switch(reader: _Reader, top: dict) -> KillSwitch:
    sec = _section(reader, top, "kill_switch", {"consecutive_top_ups", "net_top_up_above", "equity_drawdown_pct"})
    if not sec:
        return KillSwitch()
    read: dict[str, Callable[[yaml.Node, str], Any]] = {
        "consecutive_top_ups": reader.integer,
        "net_top_up_above": reader.amount,
        "equity_drawdown_pct": reader.percent,
    }
    return KillSwitch(**{key: read[key](value, f"kill_switch.{key}") for key, (_, value) in sec.items()})


def read_limited(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file (symlinks resolved) of at most `limit` bytes, read without blocking.
    Raises UnsafeInput with a message that follows the file name ("file is larger than 1 MiB",
    "file is a FIFO, not a regular file") or OSError."""
    try:
        return read_small_file(path, limit)
    except UnsafeInput as exc:
        reason = str(exc)
        if reason.startswith("is larger than"):
            reason = "is larger than " + (f"{limit // (1024 * 1024)} MiB" if limit % (1024 * 1024) == 0
                                          else f"{limit} bytes")
        raise UnsafeInput(f"file {reason}") from None


def load_policy_file(path: Path) -> Policy:
    if isinstance(path, _Skipped):
        raise PolicyError([Problem(path.problem_path, 0, path.reason)])
    try:
        raw = read_limited(path)
    except UnsafeInput as exc:
        raise PolicyError([Problem(str(path), 0, str(exc))]) from None
    except FileNotFoundError:
        why = "a dangling symlink" if os.path.islink(path) else "no such file"
        raise PolicyError([Problem(str(path), 0, f"cannot read the policy file: {why}")]) from None
    except OSError as exc:
        raise PolicyError([Problem(str(path), 0, f"cannot read the policy file: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError([Problem(str(path), 1, "the policy file is not UTF-8 text")]) from None
    return parse_policy(text, str(path))


class _Skipped(type(Path())):  # type: ignore[misc]
    """An entry policy_files() will not load, listed so that load_policies() reports it (`reason`) and
    `check` fails, with no change to callers that pass the list on. Reading it raises OSError: a caller
    that hashes each listed file must not block on a FIFO or read /dev/zero."""

    reason = "skipped"
    problem_path = ""

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise OSError(errno.EINVAL, f"{self.problem_path}: {self.reason}")

    read_bytes = read_text = open = _refuse  # type: ignore[assignment]


def _skipped(path: Path, reason: str, shown: str | None = None) -> Path:
    marker = _Skipped(path)
    marker.reason = reason
    marker.problem_path = shown if shown is not None else str(path)
    return marker


def _why_skipped(path: Path) -> str | None:
    """None for a regular file (or a symlink to one); else why a *.yaml entry of a policies folder is no policy."""
    try:
        mode = path.stat().st_mode  # follows symlinks
    except FileNotFoundError:
        return "skipped: a dangling symlink" if path.is_symlink() else "skipped: vanished while listed"
    except OSError as exc:
        return f"skipped: cannot be read: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "skipped: a directory"
    return "skipped: not a regular file"


def policy_files(location: Path) -> list[Path]:
    """The policy files of a folder (*.yaml, *.yml), sorted; a path that is not a folder is itself.

    Entries that cannot be policies (a dangling symlink, a directory, a FIFO or device named *.yaml) and a
    folder with no policy file at all are listed as markers that load_policies() reports as problems."""
    if not location.is_dir():
        return [location]
    shown = os.path.join(str(location), "")  # policies/: the folder as a folder
    try:
        entries = sorted(p for p in location.iterdir() if p.suffix in (".yaml", ".yml"))
    except OSError as exc:
        return [_skipped(location, f"cannot list the folder: {exc.strerror or exc}", shown)]
    out: list[Path] = []
    found = False
    for entry in entries:
        if entry.name.startswith(".#") and entry.is_symlink():
            continue  # an editor's lock (Emacs: a dangling symlink .#name.yaml), not a policy
        why = _why_skipped(entry)
        found = found or why is None
        out.append(entry if why is None else _skipped(entry, why))
    if not found:
        out.append(_skipped(location, "no *.yaml policy files", shown))
    return out


def load_policies(paths: list[Path]) -> tuple[list[Policy], list[Problem]]:
    """Load many files; also reports two files naming the same MT5 account."""
    policies: list[Policy] = []
    problems: list[Problem] = []
    seen: dict[str, Policy] = {}
    for path in paths:
        try:
            policy = load_policy_file(path)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        if policy.mt5 in seen:
            first = seen[policy.mt5]
            problems.append(Problem(policy.path, policy.lines.get("account.mt5", 1),
                                    f"account.mt5: {policy.mt5} is already managed by {first.path}; "
                                    "one file per MT5 account", duplicate_of=(policy.mt5, first.path)))
            continue
        seen[policy.mt5] = policy
        policies.append(policy)
    return policies, problems
