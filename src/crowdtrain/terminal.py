"""What every command shares: the console (stderr), how a command fails, tables on stdout."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)

CONFIG_HELP = "TOML file with server and/or node tables (also CROWDTRAIN_CONFIG)."


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` in red and exit with `code` (2: bad usage or input)."""
    # soft_wrap: one line that the terminal wraps, so commands in the message copy whole
    # emoji=False: a fingerprint's ":AB:" must not turn into an emoji
    console.print(
        f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, emoji=False
    )
    raise typer.Exit(code)


def table_text(table: Table) -> str:
    """A table as plain text for stdout (pipes and terminals alike)."""
    capture = Console(width=max(100, console.width), color_system=None)
    with capture.capture() as captured:
        capture.print(table)
    return captured.get().rstrip("\n")
