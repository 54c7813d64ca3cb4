"""The command line of CONTRACT.md section 4: `commands` holds the group and the first commands; each later
command group has a module of its own here and registers itself on the group below."""

from agent.cli import audit as _audit  # noqa: F401 - registers verify, report, db backup, db prune
from agent.cli import backtest as _backtest  # noqa: F401 - registers `backtest`
from agent.cli.commands import cli, main

__all__ = ["cli", "main"]
