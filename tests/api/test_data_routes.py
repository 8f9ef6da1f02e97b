"""Training data over HTTP: shard leases and downloads, the epoch ledger that updates fill,
local-data updates, dataset uploads, and what /info, /data/status and /history say of the data."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import zstandard
from fastapi.testclient import TestClient

from crowdtrain.compression import TopKCompressor, get_value_codec
from crowdtrain.data.leases import LOOKAHEAD
from crowdtrain.node.runner import update_body
from crowdtrain.node.trainer import StepResult
from crowdtrain.protocol.update import UPDATE_FORMAT, UpdateMeta, encode_update
from crowdtrain.server.app import create_app
from crowdtrain.server.runtime import DEFAULT_DATASET
from crowdtrain.settings import ServerSettings

from .conftest import ADMIN, API, TEST_SECURITY, Server, next_seq

# small shards: dozens of them, so the tests sharing this server never run out
SERVER_SETTINGS = {"shard_tokens": 4096, "max_staleness": 0, "checkpoint_every": 1000}
ONE_SHARD = 1 << 20  # shard_tokens larger than the embedded corpus: a single train shard
LEASE_ID = "^[0-9a-f]{32}$"


@pytest.fixture
def start_server(tmp_path) -> Iterator[Callable[..., Server]]:
    """Starts apps of their own (the module's `server` has one set of settings), stopped when
    the test ends. Defaults as in conftest."""
    with contextlib.ExitStack() as stack:

        def start(**overrides) -> Server:
            fields = {
                "model": "tiny",
                "evaluate": False,
                "min_nodes": 1,
                **TEST_SECURITY,
                **overrides,
            }
            settings = ServerSettings(data_dir=tmp_path / uuid.uuid4().hex, **fields)
            app = create_app(settings)
            client = stack.enter_context(TestClient(app))
            return Server(client, app.state.runtime)

        yield start


def acquire(server: Server, node: str) -> dict:
    response = server.client.post(API + "/leases", headers=server.as_node(node))
    assert response.status_code == 200, response.text
    return response.json()


def renew(server: Server, lease_id: str, node: str):
    return server.client.post(API + f"/leases/{lease_id}/renew", headers=server.as_node(node))


def release(server: Server, lease_id: str, node: str):
    return server.client.delete(API + f"/leases/{lease_id}", headers=server.as_node(node))


def coverage(server: Server, epoch: int = 0) -> dict:
    response = server.get(f"/data/epochs/{epoch}")
    assert response.status_code == 200, response.text
    return response.json()


def node_update(
    server: Server,
    leases: list[str] = (),
    data_source: str = "server",
    base_version: int | None = None,
) -> tuple[bytes, str]:
    """(body, update_id) of a top-k update built as the node builds it (runner.update_body)."""
    version, lineage = server.version()
    g = torch.Generator().manual_seed(0)
    gradients = {
        spec.name: torch.randn(spec.shape, generator=g) for spec in server.runtime.manifest.params
    }
    deltas = TopKCompressor(0.01, get_value_codec("fp16")).compress(gradients)
    step = StepResult(gradients, loss=5.0, samples=8, tokens=1024, seconds=0.1)
    update_id = uuid.uuid4().hex
    body = update_body(
        step,
        deltas,
        "fp16",
        "gradient",
        version if base_version is None else base_version,
        lineage,
        update_id=update_id,
        leases=list(leases),
        data_source=data_source,
        seq=next_seq(),
    )
    return body, update_id


def submit_and_apply(server: Server, body: bytes, node: str) -> tuple[dict, int]:
    """Post an update and wait for its round: (receipt, the version it became)."""
    version, _ = server.version()
    response = server.post_update(body, node=node)
    assert response.status_code == 202, response.text
    return response.json(), server.wait_past(version)


def upload(server: Server, name: str, filename: str, content, split: str = "train"):
    return server.client.put(
        API + f"/datasets/{name}/{split}/files/{filename}",
        content=content,
        headers={**ADMIN, "Content-Type": "application/octet-stream"},
    )


def jsonl(*texts: str) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def leftover_uploads(server: Server) -> list:
    uploads = server.runtime.data_dir / "uploads"
    return list(uploads.iterdir()) if uploads.exists() else []


def dataset_names(server: Server) -> list[str]:
    response = server.get("/datasets")
    assert response.status_code == 200
    return [d["name"] for d in response.json()]


# ---- leases --------------------------------------------------------------------------------


def test_a_lease_names_its_shard_epoch_and_expiry(server):
    before = time.time()
    first = acquire(server, "leaser")
    after = time.time()
    assert re.fullmatch(LEASE_ID, first["lease"])
    shard = server.runtime.leases.shards[first["shard"]["id"]]
    data = server.runtime.train_data
    assert first["shard"] == {
        "id": shard.id,
        "index": shard.index,
        "tokens": shard.tokens,
        "sha256": shard.sha256,
        "dtype": data.dtype,
        "masked": False,
    }
    assert data.dtype == "uint16" and first["epoch"] == 0
    assert first["ttl_s"] == server.runtime.settings.lease_ttl_s == 60.0
    assert before + first["ttl_s"] <= first["expires_at"] <= after + first["ttl_s"]

    second = acquire(server, "leaser")
    assert second["lease"] != first["lease"]
    assert second["shard"]["id"] != first["shard"]["id"]
    assert second["epoch"] == 0


def test_leases_run_out_once_every_shard_of_the_open_epochs_is_taken(start_server):
    small = start_server(shard_tokens=ONE_SHARD)
    (only,) = small.runtime.train_data.shards
    # one shard, and nodes run ahead while it is held: LOOKAHEAD leases, then none
    grants = [acquire(small, "a")] + [acquire(small, f"b{i}") for i in range(LOOKAHEAD - 1)]
    assert [g["epoch"] for g in grants] == list(range(LOOKAHEAD))
    assert {g["shard"]["id"] for g in grants} == {only.id}
    none = acquire(small, "c")
    assert none["lease"] is None and none["shard"] is None
    assert none["retry_after_s"] > 0 and none["ttl_s"] == 60.0

    # a shard given back is leased again to the next caller
    assert release(small, grants[0]["lease"], "a").status_code == 204
    again = acquire(small, "c")
    assert again["lease"] not in (None, grants[0]["lease"])
    assert (again["shard"]["id"], again["epoch"]) == (only.id, 0)
    lost = renew(small, grants[0]["lease"], "a")
    assert lost.status_code == 409 and lost.json()["error"] == "lease_lost"
    assert acquire(small, "d")["lease"] is None


def test_a_lease_not_renewed_in_time_expires_and_its_shard_is_reissued(start_server):
    hasty = start_server(shard_tokens=ONE_SHARD, lease_ttl_s=0.3)
    grant = acquire(hasty, "slow")
    time.sleep(0.4)
    body, _ = node_update(hasty, leases=[grant["lease"]])
    receipt, _ = submit_and_apply(hasty, body, "slow")
    assert receipt["accepted"] and receipt["leases"] == {grant["lease"]: "lease_expired"}
    lost = renew(hasty, grant["lease"], "slow")
    assert lost.status_code == 409 and lost.json()["error"] == "lease_lost"
    again = acquire(hasty, "fast")
    assert (again["shard"]["id"], again["epoch"]) == (grant["shard"]["id"], 0)
    assert coverage(hasty)["ledger"] == []


def test_renewing_pushes_the_expiry_out(server):
    grant = acquire(server, "renewer")
    time.sleep(0.01)
    response = renew(server, grant["lease"], "renewer")
    assert response.status_code == 200, response.text
    assert response.json()["lease"] == grant["lease"]
    assert response.json()["expires_at"] > grant["expires_at"]


def test_only_the_holder_may_renew_or_release_a_lease(server):
    grant = acquire(server, "holder")
    for response in (renew(server, grant["lease"], "other"), release(server, grant["lease"], "x")):
        assert response.status_code == 403
        assert response.json()["error"] == "not_your_lease"
    assert renew(server, grant["lease"], "holder").status_code == 200


@pytest.mark.parametrize("call", [renew, release])
def test_malformed_and_unknown_lease_ids(server, call):
    assert call(server, "not-a-lease", "holder").status_code == 422
    assert call(server, "ABCDEF" * 5 + "00", "holder").status_code == 422  # upper case
    unknown = call(server, uuid.uuid4().hex, "holder")
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_lease"


# ---- shard downloads -----------------------------------------------------------------------


def test_a_shard_downloads_whole_and_verified_in_either_encoding(server):
    grant = acquire(server, "downloader")
    shard = grant["shard"]
    before = server.info()["traffic"]["shard"]
    headers = {**server.as_node("downloader"), "Accept-Encoding": "identity"}
    plain = server.get(f"/shards/{shard['id']}", headers=headers)
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    raw = plain.content
    assert hashlib.sha256(raw).hexdigest() == shard["sha256"]
    assert plain.headers["x-crowdtrain-sha256"] == shard["sha256"]
    assert len(raw) == shard["tokens"] * np.dtype(shard["dtype"]).itemsize
    assert raw == server.runtime.leases.shards[shard["id"]].path.read_bytes()

    headers["Accept-Encoding"] = "zstd"
    packed = server.get(f"/shards/{shard['id']}", headers=headers)
    assert packed.status_code == 200 and packed.headers["content-encoding"] == "zstd"
    assert zstandard.ZstdDecompressor().decompress(packed.content) == raw
    assert len(packed.content) < len(raw)

    expected = {"wire": len(raw) + len(packed.content), "raw": 2 * len(raw)}
    assert server.node("downloader")["traffic"]["shard"] == expected
    after = server.info()["traffic"]["shard"]
    assert {k: after[k] - before[k] for k in after} == expected


def test_validation_and_unknown_shards_are_not_served(server):
    runtime = server.runtime
    valid = runtime.store.tokenized(
        runtime.dataset, "valid", runtime.tokenizer, runtime.settings.shard_tokens
    )
    unknown = max(runtime.leases.shards) + 10_000
    before = server.info()["traffic"]["shard"]
    for shard_id in [s.id for s in valid.shards] + [unknown]:
        assert shard_id not in runtime.leases.shards
        response = server.get(f"/shards/{shard_id}", headers=server.as_node("peek"))
        assert response.status_code == 404
        assert response.json()["error"] == "unknown_shard"
        assert str(shard_id) in response.json()["detail"]
    assert server.info()["traffic"]["shard"] == before


# ---- updates that finish shards -------------------------------------------------------------


def test_an_update_finishing_a_lease_puts_its_shard_in_the_ledger(server):
    grant = acquire(server, "worker")
    body, update_id = node_update(server, leases=[grant["lease"]])
    receipt, version = submit_and_apply(server, body, "worker")
    assert receipt["accepted"] and receipt["leases"] == {grant["lease"]: "submitted"}

    ledger = coverage(server)
    rows = [row for row in ledger["ledger"] if row["lease"] == grant["lease"]]
    assert len(rows) == 1
    row = rows[0]
    assert row["shard"] == grant["shard"]["index"] and row["node"] == "worker"
    assert row["update_id"] == update_id and row["version"] == version
    assert grant["shard"]["index"] not in ledger["missing"] and ledger["duplicates"] == []
    assert ledger["completed"] == len(ledger["ledger"]) and ledger["leases"]["completed"] >= 1
    # the shard is done: its lease can no longer be renewed
    finished = renew(server, grant["lease"], "worker")
    assert finished.status_code == 409 and finished.json()["error"] == "lease_lost"


def test_naming_another_nodes_lease_is_answered_but_the_update_still_counts(server):
    grant = acquire(server, "owner")
    body, _ = node_update(server, leases=[grant["lease"]])
    receipt, _ = submit_and_apply(server, body, "thief")
    assert receipt["accepted"] and receipt["leases"] == {grant["lease"]: "not_your_lease"}
    assert all(row["lease"] != grant["lease"] for row in coverage(server)["ledger"])
    assert renew(server, grant["lease"], "owner").status_code == 200  # still the owner's


def test_a_stale_update_leaves_its_lease_with_the_node(server):
    if server.version()[0] == 0:
        submit_and_apply(server, node_update(server)[0], "warmup")
    grant = acquire(server, "late")
    version, _ = server.version()
    body, _ = node_update(server, leases=[grant["lease"]], base_version=version - 1)
    response = server.post_update(body, node="late")
    assert response.status_code == 409 and response.json()["error"] == "stale"
    assert renew(server, grant["lease"], "late").status_code == 200
    assert all(row["lease"] != grant["lease"] for row in coverage(server)["ledger"])
    # and the node may finish it with a fresh update
    body, _ = node_update(server, leases=[grant["lease"]])
    receipt, _ = submit_and_apply(server, body, "late")
    assert receipt["leases"] == {grant["lease"]: "submitted"}
    assert any(row["lease"] == grant["lease"] for row in coverage(server)["ledger"])


def test_an_update_finishing_leases_must_carry_an_update_id(server):
    grant = acquire(server, "anonymous-update")
    version, lineage = server.version()
    spec = server.runtime.manifest.params[0]
    deltas = TopKCompressor(0.01, get_value_codec("fp16")).compress(
        {spec.name: torch.randn(spec.shape)}
    )
    meta = UpdateMeta(
        format=UPDATE_FORMAT,
        value_codec="fp16",
        base_version=version,
        lineage=lineage,
        samples=8,
        tokens=1024,
        loss=5.0,
        leases=grant["lease"],
        seq=next_seq(),
    )
    response = server.post_update(encode_update(deltas, meta), node="anonymous-update")
    assert response.status_code == 422
    assert response.json()["error"] == "bad_metadata" and "update_id" in response.json()["detail"]
    assert server.version()[0] == version
    assert renew(server, grant["lease"], "anonymous-update").status_code == 200


def test_an_epoch_not_started_has_no_ledger(server):
    response = server.get("/data/epochs/99")
    assert response.status_code == 404 and response.json()["error"] == "unknown_epoch"
    assert server.get("/data/epochs/-1").status_code == 422
    assert server.get(f"/data/epochs/{2**63}").status_code == 422  # not a 500 from the database


def test_a_shard_that_cannot_be_read_is_gone_not_a_server_error(start_server):
    broken = start_server(shard_tokens=ONE_SHARD * 4)
    grant = acquire(broken, "reader")
    shard = broken.runtime.leases.shards[grant["shard"]["id"]]
    shard.path.unlink()  # deleted under the running server
    response = broken.client.get(API + f"/shards/{shard.id}", headers=broken.as_node("reader"))
    assert response.status_code == 410 and response.json()["error"] == "shard_gone"
    assert broken.get("/health").status_code == 200


def test_local_data_updates_are_accepted_and_counted(server):
    submit_and_apply(server, node_update(server, data_source="local")[0], "own-files")
    submit_and_apply(server, node_update(server)[0], "own-files")
    node = server.node("own-files")
    assert node["updates_accepted"] == 2 and node["local_data_updates"] == 1


def test_a_server_can_refuse_local_data(start_server):
    strict = start_server(shard_tokens=ONE_SHARD, allow_local_data=False)
    version, _ = strict.version()
    response = strict.post_update(node_update(strict, data_source="local")[0], node="own-files")
    assert response.status_code == 422
    assert response.json()["error"] == "local_data_refused"
    assert "--data" in response.json()["detail"]
    assert strict.version()[0] == version
    node = strict.node("own-files")
    assert node["updates_refused"] == 1 and node["updates_accepted"] == 0
    submit_and_apply(strict, node_update(strict)[0], "own-files")  # its shards: accepted
    assert strict.node("own-files")["local_data_updates"] == 0


# ---- uploads -------------------------------------------------------------------------------


def test_an_uploaded_file_is_imported_once(server):
    content = jsonl("the first document", "the second one", "and a third")
    response = upload(server, "notes", "notes.jsonl", content)
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["dataset"] == "notes" and report["split"] == "train"
    assert report["changed"] and report["documents"] == 3 and report["duplicates"] == 0
    assert report["imported"] == ["upload:notes.jsonl"]
    assert (
        report["summary"].startswith("imported 3 document(s)")
        and "notes/train" in report["summary"]
    )

    shown = server.get("/datasets/notes").json()
    (split,) = shown["splits"]
    assert split["name"] == "train" and split["documents"] == 3
    (source,) = split["sources"]
    assert source["path"] == "upload:notes.jsonl"
    assert source["sha256"] == hashlib.sha256(content).hexdigest()
    assert source["size"] == len(content)

    again = upload(server, "notes", "notes.jsonl", content)
    assert again.status_code == 200
    assert not again.json()["changed"] and again.json()["documents"] == 0
    assert again.json()["summary"].startswith("nothing changed")
    assert server.get("/datasets/notes").json()["splits"][0]["documents"] == 3
    assert leftover_uploads(server) == []


def test_a_repeated_upload_is_named_as_uploaded(server):
    content = jsonl("said once", "said twice")
    assert upload(server, "echo", "echo.jsonl", content).status_code == 200
    again = upload(server, "echo", "echo.jsonl", content).json()
    assert again["skipped"] == ["upload:echo.jsonl"]


@pytest.mark.parametrize(
    ("filename", "content", "expected"),
    [
        ("latin.txt", "caf\u00e9 au lait\n".encode("latin-1"), "not valid UTF-8 at line 1"),
        ("broken.jsonl", b'{"text": "fine"}\n{"text": \n', "line 2: invalid JSON"),
        ("table.xml", b"<doc>text</doc>\n", "unsupported file type '.xml'"),
        ("empty.jsonl", b"", "is empty"),
        ("chat.jsonl", b'{"prompt": "hi"}\n', "line 1"),
    ],
)
def test_a_bad_file_is_refused_naming_the_problem(server, filename, content, expected):
    before = server.get("/datasets").json()
    split = "annotated" if filename == "chat.jsonl" else "train"
    response = upload(server, "refused", filename, content, split=split)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["error"] == "bad_data"
    assert error["detail"].startswith(filename) and expected in error["detail"]
    assert ".upload-" not in error["detail"]  # the temp folder stays private
    assert server.get("/datasets").json() == before
    assert server.get("/datasets/refused").status_code == 404
    assert leftover_uploads(server) == []


def test_a_refused_upload_leaves_no_directory(server):
    assert upload(server, "debris", "bad.jsonl", b"{not json}\n").status_code == 422
    assert not (server.runtime.data_dir / "datasets" / "debris").exists()


@pytest.mark.parametrize(
    ("name", "split", "filename"),
    [
        ("..%2Fescaped", "train", "a.jsonl"),
        ("a b", "train", "a.jsonl"),
        (".hidden", "train", "a.jsonl"),
        ("fine", "test", "a.jsonl"),
        ("fine", "train", "..%2Fa.jsonl"),
        ("fine", "train", ".a.jsonl"),
    ],
)
def test_path_characters_and_unknown_splits_are_refused(server, name, split, filename):
    data_dir = server.runtime.data_dir
    entries = sorted(p.name for p in data_dir.iterdir())
    datasets = sorted(p.name for p in (data_dir / "datasets").iterdir())
    response = upload(server, name, filename, jsonl("text"), split=split)
    assert response.status_code in (404, 422), response.text
    assert sorted(p.name for p in data_dir.iterdir()) == entries
    assert sorted(p.name for p in (data_dir / "datasets").iterdir()) == datasets
    assert "fine" not in dataset_names(server)
    assert leftover_uploads(server) == []


def test_an_upload_over_the_cap_is_refused_before_import(start_server):
    capped = start_server(shard_tokens=ONE_SHARD, max_upload_mb=0.001)
    cap = int(0.001 * (1 << 20))
    content = jsonl(*(f"document number {i}" for i in range(100)))
    assert len(content) > cap

    declared = upload(capped, "big", "big.jsonl", content)
    assert declared.status_code == 413 and declared.json()["error"] == "too_large"

    def chunks():  # no Content-Length: counted as it streams
        for start in range(0, len(content), 256):
            yield content[start : start + 256]

    streamed = upload(capped, "big", "big.jsonl", chunks())
    assert streamed.status_code == 413 and streamed.json()["error"] == "too_large"
    assert "big" not in dataset_names(capped)
    assert leftover_uploads(capped) == []
    assert upload(capped, "big", "small.jsonl", jsonl("short")).status_code == 200


# ---- what the server reports ---------------------------------------------------------------


def test_the_embedded_corpus_is_listed_with_its_splits(server):
    listed = {d["name"]: d for d in server.get("/datasets").json()}
    splits = {s["name"]: s for s in listed[DEFAULT_DATASET]["splits"]}
    assert {"train", "valid"} <= set(splits)
    data = server.runtime.train_data
    assert splits["train"]["documents"] == data.documents > 0
    assert splits["train"]["tokens"] == data.tokens
    assert splits["train"]["shards"] == len(data.shards) > 1
    assert splits["valid"]["documents"] > 0

    shown = server.get(f"/datasets/{DEFAULT_DATASET}").json()
    train = next(s for s in shown["splits"] if s["name"] == "train")
    (tokenization,) = train["tokenizations"]
    assert tokenization["shard_tokens"] == SERVER_SETTINGS["shard_tokens"]
    assert tokenization["tokenizer_version"] == server.runtime.tokenizer.version
    assert not tokenization["stale"]
    missing = server.get("/datasets/no-such-dataset")
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_dataset"


def test_data_status_and_info_describe_the_training_data(server):
    status = server.get("/data/status").json()
    data = server.runtime.train_data
    assert status["dataset"] == DEFAULT_DATASET and status["split"] == "train"
    assert status["shards"] == len(data.shards) and status["tokens"] == data.tokens
    assert status["lease_ttl_s"] == 60.0 and status["epoch"] == 0
    assert status["completed_epochs"] == 0

    acquire(server, "counted-lease")
    after = server.get("/data/status").json()
    assert after["active_leases"] == status["active_leases"] + 1

    info = server.info()
    assert info["corpus"] == DEFAULT_DATASET
    assert info["data"]["dataset"] == DEFAULT_DATASET
    assert info["data"]["shards"] == len(data.shards) and info["data"]["epoch"] == 0


def test_validation_results_name_their_dataset_and_sample(start_server):
    evaluated = start_server(
        shard_tokens=ONE_SHARD, evaluate=True, eval_batches=1, eval_batch_size=2
    )
    deadline = time.monotonic() + 20
    while not (evals := evaluated.get("/history").json()["evals"]):
        assert time.monotonic() < deadline, "no validation result within 20 s"
        time.sleep(0.05)
    record = evals[0]
    assert record["version"] == 0 and record["dataset"] == DEFAULT_DATASET
    assert record["sample_tokens"] == 1 * 2 * evaluated.runtime.config.block_size
    assert math.isfinite(record["valid_loss"]) and record["valid_loss"] > 0
