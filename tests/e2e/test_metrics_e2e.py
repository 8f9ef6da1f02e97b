"""A real server with one node training: /metrics parses with the Prometheus parser and moves
while it trains; the TensorBoard sink leaves event files with the run's scalars."""

from __future__ import annotations

import importlib.util

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow
# an optional extra (crowdtrain[tensorboard]): the sink is checked where it is installed
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def scrape(e2e) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{e2e.url}/metrics", headers=e2e.admin, timeout=30)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_while_a_node_trains(e2e):
    tensorboard_dir = e2e.root / "tensorboard"
    sink = {"tensorboard_dir": tensorboard_dir} if HAS_TENSORBOARD else {}
    e2e.start_server(eval_every=5, **sink)
    e2e.start_nodes(1)
    first = e2e.wait_for(
        lambda: (s := scrape(e2e)) and value(s, "crowdtrain_version") >= 2 and s,
        60,
        "the first versions",
    )
    later = e2e.wait_for(
        lambda: (
            (s := scrape(e2e))
            and value(s, "crowdtrain_version") >= value(first, "crowdtrain_version") + 3
            and s
        ),
        60,
        "three more versions",
    )
    for counter in (
        "crowdtrain_rounds_total",
        "crowdtrain_tokens_total",
        "process_cpu_seconds_total",
    ):
        assert value(later, counter) > value(first, counter), counter
    assert value(later, "crowdtrain_tokens_per_second") > 0
    assert value(later, "crowdtrain_nodes", state="online") == 1
    assert value(later, "crowdtrain_train_loss") > 0
    update_bytes = {"direction": "in", "kind": "update", "measure": "wire"}
    assert value(later, "crowdtrain_transfer_bytes_total", **update_bytes) > 0
    submitted = {"route": "/api/v1/updates", "method": "POST", "status": "2xx"}
    assert value(later, "crowdtrain_http_request_duration_seconds_count", **submitted) >= 3
    node = e2e.get("/info")["nodes"][0]
    assert node["memory_total_bytes"] > 0 and node["cpu_percent"] is not None  # its heartbeats

    e2e.swarm.stop_nodes(timeout=20)
    e2e.swarm.stop_server(timeout=30)  # the sink flushes at stop
    if HAS_TENSORBOARD:
        assert list(tensorboard_dir.glob("events.out.tfevents.*")), e2e.logs()
