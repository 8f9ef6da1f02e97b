"""Model snapshots and published deltas: what a node downloads to hold the server's weights."""

from __future__ import annotations

import json

import torch

from crowdtrain.compression.codecs import ValueCodec, get_value_codec
from crowdtrain.compression.sparse import SparseDelta
from crowdtrain.protocol import safetensors_io
from crowdtrain.protocol.errors import WireError
from crowdtrain.protocol.manifest import Manifest
from crowdtrain.protocol.update import checked_deltas, group_tensor_names, wire_tensors

SNAPSHOT_FORMAT = "crowdtrain.snapshot/1"
DELTAS_FORMAT = "crowdtrain.deltas/2"
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


def encode_deltas(
    chain: list[tuple[int, dict[str, SparseDelta]]], lineage: str, value_codec: str
) -> bytes:
    """A chain of published deltas; entry (v, d) turns version v-1 into v (SparseDelta.add_to).

    Tensors are the update layout per version: `{v}/NAME.idx` + `{v}/NAME.val`, or
    `{v}/NAME.dense`, values in `value_codec`."""
    tensors: dict[str, torch.Tensor] = {}
    for version, deltas in chain:
        tensors.update(wire_tensors(deltas, prefix=f"{version}/", index_codec="delta"))
    versions = [version for version, _ in chain]
    meta = {
        "format": DELTAS_FORMAT,
        "lineage": lineage,
        "versions": json.dumps(versions),
        "value_codec": value_codec,
        "index_codec": "delta",
    }
    return safetensors_io.dump(tensors, meta)


def decode_deltas(
    raw: bytes, manifest: Manifest
) -> tuple[list[tuple[int, dict[str, SparseDelta]]], str, ValueCodec]:
    """(chain in version order, its lineage, its value codec), every tensor checked."""
    header, meta = safetensors_io.read_header(raw)
    if meta.get("format") != DELTAS_FORMAT:
        raise WireError(400, "bad_deltas", f"not a delta chain (format {meta.get('format')!r})")
    try:
        versions = [_version_of(v) for v in json.loads(meta.get("versions", ""))]
        codec = get_value_codec(meta.get("value_codec", ""))
        index_codec = meta.get("index_codec", "int32")
        if index_codec not in ("int32", "delta"):
            raise ValueError(index_codec)
    except (ValueError, TypeError):
        raise WireError(
            400,
            "bad_deltas",
            "delta chain metadata needs 'versions' (a JSON list of version numbers), a known "
            "'value_codec' and, if any, an 'index_codec' of int32 or delta",
        ) from None
    names_by_version: dict[int, list[str]] = {v: [] for v in versions}
    for tensor_name in header:
        version, _, name = tensor_name.partition("/")
        if not version.isdigit() or int(version) not in names_by_version:
            raise WireError(400, "bad_deltas", f"tensor {tensor_name!r} is not in the chain")
        names_by_version[int(version)].append(name)
    tensors = safetensors_io.load(raw) if header else {}
    chain = []
    for version in versions:
        groups = group_tensor_names(names_by_version[version], manifest)
        chain.append(
            (
                version,
                checked_deltas(
                    groups, tensors, manifest, codec, f"{version}/", index_codec=index_codec
                ),
            )
        )
    return chain, _lineage_of(meta, "bad_deltas"), codec


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
