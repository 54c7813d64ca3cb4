"""Printing records as table, json, jsonl or csv."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from rich.console import Console
from rich.table import Table

FORMATS = ("table", "json", "jsonl", "csv")


def render(records: list[dict[str, Any]], fmt: str, columns: list[str], title: str | None = None) -> str:
    if fmt == "json":
        return json.dumps(records, indent=2)
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).rstrip("\n")
    if fmt == "csv":
        buffer = io.StringIO()
        keys = list(records[0].keys()) if records else columns
        writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in record.items()})
        return buffer.getvalue().rstrip("\n")
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(*["" if record.get(c) is None else str(record.get(c)) for c in columns])
    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    console.print(table)
    if not records:
        console.print("(none)")
    return console.file.getvalue().rstrip("\n")  # type: ignore[attr-defined]
