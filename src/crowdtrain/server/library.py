"""The models a server offers for download and chat: its current weights, the checkpoints it
keeps, and the bundles an admin imported (DATA_DIR/models/NAME/, docs/models.md).

Model ids: `current`, `vN` (the kept checkpoint of version N) and `imported:NAME`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crowdtrain.data.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate
from crowdtrain.files import fsync_directory, write_atomic
from crowdtrain.model.bundle import BundleError, load_bundle, model_from_params, write_bundle
from crowdtrain.model.gpt import GPT, GPTConfig
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.protocol.errors import WireError
from crowdtrain.server.checkpoints import CorruptCheckpoint

if TYPE_CHECKING:
    from crowdtrain.server.runtime import ServerRuntime

log = logging.getLogger(__name__)

MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
MODEL_ID_PATTERN = rf"^(current|v[0-9]{{1,12}}|imported:{MODEL_NAME_PATTERN})$"
IMPORTED = "imported:"
BUNDLE_FILE = "bundle.zip"  # an imported bundle, kept as it was uploaded
RECORD_FILE = "imported.json"  # what the list shows of it, written at import
STAGING_PREFIX = ".staging-"  # an import or a removal under way; gone at the next start


@dataclass
class LoadedModel:
    """A model ready to generate with, and what it is."""

    id: str
    version: int
    model: GPT
    tokenizer: Tokenizer
    chat_template: ChatTemplate


def unknown_model(model_id: str, why: str = "") -> WireError:
    return WireError(
        404,
        "unknown_model",
        f"no model {model_id!r} on this server{why}; GET /api/v1/models lists them",
    )


class ModelLibrary:
    """Lists, bundles, loads, imports and removes models. Thread-safe: imports and removals are
    directory renames, and a checkpoint pruned meanwhile is answered 404."""

    def __init__(self, runtime: ServerRuntime):
        self.runtime = runtime
        self.directory = runtime.data_dir / "models"
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(STAGING_PREFIX + "*"):  # cut short by a stop
            shutil.rmtree(leftover, ignore_errors=True)

    # ---- what there is ----

    def list(self) -> list[dict[str, Any]]:
        """Current, then the kept checkpoints (newest first), then imported models by name."""
        runtime = self.runtime
        parameters = runtime.manifest.numel
        models: list[dict[str, Any]] = [
            {
                "id": "current",
                "kind": "current",
                "version": runtime.coordinator.version,
                "parameters": parameters,
            }
        ]
        for version, path in runtime.checkpoints.list():
            try:
                created_at = path.stat().st_mtime
            except FileNotFoundError:  # pruned just now
                continue
            models.append(
                {
                    "id": f"v{version}",
                    "kind": "checkpoint",
                    "version": version,
                    "created_at": created_at,
                    "parameters": parameters,
                }
            )
        for folder in sorted(self.directory.iterdir()):
            record = self._record(folder.name) if not folder.name.startswith(".") else None
            if record is not None:
                models.append(record)
        return models

    def cache_key(self, model_id: str) -> str:
        """A key that changes when the model behind `model_id` does (a checkpoint written
        anew, a name imported again); 404 for a model that is not here."""
        if model_id == "current":
            return model_id
        if model_id.startswith(IMPORTED):
            name = model_id.removeprefix(IMPORTED)
            record = self._record(name)
            if record is None:
                raise unknown_model(model_id)
            return f"{model_id}@{record['imported_at']}"
        path = self._checkpoint_path(model_id)
        try:
            return f"{model_id}@{path.stat().st_mtime_ns}"
        except FileNotFoundError:
            raise unknown_model(model_id, " (its checkpoint was just pruned)") from None

    # ---- download ----

    def bundle(self, model_id: str) -> tuple[bytes, int]:
        """The bundle of a model (zip bytes) and its version. Blocking: call off the event loop."""
        runtime = self.runtime
        if model_id == "current":
            version, params = runtime.coordinator.snapshot()
            zipped = write_bundle(
                params,
                runtime.config,
                runtime.tokenizer,
                runtime.chat_template,
                version=version,
                lineage=runtime.coordinator.lineage,
                preset=runtime.settings.model,
            )
            return zipped, version
        if model_id.startswith(IMPORTED):
            name = model_id.removeprefix(IMPORTED)
            record = self._record(name)
            try:
                if record is None:
                    raise FileNotFoundError
                return (self.directory / name / BUNDLE_FILE).read_bytes(), record["version"]
            except FileNotFoundError:
                raise unknown_model(model_id) from None
        checkpoint = self._checkpoint(model_id)
        info = checkpoint.info
        zipped = write_bundle(
            checkpoint.params,
            GPTConfig.from_dict(info["model_config"]),
            Tokenizer.from_json(info["tokenizer"]),
            _template(info),
            version=checkpoint.version,
            preset=info.get("settings", {}).get("model"),
        )
        return zipped, checkpoint.version

    # ---- chat ----

    def load(self, model_id: str) -> LoadedModel:
        """A model to generate with (its own copy of the weights). Blocking."""
        runtime = self.runtime
        if model_id == "current":
            version, params = runtime.coordinator.snapshot()  # copies, taken under its lock
            model = model_from_params(runtime.config, params)
            return LoadedModel(model_id, version, model, runtime.tokenizer, runtime.chat_template)
        if model_id.startswith(IMPORTED):
            path = self.directory / model_id.removeprefix(IMPORTED) / BUNDLE_FILE
            try:
                bundle = load_bundle(path)
            except BundleError as error:
                if not path.exists():  # removed meanwhile
                    raise unknown_model(model_id) from None
                # it loaded at import: the file was changed since
                raise WireError(
                    410, "model_unreadable", f"{model_id} cannot be loaded any more: {error}"
                ) from None
            return LoadedModel(
                model_id, bundle.info.version, bundle.model, bundle.tokenizer, bundle.chat_template
            )
        checkpoint = self._checkpoint(model_id)
        info = checkpoint.info
        model = model_from_params(GPTConfig.from_dict(info["model_config"]), checkpoint.params)
        tokenizer = Tokenizer.from_json(info["tokenizer"])
        return LoadedModel(model_id, checkpoint.version, model, tokenizer, _template(info))

    # ---- imported models ----

    def staging(self) -> Path:
        """A new folder to receive an upload in; import_bundle moves it into place."""
        folder = self.directory / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        folder.mkdir()
        return folder

    def check_free(self, name: str) -> None:
        if (self.directory / name).exists():
            raise WireError(
                409,
                "model_exists",
                f"an imported model is already called {name!r}: pick another name, or remove "
                f"it first (DELETE /api/v1/models/{IMPORTED}{name})",
            )

    def import_bundle(self, name: str, staging: Path, max_bytes: int) -> dict[str, Any]:
        """Validate the bundle in `staging`/bundle.zip and make it model `imported:NAME`, whole
        or not at all. 422 bad_bundle for a bundle that does not load, 409 for a taken name."""
        self.check_free(name)
        try:
            bundle = load_bundle(staging / BUNDLE_FILE, max_bytes=max_bytes)
        except BundleError as error:
            raise WireError(
                422, "bad_bundle", f"the upload is not a usable bundle: {error}"
            ) from None
        record = {
            "id": IMPORTED + name,
            "kind": "imported",
            "name": name,
            "version": bundle.info.version,
            "imported_at": time.time(),
            "parameters": sum(p.numel() for _, p in bundle.model.trainable_named_parameters()),
            "preset": bundle.info.preset,
            "bytes": (staging / BUNDLE_FILE).stat().st_size,
        }
        write_atomic(staging / RECORD_FILE, json.dumps(record, indent=2))
        fsync_directory(staging)
        try:
            os.rename(staging, self.directory / name)  # refused onto a folder with files in it
        except OSError:
            self.check_free(name)
            raise
        fsync_directory(self.directory)
        return record

    def remove(self, model_id: str) -> dict[str, Any]:
        """Remove an imported model; what it was."""
        if not model_id.startswith(IMPORTED):
            raise WireError(
                422,
                "not_imported",
                f"only imported models can be removed; {model_id!r} is not one "
                "(checkpoints go as newer ones are written: keep_checkpoints)",
            )
        name = model_id.removeprefix(IMPORTED)
        record = self._record(name)
        if record is None:
            raise unknown_model(model_id)
        doomed = self.directory / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(self.directory / name, doomed)  # gone for readers at once
        except FileNotFoundError:
            raise unknown_model(model_id) from None
        fsync_directory(self.directory)
        shutil.rmtree(doomed, ignore_errors=True)
        return record

    # ---- helpers ----

    def _record(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.directory / name / RECORD_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as error:
            log.warning("ignoring the imported model %s: %s", name, error)
            return None

    def _checkpoint_path(self, model_id: str) -> Path:
        version = int(model_id.removeprefix("v"))
        for found, path in self.runtime.checkpoints.list():
            if found == version:
                return path
        raise unknown_model(model_id, f" (no checkpoint of version {version} is kept)")

    def _checkpoint(self, model_id: str):
        path = self._checkpoint_path(model_id)
        try:
            return self.runtime.checkpoints.load(path)
        except CorruptCheckpoint as error:
            if not path.exists():
                raise unknown_model(model_id, " (its checkpoint was just pruned)") from None
            raise WireError(410, "model_unreadable", f"{model_id}: {error}") from None


def _template(info: dict[str, Any]) -> ChatTemplate:
    saved = info.get("chat_template")
    return ChatTemplate.from_dict(saved) if saved else DEFAULT_CHAT_TEMPLATE
