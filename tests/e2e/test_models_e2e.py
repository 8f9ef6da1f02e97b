"""`crowdtrain models` against a real server process, and a chat client that hangs up on a real
HTTP server (docs/models.md)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

from crowdtrain.demo import Swarm, free_port, wait_until_up
from crowdtrain.model.bundle import load_bundle
from crowdtrain.server import inference
from crowdtrain.server.app import create_app
from crowdtrain.settings import ServerSettings

pytestmark = pytest.mark.slow
ADMIN_TOKEN = "ct_admin_" + "models" * 6


def crowdtrain(url: str, token: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CROWDTRAIN_")}
    env.update({"COLUMNS": "200", "CROWDTRAIN_SERVER": url, "CROWDTRAIN_ADMIN_TOKEN": token})
    return subprocess.run(
        [sys.executable, "-m", "crowdtrain", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=cwd,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_models_cli_round_trip(tmp_path):
    (tmp_path / "logs").mkdir()
    swarm, port = Swarm(tmp_path / "logs"), free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        swarm.start_server(port, tmp_path / "data", "tiny", {"CROWDTRAIN_EVALUATE": "false"})
        wait_until_up(url, swarm.server, timeout=120)
        token = swarm.admin_token
        models = json.loads(ok(crowdtrain(url, token, "models", "list", "--json")).stdout)
        assert models[0]["id"] == "current"
        assert "current" in ok(crowdtrain(url, token, "models", "list")).stdout

        ok(crowdtrain(url, token, "models", "download", "current", cwd=tmp_path))
        [bundle] = list(tmp_path.glob("crowdtrain-current-v*.zip"))
        assert load_bundle(bundle).info.version == models[0]["version"]
        again = crowdtrain(url, token, "models", "download", "-o", str(bundle))
        assert again.returncode == 2 and "pass --force" in again.stderr

        record = json.loads(
            ok(
                crowdtrain(url, token, "models", "import", str(bundle), "--name", "a", "--json")
            ).stdout
        )
        assert record["id"] == "imported:a"
        taken = crowdtrain(url, token, "models", "import", str(bundle), "--name", "a")
        assert taken.returncode == 2 and "model_exists" in taken.stderr
        junk = tmp_path / "junk.zip"
        junk.write_bytes(b"no zip")
        refused = crowdtrain(url, token, "models", "import", str(junk))
        assert refused.returncode == 2 and "bad_bundle" in refused.stderr

        copy = tmp_path / "copy.zip"
        ok(crowdtrain(url, token, "models", "download", "imported:a", "-o", str(copy)))
        assert copy.read_bytes() == bundle.read_bytes()
        ok(crowdtrain(url, token, "models", "remove", "imported:a"))
        gone = crowdtrain(
            url, token, "models", "download", "imported:a", "-o", str(copy), "--force"
        )
        assert gone.returncode == 2 and "unknown_model" in gone.stderr
    finally:
        swarm.stop_server(timeout=30)


def test_a_client_that_hangs_up_stops_its_reply(tmp_path, monkeypatch):
    real_generate = inference.generate
    produced = {"tokens": 0}

    def slow_generate(*args, **kwargs):
        for token in real_generate(*args, **kwargs):
            time.sleep(0.02)
            produced["tokens"] += 1
            yield token

    monkeypatch.setattr(inference, "generate", slow_generate)
    settings = ServerSettings(
        data_dir=tmp_path, model="tiny", evaluate=False, admin_token=ADMIN_TOKEN
    )
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.1)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.stream(
            "POST", f"http://127.0.0.1:{port}/api/v1/chat", json=body, headers=headers, timeout=60
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
        service = app.state.runtime.inference
        deadline = time.monotonic() + 10
        while service.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.active == 0
        assert produced["tokens"] < 200  # 1000 would take 20 s
    finally:
        server.should_exit = True
        thread.join(timeout=60)
