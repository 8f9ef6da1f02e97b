"""The local compute of a node: gradients of its model on its own batches."""

from __future__ import annotations

import contextlib
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

    def compute_gradient(self) -> StepResult:
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
