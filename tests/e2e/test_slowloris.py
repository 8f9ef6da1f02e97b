"""Transport limits against real servers on 127.0.0.1, through raw sockets: slow headers
(slow-loris), stalled and oversized bodies, the connection cap.

Two servers: uvicorn in a thread serving a small app with `guarded_protocol` on either of
uvicorn's HTTP parsers (httptools, h11), and a real `crowdtrain server` process, which shows
that run_server wires the limits in. Every timeout is about a second.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from crowdtrain.demo import Swarm, free_port, wait_until_up
from crowdtrain.server.app import bind_socket
from crowdtrain.server.limits import RequestLimits, guarded_protocol
from crowdtrain.settings import ServerSettings

pytestmark = pytest.mark.slow

TIMEOUT_S = 1.0  # header_timeout_s and body_timeout_s of both servers
CAP_KB = 1
MAX_CONNECTIONS = 4


# ---- raw HTTP over a socket -------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def drip(sock: socket.socket, data: bytes, interval_s: float) -> None:
    """Send `data` a byte every `interval_s` until it is sent, or the server answers or closes."""
    for byte in data:
        readable, _, _ = select.select([sock], [], [], interval_s)
        if readable:
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


def read_until_closed(sock: socket.socket, timeout_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    sock.settimeout(timeout_s)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return status, headers, body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}


def parse(response: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    return status, headers, json.loads(body) if body else {}


def request(method: str, path: str, headers: dict[str, str] | None = None, body=b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def assert_slow_headers_are_cut_off(port: int, path: str) -> None:
    sock = connect(port)
    started = time.monotonic()
    drip(sock, request("GET", path), interval_s=0.2)  # ~8 s of headers
    response = read_until_closed(sock)
    took = time.monotonic() - started
    assert TIMEOUT_S <= took < TIMEOUT_S + 2, took
    status, headers, error = parse(response)
    assert status == 408 and error["error"] == "header_timeout", response
    assert "header_timeout_s" in error["detail"] and headers["connection"] == "close"


def assert_an_idle_connection_is_closed_without_an_answer(port: int) -> None:
    sock = connect(port)
    started = time.monotonic()
    assert read_until_closed(sock) == b""
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 2


def assert_a_slow_follow_up_request_is_cut_off(port: int, path: str) -> None:
    """The deadline of a keep-alive connection's next request starts at its first byte."""
    sock = connect(port)
    sock.sendall(request("GET", path))
    assert read_response(sock)[0] == 200
    time.sleep(TIMEOUT_S * 1.2)  # idle between requests: keep-alive's business, not this
    sock.sendall(b"G")
    started = time.monotonic()
    drip(sock, request("GET", path)[1:], interval_s=0.2)
    status, _, error = parse(read_until_closed(sock))
    assert status == 408 and error["error"] == "header_timeout"
    assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 2


# ---- uvicorn in a thread, a small app -----------------------------------------------------


def small_app() -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict:
        return {"hello": "world"}

    @app.get("/hold")
    async def hold(seconds: float) -> dict:
        await anyio.sleep(seconds)
        return {"held": seconds}

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    settings = ServerSettings(max_request_kb=CAP_KB, body_timeout_s=TIMEOUT_S)
    app.add_middleware(RequestLimits, settings=settings)
    return app


def protocol_base(name: str):
    if name == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return HttpToolsProtocol


@pytest.fixture(scope="module", params=["httptools", "h11"])
def small_server(request) -> Iterator[int]:
    sock = bind_socket("127.0.0.1", 0)
    config = uvicorn.Config(
        small_app(),
        http=guarded_protocol(TIMEOUT_S, protocol_base(request.param)),
        limit_concurrency=MAX_CONNECTIONS,
        log_level="warning",
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def test_slow_headers_get_408_and_are_closed(small_server):
    assert_slow_headers_are_cut_off(small_server, "/hello")


def test_an_idle_connection_is_closed(small_server):
    assert_an_idle_connection_is_closed_without_an_answer(small_server)


def test_a_slow_follow_up_request_is_closed(small_server):
    assert_a_slow_follow_up_request_is_cut_off(small_server, "/hello")


def test_a_slow_app_is_not_a_slow_client(small_server):
    """The header deadline ends when the headers are in: the app may take its time."""
    sock = connect(small_server)
    sock.sendall(request("GET", f"/hold?seconds={TIMEOUT_S * 2}"))
    status, _, body = read_response(sock)
    assert status == 200 and json.loads(body) == {"held": TIMEOUT_S * 2}


def test_a_stalled_body_gets_408(small_server):
    sock = connect(small_server)
    sock.sendall(request("POST", "/echo", {"Content-Length": "100"}, b"x" * 10))
    status, headers, error = parse(read_until_closed(sock))
    assert status == 408 and error["error"] == "body_timeout"
    assert headers["connection"] == "close"


def test_connections_past_the_cap_get_503(small_server):
    holders = [connect(small_server) for _ in range(MAX_CONNECTIONS)]
    for sock in holders:
        sock.sendall(request("GET", "/hold?seconds=2"))
    time.sleep(0.2)
    try:
        response = httpx.get(f"http://127.0.0.1:{small_server}/hello", timeout=10)
        assert response.status_code == 503
        assert response.json()["error"] == "too_many_connections"
        assert "max_connections" in response.json()["detail"]
        assert response.headers["retry-after"] == "1"
    finally:
        for sock in holders:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"http://127.0.0.1:{small_server}/hello", timeout=10).status_code == 200


# ---- a real `crowdtrain server` ----------------------------------------------------------


class RealServer:
    def __init__(self, swarm: Swarm, port: int):
        self.swarm = swarm
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.admin = swarm.admin


@pytest.fixture(scope="module")
def real_server(tmp_path_factory) -> Iterator[RealServer]:
    root = tmp_path_factory.mktemp("slowloris")
    (root / "logs").mkdir()
    swarm, port = Swarm(root / "logs"), free_port()
    settings = {
        "header_timeout_s": TIMEOUT_S,
        "body_timeout_s": TIMEOUT_S,
        "max_request_kb": CAP_KB,
        "max_connections": MAX_CONNECTIONS,
        "evaluate": "false",
    }
    env = {f"CROWDTRAIN_{name.upper()}": str(value) for name, value in settings.items()}
    try:
        swarm.start_server(port, root / "server-data", "tiny", env)
        wait_until_up(f"http://127.0.0.1:{port}", swarm.server, timeout=120)
        yield RealServer(swarm, port)
    finally:
        swarm.stop_server(timeout=30)


def test_the_server_cuts_off_slow_headers(real_server):
    assert_slow_headers_are_cut_off(real_server.port, "/api/v1/health")
    assert_an_idle_connection_is_closed_without_an_answer(real_server.port)
    assert_a_slow_follow_up_request_is_cut_off(real_server.port, "/api/v1/health")


def test_the_server_refuses_stalled_and_oversized_bodies(real_server):
    admin = {**real_server.admin, "Content-Type": "application/json"}
    sock = connect(real_server.port)
    sock.sendall(request("POST", "/api/v1/tokens", {**admin, "Content-Length": "50"}, b"{"))
    status, _, error = parse(read_until_closed(sock))
    assert status == 408 and error["error"] == "body_timeout", error

    big = json.dumps({"role": "node", "label": "x" * 2000}).encode()
    response = httpx.post(f"{real_server.url}/api/v1/tokens", content=big, headers=admin)
    assert response.status_code == 413 and response.json()["error"] == "too_large"
    assert "max_request_kb" in response.json()["detail"]

    sock = connect(real_server.port)  # no Content-Length: counted as it streams
    chunked = {**admin, "Transfer-Encoding": "chunked"}
    sock.sendall(request("POST", "/api/v1/tokens", chunked, b"400\r\n" + b" " * 1024 + b"\r\n"))
    sock.sendall(b"10\r\n" + b" " * 16 + b"\r\n")
    status, _, error = parse(read_until_closed(sock))
    assert status == 413 and error["error"] == "too_large"


def test_the_server_answers_503_past_max_connections_then_recovers(real_server):
    holders = [connect(real_server.port) for _ in range(MAX_CONNECTIONS)]
    for sock in holders:  # long polls: no new version comes without nodes
        sock.sendall(request("GET", "/api/v1/model/version?after=0&wait=3", real_server.admin))
    time.sleep(0.3)
    try:
        response = httpx.get(f"{real_server.url}/api/v1/health", timeout=10)
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "too_many_connections"
    finally:
        for sock in holders:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"{real_server.url}/api/v1/health", timeout=10).status_code == 200
    response = httpx.post(
        f"{real_server.url}/api/v1/tokens", json={"role": "node"}, headers=real_server.admin
    )
    assert response.status_code == 201, response.text
