"""The in-memory form of one parameter's update: sparse (indices + values) or dense."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from crowdtrain.compression.codecs import ValueCodec, get_value_codec


@dataclass(frozen=True)
class SparseDelta:
    """One parameter's contribution, in the form it travels.

    `indices` are sorted int32 positions into the flattened parameter; a dense delta has
    `indices=None`. `values` (and `scales`, for block codecs) are the codec's wire tensors for
    `count` values. Without a codec, `values` are plain floats read as they are.
    """

    indices: torch.Tensor | None
    values: torch.Tensor
    scales: torch.Tensor | None = None
    codec: ValueCodec = field(default_factory=lambda: get_value_codec("fp32"))
    count: int = -1  # number of values; derived unless a dense block-codec delta gives it

    def __post_init__(self) -> None:
        if self.count < 0:
            if self.indices is not None:
                count = self.indices.numel()
            elif not self.codec.has_scales:
                count = self.values.numel()
            else:
                raise ValueError("a dense block-codec delta needs its value count")
            object.__setattr__(self, "count", count)

    @classmethod
    def encode(
        cls, values: torch.Tensor, codec: ValueCodec, indices: torch.Tensor | None = None
    ) -> SparseDelta:
        """Values (dense in the parameter's shape, or the entries at `indices`) in `codec`."""
        wire, scales = codec.compress(values)
        return cls(indices, wire, scales, codec, values.numel())

    @property
    def is_dense(self) -> bool:
        return self.indices is None

    @property
    def nnz(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        size = self.values.numel() * self.values.element_size()
        if self.scales is not None:
            size += self.scales.numel() * self.scales.element_size()
        return size + (0 if self.indices is None else self.indices.numel() * 4)

    def decoded(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The fp32 values, 1-D (`count` entries), on `device` (default: where they are)."""
        values = self.values if device is None else self.values.to(device)
        scales = self.scales
        if scales is not None and device is not None:
            scales = scales.to(device)
        if not self.codec.has_scales and values.dtype != self.codec.wire_dtype:
            return values.reshape(-1).float()  # plain floats built by hand (tests, benchmarks)
        return self.codec.extract(values, scales, self.count)

    def add_to(self, target: torch.Tensor, alpha: float = 1.0) -> None:
        """target += alpha * this delta, in fp32, in place. The server and every node apply a
        published delta with this one function (alpha 1), so their weights stay bit-identical:
        each entry is one IEEE addition (indices are unique), on any device."""
        values = self.decoded(target.device)
        if self.indices is None:
            target.view(-1).add_(values, alpha=alpha)
        else:
            target.view(-1).index_add_(0, self.indices.to(target.device), values, alpha=alpha)

    def to_dense(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Materialize as a dense fp32 tensor of `shape` (absent entries are zero)."""
        out = torch.zeros(shape, dtype=torch.float32, device=self.values.device)
        self.add_to(out)
        return out
