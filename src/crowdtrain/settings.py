"""Settings for the server and the node: CROWDTRAIN_* environment variables and a TOML file.

Priority, highest first: command-line flags, environment variables, the TOML file, defaults.
An unknown key or a bad value fails at start with a message that names it.
"""

from __future__ import annotations

import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "CROWDTRAIN_CONFIG"
SERVER_URL_ENV = "CROWDTRAIN_SERVER"  # read by the admin commands (admin_cli.py), not a setting
# A node's name, as NodeSettings takes it and the server accepts it in X-Crowdtrain-Node
NODE_NAME_CHARS = "A-Za-z0-9._-"
NODE_NAME_MAX = 64
NODE_NAME_PATTERN = rf"[{NODE_NAME_CHARS}]{{1,{NODE_NAME_MAX}}}"  # a node name or id, whole
_toml_values: ContextVar[dict[str, Any]] = ContextVar("toml_values")


class SettingsError(ValueError):
    """A configuration problem, worded for the person who wrote the configuration."""


class _TomlSource(PydanticBaseSettingsSource):
    """Values from the [server] or [node] table of the TOML file, lowest priority."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_values.get({}))


class _Settings(BaseSettings):
    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, env_settings, _TomlSource(settings_cls))


class ServerSettings(_Settings):
    """What the coordinator server trains and how it runs its rounds."""

    model_config = SettingsConfigDict(env_prefix="CROWDTRAIN_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    data_dir: Path = Field(Path("crowdtrain-data"), description="checkpoints, tokenizer, logs")
    model: str = Field("tiny", description="model preset: tiny, small, gpt2-124m, gpt2-350m")
    vocab_size: int | None = Field(None, ge=260, le=1 << 20, description="tokenizer vocab size")
    block_size: int | None = Field(None, ge=8, le=1 << 16, description="context length")
    seed: int = Field(0, description="seed for the initial weights")
    algorithm: Literal["sync", "diloco"] = Field(
        "sync",
        description="sync: nodes send gradients; diloco: nodes send the change of "
        "inner_steps local AdamW steps, the server steps Nesterov SGD on it",
    )
    inner_steps: int = Field(50, ge=1, le=100_000, description="diloco: local steps per update")
    inner_lr: float = Field(1e-3, gt=0, le=10, description="diloco: nodes' inner AdamW lr")
    outer_lr: float = Field(0.7, gt=0, le=10, description="diloco: server's Nesterov SGD lr")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="diloco: its momentum")
    optimizer: str = Field("adamw", description="server optimizer: adamw, nesterov")
    lr: float = Field(1e-3, gt=0, le=10, description="peak learning rate of the server optimizer")
    weight_decay: float = Field(0.1, ge=0, le=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    warmup_versions: int = Field(20, ge=0, description="linear warm-up length in versions")
    decay_versions: int | None = Field(None, ge=1, description="cosine decay horizon; None: flat")
    grad_clip: float = Field(1.0, ge=0, description="clip the combined gradient norm; 0: off")
    aggregator: str = Field("mean", description="how updates are combined: mean")
    min_nodes: int = Field(1, ge=1, description="quorum: distinct nodes that close a round")
    round_deadline_s: float = Field(
        10.0,
        gt=0,
        description="a round closes this long after its first update even without quorum",
    )
    max_staleness: int = Field(4, ge=0, description="oldest base version accepted, in versions")
    max_pending_updates: int = Field(
        64, ge=1, description="accepted updates waiting to be aggregated before new ones get 503"
    )
    max_pending_per_node: int = Field(
        2, ge=1, description="of those, at most this many from one node"
    )
    max_update_mb: float | None = Field(
        None, gt=0, description="cap on an update body; None: derived from the model size"
    )
    downlink_density: float = Field(
        1.0,
        gt=0,
        le=1,
        description="fraction of each published step's entries sent to nodes "
        "(top-k with the server's error feedback); 1: the whole step",
    )
    downlink_value_codec: str = Field("fp32", description="value codec of published deltas")
    density_cap: float = Field(
        1.0,
        gt=0,
        le=1,
        description="the densest update a node may send (fraction of entries); the server "
        "refuses denser ones and halves this advice while its queue is over half full",
    )
    dataset: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="train on this dataset of the store (see `crowdtrain data`); unset: the "
        "embedded corpus, imported as the dataset 'pydoc-topics'",
    )
    objective: Literal["pretrain", "sft"] = Field(
        "pretrain",
        description="pretrain: next-token loss on the train split; sft: supervised "
        "fine-tuning on the annotated split, loss on response tokens only",
    )
    shard_tokens: int = Field(
        65536, ge=256, le=1 << 28, description="tokens per training shard a node leases"
    )
    lease_ttl_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="a shard lease not renewed for this long goes back to the pool",
    )
    allow_local_data: bool = Field(
        True, description="accept updates from nodes that train on their own files (--data)"
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy database URL; unset: a SQLite file in data_dir"
    )
    max_upload_mb: float = Field(
        1024, gt=0, description="largest data file accepted by the HTTP upload endpoint"
    )
    max_chat_streams: int = Field(
        2, ge=1, le=64, description="chat replies generated at once (POST /chat); more get 429"
    )
    # ---- security (docs/security.md, docs/deployment.md) ----
    admin_token: SecretStr | None = Field(
        None,
        description="an admin token to accept (ct_admin_...); unset: one is made at first "
        "start and printed once",
    )
    jwt_secret: SecretStr | None = Field(
        None,
        description="secret that signs node access tokens; unset: a random one kept in "
        "data_dir/secrets",
    )
    access_token_ttl_s: float = Field(
        900, ge=10, le=86400, description="lifetime of a node's access token (it renews it)"
    )
    public_dashboard: bool = Field(
        False, description="let anyone read what viewers read (info, history, data status)"
    )
    tls_cert: Path | None = Field(None, description="PEM certificate (chain) to serve HTTPS/WSS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    self_signed: bool = Field(
        False,
        description="serve HTTPS with a development certificate made in data_dir/tls "
        "(nodes pin its SHA-256 fingerprint)",
    )
    trusted_proxies: str = Field(
        "127.0.0.1",
        description="comma-separated addresses of reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed; '*' trusts any",
    )
    root_path: str = Field(
        "", pattern=r"^(/[A-Za-z0-9._~-]+)*$", description="path prefix under a reverse proxy"
    )
    max_connections: int = Field(
        1000, ge=1, description="open HTTP connections at most; more get 503"
    )
    max_sessions: int = Field(1000, ge=1, description="node WebSocket sessions at most")
    max_request_kb: float = Field(
        64, gt=0, description="body cap of every route but updates and data uploads"
    )
    header_timeout_s: float = Field(
        10, gt=0, description="a request's headers must arrive within this time"
    )
    body_timeout_s: float = Field(
        30, gt=0, description="a request body may pause at most this long between chunks"
    )
    min_body_rate: float = Field(
        1024, ge=0, description="bytes per second a body must average after body_timeout_s"
    )
    max_submissions_per_min: int = Field(
        600, ge=1, description="updates one node may submit per minute; more get 429"
    )
    max_leases_per_node: int = Field(
        64, ge=1, description="shard leases one node may hold at once; more get 429"
    )
    max_auth_failures_per_min: int = Field(
        20, ge=1, description="failed logins from one address per minute before 429"
    )
    max_registrations_per_min: int = Field(
        10, ge=1, description="node registrations from one address per minute before 429"
    )
    heartbeat_s: float = Field(
        2.0, ge=0.5, le=60, description="how often nodes send a heartbeat on their WebSocket"
    )
    session_timeout_s: float = Field(
        6.0, gt=0, le=600, description="a node silent on its WebSocket this long is gone"
    )
    checkpoint_every: int = Field(50, ge=1, description="write a checkpoint every N versions")
    keep_checkpoints: int = Field(3, ge=1, description="how many checkpoints to keep")
    delta_window: int = Field(8, ge=1, description="published deltas kept for incremental pulls")
    delta_window_mb: float = Field(512, gt=0, description="memory cap of that window")
    evaluate: bool = Field(True, description="run the background Evaluator")
    eval_every: int = Field(10, ge=1, description="validate every N versions (and when idle)")
    eval_batches: int = Field(8, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    tensorboard_dir: Path | None = Field(
        None,
        description="write per-version scalars and validation losses here for TensorBoard "
        "(needs pip install 'crowdtrain[tensorboard]')",
    )

    @model_validator(mode="after")
    def _session_timing(self) -> ServerSettings:
        if self.session_timeout_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"session_timeout_s ({self.session_timeout_s}) must be at least twice "
                f"heartbeat_s ({self.heartbeat_s}): a node whose heartbeat is a little late "
                "would be marked gone"
            )
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both, or neither")
        if self.self_signed and self.tls_cert is not None:
            raise ValueError("give either self_signed or tls_cert/tls_key, not both")
        return self

    @field_validator("model", "optimizer", "aggregator", "downlink_value_codec")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        return _one_of(value, info.field_name)


def _registry(field_name: str) -> tuple[dict, str]:
    """The registry a name setting is checked against (imported late: they import torch)."""
    if field_name == "model":
        from crowdtrain.model.presets import PRESETS

        return PRESETS, "model preset"
    if field_name == "optimizer":
        from crowdtrain.algorithms.optimizers import OPTIMIZERS

        return OPTIMIZERS, "optimizer"
    if field_name == "aggregator":
        from crowdtrain.algorithms.aggregators import AGGREGATORS

        return AGGREGATORS, "aggregator"
    from crowdtrain.compression.codecs import VALUE_CODECS

    return VALUE_CODECS, "value codec"


def _one_of(value: str, field_name: str) -> str:
    """Fail at start, naming the choices, rather than after minutes of set-up."""
    registry, what = _registry(field_name)
    if value not in registry:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(registry)}")
    return value


class NodeSettings(_Settings):
    """How a trainer node connects, trains and compresses."""

    model_config = SettingsConfigDict(env_prefix="CROWDTRAIN_NODE_", extra="forbid")

    server: str = Field("http://127.0.0.1:8000", description="the coordinator's base URL")
    name: str | None = Field(
        None,
        max_length=NODE_NAME_MAX,
        pattern=rf"^[{NODE_NAME_CHARS}]+$",
        description="node name shown by the server; default the host name (a second node on "
        "the same machine needs a name of its own)",
    )
    token: SecretStr | None = Field(
        None,
        description="enrollment token from the server's admin (ct_enroll_...); needed once, "
        "to register this node",
    )
    config_dir: Path | None = Field(
        None,
        description="where the node keeps its identity per server; default ~/.config/crowdtrain",
    )
    ca_cert: Path | None = Field(
        None, description="PEM file of the CA that signed the server's certificate"
    )
    pin_sha256: str | None = Field(
        None,
        pattern=r"^[0-9A-Fa-f:]{64,95}$",
        description="the server certificate's SHA-256 fingerprint (from a --self-signed "
        "server); the node accepts only that certificate",
    )
    websocket: bool = Field(
        True, description="keep a WebSocket session with the server (pushes, heartbeats)"
    )
    location: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[^\x00-\x1f\x7f]*$",
        description="where this node is, as its session tells the server (shown in /info)",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    batch_size: int = Field(16, ge=1, le=4096, description="sequences per micro-batch")
    accumulate: int = Field(1, ge=1, le=1024, description="micro-batches per update")
    density: float | None = Field(
        None,
        gt=0,
        le=1,
        description="fixed fraction of entries sent per update; unset: the density controller "
        "picks it each update from the measured link (between min_density and max_density)",
    )
    min_density: float = Field(0.001, gt=0, le=1, description="the controller's lowest density")
    max_density: float = Field(0.25, gt=0, le=1, description="the controller's highest density")
    upload_fraction: float = Field(
        0.2, gt=0, le=10, description="the controller keeps upload time under this x compute time"
    )
    density_warmup: int = Field(
        20, ge=0, description="updates over which the controller's floor falls from max to min"
    )
    upload_limit: float | None = Field(
        None,
        gt=0,
        description="cap on upload speed in bytes per second (accepts 500KB, 2MB, 1.5e6); "
        "unset: no cap",
    )
    value_codec: str = Field(
        "fp16", description="value encoding: fp32, fp16, bf16, int8, int4 or sign"
    )
    data: Path | None = Field(
        None,
        description="train on these local files (a file or a directory of .txt, .md, .jsonl, "
        ".json, .csv, .parquet, or a saved Hugging Face dataset) instead of the server's "
        "shards, if the server allows it",
    )
    cache_dir: Path | None = Field(
        None, description="where downloaded shards are kept; default ~/.cache/crowdtrain"
    )
    shard_cache_mb: float = Field(
        1024, gt=0, description="MiB of downloaded shards kept at most; the oldest go first"
    )
    seed: int | None = Field(None, description="data-sampling seed; default from the name")
    max_updates: int | None = Field(None, ge=1, description="stop after this many updates")
    duration_s: float | None = Field(None, gt=0, description="stop after this many seconds")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    overlap: bool = Field(True, description="compute the next step while the last one uploads")
    request_timeout_s: float = Field(120, gt=0)
    max_backoff_s: float = Field(30, gt=0, description="longest wait between retries")

    @field_validator("value_codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        return _one_of(value, "value_codec")

    @field_validator("upload_limit", mode="before")
    @classmethod
    def _byte_rate(cls, value: Any) -> Any:
        return parse_bytes(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _density_range(self) -> NodeSettings:
        if self.min_density > self.max_density:
            raise ValueError(
                f"min_density ({self.min_density}) is above max_density ({self.max_density})"
            )
        return self


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
}


def parse_bytes(text: str) -> float:
    """'500KB' -> 500000.0, '2MiB' -> 2097152.0, '1.5e6' -> 1500000.0 (per second implied)."""
    cleaned = text.strip().upper().removesuffix("/S").replace(" ", "")
    number = cleaned.rstrip("KMGIB")
    unit = cleaned[len(number) :]
    try:
        if unit not in _UNITS:
            raise ValueError(unit)
        return float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(
            f"{text!r} is not a byte count; write a number with an optional unit "
            "(B, KB, MB, GB, KiB, MiB, GiB), for example 500KB"
        ) from None


SECTIONS: dict[str, type[_Settings]] = {"server": ServerSettings, "node": NodeSettings}


def load_settings(cls: type[_Settings], config_file: Path | None = None, **overrides: Any):
    """Build settings from flags (`overrides`, None means unset), env and the TOML file."""
    section = next(name for name, c in SECTIONS.items() if c is cls)
    config_file = Path(config_file) if config_file else None
    config_file = config_file or (
        Path(os.environ[CONFIG_ENV]) if CONFIG_ENV in os.environ else None
    )
    _check_environment(cls)
    toml_values = _read_toml(config_file, section) if config_file else {}
    flags = {k: v for k, v in overrides.items() if v is not None}
    token = _toml_values.set(toml_values)
    try:
        return cls(**flags)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, cls, config_file, flags, toml_values)) from None
    finally:
        _toml_values.reset(token)


def _read_toml(path: Path, section: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise SettingsError(
            f"config file {path}: unknown table(s) {sorted(unknown)}; use [server] and/or [node]"
        )
    values = data.get(section, {})
    if not isinstance(values, dict):
        raise SettingsError(f"config file {path}: [{section}] must be a table")
    return values


def _check_environment(cls: type[_Settings]) -> None:
    prefix = cls.model_config["env_prefix"]
    other_prefixes = [
        c.model_config["env_prefix"]
        for c in SECTIONS.values()
        if len(c.model_config["env_prefix"]) > len(prefix)
    ]
    for key in os.environ:
        upper = key.upper()
        if not upper.startswith(prefix) or upper in (CONFIG_ENV, SERVER_URL_ENV):
            continue
        if any(upper.startswith(p) for p in other_prefixes):
            continue
        field = upper[len(prefix) :].lower()
        if field not in cls.model_fields:
            raise SettingsError(
                f"unknown setting in environment variable {key}; known: "
                + ", ".join(prefix + f.upper() for f in cls.model_fields)
            )


def _describe(
    exc: ValidationError,
    cls: type[_Settings],
    config_file: Path | None,
    flags: dict[str, Any],
    toml_values: dict[str, Any],
) -> str:
    """One line per problem, saying where the bad value came from."""
    prefix = cls.model_config["env_prefix"]
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            where = f" (in {config_file})" if config_file else ""
            lines.append(f"unknown setting {field!r}{where}; known: {', '.join(cls.model_fields)}")
            continue
        if not field:  # a rule across settings (a model validator)
            lines.append(err["msg"].removeprefix("Value error, "))
            continue
        env = f"{prefix}{field.upper()}"
        if field in flags:
            source = "the command-line flag"
        elif any(key.upper() == env for key in os.environ):
            source = f"environment variable {env}"
        elif field in toml_values:
            source = f"key {field!r} in {config_file}"
        else:
            source = "the default"
        lines.append(f"setting {field!r} from {source}: {err['msg']}; got {err.get('input')!r}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
