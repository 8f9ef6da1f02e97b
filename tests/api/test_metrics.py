"""GET /metrics on the in-process app: the Prometheus text parses, values move when an update is
applied, refusals count by reason, request latencies by route template; the access level; the
server's own resource figures in /info and the nodes' from their heartbeats."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from crowdtrain.protocol.session import Heartbeat, Hello

from .conftest import ADMIN, API, Server

SERVER_SETTINGS = {"max_staleness": 1, "heartbeat_s": 0.5, "session_timeout_s": 5.0}
REQUIRED = {
    "crowdtrain_version",
    "crowdtrain_rounds",
    "crowdtrain_updates",
    "crowdtrain_tokens",
    "crowdtrain_samples",
    "crowdtrain_tokens_per_second",
    "crowdtrain_samples_per_second",
    "crowdtrain_transfer_bytes",
    "crowdtrain_nodes",
    "crowdtrain_update_refusals",
    "crowdtrain_http_request_duration_seconds",
    "crowdtrain_data_epoch_progress",
    "process_cpu_seconds",
    "process_resident_memory_bytes",
}


def scrape(server: Server, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    response = server.client.get("/metrics", headers=ADMIN if headers is None else headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_text_parses_and_names_every_metric(server: Server):
    response = server.client.get("/metrics", headers=ADMIN)
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert set(families) >= REQUIRED, REQUIRED - set(families)
    assert families["crowdtrain_rounds"].type == "counter"
    assert families["crowdtrain_version"].type == "gauge"
    assert families["crowdtrain_http_request_duration_seconds"].type == "histogram"
    states = {s.labels["state"] for s in families["crowdtrain_nodes"].samples}
    assert states == {"online", "http", "gone"}


def test_values_move_when_an_update_is_applied(server: Server):
    before = scrape(server)
    version = server.version()[0]
    response = server.post_update(server.update_body(seed=1, loss=4.5), node="metrics-node")
    assert response.status_code == 202, response.text
    server.wait_past(version)
    after = scrape(server)

    assert value(after, "crowdtrain_version") == version + 1
    assert value(after, "crowdtrain_rounds_total") == value(before, "crowdtrain_rounds_total") + 1
    assert (
        value(after, "crowdtrain_tokens_total") == value(before, "crowdtrain_tokens_total") + 1024
    )
    assert value(after, "crowdtrain_samples_total") == value(before, "crowdtrain_samples_total") + 8
    assert value(after, "crowdtrain_train_loss") == 4.5
    assert value(after, "crowdtrain_learning_rate") > 0
    assert value(after, "crowdtrain_tokens_per_second") > 0
    for measure in ("wire", "raw"):
        labels = {"direction": "in", "kind": "update", "measure": measure}
        grew = value(after, "crowdtrain_transfer_bytes_total", **labels) - value(
            before, "crowdtrain_transfer_bytes_total", **labels
        )
        assert grew > 0, measure
    assert value(after, "crowdtrain_nodes", state="http") >= 1  # it never opened a session
    assert value(after, "process_resident_memory_bytes") > 0


def test_refusals_are_counted_by_reason(server: Server):
    before = scrape(server)
    codes = []
    for body in (b"not an update", server.update_body(lineage="0" * 16)):
        response = server.post_update(body, node="metrics-refused")
        assert 400 <= response.status_code < 500, response.text
        codes.append(response.json()["error"])
    assert len(set(codes)) == 2, codes
    after = scrape(server)
    for code in codes:
        metric = "crowdtrain_update_refusals_total"
        assert value(after, metric, reason=code) == value(before, metric, reason=code) + 1, code


def test_request_latencies_are_recorded_by_route_template(server: Server):
    metric = "crowdtrain_http_request_duration_seconds_count"
    route = {"route": f"{API}/datasets/{{name}}", "method": "GET", "status": "4xx"}
    before = scrape(server)
    for name in ("no-such-dataset", "another-one"):
        assert server.get(f"/datasets/{name}").status_code == 404
    after = scrape(server)
    assert value(after, metric, **route) == value(before, metric, **route) + 2
    routes = {dict(labels).get("route") for name, labels in after if name == metric}
    assert f"{API}/info" in routes or f"{API}/model/version" in routes
    assert not any("no-such-dataset" in (r or "") for r in routes)  # templates, never paths
    assert "/metrics" not in routes  # scrapes are not timed


def test_metrics_need_a_viewer_token_unless_the_dashboard_is_public(server: Server, monkeypatch):
    response = server.client.get("/metrics")
    assert response.status_code == 401 and response.json()["error"] == "not_authenticated"
    created = server.client.post(f"{API}/tokens", json={"role": "viewer"}, headers=ADMIN)
    viewer = {"Authorization": f"Bearer {created.json()['token']}"}
    assert scrape(server, viewer)
    monkeypatch.setattr(server.runtime.settings, "public_dashboard", True)
    assert scrape(server, {})


def test_each_app_has_a_registry_of_its_own(server: Server):
    from crowdtrain.server.app import create_app

    other = create_app(server.runtime.settings, server.runtime)  # no lifespan: routes only
    other.state.metrics.refused("only-in-the-other-app")
    assert (
        value(scrape(server), "crowdtrain_update_refusals_total", reason="only-in-the-other-app")
        == 0
    )


def test_info_shows_the_servers_own_resources(server: Server):
    figures = server.info()["server"]
    assert figures["rss_bytes"] > 0 and figures["cpu_seconds"]["user"] > 0
    assert 0 < figures["memory_available_bytes"] <= figures["memory_total_bytes"]
    assert 0 < figures["disk_free_bytes"] <= figures["disk_total_bytes"]
    assert figures["cpu_percent"] >= 0 and figures["cpu_count"] >= 1
    assert figures["load_average"] is None or len(figures["load_average"]) == 3


def test_heartbeat_machine_figures_show_in_info_and_metrics(server: Server):
    hello = Hello(software_version="test", device="cuda:0", device_name="test gpu")
    beat = Heartbeat(
        status="training",
        cpu_percent=42.5,
        memory_used_bytes=3 << 30,
        memory_total_bytes=16 << 30,
        gpu_utilization_percent=97.0,
        gpu_memory_used_bytes=20 << 30,
        gpu_memory_total_bytes=80 << 30,
    )
    headers = server.as_node("metrics-session")
    with server.client.websocket_connect(f"{API}/nodes/session", headers=headers) as ws:
        ws.send_text(hello.to_json())
        assert ws.receive_json()["type"] == "welcome"
        ws.send_text(beat.to_json())
        deadline = time.monotonic() + 10
        while (server.node("metrics-session") or {}).get("cpu_percent") is None:
            assert time.monotonic() < deadline, "the heartbeat never reached the registry"
            time.sleep(0.05)
        node = server.node("metrics-session")
        assert value(scrape(server), "crowdtrain_nodes", state="online") >= 1
    for key in ("cpu_percent", "memory_used_bytes", "gpu_utilization_percent"):
        assert node[key] == getattr(beat, key), key
    assert node["gpu_memory_total_bytes"] == 80 << 30
