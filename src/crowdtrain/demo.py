"""`crowdtrain demo`: a server and N trainer nodes on loopback, live progress, a final report."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from crowdtrain.model.generate import generate
from crowdtrain.model.gpt import GPT
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.node.client import CoordinatorClient
from crowdtrain.progress import human_bytes, human_count

STARTUP_TIMEOUT_S = 180.0


def demo_server_env(nodes: int) -> dict[str, str]:
    # A round waits for every node (5 s at most): each version then averages all of them, and
    # no update is computed on weights more than one version old, which Adam needs to learn fast.
    return {"CROWDTRAIN_MIN_NODES": str(nodes), "CROWDTRAIN_ROUND_DEADLINE_S": "5"}


@dataclass
class DemoOptions:
    duration_s: float = 120.0
    nodes: int = 2
    model: str = "tiny"
    density: float = 0.25
    port: int = 0
    data_dir: Path | None = None
    prompt: str = "The for statement"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def admin_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Swarm:
    """The child processes of a demo; stops them all, politely first.

    The server accepts the swarm's own admin token (CROWDTRAIN_ADMIN_TOKEN); nodes register
    with an enrollment token the swarm makes with it, and keep their identities in
    `node_config_dir` (next to the logs, not the user's ~/.config)."""

    def __init__(self, log_dir: Path, admin_token: str | None = None):
        self.log_dir = log_dir
        self.admin_token = admin_token or "ct_admin_" + secrets.token_urlsafe(32)
        self.node_config_dir = log_dir.parent / "node-config"
        self.server: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self._enrollment: dict[str, str] = {}
        self.verify: ssl.SSLContext | bool = True  # how its own requests check an https server

    @property
    def admin(self) -> dict[str, str]:
        return admin_headers(self.admin_token)

    def enrollment_token(self, url: str, uses: int | None = None) -> str:
        """An enrollment token of the server at `url` for this swarm's nodes (made once)."""
        if url not in self._enrollment:
            response = httpx.post(
                f"{url}/api/v1/tokens",
                json={"role": "node", "uses": uses, "expires": "1d", "label": "swarm nodes"},
                headers=self.admin,
                timeout=30,
                verify=self.verify,
            )
            response.raise_for_status()
            self._enrollment[url] = response.json()["token"]
        return self._enrollment[url]

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with (self.log_dir / f"{name}.log").open("a") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "crowdtrain", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only the demo, which stops the rest
            )

    def start_server(
        self,
        port: int,
        data_dir: Path,
        model: str,
        env: dict[str, str] | None = None,
        extra: tuple[str, ...] = (),
    ) -> subprocess.Popen:
        args = ["server", "--port", str(port), "--data-dir", str(data_dir), "--model", model]
        env = {"CROWDTRAIN_ADMIN_TOKEN": self.admin_token, **(env or {})}
        self.server = self._spawn("server", [*args, *extra], env)
        return self.server

    def start_node(
        self,
        index: int,
        url: str,
        density: float | None,
        threads: int,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        """A node process; `density` None leaves it to the node's density controller."""
        args = ["node", "--server", url, "--name", f"demo-node-{index}", "--threads", str(threads)]
        args += ["--density", str(density)] if density is not None else []
        env = {
            "CROWDTRAIN_NODE_TOKEN": self.enrollment_token(url),
            "CROWDTRAIN_NODE_CONFIG_DIR": str(self.node_config_dir),
            **(env or {}),
        }
        node = self._spawn(f"node-{index}", [*args, *extra], env)
        self.nodes.append(node)
        return node

    def stop_nodes(self, timeout: float = 30.0) -> None:
        _stop_all(self.nodes, signal.SIGINT, timeout)

    def stop_server(self, timeout: float = 60.0) -> None:
        if self.server is not None:
            _stop_all([self.server], signal.SIGTERM, timeout)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )


def _stop_all(processes: list[subprocess.Popen], sig: int, timeout: float) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + timeout
    for p in processes:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_until_up(
    url: str, server: subprocess.Popen, timeout: float, verify: ssl.SSLContext | bool = True
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"{url}/api/v1/health", timeout=2, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server did not answer within {timeout:.0f} s")


def wait_for_eval(url: str, version: int, timeout: float, headers: dict[str, str]) -> float | None:
    """The validation loss of `version` once the server's Evaluator has scored it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evals = httpx.get(f"{url}/api/v1/history", timeout=10, headers=headers).json()["evals"]
        scored = [e for e in evals if e["version"] >= version]
        if scored:
            return scored[0]["valid_loss"]
        time.sleep(0.5)
    return None


def status_table(info: dict, history: dict, remaining: float) -> Table:
    """One compact row (fits 80 columns): where training stands now."""
    table = Table(box=box.SIMPLE_HEAD, title="crowdtrain demo", title_justify="left")
    columns = ("version", "train", "valid", "epoch", "nodes", "tokens", "tok/s", "sent", "left")
    for column in columns:
        table.add_column(column, justify="right")
    rounds, evals = history["rounds"], history["evals"]
    train = f"{rounds[-1]['train_loss']:.3f}" if rounds else "-"
    valid = f"{evals[-1]['valid_loss']:.3f}" if evals else "-"
    data = info.get("data", {})
    epoch = "-"
    if data.get("epoch") is not None:  # the epoch under way and its completed shards
        epoch = f"{data['epoch']} {data['epoch_completed_shards']}/{data['shards']}"
    rate = "-"
    recent = [r for r in rounds if r["time"] > time.time() - 10]
    if len(recent) >= 2:
        span = recent[-1]["time"] - recent[0]["time"]
        rate = f"{sum(r['tokens'] for r in recent[1:]) / max(span, 1e-6):,.0f}"
    table.add_row(
        str(info["version"]),
        train,
        valid,
        epoch,
        str(info["connected_nodes"]),
        human_count(info["totals"].get("tokens", 0)),
        rate,
        human_bytes(info["totals"].get("wire_bytes", 0)),
        f"{remaining:,.0f} s",
    )
    return table


def sample_generation(url: str, admin_token: str, prompt: str, max_new_tokens: int = 60) -> str:
    """Text from the server's current weights, generated here (off the server's path)."""
    client = CoordinatorClient(url, api_token=admin_token)
    try:
        model = GPT(client.model_config())
        tokenizer = Tokenizer.from_json(client.tokenizer_json())
        _, _, params = client.snapshot(client.manifest())
    finally:
        client.close()
    model.load_state_dict(params, strict=False)
    ids = generate(
        model,
        tokenizer.encode(prompt),
        max_new_tokens,
        temperature=0.8,
        top_k=40,
        eot_id=tokenizer.eot_id,
        generator=torch.Generator().manual_seed(0),
    )
    return prompt + tokenizer.decode(list(ids))


def run_demo(options: DemoOptions, console: Console) -> int:
    keep = options.data_dir is not None
    data_dir = options.data_dir or Path(tempfile.mkdtemp(prefix="crowdtrain-demo-"))
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = options.port or free_port()
    url = f"http://127.0.0.1:{port}"
    swarm = Swarm(log_dir)
    threads = max(1, (os.cpu_count() or 2) // (options.nodes + 1))
    failed = True  # keep the logs unless the demo gets to its report
    try:
        console.print(f"starting a server ({options.model}) on {url} ...")
        swarm.start_server(port, data_dir, options.model, demo_server_env(options.nodes))
        wait_until_up(url, swarm.server, STARTUP_TIMEOUT_S)
        console.print(f"server up at {url}  (web UI: {url}/ui/, API docs: {url}/docs)")
        # a throwaway server on loopback: its admin token lets you sign in to the web UI
        console.print(
            f"sign in to the web UI with the demo's admin token: {swarm.admin_token}",
            soft_wrap=True,
        )
        before = wait_for_eval(url, 0, 120, swarm.admin)
        if before is None:
            raise RuntimeError("the server did not score the untrained model within 120 s")
        console.print(f"validation loss of the untrained model: {before:.3f}")
        for i in range(options.nodes):
            # the nodes share one shard cache, inside the demo's folder (not ~/.cache)
            cache = {"CROWDTRAIN_NODE_CACHE_DIR": str(data_dir / "node-cache")}
            swarm.start_node(i, url, options.density, threads, env=cache)
        console.print(
            f"started {options.nodes} trainer nodes; training for "
            f"{options.duration_s:.0f} s (Ctrl-C stops early) ..."
        )
        end = time.monotonic() + options.duration_s
        with Live(console=console, refresh_per_second=2) as live:
            while (remaining := end - time.monotonic()) > 0:
                if all(p.poll() is not None for p in swarm.nodes):
                    console.print(f"[red]every node exited[/]\n{escape(swarm.log_tail('node-0'))}")
                    return 1
                info = httpx.get(f"{url}/api/v1/info", timeout=30, headers=swarm.admin).json()
                history = httpx.get(
                    f"{url}/api/v1/history", params={"since": -1}, timeout=30, headers=swarm.admin
                ).json()
                live.update(status_table(info, history, remaining))
                time.sleep(min(1.0, max(remaining, 0)))
        code = _finish(options, swarm, url, before, console)
        failed = False
        return code
    except KeyboardInterrupt:
        console.print("interrupted: stopping the nodes and the server ...")
        failed = False
        return 130
    except (RuntimeError, httpx.HTTPError) as exc:
        console.print(f"[bold red]demo failed:[/] {escape(str(exc))}")
        console.print(escape(swarm.log_tail("server")), highlight=False)
        return 1
    finally:
        swarm.stop_nodes()
        swarm.stop_server()
        if keep or failed:
            console.print(f"server data and logs kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


def _finish(
    options: DemoOptions, swarm: Swarm, url: str, before: float | None, console: Console
) -> int:
    console.print("\nstopping the nodes ...")
    swarm.stop_nodes()
    version = httpx.get(f"{url}/api/v1/info", timeout=30, headers=swarm.admin).json()["version"]
    after = wait_for_eval(url, version, 120, swarm.admin)
    console.print(f"\n[bold]trained {version} versions[/]")
    if before is not None and after is not None:
        console.print(
            f"validation loss: {before:.3f} -> {after:.3f} ({before - after:+.3f} better)"
        )
    console.print("\n[bold]sample[/] (temperature 0.8, top-k 40):")
    console.print(
        sample_generation(url, swarm.admin_token, options.prompt), highlight=False, markup=False
    )
    return 0
