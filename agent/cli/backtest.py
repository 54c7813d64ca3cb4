"""`fund-agent backtest`: what a policy would have done over a history. Sends nothing, writes no ledger row."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click

from agent.cli.commands import EXIT_FAIL, Failure, _config, _moment, cli


def _amount(text: str | None, option: str) -> Decimal | None:
    if text is None:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise click.BadParameter(f"{text!r} is not an amount", param_hint=f"'{option}'") from None
    if not value.is_finite() or value < 0:
        raise click.BadParameter(f"{text!r} is not an amount of 0 or more", param_hint=f"'{option}'")
    return value


def _history(ctx: click.Context, source: str, since: datetime | None, until: datetime | None) -> Any:
    from agent.backtest import sources

    if source.startswith("ledger:"):
        account = source.split(":", 1)[1]
        if not account:
            raise click.BadParameter("ledger: needs an account, e.g. ledger:MTR130002534", param_hint="'--equity'")
        config = _config(ctx)
        return sources.read_ledger(config.database, account, config.database_password_env)
    if source.startswith("mt5:"):
        from agent.backtest.mt5_deals import read_mt5

        account = source.split(":", 1)[1]
        if not account:
            raise click.BadParameter("mt5: needs an account, e.g. mt5:MTR130002534", param_hint="'--equity'")
        return read_mt5(_config(ctx), account, since, until)
    path = Path(source)
    if not path.is_file():
        raise click.BadParameter(f"{source!r} is neither ledger:ACCOUNT, mt5:ACCOUNT nor a CSV file",
                                 param_hint="'--equity'")
    return sources.read_csv(path)


@cli.command()
@click.argument("policy_paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="POLICY...")
@click.option("--equity", "source", required=True, metavar="SOURCE",
              help="ledger:ACCOUNT, mt5:ACCOUNT or a CSV file time,equity[,balance,margin,margin_level]")
@click.option("--since", metavar="ISO", help="replay from this UTC date or time (default: the first reading)")
@click.option("--until", metavar="ISO", help="replay up to this UTC date or time, exclusive (default: the last)")
@click.option("--funding-balance", metavar="AMOUNT",
              help="the funding account's balance at the start (default: not modelled, never binds)")
@click.option("--broker-min", metavar="AMOUNT", help="the broker's per-transfer minimum (default: Deriv's, 1)")
@click.option("--broker-max", metavar="AMOUNT", help="the broker's per-transfer maximum (default: Deriv's, 2500)")
@click.option("--broker-daily-count", type=click.IntRange(0), help="MT5 transfers a UTC day (default: Deriv's, 6)")
@click.option("--format", "fmt", type=click.Choice(("table", "json", "csv")), default="table", show_default=True)
@click.option("--compare", is_flag=True, help="two or more policies side by side")
@click.option("--html", "html_path", type=click.Path(path_type=Path), metavar="FILE",
              help="also write equity, simulated equity and transfers over time to one self-contained HTML file")
@click.pass_context
def backtest(ctx: click.Context, policy_paths: tuple[Path, ...], source: str, since: str | None,
             until: str | None, funding_balance: str | None, broker_min: str | None, broker_max: str | None,
             broker_daily_count: int | None, fmt: str, compare: bool, html_path: Path | None) -> None:
    """Replay readings through POLICY... with the real rules on a virtual clock; sends nothing."""
    from dataclasses import replace

    from agent.backtest import output
    from agent.backtest.replay import Replay
    from agent.backtest.sources import SourceError
    from agent.policy.load import PolicyError, load_policy_file
    from agent.policy.warnings import DEFAULT_BROKER

    if compare and len(policy_paths) < 2:
        raise click.UsageError("--compare needs two or more policies")
    start, end = _moment(since, "--since"), _moment(until, "--until")
    if start is not None and end is not None and end <= start:
        raise click.BadParameter("must be after --since", param_hint="'--until'")
    funding = _amount(funding_balance, "--funding-balance")
    broker = replace(DEFAULT_BROKER, **{k: v for k, v in (
        ("min_amount", _amount(broker_min, "--broker-min")), ("max_amount", _amount(broker_max, "--broker-max")),
        ("daily_count", broker_daily_count)) if v is not None})
    policies = []
    problems = []
    for path in policy_paths:  # one file each, loaded on its own: variants of one account are the point here
        try:
            policies.append(load_policy_file(path))
        except PolicyError as exc:
            problems.extend(str(p) for p in exc.problems)
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        ctx.exit(EXIT_FAIL)
    try:
        history = _history(ctx, source, start, end)
    except SourceError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        ctx.exit(EXIT_FAIL)
    if start is not None and start > history.readings[-1].at or end is not None and end <= history.readings[0].at:
        raise Failure(f"--since/--until select no time covered by {history.label}")
    for policy in policies:
        if history.currency and history.currency != policy.currency:
            raise Failure(f"{history.label} is in {history.currency}, {policy.path} in {policy.currency}")
    results = [Replay(policy, history, funding_balance=funding, broker=broker, since=start, until=end).run()
               for policy in policies]
    if fmt == "json":
        click.echo(output.as_json(results))
    elif fmt == "csv":
        click.echo(output.as_csv(results))
    else:
        click.echo(output.as_table(results, compare=compare))
    if fmt != "table":  # the JSON object and the CSV have no place for these: say them on stderr
        for result in results:
            for note in output.notes(result):
                click.echo(f"note: {note}", err=True)
    else:
        for note in {n for r in results for n in r.history.notes}:
            click.echo(f"note: {note}")
    if html_path is not None:
        from agent.backtest.html import write_html

        try:
            write_html(html_path, results)
        except OSError as exc:
            raise Failure(f"cannot write {html_path}: {exc.strerror or exc}") from None
