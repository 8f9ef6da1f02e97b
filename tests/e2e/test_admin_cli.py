"""`crowdtrain tokens`, `nodes` and `audit` as an admin runs them: real CLI processes against
one real server (docs/security.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from crowdtrain.demo import Swarm, free_port, wait_until_up

pytestmark = pytest.mark.slow


@dataclass
class Server:
    url: str
    data_dir: Path
    admin_token: str  # what the server was given as CROWDTRAIN_ADMIN_TOKEN


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module; nothing trains on it."""
    root = tmp_path_factory.mktemp("admin-cli")
    (root / "logs").mkdir()
    swarm, port = Swarm(root / "logs"), free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        swarm.start_server(port, root / "server-data", "tiny", {"CROWDTRAIN_EVALUATE": "false"})
        wait_until_up(url, swarm.server, timeout=120)
        yield Server(url, root / "server-data", swarm.admin_token)
    finally:
        swarm.stop_server(timeout=30)


def crowdtrain(server: Server, *args: str, admin_token: str | None = None, **env: str):
    """Run `python -m crowdtrain ARGS` as the admin of `server` (another token with
    `admin_token`, none with ""), leaving out CROWDTRAIN_* of the tests' environment."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("CROWDTRAIN_")}
    clean.update({"COLUMNS": "200", "CROWDTRAIN_SERVER": server.url, **env})
    token = server.admin_token if admin_token is None else admin_token
    if token:
        clean["CROWDTRAIN_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "crowdtrain", *args],
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error line of a failed command, checking that it is one line and no traceback."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def as_json(result: subprocess.CompletedProcess):
    return json.loads(ok(result).stdout)


def register(server: Server, enrollment_token: str, name: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/v1/nodes/register",
        json={"enrollment_token": enrollment_token, "name": name},
        timeout=30,
    )


def test_tokens_are_created_listed_and_revoked(server):
    created = ok(
        crowdtrain(server, "tokens", "create", "--role", "node", "--uses", "2", "--expires", "7d")
    )
    secret = created.stdout.strip()
    assert secret.startswith("ct_enroll_") and "\n" not in secret  # stdout: the secret alone
    assert f"crowdtrain node --server {server.url} --token {secret}" in created.stderr
    assert "not shown again" in created.stderr

    viewer = as_json(crowdtrain(server, "tokens", "create", "--role", "viewer", "--json"))
    assert viewer["token"].startswith("ct_view_") and viewer["state"] == "active"
    info = f"{server.url}/api/v1/info"
    bearer = {"Authorization": f"Bearer {viewer['token']}"}
    assert httpx.get(info, headers=bearer, timeout=30).status_code == 200

    tokens = {t["id"]: t for t in as_json(crowdtrain(server, "tokens", "list", "--json"))}
    assert tokens[viewer["id"]]["role"] == "viewer"
    assert all("token" not in t for t in tokens.values())  # never a secret in a list
    assert any(t["prefix"] == secret[:14] and t["max_uses"] == 2 for t in tokens.values())
    table = ok(crowdtrain(server, "tokens", "list")).stdout
    assert viewer["prefix"] in table and "0/2" in table

    ok(crowdtrain(server, "tokens", "revoke", str(viewer["id"])))
    tokens = {t["id"]: t for t in as_json(crowdtrain(server, "tokens", "list", "--json"))}
    assert tokens[viewer["id"]]["state"] == "revoked"
    assert httpx.get(info, headers=bearer, timeout=30).status_code == 403


def test_a_registered_node_is_listed_banned_and_audited(server):
    enrollment = as_json(
        crowdtrain(server, "tokens", "create", "--role", "node", "--label", "ban-me", "--json")
    )
    answer = register(server, enrollment["token"], "cli-node")
    assert answer.status_code == 201, answer.text
    node = answer.json()

    nodes = {n["node_id"]: n for n in as_json(crowdtrain(server, "nodes", "list", "--json"))}
    assert nodes["cli-node"]["token_id"] == enrollment["id"]
    assert nodes["cli-node"]["revoked_at"] is None
    assert "cli-node" in ok(crowdtrain(server, "nodes", "list")).stdout

    banned = ok(crowdtrain(server, "nodes", "ban", "cli-node", "--reason", "poisoned updates"))
    assert "cli-node is banned" in banned.stderr and "revoked too" in banned.stderr
    refreshed = httpx.post(
        f"{server.url}/api/v1/nodes/refresh",
        json={"node_id": "cli-node", "refresh_token": node["refresh_token"]},
        timeout=30,
    )
    assert refreshed.status_code == 403 and refreshed.json()["error"] == "node_revoked"
    assert register(server, enrollment["token"], "cli-node-again").status_code == 403

    events = as_json(crowdtrain(server, "audit", "--limit", "50", "--json"))
    seen = {(e["action"], e["target"]) for e in events}
    assert ("token.create", f"token:{enrollment['id']}") in seen
    assert ("node.register", "node:cli-node") in seen
    assert ("node.revoke", "node:cli-node") in seen
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)
    bans = ok(crowdtrain(server, "audit", "--action", "node.revoke")).stdout
    assert "node:cli-node" in bans and "poisoned updates" in bans and "token.create" not in bans


def test_bad_input_and_a_wrong_admin_token_give_one_clear_line(server):
    wrong = crowdtrain(server, "tokens", "list", admin_token="ct_admin_" + "x" * 43)
    assert wrong.returncode == 1
    assert "the server refused the admin token" in one_line_error(wrong)

    viewer = as_json(crowdtrain(server, "tokens", "create", "--role", "viewer", "--json"))
    as_viewer = crowdtrain(server, "audit", admin_token=viewer["token"])
    assert "your token is a viewer token" in one_line_error(as_viewer)

    bad_uses = crowdtrain(server, "tokens", "create", "--role", "viewer", "--uses", "3")
    assert bad_uses.returncode == 2 and "only node tokens" in one_line_error(bad_uses)
    bad_expiry = crowdtrain(server, "tokens", "create", "--role", "node", "--expires", "soon")
    assert "'soon' is not a duration" in one_line_error(bad_expiry)
    assert "no node 'nobody'" in one_line_error(crowdtrain(server, "nodes", "ban", "nobody"))
    assert "no token 999999" in one_line_error(crowdtrain(server, "tokens", "revoke", "999999"))

    unreachable = crowdtrain(server, "nodes", "list", "--server", "http://127.0.0.1:9")
    assert "cannot reach the server at http://127.0.0.1:9" in one_line_error(unreachable)

    refused = as_json(crowdtrain(server, "audit", "--action", "auth.refused", "--json"))
    assert any(e["target"] == "/api/v1/tokens" for e in refused)


def test_an_offline_admin_token_is_accepted_by_the_running_server(server):
    made = crowdtrain(
        server,
        "tokens",
        "create",
        "--role",
        "admin",
        "--label",
        "recovery",
        "--data-dir",
        str(server.data_dir),
        "--json",
        admin_token="",  # lost: offline needs none
        CROWDTRAIN_SERVER="http://127.0.0.1:9",  # and no server either
    )
    token = as_json(made)
    assert token["token"].startswith("ct_admin_") and token["created_by"].startswith("local")

    listed = as_json(crowdtrain(server, "tokens", "list", "--json", admin_token=token["token"]))
    assert {"recovery"} <= {t["label"] for t in listed}
