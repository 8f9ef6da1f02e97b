"""kill -9 the server mid-run: it resumes from its newest checkpoint and the nodes carry on."""

from __future__ import annotations

import os
import signal

import pytest

from crowdtrain.demo import wait_until_up
from crowdtrain.server.checkpoints import CheckpointStore

pytestmark = pytest.mark.slow


def test_server_killed_and_restarted_nodes_continue(e2e):
    e2e.start_server(checkpoint_every=10, evaluate="false")
    e2e.start_nodes(2)
    e2e.wait_for(lambda: e2e.get("/info")["version"] >= 35, 120, "version 35")

    os.kill(e2e.swarm.server.pid, signal.SIGKILL)
    e2e.swarm.server.wait()
    newest = CheckpointStore(e2e.data_dir / "checkpoints").list()[0][0]
    assert newest >= 30 and newest % 10 == 0

    e2e.swarm.start_server(e2e.port, e2e.data_dir, "tiny", e2e.server_env)
    wait_until_up(e2e.url, e2e.swarm.server, timeout=120)
    info = e2e.get("/info")
    assert info["resumed_from"] == newest
    assert newest <= info["version"] <= newest + 5  # the nodes may already be back

    def both_back(info: dict) -> bool:
        # a node's retries back off (up to max_backoff_s) while the server is down, so one
        # may return several seconds after the other has already trained on
        accepted = {n["node_id"]: n["updates_accepted"] for n in info["nodes"]}
        return info["version"] >= newest + 20 and len(accepted) == 2 and min(accepted.values()) > 0

    e2e.wait_for(lambda: both_back(e2e.get("/info")), 180, "both nodes to train after the restart")
    assert all(node.poll() is None for node in e2e.swarm.nodes), e2e.logs()
    after = {n["node_id"]: n for n in e2e.get("/info")["nodes"]}
    assert set(after) == {"demo-node-0", "demo-node-1"}
    assert all(n["updates_accepted"] > 0 for n in after.values())
    rounds = e2e.get("/history")["rounds"]
    assert [r["version"] for r in rounds] == list(range(1, len(rounds) + 1))

    # Ctrl-C (SIGINT) stops a node cleanly: it finishes its upload and exits with status 0
    e2e.swarm.stop_nodes(timeout=60)
    assert [node.returncode for node in e2e.swarm.nodes] == [0, 0], e2e.logs()
