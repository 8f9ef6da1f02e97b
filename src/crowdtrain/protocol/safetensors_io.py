"""Bounded reading of safetensors containers from untrusted bytes (no pickle, no surprises)."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as _load
from safetensors.torch import save as _save

from crowdtrain.protocol.errors import WireError

MAX_HEADER_BYTES = 4 << 20


def dump(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialize CPU-contiguous copies of `tensors` with string metadata."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return _save(cpu, metadata=metadata)


def read_header(data: bytes, max_header: int = MAX_HEADER_BYTES) -> tuple[dict, dict[str, str]]:
    """Parse and check the JSON header: (tensor entries, metadata). Raises WireError (400/413)."""
    if len(data) < 8:
        raise WireError(400, "bad_container", "body is too short to be a safetensors container")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > max_header:
        raise WireError(
            413, "header_too_large", f"header is {header_len} bytes; the cap is {max_header}"
        )
    if 8 + header_len > len(data):
        raise WireError(400, "bad_container", "header length points past the end of the body")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd nesting
        raise WireError(400, "bad_container", f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError(400, "bad_container", "header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise WireError(400, "bad_metadata", "metadata must map strings to strings")
    return header, metadata


def load(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a container whose header was checked with read_header."""
    try:
        return _load(data)
    except Exception as exc:  # the parser's own errors carry the reason
        raise WireError(400, "bad_container", f"safetensors container is invalid: {exc}") from None
