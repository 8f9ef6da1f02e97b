"""How many 1%-dense gpt2-124m updates per second does a real server take in and apply?

For each concurrency (default 1, 4, 16) a fresh `crowdtrain server` (gpt2-124m, min_nodes = the
number of senders, so a round closes when every sender has contributed) runs on 127.0.0.1, and
that many sender threads POST precomputed valid updates to /api/v1/updates in a loop for a fixed
duration; a 503 is retried after the server's Retry-After, as a node does. Measured per
concurrency: submissions accepted per second, updates applied per second (from
/api/v1/history), payload MB/s, submit latency, 503 answers, the round's time split, and after a
drain that every accepted update was applied.

Baselines in the same JSON: the C++ prototype's published figures on a 2-core machine, and this
run's bare in-process cost of decode_update + WeightedMean.add for one payload in one thread.
Prints one JSON document on stdout.

Authentication as a node's: before timing, each sender registers (POST /nodes/register with an
enrollment token made with the server's admin token) and then sends its access JWT; every
update carries `seq`, one higher than the sender's last. Encoding stays out of the measurement
without a body per submission held in memory (6 MB each): a body is two zstd frames, which
decode to one safetensors container (a zstd stream may hold several frames, RFC 8878; the
server reads across them). The tensor data, all but a few KB, is compressed once per payload
before timing; the header (tensor entries and metadata, with this submission's seq and
update_id) is compressed per submission and joined to it: ~1.6 ms a body for gpt2-124m, mostly
the copy of 6 MB (`body_assembly_ms` in the JSON). The server decompresses it to the same
tensor data as a one-frame body, as fast (1 KB more on the wire, 0.02%).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import torch

from _common import (
    API,
    NodeIdentity,
    ServerProcess,
    WorkDir,
    log,
    machine,
    percentile,
    process_cpu_seconds,
    ratio,
    rounds_in,
    run_benchmark,
    timed_window,
)
from crowdtrain.algorithms.aggregators import WeightedMean
from crowdtrain.compression.sparse import SparseDelta
from crowdtrain.protocol import encoding
from crowdtrain.protocol.manifest import Manifest
from crowdtrain.protocol.update import (
    UPDATE_FORMAT,
    IntakeLimits,
    UpdateMeta,
    decode_update,
    encode_update,
)

# The original C++ prototype on this kind of 2-core machine, by number of concurrent senders.
PROTOTYPE_APPLIED_PER_S = {1: 0.2, 4: 0.36, 16: 0.6}
PROTOTYPE_P99_LATENCY_S = {1: 0.18, 4: 7.0, 16: 36.0}
TARGET_P99_LATENCY_S = 1.0  # at the highest concurrency
TARGET_SPEEDUP_AT_16 = 10.0
SAMPLES_PER_UPDATE = 16
TOKENS_PER_SAMPLE = 1024
SATURATION_WAIT_S = 90.0
TIMING_KEYS = ("aggregate_s", "combine_s", "optimizer_s", "publish_s", "round_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Updates/s and MB/s a real crowdtrain server (gpt2-124m) decodes, validates "
        "and aggregates from 1, 4 and 16 concurrent senders; prints JSON on stdout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="gpt2-124m", help="server model preset")
    parser.add_argument(
        "--concurrency",
        default="1,4,16",
        help="comma-separated numbers of concurrent senders, one server run each",
    )
    parser.add_argument("--density", type=float, default=0.01, help="fraction of entries sent")
    parser.add_argument("--payloads", type=int, default=4, help="distinct precomputed updates")
    parser.add_argument("--duration", type=float, default=40.0, help="measured seconds per run")
    parser.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds of sending after the first round closed, before measuring",
    )
    parser.add_argument(
        "--round-deadline", type=float, default=5.0, help="server's round_deadline_s"
    )
    parser.add_argument(
        "--max-pending",
        type=int,
        default=64,
        help="server's max_pending_updates (its default; each node may hold at most "
        "max_pending_per_node = 2 of those places)",
    )
    parser.add_argument(
        "--server-threads",
        type=int,
        default=None,
        help="torch threads of the server (OMP_NUM_THREADS); None: the server's own choice, "
        "one per core",
    )
    parser.add_argument(
        "--bare-seconds", type=float, default=10.0, help="seconds of the in-process baseline"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random payloads")
    parser.add_argument(
        "--keep", type=str, default=None, help="keep server data and logs in this folder"
    )
    return parser.parse_args(argv)


# ---- payloads ---------------------------------------------------------------------------


def random_update(manifest: Manifest, density: float, seed: int) -> dict[str, SparseDelta]:
    """Sorted unique random int32 indices (~density of each parameter) with fp16 values."""
    rng = np.random.default_rng(seed)
    deltas = {}
    for spec in manifest.params:
        k = max(1, round(spec.numel * density))
        indices = np.sort(rng.choice(spec.numel, size=k, replace=False)).astype(np.int32)
        values = (rng.standard_normal(k, dtype=np.float32) * 1e-3).astype(np.float16)
        deltas[spec.name] = SparseDelta(torch.from_numpy(indices), torch.from_numpy(values))
    return deltas


class SequencedPayload:
    """One precomputed update whose zstd wire body can carry any seq without being encoded
    again: a frame with the container's header, made per submission, then a frame with its
    tensor data, made here once."""

    def __init__(self, update: dict[str, SparseDelta], meta: UpdateMeta):
        self.meta = meta
        raw = encode_update(update, meta, "identity")  # the safetensors container itself
        (header_len,) = struct.unpack("<Q", raw[:8])
        self.tensors = json.loads(raw[8 : 8 + header_len])  # offsets into the data section
        self.tensors.pop("__metadata__", None)
        self.data_frame = encoding.compress(raw[8 + header_len :], "zstd")

    def body(self, seq: int, update_id: str = "") -> bytes:
        meta = self.meta.model_copy(update={"seq": seq, "update_id": update_id})
        header = json.dumps({"__metadata__": meta.to_wire(), **self.tensors}).encode()
        header += b" " * (-len(header) % 8)  # safetensors pads its header to 8 bytes
        header_frame = encoding.compress(struct.pack("<Q", len(header)) + header, "zstd")
        return header_frame + self.data_frame


def sequenced_payloads(
    updates: list[dict[str, SparseDelta]], lineage: str, manifest: Manifest
) -> list[SequencedPayload]:
    """Payloads for a server of this lineage, all computed on version 0; the first one's body
    is checked to decode to what it holds, with its seq."""
    meta = UpdateMeta(
        format=UPDATE_FORMAT,
        value_codec="fp16",
        kind="gradient",
        base_version=0,
        lineage=lineage,
        samples=SAMPLES_PER_UPDATE,
        tokens=SAMPLES_PER_UPDATE * TOKENS_PER_SAMPLE,
        loss=5.0,
    )
    payloads = [SequencedPayload(update, meta) for update in updates]
    decoded = decode_update(
        payloads[0].body(seq=7), "zstd", manifest, IntakeLimits.for_manifest(manifest)
    )
    if decoded.meta.seq != 7 or any(
        not torch.equal(decoded.deltas[name].values.float(), delta.values.float())
        for name, delta in updates[0].items()
    ):
        raise RuntimeError("a two-frame body did not decode to the update it was made from")
    return payloads


def body_assembly_ms(payload: SequencedPayload, repeats: int = 20) -> float:
    """What a sender spends making one body (header frame + join), in milliseconds."""
    started = time.perf_counter()
    for seq in range(1, repeats + 1):
        payload.body(seq, update_id=f"assembly-{seq}")
    return round(1000 * (time.perf_counter() - started) / repeats, 3)


def raw_nbytes(update: dict[str, SparseDelta]) -> int:
    return sum(
        d.values.numel() * d.values.element_size()
        + (0 if d.indices is None else d.indices.numel() * d.indices.element_size())
        for d in update.values()
    )


# ---- the in-process baseline ------------------------------------------------------------


def bare_ingest(manifest: Manifest, bodies: list[bytes], seconds: float) -> dict:
    """decode_update + WeightedMean.add of one payload after another, one thread, no HTTP."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        limits = IntakeLimits.for_manifest(manifest)
        aggregator = WeightedMean({p.name: p.shape for p in manifest.params})

        def ingest(body: bytes) -> tuple[float, float]:
            started = time.perf_counter()
            update = decode_update(body, "zstd", manifest, limits)
            decoded = time.perf_counter()
            aggregator.add(update.deltas, weight=float(update.meta.samples))
            return decoded - started, time.perf_counter() - decoded

        ingest(bodies[0])  # first touch of the aggregation buffers
        decode, aggregate = [], []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds or len(decode) < 3:
            d, a = ingest(bodies[len(decode) % len(bodies)])
            decode.append(d)
            aggregate.append(a)
    finally:
        torch.set_num_threads(threads)
    per_update = statistics.fmean(d + a for d, a in zip(decode, aggregate, strict=True))
    result = {
        "updates_per_s": round(1 / per_update, 3),
        "decode_ms": round(1000 * statistics.fmean(decode), 2),
        "aggregate_ms": round(1000 * statistics.fmean(aggregate), 2),
        "iterations": len(decode),
        "threads": 1,
    }
    log(
        f"bare decode + aggregate: {result['updates_per_s']:.2f} updates/s "
        f"(decode {result['decode_ms']} ms + add {result['aggregate_ms']} ms)"
    )
    return result


# ---- senders ----------------------------------------------------------------------------


@dataclass
class SenderRecord:
    """What one sender saw; times are time.time() so they compare with the server's records."""

    posts: list[tuple[float, float, int]] = field(default_factory=list)  # start, end, status
    # first try, start of the accepted POST, its end, body bytes
    accepted: list[tuple[float, float, float, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def sender(
    index: int,
    identity: NodeIdentity,
    url: str,
    payloads: list[SequencedPayload],
    stop: threading.Event,
    record: SenderRecord,
) -> None:
    """POST updates as the node `identity` until `stop`, each with the next seq; a 503 is
    retried (same body, same seq) after Retry-After, as a node does."""
    headers = {
        **identity.headers,
        "Content-Encoding": "zstd",
        "Content-Type": "application/octet-stream",
    }
    seq = identity.last_seq
    with httpx.Client(base_url=url, timeout=httpx.Timeout(600, connect=10)) as client:
        while not stop.is_set():
            seq += 1
            payload = payloads[(index + seq) % len(payloads)]
            body = payload.body(seq, update_id=f"{identity.node_id}-{seq}")
            first_try = time.time()
            while not stop.is_set():
                began = time.time()
                try:
                    response = client.post(API + "/updates", content=body, headers=headers)
                except httpx.TransportError as exc:
                    record.errors.append(f"transport: {exc!r}")
                    stop.wait(1.0)
                    continue
                ended = time.time()
                record.posts.append((began, ended, response.status_code))
                if response.status_code == 202:
                    record.accepted.append((first_try, began, ended, len(body)))
                    break
                if response.status_code == 503:
                    stop.wait(float(response.headers.get("retry-after", "1")))
                    continue
                record.errors.append(f"HTTP {response.status_code}: {response.text[:300]}")
                stop.wait(1.0)
                break


# ---- one concurrency --------------------------------------------------------------------


def run_concurrency(
    senders: int,
    args: argparse.Namespace,
    work: WorkDir,
    updates: list[dict[str, SparseDelta]] | None,
) -> tuple[dict, dict]:
    """One fresh server, `senders` threads for warm-up + duration, drain, figures.

    Returns (figures, extras); extras carries the manifest and payloads for the baseline."""
    settings: dict[str, object] = {
        "model": args.model,
        "evaluate": False,
        "checkpoint_every": 1_000_000,
        "max_staleness": 1_000_000_000,  # every payload is computed on version 0
        "min_nodes": senders,
        "round_deadline_s": args.round_deadline,
        "max_pending_updates": args.max_pending,
        # what is measured is ingest, not the guards against abusive nodes
        "max_submissions_per_min": 1_000_000,
        "max_registrations_per_min": max(10, senders),
        "access_token_ttl_s": 86_400,  # no renewal within a run
    }
    threads = {}
    if args.server_threads:
        threads = {k: str(args.server_threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    data_dir = work.path / f"server-{senders}"
    server = ServerProcess(work.logs, data_dir, settings, threads, name=f"server-{senders}")
    extras: dict = {}
    try:
        log(f"[{senders} senders] starting a {args.model} server (tokenizer + model) ...")
        server.wait_until_up()
        info = server.get("/info")
        manifest = Manifest.from_json(server.get("/model/manifest")["tensors"])
        if updates is None:
            log(f"generating {args.payloads} random updates at density {args.density} ...")
            updates = [
                random_update(manifest, args.density, args.seed + i) for i in range(args.payloads)
            ]
        payloads = sequenced_payloads(updates, info["lineage"], manifest)
        extras = {
            "manifest": manifest,
            "updates": updates,
            "bodies": [payload.body(seq=1) for payload in payloads],
            "body_assembly_ms": body_assembly_ms(payloads[0]),
            "parameters": info["model"]["parameters"],
        }
        figures = {
            "max_pending_updates": settings["max_pending_updates"],
            "server_threads": args.server_threads or "default",
            **_send_and_measure(server, senders, payloads, extras["bodies"], updates, args),
        }
    finally:
        server.stop(timeout=120)
        shutil.rmtree(data_dir, ignore_errors=True)
    return figures, extras


def _send_and_measure(
    server: ServerProcess,
    senders: int,
    payloads: list[SequencedPayload],
    bodies: list[bytes],
    updates: list[dict[str, SparseDelta]],
    args: argparse.Namespace,
) -> dict:
    """`bodies`: one body of each payload, for the sizes of what was sent."""
    enrollment = server.enrollment_token(uses=senders)
    identities = [server.register(f"bench-sender-{i:02d}", enrollment) for i in range(senders)]
    since = server.get("/health")["version"]
    stop = threading.Event()
    records = [SenderRecord() for _ in range(senders)]
    threads = [
        threading.Thread(
            target=sender,
            args=(i, identities[i], server.url, payloads, stop, records[i]),
            name=f"sender-{i}",
            daemon=True,
        )
        for i in range(senders)
    ]
    for thread in threads:
        thread.start()
    try:
        _wait_for_steady_state(server, since, records)
        timed_window(f"[{senders} senders] warm-up", args.warmup)
        start = time.time()
        server_cpu, own_cpu = process_cpu_seconds(server.pid), time.process_time()

        def status() -> str:
            accepted = sum(len(r.accepted) for r in records)
            return f"{accepted} accepted, v{server.get('/health')['version']}"

        timed_window(f"[{senders} senders] measuring", args.duration, on_tick=status)
        end, server_cpu_end, own_cpu_end = (
            time.time(),
            process_cpu_seconds(server.pid),
            time.process_time(),
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=600)
    drained, applied_total = _drain(server, since, sum(len(r.accepted) for r in records), args)
    return _figures(
        senders,
        records,
        server.rounds(since),
        (start, end),
        updates,
        bodies,
        drained=drained,
        applied_total=applied_total,
        server_cpu=(server_cpu, server_cpu_end),
        own_cpu=own_cpu_end - own_cpu,
    )


def _wait_for_steady_state(server: ServerProcess, since: int, records: list[SenderRecord]):
    """Until a round has closed (the optimizer state exists) and the queue has filled once
    (a 503 was answered), or SATURATION_WAIT_S passed without the server falling behind."""
    started = time.monotonic()
    while not server.rounds(since):
        if time.monotonic() - started > 300 or not server.alive():
            raise RuntimeError(f"no round closed within 300 s:\n{server.log_tail()}")
        time.sleep(0.5)
    while time.monotonic() - started < SATURATION_WAIT_S:
        if any(p[2] == 503 for r in records for p in r.posts):
            return
        time.sleep(0.5)


def _drain(
    server: ServerProcess, since: int, accepted: int, args: argparse.Namespace
) -> tuple[bool, int]:
    """Wait until every accepted update has been applied; (drained, applied count).

    Gives up when no round has closed for a while (the deadline closes a partial round)."""
    patience = args.round_deadline + 60
    applied, last_progress = -1, time.monotonic()
    while time.monotonic() - last_progress < patience:
        now_applied = sum(r["updates"] for r in server.rounds(since))
        if now_applied >= accepted and server.get("/info")["pending_updates"] == 0:
            return True, now_applied
        if now_applied != applied:
            applied, last_progress = now_applied, time.monotonic()
        time.sleep(1.0)
    return False, applied


def _figures(
    senders: int,
    records: list[SenderRecord],
    rounds: list[dict],
    window: tuple[float, float],
    updates: list[dict[str, SparseDelta]],
    bodies: list[bytes],
    *,
    drained: bool,
    applied_total: int,
    server_cpu: tuple[float | None, float | None],
    own_cpu: float,
) -> dict:
    start, end = window
    seconds = end - start
    posts = [p for r in records for p in r.posts if start <= p[1] <= end]
    accepted = [a for r in records for a in r.accepted if start <= a[2] <= end]
    accepted_total = sum(len(r.accepted) for r in records)
    raw_per_wire = statistics.fmean(raw_nbytes(u) for u in updates) / statistics.fmean(
        len(b) for b in bodies
    )
    wire_bytes = sum(a[3] for a in accepted)
    window_rounds = rounds_in(rounds, start, end)
    if len(window_rounds) >= 2:  # between the first and last round closed in the window
        span = window_rounds[-1]["time"] - window_rounds[0]["time"]
        applied_per_s = sum(r["updates"] for r in window_rounds[1:]) / span
    else:
        applied_per_s = sum(r["updates"] for r in window_rounds) / seconds
    post_latencies = [p[1] - p[0] for p in posts]
    cpu_start, cpu_end = server_cpu
    errors = [e for r in records for e in r.errors]
    result = {
        "senders": senders,
        "accepted_per_s": round(len(accepted) / seconds, 3),
        "applied_per_s": round(applied_per_s, 3),
        "closed_loop_cycle_s": round(senders / applied_per_s, 3) if applied_per_s else None,
        "payload_wire_mb_per_s": round(wire_bytes / seconds / 1e6, 2),
        "payload_raw_mb_per_s": round(wire_bytes * raw_per_wire / seconds / 1e6, 2),
        # the POST that was accepted: upload, decode, checks, queueing
        "submit_latency_s": _quantiles([a[2] - a[1] for a in accepted]),
        # from the first try to acceptance, including 503 answers and Retry-After waits
        "time_to_accept_s": _quantiles([a[2] - a[0] for a in accepted]),
        # every answer, 202 or 503
        "post_latency_s": _quantiles(post_latencies),
        "responses_503": sum(1 for p in posts if p[2] == 503),
        "posts": len(posts),
        "rounds": len(window_rounds),
        "updates_per_round": _mean(r["updates"] for r in window_rounds),
        "mean_round_timings_s": {key: _mean(r[key] for r in window_rounds) for key in TIMING_KEYS},
        "accepted_total": accepted_total,
        "applied_total": applied_total,
        "accepted_minus_applied": accepted_total - applied_total,
        "drained": drained,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "server_cpu_cores_used": (
            None
            if cpu_start is None or cpu_end is None
            else round((cpu_end - cpu_start) / seconds, 3)
        ),
        "sender_cpu_cores_used": round(own_cpu / seconds, 3),
        "window_s": round(seconds, 2),
    }
    log(
        f"[{senders} senders] accepted {result['accepted_per_s']}/s, applied "
        f"{result['applied_per_s']}/s, p99 submit {result['submit_latency_s']['p99']} s, "
        f"503s {result['responses_503']}, accepted-applied {result['accepted_minus_applied']}"
    )
    return result


def _quantiles(values: list[float]) -> dict:
    return {
        "p50": _round(percentile(values, 50)),
        "p99": _round(percentile(values, 99)),
        "max": _round(max(values) if values else None),
        "n": len(values),
    }


def _mean(values) -> float | None:
    values = list(values)
    return round(statistics.fmean(values), 4) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# ---- the run ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    work = WorkDir(args.keep)
    results: dict[str, dict] = {}
    bare_runs: list[dict] = []
    updates = None
    extras: dict = {}
    try:
        for i, senders in enumerate(concurrencies):
            figures, extras = run_concurrency(senders, args, work, updates)
            updates = extras["updates"]
            results[str(senders)] = figures
            # after the first and the last run, with no server: the machine's drift shows
            if i == 0 or i == len(concurrencies) - 1:
                bare_runs.append(
                    bare_ingest(extras["manifest"], extras["bodies"], args.bare_seconds)
                )
    finally:
        work.cleanup()
    bare = {
        "updates_per_s": round(statistics.fmean(r["updates_per_s"] for r in bare_runs), 3),
        "runs": bare_runs,
    }

    for senders, figures in results.items():
        prototype_rate = PROTOTYPE_APPLIED_PER_S.get(int(senders))
        prototype_p99 = PROTOTYPE_P99_LATENCY_S.get(int(senders))
        figures["ratios"] = {
            "applied_vs_prototype": ratio(figures["applied_per_s"], prototype_rate),
            "p99_latency_vs_prototype": ratio(figures["submit_latency_s"]["p99"], prototype_p99),
            "applied_vs_bare": ratio(figures["applied_per_s"], bare["updates_per_s"]),
        }
    top = str(max(concurrencies))
    applied_better = [
        (f["ratios"]["applied_vs_prototype"] or 0) > 1
        for s, f in results.items()
        if int(s) in PROTOTYPE_APPLIED_PER_S
    ]
    body_sizes = [len(b) for b in extras["bodies"]]
    return {
        "benchmark": "server_ingest",
        "machine": machine(),
        "settings": {
            "model": args.model,
            "parameters": extras["parameters"],
            "density": args.density,
            "entries_per_update": sum(d.nnz for d in updates[0].values()),
            "value_codec": "fp16",
            "index_dtype": "int32",
            "content_encoding": "zstd",
            "distinct_payloads": args.payloads,
            "payload_raw_mb": round(statistics.fmean(raw_nbytes(u) for u in updates) / 1e6, 3),
            "payload_wire_mb": round(statistics.fmean(body_sizes) / 1e6, 3),
            "body_assembly_ms": extras["body_assembly_ms"],
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "round_deadline_s": args.round_deadline,
            "max_pending_updates": args.max_pending,
            "server_threads": args.server_threads or "default (one per core)",
            "min_nodes": "= senders",
            "sender_retry_on_503": "after Retry-After",
            "authentication": "node access JWT per sender (registered before timing), "
            "seq + 1 per update; body = zstd header frame per submission + data frame "
            "compressed once",
        },
        "bare_in_process": bare,
        "prototype": {
            "applied_per_s": {str(k): v for k, v in PROTOTYPE_APPLIED_PER_S.items()},
            "p99_submit_latency_s": {str(k): v for k, v in PROTOTYPE_P99_LATENCY_S.items()},
        },
        "by_senders": results,
        "ratio_notes": {
            "applied_vs_prototype": "crowdtrain / prototype applied updates/s (higher is better)",
            "p99_latency_vs_prototype": "crowdtrain / prototype p99 submit latency (lower is "
            "better)",
            "applied_vs_bare": "server applied updates/s / bare decode+add updates/s in one thread",
            "closed_loop_cycle_s": "senders / applied updates/s: by Little's law the mean time "
            "a sender that always has an update waits per update, whatever the server's latency",
        },
        "targets": {
            "applied_above_prototype_everywhere": all(applied_better) if applied_better else None,
            f"applied_vs_prototype_at_{top}": results[top]["ratios"]["applied_vs_prototype"],
            f"speedup_{TARGET_SPEEDUP_AT_16:g}x_at_16": (
                (results["16"]["ratios"]["applied_vs_prototype"] or 0) >= TARGET_SPEEDUP_AT_16
                if "16" in results
                else None
            ),
            f"p99_submit_below_{TARGET_P99_LATENCY_S:g}s_at_{top}": (
                (results[top]["submit_latency_s"]["p99"] or float("inf")) < TARGET_P99_LATENCY_S
            ),
            f"p99_time_to_accept_below_{TARGET_P99_LATENCY_S:g}s_at_{top}": (
                (results[top]["time_to_accept_s"]["p99"] or float("inf")) < TARGET_P99_LATENCY_S
            ),
        },
    }


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
