"""The local compute of a node: what it sends each round, from its own batches.

`sync`: the mean gradient at the current weights (LocalTrainer). `diloco`: the change that
H local AdamW steps make, start minus end (DiLoCoTrainer)."""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch

from crowdtrain.data.batches import BatchSampler
from crowdtrain.model.gpt import GPT


def pick_device(requested: str = "auto") -> torch.device:
    """cuda when present (or asked for), else cpu; a clear error for an unusable request."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {requested!r} was requested but CUDA is not available here; "
            "use --device cpu or auto"
        )
    return device


@dataclass
class StepResult:
    gradients: dict[str, torch.Tensor]
    loss: float
    samples: int
    tokens: int
    seconds: float


class LocalTrainer:
    """Computes the mean gradient over `accumulate` micro-batches at the model's current weights.

    The model's parameters are the node's replica of the server's weights; the trainer never
    steps them itself (in `sync` the server's optimizer does)."""

    def __init__(
        self, model: GPT, sampler: BatchSampler, device: torch.device, accumulate: int = 1
    ):
        self.model = model
        self.sampler = sampler
        self.device = device
        self.accumulate = accumulate
        self.params = dict(model.named_parameters())

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compute_update(self) -> StepResult:
        """The gradient of the current weights over `accumulate` micro-batches."""
        started = time.perf_counter()
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        total_loss, samples, tokens = 0.0, 0, 0
        for _ in range(self.accumulate):
            x, y = self.sampler.next()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                _, loss = self.model(x, y)
            (loss / self.accumulate).backward()
            total_loss += loss.item()
            samples += x.shape[0]
            tokens += x.numel()
        gradients = {name: p.grad for name, p in self.params.items() if p.grad is not None}
        return StepResult(
            gradients, total_loss / self.accumulate, samples, tokens, time.perf_counter() - started
        )


class DiLoCoTrainer:
    """Runs `inner_steps` AdamW steps on a local copy that starts from the replica each round,
    and returns the pseudo-gradient `replica - local`. The inner optimizer keeps its state from
    round to round, as in DiLoCo; the replica itself is never stepped."""

    def __init__(
        self,
        replica: GPT,
        sampler: BatchSampler,
        device: torch.device,
        inner_steps: int,
        inner_lr: float,
        accumulate: int = 1,
    ):
        self.replica = dict(replica.named_parameters())
        self.local = copy.deepcopy(replica)
        self.local_params = dict(self.local.named_parameters())
        self.inner = LocalTrainer(self.local, sampler, device, accumulate)
        self.inner_steps = inner_steps
        self.optimizer = torch.optim.AdamW(
            self.local.parameters(), lr=inner_lr, betas=(0.9, 0.95), weight_decay=0.1
        )

    def compute_update(self) -> StepResult:
        started = time.perf_counter()
        with torch.no_grad():
            for name, p in self.local_params.items():
                p.copy_(self.replica[name])
        losses, samples, tokens = [], 0, 0
        for _ in range(self.inner_steps):
            step = self.inner.compute_update()
            torch.nn.utils.clip_grad_norm_(self.local.parameters(), 1.0)
            self.optimizer.step()
            losses.append(step.loss)
            samples += step.samples
            tokens += step.tokens
        with torch.no_grad():
            pseudo = {
                name: self.replica[name].detach() - p.detach()
                for name, p in self.local_params.items()
            }
        return StepResult(
            pseudo, sum(losses) / len(losses), samples, tokens, time.perf_counter() - started
        )


def trainer_for(
    training: dict,
    model: GPT,
    sampler: BatchSampler,
    device: torch.device,
    accumulate: int = 1,
) -> LocalTrainer | DiLoCoTrainer:
    """The trainer for what a run asks nodes to compute (`training` from GET /info)."""
    algorithm = training.get("algorithm", "sync")
    if algorithm == "diloco":
        return DiLoCoTrainer(
            model,
            sampler,
            device,
            inner_steps=int(training["inner_steps"]),
            inner_lr=float(training["inner_lr"]),
            accumulate=accumulate,
        )
    if algorithm != "sync":
        raise RuntimeError(
            f"the server runs algorithm {algorithm!r}, which this node does "
            "not know; upgrade crowdtrain on this node"
        )
    return LocalTrainer(model, sampler, device, accumulate)
