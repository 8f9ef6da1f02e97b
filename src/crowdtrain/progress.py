"""Showing sizes and progress: decimal byte units, and a progress bar for long data work."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


@contextmanager
def byte_progress(
    label: str, total: int | None, console: Console | None = None
) -> Iterator[Callable[[int], None]]:
    """Yields `advance(nbytes)`. Shown on the console's terminal only (quiet in logs/pipes)."""
    console = console or Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=False),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    quiet = not console.is_terminal
    with Progress(*columns, console=console, transient=True, disable=quiet) as bar:
        task = bar.add_task(label, total=total)
        yield lambda nbytes: bar.advance(task, nbytes)


def human_bytes(n: float) -> str:
    """Decimal units (1 KB = 1000 B), as --upload-limit reads them."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_count(n: float) -> str:
    """1234 -> '1,234', 1476600 -> '1.48M', 123456789 -> '123.5M': short for a table column."""
    if abs(n) < 1e6:
        return f"{n:,.0f}"
    scaled, unit = (n / 1e9, "G") if abs(n) >= 1e9 else (n / 1e6, "M")
    return f"{scaled:.2f}{unit}" if abs(scaled) < 100 else f"{scaled:.1f}{unit}"
