"""What every command shares: the console (stderr) and how a command fails."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)

CONFIG_HELP = "TOML file with server and/or node tables (also CROWDTRAIN_CONFIG)."


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` in red and exit with `code` (2: bad usage or input)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)
