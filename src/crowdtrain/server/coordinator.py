"""The Coordinator: the only writer of the model and optimizer state; rounds and versions.

Submissions are decoded and checked by the routes (in worker threads), then queued here. One
apply thread takes them off the queue, streams each into the round's Aggregator, and closes the
round on quorum (distinct nodes) or on its deadline. Closing a round runs the Strategy's
optimizer step, then publishes that step (whole, or compressed by the downlink with its own
error feedback) and makes the weights `before + published` with the same function every node
uses (SparseDelta.add_to), so replicas stay bit-identical.
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from crowdtrain.algorithms.aggregators import Aggregator
from crowdtrain.algorithms.optimizers import learning_rate
from crowdtrain.algorithms.strategies import Strategy
from crowdtrain.compression.codecs import get_value_codec
from crowdtrain.compression.sparse import SparseDelta
from crowdtrain.compression.topk import TopKCompressor
from crowdtrain.protocol.errors import WireError
from crowdtrain.protocol.update import DecodedUpdate

log = logging.getLogger(__name__)

RECENT_UPDATE_IDS = 4096  # remembered for answering resent submissions


@dataclass(frozen=True)
class RoundPolicy:
    """The round rules; the server builds it from ServerSettings (same meanings, same defaults)."""

    min_nodes: int = 1
    deadline_s: float = 10.0
    max_staleness: int = 4
    max_pending: int = 64
    max_pending_per_node: int = 2
    base_lr: float = 1e-3
    warmup_versions: int = 20
    decay_versions: int | None = None
    delta_window: int = 8
    delta_window_bytes: int = 512 << 20
    max_density: float = 1.0  # the densest update a node may send


@dataclass
class Submission:
    node_id: str
    update: DecodedUpdate
    accepted_at: float = field(default_factory=time.monotonic)


@dataclass
class _OpenRound:
    started_at: float | None = None  # monotonic time of the round's first update
    node_ids: set[str] = field(default_factory=set)
    update_ids: list[str] = field(default_factory=list)
    updates: int = 0
    samples: int = 0
    tokens: int = 0
    loss_weighted: float = 0.0
    wire_bytes: int = 0
    staleness_sum: int = 0
    aggregate_s: float = 0.0


@dataclass(frozen=True)
class RoundResult:
    """What closing a round produced; handed to listeners (metrics, evaluator, checkpoints)."""

    version: int
    record: dict
    update_ids: list[str] = field(default_factory=list)  # of the updates applied in it


class Coordinator:
    """Owns `params` and `optimizer`. Thread-safe entry points: submit, snapshot, deltas_since,
    wait_for_version. Everything that changes state runs on the apply thread."""

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        strategy: Strategy,
        aggregator: Aggregator,
        policy: RoundPolicy,
        version: int = 0,
        totals: dict | None = None,
        downlink: TopKCompressor | None = None,
    ):
        self.params = params
        self._max_entries = self.max_entries(policy.max_density)
        # None publishes every step dense in fp32; a compressor publishes its top-k, and what it
        # holds back stays in its residual until it is published (nothing is dropped)
        self.downlink = downlink
        self.downlink_codec = downlink.codec if downlink is not None else get_value_codec("fp32")
        self.optimizer = optimizer
        self.strategy = strategy
        self.aggregator = aggregator
        self.policy = policy
        self.version = version
        # A new lineage at every start: versions past the resumed checkpoint may differ from
        # the ones a node saw before a crash, so a node from another lineage must resync.
        self.lineage = secrets.token_hex(8)
        self.totals = {"updates": 0, "samples": 0, "tokens": 0, "wire_bytes": 0}
        self.totals.update(totals or {})

        self._state_lock = threading.Lock()  # params + window: readers never see half a step
        self._version_cond = threading.Condition()
        self._queue: queue.Queue[Submission] = queue.Queue()  # bounded by reserve()
        self._reserved: Counter[str] = Counter()
        self._reserved_total = 0
        self._round = _OpenRound()
        self._window: deque[tuple[int, dict[str, SparseDelta]]] = deque()
        self._before = {name: p.detach().clone() for name, p in params.items()}
        self._listeners: list[Callable[[RoundResult], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._submit_lock = threading.Lock()
        self._receipts: OrderedDict[str, dict] = OrderedDict()
        self.failure: str | None = None  # set if the apply thread died: submissions get 503

    # ---- entry points for routes (any thread) -------------------------------------------

    def reserve(self, node_id: str) -> None:
        """Hold a place in the queue before the body is even read, so a busy server answers 503
        without decoding anything. Each node may hold `max_pending_per_node` places, so a fast
        node cannot crowd out the others."""
        with self._submit_lock:
            if self.failure is not None:
                raise WireError(
                    503,
                    "coordinator_failed",
                    "the server cannot apply updates "
                    f"({self.failure}); its operator must restart it",
                    retry_after_s=30.0,
                    current_version=self.version,
                )
            if self._reserved_total >= self.queue_capacity:
                raise WireError(
                    503,
                    "busy",
                    "the server is aggregating a backlog; retry shortly",
                    retry_after_s=1.0,
                    current_version=self.version,
                )
            if self._reserved[node_id] >= self.policy.max_pending_per_node:
                raise WireError(
                    503,
                    "busy",
                    f"this node already has "
                    f"{self.policy.max_pending_per_node} updates waiting to be "
                    "aggregated; retry shortly",
                    retry_after_s=1.0,
                    current_version=self.version,
                )
            self._reserved_total += 1
            self._reserved[node_id] += 1

    def release(self, node_id: str) -> None:
        with self._submit_lock:
            self._reserved_total -= 1
            self._reserved[node_id] -= 1
            if not self._reserved[node_id]:
                del self._reserved[node_id]

    @property
    def queue_capacity(self) -> int:
        # More queued than (staleness + 1) rounds would apply updates staler than allowed.
        by_staleness = self.policy.min_nodes * (self.policy.max_staleness + 1)
        return max(1, min(self.policy.max_pending, by_staleness))

    def seen(self, update_id: str) -> bool:
        """Whether an update with this id was accepted recently (a resend gets its receipt)."""
        with self._submit_lock:
            return bool(update_id) and update_id in self._receipts

    def submit(self, node_id: str, update: DecodedUpdate, reserved: bool = False) -> dict:
        """Accept a checked update into the next round, or raise WireError (409 / 422 / 503).

        With `reserved` the caller already holds a place from `reserve`; it is given back here
        when the update is refused or a duplicate. A resent update (same `update_id`, for
        example after a timed-out POST) gets the first receipt and is not aggregated twice."""
        meta = update.meta
        if not reserved:
            with self._submit_lock:
                if meta.update_id in self._receipts:
                    return {**self._receipts[meta.update_id], "duplicate": True}
            self.reserve(node_id)
        try:
            with self._submit_lock:
                if meta.update_id and meta.update_id in self._receipts:
                    receipt = {**self._receipts[meta.update_id], "duplicate": True}
                else:
                    receipt = self._admit(node_id, update)
                    if meta.update_id:
                        self._receipts[meta.update_id] = receipt
                        while len(self._receipts) > RECENT_UPDATE_IDS:
                            self._receipts.popitem(last=False)
        except BaseException:
            self.release(node_id)
            raise
        if receipt["duplicate"]:
            self.release(node_id)
        return receipt

    def _admit(self, node_id: str, update: DecodedUpdate) -> dict:
        meta = update.meta
        current = self.version
        if meta.kind != self.strategy.update_kind:
            raise WireError(
                422,
                "wrong_kind",
                f"this run ({self.strategy.name}) takes updates "
                f"of kind {self.strategy.update_kind!r}, not {meta.kind!r}",
            )
        if meta.lineage != self.lineage or meta.base_version > current:
            raise WireError(
                409,
                "resync",
                "the update was computed on weights this server "
                "does not have (it restarted or you are ahead); download a snapshot",
                current_version=current,
                lineage=self.lineage,
            )
        if current - meta.base_version > self.policy.max_staleness:
            raise WireError(
                409,
                "stale",
                f"base version {meta.base_version} is older than the "
                f"{self.policy.max_staleness} versions accepted; pull the latest "
                "weights and recompute",
                current_version=current,
                lineage=self.lineage,
            )
        self._check_budget(update)
        self._queue.put_nowait(Submission(node_id, update))
        return {
            "accepted": True,
            "duplicate": False,
            "current_version": current,
            "lineage": self.lineage,
            "queued": self._queue.qsize(),
            "max_density": self.density_advice(),
        }

    def max_entries(self, density: float) -> int:
        """The most entries an update of `density` carries: top-k keeps ceil(density x n),
        at least 1, of each parameter."""
        return sum(max(1, math.ceil(density * p.numel())) for p in self.params.values())

    def _check_budget(self, update: DecodedUpdate) -> None:
        cap = self.policy.max_density
        if cap < 1.0 and update.nnz > self._max_entries:
            raise WireError(
                422,
                "over_budget",
                f"the update carries {update.nnz} entries; this server takes at most "
                f"{self._max_entries} (density {cap}); send a sparser update",
                max_density=cap,
            )

    def density_advice(self) -> float:
        """The density cap nodes are told: the policy's, halved while the queue is over half
        full, so a server that falls behind gets smaller updates (and aggregates them faster)."""
        busy = self._queue.qsize() * 2 > self.queue_capacity
        return self.policy.max_density / 2 if busy else self.policy.max_density

    def round_deadline(self) -> float | None:
        """When (time.monotonic) the open round closes at the latest; None while it has no
        update yet (its deadline starts with the first one)."""
        started = self._round.started_at  # one read: the apply thread swaps rounds whole
        return None if started is None else started + self.policy.deadline_s

    def snapshot(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, copy of the weights), consistent: never between two halves of a step."""
        with self._state_lock:
            return self.version, {n: p.detach().clone() for n, p in self.params.items()}

    def deltas_since(
        self, version: int, lineage: str
    ) -> list[tuple[int, dict[str, SparseDelta]]] | None:
        """Published deltas after `version`, or None when the node must take a snapshot."""
        with self._state_lock:
            if lineage != self.lineage or version > self.version:
                return None
            if version == self.version:
                return []
            chain = [(v, d) for v, d in self._window if v > version]
            if not chain or chain[0][0] != version + 1:
                return None
            return chain

    def wait_for_version(self, after: int, timeout: float) -> int:
        with self._version_cond:
            self._version_cond.wait_for(lambda: self.version > after, timeout=timeout)
            return self.version

    def add_listener(self, listener: Callable[[RoundResult], None]) -> None:
        self._listeners.append(listener)

    @property
    def snapshot_nbytes(self) -> int:
        """Size of the fp32 weights: the most any download needs to be."""
        return sum(p.numel() * 4 for p in self.params.values())

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    # ---- the apply thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="coordinator", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True) -> None:
        """Stop the apply thread. With `drain`, updates already accepted are applied first."""
        self._drain_on_stop = drain
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._step_once(timeout=0.2)
            if getattr(self, "_drain_on_stop", True):
                while self._step_once(timeout=0.0, force_close=True):
                    pass
        except Exception as exc:  # a bug, not bad input: stop loudly instead of limping on
            log.exception("the coordinator's apply thread failed; no more updates are applied")
            self.failure = f"{type(exc).__name__}: {exc}"

    def _step_once(self, timeout: float, force_close: bool = False) -> bool:
        """Take one submission (if any), close the round if due. False when nothing was left."""
        wait = timeout
        if self._round.started_at is not None:
            remaining = self._round.started_at + self.policy.deadline_s - time.monotonic()
            wait = max(0.0, min(timeout, remaining))
        try:
            submission = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            submission = None
        if submission is not None:
            try:
                self._aggregate(submission)
            finally:
                self.release(submission.node_id)
        if self._round_due() or (force_close and submission is None and self._round.updates):
            self._close_round()
            return True
        return submission is not None

    def _aggregate(self, submission: Submission) -> None:
        meta = submission.update.meta
        started = time.perf_counter()
        self.aggregator.add(submission.update.deltas, weight=float(meta.samples))
        r = self._round
        r.aggregate_s += time.perf_counter() - started
        if r.started_at is None:
            r.started_at = time.monotonic()
        r.node_ids.add(submission.node_id)
        if meta.update_id:
            r.update_ids.append(meta.update_id)
        r.updates += 1
        r.samples += meta.samples
        r.tokens += meta.tokens
        r.loss_weighted += meta.loss * meta.samples
        r.wire_bytes += submission.update.wire_bytes
        r.staleness_sum += self.version - meta.base_version

    def _round_due(self) -> bool:
        r = self._round
        if r.updates == 0:
            return False
        if len(r.node_ids) >= self.policy.min_nodes:
            return True
        return time.monotonic() - r.started_at >= self.policy.deadline_s

    def _close_round(self) -> None:
        r, self._round = self._round, _OpenRound()
        timings: dict[str, float] = {"aggregate_s": r.aggregate_s}
        t0 = time.perf_counter()
        combined = self.aggregator.result()
        lr = learning_rate(
            self.version,
            self.policy.base_lr,
            self.policy.warmup_versions,
            self.policy.decay_versions,
        )
        t1 = time.perf_counter()
        with self._state_lock:
            for name, p in self.params.items():
                self._before[name].copy_(p.detach())
            try:
                self.strategy.step(self.params, self.optimizer, combined, lr)
            except Exception:
                for name, p in self.params.items():  # readers keep seeing the last version
                    p.data.copy_(self._before[name])
                raise
            t2 = time.perf_counter()
            deltas = self._publish()
            version = self.version + 1
            self._window.append((version, deltas))
            self._trim_window()
            for key, value in (
                ("updates", r.updates),
                ("samples", r.samples),
                ("tokens", r.tokens),
                ("wire_bytes", r.wire_bytes),
            ):
                self.totals[key] += value  # before the version shows, so readers agree
            with self._version_cond:
                self.version = version
                self._version_cond.notify_all()
        t3 = time.perf_counter()
        timings.update(combine_s=t1 - t0, optimizer_s=t2 - t1, publish_s=t3 - t2)
        record = {
            "version": version,
            "time": time.time(),
            "train_loss": r.loss_weighted / r.samples,
            "lr": lr,
            "updates": r.updates,
            "nodes": len(r.node_ids),
            "samples": r.samples,
            "tokens": r.tokens,
            "wire_bytes": r.wire_bytes,
            "mean_staleness": r.staleness_sum / r.updates,
            "round_s": time.monotonic() - r.started_at,
            **{k: round(v, 6) for k, v in timings.items()},
        }
        result = RoundResult(version, record, r.update_ids)
        for listener in self._listeners:
            try:
                listener(result)
            except Exception:  # a failing listener must not stop training
                log.exception("round listener failed at version %d", version)

    def _publish(self) -> dict[str, SparseDelta]:
        """Publish the step the optimizer asked for, compressed by the downlink (with its own
        error feedback), and make the weights exactly `before + published`: the same
        `SparseDelta.add_to` every node performs, so their replicas stay bit-identical."""
        asked = {name: p.detach() - self._before[name] for name, p in self.params.items()}
        if self.downlink is None:  # dense fp32: the step itself, exactly
            published = {name: SparseDelta(None, update) for name, update in asked.items()}
        else:
            published = self.downlink.compress(asked)
        for name, p in self.params.items():
            before = self._before[name]
            published[name].add_to(before)
            # those become the weights; the old buffer takes the next round's copy of them
            p.data, self._before[name] = before, p.data
        return published

    def _trim_window(self) -> None:
        per_version = sum(d.nbytes for d in self._window[-1][1].values())
        keep = max(
            1, min(self.policy.delta_window, self.policy.delta_window_bytes // max(1, per_version))
        )
        while len(self._window) > keep:
            self._window.popleft()
