"""What this machine and process use (CPU, memory, disk, GPU): psutil, and NVML when present.

The server shows its own figures in /api/v1/info and /metrics; a node sends its machine's in
heartbeats. CPU percents count since the previous reading of the same probe, so the first one
after a start is primed here and not shown.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import torch

log = logging.getLogger(__name__)


class ServerResources:
    """The server process and its machine: CPU, memory, the data directory's disk, load."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # primes the count: the next reading covers the interval
        psutil.cpu_percent(None)

    def figures(self) -> dict:
        process, memory = self.process, psutil.virtual_memory()
        times = process.cpu_times()
        disk = psutil.disk_usage(str(self.data_dir))
        return {
            "cpu_percent": process.cpu_percent(None),  # of one core: 200 is two cores busy
            "system_cpu_percent": psutil.cpu_percent(None),  # of the whole machine
            "cpu_count": psutil.cpu_count(),
            "cpu_seconds": {"user": times.user, "system": times.system},
            "rss_bytes": process.memory_info().rss,
            "threads": process.num_threads(),
            "started_at": process.create_time(),
            "memory_total_bytes": memory.total,
            "memory_available_bytes": memory.available,
            "disk_total_bytes": disk.total,
            "disk_free_bytes": disk.free,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "time": time.time(),
        }


class NodeResources:
    """A node's machine as its heartbeats report it: CPU, system memory, and its GPU's
    utilization and memory (NVML when nvidia-ml-py is installed, else torch.cuda's memory
    figures; nothing on a CPU or MPS node)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._nvml_handle = _nvml_handle(device) if device.type == "cuda" else None
        psutil.cpu_percent(None)

    def figures(self) -> dict:
        memory = psutil.virtual_memory()
        out = {
            "cpu_percent": min(100.0, psutil.cpu_percent(None)),
            "memory_used_bytes": memory.total - memory.available,
            "memory_total_bytes": memory.total,
        }
        if self._nvml_handle is not None:
            out.update(self._nvml_figures())
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            out.update(gpu_memory_used_bytes=total - free, gpu_memory_total_bytes=total)
        return out

    def _nvml_figures(self) -> dict:
        import pynvml  # type: ignore[import-untyped]

        try:
            rates = pynvml.nvmlDeviceGetUtilizationRates(self._nvml_handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
        except pynvml.NVMLError as error:  # a driver hiccup: report none this beat
            log.debug("NVML could not be read: %s", error)
            return {}
        return {
            "gpu_utilization_percent": float(min(100, rates.gpu)),
            "gpu_memory_used_bytes": int(memory.used),
            "gpu_memory_total_bytes": int(memory.total),
        }


def _nvml_handle(device: torch.device):
    """The NVML handle of torch's `device` (matched by UUID, as CUDA_VISIBLE_DEVICES may
    renumber devices), or None without nvidia-ml-py or a driver that answers."""
    try:
        import pynvml  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except pynvml.NVMLError as error:
        log.info("no GPU utilization in heartbeats: NVML is not usable (%s)", error)
        return None
