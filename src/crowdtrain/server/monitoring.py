"""Prometheus metrics of one server app (docs/monitoring.md): the runtime is read at scrape time;
only events (update refusals, request latencies) are counted as they happen.

Each app has a CollectorRegistry of its own, never the process-wide default: tests build many
apps in one process, and two apps must not share counts.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import OperationalError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crowdtrain.server.nodes import INBOUND_KINDS

if TYPE_CHECKING:
    from crowdtrain.server.runtime import ServerRuntime

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
RATE_WINDOW_S = 60.0  # tokens/s and samples/s count the rounds applied this long ago at most
RECENT_ROUNDS = 10_000  # the most rounds read for those rates (a round per 6 ms)
NODE_STATES = ("online", "http", "gone")
# requests take milliseconds; long polls and big downloads take up to a minute
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# any other method is counted as "other": a label must not take values a client makes up
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_PARAMETER = re.compile(r"{(\w+)}")


class ServerMetrics:
    """The registry /metrics renders, with the two event metrics routes and middleware feed."""

    def __init__(self, runtime: ServerRuntime):
        self.registry = CollectorRegistry()
        self.refusals = Counter(
            "crowdtrain_update_refusals",
            "Updates refused at intake, by reason (the error code the node got).",
            ["reason"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "crowdtrain_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template, method and status class.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(RuntimeCollector(runtime))

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self.request_seconds.labels(route, method, f"{status // 100}xx").observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class RuntimeCollector(Collector):
    """Reads the runtime at each scrape: nothing here is counted twice."""

    def __init__(self, runtime: ServerRuntime):
        self.runtime = runtime
        self.started_at = time.time()

    def collect(self) -> Iterator[Metric]:
        yield from self._training()
        yield from self._rates()
        yield from self._traffic()
        yield from self._nodes()
        yield from self._data()
        yield from self._process()

    def _training(self) -> Iterator[Metric]:
        rt = self.runtime
        c = rt.coordinator
        yield _gauge("crowdtrain_version", "The current model version.", c.version)
        yield _counter(
            "crowdtrain_rounds",
            "Rounds applied over the run (its history).",
            len(rt.rounds.records),
        )
        yield _gauge("crowdtrain_pending_updates", "Accepted updates not yet applied.", c.pending)
        yield _gauge(
            "crowdtrain_coordinator_failed",
            "1 when the apply thread failed and updates are no longer applied.",
            c.failure is not None,
        )
        for key, what in (("updates", "Updates"), ("samples", "Samples"), ("tokens", "Tokens")):
            yield _counter(f"crowdtrain_{key}", f"{what} applied over the run.", c.totals[key])
        last = rt.rounds.last()
        if last is not None:
            yield _gauge(
                "crowdtrain_train_loss", "The last round's training loss.", last["train_loss"]
            )
            yield _gauge("crowdtrain_learning_rate", "The last round's learning rate.", last["lr"])
            yield _gauge(
                "crowdtrain_round_duration_seconds",
                "The last round's time from its first update to its version.",
                last["round_s"],
            )
        evaluation = rt.evals.last()
        if evaluation is not None:
            yield _gauge(
                "crowdtrain_validation_loss",
                "The last validation loss (the Evaluator's).",
                evaluation["valid_loss"],
            )
            yield _gauge(
                "crowdtrain_validation_version",
                "The version the last validation loss is of.",
                evaluation["version"],
            )

    def _rates(self) -> Iterator[Metric]:
        """Tokens and samples per second over the rounds of the last RATE_WINDOW_S (those of
        this process only: a restart does not count the rounds before it)."""
        now = time.time()
        since = max(now - RATE_WINDOW_S, self.started_at)
        recent = [r for r in self.runtime.rounds.records[-RECENT_ROUNDS:] if r["time"] >= since]
        span = max(now - since, 1.0)
        for key in ("tokens", "samples"):
            yield _gauge(
                f"crowdtrain_{key}_per_second",
                f"{key.capitalize()} applied per second over the last {RATE_WINDOW_S:g} s.",
                sum(r[key] for r in recent) / span,
            )

    def _traffic(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "crowdtrain_transfer_bytes",
            "Bytes to and from nodes by kind, on the wire (compressed) and raw (decompressed).",
            labels=["direction", "kind", "measure"],
        )
        for kind, counts in self.runtime.nodes.traffic().items():
            direction = "in" if kind in INBOUND_KINDS else "out"
            for measure, value in counts.items():
                family.add_metric([direction, kind, measure], value)
        yield family

    def _nodes(self) -> Iterator[Metric]:
        nodes = self.runtime.nodes.list()
        family = GaugeMetricFamily(
            "crowdtrain_nodes", "Nodes the server has heard from, by state.", labels=["state"]
        )
        for state in NODE_STATES:
            family.add_metric([state], sum(n["state"] == state for n in nodes))
        yield family
        yield _gauge(
            "crowdtrain_nodes_connected",
            "Nodes online now, or heard from over HTTP within a minute.",
            sum(n["connected"] for n in nodes),
        )

    def _data(self) -> Iterator[Metric]:
        try:
            status = self.runtime.leases.status()
        except OperationalError as error:  # a long import holds the database: skip, not fail
            log.warning("no data metrics in this scrape: %s", error)
            return
        shards = status["shards"]
        yield _gauge("crowdtrain_data_epoch", "The epoch being leased.", status["epoch"])
        yield _gauge("crowdtrain_data_shards", "Shards in one epoch.", shards)
        yield _gauge(
            "crowdtrain_data_epoch_completed_shards",
            "Shards of the current epoch trained and applied.",
            status["epoch_completed_shards"],
        )
        yield _gauge(
            "crowdtrain_data_epoch_progress",
            "The fraction of the current epoch's shards completed (0 to 1).",
            status["epoch_completed_shards"] / shards if shards else 0.0,
        )
        yield _counter(
            "crowdtrain_data_epochs_completed", "Epochs completed.", status["completed_epochs"]
        )
        yield _gauge(
            "crowdtrain_data_active_leases", "Shard leases held now.", status["active_leases"]
        )

    def _process(self) -> Iterator[Metric]:
        figures = self.runtime.resources.figures()
        yield _counter(
            "process_cpu_seconds",
            "CPU time of the server process, user and system.",
            sum(figures["cpu_seconds"].values()),
        )
        yield _gauge(
            "process_resident_memory_bytes", "The server process's RSS.", figures["rss_bytes"]
        )
        yield _gauge(
            "process_start_time_seconds",
            "When the server process started (Unix time).",
            figures["started_at"],
        )
        yield _gauge(
            "crowdtrain_server_memory_available_bytes",
            "System memory available on the server's machine.",
            figures["memory_available_bytes"],
        )
        yield _gauge(
            "crowdtrain_server_disk_free_bytes",
            "Free space on the disk of the server's data directory.",
            figures["disk_free_bytes"],
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=float(value))


class RequestTimer:
    """Pure ASGI middleware: each HTTP request's latency, by route template (never the raw
    path: its parameters would make a label value per node, lease and file). /metrics itself is
    not timed, so scrapes do not show up in what they scrape."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception, or the client went away

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            if getattr(route, "path_format", None) != METRICS_PATH:
                self.metrics.observe_request(
                    route_template(scope, status),
                    scope["method"],
                    status,
                    time.perf_counter() - started,
                )


def route_template(scope: Scope, status: int) -> str:
    """The template of the route that answered (/api/v1/datasets/{name}), with the prefix
    it was included under; "unmatched" for a 404 that no route answered, else "other"."""
    template = getattr(scope.get("route"), "path_format", None)
    if template is None:
        return "unmatched" if status == 404 else "other"
    # an included router's route knows only its own path: the prefix is what precedes it
    parameters = scope.get("path_params", {})
    local = _PARAMETER.sub(lambda m: str(parameters.get(m[1], m[0])), template)
    path = scope.get("path", "")
    if local and path.endswith(local):
        return path[: len(path) - len(local)] + template
    return template
