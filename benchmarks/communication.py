"""How few bytes can nodes and server exchange, and what does it cost in validation loss?

Every row trains the `tiny` preset on the default corpus with the same token budget, from the
same initial weights, on the same batches, and ends with the validation loss of its final
weights on one fixed validation sample. Four trainer nodes are simulated in this process, on the
code paths of real ones; the server side is a real one minus HTTP:

- server: a `ServerRuntime` (temporary data directory, Evaluator off) builds the tokenizer, the
  model, the optimizer, the strategy, the aggregator, the downlink compressor and the
  `Coordinator` exactly as `crowdtrain server` does, with `min_nodes` 4, so each version
  aggregates the four nodes' updates of that round. Updates go in through `decode_update`
  (the bytes a node would POST) and `Coordinator.submit`; what nodes download is
  `Publisher.deltas` (the zstd body of GET /api/v1/model/deltas);
- nodes: four replicas of the GPT, each with its own `BatchSampler` seed (crc32 of its name, as
  a real node), `LocalTrainer` (sync) or `DiLoCoTrainer` (diloco), `TopKCompressor` with error
  feedback, `UpdateMeta` + `encode_update` with delta-coded indices, as
  `Node._compress_and_submit`; each replica applies the published chain with
  `decode_deltas` + `DeltaChain.apply_to`, as `Node.apply_published`. No overlap: every node
  computes on the current version. At the end every replica must equal the server's weights
  bit for bit.

Rows: `reference` (one process, no server: the same model, optimizer, strategy and learning-rate
schedule stepping on the four nodes' batches concatenated, i.e. the same global batch and the
same tokens; dense fp32 sync must land close to it, which checks the whole pipeline), dense fp32
sync (the baseline), sparse sync at several densities and value codecs, DiLoCo, and dense
uplinks with a compressed downlink. Bytes are what travels: the zstd body of each update, and
the zstd body of each published delta chain; the downlink is compared with shipping a zstd fp32
snapshot every version. Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from _common import console, log, machine, ratio, run_benchmark
from crowdtrain.algorithms.optimizers import learning_rate
from crowdtrain.compression.codecs import VALUE_CODECS, get_value_codec
from crowdtrain.compression.topk import TopKCompressor
from crowdtrain.data.batches import BatchSampler, encode_documents
from crowdtrain.data.corpus import default_corpus
from crowdtrain.model.evaluate import validation_loss
from crowdtrain.model.gpt import GPT
from crowdtrain.node.client import DeltaChain
from crowdtrain.node.runner import update_body
from crowdtrain.node.trainer import DiLoCoTrainer, LocalTrainer, StepResult, trainer_for
from crowdtrain.protocol import encoding
from crowdtrain.protocol.snapshot import decode_deltas, decode_snapshot
from crowdtrain.protocol.update import DecodedUpdate, decode_update
from crowdtrain.server.runtime import ServerRuntime
from crowdtrain.settings import ServerSettings

NODES = 4
# local-* rows: the mean of 4 nodes' AdamW steps, each normalised on its own batch of 8, is
# shorter than one step on the batch of 32 (their noise cancels); measured on this benchmark,
# 2 (= sqrt(4)) matches dense sync, 1 trails it by 3.8% and 3 diverges
LOCAL_OUTER_LR = 2.0
MODEL = "tiny"
BASELINE = "sync-dense-fp32"
REFERENCE = "reference"
DEFAULT_ROWS = (
    REFERENCE,
    BASELINE,
    "sync-0.1-fp16",
    "sync-0.1-int8",
    "sync-0.01-int8",
    "sync-0.01-int4",
    "sync-0.01-sign",
    "diloco-h10-dense-fp32",
    "diloco-h10-0.1-int8",
    "diloco-h10-0.01-int8",
    "diloco-h50-dense-fp32",
    "diloco-h50-0.1-int8",
    "local-dense-fp32",
    "local-0.1-int8",
    "local-0.01-int8",
    "sync-dense-fp32-down-0.05-int8",
    "sync-dense-fp32-down-0.02-int8",
)
QUICK_ROWS = (
    REFERENCE,
    BASELINE,
    "sync-0.01-int8",
    "diloco-h10-0.1-int8",
    "sync-dense-fp32-down-0.05-int8",
)
DEFAULT_BATCH = 8
DEFAULT_STEPS = 200  # optimizer steps of the global batch (4 nodes x batch sequences)
QUICK_STEPS = 20
EVAL_BATCHES, EVAL_BATCH_SIZE, QUICK_EVAL_BATCHES = 32, 16, 8
SNAPSHOT_EVERY = 10  # versions between two measurements of the fp32 snapshot's size
WAIT_S = 600.0  # the longest a version may take to close before the run is called stuck

TARGETS = {
    "sparse_sync": {"uplink_ratio_min": 100.0, "loss_gap_pct_max": 2.0},
    "diloco_compressed": {"uplink_ratio_min": 500.0, "loss_gap_pct_max": 2.0},
    "downlink": {"downlink_ratio_min": 20.0, "loss_gap_pct_max": 2.0},
}

ROW_GRAMMAR = """\
row names: `reference`, or
  sync-<UPLINK>[-down-<DOWNLINK>]        nodes send gradients every step
  diloco-h<H>-<UPLINK>[-down-<DOWNLINK>] nodes send the change of H local AdamW steps
  local-<UPLINK>[-down-<DOWNLINK>]       nodes step AdamW locally and send that step; the
                                         server applies 2x their mean (diloco, H=1, outer
                                         lr 2, no momentum)
where UPLINK / DOWNLINK is `dense-<codec>` or `<density>-<codec>` (codec: fp32, fp16, bf16,
int8, int4, sign; density: the fraction of entries sent, by top-k with error feedback) and
the downlink defaults to the server's default (dense fp32). Examples: sync-0.01-int8,
diloco-h50-0.1-int8, sync-dense-fp32-down-0.05-int8."""


@dataclass(frozen=True)
class Row:
    name: str
    algorithm: str  # "reference", "sync" or "diloco"
    density: float = 1.0
    codec: str = "fp32"
    inner_steps: int = 1
    downlink_density: float = 1.0
    downlink_codec: str = "fp32"
    outer_lr: float | None = None  # diloco: None keeps the server default
    outer_momentum: float | None = None

    @property
    def compressed_uplink(self) -> bool:
        return self.density < 1.0 or self.codec != "fp32"

    @property
    def compressed_downlink(self) -> bool:
        return self.downlink_density < 1.0 or self.downlink_codec != "fp32"


_LINK = r"(dense|[0-9.]+(?:e-?[0-9]+)?)-([a-z0-9]+)"
_ROW = re.compile(rf"^(sync|local|diloco-h([0-9]+))-{_LINK}(?:-down-{_LINK})?$")


def parse_row(name: str) -> Row:
    """A Row from its name (see ROW_GRAMMAR); ValueError naming the problem otherwise."""
    if name == REFERENCE:
        return Row(name, "reference")
    match = _ROW.match(name)
    if not match:
        raise ValueError(f"cannot read row name {name!r}\n{ROW_GRAMMAR}")
    kind, h, up_density, up_codec, down_density, down_codec = match.groups()

    def density(text: str | None) -> float:
        value = 1.0 if text in (None, "dense") else float(text)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"row {name!r}: a density must lie in (0, 1], got {value}")
        return value

    for codec in (up_codec, down_codec or "fp32"):
        if codec not in VALUE_CODECS:
            raise ValueError(f"row {name!r}: unknown codec {codec!r}; one of {list(VALUE_CODECS)}")
    inner_steps = int(h) if h else 1
    if kind != "sync" and inner_steps < 1:
        raise ValueError(f"row {name!r}: H must be at least 1")
    # local: node-local AdamW, one step per update; the server averages the steps, scaled
    outer = {"outer_lr": LOCAL_OUTER_LR, "outer_momentum": 0.0} if kind == "local" else {}
    return Row(
        name,
        "sync" if kind == "sync" else "diloco",
        density(up_density),
        up_codec,
        inner_steps,
        density(down_density),
        down_codec or "fp32",
        **outer,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Bytes exchanged between 4 simulated trainer nodes and a real in-process "
        "Coordinator (tiny model, default corpus, a fixed token budget), and what each way of "
        "cutting them costs in final validation loss: dense fp32 sync (the baseline), sparse "
        "sync, DiLoCo, compressed downlinks, and a one-process reference without a server. "
        "Progress on stderr, one JSON document on stdout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=ROW_GRAMMAR
        + f"\n\ndefault rows: {', '.join(DEFAULT_ROWS)}\n--quick rows: {', '.join(QUICK_ROWS)}",
    )
    parser.add_argument(
        "--rows",
        default=None,
        help="comma-separated row names to run (default: the list below; the baseline "
        f"{BASELINE} is always added, since every ratio and gap is taken against it)",
    )
    parser.add_argument(
        "--budget-tokens",
        type=int,
        default=None,
        help="training tokens of every row, summed over the 4 nodes (default: "
        f"{DEFAULT_STEPS} steps of the global batch, {QUICK_STEPS} with --quick); must be a "
        "whole number of global batches (4 x batch size x 128), and of H global batches for "
        "each DiLoCo row",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"sequences per node per step (default {DEFAULT_BATCH}); the reference steps on "
        "4 x this",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a ~1-minute smoke run: {QUICK_STEPS} steps, rows {', '.join(QUICK_ROWS)} "
        "(unless --rows / --budget-tokens say otherwise), a smaller validation sample",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU threads (default 2): the nodes are computed this many at a time, each torch "
        "op on one thread (on a busy 2-core machine, 2 torch threads per op ran 6x slower "
        "than 1)",
    )
    args = parser.parse_args(argv)
    names = args.rows.split(",") if args.rows else list(QUICK_ROWS if args.quick else DEFAULT_ROWS)
    names = [n.strip() for n in names if n.strip()]
    if BASELINE not in names:
        names.insert(1 if REFERENCE in names else 0, BASELINE)
    try:
        args.row_specs = [parse_row(n) for n in dict.fromkeys(names)]
    except ValueError as exc:
        parser.error(str(exc))
    if args.batch_size < 1 or args.threads < 1:
        parser.error("--batch-size and --threads must be at least 1")
    return args


# ---- the parts every row shares --------------------------------------------------------


@dataclass
class Shared:
    """Built once: tokens, the validation sample's tokens, the initial weights' fingerprint."""

    train_tokens: np.ndarray
    valid_tokens: np.ndarray
    tokenizer_json: str
    init_fingerprint: str
    parameters: int
    block_size: int
    steps: int
    batch_size: int
    eval_batches: int


def server_settings(row: Row, data_dir: str) -> ServerSettings:
    """The server of a row: defaults, except a quorum of the 4 nodes and no side work."""
    extra = {}
    if row.algorithm == "diloco":
        extra = {"algorithm": "diloco", "inner_steps": row.inner_steps}
        if row.outer_lr is not None:
            extra |= {"outer_lr": row.outer_lr, "outer_momentum": row.outer_momentum}
    return ServerSettings(
        data_dir=data_dir,
        model=MODEL,
        evaluate=False,
        checkpoint_every=1_000_000,  # only the one written at start
        min_nodes=NODES,  # a version = the 4 nodes' updates of one round, never fewer
        round_deadline_s=WAIT_S,
        max_staleness=0,  # no overlap: every update is computed on the current version
        downlink_density=row.downlink_density,
        downlink_value_codec=row.downlink_codec,
        **extra,
    )


def fingerprint(params: dict[str, torch.Tensor]) -> str:
    crc = 0
    for name in sorted(params):
        crc = zlib.crc32(params[name].detach().contiguous().numpy().tobytes(), crc)
    return f"{crc:08x}"


def node_names() -> list[str]:
    return [f"bench-node-{i}" for i in range(NODES)]


def node_seed(name: str) -> int:
    return zlib.crc32(name.encode())  # what a real node uses without --seed


def samplers(shared: Shared) -> list[BatchSampler]:
    return [
        BatchSampler(shared.train_tokens, shared.batch_size, shared.block_size, node_seed(n))
        for n in node_names()
    ]


def evaluate(model: GPT, shared: Shared) -> float:
    return validation_loss(
        model,
        shared.valid_tokens,
        batch_size=EVAL_BATCH_SIZE,
        block_size=shared.block_size,
        num_batches=shared.eval_batches,
        seed=0,
    )


class RowProgress:
    """One bar per row on stderr, advanced in optimizer steps."""

    def __init__(self, rows: list[Row], steps: int):
        self.progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        self.tasks = {
            row.name: self.progress.add_task(row.name, total=steps, status="", start=False)
            for row in rows
        }

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start(self, row: Row) -> None:
        self.progress.start_task(self.tasks[row.name])

    def advance(self, row: Row, steps: int, status: str) -> None:
        self.progress.update(self.tasks[row.name], advance=steps, status=status)

    def finish(self, row: Row, status: str) -> None:
        task = self.tasks[row.name]
        self.progress.update(task, status=status)
        self.progress.stop_task(task)
        if not console.is_terminal:  # a log file gets no live bars: one line per row instead
            log(f"{row.name}: {status}")


# ---- rows ------------------------------------------------------------------------------


def build_runtime(row: Row, data_dir: str, shared: Shared | None) -> ServerRuntime:
    runtime = ServerRuntime(server_settings(row, data_dir))
    if shared is not None:  # every row must start from the same point
        _, params = runtime.coordinator.snapshot()
        if fingerprint(params) != shared.init_fingerprint:
            raise RuntimeError(f"row {row.name}: the initial weights differ from the other rows'")
        if runtime.tokenizer.to_json() != shared.tokenizer_json:
            raise RuntimeError(f"row {row.name}: the tokenizer differs from the other rows'")
    return runtime


def run_reference(row: Row, shared: Shared, bars: RowProgress) -> dict:
    """One model, no server: the server's own model, optimizer, strategy and lr schedule,
    stepping on the 4 nodes' batches concatenated (the same global batch, the same tokens)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crowdtrain-comm-") as data_dir:
        runtime = build_runtime(row, data_dir, shared)
        coordinator = runtime.coordinator  # never started: only its parts are used
        model, params = runtime.model, coordinator.params
        policy, strategy = coordinator.policy, coordinator.strategy
        optimizer = coordinator.optimizer
        sources = samplers(shared)
        bars.start(row)
        loss = 0.0
        for version in range(shared.steps):
            pairs = [s.next() for s in sources]
            x = torch.cat([p[0] for p in pairs])
            y = torch.cat([p[1] for p in pairs])
            model.train()
            model.zero_grad(set_to_none=True)
            _, batch_loss = model(x, y)
            batch_loss.backward()
            loss = batch_loss.item()
            gradients = {name: p.grad for name, p in params.items()}
            lr = learning_rate(
                version, policy.base_lr, policy.warmup_versions, policy.decay_versions
            )
            strategy.step(params, optimizer, gradients, lr)
            bars.advance(row, 1, f"train loss {loss:.3f}")
        valid = evaluate(model, shared)
    wall = time.perf_counter() - started
    bars.finish(row, f"valid loss {valid:.4f}  {wall:.0f} s")
    return {
        "name": row.name,
        "algorithm": "reference",
        "valid_loss": round(valid, 6),
        "final_train_loss": round(loss, 4),
        "final_weights_crc32": fingerprint(params),
        "_weights": {name: p.detach().clone() for name, p in params.items()},
        "optimizer_steps": shared.steps,
        "global_batch": NODES * shared.batch_size,
        "wall_s": round(wall, 1),
    }


@dataclass
class SimNode:
    """One simulated trainer node: a replica, its trainer and its compressor."""

    name: str
    model: GPT
    params: dict[str, torch.nn.Parameter]
    trainer: LocalTrainer | DiLoCoTrainer
    compressor: TopKCompressor

    def update(self, base_version: int, lineage: str, kind: str) -> tuple[bytes, StepResult]:
        """Compute, compress and encode one update, as Node._loop + _compress_and_submit."""
        step = self.trainer.compute_update()
        deltas = self.compressor.compress(step.gradients)
        codec = self.compressor.codec.name
        update_id = f"{self.name}-{base_version}"
        return update_body(step, deltas, codec, kind, base_version, lineage, None, update_id), step


def make_nodes(row: Row, runtime: ServerRuntime, shared: Shared) -> tuple[list[SimNode], int]:
    """Four nodes holding the server's current weights, downloaded as a zstd fp32 snapshot
    (GET /model/snapshot); returns them and the snapshot's size."""
    snapshot = runtime.publisher.snapshot("fp32", "zstd")
    raw = encoding.decompress(snapshot.body, "zstd", snapshot.raw_bytes)
    weights, _ = decode_snapshot(raw, runtime.manifest)
    training = runtime.info()["training"]  # what a node reads from GET /info
    nodes = []
    for name, sampler in zip(node_names(), samplers(shared), strict=True):
        model = GPT(runtime.config)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
        trainer = trainer_for(training, model, sampler, torch.device("cpu"))
        compressor = TopKCompressor(row.density, get_value_codec(row.codec), seed=node_seed(name))
        nodes.append(SimNode(name, model, params, trainer, compressor))
    return nodes, len(snapshot.body)


def send(
    node: SimNode, version: int, lineage: str, kind: str, runtime: ServerRuntime
) -> tuple[bytes, StepResult, DecodedUpdate]:
    """A node computes and encodes its update; the server decodes and checks it (as its routes
    do, in a worker thread, before `Coordinator.submit`)."""
    body, step = node.update(version, lineage, kind)
    return body, step, decode_update(body, "zstd", runtime.manifest, runtime.limits)


def run_row(row: Row, shared: Shared, bars: RowProgress, pool: ThreadPoolExecutor) -> dict:
    """Train one row through a real Coordinator; count every byte that would travel."""
    started = time.perf_counter()
    rounds = shared.steps // row.inner_steps
    with tempfile.TemporaryDirectory(prefix="crowdtrain-comm-") as data_dir:
        runtime = build_runtime(row, data_dir, shared)
        coordinator = runtime.coordinator
        records: list[dict] = []
        coordinator.add_listener(lambda result: records.append(result.record))
        kind = coordinator.strategy.update_kind
        nodes, initial_snapshot_bytes = make_nodes(row, runtime, shared)
        max_raw = 4 * coordinator.snapshot_nbytes + (1 << 20)
        uplink: list[int] = []  # bytes of each update, every node, every round
        downlink: list[int] = []  # bytes of each version's delta chain (one node's download)
        snapshot_sizes: list[int] = []
        coordinator.start()
        bars.start(row)
        try:
            for _ in range(rounds):
                version, lineage = coordinator.version, coordinator.lineage
                # the nodes compute in parallel (each on its own replica); they are submitted
                # in a fixed order, so the aggregation (float sums) is the same in every run
                futures = [pool.submit(send, n, version, lineage, kind, runtime) for n in nodes]
                results = [f.result() for f in futures]
                for node, (body, _, decoded) in zip(nodes, results, strict=True):
                    coordinator.submit(node.name, decoded)
                    uplink.append(len(body))
                if coordinator.wait_for_version(version, WAIT_S) <= version:
                    raise RuntimeError(
                        f"row {row.name}: version {version + 1} did not close in {WAIT_S:.0f} s"
                        + (f" ({coordinator.failure})" if coordinator.failure else "")
                    )
                published = runtime.publisher.deltas(version, lineage, "zstd")
                if published is None or published.version != version + 1:
                    raise RuntimeError(f"row {row.name}: no delta chain for version {version + 1}")
                downlink.append(len(published.body))
                raw = encoding.decompress(published.body, "zstd", max_raw)
                chain, _, _ = decode_deltas(raw, runtime.manifest)
                # Node.apply_published, on every replica (in parallel: they are independent)
                list(pool.map(DeltaChain(chain).apply_to, [n.params for n in nodes]))
                if version % SNAPSHOT_EVERY == 0 or version + 1 == rounds:
                    snapshot_sizes.append(len(runtime.publisher.snapshot("fp32", "zstd").body))
                mean_loss = statistics.fmean(step.loss for _, step, _ in results)
                bars.advance(
                    row,
                    row.inner_steps,
                    f"train loss {mean_loss:.3f}  up {statistics.fmean(uplink[-NODES:]) / 1e3:,.1f}"
                    f" kB  down {downlink[-1] / 1e3:,.1f} kB",
                )
        finally:
            coordinator.stop(drain=False)
        _, server_weights = coordinator.snapshot()
        identical = all(
            torch.equal(node.params[name].detach(), server_weights[name])
            for node in nodes
            for name in server_weights
        )
        if not identical:
            log(f"[bold red]row {row.name}: a node's replica differs from the server's weights[/]")
        valid = evaluate(nodes[0].model, shared)
        final_crc = fingerprint(server_weights)
    wall = time.perf_counter() - started
    steps = rounds * row.inner_steps
    tokens = sum(r["tokens"] for r in records)
    uplink_total = sum(uplink)
    per_node_step = uplink_total / (NODES * steps)
    down_per_version = statistics.fmean(downlink)
    snapshot_per_version = statistics.fmean(snapshot_sizes)
    last = records[-max(1, len(records) // 10) :]
    bars.finish(row, f"valid loss {valid:.4f}  {wall:.0f} s")
    return {
        "name": row.name,
        "algorithm": row.algorithm,
        "uplink": {"density": row.density, "value_codec": row.codec},
        "inner_steps": row.inner_steps if row.algorithm == "diloco" else None,
        "local_optimizer": row.outer_lr is not None,  # a local-* row: node-local AdamW
        "downlink": {"density": row.downlink_density, "value_codec": row.downlink_codec},
        "versions": len(records),
        "optimizer_steps": steps,
        "tokens": tokens,
        "uplink_bytes_per_node_per_step": round(per_node_step, 1),
        "uplink_bytes_per_token": round(uplink_total / tokens, 4),
        "uplink_bytes_total": uplink_total,
        "uplink_bytes_per_update": round(statistics.fmean(uplink), 1),
        "downlink_bytes_per_node_per_version": round(down_per_version, 1),
        "downlink_bytes_per_node_per_step": round(sum(downlink) / steps, 1),
        "downlink_bytes_per_node_total": sum(downlink),
        "snapshot_fp32_zstd_bytes": round(snapshot_per_version, 1),
        "initial_snapshot_bytes": initial_snapshot_bytes,
        "valid_loss": round(valid, 6),
        "final_weights_crc32": final_crc,
        "_weights": server_weights if row.name == BASELINE else None,
        "final_train_loss": round(statistics.fmean(r["train_loss"] for r in last), 4),
        "replicas_bit_identical": identical,
        "wall_s": round(wall, 1),
    }


# ---- comparisons and targets -----------------------------------------------------------


def add_comparisons(rows: list[dict]) -> dict:
    """Ratios and gaps against the dense fp32 baseline, in place; returns the baseline row."""
    baseline = next(r for r in rows if r["name"] == BASELINE)
    for r in rows:
        if r["algorithm"] == "reference":
            continue
        r["uplink_ratio_vs_baseline"] = ratio(
            baseline["uplink_bytes_per_node_per_step"], r["uplink_bytes_per_node_per_step"]
        )
        r["downlink_ratio_vs_snapshot_every_version"] = ratio(
            r["snapshot_fp32_zstd_bytes"], r["downlink_bytes_per_node_per_version"]
        )
        r["downlink_ratio_vs_baseline"] = ratio(
            baseline["downlink_bytes_per_node_per_step"], r["downlink_bytes_per_node_per_step"]
        )
        r["loss_gap_pct_vs_baseline"] = gap_pct(r["valid_loss"], baseline["valid_loss"])
    return baseline


def compare_to_reference(reference: dict, baseline: dict, weights: dict) -> dict:
    """How close dense fp32 sync through the server lands to the one-process reference: the
    loss gap, and how far apart their final weights are (rounding differs: the server averages
    four batch-8 gradients, the reference takes one batch-32 gradient)."""
    ref, dense = weights[reference["name"]], weights[baseline["name"]]
    diff = max(float((ref[n] - dense[n]).abs().max()) for n in ref)
    scale = max(float(ref[n].abs().max()) for n in ref)
    return {
        "reference_valid_loss": reference["valid_loss"],
        "dense_sync_valid_loss": baseline["valid_loss"],
        "gap_pct": gap_pct(baseline["valid_loss"], reference["valid_loss"]),
        "weights_bit_identical": all(torch.equal(ref[n], dense[n]) for n in ref),
        "max_abs_weight_diff": diff,
        "max_abs_weight": round(scale, 4),
    }


def gap_pct(loss: float, baseline: float) -> float:
    return round(100.0 * (loss - baseline) / baseline, 3)


def check_target(candidates: list[dict], ratio_key: str, ratio_min: float, gap_max: float) -> dict:
    """Met when one row reaches both the byte ratio and the loss gap; names the rows that come
    closest either way when none does."""

    def brief(r: dict | None) -> dict | None:
        if r is None:
            return None
        return {
            "row": r["name"],
            ratio_key: r[ratio_key],
            "loss_gap_pct": r["loss_gap_pct_vs_baseline"],
        }

    meeting = [
        r
        for r in candidates
        if r[ratio_key] >= ratio_min and r["loss_gap_pct_vs_baseline"] <= gap_max
    ]
    within_loss = [r for r in candidates if r["loss_gap_pct_vs_baseline"] <= gap_max]
    within_bytes = [r for r in candidates if r[ratio_key] >= ratio_min]
    return {
        f"{ratio_key}_min": ratio_min,
        "loss_gap_pct_max": gap_max,
        "met": bool(meeting),
        "rows_meeting": [r["name"] for r in meeting],
        "best_meeting": brief(max(meeting, key=lambda r: r[ratio_key], default=None)),
        # the fewest bytes among rows within the loss gap, the smallest gap among rows within
        # the byte ratio: how far the closest settings are from the target
        "fewest_bytes_within_loss_gap": brief(
            max(within_loss, key=lambda r: r[ratio_key], default=None)
        ),
        "smallest_gap_within_byte_ratio": brief(
            min(within_bytes, key=lambda r: r["loss_gap_pct_vs_baseline"], default=None)
        ),
        "candidates": [r["name"] for r in candidates],
    }


def targets(rows: list[dict]) -> dict:
    measured = [r for r in rows if r["algorithm"] != "reference"]
    # local-* rows train synchronously (one step per update) with the optimizer on the nodes:
    # they count as sparse sync, not as DiLoCo
    sparse_sync = [
        r
        for r in measured
        if (r["algorithm"] == "sync" or r.get("local_optimizer"))
        and r["uplink"]["density"] < 1.0
        and not _down(r)
    ]
    diloco = [
        r
        for r in measured
        if r["algorithm"] == "diloco"
        and not r.get("local_optimizer")
        and (r["uplink"]["density"] < 1.0 or r["uplink"]["value_codec"] != "fp32")
        and not _down(r)
    ]
    downlink = [r for r in measured if _down(r)]
    out = {}
    for key, candidates, ratio_key in (
        ("sparse_sync", sparse_sync, "uplink_ratio_vs_baseline"),
        ("diloco_compressed", diloco, "uplink_ratio_vs_baseline"),
        ("downlink", downlink, "downlink_ratio_vs_snapshot_every_version"),
    ):
        target = TARGETS[key]
        ratio_min = target.get("uplink_ratio_min", target.get("downlink_ratio_min"))
        if candidates:
            out[key] = check_target(candidates, ratio_key, ratio_min, target["loss_gap_pct_max"])
        else:
            out[key] = {**target, "met": None, "note": "no row of this kind was run"}
    return out


def _down(r: dict) -> bool:
    return r["downlink"]["density"] < 1.0 or r["downlink"]["value_codec"] != "fp32"


# ---- main ------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> Shared:
    """The tokenizer and initial weights (from a first ServerRuntime), tokens, the budget."""
    with tempfile.TemporaryDirectory(prefix="crowdtrain-comm-") as data_dir:
        runtime = ServerRuntime(server_settings(Row(BASELINE, "sync"), data_dir))
        _, params = runtime.coordinator.snapshot()
        corpus = default_corpus()
        block = runtime.config.block_size
        global_tokens = NODES * args.batch_size * block
        if args.budget_tokens is None:
            steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
        else:
            steps = args.budget_tokens // global_tokens
            if steps < 1 or steps * global_tokens != args.budget_tokens:
                raise RuntimeError(
                    f"--budget-tokens {args.budget_tokens} is not a whole number of global "
                    f"batches of {global_tokens} tokens (4 nodes x {args.batch_size} x {block}); "
                    f"try {max(1, steps) * global_tokens}"
                )
        for row in args.row_specs:
            if steps % row.inner_steps:
                raise RuntimeError(
                    f"row {row.name}: {steps} steps are not a whole number of rounds of "
                    f"H = {row.inner_steps}; pick a budget of a multiple of "
                    f"{row.inner_steps * global_tokens} tokens"
                )
        return Shared(
            train_tokens=encode_documents(runtime.tokenizer, corpus.train),
            valid_tokens=encode_documents(runtime.tokenizer, corpus.valid),
            tokenizer_json=runtime.tokenizer.to_json(),
            init_fingerprint=fingerprint(params),
            parameters=runtime.manifest.numel,
            block_size=block,
            steps=steps,
            batch_size=args.batch_size,
            eval_batches=QUICK_EVAL_BATCHES if args.quick else EVAL_BATCHES,
        )


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)  # one thread per op; args.threads nodes at a time
    torch.manual_seed(0)
    started = time.perf_counter()
    shared = prepare(args)
    rows_run = args.row_specs
    budget = shared.steps * NODES * shared.batch_size * shared.block_size
    log(
        f"{len(rows_run)} rows x {shared.steps} steps of {NODES} x {shared.batch_size} x "
        f"{shared.block_size} tokens = {budget:,} tokens each; {shared.parameters:,} "
        f"parameters; {args.threads} threads"
    )
    results: list[dict] = []
    with (
        ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="node") as pool,
        RowProgress(rows_run, shared.steps) as bars,
    ):
        for row in rows_run:
            if row.algorithm == "reference":
                results.append(run_reference(row, shared, bars))
            else:
                results.append(run_row(row, shared, bars, pool))
    weights = {r["name"]: r.pop("_weights") for r in results}
    baseline = add_comparisons(results)
    reference = next((r for r in results if r["algorithm"] == "reference"), None)
    defaults = ServerSettings()
    return {
        "benchmark": "communication",
        "machine": machine(),
        "settings": {
            "model": MODEL,
            "parameters": shared.parameters,
            "corpus": "pydoc-topics (default_corpus)",
            "train_tokens_in_corpus": int(len(shared.train_tokens)),
            "nodes": NODES,
            "batch_size_per_node": shared.batch_size,
            "block_size": shared.block_size,
            "global_batch": NODES * shared.batch_size,
            "tokens_per_step": NODES * shared.batch_size * shared.block_size,
            "optimizer_steps": shared.steps,
            "budget_tokens": budget,
            "threads": args.threads,
            "quick": args.quick,
            "server": {
                "optimizer": defaults.optimizer,
                "lr": defaults.lr,
                "warmup_versions": defaults.warmup_versions,
                "decay_versions": defaults.decay_versions,
                "grad_clip": defaults.grad_clip,
                "weight_decay": defaults.weight_decay,
                "betas": [defaults.beta1, defaults.beta2],
                "min_nodes": NODES,
                "max_staleness": 0,
            },
            "diloco": {
                "inner_lr": defaults.inner_lr,
                "outer_lr": defaults.outer_lr,
                "outer_momentum": defaults.outer_momentum,
            },
            "node": {"index_codec": "delta", "content_encoding": "zstd", "overlap": False},
            "validation": {
                "tokens_in_split": int(len(shared.valid_tokens)),
                "batches": shared.eval_batches,
                "batch_size": EVAL_BATCH_SIZE,
                "seed": 0,
            },
            "snapshot_measured_every_versions": SNAPSHOT_EVERY,
            "initial_weights_crc32": shared.init_fingerprint,
        },
        "baseline": BASELINE,
        "rows": results,
        "dense_vs_reference": None
        if reference is None
        else compare_to_reference(reference, baseline, weights),
        "checks": {
            "all_replicas_bit_identical": all(
                r["replicas_bit_identical"] for r in results if "replicas_bit_identical" in r
            ),
            "same_initial_weights_every_row": True,  # build_runtime refuses a row otherwise
        },
        "targets": targets(results),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
