"""The fund-agent command line (CONTRACT.md section 4). Thin: it wires parts together and prints."""

from __future__ import annotations

import getpass
import logging
import sys
from pathlib import Path
from typing import Any

import click

from agent import logs, output
from agent.config import Config, ConfigError, find_config, load_config
from agent.logs import redact
from agent.policy.load import Problem, load_policies, policy_files
from agent.policy.warnings import DEFAULT_BROKER, broker_warnings
from agent.timeutil import parse_iso

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
LEDGER_COLUMNS = ["id", "created_at", "account", "kind", "amount", "currency", "state", "broker_txn_id", "policy",
                  "equity", "error_code", "reason"]
DECISION_COLUMNS = ["id", "at", "account", "policy", "action", "amount", "equity", "equity_age_s", "bound_by",
                    "reason"]
# Transfer ids are SQLite row ids and broker transaction ids positive 64-bit integers: anything else is a typo.
ID = click.IntRange(1, 2**63 - 1)


class _Duration(click.ParamType):
    """`30s`, `15m`, `2h`, `1d`, as in the config and the policies."""

    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from datetime import timedelta

        from agent.timeutil import DurationError, parse_duration

        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(value)
        except DurationError as exc:
            self.fail(str(exc), param, ctx)


DURATION = _Duration()
_STATE: dict[str, Any] = {}  # the configuration in use, for main()'s error lines


class Failure(Exception):
    """An error for the user: printed as one line, exit 1."""


def _config(ctx: click.Context) -> Config:
    obj = ctx.ensure_object(dict)
    if "config" not in obj:
        obj["config"] = load_config(find_config(obj.get("config_path")))
        _STATE["config"] = obj["config"]
        settings = obj["config"].logging
        if settings.level and not obj.get("log_level"):
            logs.choose_level(settings.level)
        if settings.file is not None or settings.level:
            logs.use_file(str(settings.file) if settings.file else None, settings.max_bytes, settings.backups)
    return obj["config"]


def _policies(config: Config, required: bool = False) -> tuple[list[Any], list[Problem | str]]:
    """The policies in force and the problems to print. An account that two files name is in force under
    neither: its problem is printed, the account is skipped (the command then exits 1), the others go on.
    With `required`, no policy file at all is a Failure."""
    if not config.policies.exists():
        raise Failure(f"policies: {config.policies} does not exist")
    files = policy_files(config.policies)
    policies, found = load_policies(files)
    if required and not policies and not any(f.is_file() for f in files):
        for problem in found:  # entries that are no policy (a dangling symlink...), but not the folder itself
            if Path(problem.path) != config.policies:
                click.echo(str(problem), err=True)
        raise Failure(f"no policy found in {config.policies}: nothing to evaluate")
    problems: list[Problem | str] = list(found)
    duplicated = _duplicated_accounts(found)
    for account, paths in sorted(duplicated.items()):
        problems.append(f"{account}: skipped: {len(paths)} policy files manage it ({', '.join(paths)}); "
                        "keep one file per MT5 account")
    return [p for p in policies if p.mt5 not in duplicated], problems


def _duplicated_accounts(problems: list[Problem]) -> dict[str, list[str]]:
    """Accounts named by more than one policy file, with those files (load_policies marks the problems)."""
    named: dict[str, list[str]] = {}
    for problem in problems:
        if problem.duplicate_of is not None:
            account, first = problem.duplicate_of
            paths = named.setdefault(account, [first])
            paths.append(problem.path)
    return named


def _operator() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH", help="fund-agent.yaml (default: $FUND_AGENT_CONFIG or "
              "./fund-agent.yaml)")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--log-level", type=click.Choice(logs.LEVELS, case_sensitive=False),
              help="Log level of every command (default: warning; info for `run`; debug with --debug).")
@click.version_option(package_name="fund-agent")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool, log_level: str | None) -> None:
    """fund-agent: keeps Deriv MT5 accounts funded and sweeps their profit, under your policy files."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["debug"] = debug
    ctx.obj["log_level"] = log_level
    logs.choose_level(log_level or ("debug" if debug else None))
    logs.setup(logging.WARNING)  # the redacting formatter for every command; `run` raises it to info


# ---- check ----

@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--config-only", is_flag=True, help="Check fund-agent.yaml alone, not the policies.")
@click.pass_context
def check(ctx: click.Context, paths: tuple[Path, ...], config_only: bool) -> None:
    """Validate fund-agent.yaml (when one is found) and the policy files (default: the configured ones).
    Prints FILE:LINE: key: message per problem; exit 1 if any."""
    if config_only and paths:
        raise click.UsageError("--config-only checks the config alone: give no PATH")
    config, config_ok = _check_config(ctx, required=config_only or not paths)
    if config_only:
        ctx.exit(EXIT_OK if config_ok else EXIT_FAIL)
    files: list[Path] = []
    if paths:
        for path in paths:
            files.extend(policy_files(path) if path.is_dir() else [path])
    elif config is None:
        ctx.exit(EXIT_FAIL)  # the config's problems are printed; without it there are no policies to find
    else:
        if not config.policies.exists():
            raise Failure(f"policies: {config.policies} does not exist")
        files = policy_files(config.policies)
    if not files:
        raise Failure("no policy files to check")
    policies, problems = load_policies(files)
    for problem in problems:
        click.echo(str(problem))
    source = config.equity.source if config is not None and not paths else None
    for policy in policies:
        for warning in broker_warnings(policy, DEFAULT_BROKER, live=False, source=source):
            click.echo(str(warning))
        click.echo(f"{policy.path}: ok ({policy.name}, {policy.mt5})")
    if problems or not config_ok:
        ctx.exit(EXIT_FAIL)


def _check_config(ctx: click.Context, required: bool) -> tuple[Config | None, bool]:
    """Check the config when one is found (or `required`): its problems are printed like a policy's.
    A file that cannot be read at all stays one error line (main prints it)."""
    obj = ctx.ensure_object(dict)
    path = find_config(obj.get("config_path"))
    explicit = bool(obj.get("config_path"))  # --config names a file that must exist; the default may not
    if not required and not explicit and not path.exists() and not path.is_symlink():
        return None, True
    try:
        config = _config(ctx)
    except ConfigError as exc:
        if not exc.problems:
            raise
        for problem in exc.problems:
            click.echo(str(problem))
        return None, False
    click.echo(f"{path}: ok (config)")
    return config, True


# ---- run ----

@cli.command()
@click.option("--once", is_flag=True, help="Evaluate every policy once, execute, wait for outcomes, exit.")
@click.pass_context
def run(ctx: click.Context, once: bool) -> None:
    """The unattended service (or, with --once, a single pass)."""
    from agent.engine.tick import Engine
    from agent.instance_lock import LockHeld
    from agent.ledger.db import Ledger
    from agent.timeutil import Clock
    from agent.wiring import make_broker, make_leases, make_reconciler, make_source, take_ledger

    config = _config(ctx)
    policies, problems = _policies(config, required=True)
    for problem in problems:
        click.echo(str(problem), err=True)
    if not once:
        from agent.service import serve

        ctx.exit(serve(config))
    broker = make_broker(config)
    try:  # one process moves money on a ledger at a time: a pass beside the service would race it
        access = take_ledger(config, "run --once", required=True)
    except LockHeld as exc:
        raise Failure(f"{exc} (or use `fund-agent plan` to see what a pass would do)") from None
    clock = Clock()
    try:
        ledger = Ledger.open(config.database, password_env=config.database_password_env)
        try:
            source = make_source(config, clock, broker)
        except BaseException:
            ledger.close()
            raise
    except BaseException:
        access.release()
        raise
    ok = not problems and bool(policies)
    leases = None
    try:
        if access.ledger_path is None:  # a shared ledger: act only on the accounts no other agent holds
            leases = make_leases(config, ledger, access.owner)
            leases.sync((p.mt5 for p in policies), greedy=True)
        broker.connect()
        reconciler = make_reconciler(config, ledger, broker, clock, access, leases=leases)
        accounts = sorted(leases.held()) if leases is not None else [None]
        for account in accounts:
            for verdict in reconciler.run(account):
                click.echo(f"reconcile: {verdict}")
        engine = Engine(ledger, broker, source, clock, reconciler=reconciler, leases=leases)
        for policy in policies:
            if leases is not None and leases.time_left() < engine.lease_margin + leases.renew_every:
                leases.sync((p.mt5 for p in policies), greedy=True)  # a long pass renews what it holds
            outcome = engine.tick_safely(policy)  # one account's unexpected error stays with that account
            click.echo(_outcome_line(outcome))
            ok = ok and outcome.ok
    finally:
        if leases is not None:
            leases.release_all()
        broker.close()
        source.close()
        ledger.close()
        access.release()
    ctx.exit(EXIT_OK if ok else EXIT_FAIL)


def _outcome_line(outcome: Any) -> str:
    policy = outcome.policy
    decision = outcome.decision
    line = f"{policy.mt5} [{policy.name}] {decision.action}"
    if decision.amount is not None:
        line += f" {decision.amount} {policy.currency}"
    if outcome.transfer is not None:
        t = outcome.transfer
        line += f" -> transfer {t['id']} {t['state']}"
        if t["broker_txn_id"] is not None:
            line += f" (broker txn {t['broker_txn_id']})"
        if t["error_code"]:
            line += f" ({t['error_code']}: {t['error_message']})"
    return f"{line}: {decision.reason}"


# ---- plan ----

@cli.command()
@click.option("--detailed-exitcode", is_flag=True, help="Exit 2 when a transfer would be made.")
@click.option("--format", "fmt", type=output.FORMAT, default="table", show_default=True)
@click.pass_context
def plan(ctx: click.Context, detailed_exitcode: bool, fmt: str) -> None:
    """What `run --once` would do now, and why. Sends nothing, writes nothing."""
    from agent.engine.tick import Engine
    from agent.ledger.db import Ledger
    from agent.timeutil import Clock
    from agent.wiring import make_broker, make_source

    config = _config(ctx)
    policies, problems = _policies(config, required=True)
    for problem in problems:
        click.echo(str(problem), err=True)
    broker = make_broker(config, transfers=False)
    ledger_ = Ledger.open_readonly(config.database, password_env=config.database_password_env)
    clock = Clock()
    source = make_source(config, clock, broker)
    would_transfer = False
    failed = False  # an account whose evaluation failed: shown with why, and the exit is 1
    rows = []
    try:
        broker.connect()
        engine = Engine(ledger_, broker, source, clock)
        for policy in policies:
            outcome = engine.tick_safely(policy, execute=False)
            limits = engine.broker_limits(policy.currency)
            decision = outcome.decision
            would_transfer = would_transfer or decision.transfers
            failed = failed or decision.bound_by == "error"
            rows.append({
                "account": policy.mt5, "policy": policy.name, "policy_sha256": policy.sha256,
                "equity": str(outcome.snapshot.equity) if outcome.snapshot else None,
                "action": decision.action, "amount": str(decision.amount) if decision.amount is not None else None,
                "bound_by": decision.bound_by, "reason": decision.reason,
                "windows": {k: v for k, v in decision.details.items() if "." in k},
                "warnings": [str(w) for w in broker_warnings(policy, limits, live=True,
                                                              source=config.equity.source)],
            })
    finally:
        broker.close()
        source.close()
        if ledger_ is not None:
            ledger_.close()
    if fmt != "table":
        output.echo(output.render(rows, fmt, list(rows[0]) if rows else []))
    else:
        for row in rows:
            amount = f" {row['amount']}" if row["amount"] else ""
            equity = row["equity"] if row["equity"] is not None else "n/a (no usable reading)"
            click.echo(f"{row['account']} [{row['policy']}] equity {equity}: would {row['action']}{amount}")
            click.echo(f"  why: {row['reason']}")
            if row["bound_by"]:
                click.echo(f"  binding: {row['bound_by']}")
            for name, used in row["windows"].items():
                click.echo(f"  used {name}: {used}")
            for warning in row["warnings"]:
                click.echo(f"  {warning}")
    if problems or failed:
        ctx.exit(EXIT_FAIL)
    ctx.exit(2 if detailed_exitcode and would_transfer else EXIT_OK)


# ---- ledger and decisions ----

def _filters(account: str | None, since: str | None, until: str | None, kind: str | None,
             state: str | None, policy: str | None = None, funding: str | None = None) -> Any:
    from agent.ledger import queries

    start, end = _range(since, until)
    return queries.Filters(account=account, since=start, until=end, kind=kind, state=state, policy=policy,
                           funding=funding)


def _existing_ledger(config: Config) -> None:
    """Commands that work on what was recorded refuse a SQLite ledger file that does not exist (a mistyped path)
    instead of creating an empty one and answering from it."""
    from agent.ledger.db import sqlite_path

    path = sqlite_path(config.database)
    if path is not None and not path.exists():
        raise Failure(f"no ledger at {path}: nothing has been recorded there (check `database:` in the config)")


def _range(since: str | None, until: str | None) -> tuple[Any, Any]:
    """--since/--until as UTC datetimes; a range that ends before it starts is a usage error, not an empty (or,
    for a comparison, falsely agreeing) answer."""
    start, end = _moment(since, "--since"), _moment(until, "--until")
    if start is not None and end is not None and end <= start:
        raise click.UsageError(f"--until ({until}) must be later than --since ({since})")
    return start, end


def _moment(text: str | None, option: str) -> Any:
    """A --since/--until value as a UTC datetime; a value that is no date, or has no UTC equivalent, is a usage
    error naming the option."""
    if text is None:
        return None
    try:
        return parse_iso(text)
    except (ValueError, OverflowError, TypeError):
        raise click.BadParameter(f"{text!r} is not an ISO 8601 date or time in range, e.g. 2026-11-25 or "
                                 "2026-11-25T09:00:00Z", param_hint=f"'{option}'") from None


def _filter_options(func: Any) -> Any:
    for option in reversed([
        click.option("--account", help="MT5 login, e.g. MTR130002534"),
        click.option("--since", metavar="ISO", help="from this UTC date or time (inclusive)"),
        click.option("--until", metavar="ISO", help="up to this UTC date or time (exclusive)"),
        click.option("--policy", metavar="NAME", help="policy name (for halts: the accounts it manages)"),
        click.option("--funding", metavar="LOGIN", help="funding account, e.g. CR4000128 (for decisions and "
                     "halts: the accounts whose transfers it paid or received)"),
        click.option("--format", "fmt", type=click.Choice(output.FORMATS), default="table", show_default=True),
        click.option("--totals", is_flag=True, help="Counts (and sums) per group instead of rows, in SQL."),
        click.option("--by", type=click.Choice(["day", "week", "month"]),
                     help="With --totals (or --net): one group per UTC day, week (from Monday) or month too."),
    ]):
        func = option(func)
    return func


def _check_by(by: str | None, grouped: bool) -> None:
    if by and not grouped:
        raise click.UsageError("--by goes with --totals (or, for ledger, --net)")


@cli.command()
@_filter_options
@click.option("--kind", type=click.Choice(["top_up", "sweep"]))
@click.option("--state", type=click.Choice(["pending", "sent", "confirmed", "failed", "unknown"]))
@click.option("--net", is_flag=True, help="Confirmed net flow (top-ups - sweeps) per account and per funding "
              "account.")
@click.pass_context
def ledger(ctx: click.Context, account: str | None, since: str | None, until: str | None, policy: str | None,
           funding: str | None, fmt: str, totals: bool, by: str | None, kind: str | None, state: str | None,
           net: bool) -> None:
    """The transfer ledger."""
    from agent.audit import questions
    from agent.ledger import queries

    _check_by(by, totals or net)
    if totals and net:
        raise click.UsageError("give one of --totals and --net")
    filters = _filters(account, since, until, kind, state, policy, funding)
    period = ["period"] if by else []
    if totals:
        records = _read(ctx, lambda s: questions.transfer_totals(s, filters, by))
        output.echo(output.render(records, fmt, [*period, "account", "kind", "currency", "state", "count", "amount"]))
        return
    if net:
        records = _read(ctx, lambda s: questions.net_flow(s, filters, by))
        output.echo(output.render(records, fmt, [*period, "scope", "login", "currency", "top_up", "sweep", "net",
                                                "top_up_count", "sweep_count"]))
        return
    records = _read(ctx, lambda s: [queries.transfer_record(t) for t in queries.list_transfers(s, filters)])
    output.echo(output.render(records, fmt, LEDGER_COLUMNS, fields=queries.TRANSFER_FIELDS))


@cli.command()
@_filter_options
@click.option("--kind", type=click.Choice(["top_up", "sweep", "none", "error"]), help="the decision's action")
@click.option("--state", type=click.Choice(["top_up", "sweep", "none", "error"]),
              help="same as --kind (decisions have an action, not a state)")
@click.option("--runs", is_flag=True, help="One line per run of identical no-op evaluations (as the ledger keeps "
              "them), with run_count and run_last_at, instead of one per evaluation.")
@click.pass_context
def decisions(ctx: click.Context, account: str | None, since: str | None, until: str | None, policy: str | None,
              funding: str | None, fmt: str, totals: bool, by: str | None, kind: str | None,
              state: str | None, runs: bool) -> None:
    """Every evaluation, including those that did nothing, and why."""
    from agent.audit import questions
    from agent.ledger import queries

    _check_by(by, totals)
    if runs and totals:
        raise click.UsageError("--runs and --totals do not go together")
    filters = _filters(account, since, until, kind, state, policy, funding)
    if totals:
        records = _read(ctx, lambda s: questions.decision_totals(s, filters, by))
        output.echo(output.render(records, fmt, [*(["period"] if by else []), "account", "policy", "action",
                                                "count"]))
        return
    records = _read(ctx, lambda s: queries.decision_records(queries.list_decisions(s, filters), filters, runs))
    output.echo(output.render(records, fmt, [*DECISION_COLUMNS, *(["run_count", "run_last_at"] if runs else [])],
                              fields=queries.RUN_FIELDS if runs else queries.DECISION_FIELDS))


def _read(ctx: click.Context, query: Any) -> list[dict[str, Any]]:
    from agent.ledger.db import Ledger

    config = _config(ctx)
    opened = Ledger.open_readonly(config.database, password_env=config.database_password_env)
    if opened is None:
        return []
    try:
        with opened.reader() as session:
            return query(session)
    finally:
        opened.close()


# ---- status ----

@cli.command()
@click.option("--format", "fmt", type=output.FORMAT, default="table", show_default=True)
@click.option("--check", "probe", is_flag=True, help="A monitoring probe: exit 1 when an account is halted, has "
              "an unresolved transfer or no fresh reading (each reason on stderr).")
@click.pass_context
def status(ctx: click.Context, fmt: str, probe: bool) -> None:
    """Per account: last equity and its age, policy, window usage, halts, unresolved transfers, last error."""
    from agent.status import read_status, render_text

    config = _config(ctx)
    policies, problems = _policies(config)
    for problem in problems:
        click.echo(str(problem), err=True)
    rows = read_status(config, policies)
    if fmt == "table":
        click.echo(render_text(rows))
    else:
        output.echo(output.render(rows, fmt, list(rows[0]) if rows else []))
    if probe:
        reasons = [f"{row['account']}: {why}" for row in rows for why in row["problems"]]
        for reason in reasons:
            click.echo(f"check failed: {reason}", err=True)
        if not rows:
            click.echo("check failed: no policy in force", err=True)
        if reasons or not rows:
            ctx.exit(EXIT_FAIL)
        click.echo(f"check ok: {len(rows)} account(s) fresh, none halted, nothing unresolved", err=True)
    if problems:
        ctx.exit(EXIT_FAIL)


# ---- halts ----

@cli.command()
@click.argument("account")
@click.option("--reason", required=True, help="Why: recorded in the ledger.")
@click.pass_context
def halt(ctx: click.Context, account: str, reason: str) -> None:
    """Stop top-ups of ACCOUNT until `fund-agent resume ACCOUNT`."""
    from agent.ledger import queries
    from agent.ledger.db import Ledger
    from agent.policy.load import MT5_LOGIN
    from agent.timeutil import utcnow

    if not MT5_LOGIN.match(account):
        raise click.BadParameter(f"{account!r} is not an MT5 login like MTR130002534", param_hint="ACCOUNT")
    if not reason.strip():
        raise click.BadParameter("give a reason: it is recorded in the ledger", param_hint="--reason")
    config = _config(ctx)
    ledger_ = Ledger.open(config.database, password_env=config.database_password_env)
    try:
        with ledger_.session() as session:
            queries.add_halt(session, account, "operator", reason, utcnow(), f"operator:{_operator()}")
            session.commit()
    finally:
        ledger_.close()
    click.echo(f"{account}: halted ({reason})")
    if account not in _managed_accounts(config):  # recorded all the same: a halt may go ahead of its policy
        click.echo(f"warning: no policy in {config.policies} manages {account}", err=True)


def _managed_accounts(config: Config) -> set[str]:
    if not config.policies.exists():
        return set()
    policies, _problems = load_policies(policy_files(config.policies))
    return {policy.mt5 for policy in policies}


@cli.command()
@click.argument("account")
@click.pass_context
def resume(ctx: click.Context, account: str) -> None:
    """Clear every halt of ACCOUNT (operator and kill switch)."""
    from agent.ledger import queries
    from agent.ledger.db import Ledger
    from agent.timeutil import utcnow

    config = _config(ctx)
    ledger_ = Ledger.open(config.database, password_env=config.database_password_env)
    try:
        with ledger_.session() as session:
            cleared = queries.clear_halts(session, account, utcnow(), f"operator:{_operator()}")
            session.commit()
    finally:
        ledger_.close()
    click.echo(f"{account}: resumed ({cleared} halt(s) cleared)" if cleared else f"{account}: was not halted")


# ---- reconcile and resolve ----

@cli.command()
@click.pass_context
@click.option("--lookback", type=DURATION, default="1d", show_default=True,
              help="How far back the reverse check reads the funding accounts' statements.")
def reconcile(ctx: click.Context, lookback: Any) -> None:
    """Resolve sent/unknown transfers against the broker's statement; print what was decided."""
    from agent.ledger.db import Ledger
    from agent.timeutil import Clock
    from agent.wiring import make_broker, make_reconciler, take_ledger

    config = _config(ctx)
    from agent.ledger.db import sqlite_path

    path = sqlite_path(config.database)
    if path is not None and not path.exists():  # a mistyped path must not create an empty ledger
        click.echo(f"nothing to reconcile: no ledger at {path} yet")
        return
    broker = make_broker(config, transfers=False)
    # Beside a running agent this goes on without the lock: that agent's in-flight transfers are left to it.
    access = take_ledger(config, "reconcile", required=False)
    clock = Clock()
    try:
        ledger_ = Ledger.open(config.database, password_env=config.database_password_env)
        try:
            broker.connect()
            verdicts = make_reconciler(config, ledger_, broker, clock, access).run()
            unknown_moves = _unlinked_moves(ledger_, broker, clock.now() - lookback, clock.now())
        finally:
            broker.close()
            ledger_.close()
    finally:
        access.release()
    for verdict in verdicts:
        click.echo(str(verdict))
    if not verdicts:
        click.echo("nothing to reconcile: no pending, sent or unknown transfers")
    for line in unknown_moves:
        click.echo(line)
    if any(v.after in ("sent", "unknown", "pending") for v in verdicts) or unknown_moves:
        ctx.exit(EXIT_FAIL)


def _unlinked_moves(ledger_: Any, broker: Any, since: Any, until: Any) -> list[str]:
    """The reverse check: transfers with our app_id in the funding accounts' statements that no ledger row
    links (money moved that the ledger does not know), leaving out those an unresolved row may be."""
    from agent.audit.verify import signed, unlinked_statement_rows
    from agent.broker.base import statement_all
    from agent.engine.reconcile import matches
    from agent.ledger import queries

    with ledger_.reader() as session:
        currencies = queries.funding_currencies(session)
        open_rows = queries.unresolved(session)
        lines = []
        for funding, currency in sorted(currencies.items()):
            rows = statement_all(broker, since, until, funding)
            for row in unlinked_statement_rows(session, rows, broker.app_id):
                if any(matches(row, t, broker.app_id) for t in open_rows):
                    continue  # still being settled: the verdicts above say how
                other = (row.get("to") or {}).get("loginid") if (row.get("from") or {}).get("loginid") == funding \
                    else (row.get("from") or {}).get("loginid")
                amount = signed(row, currency)
                lines.append(f"not in ledger: txn {row['transaction_id']} amount {amount} account {other} "
                             f"(funding {funding}): money moved that no ledger row records")
    return lines


@cli.command()
@click.argument("transfer_id", type=ID)
@click.option("--confirmed", "txn_id", type=ID, metavar="TXN_ID",
              help="The broker transaction that executed it (a positive 64-bit integer).")
@click.option("--failed", is_flag=True, help="It did not execute.")
@click.option("--reason", help="Why (required with --failed).")
@click.pass_context
def resolve(ctx: click.Context, transfer_id: int, txn_id: int | None, failed: bool, reason: str | None) -> None:
    """Settle a transfer that reconciliation could not prove either way (recorded with who, when, why)."""
    from sqlalchemy.exc import IntegrityError

    from agent.engine.transfers import StateError, settle
    from agent.ledger import queries
    from agent.ledger.db import Ledger
    from agent.ledger.models import Transfer
    from agent.timeutil import utcnow
    from agent.wiring import live_owner_check, take_ledger

    if (txn_id is None) == (not failed):
        raise click.UsageError("give exactly one of --confirmed TXN_ID or --failed --reason TEXT")
    if failed and not reason:
        raise click.UsageError("--failed needs --reason TEXT")
    config = _config(ctx)
    _existing_ledger(config)
    access = take_ledger(config, "resolve", required=False)
    try:
        ledger_ = Ledger.open(config.database, password_env=config.database_password_env)
    except BaseException:
        access.release()
        raise
    who = f"operator:{_operator()}"
    now = utcnow()
    try:
        with ledger_.session() as session:
            transfer = session.get(Transfer, transfer_id)
            if transfer is None:
                raise Failure(f"no transfer {transfer_id} in the ledger")
            if transfer.state not in ("sent", "unknown"):
                raise Failure(f"transfer {transfer_id} is {transfer.state}: only sent or unknown transfers are "
                              "resolved by hand")
            state = transfer.state
            # the broker's own code stays (CONTRACT: error_code is the broker's code verbatim); the operator's
            # reason joins the message and the event
            broker_code, broker_message = transfer.error_code, transfer.error_message
            live = live_owner_check(config, ledger_, access)(transfer.owner) if state == "sent" else None
        if live is not None:
            raise Failure(f"transfer {transfer_id} is sent and in flight in {live}: its reply settles it; "
                          "resolve it by hand only once it is unknown (or that agent is stopped)")
        if state == "sent":  # an operator's word makes it unknown first, so the event log shows both steps
            try:
                settle(ledger_, transfer_id, "unknown", now, who, expected="sent", detail="taken over by the operator")
            except StateError as exc:
                raise Failure(str(exc)) from None
        try:
            if failed:
                done = settle(ledger_, transfer_id, "failed", now, who, expected="unknown", resolved_by=who,
                              detail=reason, error_code=broker_code or "ResolvedFailed",
                              error_message=(f"{broker_message}; " if broker_message else "")
                              + f"resolved failed by {who}: {reason}")
            else:
                done = settle(ledger_, transfer_id, "confirmed", now, who, expected="unknown", resolved_by=who,
                              broker_txn_id=txn_id, detail=reason or f"operator confirmed broker txn {txn_id}")
        except IntegrityError:
            raise Failure(f"broker transaction {txn_id} already confirms another transfer") from None
        except StateError as exc:
            raise Failure(str(exc)) from None
        with ledger_.session() as session:
            queries.clear_halts(session, done.account, now, who, kind="unresolved")
            session.commit()
    finally:
        ledger_.close()
        access.release()
    click.echo(f"transfer {transfer_id}: {done.state} (by {who})")


@cli.command()
@_filter_options
@click.option("--kind", type=click.Choice(["operator", "kill_switch", "unresolved", "operator_needed"]))
@click.option("--all", "show_all", is_flag=True, help="Include halts already cleared by `resume`.")
@click.pass_context
def halts(ctx: click.Context, account: str | None, since: str | None, until: str | None, policy: str | None,
          funding: str | None, fmt: str, totals: bool, by: str | None, kind: str | None, show_all: bool) -> None:
    """Halts (operator, kill switch, unresolved, operator needed): active ones, or all with --all."""
    from agent.audit import questions
    from agent.ledger import queries

    _check_by(by, totals)
    filters = _filters(account, since, until, kind, None, policy, funding)
    if totals:
        records = _read(ctx, lambda s: questions.halt_totals(s, filters, by, active_only=not show_all))
        output.echo(output.render(records, fmt, [*(["period"] if by else []), "account", "kind", "count", "active"]))
        return
    records = _read(ctx, lambda s: [queries.halt_record(h)
                                    for h in queries.list_halts(s, filters, active_only=not show_all)])
    output.echo(output.render(records, fmt, ["id", "account", "kind", "scope", "created_at", "created_by",
                                            "cleared_at", "reason"], fields=queries.HALT_FIELDS))


# ---- db ----

@cli.group()
def db() -> None:
    """Ledger database maintenance."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply the ledger migrations (run also does this at start)."""
    from agent.ledger.db import upgrade

    config = _config(ctx)
    before, after, backup = upgrade(config.database, password_env=config.database_password_env)
    if before == after:
        click.echo(f"ledger already at revision {after}")
    else:
        click.echo(f"ledger upgraded from {before or 'empty'} to {after}"
                   + (f" (copy of the old file: {backup})" if backup else ""))


# ---- demo ----

@cli.command()
@click.option("--seconds", type=float, default=20.0, show_default=True, help="How long to run.")
@click.option("--speed", type=float, default=600.0, show_default=True, help="Virtual seconds per real second.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Another policy file to run (default: the example policy).")
@click.option("--start-equity", default="450.00", show_default=True, help="The simulated account's first equity.")
@click.option("--drift", default="-25", show_default=True, help="The simulation's P/L per step, on average.")
def demo(seconds: float, speed: float, seed: int, policy_path: Path | None, start_equity: str, drift: str) -> None:
    """The whole system on the embedded default, offline: simulated MT5, loopback broker, temporary ledger."""
    from decimal import Decimal, InvalidOperation

    from agent.demo import run_demo

    try:
        start, step = Decimal(start_equity), Decimal(drift)
    except InvalidOperation:
        raise click.BadParameter("--start-equity and --drift take numbers") from None
    run_demo(seconds=seconds, speed=speed, seed=seed, policy_path=policy_path, start_equity=start, drift=step)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        code = cli.main(args=args, prog_name="fund-agent", standalone_mode=False)
    except click.exceptions.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"fund-agent: error: {_one_line(exc.format_message())}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_FAIL)
    except click.ClickException as exc:
        click.echo(f"fund-agent: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(EXIT_FAIL)
    except (Failure, ConfigError) as exc:
        click.echo(f"fund-agent: error: {redact(str(exc))}", err=True)
        sys.exit(EXIT_FAIL)
    except Exception as exc:  # noqa: BLE001 - one clear line, never a traceback unless --debug
        if debug:
            raise
        click.echo(f"fund-agent: error: {_error_line(exc)}", err=True)
        sys.exit(EXIT_FAIL)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error_line(exc: Exception) -> str:
    """An unexpected error as one line: never SQL, its parameters or a traceback."""
    from agent.broker.errors import BrokerError
    from agent.ledger.db import LedgerError

    if isinstance(exc, LedgerError):
        return _one_line(redact(str(exc)))
    if isinstance(exc, BrokerError):
        return f"broker error: {_one_line(redact(str(exc)))}"
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy_exc is not None and isinstance(exc, sqlalchemy_exc.DBAPIError):
        from agent.ledger.db import db_reason, describe

        config = _STATE.get("config")
        where = f" {describe(config.database)}" if config is not None else ""
        return f"the ledger{where} failed: {redact(db_reason(exc))}"
    return f"{type(exc).__name__}: {_one_line(redact(str(exc)))}"
