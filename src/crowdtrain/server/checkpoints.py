"""Checkpoints: model, optimizer, coordinator state, tokenizer and config in one safetensors file.

One file per checkpoint, written atomically, so a crash leaves either the old set or the new
file complete. A checksum over every tensor catches a file that was truncated or corrupted
after the fact; such a file is skipped with a warning and the next newest one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from crowdtrain.files import write_atomic

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "crowdtrain.checkpoint/1"
_NAME = re.compile(r"^checkpoint-(\d{9})\.safetensors$")


@dataclass
class Checkpoint:
    """Everything needed to resume: copies, safe to write while training goes on."""

    version: int
    params: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    info: dict[str, Any]  # model config, settings, coordinator state, tokenizer JSON, ...
    downlink_residuals: dict[str, torch.Tensor] = field(default_factory=dict)  # not yet sent


class CorruptCheckpoint(Exception):
    pass


class CheckpointStore:
    """The checkpoint directory: save, list, load the newest valid one, prune to the last K."""

    def __init__(self, directory: Path, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, version: int) -> Path:
        return self.directory / f"checkpoint-{version:09d}.safetensors"

    def list(self) -> list[tuple[int, Path]]:
        """(version, path) of every checkpoint file, newest first."""
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found, reverse=True)

    def save(self, checkpoint: Checkpoint) -> Path:
        tensors, optimizer_meta = _flatten(checkpoint)
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "version": str(checkpoint.version),
            "info": json.dumps(checkpoint.info),
            "optimizer": json.dumps(optimizer_meta),
        }
        metadata["sha256"] = _digest(tensors, metadata)
        path = self.path_for(checkpoint.version)
        write_atomic(path, save_tensors(tensors, metadata=metadata))
        self.prune()
        return path

    def prune(self) -> None:
        for _, path in self.list()[self.keep :]:
            path.unlink(missing_ok=True)

    def load(self, path: Path) -> Checkpoint:
        try:
            data = path.read_bytes()
            tensors = load_tensors(data)
            metadata = _read_metadata(data)
        except Exception as exc:
            raise CorruptCheckpoint(f"{path.name}: unreadable ({exc})") from None
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise CorruptCheckpoint(f"{path.name}: not a crowdtrain checkpoint")
        if metadata.get("sha256") != _digest(tensors, metadata):
            raise CorruptCheckpoint(f"{path.name}: checksum mismatch (the file is corrupt)")
        params = _with_prefix(tensors, "model.")
        try:
            optimizer_state = _unflatten_optimizer(tensors, json.loads(metadata["optimizer"]))
            return Checkpoint(
                int(metadata["version"]),
                params,
                optimizer_state,
                json.loads(metadata["info"]),
                _with_prefix(tensors, "downlink."),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise CorruptCheckpoint(f"{path.name}: bad metadata ({exc})") from None

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint that reads back whole; corrupt ones are skipped with a warning."""
        for _, path in self.list():
            try:
                return self.load(path)
            except CorruptCheckpoint as exc:
                log.warning("skipping checkpoint %s", exc)
        return None


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _flatten(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {
        f"model.{name}": t.detach().cpu().contiguous() for name, t in checkpoint.params.items()
    }
    for name, residual in checkpoint.downlink_residuals.items():
        tensors[f"downlink.{name}"] = residual.detach().cpu().contiguous()
    state = checkpoint.optimizer_state
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, scalars in meta["scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    return {"state": state, "param_groups": meta["param_groups"]}


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the metadata (all but the digest itself) and every tensor's bytes."""
    hasher = hashlib.sha256()
    for key in sorted(k for k in metadata if k != "sha256"):
        hasher.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        hasher.update(name.encode())
        hasher.update(str(tensor.dtype).encode())
        hasher.update(str(list(tensor.shape)).encode())
        if tensor.numel():
            hasher.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def _read_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
