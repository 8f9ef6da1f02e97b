"""How much of a bare PyTorch loop's speed does one crowdtrain node keep?

Starts a real `crowdtrain server` (tiny model) on 127.0.0.1 and compares, at the same batch
size, device and torch thread count (the server is held to it too):

- bare: forward + backward + AdamW step of the same GPT on BatchSampler batches, in this process;
- node: a real `crowdtrain node` process training against the server, with overlap on and (unless
  --skip-no-overlap) off; its rate is read from the server's /api/v1/history (tokens of the
  versions it produced over the time they took).

On a shared machine the speed of either drifts by 2x within a minute, so the two are measured
in alternating slices (node, bare, bare, node, ...): while the bare loop runs the node process
is paused (SIGSTOP), and while the node runs the bare loop waits. Each pair of neighbouring
slices gives one ratio; the reported ratio is their median. Prints one JSON document on stdout.

Authentication as in a deployment: the server accepts an admin token made here, which the
benchmark's reads send; each node process registers with an enrollment token of its own and
keeps its identity in the run's work dir (node-config/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from _common import (
    ChildProcess,
    ServerProcess,
    WorkDir,
    log,
    machine,
    process_cpu_seconds,
    ratio,
    rounds_in,
    run_benchmark,
    timed_window,
)
from crowdtrain.algorithms.optimizers import OptimizerConfig, build_optimizer
from crowdtrain.data.batches import BatchSampler, encode_documents
from crowdtrain.data.corpus import default_corpus
from crowdtrain.model.gpt import GPT, GPTConfig
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.node.client import model_config_from_info
from crowdtrain.settings import NodeSettings

TARGET_RATIO = 0.85
NODE_DEFAULTS = NodeSettings()
SETTLE_S = 2.0  # after a resumed node's first steps, before its slice is measured
DENSITY = 0.05  # fixed, so that runs compare: the link-driven controller would vary it


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
        "--density",
        type=float,
        default=DENSITY,
        help="node's fixed top-k density (a node's own default is its density controller)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the bare loop, the node and the server (OMP_NUM_THREADS)",
    )
    parser.add_argument("--slice", type=float, default=10.0, help="seconds of one measured slice")
    parser.add_argument(
        "--pairs",
        type=int,
        default=4,
        help="node/bare slice pairs per node mode (each side measured pairs x slice seconds)",
    )
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="unmeasured seconds before the first slice"
    )
    parser.add_argument(
        "--skip-no-overlap", action="store_true", help="measure the node with overlap on only"
    )
    parser.add_argument(
        "--keep", type=str, default=None, help="keep server data and logs in this folder"
    )
    return parser.parse_args(argv)


class BareLoop:
    """Forward + backward + AdamW step on one device: what a node would do training alone."""

    def __init__(self, config: GPTConfig, training: dict, tokens, batch_size: int):
        torch.manual_seed(0)
        self.model = GPT(config)
        self.model.train()
        self.optimizer = build_optimizer(
            self.model.parameters(),
            OptimizerConfig(
                name=training.get("optimizer", "adamw"),
                lr=training.get("lr", 3e-3),
                weight_decay=training.get("weight_decay", 0.1),
                beta1=training.get("beta1", 0.9),
                beta2=training.get("beta2", 0.95),
            ),
        )
        self.sampler = BatchSampler(tokens, batch_size, config.block_size, seed=0)
        self.tokens_per_step = batch_size * config.block_size

    def step(self) -> float:
        self.model.zero_grad(set_to_none=True)
        x, y = self.sampler.next()
        _, loss = self.model(x, y)
        loss.backward()
        self.optimizer.step()
        return loss.item()  # the node reads the loss every step too

    def run_for(self, seconds: float) -> dict:
        steps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            self.step()
            steps += 1
        elapsed = time.perf_counter() - started
        return {"tokens_per_s": round(steps * self.tokens_per_step / elapsed, 1), "steps": steps}


def start_node(server: ServerProcess, work: WorkDir, args, overlap: bool) -> ChildProcess:
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
        {
            **server.node_env(work.node_config),
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
        },
        work.logs,
    )
    deadline = time.monotonic() + 180
    while not server.rounds(since):
        if not node.alive():
            raise RuntimeError(f"node {name} exited:\n{node.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"node {name} produced no version in 180 s:\n{node.log_tail()}")
        time.sleep(0.5)
    return node


def node_slice(server: ServerProcess, node: ChildProcess, seconds: float) -> dict:
    """Resume the node, let it settle, measure its rate from the server's history, pause it."""
    node.resume()
    time.sleep(SETTLE_S)
    since = server.get("/health")["version"]
    start = time.time()
    node_cpu, server_cpu = process_cpu_seconds(node.pid), process_cpu_seconds(server.pid)
    time.sleep(seconds)
    end = time.time()
    node_cpu_used = _delta(process_cpu_seconds(node.pid), node_cpu)
    server_cpu_used = _delta(process_cpu_seconds(server.pid), server_cpu)
    node.pause()
    if not node.alive():
        raise RuntimeError(f"node {node.name} exited while measured:\n{node.log_tail()}")
    rounds = rounds_in(server.rounds(since), start, end)
    if len(rounds) < 2:
        raise RuntimeError(f"node {node.name} closed {len(rounds)} versions in {seconds} s")
    # between the first and the last version closed in the slice: no edge effects
    span = rounds[-1]["time"] - rounds[0]["time"]
    return {
        "tokens_per_s": round(sum(r["tokens"] for r in rounds[1:]) / span, 1),
        "versions_per_s": round((len(rounds) - 1) / span, 3),
        "mean_staleness": round(statistics.fmean(r["mean_staleness"] for r in rounds), 3),
        "node_cpu_cores_used": _per_second(node_cpu_used, end - start),
        "server_cpu_cores_used": _per_second(server_cpu_used, end - start),
        "round_timings_s": {
            key: statistics.fmean(r[key] for r in rounds)
            for key in ("aggregate_s", "combine_s", "optimizer_s", "publish_s")
        },
    }


def measure_mode(server: ServerProcess, work: WorkDir, bare: BareLoop, args, overlap: bool) -> dict:
    """Alternating node and bare slices (ABBA order), one ratio per neighbouring pair."""
    label = "overlap" if overlap else "no-overlap"
    node = start_node(server, work, args, overlap)
    try:
        timed_window(f"node ({label}): warm-up", args.warmup)
        node.pause()
        pairs = []
        for i in range(args.pairs):
            log(f"node ({label}): pair {i + 1}/{args.pairs}")
            if i % 2 == 0:
                node_result = node_slice(server, node, args.slice)
                bare_result = bare.run_for(args.slice)
            else:
                bare_result = bare.run_for(args.slice)
                node_result = node_slice(server, node, args.slice)
            pairs.append((node_result, bare_result))
            log(
                f"  node {node_result['tokens_per_s']:,.0f} tokens/s, bare "
                f"{bare_result['tokens_per_s']:,.0f} tokens/s, ratio "
                f"{node_result['tokens_per_s'] / bare_result['tokens_per_s']:.3f}"
            )
    finally:
        node.stop(timeout=30)
    node_rates = [n["tokens_per_s"] for n, _ in pairs]
    bare_rates = [b["tokens_per_s"] for _, b in pairs]
    ratios = [n / b for n, b in zip(node_rates, bare_rates, strict=True)]
    return {
        "node_tokens_per_s": round(statistics.fmean(node_rates), 1),
        "bare_tokens_per_s": round(statistics.fmean(bare_rates), 1),
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_of_means": ratio(statistics.fmean(node_rates), statistics.fmean(bare_rates)),
        "pair_ratios": [round(r, 4) for r in ratios],
        "node_versions_per_s": _mean(n["versions_per_s"] for n, _ in pairs),
        "node_mean_staleness": _mean(n["mean_staleness"] for n, _ in pairs),
        "node_cpu_cores_used": _mean(n["node_cpu_cores_used"] for n, _ in pairs),
        "server_cpu_cores_used": _mean(n["server_cpu_cores_used"] for n, _ in pairs),
        "server_round_timings_s": {
            key: round(statistics.fmean(n["round_timings_s"][key] for n, _ in pairs), 5)
            for key in pairs[0][0]["round_timings_s"]
        },
        "slices": [{"node": n, "bare": b} for n, b in pairs],
    }


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _per_second(value: float | None, seconds: float) -> float | None:
    return None if value is None else round(value / seconds, 3)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.fmean(values), 3) if values else None


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    work = WorkDir(args.keep)
    threads = str(args.threads)
    server = ServerProcess(
        work.logs,
        work.path / "server-data",
        {"model": args.model, "evaluate": False, "checkpoint_every": 1_000_000, "min_nodes": 1},
        {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
    )
    modes = {}
    try:
        log(f"starting a {args.model} server ...")
        server.wait_until_up()
        info = server.get("/info")
        config = model_config_from_info(info)
        tokenizer = Tokenizer.from_json(server.text("/model/tokenizer"))
        tokens = encode_documents(tokenizer, default_corpus().train)
        log(f"server up at {server.url}; {info['model']['parameters']:,} parameters")
        bare = BareLoop(config, info["training"], tokens, args.batch_size)
        log(f"bare loop: warm-up {args.warmup:.0f} s")
        bare.run_for(args.warmup)
        modes["overlap"] = measure_mode(server, work, bare, args, overlap=True)
        if not args.skip_no_overlap:
            modes["no_overlap"] = measure_mode(server, work, bare, args, overlap=False)
    finally:
        server.stop()
        work.cleanup()

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
            "slice_s": args.slice,
            "pairs": args.pairs,
            "warmup_s": args.warmup,
        },
        "modes": modes,
        "ratio": {f"node_{mode}_vs_bare": result["ratio_median"] for mode, result in modes.items()},
        "target": {
            "node_overlap_vs_bare_min": TARGET_RATIO,
            "met": modes["overlap"]["ratio_median"] >= TARGET_RATIO,
        },
    }


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
