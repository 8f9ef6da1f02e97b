"""WebSocket node sessions with real processes: a server restart is ridden out with no operator
action, and a node banned mid-session is disconnected, exits, and cannot register again."""

from __future__ import annotations

import httpx
import pytest
from conftest import E2E  # tests/e2e/conftest.py (this folder is not a package)

from crowdtrain.demo import wait_until_up

pytestmark = pytest.mark.slow

NODES = {"demo-node-0", "demo-node-1"}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """One server and two nodes for the module (the restart test runs first, the ban last)."""
    harness = E2E(tmp_path_factory.mktemp("sessions-e2e"))
    try:
        harness.start_server(evaluate="false", heartbeat_s=0.5, session_timeout_s=3)
        harness.start_nodes(2, max_backoff_s="2")
        yield harness
    finally:
        harness.swarm.stop_nodes(timeout=20)
        harness.swarm.stop_server(timeout=30)


def sessions(swarm: E2E) -> dict[str, dict]:
    return {n["node_id"]: n for n in swarm.get("/info")["nodes"]}


def online(swarm: E2E, names: set[str], timeout: float) -> dict[str, dict]:
    return swarm.wait_for(
        lambda: (
            (nodes := sessions(swarm))
            and all(nodes.get(name, {}).get("state") == "online" for name in names)
            and nodes
        ),
        timeout,
        f"sessions of {sorted(names)} to be online",
    )


def test_sessions_come_back_after_a_server_restart(swarm: E2E):
    before = online(swarm, NODES, 60)
    assert all(before[name]["capabilities"]["device"] == "cpu" for name in NODES)

    swarm.swarm.stop_server(timeout=30)  # SIGTERM: the sessions get a shutdown notice
    swarm.swarm.start_server(swarm.port, swarm.data_dir, "tiny", swarm.server_env)
    wait_until_up(swarm.url, swarm.swarm.server, timeout=60)

    after = online(swarm, NODES, 30)  # the registry is new: these are the new sessions
    assert all(after[name]["sessions"] >= 1 for name in NODES)
    assert all(node.poll() is None for node in swarm.swarm.nodes), swarm.logs()
    for index in range(2):
        log = swarm.swarm.log_tail(f"node-{index}", lines=400)
        assert "the server is stopping" in log, log


def test_a_banned_node_is_disconnected_and_cannot_register_again(swarm: E2E):
    online(swarm, NODES, 30)
    banned = swarm.swarm.nodes[1]
    response = httpx.delete(
        f"{swarm.url}/api/v1/nodes/demo-node-1",
        params={"reason": "end-to-end test"},
        headers=swarm.admin,
        timeout=30,
    )
    assert response.status_code == 200, response.text

    assert banned.wait(timeout=20) == 1, swarm.logs()
    log = swarm.swarm.log_tail("node-1", lines=5)
    assert "demo-node-1 was banned by the server's admin" in log, log
    nodes = sessions(swarm)
    assert nodes["demo-node-1"]["state"] == "gone"
    assert nodes["demo-node-1"]["gone_reason"] == "banned"
    assert nodes["demo-node-0"]["state"] == "online"

    again = httpx.post(
        f"{swarm.url}/api/v1/nodes/register",
        json={"enrollment_token": swarm.swarm.enrollment_token(swarm.url), "name": "demo-node-1"},
        timeout=30,
    )
    assert again.status_code == 403, again.text
    assert again.json()["error"] == "token_revoked"
