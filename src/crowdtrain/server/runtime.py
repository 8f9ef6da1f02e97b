"""Builds the server's parts from settings and runs them: model, coordinator, evaluator, logs."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.exc import OperationalError

from crowdtrain import __version__
from crowdtrain.algorithms.aggregators import build_aggregator
from crowdtrain.algorithms.optimizers import OptimizerConfig, build_optimizer
from crowdtrain.algorithms.strategies import Strategy, build_strategy
from crowdtrain.compression.codecs import get_value_codec
from crowdtrain.compression.topk import TopKCompressor
from crowdtrain.data.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from crowdtrain.data.corpus import default_corpus
from crowdtrain.data.leases import LeaseBook
from crowdtrain.data.store import DataStore, StoreError
from crowdtrain.db import Database
from crowdtrain.model.gpt import GPT, GPTConfig
from crowdtrain.model.presets import PRESETS, preset_config
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.progress import byte_progress
from crowdtrain.protocol.manifest import Manifest
from crowdtrain.protocol.update import IntakeLimits
from crowdtrain.resources import ServerResources
from crowdtrain.server.checkpoints import Checkpoint, CheckpointStore
from crowdtrain.server.coordinator import Coordinator, RoundPolicy, RoundResult
from crowdtrain.server.evaluator import Evaluator
from crowdtrain.server.inference import InferenceService
from crowdtrain.server.library import ModelLibrary
from crowdtrain.server.metrics import EvaluationLog, HistoryLog
from crowdtrain.server.nodes import NodeRegistry
from crowdtrain.server.publishing import Publisher
from crowdtrain.server.security import Security
from crowdtrain.server.tensorboard import TensorBoardSink, summary_writer_class
from crowdtrain.settings import ServerSettings, SettingsError

log = logging.getLogger(__name__)

TRAINING_KEYS = (
    "model",
    "algorithm",
    "optimizer",
    "lr",
    "weight_decay",
    "beta1",
    "beta2",
    "warmup_versions",
    "decay_versions",
    "grad_clip",
    "aggregator",
    "min_nodes",
    "round_deadline_s",
    "max_staleness",
    "inner_steps",
    "inner_lr",
    "outer_lr",
    "outer_momentum",
    "downlink_density",
    "downlink_value_codec",
    "density_cap",
    "objective",
    "allow_local_data",
    "lease_ttl_s",
)
DEFAULT_DATASET = "pydoc-topics"  # the embedded corpus, imported at first start
TOKENIZER_SAMPLE_CHARS = 64 << 20  # a new tokenizer learns from at most this much train text
LEDGER_ATTEMPTS = 10  # tries to record a round's finished shards while the database is busy
EVAL_TOKENS = 1 << 22  # the Evaluator samples its fixed windows from the first this many


@dataclass
class _Built:
    tokenizer: Tokenizer
    config: GPTConfig
    checkpoint: Checkpoint | None
    chat_template: ChatTemplate


class ServerRuntime:
    """Everything a running server holds. Routes reach it through deps.Runtime."""

    def __init__(self, settings: ServerSettings, on_admin_token=None):
        """`on_admin_token(token)` is called with an admin token made at this first start, at
        once (it is shown only then: only its hash is stored)."""
        self.settings = settings
        if settings.tensorboard_dir is not None:
            summary_writer_class(settings.tensorboard_dir)  # missing: say so before the set-up
        self.data_dir = Path(settings.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointStore(self.data_dir / "checkpoints", settings.keep_checkpoints)
        self.db = (
            Database(settings.database_url)
            if settings.database_url
            else Database.in_directory(self.data_dir)
        )
        self.store = DataStore(self.data_dir, self.db)
        try:
            self.security = Security.build(settings, self.data_dir, self.db)
        except ValueError as error:
            raise SettingsError(str(error)) from None
        if self.security.new_admin_token is not None and on_admin_token is not None:
            on_admin_token(self.security.new_admin_token)
        # an upload interrupted by the last stop left its temp folder; nothing else writes here
        shutil.rmtree(self.data_dir / "uploads", ignore_errors=True)
        checkpoint = self.checkpoints.load_latest()
        self.dataset = self._dataset(checkpoint)
        built = self._tokenizer_and_config(checkpoint)
        self.tokenizer, self.config = built.tokenizer, built.config
        self.chat_template = built.chat_template
        self.tokenizer.save(self.data_dir / "tokenizer.json")
        self.train_data, valid = self._tokenized()
        self.leases = LeaseBook(
            self.db,
            self.train_data,
            settings.lease_ttl_s,
            seed=settings.seed,
            max_per_node=settings.max_leases_per_node,
        )

        torch.manual_seed(settings.seed)
        self.model = GPT(self.config)
        params = dict(self.model.named_parameters())
        self.manifest = Manifest.from_model(self.model)
        optimizer = build_optimizer(params.values(), self._optimizer_config())
        version, totals = 0, {}
        if built.checkpoint is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(built.checkpoint.params[name])
            hyperparameters = [
                {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
            ]
            optimizer.load_state_dict(built.checkpoint.optimizer_state)
            for group, fresh in zip(optimizer.param_groups, hyperparameters, strict=True):
                group.update(fresh)  # today's settings win over the checkpoint's
            version = built.checkpoint.version
            totals = built.checkpoint.info.get("totals", {})

        self.limits = IntakeLimits.for_manifest(self.manifest)
        if settings.max_update_mb:
            cap = int(settings.max_update_mb * (1 << 20))
            self.limits = IntakeLimits(
                max_body_bytes=cap, max_raw_bytes=max(cap, self.limits.max_raw_bytes)
            )
        self.coordinator = Coordinator(
            params,
            optimizer,
            self._strategy(),
            build_aggregator(settings.aggregator, {n: tuple(p.shape) for n, p in params.items()}),
            RoundPolicy(
                min_nodes=settings.min_nodes,
                deadline_s=settings.round_deadline_s,
                max_staleness=settings.max_staleness,
                max_pending=settings.max_pending_updates,
                max_pending_per_node=settings.max_pending_per_node,
                base_lr=self._optimizer_config().lr,
                # DiLoCo's outer learning rate is constant (as in the paper)
                warmup_versions=0 if settings.algorithm == "diloco" else settings.warmup_versions,
                decay_versions=settings.decay_versions,
                delta_window=settings.delta_window,
                delta_window_bytes=int(settings.delta_window_mb * (1 << 20)),
                max_density=settings.density_cap,
            ),
            version=version,
            totals=totals,
            downlink=self._downlink(built.checkpoint),
        )
        self.publisher = Publisher(self.coordinator)
        self.nodes = NodeRegistry()
        self.rounds = HistoryLog(self.data_dir / "rounds.jsonl")
        self.evals = EvaluationLog(self.db, self.data_dir / "evals.jsonl")
        self.rounds.truncate_after(version)
        self.evals.truncate_after(version)
        # shards completed by updates the checkpoint does not hold are owed again
        self.leases.rollback_after(version)
        self.evaluator = Evaluator(
            self.config,
            self.store.tokens(valid, limit=EVAL_TOKENS) if valid else np.empty(0, np.uint16),
            self.coordinator.snapshot,
            self.evals,
            dataset=self.dataset,
            every=settings.eval_every,
            batches=settings.eval_batches,
            batch_size=settings.eval_batch_size,
        )
        self.coordinator.add_listener(self._on_round)
        self.tensorboard = self._tensorboard()
        self.resources = ServerResources(self.data_dir)
        self.models = ModelLibrary(self)
        self.inference = InferenceService(self.models, settings.max_chat_streams)
        self.resumed_from = built.checkpoint.version if built.checkpoint else None
        if built.checkpoint is None:
            self.save_checkpoint()

    def _dataset(self, checkpoint: Checkpoint | None) -> str:
        """The dataset this run trains on: the setting, else the one the resumed run trained
        on, else the embedded corpus (imported on first use)."""
        name = self.settings.dataset
        if name is None and checkpoint is not None:
            name = checkpoint.info.get("dataset")
        if name is not None:
            if not self.store.exists(name):
                raise SettingsError(f"--dataset: {self.store.unknown_message(name)}")
            return name
        if not self.store.exists(DEFAULT_DATASET, "train"):
            corpus = default_corpus()
            for split, documents in (("train", corpus.train), ("valid", corpus.valid)):
                self.store.import_documents(
                    DEFAULT_DATASET, split, documents, "python:pydoc_data.topics"
                )
        return DEFAULT_DATASET

    def _tokenized(self):
        """The shards nodes lease (train, or annotated for sft) and the validation split."""
        s = self.settings
        lease_split = "annotated" if s.objective == "sft" else "train"
        try:
            with byte_progress(f"tokenizing {self.dataset}/{lease_split}", None) as progress:
                train = self.store.tokenized(
                    self.dataset,
                    lease_split,
                    self.tokenizer,
                    s.shard_tokens,
                    template=self.chat_template,
                    progress=progress,
                )
        except StoreError as error:
            raise SettingsError(str(error)) from None
        valid = None
        if s.evaluate or self.store.exists(self.dataset, "valid"):
            try:
                with byte_progress(f"tokenizing {self.dataset}/valid", None) as progress:
                    valid = self.store.tokenized(
                        self.dataset, "valid", self.tokenizer, s.shard_tokens, progress=progress
                    )
            except StoreError as error:
                raise SettingsError(
                    f"{error}; or run without the Evaluator (evaluate = false)"
                ) from None
        if s.evaluate and valid.tokens < self.config.block_size + 1:
            raise SettingsError(
                f"the valid split of {self.dataset!r} has {valid.tokens} tokens, fewer than "
                f"one window of block_size + 1 = {self.config.block_size + 1}; import more "
                "validation text or set evaluate = false"
            )
        for info in (train, valid):
            if info is not None:
                self.store.delete_stale_tokenizations(info)
        return train, valid

    def _tokenizer_texts(self):
        """A bounded sample of the run's text for training a new tokenizer."""
        split = "train" if self.store.exists(self.dataset, "train") else "annotated"
        budget = TOKENIZER_SAMPLE_CHARS
        for document in self.store.documents(self.dataset, split):
            text = (
                document if isinstance(document, str) else "\n".join(m["content"] for m in document)
            )
            yield text
            budget -= len(text)
            if budget <= 0:
                return

    def _tokenizer_and_config(self, checkpoint: Checkpoint | None) -> _Built:
        settings = self.settings
        if checkpoint is not None:
            saved = checkpoint.info.get("settings", {})
            for key in ("model", "algorithm", "optimizer"):
                if saved.get(key) != getattr(settings, key):
                    raise SettingsError(
                        f"the data directory {self.data_dir} holds a run with {key} "
                        f"{saved.get(key)!r} but this start asks for {getattr(settings, key)!r}; "
                        f"use the same {key} to resume, or a new --data-dir to start afresh"
                    )
            template = checkpoint.info.get("chat_template")
            return _Built(
                Tokenizer.from_json(checkpoint.info["tokenizer"]),
                GPTConfig.from_dict(checkpoint.info["model_config"]),
                checkpoint,
                ChatTemplate.from_dict(template) if template else DEFAULT_CHAT_TEMPLATE,
            )
        if settings.model not in PRESETS:
            preset_config(settings.model)  # raises the message that lists the presets
        vocab = settings.vocab_size or PRESETS[settings.model]["vocab_size"]
        tokenizer = Tokenizer.train(self._tokenizer_texts(), vocab_size=vocab)
        config = preset_config(
            settings.model,
            vocab_size=max(vocab, tokenizer.vocab_size),
            block_size=settings.block_size,
        )
        return _Built(tokenizer, config, None, DEFAULT_CHAT_TEMPLATE)

    def _optimizer_config(self) -> OptimizerConfig:
        s = self.settings
        if s.algorithm == "diloco":  # the outer optimizer: SGD with Nesterov momentum
            return OptimizerConfig(
                name="nesterov", lr=s.outer_lr, momentum=s.outer_momentum, weight_decay=0.0
            )
        return OptimizerConfig(
            name=s.optimizer, lr=s.lr, weight_decay=s.weight_decay, beta1=s.beta1, beta2=s.beta2
        )

    def _strategy(self) -> Strategy:
        s = self.settings
        if s.algorithm == "diloco":
            return build_strategy("diloco", inner_steps=s.inner_steps, inner_lr=s.inner_lr)
        return build_strategy(s.algorithm, grad_clip=s.grad_clip)

    def _downlink(self, checkpoint: Checkpoint | None) -> TopKCompressor | None:
        """The compressor of published steps; None publishes them whole, in fp32."""
        s = self.settings
        if s.downlink_density >= 1.0 and s.downlink_value_codec == "fp32":
            return None
        downlink = TopKCompressor(
            s.downlink_density, get_value_codec(s.downlink_value_codec), seed=s.seed
        )
        if checkpoint is not None:  # what was held back before the restart is still owed
            downlink.residuals.update(checkpoint.downlink_residuals)
        return downlink

    def _tensorboard(self) -> TensorBoardSink | None:
        """The TensorBoard sink when `tensorboard_dir` is set (it only queues on the round path)."""
        if self.settings.tensorboard_dir is None:
            return None
        last = self.evals.last()
        log_dir = self.settings.tensorboard_dir
        sink = TensorBoardSink(
            summary_writer_class(log_dir)(log_dir=str(log_dir)),
            self.evals,
            evaluated=last["version"] if last else -1,
        )
        self.coordinator.add_listener(sink.on_round)
        return sink

    def _on_round(self, result: RoundResult) -> None:
        self._record_completions(result)
        self.rounds.append(result.record)
        self.evaluator.notify(result.version)
        if result.version % self.settings.checkpoint_every == 0:
            self.save_checkpoint()

    def _record_completions(self, result: RoundResult) -> None:
        """Enter the round's finished shards in the ledger. A long import in another process
        can hold the database's write lock past its busy timeout: keep trying (the round
        waits) rather than leave the leases submitted for good."""
        for attempt in range(1, LEDGER_ATTEMPTS + 1):
            try:
                self.leases.applied(result.update_ids, result.version)
                return
            except OperationalError as error:
                log.warning(
                    "recording version %d's shards in the ledger failed (attempt %d of %d): %s",
                    result.version,
                    attempt,
                    LEDGER_ATTEMPTS,
                    error,
                )
                time.sleep(1.0)
        log.error(
            "version %d's shards were not recorded; they will be leased again", result.version
        )

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current version. Call on the apply thread or when stopped."""
        c = self.coordinator
        version, params = c.snapshot()
        info = {
            "crowdtrain_version": __version__,
            "model_config": self.config.to_dict(),
            "settings": {k: getattr(self.settings, k) for k in TRAINING_KEYS},
            "tokenizer": self.tokenizer.to_json(),
            "chat_template": self.chat_template.to_dict(),
            "dataset": self.dataset,
            "totals": dict(c.totals),
        }
        residuals = {} if c.downlink is None else dict(c.downlink.residuals)
        checkpoint = Checkpoint(version, params, c.optimizer.state_dict(), info, residuals)
        path = self.checkpoints.save(checkpoint)
        log.info("checkpoint written: %s", path)
        return path

    def start(self) -> None:
        self.coordinator.start()
        if self.settings.evaluate:
            self.evaluator.start(self.coordinator.version)
        if self.tensorboard is not None:
            self.tensorboard.start()

    def stop(self) -> None:
        """Apply what was accepted, write a final checkpoint, stop the background threads."""
        self.inference.stop()  # chat replies end at their next token
        self.coordinator.stop(drain=True)
        self.evaluator.stop()
        if self.tensorboard is not None:
            self.tensorboard.stop()  # after the drain and the last evaluation: all of it lands
        if self.coordinator.failure is not None:
            # the optimizer state may be half a step along: resume from the last good checkpoint
            log.error(
                "not writing a final checkpoint after the failure: %s", self.coordinator.failure
            )
        else:
            self.save_checkpoint()
        self.security.close()
        self.db.close()

    def info(self) -> dict:
        c = self.coordinator
        return {
            "crowdtrain_version": __version__,
            "version": c.version,
            "lineage": c.lineage,
            "model": {
                "preset": self.settings.model,
                **self.config.to_dict(),
                "parameters": self.manifest.numel,
            },
            "tokenizer": {
                "version": self.tokenizer.version,
                "vocab_size": self.tokenizer.vocab_size,
                "chat_template": self.chat_template.to_dict(),
            },
            "corpus": self.dataset,
            "data": self.leases.status(),
            "training": {
                **{k: getattr(self.settings, k) for k in TRAINING_KEYS},
                **c.strategy.node_instructions(),
                "max_update_bytes": self.limits.max_body_bytes,
            },
            "totals": dict(c.totals),
            "pending_updates": c.pending,
            "traffic": self.nodes.traffic(),
            "nodes": self.nodes.list(),
            "connected_nodes": self.nodes.connected_count(),
            "resumed_from": self.resumed_from,
            "server": self.resources.figures(),
        }
