"""A node on its own files (`crowdtrain node --data`) with real processes: its updates are
marked local and counted per node, and a server that takes only its own shards turns the
node away with a message that says what to do."""

from __future__ import annotations

import pytest

from crowdtrain.data.corpus import default_corpus

pytestmark = pytest.mark.slow


def write_notes(e2e) -> str:
    folder = e2e.root / "my-notes"
    folder.mkdir()
    for i, text in enumerate(default_corpus().train[:20]):
        (folder / f"note-{i}.md").write_text(text, encoding="utf-8")
    return str(folder)


def test_local_data_updates_are_marked_and_counted(e2e):
    notes = write_notes(e2e)
    e2e.start_server(eval_every=100)
    e2e.start_nodes(1, "--data", notes, "--max-updates", "6")
    node = e2e.swarm.nodes[0]
    node.wait(timeout=180)
    assert node.returncode == 0, e2e.logs()
    record = e2e.get("/info")["nodes"][0]
    assert record["updates_accepted"] == 6
    assert record["local_data_updates"] == 6
    assert record["traffic"]["shard"]["wire"] == 0  # it never downloaded a shard
    assert e2e.get("/data/status")["active_leases"] == 0


def test_a_server_without_local_data_turns_the_node_away(e2e):
    notes = write_notes(e2e)
    e2e.start_server(allow_local_data="false")
    e2e.start_nodes(1, "--data", notes)
    node = e2e.swarm.nodes[0]
    node.wait(timeout=120)
    assert node.returncode != 0
    log = e2e.swarm.log_tail("node-0", lines=40)
    assert "trains only on its own shards" in log and "without --data" in log, log
    assert e2e.get("/info")["totals"].get("updates", 0) == 0
