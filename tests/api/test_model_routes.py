"""API tests of what nodes read: health, info, manifest, tokenizer, snapshots, deltas, version,
history. No update is submitted here, so the server stays at version 0."""

import json

import pytest
import torch
import zstandard
from safetensors.torch import load as load_tensors

from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.protocol import encoding
from crowdtrain.protocol.snapshot import decode_snapshot

from .conftest import ADMIN


def raw_get(server, path: str, **kwargs):
    """(response, body exactly as sent): httpx would otherwise undo a Content-Encoding."""
    kwargs["headers"] = {**ADMIN, **kwargs.get("headers", {})}
    with server.client.stream("GET", "/api/v1" + path, **kwargs) as response:
        return response, b"".join(response.iter_raw())


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and isinstance(body["detail"], str) and body["detail"]
    return body


def test_health(server):
    response = server.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "version": 0, "failure": None}


def test_info(server):
    info = server.info()
    runtime = server.runtime
    assert info["version"] == 0
    assert info["lineage"] == runtime.coordinator.lineage and len(info["lineage"]) == 16
    assert info["model"]["preset"] == "tiny"
    assert info["model"]["parameters"] == runtime.manifest.numel
    assert info["model"]["n_layer"] == runtime.config.n_layer
    assert info["tokenizer"]["vocab_size"] == runtime.tokenizer.vocab_size
    training = info["training"]
    assert training["algorithm"] == "sync" and training["update_kind"] == "gradient"
    assert training["max_update_bytes"] == runtime.limits.max_body_bytes
    assert training["min_nodes"] == 1
    assert info["pending_updates"] == 0 and info["resumed_from"] is None


def test_manifest(server):
    body = server.get("/model/manifest").json()
    manifest = server.runtime.manifest
    assert body["version"] == 0
    assert (
        body["parameters"]
        == manifest.numel
        == sum(p.numel() for p in server.runtime.model.parameters())
    )
    assert body["tensors"] == manifest.to_json()
    names = [t["name"] for t in body["tensors"]]
    assert names == [name for name, _ in server.runtime.model.named_parameters()]


def test_tokenizer(server):
    response = server.get("/model/tokenizer")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["etag"] == f'"{server.runtime.tokenizer.version}"'
    json.loads(response.text)
    tokenizer = Tokenizer.from_json(response.text)
    assert tokenizer.vocab_size == server.info()["tokenizer"]["vocab_size"]
    text = "def f(x):\n    return x + 1"
    assert tokenizer.encode(text) == server.runtime.tokenizer.encode(text)


def test_snapshot_fp32_is_exactly_the_model(server):
    response, body = raw_get(
        server,
        "/model/snapshot",
        headers={**server.as_node("reader-1"), "Accept-Encoding": "identity"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert "content-encoding" not in response.headers
    lineage = server.runtime.coordinator.lineage
    assert response.headers["x-crowdtrain-version"] == "0"
    assert response.headers["x-crowdtrain-lineage"] == lineage
    params, meta = decode_snapshot(body, server.runtime.manifest)
    assert meta == {"version": 0, "lineage": lineage}
    for name, p in server.runtime.model.named_parameters():
        assert params[name].dtype == torch.float32 and torch.equal(params[name], p.detach()), name


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_snapshot_half_precision(server, dtype, torch_dtype):
    response, body = raw_get(
        server, "/model/snapshot", params={"dtype": dtype}, headers={"Accept-Encoding": "identity"}
    )
    assert response.status_code == 200
    tensors = load_tensors(body)
    for name, p in server.runtime.model.named_parameters():
        assert tensors[name].dtype == torch_dtype
        assert torch.equal(tensors[name], p.detach().to(torch_dtype)), name
    assert response.headers["etag"].endswith(f'-{dtype}"')


def test_snapshot_unknown_dtype_is_422(server):
    assert server.get("/model/snapshot", params={"dtype": "int8"}).status_code == 422


@pytest.mark.parametrize(
    "accept_encoding, compressed",
    [
        ("zstd", True),
        ("gzip, deflate, zstd", True),
        ("gzip, deflate", False),
        ("identity", False),
        ("zstd;q=0", False),
        ("br", "br"),
        ("zstd;q=0, br", "br"),
        ("br, zstd", True),
    ],
)
def test_snapshot_zstd_only_when_accepted(server, accept_encoding, compressed):
    response, body = raw_get(
        server, "/model/snapshot", headers={"Accept-Encoding": accept_encoding}
    )
    assert response.status_code == 200
    assert response.headers["vary"] == "Accept-Encoding"
    if compressed == "br":
        assert response.headers["content-encoding"] == "br"
        compressed = body
        body = encoding.decompress(compressed, "br", 1 << 26)
        assert len(compressed) < len(body)
    elif compressed:
        assert response.headers["content-encoding"] == "zstd"
        compressed = body
        body = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=1 << 26)
        assert len(compressed) < len(body)
    else:
        assert "content-encoding" not in response.headers
    # the same tensors and metadata (not the same bytes: safetensors orders metadata keys freely)
    params, meta = decode_snapshot(body, server.runtime.manifest)
    assert meta["version"] == 0
    for name, p in server.runtime.model.named_parameters():
        assert torch.equal(params[name], p.detach()), name


def test_snapshot_etag_and_if_none_match(server):
    first = server.get("/model/snapshot", headers={"Accept-Encoding": "identity"})
    etag = first.headers["etag"]
    lineage = server.runtime.coordinator.lineage
    assert etag == f'"0-{lineage}-fp32"'
    again = server.get("/model/snapshot", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    # another dtype is another resource; a stale tag gets the body
    other = server.get("/model/snapshot", params={"dtype": "bf16"}, headers={"If-None-Match": etag})
    assert other.status_code == 200 and other.headers["etag"] != etag
    stale = server.get("/model/snapshot", headers={"If-None-Match": '"0-other-fp32"'})
    assert stale.status_code == 200 and len(stale.content) > 0


def test_snapshot_downloads_are_counted_for_the_node(server):
    before = server.node("counter-node")
    before_bytes = before["bytes_out"] if before else 0
    response = server.get(
        "/model/snapshot",
        headers={**server.as_node("counter-node"), "Accept-Encoding": "identity"},
    )
    assert response.status_code == 200
    assert server.node("counter-node")["bytes_out"] == before_bytes + len(response.content)


def test_a_snapshot_needs_a_node_or_admin_token(server):
    assert_error(server.client.get("/api/v1/model/snapshot"), 401, "not_authenticated")
    viewer = server.client.post("/api/v1/tokens", json={"role": "viewer"}, headers=ADMIN)
    headers = {"Authorization": f"Bearer {viewer.json()['token']}"}
    assert_error(server.get("/model/snapshot", headers=headers), 403, "forbidden")
    # an admin's download is not counted as a node's traffic
    nodes = {n["node_id"] for n in server.info()["nodes"]}
    assert server.get("/model/snapshot").status_code == 200
    assert {n["node_id"] for n in server.info()["nodes"]} == nodes


def test_deltas_up_to_date_is_204(server):
    lineage = server.runtime.coordinator.lineage
    for wait in (0, 0.1):
        response = server.get(
            "/model/deltas", params={"since": 0, "lineage": lineage, "wait": wait}
        )
        assert response.status_code == 204 and response.content == b""
        assert response.headers["x-crowdtrain-version"] == "0"
        assert response.headers["x-crowdtrain-lineage"] == lineage


def test_deltas_for_another_lineage_is_410(server):
    response = server.get("/model/deltas", params={"since": 0, "lineage": "0123456789abcdef"})
    body = assert_error(response, 410, "snapshot_required")
    assert body["current_version"] == 0
    assert body["lineage"] == server.runtime.coordinator.lineage


def test_deltas_since_a_future_version_is_410(server):
    lineage = server.runtime.coordinator.lineage
    response = server.get("/model/deltas", params={"since": 5, "lineage": lineage})
    assert assert_error(response, 410, "snapshot_required")["current_version"] == 0


@pytest.mark.parametrize(
    "params",
    [
        {"lineage": "x"},
        {"since": 0},
        {"since": -1, "lineage": "x"},
        {"since": 0, "lineage": "x" * 65},
    ],
)
def test_deltas_with_bad_query_is_422(server, params):
    assert server.get("/model/deltas", params=params).status_code == 422


def test_version(server):
    lineage = server.runtime.coordinator.lineage
    assert server.get("/model/version").json() == {"version": 0, "lineage": lineage}
    # nothing new arrives: the long poll gives up and still answers with the current version
    waited = server.get("/model/version", params={"after": 0, "wait": 0.2})
    assert waited.json() == {"version": 0, "lineage": lineage}


def test_history_is_empty_before_training(server):
    response = server.get("/history")
    assert response.status_code == 200
    assert response.json() == {"rounds": [], "evals": []}
    assert server.get("/history", params={"limit": 0}).status_code == 422
