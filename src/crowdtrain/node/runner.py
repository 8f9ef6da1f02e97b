"""The node: three threads around one replica of the server's weights.

- main: applies what the follower fetched, computes a gradient, hands it to the uploader;
- upload: top-k with error feedback, encode, POST (it alone owns the residuals);
- follower: long-polls for each new version and decodes it (node/follower.py).

With `overlap` (the default) the next gradient is computed while the last one is compressed
and uploaded, so a fast node never sits idle; its updates are then about one version stale,
which the server accepts.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from rich.console import Console

from crowdtrain.compression.codecs import get_value_codec
from crowdtrain.compression.sparse import SparseDelta
from crowdtrain.compression.topk import TopKCompressor
from crowdtrain.data.batches import BatchSampler, encode_documents
from crowdtrain.data.corpus import load_text_files
from crowdtrain.model.gpt import GPT
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.node.client import CoordinatorClient, Refused, Stopped
from crowdtrain.node.credentials import LoginError, NodeLogin, default_config_dir
from crowdtrain.node.data import ShardCache, ShardFeed, default_cache_dir
from crowdtrain.node.density import DensityController, DensityPolicy, LinkReport
from crowdtrain.node.follower import Follower
from crowdtrain.node.progress import NodeProgress
from crowdtrain.node.session import NodeBridge, NodeSession
from crowdtrain.node.tls import client_ssl
from crowdtrain.node.trainer import (
    DiLoCoTrainer,
    LocalTrainer,
    StepResult,
    pick_device,
    trainer_for,
)
from crowdtrain.protocol.manifest import Manifest
from crowdtrain.protocol.update import UPDATE_FORMAT, UpdateMeta, encode_update
from crowdtrain.settings import NODE_NAME_CHARS, NODE_NAME_MAX, NodeSettings

log = logging.getLogger(__name__)

RTT_EVERY = 20  # re-measure the round-trip time every this many submissions


def default_node_name() -> str:
    """The host name, as the server takes names. A node keeps its identity per name, so a
    second node on the same machine needs a --name of its own (node/credentials.py)."""
    host = re.sub(rf"[^{NODE_NAME_CHARS}]", "-", socket.gethostname())
    return host[:NODE_NAME_MAX] or "node"


def update_body(
    step: StepResult,
    deltas: dict[str, SparseDelta],
    value_codec: str,
    kind: str,
    base_version: int,
    lineage: str,
    link: LinkReport | None = None,
    update_id: str | None = None,
    leases: list[str] = (),
    data_source: str = "server",
    seq: int | None = None,
) -> bytes:
    """The POST /updates body of one computed and compressed step (zstd, delta-coded indices)."""
    meta = UpdateMeta(
        format=UPDATE_FORMAT,
        value_codec=value_codec,
        kind=kind,
        base_version=base_version,
        lineage=lineage,
        samples=step.samples,
        tokens=step.tokens,
        loss=step.loss,
        update_id=update_id or uuid.uuid4().hex,  # lets the server spot a resent upload
        index_codec="delta",
        upload_bytes_per_s=None if link is None else link.upload_bytes_per_s,
        rtt_s=None if link is None else link.rtt_s,
        leases=",".join(leases),
        data_source=data_source,
        seq=seq,
    )
    return encode_update(deltas, meta)


@dataclass
class NodeStats:
    updates: int = 0
    refused: int = 0
    resyncs: int = 0
    tokens: int = 0
    last_loss: float | None = None
    started: float = field(default_factory=time.monotonic)


class Node:
    """A trainer node bound to one server. `run()` returns when stopped or its budget is spent."""

    def __init__(
        self,
        settings: NodeSettings,
        stop: threading.Event | None = None,
        console: Console | None = None,
    ):
        self.settings = settings
        self.stop_event = stop or threading.Event()
        self.console = console or Console(stderr=True)
        self.name = settings.name or default_node_name()
        self.device = pick_device(settings.device)
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.login = NodeLogin(
            settings.config_dir or default_config_dir(),
            settings.server,
            self.name,
            settings.token.get_secret_value() if settings.token else None,
            should_stop=self._should_stop,
        )
        self.client = CoordinatorClient(
            settings.server,
            self.login,
            settings.request_timeout_s,
            settings.max_backoff_s,
            should_stop=self._should_stop,
            upload_limit=settings.upload_limit,
            verify=client_ssl(
                settings.server, settings.ca_cert, settings.pin_sha256, self.stop_event.is_set
            ),
        )
        self.density = DensityController(
            DensityPolicy(
                min_density=settings.min_density,
                max_density=settings.max_density,
                upload_fraction=settings.upload_fraction,
                warmup=settings.density_warmup,
            ),
            fixed=settings.density,
        )
        self.stats = NodeStats()
        self._finished = threading.Event()
        self.version = -1
        self.lineage = ""
        self.feed: ShardFeed | None = None
        self.follower: Follower | None = None
        self.session: NodeSession | None = None  # the WebSocket session (node/session.py)
        self.revoked: str | None = None  # why the server banned this node, once it did
        self.data_source = "server"
        self._accepted_uploads = 0  # on the upload thread: when to re-measure the rtt

    def _should_stop(self) -> bool:
        return self.stop_event.is_set() or self._finished.is_set()

    def revoke(self, message: str) -> None:
        """The server banned this node: stop at once; run() then raises LoginError(message)."""
        self.revoked = message
        self._finished.set()

    # ---- setup --------------------------------------------------------------------------

    def _connect(self) -> None:
        self.login.hold()
        self.client.connect()
        info = self.client.info()
        self.config = self.client.model_config(info)
        self.tokenizer = Tokenizer.from_json(self.client.tokenizer_json())
        self.model = GPT(self.config).to(self.device)
        self.params = dict(self.model.named_parameters())
        self.manifest = self.client.manifest()
        if self.manifest != Manifest.from_model(self.model):
            raise RuntimeError(
                "the server's manifest does not match the model this node "
                "builds from its config; upgrade crowdtrain on this node"
            )
        self._load_snapshot()
        seed = (
            self.settings.seed if self.settings.seed is not None else zlib.crc32(self.name.encode())
        )
        self.training = info["training"]
        self.trainer = self._trainer(self._sampler(seed))
        self.density.set_server_cap(self.training.get("density_cap"))
        self.density.deadline_s = float(self.training.get("round_deadline_s", 10))
        self._measure_rtt(pings=3)
        self.compressor = TopKCompressor(
            self.density.density, get_value_codec(self.settings.value_codec), seed=seed
        )

    def _sampler(self, seed: int) -> BatchSampler | ShardFeed:
        """Batches from the server's shards, or (with --data, where the server allows it)
        random windows of the node's own files."""
        s = self.settings
        if s.data is None:
            self.data_source = "server"
            cache = ShardCache(
                s.cache_dir or default_cache_dir(), int(s.shard_cache_mb * (1 << 20))
            )
            self.feed = ShardFeed(
                self.client, cache, s.batch_size, self.config.block_size, self._should_stop
            )
            return self.feed
        if not self.training.get("allow_local_data", True):
            raise RuntimeError(
                "this server trains only on its own shards (allow_local_data is off); "
                "run the node without --data"
            )
        if self.training.get("objective", "pretrain") != "pretrain":
            raise RuntimeError(
                f"this server runs {self.training['objective']!r} rounds on its annotated "
                "shards; --data gives plain text for pretraining only, so leave it out"
            )
        self.data_source = "local"
        tokens = encode_documents(self.tokenizer, load_text_files(s.data))
        return BatchSampler(tokens, s.batch_size, self.config.block_size, seed)

    def _measure_rtt(self, pings: int = 1) -> None:
        times = [t for t in (self.client.ping() for _ in range(pings)) if t is not None]
        if times:
            self.density.observe_rtt(min(times))

    def _trainer(self, sampler: BatchSampler) -> LocalTrainer | DiLoCoTrainer:
        return trainer_for(
            self.training, self.model, sampler, self.device, self.settings.accumulate
        )

    def _load_snapshot(self) -> None:
        version, lineage, params = self.client.snapshot(self.manifest)
        self._set_weights(params)
        self.version, self.lineage = version, lineage

    def _set_weights(self, params: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(params[name])

    def apply_published(self) -> None:
        """Apply what the follower fetched, in order: the replica moves to the newest version."""
        for item in self.follower.take():
            if item.params is not None:
                self._set_weights(item.params)
                self.stats.resyncs += 1
            else:
                item.chain.apply_to(self.params)
            self.version, self.lineage = item.version, item.lineage

    # ---- the loop -----------------------------------------------------------------------

    def _budget_left(self, in_flight: int = 0) -> bool:
        s = self.settings
        if self.stop_event.is_set():
            return False
        if s.max_updates is not None and self.stats.updates + in_flight >= s.max_updates:
            return False
        return s.duration_s is None or time.monotonic() - self.stats.started < s.duration_s

    def _compress_and_submit(
        self, step: StepResult, base_version: int, lineage: str, leases: list[str]
    ) -> None:
        """Runs on the upload thread, which alone owns the compressor: the main thread is
        already computing the next step. A refused update goes back into the residual, and
        the leases it would have finished ride on the next one."""
        self.compressor.density = self.density.next_density(self.manifest.numel)
        deltas = self.compressor.compress(step.gradients)
        link = self.density.report()
        kind = self.training.get("update_kind", "gradient")
        body = update_body(
            step,
            deltas,
            self.compressor.codec.name,
            kind,
            base_version,
            lineage,
            link,
            leases=leases,
            data_source=self.data_source,
            seq=self.login.next_seq(),
        )
        entries = sum(d.nnz for d in deltas.values())
        try:
            receipt, seconds = self.client.submit(body)
        except Refused as exc:
            self.compressor.restore(deltas)
            if exc.code == "replayed":  # the server counted further (another run of this id)
                self.login.skip_to(int(exc.body.get("last_seq", 0)))
            if self.feed is not None:
                self.feed.give_back(leases)
            if exc.status in (409, 422):  # read whole, then refused: the link was measured
                self.density.observe_upload(len(body), entries, exc.elapsed_s)
            self.density.set_server_cap(exc.body.get("max_density"))  # over_budget says it
            raise
        self.density.observe_upload(len(body), entries, seconds)
        self.density.set_server_cap(receipt.get("max_density"))
        if self.feed is not None:
            self.feed.settled(receipt.get("leases", {}))
        self._accepted_uploads += 1
        if self._accepted_uploads % RTT_EVERY == 0:
            self._measure_rtt()

    def _settle(self, future: Future, tokens: int) -> None:
        """Wait for an upload. A 409 means the weights moved on (the follower is already
        fetching the newer ones); over_budget, that the server lowered its density cap (the
        next update obeys it); any other refusal is a mismatch that retrying cannot fix."""
        try:
            future.result()
        except Refused as exc:
            self.stats.refused += 1
            if exc.status != 409 and exc.code != "over_budget":
                raise
            log.info("update refused (%s); it went back into the residual", exc.code)
            return
        self.stats.updates += 1
        self.stats.tokens += tokens

    def run(self) -> NodeStats:
        progress = NodeProgress(self.console, self.name, self.settings.server)
        try:
            with progress:
                progress.status("connecting")
                self._connect()
                if self.settings.websocket:
                    self.session = NodeSession(
                        self.client, NodeBridge(self), self.settings.max_backoff_s
                    )
                    self.session.start()
                self._loop(progress)
        except Stopped:
            pass
        finally:
            self._finished.set()
            if self.session is not None:
                self.session.stop()
            if self.feed is not None:
                self.feed.close()
            self.client.close()  # an in-flight long poll fails now, so the follower ends
            if self.follower is not None:
                self.follower.join()
            if self.session is not None:
                self.session.join()
        if self.revoked is not None:
            raise LoginError(self.revoked)
        return self.stats

    def _loop(self, progress: NodeProgress) -> None:
        # DiLoCo talks once per inner_steps local steps, so waiting for each new version costs
        # little, while an outer step on a stale pseudo-gradient (momentum 0.9) diverges
        overlap = self.settings.overlap and self.training.get("algorithm") != "diloco"
        in_flight: tuple[Future, int] | None = None
        session = self.session
        self.follower = Follower(
            self.client,
            self.manifest,
            self.version,
            self.lineage,
            self._should_stop,
            pushes=(lambda: session.up) if session is not None else None,
        )
        self.follower.start()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload") as uploads:
            while self._budget_left(in_flight=0 if in_flight is None else 1):
                self.apply_published()
                base_version = self.version
                started = time.monotonic()
                step = self.trainer.compute_update()
                self.density.observe_compute(time.monotonic() - started)
                self.stats.last_loss = step.loss
                if in_flight is not None:
                    self._settle(*in_flight)
                leases = self.feed.take_finished() if self.feed is not None else []
                future = uploads.submit(
                    self._compress_and_submit, step, base_version, self.lineage, leases
                )
                in_flight = (future, step.tokens)
                if not overlap:  # wait for the round this update joins before computing again
                    self._settle(*in_flight)
                    in_flight = None
                    deadline = float(self.training.get("round_deadline_s", 10))
                    self.follower.wait_beyond(base_version, timeout=deadline + 1.0)
                self._show(progress)
            if in_flight is not None:
                self._settle(*in_flight)
        self._show(progress)

    def _show(self, progress: NodeProgress) -> None:
        progress.update(self.version, self.stats, self.client.traffic, self.density.report())
