"""Server-shared data with real processes: a dataset imported with the CLI, leased to nodes;
a node killed while it holds a lease loses it, the shard is issued again, and the epoch's
ledger shows every shard completed exactly once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from crowdtrain.data.corpus import default_corpus

pytestmark = pytest.mark.slow

SHARD_TOKENS = 4096
LEASE_TTL_S = 4


def import_dataset(e2e, name: str, split: str, documents: list[str]) -> str:
    folder = e2e.root / f"{name}-{split}"
    folder.mkdir()
    for i, document in enumerate(documents):
        (folder / f"doc-{i:04d}.md").write_text(document, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "crowdtrain", "data", "import", str(folder)]
        + ["--dataset", name, "--split", split, "--data-dir", str(e2e.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr + done.stdout


def test_killed_node_shard_is_reissued_and_the_epoch_completes_once(e2e):
    corpus = default_corpus()
    report = import_dataset(e2e, "e2e-data", "train", corpus.train[:40])
    assert "imported 40 document(s)" in report
    import_dataset(e2e, "e2e-data", "valid", corpus.valid[:6])
    e2e.start_server(
        dataset="e2e-data", shard_tokens=SHARD_TOKENS, lease_ttl_s=LEASE_TTL_S, eval_every=50
    )
    status = e2e.get("/data/status")
    assert status["dataset"] == "e2e-data" and status["split"] == "train"
    shards = status["shards"]
    assert shards >= 6, status

    # the victim reads slowly (small batches), so it is caught holding a lease
    e2e.start_nodes(1, "--batch-size", "2")
    victim = e2e.swarm.nodes[0]
    held = e2e.wait_for(
        lambda: [
            h
            for h in e2e.get("/data/epochs/0").get("held", [])
            if h["node"] == "demo-node-0" and h["state"] == "active"
        ],
        120,
        "the first node to hold a lease",
    )
    victim.kill()  # SIGKILL: no goodbye, the lease is simply no longer renewed
    victim.wait(timeout=30)
    orphan = held[0]

    e2e.start_nodes(2, "--batch-size", "16")
    coverage = e2e.wait_for(
        lambda: (c := e2e.get("/data/epochs/0")).get("completed_at") is not None and c,
        300,
        "epoch 0 to complete",
    )
    ledger = coverage["ledger"]
    assert coverage["shards"] == shards and coverage["completed"] == shards
    assert coverage["missing"] == [] and coverage["duplicates"] == []
    assert sorted(entry["shard"] for entry in ledger) == list(range(shards))  # each exactly once
    assert coverage["leases"].get("expired", 0) >= 1, coverage["leases"]
    redone = next(entry for entry in ledger if entry["shard"] == orphan["shard"])
    assert redone["node"] != "demo-node-0" and redone["lease"] != orphan["lease"]

    info = e2e.get("/info")
    versions = {entry["version"] for entry in ledger}
    assert max(versions) <= info["version"]
    assert info["traffic"]["shard"]["wire"] > 0
    evals = e2e.get("/history")["evals"]
    assert evals and all(e["dataset"] == "e2e-data" for e in evals)
