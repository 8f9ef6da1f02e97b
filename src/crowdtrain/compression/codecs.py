"""Value codecs: one class per codec, registered under the name that travels on the wire."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ValueCodec(ABC):
    """Turns fp32 values into the tensors that travel, and back.

    A codec's `name` is written into every payload's metadata, so a decoder never needs a side
    channel to know how to read the values.
    """

    name: str
    wire_dtype: torch.dtype

    def compress(self, values: torch.Tensor) -> torch.Tensor:
        """fp32 values -> the tensor written to the wire."""
        return self._compress(values)

    def extract(self, wire: torch.Tensor) -> torch.Tensor:
        """The wire tensor -> fp32 values. Callers check `wire.dtype == wire_dtype` first."""
        return wire.to(torch.float32)

    def estimate_compression_ratio(self) -> float:
        """Bytes of fp32 per byte of wire values (before container compression)."""
        return 4.0 / torch.tensor([], dtype=self.wire_dtype).element_size()

    @abstractmethod
    def _compress(self, values: torch.Tensor) -> torch.Tensor: ...


class Float32Codec(ValueCodec):
    name = "fp32"
    wire_dtype = torch.float32

    def _compress(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(torch.float32)


class Float16Codec(ValueCodec):
    name = "fp16"
    wire_dtype = torch.float16

    def _compress(self, values: torch.Tensor) -> torch.Tensor:
        # fp16 overflows above 65504; clamp so a large gradient entry is sent as the largest
        # finite value (the rest stays in the error-feedback residual) instead of as inf.
        # clamp in fp32: in bf16, 65504 itself rounds up to 65536, which is inf in fp16
        return values.float().clamp(-65504.0, 65504.0).to(torch.float16)


class BFloat16Codec(ValueCodec):
    name = "bf16"
    wire_dtype = torch.bfloat16

    def _compress(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(torch.bfloat16)


VALUE_CODECS: dict[str, ValueCodec] = {
    codec.name: codec for codec in (Float32Codec(), Float16Codec(), BFloat16Codec())
}


def get_value_codec(name: str) -> ValueCodec:
    """The codec registered under `name`; ValueError naming the choices otherwise."""
    try:
        return VALUE_CODECS[name]
    except KeyError:
        choices = ", ".join(sorted(VALUE_CODECS))
        raise ValueError(f"unknown value codec {name!r}; choose one of: {choices}") from None
