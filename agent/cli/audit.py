"""The auditor's commands: verify (the hash chain, the invariants, the ledger against the broker), report (one
self-contained HTML file), db backup and db prune."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click

from agent.cli.commands import EXIT_FAIL, Failure, _config, _existing_ledger, _range, cli, db

MIN_PRUNE_AGE = timedelta(days=1)

EDGE = timedelta(minutes=5)  # the broker's clock and ours may differ a little at the range's edges


def _open_readonly(ctx: click.Context, current: bool = True) -> Any:
    from agent.ledger.db import Ledger

    config = _config(ctx)
    # `current`: refuse a ledger of an older revision (`verify` reads any, and says what an old one lacks)
    ledger = Ledger.open_readonly(config.database, password_env=config.database_password_env, current=current)
    if ledger is None:
        raise Failure(f"no ledger at {config.database}: nothing recorded yet")
    return ledger


# ---- verify ----

@cli.command()
@click.option("--print-head", is_flag=True, help="Print only the head hash (note it: a later verify proves "
              "nothing before it changed).")
@click.option("--all", "show_all", is_flag=True, help="Print every broken row, not only the first.")
@click.option("--against-broker", is_flag=True, help="Compare confirmed transfers with the funding accounts' "
              "statements for --since/--until (needs only a read-scope token).")
@click.option("--since", metavar="ISO", help="with --against-broker: from this UTC date or time (inclusive)")
@click.option("--until", metavar="ISO", help="with --against-broker: up to this UTC date or time (exclusive)")
@click.pass_context
def verify(ctx: click.Context, print_head: bool, show_all: bool, against_broker: bool, since: str | None,
           until: str | None) -> None:
    """Recompute the ledger's hash chain and invariants (or, --against-broker, compare with the broker)."""
    if against_broker:
        if since is None or until is None:
            raise click.UsageError("--against-broker needs --since and --until")
        ctx.exit(_against_broker(ctx, *_range(since, until)))
    from agent.audit.verify import chain_expected, missing_tables
    from agent.audit.verify import verify as run_verify

    ledger = _open_readonly(ctx, current=False)
    try:
        with ledger.reader() as session:
            # at revision 0004 or later a missing chain was removed: verify names it (exit 1)
            if missing_tables(session.connection()) and not chain_expected(session.connection()):
                raise Failure("the ledger has no hash chain yet (made before fund-agent 0004): run `fund-agent db "
                              "upgrade`, which chains it from its first row")
            result = run_verify(session.connection())
    finally:
        ledger.close()
    if print_head:
        click.echo(result.head)
    elif result.ok:
        click.echo(f"ok: {result.rows} rows, head {result.head}")
    for problem in result.problems if show_all else result.problems[:1]:
        click.echo(str(problem))
    if not result.ok:
        ctx.exit(EXIT_FAIL)


def _against_broker(ctx: click.Context, since: datetime, until: datetime) -> int:
    from sqlalchemy import select

    from agent.audit.verify import missing_at_broker, signed, unlinked_statement_rows
    from agent.broker.base import statement_all
    from agent.ledger import queries
    from agent.ledger.models import Transfer
    from agent.timeutil import iso
    from agent.wiring import make_broker

    config = _config(ctx)
    ledger = _open_readonly(ctx)
    broker = make_broker(config, transfers=False)  # read scope is enough: nothing is sent
    lines: list[str] = []
    try:
        broker.connect()
        with ledger.reader() as session:
            currencies = queries.funding_currencies(session)
            for policy in _policies_in_force(config):  # a funding account the ledger has not used yet
                currencies.setdefault(policy.funding, policy.currency)
            for funding in sorted(currencies):
                rows = statement_all(broker, since - EDGE, until + EDGE, funding)
                in_range = [r for r in rows if since.timestamp() <= int(r.get("transaction_time") or 0)
                            < until.timestamp()]
                for row in sorted(unlinked_statement_rows(session, in_range, broker.app_id),
                                  key=lambda r: r["transaction_id"]):
                    amount = signed(row, currencies[funding])
                    other = (row.get("to") or {}).get("loginid") if amount.startswith("-") else \
                        (row.get("from") or {}).get("loginid")
                    when = iso(datetime.fromtimestamp(row["transaction_time"], since.tzinfo))
                    lines.append(f"not in ledger: txn {row['transaction_id']} amount {amount} account {funding}"
                                 f" (with {other}, at {when})")
                confirmed = list(session.scalars(
                    select(Transfer).where(Transfer.funding == funding, Transfer.state == "confirmed",
                                           Transfer.created_at >= since, Transfer.created_at < until)
                    .order_by(Transfer.id)))
                for t, why in missing_at_broker(confirmed, rows, broker.app_id):
                    lines.append(f"not at broker: transfer {t.id} {t.kind} {queries.amount_of(t)} {t.currency} "
                                 f"{t.account} ({t.funding}): {why}")
    finally:
        broker.close()
        ledger.close()
    for line in lines:
        click.echo(line)
    if not lines:
        click.echo(f"ok: the ledger and the broker agree from {iso(since)} until {iso(until)}")
    return EXIT_FAIL if lines else 0


def _policies_in_force(config: Any) -> list[Any]:
    """The configured policies that load (problems are `check`'s business, not the auditor's)."""
    if not config.policies.exists():
        return []
    from agent.policy.load import load_policies, policy_files

    policies, _problems = load_policies(policy_files(config.policies))
    return list(policies)


# ---- report ----

@cli.command()
@click.option("--account", help="MT5 login (default: every account)")
@click.option("--since", metavar="ISO", required=True, help="from this UTC date or time (inclusive)")
@click.option("--until", metavar="ISO", required=True, help="up to this UTC date or time (exclusive)")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="FILE.html")
@click.pass_context
def report(ctx: click.Context, account: str | None, since: str, until: str, output_path: Path) -> None:
    """One self-contained HTML file: equity, transfers, net funding, window usage, halts."""
    from agent.audit.report import build_report

    start, end = _range(since, until)
    policies = _policies_in_force(_config(ctx))
    ledger = _open_readonly(ctx)
    try:
        with ledger.reader() as session:
            page = build_report(session, account, start, end, policies)
    finally:
        ledger.close()
    output_path.write_text(page, encoding="utf-8")
    click.echo(f"wrote {output_path} ({len(page.encode('utf-8'))} bytes)")


# ---- db backup and prune ----

@db.command("backup")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def db_backup(ctx: click.Context, path: Path) -> None:
    """An online, consistent copy of the ledger (SQLite's backup API), safe while the service runs."""
    from agent.audit.maintenance import MaintenanceError, backup

    config = _config(ctx)
    try:
        click.echo(backup(config.database, path))
    except MaintenanceError as exc:
        raise Failure(str(exc)) from None


@db.command("prune")
@click.option("--decisions-older-than", "older_than", required=True, metavar="DURATION",
              help="e.g. 90d: decisions that did nothing (action none) older than this are removed")
@click.option("--vacuum", is_flag=True, help="Also give the freed space back to the file system (SQLite VACUUM: "
              "holds the write lock while it runs).")
@click.pass_context
def db_prune(ctx: click.Context, older_than: str, vacuum: bool) -> None:
    """Remove old no-op decisions (never transfers, events or halts); `verify` stays clean."""
    from agent.audit.maintenance import MaintenanceError, prune, vacuum_ledger
    from agent.ledger.db import Ledger
    from agent.timeutil import DurationError, parse_duration, utcnow

    try:
        age = parse_duration(older_than)
    except DurationError as exc:
        raise click.BadParameter(str(exc), param_hint="'--decisions-older-than'") from None
    if age < MIN_PRUNE_AGE:
        # `status` and the health checks read each account's latest evaluation from the journal
        raise click.BadParameter("at least 1d: the newest decisions say when each account was last evaluated",
                                 param_hint="'--decisions-older-than'")
    config = _config(ctx)
    _existing_ledger(config)
    ledger = Ledger.open(config.database, password_env=config.database_password_env)
    try:
        now = utcnow()
        try:
            count, cutoff = prune(ledger, now - age, now)
        except MaintenanceError as exc:
            raise Failure(str(exc)) from None
        if vacuum:
            vacuum_ledger(ledger)
    finally:
        ledger.close()
    from agent.timeutil import iso

    click.echo(f"pruned {count} no-op decision(s) before {iso(cutoff)}" if count
               else f"nothing to prune before {iso(now - age)}")
