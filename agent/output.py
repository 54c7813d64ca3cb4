"""Printing records as table, json, jsonl or csv; progress on long work (only when stderr is a terminal)."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TypeVar

import click

# rich is imported where a table or a progress bar is drawn: json, jsonl and csv output never need it (its import
# is a noticeable part of a short command's start-up)

FORMATS = ("table", "json", "jsonl", "csv")
# every command that prints rows takes the same --format choice, validated the same way
FORMAT = click.Choice(FORMATS)
PROGRESS_FROM = 2000  # rows: fewer are written before a bar would be seen
T = TypeVar("T")


def echo(text: str) -> None:
    """Print rendered rows; an empty JSON Lines result is no line at all (not one empty line)."""
    if text:
        click.echo(text)


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield items, with a progress bar on stderr when it is a terminal and the work is long; silent otherwise
    (a pipe, a file, a cron job)."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    if not sys.stderr.isatty() or (total is not None and total < PROGRESS_FROM):
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def render(records: list[dict[str, Any]], fmt: str, columns: list[str], title: str | None = None,
           fields: list[str] | None = None) -> str:
    """`columns` are the table's; `fields` every key of a record (the CSV header, also when nothing matched)."""
    fmt = fmt.lower()
    if fmt == "json":
        return json.dumps(records, indent=2, default=str)
    if fmt == "jsonl":
        return "".join(json.dumps(r, default=str) + "\n" for r in progress(records, "jsonl")).rstrip("\n")
    if fmt == "csv":
        buffer = io.StringIO()
        keys = list(records[0].keys()) if records else (fields or columns)
        writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for record in progress(records, "csv"):
            writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in record.items()})
        return buffer.getvalue().rstrip("\n")
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text cells: what operators typed (a halt reason, a policy name) is shown as typed, never read as rich markup
    table = Table(title=Text(title) if title else None, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(*[Text("" if record.get(c) is None else str(record.get(c))) for c in columns])
    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    console.print(table)
    if not records:
        console.print("(none)")
    return console.file.getvalue().rstrip("\n")  # type: ignore[attr-defined]
