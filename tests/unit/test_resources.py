"""Resource figures: the server's (psutil), a node's (psutil, NVML or torch.cuda) and the bounded
heartbeat fields that carry them; an old node's heartbeat without them stays valid."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from crowdtrain import resources
from crowdtrain.protocol.errors import WireError
from crowdtrain.protocol.session import Heartbeat, parse_node_message
from crowdtrain.resources import NodeResources, ServerResources


def heartbeat(**fields) -> str:
    return json.dumps({"type": "heartbeat", "status": "training", **fields})


def test_a_cpu_nodes_figures_fit_a_heartbeat():
    figures = NodeResources(torch.device("cpu")).figures()
    assert set(figures) == {"cpu_percent", "memory_used_bytes", "memory_total_bytes"}
    assert 0 <= figures["cpu_percent"] <= 100
    assert 0 < figures["memory_used_bytes"] < figures["memory_total_bytes"]
    beat = parse_node_message(Heartbeat(status="training", **figures).to_json())
    assert beat.memory_total_bytes == figures["memory_total_bytes"]


def test_an_old_nodes_heartbeat_without_the_figures_is_valid():
    beat = parse_node_message(heartbeat(tokens_per_s=5, rss_bytes=1 << 30))
    assert beat.cpu_percent is None and beat.gpu_utilization_percent is None


@pytest.mark.parametrize(
    "fields",
    [
        {"cpu_percent": 100.5},
        {"cpu_percent": -1},
        {"gpu_utilization_percent": 1e9},
        {"memory_used_bytes": -1},
        {"gpu_memory_total_bytes": 1.5},
        {"memory_total_bytes": "16GB"},
        {"gpu_memory_used_bytes": 1 << 61},
    ],
)
def test_out_of_bounds_figures_are_refused(fields):
    with pytest.raises(WireError) as refused:
        parse_node_message(heartbeat(**fields))
    assert refused.value.code == "bad_message"


class FakeNvml:
    """The few pynvml calls NodeResources makes."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return ("uuid", uuid)

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("index", index)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=5 << 30, total=24 << 30, free=19 << 30)


def test_a_gpu_nodes_figures_come_from_nvml_when_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(uuid="ab"))
    probe = NodeResources(torch.device("cuda:0"))
    assert probe._nvml_handle == ("uuid", "GPU-ab")
    figures = probe.figures()
    assert figures["gpu_utilization_percent"] == 87.0
    assert figures["gpu_memory_used_bytes"] == 5 << 30
    assert figures["gpu_memory_total_bytes"] == 24 << 30
    Heartbeat(status="training", **figures)  # the types fit the strict message


def test_without_nvml_a_gpu_nodes_memory_comes_from_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (6 << 30, 8 << 30))
    figures = NodeResources(torch.device("cuda:0")).figures()
    assert figures["gpu_memory_used_bytes"] == 2 << 30
    assert figures["gpu_memory_total_bytes"] == 8 << 30
    assert "gpu_utilization_percent" not in figures  # torch alone cannot tell


def test_an_nvml_that_fails_to_start_leaves_torch_figures(monkeypatch):
    nvml = FakeNvml()

    def broken():
        raise FakeNvml.NVMLError("driver not loaded")

    nvml.nvmlInit = broken
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert resources._nvml_handle(torch.device("cuda:0")) is None


def test_server_figures(tmp_path):
    figures = ServerResources(tmp_path).figures()
    assert figures["rss_bytes"] > 0 and figures["threads"] >= 1
    assert 0 < figures["memory_available_bytes"] <= figures["memory_total_bytes"]
    assert 0 < figures["disk_free_bytes"] <= figures["disk_total_bytes"]
    assert set(figures["cpu_seconds"]) == {"user", "system"}
    json.dumps(figures)  # /info answers it as JSON
