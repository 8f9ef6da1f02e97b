"""Strategies: what nodes are asked to compute, and how the server turns it into a step."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Strategy(ABC):
    """One training algorithm. `node_instructions` travels to nodes in /info."""

    name: str
    update_kind: str

    def node_instructions(self) -> dict:
        return {"algorithm": self.name, "update_kind": self.update_kind}

    def step(
        self,
        params: dict[str, torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        combined: dict[str, torch.Tensor],
        lr: float,
    ) -> None:
        """Move `params` in place using the round's combined update."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        self._step(params, optimizer, combined)

    @abstractmethod
    def _step(
        self,
        params: dict[str, torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        combined: dict[str, torch.Tensor],
    ) -> None: ...


class SyncStrategy(Strategy):
    """The prototype's algorithm: nodes send gradients, the server's optimizer steps on their mean.

    `grad_clip` bounds the global norm of the combined gradient (0 turns it off).
    """

    name = "sync"
    update_kind = "gradient"

    def __init__(self, grad_clip: float = 1.0):
        self.grad_clip = grad_clip

    def _step(self, params, optimizer, combined) -> None:
        for name, p in params.items():
            p.grad = combined[name]
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), self.grad_clip)
        optimizer.step()
        for p in params.values():
            p.grad = None


class DiLoCoStrategy(Strategy):
    """Low-communication training (DiLoCo, Douillard et al. 2023): each node runs
    `inner_steps` local AdamW steps from the current version and sends the pseudo-gradient
    (start weights - local weights); the server's outer optimizer, SGD with Nesterov momentum,
    steps on their mean."""

    name = "diloco"
    update_kind = "pseudo_gradient"

    def __init__(self, inner_steps: int = 50, inner_lr: float = 1e-3):
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr

    def node_instructions(self) -> dict:
        return {
            **super().node_instructions(),
            "inner_steps": self.inner_steps,
            "inner_lr": self.inner_lr,
        }

    def _step(self, params, optimizer, combined) -> None:
        for name, p in params.items():
            p.grad = combined[name]
        optimizer.step()
        for p in params.values():
            p.grad = None


STRATEGIES = {"sync": SyncStrategy, "diloco": DiLoCoStrategy}


def build_strategy(name: str, **kwargs) -> Strategy:
    try:
        factory = STRATEGIES[name]
    except KeyError:
        choices = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {choices}") from None
    return factory(**kwargs)
