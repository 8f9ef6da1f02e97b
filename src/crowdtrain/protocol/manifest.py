"""The model manifest: every parameter's name, shape and dtype, in a fixed order."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Manifest:
    """What an update may name. Built from `model.named_parameters()` (tied weights once)."""

    def __init__(self, params: list[ParamSpec]):
        self.params = params
        self.by_name = {p.name: p for p in params}

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> Manifest:
        return cls(
            [
                ParamSpec(name, tuple(p.shape), str(p.dtype).removeprefix("torch."))
                for name, p in model.named_parameters()
            ]
        )

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def dense_nbytes(self, element_size: int = 4) -> int:
        return self.numel * element_size

    def to_json(self) -> list[dict]:
        return [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype} for p in self.params]

    @classmethod
    def from_json(cls, items: list[dict]) -> Manifest:
        return cls([ParamSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in items])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and self.params == other.params
