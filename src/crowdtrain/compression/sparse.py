"""The in-memory form of one parameter's update: sparse (indices + values) or dense."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseDelta:
    """One parameter's contribution.

    `indices` are sorted int32 positions into the flattened parameter and `values` the matching
    entries (1-D). A dense delta has `indices=None` and `values` in the parameter's shape.
    """

    indices: torch.Tensor | None
    values: torch.Tensor

    @property
    def is_dense(self) -> bool:
        return self.indices is None

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def to_dense(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Materialize as a dense fp32 tensor of `shape` (absent entries are zero)."""
        if self.indices is None:
            return self.values.float().reshape(shape).clone()
        out = torch.zeros(shape, dtype=torch.float32, device=self.values.device)
        out.view(-1).index_put_((self.indices.long(),), self.values.float())
        return out
