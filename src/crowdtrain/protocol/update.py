"""The update wire format: encode a node's sparse update, decode and check one strictly.

Layout (docs/wire-format.md): a safetensors container, compressed as a whole (zstd by
default). Per parameter either `NAME.idx` (sorted int32) + `NAME.val`, or `NAME.dense`, and
`NAME.scale` for block codecs (int8, int4, sign). The metadata carries the format version,
value codec and the submission facts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crowdtrain.compression.codecs import ValueCodec, get_value_codec
from crowdtrain.compression.sparse import SparseDelta
from crowdtrain.protocol import encoding, safetensors_io
from crowdtrain.protocol.errors import WireError, validation_problems
from crowdtrain.protocol.manifest import Manifest

UPDATE_FORMAT = "crowdtrain.update/1"
UPDATE_KINDS = ("gradient", "pseudo_gradient")
SUFFIXES = ("idx", "val", "dense", "scale")


MAX_LEASES_PER_UPDATE = 64


class UpdateMeta(BaseModel):
    """Submission facts a node declares; parsed strictly (untrusted input never stays a dict)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    value_codec: str
    kind: str = "gradient"
    base_version: int = Field(ge=0)
    lineage: str = Field(min_length=1, max_length=64)
    samples: int = Field(gt=0, le=1 << 40)
    tokens: int = Field(ge=0, le=1 << 50)
    loss: float
    update_id: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    # how NAME.idx is written: "int32", the sorted positions themselves; "delta", the first
    # position then the gaps to the next (small numbers: zstd packs them ~2x tighter, 27-40%
    # fewer bytes for a whole update)
    index_codec: Literal["int32", "delta"] = "int32"
    # the node's own link measurements (docs/compression.md), shown in the node list
    upload_bytes_per_s: float | None = Field(None, ge=0, le=1e12)
    rtt_s: float | None = Field(None, ge=0, le=3600)
    # the shard leases this update finishes, comma-separated (docs/data.md); they enter the
    # epoch ledger when the update's round is applied
    leases: str = Field("", max_length=33 * MAX_LEASES_PER_UPDATE, pattern=r"^[0-9a-f,]*$")
    # "local": computed on the node's own files (--data), not on leased shards
    data_source: Literal["server", "local"] = "server"
    # the node's submission counter: each update carries a higher one than the last (a replayed
    # or reordered submission is refused; docs/security.md)
    seq: int | None = Field(None, ge=1, le=1 << 62)

    @property
    def lease_ids(self) -> list[str]:
        return [lease for lease in self.leases.split(",") if lease]

    @field_validator("leases")
    @classmethod
    def _lease_ids(cls, value: str) -> str:
        ids = [lease for lease in value.split(",") if lease]
        if any(len(lease) != 32 for lease in ids) or len(set(ids)) != len(ids):
            raise ValueError("leases must be distinct 32-character lease ids, comma-separated")
        return ",".join(ids)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != UPDATE_FORMAT:
            raise ValueError(f"unsupported update format {value!r}; expected {UPDATE_FORMAT!r}")
        return value

    @field_validator("value_codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        get_value_codec(value)
        return value

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value not in UPDATE_KINDS:
            raise ValueError(f"unknown update kind {value!r}; expected one of {UPDATE_KINDS}")
        return value

    @field_validator("loss")
    @classmethod
    def _finite_loss(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("loss must be a finite number")
        return value

    def to_wire(self) -> dict[str, str]:
        fields = self.model_dump(exclude_none=True)
        for key, default in (("leases", ""), ("data_source", "server")):
            if fields[key] == default:  # unsaid: servers before leases refuse unknown keys
                del fields[key]
        return {k: str(v) for k, v in fields.items()}


@dataclass
class DecodedUpdate:
    meta: UpdateMeta
    deltas: dict[str, SparseDelta]
    wire_bytes: int
    raw_bytes: int

    @property
    def nnz(self) -> int:
        return sum(d.nnz for d in self.deltas.values())


@dataclass(frozen=True)
class IntakeLimits:
    """Caps checked before any work: compressed body and decompressed container sizes."""

    max_body_bytes: int
    max_raw_bytes: int

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> IntakeLimits:
        # The largest honest update is fully dense fp32 or int32+fp32 per entry; allow header room.
        raw = manifest.numel * 8 + (1 << 20) + 512 * len(manifest.params)
        return cls(max_body_bytes=raw + raw // 64 + (1 << 16), max_raw_bytes=raw)


def encode_update(
    deltas: dict[str, SparseDelta], meta: UpdateMeta, content_encoding: str = "zstd"
) -> bytes:
    raw = safetensors_io.dump(wire_tensors(deltas, index_codec=meta.index_codec), meta.to_wire())
    return encoding.compress(raw, content_encoding)


def decode_update(
    body: bytes, content_encoding: str | None, manifest: Manifest, limits: IntakeLimits
) -> DecodedUpdate:
    """Decode untrusted bytes into a checked update, or raise WireError. Pure: touches no state."""
    if len(body) > limits.max_body_bytes:
        raise WireError(
            413, "too_large", f"body is {len(body)} bytes; the cap is {limits.max_body_bytes}"
        )
    raw = encoding.decompress(body, content_encoding, limits.max_raw_bytes)
    header, metadata = safetensors_io.read_header(raw)
    meta = _parse_meta(metadata)
    codec = get_value_codec(meta.value_codec)
    if not header:
        raise WireError(422, "empty_update", "update carries no tensors")
    groups = group_tensor_names(header, manifest)
    deltas = checked_deltas(
        groups, safetensors_io.load(raw), manifest, codec, index_codec=meta.index_codec
    )
    return DecodedUpdate(meta=meta, deltas=deltas, wire_bytes=len(body), raw_bytes=len(raw))


def checked_deltas(
    groups: dict[str, set[str]],
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    codec: ValueCodec,
    prefix: str = "",
    index_codec: str = "int32",
) -> dict[str, SparseDelta]:
    """Per parameter, the delta its tensors (named `prefix + NAME.suffix`) carry, checked:
    layout, dtypes, shapes, index range and order, finiteness, scales. Raises WireError."""
    deltas: dict[str, SparseDelta] = {}
    scale = {"scale"} if codec.has_scales else set()
    for name, suffixes in groups.items():
        spec = manifest.by_name[name]
        if suffixes == {"dense"} | scale:
            values = tensors[f"{prefix}{name}.dense"]
            shape = codec.wire_shape(spec.numel, spec.shape)
            _check_values(f"{name}.dense", values, codec, shape)
            indices, count = None, spec.numel
        elif suffixes == {"idx", "val"} | scale:
            indices, values = tensors[f"{prefix}{name}.idx"], tensors[f"{prefix}{name}.val"]
            if index_codec == "delta":
                indices = _absolute_indices(indices, name)
            _check_indices(name, indices, spec.numel)
            count = indices.numel()
            _check_values(f"{name}.val", values, codec, codec.wire_shape(count))
        else:
            expected = " + ".join(f".{s}" for s in sorted(scale))
            raise WireError(
                400,
                "bad_layout",
                f"parameter {name!r} must carry either .idx and .val or .dense"
                + (f", each with {expected} (codec {codec.name})" if scale else "")
                + f"; got {sorted('.' + s for s in suffixes)}",
            )
        scales = tensors[f"{prefix}{name}.scale"] if scale else None
        if scales is not None:
            _check_scales(name, scales, codec.scales_shape(count), codec.max_scale)
        deltas[name] = SparseDelta(indices, values, scales, codec, count)
    return deltas


def wire_tensors(
    deltas: dict[str, SparseDelta], prefix: str = "", index_codec: str = "int32"
) -> dict[str, torch.Tensor]:
    """The wire tensors of a set of deltas: NAME.idx + NAME.val, or NAME.dense, and NAME.scale
    for block codecs."""
    tensors: dict[str, torch.Tensor] = {}
    for name, delta in deltas.items():
        if delta.indices is None:
            tensors[f"{prefix}{name}.dense"] = delta.values
        else:
            indices = delta.indices.to(torch.int32)
            if index_codec == "delta" and indices.numel() > 1:
                indices = torch.cat([indices[:1], indices[1:] - indices[:-1]])
            tensors[f"{prefix}{name}.idx"] = indices
            tensors[f"{prefix}{name}.val"] = delta.values
        if delta.scales is not None:
            tensors[f"{prefix}{name}.scale"] = delta.scales
    return tensors


def _absolute_indices(gaps: torch.Tensor, name: str) -> torch.Tensor:
    """Positions from delta-coded indices (first position, then gaps). A negative or zero gap
    makes them unsorted, which the usual checks then refuse; a sum past int32 is out of range."""
    if gaps.dtype != torch.int32 or gaps.dim() != 1 or gaps.numel() < 2:
        return gaps  # the usual checks name what is wrong
    positions = torch.cumsum(gaps.to(torch.int64), dim=0)
    low, high = int(positions.min()), int(positions.max())
    _expect(
        low >= 0 and high < 2**31,
        "index_out_of_range",
        f"{name}.idx (delta-coded) adds up to positions outside [0, 2^31)",
    )
    return positions.to(torch.int32)


def _expect(condition: bool, code: str, message: str) -> None:
    if not condition:
        raise WireError(422, code, message)


def _parse_meta(metadata: dict[str, str]) -> UpdateMeta:
    try:
        return UpdateMeta.model_validate(metadata)
    except ValidationError as exc:
        problems = validation_problems(exc.errors(), "metadata")
        raise WireError(422, "bad_metadata", f"update metadata is invalid: {problems}") from None


def group_tensor_names(names, manifest: Manifest) -> dict[str, set[str]]:
    """{parameter: its suffixes} for tensor names NAME.idx / NAME.val / NAME.dense."""
    groups: dict[str, set[str]] = {}
    for tensor_name in names:
        name, _, suffix = tensor_name.rpartition(".")
        if suffix not in SUFFIXES or name not in manifest.by_name:
            raise WireError(
                422,
                "unknown_tensor",
                f"tensor {tensor_name!r} does not name a model parameter as NAME.idx, NAME.val "
                "or NAME.dense, with NAME.scale for block codecs (see GET /api/v1/model/manifest)",
            )
        groups.setdefault(name, set()).add(suffix)
    return groups


def _check_indices(name: str, indices: torch.Tensor, numel: int) -> None:
    _expect(
        indices.dtype == torch.int32,
        "bad_dtype",
        f"{name}.idx has dtype {indices.dtype}; indices must be int32",
    )
    _expect(indices.dim() == 1, "bad_shape", f"{name}.idx must be 1-D")
    _expect(
        indices.numel() <= numel,
        "bad_shape",
        f"{name} carries {indices.numel()} entries; the parameter has only {numel}",
    )
    if indices.numel():
        _expect(
            int(indices[0]) >= 0 and int(indices[-1]) < numel,
            "index_out_of_range",
            f"{name}.idx must lie in [0, {numel}); got first {int(indices[0])}, last "
            f"{int(indices[-1])}",
        )
        flat = indices.numpy()  # numpy: single-threaded, far cheaper than torch on a busy box
        _expect(
            bool((flat[1:] > flat[:-1]).all()),
            "unsorted_indices",
            f"{name}.idx must be strictly increasing (sorted, no duplicates)",
        )


def _check_values(
    label: str, values: torch.Tensor, codec: ValueCodec, shape: tuple[int, ...]
) -> None:
    _expect(
        values.dtype == codec.wire_dtype,
        "bad_dtype",
        f"{label} has dtype {values.dtype}; codec {codec.name} sends {codec.wire_dtype}",
    )
    _expect(
        tuple(values.shape) == tuple(shape),
        "bad_shape",
        f"{label} has shape {list(values.shape)}; codec {codec.name} sends {list(shape)} here "
        "(for .val: one entry per index)",
    )
    if values.dtype.is_floating_point:
        _check_finite(label, values)


def _check_scales(
    name: str, scales: torch.Tensor, shape: tuple[int, ...] | None, max_scale: float
) -> None:
    label = f"{name}.scale"
    _expect(
        scales.dtype == torch.float32,
        "bad_dtype",
        f"{label} has dtype {scales.dtype}; scales must be float32",
    )
    _expect(
        tuple(scales.shape) == tuple(shape or ()),
        "bad_shape",
        f"{label} has shape {list(scales.shape)}; expected {list(shape or ())} (one per block)",
    )
    _check_finite(label, scales)
    _expect(
        bool((scales.numpy() > 0).all()),
        "bad_scale",
        f"{label} must be positive; a zero or negative scale is never sent by an honest node",
    )
    _expect(
        bool((scales.numpy() <= max_scale).all()),
        "bad_scale",
        f"{label} must be at most {max_scale:.4g}: a larger scale decodes to infinity",
    )


def _check_finite(name: str, values: torch.Tensor) -> None:
    _expect(_all_finite(values), "not_finite", f"{name} contains NaN or infinite values")


def _all_finite(values: torch.Tensor) -> bool:
    if values.dtype == torch.bfloat16:  # numpy has no bf16: all exponent bits set is inf/NaN
        exponent = values.reshape(-1).view(torch.int16).numpy() & 0x7F80
        return bool((exponent != 0x7F80).all())
    return bool(np.isfinite(values.reshape(-1).numpy()).all())
