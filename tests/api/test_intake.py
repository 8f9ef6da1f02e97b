"""API tests of POST /api/v1/updates: an accepted update advances the model; every refused
one answers 4xx JSON ("error", "detail") and leaves the server's state exactly as it was."""

import struct

import pytest
import torch
import zstandard
from safetensors.torch import save as save_tensors

from crowdtrain.protocol.snapshot import decode_deltas

MAX_UPDATE_MB = 1.0
CAP = int(MAX_UPDATE_MB * (1 << 20))
SERVER_SETTINGS = {"max_staleness": 1, "max_update_mb": MAX_UPDATE_MB, "checkpoint_every": 1000}


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def server_state(server) -> dict:
    """Everything a refused update must not touch, read both over HTTP and from the runtime.

    The snapshot is compared as decoded tensors, not bytes: the Publisher caches bodies per
    version (which would hide a change made without a version bump), and safetensors may
    order metadata keys differently each time it encodes.
    """
    version, lineage = server.version()
    http_version, http_params = server.snapshot_params()
    coordinator = server.runtime.coordinator
    live_version, live_params = coordinator.snapshot()
    return {
        "version": (version, http_version, live_version),
        "lineage": lineage,
        "http_params": http_params,
        "live_params": live_params,
        "optimizer_steps": [
            float(s["step"]) for s in coordinator.optimizer.state_dict()["state"].values()
        ],
        "pending": coordinator.pending,
        "aggregated": coordinator.aggregator.count,
        "totals": dict(coordinator.totals),
    }


def assert_state_unchanged(before: dict, after: dict) -> None:
    for key in ("version", "lineage", "optimizer_steps", "pending", "aggregated", "totals"):
        assert after[key] == before[key], key
    for key in ("http_params", "live_params"):
        assert after[key].keys() == before[key].keys()
        for name, tensor in before[key].items():
            assert torch.equal(after[key][name], tensor), (key, name)


def submit_and_wait(server, node: str = "good-node", seed: int = 0) -> int:
    version, _ = server.version()
    response = server.post_update(server.update_body(seed=seed), node=node)
    assert response.status_code == 202, response.text
    return server.wait_past(version)


# ---- accepted ------------------------------------------------------------------------------


def test_valid_update_is_accepted_and_advances_the_version(server):
    version, lineage = server.version()
    old_version, old_params = server.snapshot_params()
    assert old_version == version

    response = server.post_update(server.update_body(seed=1), node="first-node")
    assert response.status_code == 202, response.text
    receipt = response.json()
    assert receipt["accepted"] is True
    assert receipt["current_version"] == version and receipt["lineage"] == lineage
    assert isinstance(receipt["queued"], int)

    new = server.wait_past(version)
    assert new == version + 1
    new_version, new_params = server.snapshot_params()
    assert new_version == new
    assert any(not torch.equal(new_params[n], old_params[n]) for n in old_params)

    # The published delta turns the old weights into the new ones bit for bit.
    response = server.get(
        "/model/deltas",
        params={"since": version, "lineage": lineage},
        headers={"Accept-Encoding": "identity"},
    )
    assert response.status_code == 200
    assert response.headers["x-crowdtrain-version"] == str(new)
    chain, chain_lineage, codec = decode_deltas(response.content, server.runtime.manifest)
    assert chain_lineage == lineage and [v for v, _ in chain] == [new]
    for name, delta in chain[0][1].items():
        delta.add_to(old_params[name])
        assert torch.equal(old_params[name], new_params[name]), name

    record = server.node("first-node")
    assert record["updates_accepted"] == 1 and record["updates_refused"] == 0
    assert record["samples"] == 8 and record["tokens"] == 1024
    assert record["last_loss"] == 5.0 and record["last_version"] == version
    rounds = server.get("/history", params={"since": version}).json()["rounds"]
    assert [r["version"] for r in rounds] == [new]
    assert rounds[0]["train_loss"] == 5.0 and rounds[0]["updates"] == 1
    assert rounds[0]["samples"] == 8 and rounds[0]["nodes"] == 1


def test_uncompressed_update_is_accepted(server):
    version, _ = server.version()
    body = server.update_body(seed=2, content_encoding="identity")
    response = server.post_update(body, node="plain-node", content_encoding=None)
    assert response.status_code == 202, response.text
    assert server.wait_past(version) == version + 1


def test_deltas_more_than_one_version_behind_need_a_snapshot(server):
    start, lineage = server.version()
    submit_and_wait(server, seed=3)
    current = submit_and_wait(server, seed=4)
    assert current == start + 2
    response = server.get("/model/deltas", params={"since": start, "lineage": lineage})
    assert assert_error(response, 410, "snapshot_required")["current_version"] == current


# ---- refused: every path leaves the state unchanged --------------------------------------


def bomb() -> bytes:
    """A few KB of zstd that inflate to 50 MB (past the decompressed cap)."""
    return zstandard.ZstdCompressor(level=3).compress(b"\0" * (50 << 20))


def garbage_container() -> bytes:
    header = b"not json at all"
    return struct.pack("<Q", len(header)) + header


def nan_update(server) -> bytes:
    version, lineage = server.version()
    spec = server.runtime.manifest.params[0]
    metadata = {
        "format": "crowdtrain.update/1",
        "value_codec": "fp16",
        "base_version": str(version),
        "lineage": lineage,
        "samples": "4",
        "tokens": "10",
        "loss": "1.0",
    }
    tensors = {
        f"{spec.name}.idx": torch.tensor([0, 1], dtype=torch.int32),
        f"{spec.name}.val": torch.tensor([1.0, float("nan")], dtype=torch.float16),
    }
    return zstandard.ZstdCompressor().compress(save_tensors(tensors, metadata=metadata))


# (case id, body builder, Content-Encoding, expected status, expected code)
DECODE_ERRORS = [
    ("zstd-bomb", lambda s: bomb(), "zstd", 413, "too_large"),
    ("invalid-zstd", lambda s: b"\x28\xb5\x2f\xfd garbage", "zstd", 400, "bad_compression"),
    ("gzip", lambda s: s.update_body(), "gzip", 415, "unsupported_encoding"),
    ("zstd-labelled-brotli", lambda s: s.update_body(), "br", 400, "bad_compression"),
    ("not-a-container", lambda s: garbage_container(), "identity", 400, "bad_container"),
    ("nan-value", nan_update, "zstd", 422, "not_finite"),
    (
        "bad-metadata",
        lambda s: s.update_body(samples=1, loss=float("inf")),
        "zstd",
        422,
        "bad_metadata",
    ),
    (
        "future-base",
        lambda s: s.update_body(base_version=s.version()[0] + 1),
        "zstd",
        409,
        "resync",
    ),
    ("other-lineage", lambda s: s.update_body(lineage="0123456789abcdef"), "zstd", 409, "resync"),
]


@pytest.mark.parametrize(
    "case, build, content_encoding, status, code",
    DECODE_ERRORS,
    ids=[case[0] for case in DECODE_ERRORS],
)
def test_refused_update_changes_nothing(server, case, build, content_encoding, status, code):
    node = f"refused-{case}"
    body = build(server)
    before = server_state(server)
    response = server.post_update(body, node=node, content_encoding=content_encoding)
    error = assert_error(response, status, code)
    assert_state_unchanged(before, server_state(server))
    record = server.node(node)
    assert record["updates_refused"] == 1 and record["updates_accepted"] == 0
    assert record["bytes_in"] == len(body)
    if status == 409:
        assert error["current_version"] == before["version"][0]
        assert error["lineage"] == before["lineage"]


def test_bad_metadata_error_names_the_fields(server):
    body = server.update_body(loss=float("nan"))
    response = server.post_update(body, node="meta-node")
    assert "loss" in assert_error(response, 422, "bad_metadata")["detail"]


def test_stale_base_version_is_409_with_the_current_version(server):
    base, lineage = server.version()
    submit_and_wait(server, seed=5)
    current = submit_and_wait(server, seed=6)  # two versions past base; max_staleness is 1
    body = server.update_body(base_version=base, seed=7)
    before = server_state(server)
    response = server.post_update(body, node="stale-node")
    error = assert_error(response, 409, "stale")
    assert error == {
        "error": "stale",
        "detail": error["detail"],
        "current_version": current,
        "lineage": lineage,
    }
    assert str(base) in error["detail"]
    assert_state_unchanged(before, server_state(server))
    assert server.node("stale-node")["updates_refused"] == 1
    # one version behind is still within max_staleness
    response = server.post_update(server.update_body(base_version=current - 1), node="stale-node")
    assert response.status_code == 202, response.text
    server.wait_past(current)


def test_body_over_the_cap_with_content_length_is_413(server):
    before = server_state(server)
    body = b"\0" * (CAP + 1)
    request = server.client.build_request(
        "POST",
        "/api/v1/updates",
        content=body,
        headers={**server.as_node("big-node"), "Content-Encoding": "zstd"},
    )
    assert request.headers["content-length"] == str(CAP + 1)
    error = assert_error(server.client.send(request), 413, "too_large")
    # refused on the declared length, before a byte of the body is read
    assert f"body of {CAP + 1} bytes exceeds the cap of {CAP}" in error["detail"]
    assert_state_unchanged(before, server_state(server))


def test_body_over_the_cap_without_content_length_is_413(server):
    def chunks():
        for _ in range(CAP // 65536 + 1):
            yield b"\0" * 65536

    before = server_state(server)
    request = server.client.build_request(
        "POST",
        "/api/v1/updates",
        content=chunks(),
        headers={**server.as_node("chunked-node"), "Content-Encoding": "zstd"},
    )
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    error = assert_error(server.client.send(request), 413, "too_large")
    assert f"body exceeds the cap of {CAP} bytes" in error["detail"]
    assert_state_unchanged(before, server_state(server))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_counted_as_refused(server, chunked):
    node = f"oversize-{int(chunked)}"
    body = b"\0" * (CAP + 1)
    content = iter([body]) if chunked else body
    response = server.client.post("/api/v1/updates", content=content, headers=server.as_node(node))
    assert response.status_code == 413
    record = server.node(node)
    assert record is not None and record["updates_refused"] == 1


def test_non_numeric_content_length_is_400(server):
    before = server_state(server)
    request = server.client.build_request(
        "POST",
        "/api/v1/updates",
        content=b"abc",
        headers={**server.as_node("length-node"), "Content-Length": "3x"},
    )
    assert request.headers["content-length"] == "3x"
    assert_error(server.client.send(request), 400, "bad_length")
    assert_state_unchanged(before, server_state(server))


@pytest.mark.parametrize(
    "authorization, code",
    [
        (None, "not_authenticated"),
        ("Bearer not-a-token", "bad_token"),
        ("Bearer a.b.c", "bad_token"),
        ("Basic bm9kZTpwdw==", "bad_token"),
    ],
    ids=["none", "unknown", "bad-jwt", "basic"],
)
def test_update_without_a_node_token_is_401(server, authorization, code):
    body = server.update_body(seed=8)
    before = server_state(server)
    headers = {"Content-Encoding": "zstd"}
    if authorization is not None:
        headers["Authorization"] = authorization
    response = server.client.post("/api/v1/updates", content=body, headers=headers)
    assert_error(response, 401, code)
    assert response.headers["www-authenticate"] == "Bearer"
    assert_state_unchanged(before, server_state(server))


def test_refusals_do_not_block_the_next_good_update(server):
    node = "mixed-node"
    assert server.post_update(bomb(), node=node).status_code == 413
    assert server.post_update(b"junk", node=node, content_encoding="identity").status_code == 400
    version = submit_and_wait(server, node=node, seed=9)
    assert server.version()[0] == version
    record = server.node(node)
    assert record["updates_refused"] == 2 and record["updates_accepted"] == 1


def test_deeply_nested_header_is_400_not_500(server):
    header = b"[" * 100_000
    body = struct.pack("<Q", len(header)) + header
    before = server_state(server)
    response = server.post_update(body, node="nested-node", content_encoding="identity")
    assert_error(response, 400, "bad_container")
    assert_state_unchanged(before, server_state(server))
