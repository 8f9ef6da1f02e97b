"""Models over the API: the list, bundle downloads that load back exactly, imports, and chat
replies streamed as server-sent events (with a tiny model)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

from crowdtrain.model.bundle import load_bundle
from crowdtrain.server import inference
from crowdtrain.server.inference import Sampling

from .conftest import ADMIN, API, Server

# room for a tiny model's bundle (3.5 MB), small enough to send one over the cap; one chat at a
# time, so that a second is refused
SERVER_SETTINGS = {"max_upload_mb": 8, "max_chat_streams": 1}
ZIP = {"Content-Type": "application/zip"}
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def viewer(server: Server) -> dict[str, str]:
    body = {"role": "viewer", "label": "models"}
    response = server.client.post(f"{API}/tokens", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


@pytest.fixture(scope="module")
def current_bundle(server: Server) -> bytes:
    response = server.get("/models/current/bundle")
    assert response.status_code == 200, response.text
    return response.content


def import_bundle(server: Server, name: str, content: bytes, headers=ZIP):
    return server.client.post(
        f"{API}/models/import", params={"name": name}, content=content, headers={**ADMIN, **headers}
    )


def chat(server: Server, headers=ADMIN, **body) -> tuple[int, list[dict]]:
    """(status, events): the data of each server-sent event, or the JSON error as one."""
    response = server.client.post(f"{API}/chat", json={"messages": HELLO, **body}, headers=headers)
    if response.headers["content-type"].startswith("application/json"):
        return response.status_code, [response.json()]
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line.removeprefix("data: "))
        for line in response.text.split("\n\n")
        if line.startswith("data: ")
    ]
    return response.status_code, events


# ---- list and download ---------------------------------------------------------------------


def test_the_list_has_current_and_the_kept_checkpoints(server: Server, viewer):
    response = server.get("/models", headers=viewer)
    assert response.status_code == 200, response.text
    models = {model["id"]: model for model in response.json()["models"]}
    version, _ = server.version()
    assert models["current"] == {
        "id": "current",
        "kind": "current",
        "version": version,
        "parameters": server.runtime.manifest.numel,
    }
    kept = [v for v, _ in server.runtime.checkpoints.list()]
    for v in kept:
        assert models[f"v{v}"]["kind"] == "checkpoint"
        assert models[f"v{v}"]["version"] == v
        assert models[f"v{v}"]["created_at"] <= time.time()


def test_the_current_bundle_loads_to_the_servers_exact_weights(server: Server, current_bundle):
    version, params = server.snapshot_params()
    bundle = load_bundle(current_bundle)
    assert bundle.info.version == version
    assert bundle.info.lineage == server.version()[1]
    assert bundle.info.preset == "tiny"
    assert bundle.tokenizer.to_json() == server.runtime.tokenizer.to_json()
    assert bundle.chat_template == server.runtime.chat_template
    loaded = dict(bundle.model.trainable_named_parameters())
    assert loaded.keys() == params.keys()
    for name, tensor in params.items():
        assert torch.equal(loaded[name], tensor), name


def test_download_names_the_file(server: Server):
    version, _ = server.version()
    response = server.get("/models/current/bundle")
    assert response.headers["content-type"] == "application/zip"
    disposition = response.headers["content-disposition"]
    assert disposition == f'attachment; filename="crowdtrain-current-v{version}.zip"'


def test_a_kept_checkpoint_downloads(server: Server):
    version, path = server.runtime.checkpoints.list()[0]
    response = server.get(f"/models/v{version}/bundle")
    assert response.status_code == 200, response.text
    bundle = load_bundle(response.content)
    checkpoint = server.runtime.checkpoints.load(path)
    assert bundle.info.version == version
    for name, param in bundle.model.trainable_named_parameters():
        assert torch.equal(param, checkpoint.params[name]), name


@pytest.mark.parametrize(
    "model_id, status", [("v123456", 404), ("imported:nothing", 404), ("latest", 422)]
)
def test_an_unknown_model(server: Server, model_id, status):
    response = server.get(f"/models/{model_id}/bundle")
    assert response.status_code == status, response.text
    if status == 404:
        assert response.json()["error"] == "unknown_model"


def test_viewers_may_list_but_not_download_weights(server: Server, viewer):
    assert server.get("/models", headers=viewer).status_code == 200
    response = server.get("/models/current/bundle", headers=viewer)
    assert response.status_code == 403 and response.json()["error"] == "forbidden"


# ---- import --------------------------------------------------------------------------------


def test_import_round_trip(server: Server, current_bundle):
    response = import_bundle(server, "round-trip", current_bundle)
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["id"] == "imported:round-trip" and record["kind"] == "imported"
    assert record["name"] == "round-trip" and record["bytes"] == len(current_bundle)
    assert record["parameters"] == server.runtime.manifest.numel
    listed = {m["id"]: m for m in server.get("/models").json()["models"]}
    assert listed["imported:round-trip"]["imported_at"] == record["imported_at"]
    download = server.get("/models/imported:round-trip/bundle")
    assert download.status_code == 200 and download.content == current_bundle
    assert "crowdtrain-imported-round-trip-v" in download.headers["content-disposition"]
    audit = server.get("/audit", params={"action": "model.import"}).json()["events"]
    assert audit[0]["target"] == "imported:round-trip"

    taken = import_bundle(server, "round-trip", current_bundle)
    assert taken.status_code == 409 and taken.json()["error"] == "model_exists"

    removed = server.client.delete(f"{API}/models/imported:round-trip", headers=ADMIN)
    assert removed.status_code == 200 and removed.json()["id"] == "imported:round-trip"
    assert server.get("/models/imported:round-trip/bundle").status_code == 404
    again = server.client.delete(f"{API}/models/imported:round-trip", headers=ADMIN)
    assert again.status_code == 404
    assert not [p for p in server.runtime.models.directory.iterdir() if p.name.startswith(".")]


def test_import_refuses_what_is_not_a_bundle(server: Server, current_bundle):
    response = import_bundle(server, "junk", b"not a zip at all")
    assert response.status_code == 422 and response.json()["error"] == "bad_bundle"
    assert "not a readable zip" in response.json()["detail"]
    truncated = import_bundle(server, "cut", current_bundle[: len(current_bundle) // 2])
    assert truncated.status_code == 422 and truncated.json()["error"] == "bad_bundle"
    names = {m["id"] for m in server.get("/models").json()["models"]}
    assert not {"imported:junk", "imported:cut"} & names


def test_import_refuses_a_body_over_max_upload_mb(server: Server):
    response = import_bundle(server, "huge", b"\0" * (9 << 20))
    assert response.status_code == 413 and response.json()["error"] == "too_large"


def test_import_needs_a_zip_content_type_and_a_good_name(server: Server, current_bundle):
    response = import_bundle(server, "typed", current_bundle, {"Content-Type": "text/plain"})
    assert response.status_code == 415
    response = import_bundle(server, "../escape", current_bundle)
    assert response.status_code == 422


def test_checkpoints_cannot_be_removed(server: Server):
    response = server.client.delete(f"{API}/models/current", headers=ADMIN)
    assert response.status_code == 422 and response.json()["error"] == "not_imported"


# ---- chat ----------------------------------------------------------------------------------


def test_chat_streams_text_then_done(server: Server, viewer):
    status, events = chat(server, viewer, max_tokens=12, temperature=0)
    assert status == 200
    *texts, done = events
    assert all(set(event) == {"text"} and event["text"] for event in texts)
    version, _ = server.version()
    assert done["done"] is True
    assert (done["model"], done["version"]) == ("current", version)
    assert 0 < done["tokens"] <= 12 and done["seconds"] >= 0
    assert done["finish"] == ("length" if done["tokens"] == 12 else "stop")
    assert server.runtime.inference.active == 0


def test_chat_honours_max_tokens(server: Server):
    for limit in (1, 5):
        _, events = chat(server, max_tokens=limit, temperature=1.0, top_k=50, top_p=0.9)
        assert events[-1]["done"] and events[-1]["tokens"] <= limit


def test_greedy_replies_are_the_same(server: Server):
    first = chat(server, max_tokens=8, temperature=0)[1]
    second = chat(server, max_tokens=8, temperature=0)[1]
    assert [e.get("text") for e in first] == [e.get("text") for e in second]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"model": "../etc"}, "model"),
        ({"stream": True}, "stream"),
    ],
)
def test_chat_refuses_bad_requests_before_streaming(server: Server, body, field):
    status, [error] = chat(server, **body)
    assert status == 422 and error["error"] == "invalid_request"
    assert field in error["detail"]


def test_chat_with_an_unknown_model_is_404(server: Server):
    status, [error] = chat(server, model="v99999")
    assert status == 404 and error["error"] == "unknown_model"
    assert server.runtime.inference.active == 0


def test_chat_needs_a_token_before_its_body_is_read(server: Server):
    response = server.client.post(f"{API}/chat", content=b"{not json")
    assert response.status_code == 401


def test_chat_with_an_imported_model(server: Server, current_bundle):
    assert import_bundle(server, "chatty", current_bundle).status_code == 201
    try:
        status, events = chat(server, model="imported:chatty", max_tokens=6, temperature=0)
        assert status == 200 and events[-1]["model"] == "imported:chatty"
        # the same weights as current: the same greedy reply
        same = chat(server, model="current", max_tokens=6, temperature=0)[1]
        assert [e.get("text") for e in events[:-1]] == [e.get("text") for e in same[:-1]]
    finally:
        server.client.delete(f"{API}/models/imported:chatty", headers=ADMIN)
    status, [error] = chat(server, model="imported:chatty")
    assert status == 404


def test_chat_with_a_kept_checkpoint(server: Server):
    version = server.runtime.checkpoints.list()[0][0]
    status, events = chat(server, model=f"v{version}", max_tokens=3)
    assert status == 200 and events[-1]["model"] == f"v{version}"
    assert events[-1]["version"] == version


class Gate:
    """A stand-in for generate whose tokens wait for `release`, to hold a chat open."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s  # between tokens
        self.started = threading.Event()
        self.release = threading.Event()
        self.yielded = 0

    def __call__(self, model, prompt_ids, max_new_tokens, *args, **kwargs):
        self.started.set()
        for _ in range(max_new_tokens):
            if not self.release.wait(timeout=30):
                return
            time.sleep(self.delay_s)
            self.yielded += 1
            yield 65


def test_past_max_chat_streams_is_429(server: Server, monkeypatch):
    gate = Gate()
    monkeypatch.setattr(inference, "generate", gate)
    first: dict = {}
    holder = threading.Thread(target=lambda: first.update(result=chat(server, max_tokens=4)))
    holder.start()
    try:
        assert gate.started.wait(timeout=30)
        status, [error] = chat(server, max_tokens=4)
        assert status == 429 and error["error"] == "too_many_chats"
        assert "max_chat_streams = 1" in error["detail"]
    finally:
        gate.release.set()
        holder.join(timeout=30)
    status, events = first["result"]
    assert status == 200 and events[-1]["tokens"] == 4
    assert chat(server, max_tokens=2)[0] == 200  # the place is free again


def test_a_reader_that_goes_away_stops_its_generation(server: Server, monkeypatch):
    """What a client that disconnects causes: the response stops reading its events."""
    gate = Gate(delay_s=0.01)
    monkeypatch.setattr(inference, "generate", gate)
    service = server.runtime.inference

    async def read_one_then_leave() -> None:
        stream = await service.open("current", HELLO, Sampling(max_tokens=1000))
        events = stream.events()
        gate.release.set()
        assert json.loads((await events.__anext__()).decode().removeprefix("data: "))["text"]
        await events.aclose()

    asyncio.run(read_one_then_leave())
    deadline = time.monotonic() + 10
    while service.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.active == 0
    assert gate.yielded < 1000


def test_the_current_model_follows_training(server: Server, monkeypatch):
    monkeypatch.setattr(inference, "REFRESH_S", 0.0)
    before, _ = server.version()
    response = server.post_update(server.update_body())
    assert response.status_code == 202, response.text
    after = server.wait_past(before)
    _, events = chat(server, max_tokens=2)
    assert events[-1]["version"] == after
