"""Model bundles: one zip with the weights, the config and the tokenizer, to take a model away
from a server (or bring one to it) and load it anywhere with `load_bundle`.

A bundle holds exactly three members (docs/models.md):

- `model.safetensors`: the fp32 weights under their parameter names (tied weights once), with
  metadata `format` (crowdtrain.bundle/1), `version` and `lineage`; stored uncompressed, since
  trained fp32 weights barely compress and deflating gigabytes would hold the download up.
- `config.json`: `format`, `model` (the GPTConfig), `preset`, `version`, `lineage`,
  `chat_template` and `crowdtrain_version`.
- `tokenizer.json`: the tokenizer (HF tokenizers JSON).

`load_bundle` reads untrusted input: every size is capped before it is read, names and tensors
must be exactly the expected ones, and every problem is a BundleError that says what is wrong.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crowdtrain import __version__
from crowdtrain.data.chat import ChatTemplate
from crowdtrain.model.gpt import GPT, GPTConfig
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.protocol import safetensors_io
from crowdtrain.protocol.errors import WireError, validation_problems

BUNDLE_FORMAT: Final = "crowdtrain.bundle/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
MEMBERS = (WEIGHTS, CONFIG, TOKENIZER)
MAX_CONFIG_BYTES = 1 << 20  # config.json is a few hundred bytes
MAX_TOKENIZER_BYTES = 64 << 20  # a 50k-token BPE tokenizer is ~2 MB
HEADER_ALLOWANCE = 4 << 20  # model.safetensors: the tensor bytes plus at most this much header
DEFAULT_MAX_BYTES = 8 << 30  # everything unpacked, unless the caller caps it lower
COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the member and what is wrong."""


class BundleConfig(BaseModel):
    """config.json, parsed strictly: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["crowdtrain.bundle/1"]
    model: dict[str, Any]  # GPTConfig.to_dict()
    preset: str | None = Field(None, max_length=100)  # the preset the model was built from
    version: int = Field(ge=0)  # the training version the weights are from
    lineage: str = Field("", max_length=64)  # the server run it came from ("" if unknown)
    chat_template: dict[str, str]  # ChatTemplate.to_dict()
    crowdtrain_version: str = Field(max_length=100)  # the crowdtrain that wrote the bundle


@dataclass
class Bundle:
    model: GPT
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    info: BundleConfig

    @property
    def config(self) -> GPTConfig:
        return self.model.config


def write_bundle(
    params: Mapping[str, torch.Tensor],
    config: GPTConfig,
    tokenizer: Tokenizer,
    chat_template: ChatTemplate,
    *,
    version: int,
    lineage: str = "",
    preset: str | None = None,
) -> bytes:
    """The bundle of `params` (named as GPT.trainable_named_parameters, e.g. a coordinator
    snapshot) as zip bytes. The tensors are checked against `config` first."""
    _check_tensors(dict(params), config)
    info = BundleConfig(
        format=BUNDLE_FORMAT,
        model=config.to_dict(),
        preset=preset,
        version=version,
        lineage=lineage,
        chat_template=chat_template.to_dict(),
        crowdtrain_version=__version__,
    )
    metadata = {"format": BUNDLE_FORMAT, "version": str(version), "lineage": lineage}
    weights = safetensors_io.dump({n: t.to(torch.float32) for n, t in params.items()}, metadata)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(
            zipfile.ZipInfo(CONFIG, date_time=(1980, 1, 1, 0, 0, 0)),
            info.model_dump_json(indent=2),
            compress_type=zipfile.ZIP_DEFLATED,
        )
        archive.writestr(
            zipfile.ZipInfo(TOKENIZER, date_time=(1980, 1, 1, 0, 0, 0)),
            tokenizer.to_json(),
            compress_type=zipfile.ZIP_DEFLATED,
        )
        archive.writestr(
            zipfile.ZipInfo(WEIGHTS, date_time=(1980, 1, 1, 0, 0, 0)),
            weights,
            compress_type=zipfile.ZIP_STORED,
        )
    return buffer.getvalue()


def write_model_bundle(model: GPT, tokenizer: Tokenizer, chat_template: ChatTemplate, **info):
    """write_bundle of a GPT's own weights."""
    params = {name: p.detach() for name, p in model.trainable_named_parameters()}
    return write_bundle(params, model.config, tokenizer, chat_template, **info)


def load_bundle(
    source: bytes | Path | str | IO[bytes], max_bytes: int = DEFAULT_MAX_BYTES
) -> Bundle:
    """The model, tokenizer and chat template of a bundle (zip bytes, a path or a binary file).
    `max_bytes` caps the unpacked size of all members together. BundleError if anything is
    wrong."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as error:
        raise BundleError(
            f"not a bundle: the file is not a readable zip archive ({error})"
        ) from None
    with archive:
        members = _members(archive)
        info = _read_config(_read(archive, members[CONFIG], MAX_CONFIG_BYTES))
        config, template = _config_parts(info)
        tokenizer = _read_tokenizer(_read(archive, members[TOKENIZER], MAX_TOKENIZER_BYTES))
        if tokenizer.vocab_size > config.vocab_size:
            raise BundleError(
                f"{TOKENIZER}: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                f"model's vocab_size ({config.vocab_size})"
            )
        # from the config's numbers first: a config of a million layers is refused unbuilt
        weights_cap = parameter_count(config) * 4 + HEADER_ALLOWANCE
        used = members[CONFIG].file_size + members[TOKENIZER].file_size
        if weights_cap > max_bytes - used:
            raise BundleError(
                f"{CONFIG}: the model it describes needs {weights_cap} bytes of weights, over "
                f"the cap of {max_bytes - used} bytes for this bundle"
            )
        expected = _expected_shapes(config)
        params = _read_weights(_read(archive, members[WEIGHTS], weights_cap), info, expected)
    return Bundle(model_from_params(config, params), tokenizer, template, info)


def model_from_params(config: GPTConfig, params: Mapping[str, torch.Tensor]) -> GPT:
    """A GPT of `config` holding `params` (the tensors themselves, not copies), in eval mode.
    Built on the meta device, so the random initialization is skipped."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # to_empty unties the shared weight
    _check_tensors(dict(params), config)
    for name, param in model.trainable_named_parameters():
        param.data = params[name].detach().to(torch.float32)
    return model.eval()


# ---- reading, one check at a time ----------------------------------------------------------


def _members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The three members by name; refuses any other member, a duplicate, an encrypted one or
    one compressed with anything but store/deflate."""
    found: dict[str, zipfile.ZipInfo] = {}
    for member in archive.infolist():
        name = member.filename
        if name not in MEMBERS:
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise BundleError(
                f"unexpected member {shown!r} in the bundle; a bundle holds only "
                f"{', '.join(MEMBERS)}, at the top level"
            )
        if name in found:
            raise BundleError(f"the bundle holds {name} twice")
        if member.flag_bits & 0x1:
            raise BundleError(f"{name} is encrypted; bundles are not")
        if member.compress_type not in COMPRESSIONS:
            raise BundleError(
                f"{name} is compressed with method {member.compress_type}; "
                "bundles use store or deflate"
            )
        found[name] = member
    missing = [name for name in MEMBERS if name not in found]
    if missing:
        raise BundleError(f"the bundle lacks {', '.join(missing)}")
    return found


def _read(archive: zipfile.ZipFile, member: zipfile.ZipInfo, cap: int) -> bytes:
    """A member's bytes, never more than `cap` of them (whatever its header claims)."""
    if member.file_size > cap:
        raise BundleError(
            f"{member.filename} unpacks to {member.file_size} bytes, over its cap of {cap} bytes"
        )
    try:
        with archive.open(member) as handle:
            data = handle.read(cap + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise BundleError(f"{member.filename} cannot be read: {error}") from None
    if len(data) > cap:
        raise BundleError(f"{member.filename} unpacks to more than its cap of {cap} bytes")
    return data


def _read_config(raw: bytes) -> BundleConfig:
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise BundleError(f"{CONFIG} is not UTF-8 JSON: {error}") from None
    if isinstance(document, dict) and document.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{CONFIG}: format is {document.get('format')!r}; this crowdtrain reads "
            f"{BUNDLE_FORMAT!r} bundles"
        )
    try:
        return BundleConfig.model_validate(document)
    except ValidationError as error:
        raise BundleError(f"{CONFIG}: {validation_problems(error.errors(), 'config')}") from None


def _config_parts(info: BundleConfig) -> tuple[GPTConfig, ChatTemplate]:
    try:
        config = GPTConfig.from_dict(info.model)
    except (TypeError, ValueError) as error:
        raise BundleError(f"{CONFIG}: model: {error}") from None
    try:
        template = ChatTemplate.from_dict(info.chat_template)
    except (TypeError, ValueError) as error:
        raise BundleError(f"{CONFIG}: chat_template: {error}") from None
    return config, template


def _read_tokenizer(raw: bytes) -> Tokenizer:
    try:
        return Tokenizer.from_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise BundleError(f"{TOKENIZER}: {error}") from None


def _read_weights(
    raw: bytes, info: BundleConfig, expected: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    try:
        header, metadata = safetensors_io.read_header(raw)
    except WireError as error:
        raise BundleError(f"{WEIGHTS}: {error.message}") from None
    if metadata.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{WEIGHTS}: format is {metadata.get('format')!r}, not {BUNDLE_FORMAT!r}")
    if metadata.get("version") != str(info.version):
        raise BundleError(
            f"{WEIGHTS} is of version {metadata.get('version')!r} but {CONFIG} says {info.version}"
        )
    if metadata.get("lineage", "") != info.lineage:
        raise BundleError(f"{WEIGHTS} and {CONFIG} name different lineages")
    _check_names(set(header), expected)
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") != "F32":
            dtype = entry.get("dtype") if isinstance(entry, dict) else entry
            raise BundleError(f"{WEIGHTS}: {name} is {dtype}; bundles hold fp32 (F32) weights")
    try:
        tensors = safetensors_io.load(raw)
    except WireError as error:
        raise BundleError(f"{WEIGHTS}: {error.message}") from None
    _check_shapes(tensors, expected)
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise BundleError(f"{WEIGHTS}: {name} holds NaN or infinite values")
    return tensors


# ---- the tensors a config calls for --------------------------------------------------------


def _expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, however big the config
        model = GPT(config)
    return {name: tuple(p.shape) for name, p in model.trainable_named_parameters()}


def parameter_count(config: GPTConfig) -> int:
    """The number of weights a bundle of `config` holds (tied weights once), by arithmetic."""
    width, bias = config.n_embd, int(config.bias)
    layer_norm = width * (1 + bias)
    attention = 3 * width * width + 3 * width * bias + width * width + width * bias
    mlp = 4 * width * width + 4 * width * bias + 4 * width * width + width * bias
    per_layer = 2 * layer_norm + attention + mlp
    embeddings = (config.vocab_size + config.block_size) * width
    return embeddings + config.n_layer * per_layer + layer_norm


def _check_tensors(params: dict[str, torch.Tensor], config: GPTConfig) -> None:
    expected = _expected_shapes(config)
    _check_names(set(params), expected)
    _check_shapes(params, expected)


def _check_names(names: set[str], expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    problems = []
    if missing:
        problems.append(f"lacks {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        shown = ", ".join(name[:80] for name in unexpected[:5])
        problems.append(
            f"has tensors the model does not: {shown}" + (" ..." if len(unexpected) > 5 else "")
        )
    if problems:
        raise BundleError(f"{WEIGHTS} does not match the config: it {'; it '.join(problems)}")


def _check_shapes(params: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    for name, shape in expected.items():
        actual = tuple(params[name].shape)
        if actual != shape:
            raise BundleError(
                f"{WEIGHTS}: {name} has shape {list(actual)}; the config calls for {list(shape)}"
            )
