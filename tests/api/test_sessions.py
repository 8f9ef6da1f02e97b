"""Node WebSocket sessions on the in-process app: handshake, hello/welcome, pushes, heartbeat
loss, bans, the session cap, bad messages and the shutdown notice."""

from __future__ import annotations

import contextlib
import json
import time

import anyio
import pytest
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from crowdtrain.protocol.session import MAX_MESSAGE_BYTES, Heartbeat, Hello

from .conftest import ADMIN, API, Server

SESSION_TIMEOUT_S = 2.0
SERVER_SETTINGS = {
    "heartbeat_s": 0.5,
    "session_timeout_s": SESSION_TIMEOUT_S,
    "max_sessions": 2,
    "max_auth_failures_per_min": 1000,
}
URL = API + "/nodes/session"
HELLO = Hello(software_version="test", device="cpu", device_name="test cpu", cpu_count=2)


def receive(ws, timeout: float = 10.0) -> dict:
    """The next message, failing after `timeout` seconds (TestClient's own receive blocks for
    ever); raises WebSocketDisconnect when the server closed the session."""

    async def next_message():
        with anyio.fail_after(timeout):
            return await ws._send_rx.receive()

    message = ws.portal.call(next_message)
    ws._raise_on_close(message)
    return json.loads(message["text"])


def receive_until(ws, kind: str, timeout: float = 10.0) -> dict:
    """The next message of type `kind`, skipping others."""
    deadline = time.monotonic() + timeout
    while True:
        message = receive(ws, max(0.1, deadline - time.monotonic()))
        if message["type"] == kind:
            return message


def expect_close(ws, code: int, error: str | None = None) -> None:
    """The server sends `error` (when given), then closes with `code`."""
    if error is not None:
        message = receive_until(ws, "error")
        assert message["code"] == error, message
    with pytest.raises(WebSocketDisconnect) as closed:
        while True:
            receive(ws)
    assert closed.value.code == code


@contextlib.contextmanager
def open_session(server: Server, name: str, headers: dict | None = None):
    """A connected session that said hello: (websocket, welcome)."""
    with server.client.websocket_connect(URL, headers=headers or server.as_node(name)) as ws:
        ws.send_text(HELLO.to_json())
        welcome = receive(ws)
        assert welcome["type"] == "welcome", welcome
        yield ws, welcome


def wait_for(predicate, timeout: float = 10.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def hub(server: Server):
    return server.client.app.state.sessions


def no_sessions(server: Server) -> None:
    wait_for(lambda: not hub(server).sessions, what="the earlier sessions to end")


# ---- the handshake ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, status, code",
    [
        ({}, 401, "not_authenticated"),
        ({"Authorization": "Bearer not.a.jwt"}, 401, "bad_token"),
        ({"Authorization": "Basic abc"}, 401, "bad_token"),
        (ADMIN, 403, "forbidden"),  # an admin token is not a node's
    ],
)
def test_handshake_without_a_node_token_is_refused(server: Server, headers, status, code):
    with pytest.raises(WebSocketDenialResponse) as refused:
        server.client.websocket_connect(URL, headers=headers).__enter__()
    assert refused.value.status_code == status
    assert refused.value.json()["error"] == code


def test_hello_gets_welcome_density_and_shows_in_info(server: Server):
    with open_session(server, "sess-hello") as (ws, welcome):
        version, lineage = server.version()
        assert welcome["node_id"] == "sess-hello"
        assert welcome["heartbeat_s"] == SERVER_SETTINGS["heartbeat_s"]
        assert (welcome["version"], welcome["lineage"]) == (version, lineage)
        assert receive(ws)["type"] == "density"
        ws.send_text(Heartbeat(status="training", version=version, rss_bytes=1 << 20).to_json())
        node = wait_for(
            lambda: (n := server.node("sess-hello")) and n["status"] == "training" and n,
            what="the heartbeat in /info",
        )
        assert node["state"] == "online" and node["connected"]
        assert node["capabilities"]["device"] == "cpu"
        assert node["capabilities"]["device_name"] == "test cpu"
        assert node["rss_bytes"] == 1 << 20 and node["held_version"] == version
    node = wait_for(lambda: (n := server.node("sess-hello"))["state"] == "gone" and n)
    assert node["gone_reason"] == "disconnected" and not node["connected"]


def test_the_location_a_node_reports_reaches_the_node_list(server: Server):
    """`crowdtrain node --location LAT,LON` travels in the hello; the UI's map reads it from
    the node's capabilities in /info."""
    no_sessions(server)
    hello = HELLO.model_copy(update={"location": "52.52,13.40"})
    with server.client.websocket_connect(URL, headers=server.as_node("berlin")) as ws:
        ws.send_text(hello.to_json())
        assert receive(ws)["type"] == "welcome"
        node = wait_for(lambda: server.node("berlin"), what="the node in /info")
        assert node["capabilities"]["location"] == "52.52,13.40"
        assert node["state"] == "online"


@pytest.mark.parametrize(
    "frame, error, code",
    [
        ("not json", "bad_message", 1008),
        (json.dumps({"type": "nonsense"}), "bad_message", 1008),
        (Heartbeat(status="training").to_json(), "bad_message", 1008),  # not hello first
        (json.dumps({**HELLO.model_dump(), "extra": 1}), "bad_message", 1008),
        (json.dumps({**HELLO.model_dump(), "protocol": 99}), "bad_message", 1008),
        ("x" * (MAX_MESSAGE_BYTES + 1), "message_too_big", 1009),
        (b"\x00binary", "bad_message", 1008),
    ],
)
def test_a_bad_first_message_gets_an_error_and_a_close(server: Server, frame, error, code):
    with server.client.websocket_connect(URL, headers=server.as_node("sess-bad")) as ws:
        ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_text(frame)
        expect_close(ws, code, error)
    assert server.get("/health").json()["status"] == "ok"


def test_a_bad_message_later_closes_the_session(server: Server):
    with open_session(server, "sess-later") as (ws, _):
        ws.send_text(HELLO.to_json())  # hello comes once
        expect_close(ws, 1008, "bad_message")
    node = wait_for(lambda: (n := server.node("sess-later"))["state"] == "gone" and n)
    assert node["gone_reason"] == "bad_message"


# ---- pushes ------------------------------------------------------------------------------


def test_a_new_version_is_pushed(server: Server):
    with open_session(server, "sess-version") as (ws, welcome):
        response = server.post_update(server.update_body(), node="sess-version")
        assert response.status_code == 202, response.text
        pushed = receive_until(ws, "version")
        assert pushed == {
            "type": "version",
            "version": welcome["version"] + 1,
            "lineage": welcome["lineage"],
        }


def test_round_deadline_and_density_changes_are_pushed(server: Server, monkeypatch):
    coordinator = server.runtime.coordinator
    with open_session(server, "sess-round") as (ws, _):
        deadline = time.monotonic() + 7.0
        monkeypatch.setattr(coordinator, "round_deadline", lambda: deadline)
        monkeypatch.setattr(coordinator, "density_advice", lambda: 0.125)
        round_message = receive_until(ws, "round")
        assert round_message["version"] == coordinator.version + 1
        assert 5.0 < round_message["closes_in_s"] <= 7.0
        assert receive_until(ws, "density")["max_density"] == 0.125


def test_a_released_lease_is_offered_to_waiting_nodes(server: Server):
    with open_session(server, "sess-waiter") as (ws, _):
        ws.send_text(Heartbeat(status="waiting_for_shard").to_json())
        wait_for(lambda: server.node("sess-waiter")["status"] == "waiting_for_shard")
        holder = server.as_node("sess-holder")
        lease = server.client.post(API + "/leases", headers=holder).json()["lease"]
        assert lease is not None
        response = server.client.delete(f"{API}/leases/{lease}", headers=holder)
        assert response.status_code == 204
        assert receive_until(ws, "lease_offer")["free"] == 1


# ---- ending sessions ---------------------------------------------------------------------


def test_heartbeat_loss_marks_the_node_gone(server: Server):
    with open_session(server, "sess-silent") as (ws, _):
        for _ in range(6):  # beating: kept well past the timeout
            ws.send_text(Heartbeat(status="training").to_json())
            time.sleep(SESSION_TIMEOUT_S / 4)
        assert server.node("sess-silent")["state"] == "online"
        went_quiet = time.monotonic()
        expect_close(ws, 1008, "heartbeat_timeout")
        assert time.monotonic() - went_quiet < SESSION_TIMEOUT_S + 1.5
    node = server.node("sess-silent")
    assert node["state"] == "gone" and node["gone_reason"] == "heartbeat_timeout"


def test_a_ban_closes_the_session_and_the_door(server: Server):
    credentials = server.register("sess-banned", token=server.enrollment_token())
    headers = {"Authorization": f"Bearer {credentials['access_token']}"}
    with open_session(server, "sess-banned", headers) as (ws, _):
        response = server.client.delete(API + "/nodes/sess-banned", headers=ADMIN)
        assert response.status_code == 200, response.text
        expect_close(ws, 1008, "node_revoked")
    node = server.node("sess-banned")
    assert node["state"] == "gone" and node["gone_reason"] == "banned"
    with pytest.raises(WebSocketDenialResponse) as refused:
        server.client.websocket_connect(URL, headers=headers).__enter__()
    assert refused.value.status_code == 403
    assert refused.value.json()["error"] == "node_revoked"


def test_a_second_session_replaces_the_first(server: Server):
    no_sessions(server)
    with (
        open_session(server, "sess-twice") as (first, _),
        open_session(server, "sess-twice") as (second, _),
    ):
        expect_close(first, 1008, "session_replaced")
        second.send_text(Heartbeat(status="training").to_json())
        assert server.node("sess-twice")["state"] == "online"
    assert server.node("sess-twice")["sessions"] == 2


def test_sessions_over_max_sessions_are_refused(server: Server):
    no_sessions(server)
    with (
        open_session(server, "sess-max-1"),
        open_session(server, "sess-max-2"),
        server.client.websocket_connect(URL, headers=server.as_node("sess-max-3")) as ws,
    ):
        expect_close(ws, 1013, "too_many_sessions")


def test_shutdown_is_announced(server: Server):
    """Last in this module: it stops the hub of the module's server."""
    with open_session(server, "sess-shutdown") as (ws, _):
        ws.portal.call(hub(server).stop)
        notice = receive_until(ws, "shutdown")
        assert notice["retry_after_s"] > 0 and "shutdown" in notice["reason"]
        expect_close(ws, 1012)
