"""Builds the server's parts from settings and runs them: model, coordinator, evaluator, logs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from crowdtrain import __version__
from crowdtrain.algorithms.aggregators import build_aggregator
from crowdtrain.algorithms.optimizers import OptimizerConfig, build_optimizer
from crowdtrain.algorithms.strategies import Strategy, build_strategy
from crowdtrain.compression.codecs import get_value_codec
from crowdtrain.compression.topk import TopKCompressor
from crowdtrain.data.batches import encode_documents
from crowdtrain.data.corpus import default_corpus
from crowdtrain.model.gpt import GPT, GPTConfig
from crowdtrain.model.presets import PRESETS, preset_config
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.protocol.manifest import Manifest
from crowdtrain.protocol.update import IntakeLimits
from crowdtrain.server.checkpoints import Checkpoint, CheckpointStore
from crowdtrain.server.coordinator import Coordinator, RoundPolicy, RoundResult
from crowdtrain.server.evaluator import Evaluator
from crowdtrain.server.metrics import HistoryLog
from crowdtrain.server.nodes import NodeRegistry
from crowdtrain.server.publishing import Publisher
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
)


@dataclass
class _Built:
    tokenizer: Tokenizer
    config: GPTConfig
    checkpoint: Checkpoint | None


class ServerRuntime:
    """Everything a running server holds. Routes reach it through deps.Runtime."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointStore(self.data_dir / "checkpoints", settings.keep_checkpoints)
        corpus = default_corpus()
        self.corpus_name = corpus.name
        built = self._tokenizer_and_config(corpus.train)
        self.tokenizer, self.config = built.tokenizer, built.config
        self.tokenizer.save(self.data_dir / "tokenizer.json")

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
        self.evals = HistoryLog(self.data_dir / "evals.jsonl")
        self.rounds.truncate_after(version)
        self.evals.truncate_after(version)
        self.evaluator = Evaluator(
            self.config,
            encode_documents(self.tokenizer, corpus.valid),
            self.coordinator.snapshot,
            self.evals,
            every=settings.eval_every,
            batches=settings.eval_batches,
            batch_size=settings.eval_batch_size,
        )
        self.coordinator.add_listener(self._on_round)
        self.resumed_from = built.checkpoint.version if built.checkpoint else None
        if built.checkpoint is None:
            self.save_checkpoint()

    def _tokenizer_and_config(self, train_texts: list[str]) -> _Built:
        checkpoint = self.checkpoints.load_latest()
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
            return _Built(
                Tokenizer.from_json(checkpoint.info["tokenizer"]),
                GPTConfig.from_dict(checkpoint.info["model_config"]),
                checkpoint,
            )
        if settings.model not in PRESETS:
            preset_config(settings.model)  # raises the message that lists the presets
        vocab = settings.vocab_size or PRESETS[settings.model]["vocab_size"]
        tokenizer = Tokenizer.train(train_texts, vocab_size=vocab)
        config = preset_config(
            settings.model,
            vocab_size=max(vocab, tokenizer.vocab_size),
            block_size=settings.block_size,
        )
        return _Built(tokenizer, config, None)

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

    def _on_round(self, result: RoundResult) -> None:
        self.rounds.append(result.record)
        self.evaluator.notify(result.version)
        if result.version % self.settings.checkpoint_every == 0:
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current version. Call on the apply thread or when stopped."""
        c = self.coordinator
        version, params = c.snapshot()
        info = {
            "crowdtrain_version": __version__,
            "model_config": self.config.to_dict(),
            "settings": {k: getattr(self.settings, k) for k in TRAINING_KEYS},
            "tokenizer": self.tokenizer.to_json(),
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

    def stop(self) -> None:
        """Apply what was accepted, write a final checkpoint, stop the background threads."""
        self.coordinator.stop(drain=True)
        self.evaluator.stop()
        if self.coordinator.failure is not None:
            # the optimizer state may be half a step along: resume from the last good checkpoint
            log.error(
                "not writing a final checkpoint after the failure: %s", self.coordinator.failure
            )
            return
        self.save_checkpoint()

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
            },
            "corpus": self.corpus_name,
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
        }
