"""RequestLimits: body caps (413) and body read timeouts (408), in-process.

The real app (caps on JSON routes, the self-capping routes left alone), and a small app driven
through raw ASGI calls for what TestClient cannot do: bodies that stream, stall or trickle.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi import FastAPI, Request, WebSocket
from fastapi.testclient import TestClient
from pydantic import BaseModel
from starlette.types import Message

from crowdtrain.server.limits import RequestLimits
from crowdtrain.settings import ServerSettings

from .conftest import ADMIN, API

SERVER_SETTINGS = {"max_request_kb": 1}
CAP = 1024


# ---- the real app ---------------------------------------------------------------------------


def test_a_declared_length_over_the_cap_is_refused_before_the_body_is_read(server):
    body = json.dumps({"role": "node", "label": "x" * CAP}).encode()
    response = server.client.post(
        API + "/tokens", content=body, headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    error = response.json()
    assert error["error"] == "too_large"
    assert f"{len(body)} bytes" in error["detail"]
    assert f"{CAP} bytes" in error["detail"] and "max_request_kb" in error["detail"]
    assert response.headers["connection"] == "close"


def test_a_registration_over_the_cap_is_refused_without_credentials(server):
    body = {"enrollment_token": "x" * 2 * CAP, "name": "big"}
    response = server.client.post(API + "/nodes/register", json=body)
    assert response.status_code == 413 and response.json()["error"] == "too_large"


def test_a_chunked_body_is_counted_as_it_streams(server):
    def chunks():
        for _ in range(3):
            yield b" " * 400  # no Content-Length: the middleware counts

    response = server.client.post(
        API + "/tokens", content=chunks(), headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert "max_request_kb" in response.json()["detail"]


def test_a_body_under_the_cap_is_served(server):
    response = server.client.post(API + "/tokens", json={"role": "node"}, headers=ADMIN)
    assert response.status_code == 201, response.text


def test_updates_cap_their_own_bodies(server):
    body = server.update_body(content_encoding="identity")
    assert len(body) > CAP
    response = server.post_update(body, node="limits-node", content_encoding="identity")
    assert response.status_code == 202, response.text


def test_uploads_cap_their_own_bodies(server):
    content = "".join(json.dumps({"text": f"document {i} " * 10}) + "\n" for i in range(40))
    assert len(content) > CAP
    response = server.client.put(
        API + "/datasets/big/train/files/big.jsonl",
        content=content.encode(),
        headers={**ADMIN, "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text


# ---- a small app, driven through raw ASGI calls ---------------------------------------------

PAUSE_S = 0.3
RATE = 1000  # bytes per second


class Item(BaseModel):
    text: str


def small_app() -> FastAPI:
    app = FastAPI()

    @app.post("/read")
    async def read(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.post("/model")
    async def parse(item: Item) -> dict:  # FastAPI reads the body: a failure would be its 400
        return {"size": len(item.text)}

    @app.post("/catch")
    async def catch(request: Request) -> dict:
        try:
            await request.body()
        except Exception:  # a route that answers its own failures is still overruled
            return {"caught": True}
        return {"caught": False}

    @app.post("/own-cap")
    async def own_cap(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    settings = ServerSettings(max_request_kb=1, body_timeout_s=PAUSE_S, min_body_rate=RATE)
    app.add_middleware(RequestLimits, settings=settings, self_capped=[("POST", "/own-cap")])
    return app


class Answer:
    def __init__(self, messages: list[Message], seconds: float):
        start = next(m for m in messages if m["type"] == "http.response.start")
        self.status = start["status"]
        self.headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
        self.body = b"".join(m.get("body", b"") for m in messages[1:])
        self.complete = not messages[-1].get("more_body", False) and len(messages) > 1
        self.seconds = seconds

    def json(self) -> dict:
        return json.loads(self.body)


def call(app, path: str, items: list, end: bool = True, headers=(), root_path: str = "") -> Answer:
    """POST a body of `items` (bytes: a chunk, float: a pause in seconds) to `app`; after the
    last, the body ends (end) or stalls."""

    script: list = [
        item
        if isinstance(item, float)
        else {"type": "http.request", "body": item, "more_body": True}
        for item in items
    ]
    if end:
        script.append({"type": "http.request", "body": b"", "more_body": False})

    async def run() -> Answer:
        async def receive() -> Message:
            while script and isinstance(script[0], float):
                await asyncio.sleep(script.pop(0))
            if script:
                return script.pop(0)
            await asyncio.Event().wait()  # a client that holds on, sending nothing
            raise AssertionError

        messages: list[Message] = []

        async def send(message: Message) -> None:
            messages.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": root_path,
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), *headers],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
        }
        started = time.monotonic()
        await asyncio.wait_for(app(scope, receive, send), 10)
        return Answer(messages, time.monotonic() - started)

    return asyncio.run(run())


@pytest.fixture(scope="module")
def app():
    return small_app()


BODY = json.dumps({"text": "hello"}).encode()


@pytest.mark.parametrize("path", ["/read", "/model", "/catch"])
def test_a_whole_body_under_the_cap_passes(app, path):
    answer = call(app, path, [BODY[:5], BODY[5:]])
    assert answer.status == 200 and answer.complete


@pytest.mark.parametrize("path", ["/read", "/model", "/catch"])
def test_a_stalled_body_gets_408_not_a_500(app, path):
    answer = call(app, path, [BODY[:5]], end=False)
    assert answer.status == 408, answer.body
    assert answer.json()["error"] == "body_timeout"
    assert "body_timeout_s" in answer.json()["detail"]
    assert answer.headers["connection"] == "close"
    assert PAUSE_S <= answer.seconds < PAUSE_S + 1


@pytest.mark.parametrize("path", ["/read", "/model", "/catch"])
def test_a_streamed_body_over_the_cap_gets_413(app, path):
    answer = call(app, path, [b" " * 600, b" " * 600, b"never read"])
    assert answer.status == 413, answer.body
    assert answer.json()["error"] == "too_large"
    assert "max_request_kb" in answer.json()["detail"]


def test_a_declared_length_over_the_cap_never_reaches_the_app(app):
    answer = call(app, "/read", [], end=False, headers=[(b"content-length", b"1025")])
    assert answer.status == 413 and "1025 bytes" in answer.json()["detail"]


def test_a_trickling_body_gets_408_once_it_took_the_timeout(app):
    trickle = [b" "] + [x for _ in range(40) for x in (0.02, b" " * 5)]  # ~250 B/s
    answer = call(app, "/read", trickle)
    assert answer.status == 408
    assert "min_body_rate" in answer.json()["detail"]
    assert PAUSE_S <= answer.seconds < PAUSE_S + 1


def test_a_body_that_keeps_the_rate_may_take_longer_than_the_timeout(app):
    steady = [b" "] + [x for _ in range(20) for x in (0.03, b" " * 40)]  # ~1300 B/s for 0.6 s
    answer = call(app, "/own-cap", steady)
    assert answer.status == 200 and answer.json() == {"size": 801}
    assert answer.seconds > PAUSE_S


def test_a_self_capped_route_is_not_capped_but_is_timed(app):
    assert call(app, "/own-cap", [b" " * 3000]).json() == {"size": 3000}
    assert call(app, "/own-cap", [b" "], end=False).status == 408


def test_a_self_capped_route_is_known_under_a_path_prefix():
    settings = ServerSettings(max_request_kb=1)

    async def read_all(scope, receive, send):
        size = 0
        while (message := await receive())["more_body"]:
            size += len(message["body"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": str(size).encode()})

    middleware = RequestLimits(read_all, settings, self_capped=[("POST", "/own-cap")])
    answer = call(middleware, "/prefix/own-cap", [b" " * 3000], root_path="/prefix")
    assert answer.status == 200 and answer.body == b"3000"
    assert call(middleware, "/prefix/other", [b" " * 3000], root_path="/prefix").status == 413


def test_other_errors_of_the_app_still_reach_the_server_error_handler():
    async def broken(scope, receive, send):
        raise ValueError("a bug")

    middleware = RequestLimits(broken, ServerSettings())
    with pytest.raises(ValueError, match="a bug"):
        call(middleware, "/read", [BODY])


def test_a_refusal_after_the_response_started_leaves_it_unfinished():
    async def early(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await receive()
        await receive()  # stalls: refused, so this raises into the app
        await send({"type": "http.response.body", "body": b"late"})

    middleware = RequestLimits(early, ServerSettings(body_timeout_s=PAUSE_S))
    answer = call(middleware, "/read", [b"x"], end=False)
    assert answer.status == 200 and not answer.complete  # uvicorn closes such a connection


def test_websockets_pass_untouched(app):
    with TestClient(app).websocket_connect("/ws") as websocket:
        websocket.send_text("x" * 5000)  # over the body cap: WebSocket messages are not bodies
        assert websocket.receive_text() == "x" * 5000
