"""How much of a bare PyTorch loop's speed does one crowdtrain node keep?

Starts a real `crowdtrain server` (tiny model) on 127.0.0.1 and measures, each for a fixed
duration after a warm-up:

- bare: forward + backward + AdamW step of the same GPT on BatchSampler batches, in this
  process, with the same batch size, device and torch thread count;
- node: a real `crowdtrain node` process training against the server, with overlap on and (unless
  --skip-no-overlap) off; its rate is read from the server's /api/v1/history (tokens of the
  versions it produced over the time they took).

The bare loop runs before and after the nodes, and the ratio uses the mean of the two, so drift
of a shared machine shows and partly cancels. Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time

import httpx
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from _common import (
    ChildProcess,
    ServerProcess,
    WorkDir,
    console,
    emit,
    log,
    machine,
    process_cpu_seconds,
    ratio,
    rounds_in,
    stop_all,
    timed_window,
)
from crowdtrain.algorithms.optimizers import OptimizerConfig, build_optimizer
from crowdtrain.data.batches import BatchSampler, encode_documents
from crowdtrain.data.corpus import default_corpus
from crowdtrain.model.gpt import GPT, GPTConfig
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.settings import NodeSettings

TARGET_RATIO = 0.85
NODE_DEFAULTS = NodeSettings()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Steady-state tokens/s of one crowdtrain node (tiny model, loopback server) "
        "versus a bare PyTorch training loop of the same model; prints JSON on stdout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="tiny", help="server model preset")
    parser.add_argument(
        "--batch-size", type=int, default=NODE_DEFAULTS.batch_size, help="sequences per step"
    )
    parser.add_argument(
        "--density", type=float, default=NODE_DEFAULTS.density, help="node's top-k density"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the bare loop, the node and the server (OMP_NUM_THREADS)",
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per run")
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="seconds of each run that are not measured"
    )
    parser.add_argument(
        "--skip-no-overlap", action="store_true", help="measure the node with overlap on only"
    )
    parser.add_argument(
        "--keep", type=str, default=None, help="keep server data and logs in this folder"
    )
    return parser.parse_args(argv)


# ---- the bare loop ----------------------------------------------------------------------


def bare_loop(
    config: GPTConfig,
    training: dict,
    tokens,
    batch_size: int,
    warmup_s: float,
    duration_s: float,
    label: str,
) -> dict:
    """Tokens/s of forward + backward + AdamW step on one device, after `warmup_s`."""
    torch.manual_seed(0)
    model = GPT(config)
    model.train()
    optimizer = build_optimizer(
        model.parameters(),
        OptimizerConfig(
            name=training.get("optimizer", "adamw"),
            lr=training.get("lr", 3e-3),
            weight_decay=training.get("weight_decay", 0.1),
            beta1=training.get("beta1", 0.9),
            beta2=training.get("beta2", 0.95),
        ),
    )
    sampler = BatchSampler(tokens, batch_size, config.block_size, seed=0)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        x, y = sampler.next()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        return loss.item()  # the node reads the loss every step too

    columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{label}: warm-up", total=warmup_s + duration_s)
        started = time.perf_counter()
        while time.perf_counter() - started < warmup_s:
            step()
            progress.update(task, completed=time.perf_counter() - started)
        progress.update(task, description=f"{label}: measuring")
        steps, measured_from = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - measured_from) < duration_s:
            step()
            steps += 1
            progress.update(task, completed=warmup_s + elapsed)
        elapsed = time.perf_counter() - measured_from
    rate = steps * batch_size * config.block_size / elapsed
    log(f"{label}: {rate:,.0f} tokens/s ({steps} steps in {elapsed:.1f} s)")
    return {"tokens_per_s": round(rate, 1), "steps": steps, "seconds": round(elapsed, 2)}


# ---- the node ---------------------------------------------------------------------------


def measure_node(
    server: ServerProcess, work: WorkDir, args: argparse.Namespace, overlap: bool
) -> dict:
    """Start a node, skip its warm-up, read its rate from the server's history, stop it."""
    name = "bench-node-overlap" if overlap else "bench-node-no-overlap"
    threads = str(args.threads)
    since = server.get("/health")["version"]
    node = ChildProcess(
        name,
        [
            "node",
            "--server",
            server.url,
            "--name",
            name,
            "--device",
            "cpu",
            "--threads",
            threads,
            "--batch-size",
            str(args.batch_size),
            "--density",
            str(args.density),
            "--overlap" if overlap else "--no-overlap",
        ],
        {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        work.logs,
    )
    try:
        deadline = time.monotonic() + 180
        while not server.rounds(since):
            if not node.alive():
                raise RuntimeError(f"node {name} exited:\n{node.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {name} produced no version in 180 s:\n{node.log_tail()}")
            time.sleep(0.5)
        timed_window(f"{name}: warm-up", args.warmup)
        start, node_cpu, server_cpu = (
            time.time(),
            process_cpu_seconds(node.pid),
            process_cpu_seconds(server.pid),
        )
        timed_window(
            f"{name}: measuring",
            args.duration,
            on_tick=lambda: f"v{server.get('/health')['version']}",
        )
        end = time.time()
        node_cpu_used = _delta(process_cpu_seconds(node.pid), node_cpu)
        server_cpu_used = _delta(process_cpu_seconds(server.pid), server_cpu)
        if not node.alive():
            raise RuntimeError(f"node {name} exited while measured:\n{node.log_tail()}")
    finally:
        node.stop(signal.SIGINT, timeout=30)
    rounds = rounds_in(server.rounds(since), start, end)
    if len(rounds) < 2:
        raise RuntimeError(f"node {name} produced {len(rounds)} versions in {args.duration} s")
    # rate between the first and the last version closed in the window: no edge effects
    span = rounds[-1]["time"] - rounds[0]["time"]
    tokens = sum(r["tokens"] for r in rounds[1:])
    rate = tokens / span
    log(f"{name}: {rate:,.0f} tokens/s ({len(rounds)} versions in {span:.1f} s)")
    seconds = end - start
    return {
        "tokens_per_s": round(rate, 1),
        "versions": len(rounds),
        "versions_per_s": round((len(rounds) - 1) / span, 3),
        "mean_staleness": round(statistics.fmean(r["mean_staleness"] for r in rounds), 3),
        "mean_round_timings_s": {
            key: round(statistics.fmean(r[key] for r in rounds), 5)
            for key in ("aggregate_s", "combine_s", "optimizer_s", "publish_s")
        },
        "node_cpu_cores_used": _per_second(node_cpu_used, seconds),
        "server_cpu_cores_used": _per_second(server_cpu_used, seconds),
    }


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _per_second(value: float | None, seconds: float) -> float | None:
    return None if value is None else round(value / seconds, 3)


# ---- the run ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    work = WorkDir(args.keep)
    threads = str(args.threads)
    server = ServerProcess(
        work.logs,
        work.path / "server-data",
        {
            "model": args.model,
            "evaluate": False,
            "checkpoint_every": 1_000_000,
            "min_nodes": 1,
        },
        {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
    )
    try:
        log(f"starting a {args.model} server ...")
        server.wait_until_up()
        info = server.get("/info")
        config = GPTConfig.from_dict(
            {k: v for k, v in info["model"].items() if k in GPTConfig.__dataclass_fields__}
        )
        tokenizer = Tokenizer.from_json(server.text("/model/tokenizer"))
        tokens = encode_documents(tokenizer, default_corpus().train)
        log(f"server up at {server.url}; {info['model']['parameters']:,} parameters")

        def bare(label: str) -> dict:
            return bare_loop(
                config,
                info["training"],
                tokens,
                args.batch_size,
                args.warmup,
                args.duration,
                label,
            )

        bare_runs = [bare("bare (before)")]
        nodes = {"overlap": measure_node(server, work, args, overlap=True)}
        if not args.skip_no_overlap:
            nodes["no_overlap"] = measure_node(server, work, args, overlap=False)
        bare_runs.append(bare("bare (after)"))
    finally:
        server.stop()
        work.cleanup()

    bare_rate = statistics.fmean(r["tokens_per_s"] for r in bare_runs)
    ratios = {
        f"node_{mode}_vs_bare": ratio(result["tokens_per_s"], bare_rate)
        for mode, result in nodes.items()
    }
    return {
        "benchmark": "node_overhead",
        "machine": machine(),
        "settings": {
            "model": args.model,
            "parameters": info["model"]["parameters"],
            "device": "cpu",
            "threads": args.threads,
            "batch_size": args.batch_size,
            "block_size": config.block_size,
            "tokens_per_step": args.batch_size * config.block_size,
            "density": args.density,
            "value_codec": NODE_DEFAULTS.value_codec,
            "accumulate": NODE_DEFAULTS.accumulate,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
        },
        "bare": {"tokens_per_s": round(bare_rate, 1), "runs": bare_runs},
        "node": nodes,
        "ratio": ratios,
        "target": {
            "node_overlap_vs_bare_min": TARGET_RATIO,
            "met": (ratios["node_overlap_vs_bare"] or 0) >= TARGET_RATIO,
        },
    }


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
