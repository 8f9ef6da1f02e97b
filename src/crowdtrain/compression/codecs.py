"""Value codecs: one class per codec, registered under the name that travels on the wire.

Float codecs (fp32, fp16, bf16) send each value as one number of their dtype. Block codecs
(int8, int4, sign) cut the values into blocks of `block_size`, send one positive fp32 scale per
block (`NAME.scale` on the wire) and a few bits per value (`NAME.val` / `NAME.dense`, 1-D).
Every decode is a single IEEE operation per value (a cast, or level x scale), so it gives the
same bits on every device: the server and the nodes apply published deltas identically.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

# The smallest positive normal fp32: the scale of an all-zero block (never zero, so a zero or
# negative scale on the wire is always a forgery and refused).
MIN_SCALE = torch.finfo(torch.float32).tiny


class ValueCodec(ABC):
    """Turns fp32 values into the tensors that travel, and back.

    A codec's `name` is written into every payload's metadata, so a decoder never needs a side
    channel to know how to read the values.
    """

    name: str
    wire_dtype: torch.dtype
    block_size: int = 0  # values per scale; 0 for codecs without scales
    max_scale: float = math.inf

    @property
    def has_scales(self) -> bool:
        return self.block_size > 0

    @abstractmethod
    def compress(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Values (any float dtype) -> (wire values, wire scales or None)."""

    @abstractmethod
    def extract(self, wire: torch.Tensor, scales: torch.Tensor | None, count: int) -> torch.Tensor:
        """The wire tensors of `count` values -> fp32 values, 1-D. Callers check the layout
        (`wire_shape`, `scales_shape`) first."""

    def wire_shape(self, count: int, shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The shape `NAME.val` has for `count` values, or `NAME.dense` for a parameter of
        `shape` (float codecs keep the parameter's shape; block codecs send 1-D)."""
        return (count,) if shape is None else shape

    def scales_shape(self, count: int) -> tuple[int, ...] | None:
        return (math.ceil(count / self.block_size),) if self.has_scales else None

    @abstractmethod
    def estimate_compression_ratio(self) -> float:
        """Bytes of fp32 per byte of wire values and scales (before container compression)."""


class FloatCodec(ValueCodec):
    """Each value cast to `wire_dtype` (round to nearest even)."""

    def compress(self, values: torch.Tensor) -> tuple[torch.Tensor, None]:
        # a copy even when the dtype matches: error feedback subtracts what was sent from
        # `values` in place, which must not change what is sent
        return values.to(self.wire_dtype, copy=True), None

    def extract(self, wire: torch.Tensor, scales: torch.Tensor | None, count: int) -> torch.Tensor:
        return wire.reshape(-1).to(torch.float32)

    def estimate_compression_ratio(self) -> float:
        return 4.0 / torch.tensor([], dtype=self.wire_dtype).element_size()


class Float32Codec(FloatCodec):
    name = "fp32"
    wire_dtype = torch.float32


class Float16Codec(FloatCodec):
    name = "fp16"
    wire_dtype = torch.float16

    def compress(self, values: torch.Tensor) -> tuple[torch.Tensor, None]:
        # fp16 overflows above 65504; clamp so a large gradient entry is sent as the largest
        # finite value (the rest stays in the error-feedback residual) instead of as inf.
        # clamp in fp32: in bf16, 65504 itself rounds up to 65536, which is inf in fp16
        return values.float().clamp(-65504.0, 65504.0).to(torch.float16), None


class BFloat16Codec(FloatCodec):
    name = "bf16"
    wire_dtype = torch.bfloat16


class BlockCodec(ValueCodec):
    """Per block of `block_size` values: one fp32 scale > 0 and small integer levels.

    value = level x scale. Subclasses say how levels are chosen (`_levels`) and packed.
    """

    block_size = 64
    bits: int
    max_level: int  # the largest |level| a wire value decodes to (forged ones included)

    @property
    def max_scale(self) -> float:
        """The largest scale whose values all stay finite in fp32 once decoded."""
        return torch.finfo(torch.float32).max / self.max_level

    def compress(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = values.detach().reshape(-1).float()
        count = flat.numel()
        blocks = _padded(flat, self.block_size).view(-1, self.block_size)
        levels, scales = self._levels(blocks)
        scales = scales.clamp_min(MIN_SCALE)
        return self._pack(levels.reshape(-1)[:count]), scales

    def extract(self, wire: torch.Tensor, scales: torch.Tensor | None, count: int) -> torch.Tensor:
        assert scales is not None
        levels = self._unpack(wire, count).float()
        per_value = scales.repeat_interleave(self.block_size)[:count]
        return levels * per_value

    def wire_shape(self, count: int, shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        return (math.ceil(count * self.bits / 8),)

    def estimate_compression_ratio(self) -> float:
        return 32.0 / (self.bits + 32.0 / self.block_size)

    @abstractmethod
    def _levels(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer levels as int8, one scale per block) for fp32 blocks of shape (n, block)."""

    @abstractmethod
    def _pack(self, levels: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _unpack(self, wire: torch.Tensor, count: int) -> torch.Tensor: ...


class Int8Codec(BlockCodec):
    """Symmetric absmax quantization to -127..127: about 1/250 of a block's largest value."""

    name = "int8"
    wire_dtype = torch.int8
    bits = 8
    max_level = 128  # -128 is never sent, but decodes

    def _levels(self, blocks):
        scales = blocks.abs().amax(dim=1) / 127.0
        safe = scales.clamp_min(MIN_SCALE).unsqueeze(1)
        return (blocks / safe).round().clamp(-127, 127).to(torch.int8), scales

    def _pack(self, levels):
        return levels

    def _unpack(self, wire, count):
        return wire


class Int4Codec(BlockCodec):
    """Symmetric absmax quantization to -7..7, two values per byte (low nibble first)."""

    name = "int4"
    wire_dtype = torch.uint8
    bits = 4
    max_level = 8  # nibble 0 (level -8) is never sent, but decodes

    def _levels(self, blocks):
        scales = blocks.abs().amax(dim=1) / 7.0
        safe = scales.clamp_min(MIN_SCALE).unsqueeze(1)
        return (blocks / safe).round().clamp(-7, 7).to(torch.int8), scales

    def _pack(self, levels):
        nibbles = (levels.to(torch.int16) + 8).to(torch.uint8)  # 1..15; 8 is zero
        if nibbles.numel() % 2:
            nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])
        pairs = nibbles.view(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)

    def _unpack(self, wire, count):
        nibbles = torch.stack([wire & 0x0F, wire >> 4], dim=1).reshape(-1)[:count]
        return nibbles.to(torch.int8) - 8  # every byte decodes: levels -8..7


class SignCodec(BlockCodec):
    """One bit per value (its sign) and the block's mean magnitude: 1-bit compression as in
    signSGD / 1-bit Adam. Coarse: the error-feedback residual carries what it loses."""

    name = "sign"
    wire_dtype = torch.uint8
    bits = 1
    max_level = 1
    _weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)

    def _levels(self, blocks):
        count = blocks.ne(0).sum(dim=1).clamp_min(1)
        scales = blocks.abs().sum(dim=1) / count  # mean magnitude of the nonzero entries
        return torch.where(blocks < 0, -1, 1).to(torch.int8), scales

    def _pack(self, levels):
        bits = (levels > 0).to(torch.uint8)
        bits = _padded(bits, 8).view(-1, 8)
        return (bits * self._weights).sum(dim=1, dtype=torch.uint8)

    def _unpack(self, wire, count):
        bits = (wire.unsqueeze(1) & self._weights).ne(0).reshape(-1)[:count]
        return torch.where(bits, 1, -1).to(torch.int8)


def _padded(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -flat.numel() % multiple
    return torch.cat([flat, flat.new_zeros(extra)]) if extra else flat


VALUE_CODECS: dict[str, ValueCodec] = {
    codec.name: codec
    for codec in (
        Float32Codec(),
        Float16Codec(),
        BFloat16Codec(),
        Int8Codec(),
        Int4Codec(),
        SignCodec(),
    )
}


def get_value_codec(name: str) -> ValueCodec:
    """The codec registered under `name`; ValueError naming the choices otherwise."""
    try:
        return VALUE_CODECS[name]
    except KeyError:
        choices = ", ".join(sorted(VALUE_CODECS))
        raise ValueError(f"unknown value codec {name!r}; choose one of: {choices}") from None


def _check_registry() -> None:
    """Every codec class is registered under its own name (a codec written but not registered
    could never be read back, and a wire name without a class could never be decoded)."""
    classes = {cls for cls in _concrete_subclasses(ValueCodec)}
    registered = {type(codec) for codec in VALUE_CODECS.values()}
    missing = sorted(cls.__name__ for cls in classes - registered)
    if missing:
        raise RuntimeError(f"value codecs without a registered wire name: {missing}")
    for name, codec in VALUE_CODECS.items():
        if codec.name != name:
            raise RuntimeError(f"value codec {type(codec).__name__} registered as {name!r}")


def _concrete_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        if not getattr(sub, "__abstractmethods__", None) and getattr(sub, "name", None):
            out.append(sub)
        out.extend(_concrete_subclasses(sub))
    return out


_check_registry()
