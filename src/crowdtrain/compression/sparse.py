"""The in-memory form of one parameter's update: sparse (indices + values) or dense."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from crowdtrain.compression.codecs import ValueCodec


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

    @property
    def nbytes(self) -> int:
        size = self.values.numel() * self.values.element_size()
        return size + (0 if self.indices is None else self.indices.numel() * 4)

    def add_to(self, target: torch.Tensor, codec: ValueCodec) -> None:
        """target += this delta (values read with `codec`), in fp32, in place. The server and
        every node apply a published delta with this one function, so their weights stay
        bit-identical: each entry is one IEEE addition (indices are unique), on any device."""
        values = codec.extract(self.values.to(target.device))
        if self.indices is None:
            target.add_(values.reshape(target.shape))
        else:
            target.view(-1).index_add_(0, self.indices.to(target.device), values)

    def to_dense(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Materialize as a dense fp32 tensor of `shape` (absent entries are zero)."""
        if self.indices is None:
            return self.values.float().reshape(shape).clone()
        out = torch.zeros(shape, dtype=torch.float32, device=self.values.device)
        out.view(-1).index_put_((self.indices.long(),), self.values.float())
        return out
