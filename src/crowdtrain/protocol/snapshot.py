"""Model snapshots and published deltas: what a node downloads to hold the server's weights."""

from __future__ import annotations

import json

import torch

from crowdtrain.protocol import safetensors_io
from crowdtrain.protocol.errors import WireError
from crowdtrain.protocol.manifest import Manifest

SNAPSHOT_FORMAT = "crowdtrain.snapshot/1"
DELTAS_FORMAT = "crowdtrain.deltas/1"
SNAPSHOT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def encode_snapshot(
    params: dict[str, torch.Tensor], version: int, lineage: str, dtype: str = "fp32"
) -> bytes:
    """Parameters in `dtype` (fp32 is bit-exact; bf16/fp16 are for inference downloads)."""
    torch_dtype = SNAPSHOT_DTYPES[dtype]
    tensors = {name: p.to(torch_dtype) for name, p in params.items()}
    meta = {"format": SNAPSHOT_FORMAT, "version": str(version), "lineage": lineage, "dtype": dtype}
    return safetensors_io.dump(tensors, meta)


def decode_snapshot(raw: bytes, manifest: Manifest) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 parameters, metadata) from a snapshot, checked against the manifest."""
    header, meta = safetensors_io.read_header(raw)
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise WireError(400, "bad_snapshot", f"not a snapshot (format {meta.get('format')!r})")
    try:
        _version_of(meta.get("version"))
    except ValueError:
        raise WireError(400, "bad_snapshot", "snapshot metadata lacks a valid version") from None
    if set(header) != set(manifest.by_name):
        raise WireError(400, "bad_snapshot", "snapshot tensors do not match the manifest")
    tensors = safetensors_io.load(raw)
    for name, spec in manifest.by_name.items():
        if tuple(tensors[name].shape) != spec.shape:
            raise WireError(400, "bad_snapshot", f"snapshot tensor {name} has the wrong shape")
    params = {name: tensors[name].to(torch.float32) for name in manifest.by_name}
    return params, {
        "version": _version_of(meta.get("version")),
        "lineage": _lineage_of(meta, "bad_snapshot"),
    }


def encode_deltas(chain: list[tuple[int, dict[str, torch.Tensor]]], lineage: str) -> bytes:
    """A chain of published deltas; entry (v, d) turns version v-1 into v via `p.add_(d)`."""
    tensors = {f"{version}/{name}": d for version, deltas in chain for name, d in deltas.items()}
    versions = [version for version, _ in chain]
    meta = {"format": DELTAS_FORMAT, "lineage": lineage, "versions": json.dumps(versions)}
    return safetensors_io.dump(tensors, meta)


def decode_deltas(
    raw: bytes, manifest: Manifest
) -> tuple[list[tuple[int, dict[str, torch.Tensor]]], str]:
    """The chain in version order and its lineage, every tensor checked against the manifest."""
    header, meta = safetensors_io.read_header(raw)
    if meta.get("format") != DELTAS_FORMAT:
        raise WireError(400, "bad_deltas", f"not a delta chain (format {meta.get('format')!r})")
    try:
        versions = [_version_of(v) for v in json.loads(meta.get("versions", ""))]
    except (ValueError, TypeError):
        raise WireError(
            400,
            "bad_deltas",
            "delta chain metadata 'versions' must be a JSON list of version numbers",
        ) from None
    tensors = safetensors_io.load(raw) if header else {}
    chain = []
    for version in versions:
        deltas = {}
        for name, spec in manifest.by_name.items():
            tensor = tensors.get(f"{version}/{name}")
            if tensor is None or tuple(tensor.shape) != spec.shape:
                raise WireError(400, "bad_deltas", f"delta {version}/{name} missing or misshapen")
            deltas[name] = tensor
        chain.append((version, deltas))
    return chain, _lineage_of(meta, "bad_deltas")


def _version_of(value) -> int:
    """A version number from metadata; ValueError for anything but a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"bad version {value!r}")
    version = int(value)
    if version < 0:
        raise ValueError(f"bad version {value!r}")
    return version


def _lineage_of(meta: dict[str, str], code: str) -> str:
    lineage = meta.get("lineage")
    if not lineage:
        raise WireError(400, code, "metadata lacks the lineage of the weights")
    return lineage
