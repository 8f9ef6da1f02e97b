"""Shared parts of the benchmarks: child processes that always stop, a server's tokens,
progress, JSON output."""

from __future__ import annotations

import atexit
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

API = "/api/v1"
console = Console(stderr=True, highlight=False)
_LIVE: list[ChildProcess] = []  # every child still running, stopped at exit whatever happens


def log(message: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}")


def emit(result: dict) -> None:
    """The benchmark's one JSON document, on stdout."""
    print(json.dumps(result, indent=2, sort_keys=False), flush=True)


def machine() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "cpu_cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        # other work on a shared machine skews absolute figures; this says how busy it was
        "load_average_1_5_15m": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between neighbours; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 4)


def timed_window(label: str, seconds: float, on_tick: Callable[[], str] | None = None) -> None:
    """Sleep `seconds` behind a progress bar on stderr; `on_tick` adds a live status text."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=seconds, status="")
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            status = on_tick() if on_tick is not None else ""
            progress.update(task, completed=elapsed, status=status)
            time.sleep(min(1.0, seconds - elapsed))
        progress.update(task, completed=seconds)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads) from /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ChildProcess:
    """A `python -m crowdtrain ...` child with its log in a file; stopped on exit, always."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "crowdtrain", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            start_new_session=True,  # a Ctrl-C here reaches the child once, through stop()
        )
        _LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the process holds no CPU until resume(); its sockets simply wait."""
        if self.alive():
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        """Ask politely, wait, then kill."""
        if self.alive():
            self.resume()  # a paused process would not handle the signal
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if self in _LIVE:
            _LIVE.remove(self)


def bearer(token: str) -> dict[str, str]:
    """The header of a request made with `token`: an admin API token or a node's access JWT."""
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class NodeIdentity:
    """What POST /nodes/register answers: who a hand-made sender is, and how it proves it."""

    node_id: str
    access_token: str
    last_seq: int  # its next update carries a higher seq

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.access_token)


class ServerProcess(ChildProcess):
    """`crowdtrain server` on 127.0.0.1 with a free port; settings as CROWDTRAIN_* variables.

    It accepts an admin token made here (CROWDTRAIN_ADMIN_TOKEN), which every read sends; nodes
    get enrollment tokens made with it (`node_env` for node processes, `register` for senders
    made by hand)."""

    def __init__(
        self,
        log_dir: Path,
        data_dir: Path,
        settings: dict[str, object],
        extra_env: dict[str, str] | None = None,
        name: str = "server",
    ):
        env = {
            f"CROWDTRAIN_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in settings.items()
        }
        self.admin_token = "ct_admin_" + secrets.token_urlsafe(32)
        env["CROWDTRAIN_ADMIN_TOKEN"] = self.admin_token
        env.update(extra_env or {})
        args = ["server", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir)]
        super().__init__(name, args, env, log_dir)
        self.url = ""

    @property
    def admin(self) -> dict[str, str]:
        return bearer(self.admin_token)

    def wait_until_up(self, timeout: float = 300.0) -> str:
        """Block until /health (public) answers; returns the base URL."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the server exited during start-up:\n{self.log_tail()}")
            if not self.url:
                match = re.search(r"listening on (http://\S+)", self.log_path.read_text())
                if match:
                    self.url = match.group(1)
            if self.url:
                try:
                    if httpx.get(self.url + API + "/health", timeout=5).status_code == 200:
                        return self.url
                except httpx.TransportError:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def get(self, path: str, **params) -> dict:
        response = httpx.get(self.url + API + path, params=params, headers=self.admin, timeout=120)
        return _checked(response, f"GET {path}").json()

    def text(self, path: str) -> str:
        response = httpx.get(self.url + API + path, headers=self.admin, timeout=120)
        return _checked(response, f"GET {path}").text

    def rounds(self, since: int = -1) -> list[dict]:
        return self.get("/history", since=since, limit=100_000)["rounds"]

    def enrollment_token(self, uses: int) -> str:
        """A node enrollment token good for `uses` registrations (and one day)."""
        response = httpx.post(
            self.url + API + "/tokens",
            json={"role": "node", "uses": uses, "expires": "1d", "label": "benchmark"},
            headers=self.admin,
            timeout=30,
        )
        return _checked(response, "POST /tokens (an enrollment token)").json()["token"]

    def node_env(self, config_dir: Path) -> dict[str, str]:
        """Variables of one `crowdtrain node` process: an enrollment token of its own, and
        where it keeps its identity (a folder of the benchmark's work dir, not ~/.config)."""
        return {
            "CROWDTRAIN_NODE_TOKEN": self.enrollment_token(uses=1),
            "CROWDTRAIN_NODE_CONFIG_DIR": str(config_dir),
        }

    def register(self, name: str, enrollment_token: str) -> NodeIdentity:
        """Register a hand-made sender as a node, as a node process does at first start."""
        response = httpx.post(
            self.url + API + "/nodes/register",
            json={"enrollment_token": enrollment_token, "name": name},
            timeout=30,
        )
        answer = _checked(response, f"POST /nodes/register ({name})").json()
        return NodeIdentity(answer["node_id"], answer["access_token"], answer["last_seq"])


def _checked(response: httpx.Response, what: str) -> httpx.Response:
    """The response, or a RuntimeError that says what the server refused and why."""
    if response.is_error:
        raise RuntimeError(f"{what}: HTTP {response.status_code} {response.text[:300]}")
    return response


class WorkDir:
    """A temporary folder for data and logs; removed at the end unless `keep`."""

    def __init__(self, keep: Path | None = None):
        self.keep = keep is not None
        self.path = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="crowdtrain-bench-"))
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "logs").mkdir(exist_ok=True)

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def node_config(self) -> Path:
        """Where this run's node processes keep their identities (CROWDTRAIN_NODE_CONFIG_DIR)."""
        return self.path / "node-config"

    def cleanup(self) -> None:
        if self.keep:
            log(f"data and logs kept in {self.path}")
        else:
            shutil.rmtree(self.path, ignore_errors=True)


def stop_all() -> None:
    for child in list(reversed(_LIVE)):
        child.stop(timeout=30)


def rounds_in(rounds: Iterable[dict], start: float, end: float) -> list[dict]:
    """Round records closed in [start, end] (wall-clock `time` of the server, same machine)."""
    return [r for r in rounds if start <= r["time"] <= end]


def _terminate(signum, frame) -> None:  # SIGTERM to the benchmark: unwind, stopping children
    raise SystemExit(128 + signum)


atexit.register(stop_all)
signal.signal(signal.SIGTERM, _terminate)


def run_benchmark(parse_args: Callable, run: Callable, argv: list[str] | None = None) -> int:
    """The shared main(): parse, run, print the JSON; always stop the processes it started."""
    args = parse_args(argv)
    try:
        emit(run(args))
    except (RuntimeError, OSError, httpx.HTTPError) as exc:
        log(f"[bold red]benchmark failed:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        stop_all()
    return 0
