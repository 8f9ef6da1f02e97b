"""The node session's messages (WebSocket /api/v1/nodes/session): strict, bounded pydantic models.

Every message is one JSON text frame with a `type` field that names its model. The node sends
`hello` first, then `heartbeat`s; the server answers `welcome` and pushes the rest
(docs/sessions.md). Both sides parse what they receive with `parse_node_message` /
`parse_server_message`, so untrusted input never reaches the core as a dict.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from crowdtrain.protocol.errors import WireError

SESSION_PROTOCOL = 1  # bumped when a message changes incompatibly
MAX_MESSAGE_BYTES = 64 << 10  # one frame, either way; bigger ones close the session
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # no control characters in free text shown to operators

# error codes the server sends before it closes a session
BAD_MESSAGE = "bad_message"
MESSAGE_TOO_BIG = "message_too_big"
HELLO_TIMEOUT = "hello_timeout"
HEARTBEAT_TIMEOUT = "heartbeat_timeout"
NODE_REVOKED = "node_revoked"
SESSION_REPLACED = "session_replaced"
TOO_MANY_SESSIONS = "too_many_sessions"
TOO_MANY_MESSAGES = "too_many_messages"

Text = Annotated[str, Field(max_length=128, pattern=PRINTABLE)]
Status = Literal["starting", "training", "waiting_for_shard", "stopping"]  # in heartbeats
Rate = Annotated[float, Field(ge=0, le=1e12)]
Bytes = Annotated[int, Field(ge=0, le=1 << 60)]
Percent = Annotated[float, Field(ge=0, le=100)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    def to_json(self) -> str:
        return self.model_dump_json()


# ---- node -> server ----------------------------------------------------------------------


class Hello(_Message):
    """The node's first message: what it runs on and how its link measured."""

    type: Literal["hello"] = "hello"
    protocol: int = Field(default=SESSION_PROTOCOL, ge=1, le=1000)
    software_version: str = Field(max_length=64, pattern=PRINTABLE)  # crowdtrain's
    torch_version: str = Field(default="", max_length=64, pattern=PRINTABLE)
    device: str = Field(max_length=32, pattern=r"^[a-z0-9_:]+$")  # cpu, cuda:0, mps
    device_name: Text = ""  # the GPU's name, or the CPU's
    memory_bytes: Bytes | None = None  # the device's memory (system memory on a CPU)
    cpu_count: int | None = Field(default=None, ge=1, le=1 << 20)
    upload_bytes_per_s: Rate | None = None  # as the node measured its link
    rtt_s: float | None = Field(default=None, ge=0, le=3600)
    # where the node is, as its operator set it (the node setting `location`)
    location: str | None = Field(default=None, max_length=64, pattern=PRINTABLE)


class Heartbeat(_Message):
    """Every heartbeat_s (and when the node's status changes): alive, and how it is doing."""

    type: Literal["heartbeat"] = "heartbeat"
    status: Status
    version: int | None = Field(default=None, ge=-1, le=1 << 62)  # the version the node holds
    tokens_per_s: Rate | None = None  # accepted tokens per second, over the last 10 s or so
    rss_bytes: Bytes | None = None  # the node process's resident memory
    gpu_memory_bytes: Bytes | None = None  # allocated by torch, when it trains on a GPU
    # the node's machine (docs/monitoring.md); a node that does not send them is still valid
    cpu_percent: Percent | None = None  # of the whole machine, since the last heartbeat
    memory_used_bytes: Bytes | None = None  # system memory in use
    memory_total_bytes: Bytes | None = None
    gpu_utilization_percent: Percent | None = None  # NVML's, when nvidia-ml-py is installed
    gpu_memory_used_bytes: Bytes | None = None  # the whole GPU's, not only this process's
    gpu_memory_total_bytes: Bytes | None = None


# ---- server -> node ----------------------------------------------------------------------


class Welcome(_Message):
    """The answer to hello: who the node is, how often to beat, what the server is at."""

    type: Literal["welcome"] = "welcome"
    protocol: int = SESSION_PROTOCOL
    node_id: str = Field(max_length=128)
    heartbeat_s: float = Field(gt=0, le=600)
    session_timeout_s: float = Field(gt=0, le=3600)
    version: int = Field(ge=0)
    lineage: str = Field(max_length=64)


class VersionPublished(_Message):
    """A new version was published: fetch its delta now."""

    type: Literal["version"] = "version"
    version: int = Field(ge=0)
    lineage: str = Field(max_length=64)


class RoundDeadline(_Message):
    """A round opened: it becomes `version` at the latest `closes_in_s` seconds from now (sooner
    once a quorum of nodes has sent updates)."""

    type: Literal["round"] = "round"
    version: int = Field(ge=1)
    closes_in_s: float = Field(ge=0, le=1e6)


class DensityBudget(_Message):
    """The densest update the server takes now (it halves this while it falls behind)."""

    type: Literal["density"] = "density"
    max_density: float = Field(gt=0, le=1)


class LeaseOffer(_Message):
    """Shards went back to the pool (released, expired, or a new epoch opened): a node waiting
    for one should ask for a lease now. A hint, not a reservation: another node may win it."""

    type: Literal["lease_offer"] = "lease_offer"
    free: int = Field(ge=1, le=1 << 40)  # shards freed by the event that sent this


class Shutdown(_Message):
    """The server is stopping: the node keeps its work and reconnects after `retry_after_s`."""

    type: Literal["shutdown"] = "shutdown"
    reason: Text
    retry_after_s: float = Field(ge=0, le=3600)


class SessionError(_Message):
    """Why the server is closing the session; the close follows at once."""

    type: Literal["error"] = "error"
    code: str = Field(max_length=64, pattern=r"^[a-z_]+$")
    detail: str = Field(default="", max_length=500)


NodeMessage = Annotated[Hello | Heartbeat, Field(discriminator="type")]
ServerMessage = Annotated[
    Welcome
    | VersionPublished
    | RoundDeadline
    | DensityBudget
    | LeaseOffer
    | Shutdown
    | SessionError,
    Field(discriminator="type"),
]
_NODE = TypeAdapter(NodeMessage)
_SERVER = TypeAdapter(ServerMessage)


def _parse(adapter: TypeAdapter, text: str | bytes, sender: str):
    size = len(text.encode("utf-8")) if isinstance(text, str) else len(text)
    if size > MAX_MESSAGE_BYTES:
        raise WireError(
            413,
            MESSAGE_TOO_BIG,
            f"a session message may be at most {MAX_MESSAGE_BYTES} bytes; got {size}",
        )
    try:
        return adapter.validate_json(text)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        raise WireError(
            422,
            BAD_MESSAGE,
            f"not a valid {sender} session message ({where}: {first['msg']})"[:400],
        ) from None


def parse_node_message(text: str | bytes) -> Hello | Heartbeat:
    """A message a node sent; WireError (code bad_message or message_too_big) otherwise."""
    return _parse(_NODE, text, "node")


def parse_server_message(text: str | bytes):
    """A message the server sent; WireError otherwise."""
    return _parse(_SERVER, text, "server")
