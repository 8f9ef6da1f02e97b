"""Aggregators combine the updates of one round into one dense tensor per parameter."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from crowdtrain.compression.sparse import SparseDelta


class Aggregator(ABC):
    """Receives the round's updates one by one and returns their combination.

    `add` is called as updates arrive (so streaming rules do their work while the round is
    open); `result` closes the round. Robust rules that need every update can buffer in `_add`.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes
        self.count = 0
        self.total_weight = 0.0

    def add(self, deltas: dict[str, SparseDelta], weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"update weight must be positive, got {weight}")
        self._add(deltas, weight)
        self.count += 1
        self.total_weight += weight

    def result(self) -> dict[str, torch.Tensor]:
        """The combined update (dense fp32 per parameter); resets for the next round.

        The tensors may be the aggregator's own buffers: use them before the next add()."""
        if self.count == 0:
            raise ValueError("cannot aggregate a round without updates")
        out = self._result()
        self.reset()
        return out

    def reset(self) -> None:
        self.count = 0
        self.total_weight = 0.0
        self._reset()

    @abstractmethod
    def _add(self, deltas: dict[str, SparseDelta], weight: float) -> None: ...

    @abstractmethod
    def _result(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def _reset(self) -> None: ...


class WeightedMean(Aggregator):
    """sum_i w_i x_i / sum_i w_i, streamed into one dense buffer (w_i = the node's samples)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        super().__init__(shapes)
        self._sums = {name: torch.zeros(shape) for name, shape in shapes.items()}
        self._holds_result = False  # the buffers were handed out by result(): zero before use

    def _add(self, deltas: dict[str, SparseDelta], weight: float) -> None:
        if self._holds_result:
            for s in self._sums.values():
                s.zero_()
            self._holds_result = False
        for name, delta in deltas.items():
            delta.add_to(self._sums[name], alpha=weight)

    def _result(self) -> dict[str, torch.Tensor]:
        # In place: a fresh 500 MB result per round (gpt2-124m) costs more than the division.
        # The tensors stay valid until the next add().
        for s in self._sums.values():
            s.div_(self.total_weight)
        return dict(self._sums)

    def _reset(self) -> None:
        self._holds_result = True


AGGREGATORS: dict[str, Callable[[dict[str, tuple[int, ...]]], Aggregator]] = {
    "mean": WeightedMean,
}


def build_aggregator(name: str, shapes: dict[str, tuple[int, ...]]) -> Aggregator:
    try:
        factory = AGGREGATORS[name]
    except KeyError:
        choices = ", ".join(sorted(AGGREGATORS))
        raise ValueError(f"unknown aggregator {name!r}; choose one of: {choices}") from None
    return factory(shapes)
