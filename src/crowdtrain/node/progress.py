"""One live status line for a node: version, loss, tokens/s, bytes sent and received, and
the density and link the density controller works with."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.text import Text

from crowdtrain.progress import human_bytes

PLAIN_EVERY_S = 5.0  # without a terminal (logs, the demo) print a line this often


class NodeProgress:
    def __init__(self, console: Console, name: str, server: str):
        self.console = console
        self.name = name
        self.server = server
        self._live = (
            Live(Text(f"{name}: starting"), console=console, refresh_per_second=4, transient=False)
            if console.is_terminal
            else None
        )
        self._last_plain = 0.0
        self._started = time.monotonic()
        self._tokens_at = (time.monotonic(), 0)
        self._rate = 0.0

    def __enter__(self) -> NodeProgress:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def status(self, message: str) -> None:
        line = f"{self.name}: {message} ({self.server})"
        if self._live is not None:
            self._live.update(Text(line))
        else:
            self.console.print(line, highlight=False)

    def update(self, version: int, stats, traffic, link=None) -> None:
        now = time.monotonic()
        then, tokens_then = self._tokens_at
        if now - then >= 2.0:
            self._rate = (stats.tokens - tokens_then) / (now - then)
            self._tokens_at = (now, stats.tokens)
        elif self._rate == 0.0 and now > self._started:
            self._rate = stats.tokens / (now - self._started)
        loss = f"{stats.last_loss:.3f}" if stats.last_loss is not None else "-"
        line = (
            f"{self.name}  v{version}  loss {loss}  {self._rate:,.0f} tok/s  "
            f"updates {stats.updates}  sent {human_bytes(traffic.sent)}  "
            f"received {human_bytes(traffic.received)}"
            + (f"  refused {stats.refused}" if stats.refused else "")
            + (_link_text(link) if link is not None else "")
        )
        if self._live is not None:
            self._live.update(Text(line))
        elif now - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = now
            self.console.print(line, highlight=False)


def _link_text(link) -> str:
    """'  density 2.50%  up 1.2 MB/s  rtt 12 ms' (what is measured so far)."""
    text = f"  density {link.density:.2%}"
    if link.upload_bytes_per_s is not None:
        text += f"  up {human_bytes(link.upload_bytes_per_s)}/s"
    if link.rtt_s is not None:
        text += f"  rtt {link.rtt_s * 1000:.0f} ms"
    return text
