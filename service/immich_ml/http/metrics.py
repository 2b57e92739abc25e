"""Prometheus metrics: requests, latencies, batches, queues, loaded models and GPU memory, per application."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from immich_ml.errors import ClientDisconnected
from immich_ml.http.appkeys import CONNECTIONS, REGISTRY, STATE
from immich_ml.inference.batcher import BatchMetrics
from immich_ml.log import METRICS_LOG as log
from immich_ml.memory import peak_resident_bytes, resident_bytes
from immich_ml.predict.entries import TaskPlan

__all__ = [
    "CONTENT_TYPE",
    "METRICS",
    "PLANS",
    "GaugeCollector",
    "GpuMemory",
    "Metrics",
    "daemon_gauges",
]


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PLANS = web.RequestKey("plans", list[TaskPlan])
"""A predict request's parsed entries, set by the handler; the metrics middleware labels the request by them."""

Gauges = Iterator[tuple[str, str, list[str], list[tuple[list[str], float]]]]
"""Gauge families computed at scrape time: (name, help, label names, [(label values, value)])."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _request_models(plans: list[TaskPlan]) -> list[tuple[str, str]]:
    """The (task, "name/type") pairs of a request's plans, for labels."""
    return [
        (str(plan.task), f"{entry.key.name}/{entry.key.type}")
        for plan in plans
        for entry in (plan.first, plan.second)
        if entry is not None
    ]


class Metrics:
    """One application's collectors, in its own registry (several apps in one process never clash)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "immich_ml_requests",
            "Predict requests by task, model and HTTP status",
            ["task", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "immich_ml_request_duration_seconds",
            "Predict request latency (body read to response), by task",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batches = BatchMetrics(
            size=Histogram(
                "immich_ml_batch_size",
                "Inputs per inference batch, by batcher",
                ["batcher"],
                buckets=_BATCH_BUCKETS,
                registry=self.registry,
            ),
            seconds=Histogram(
                "immich_ml_batch_duration_seconds",
                "Inference time per batch, by batcher",
                ["batcher"],
                buckets=_LATENCY_BUCKETS,
                registry=self.registry,
            ),
        )
        """Observed by the batchers themselves (`Runtime.batch_metrics`)."""
        self.inflated = Counter(
            "immich_ml_inflated_bytes",
            "Bytes inflated from request bodies sent with Content-Encoding gzip or deflate",
            registry=self.registry,
        )

    def observe_request(self, models: list[tuple[str, str]], status: int, seconds: float) -> None:
        """One finished predict request; a request whose entries did not parse counts under task "invalid"."""
        for task, model in models or [("invalid", "")]:
            self.requests.labels(task, model, str(status)).inc()
        for task in {task for task, _ in models}:
            self.latency.labels(task).observe(seconds)

    def add_collector(self, collector: Collector) -> None:
        """Add a collector read at scrape time (loaded models, queues, GPU memory)."""
        self.registry.register(collector)

    def exposition(self) -> bytes:
        """All metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def middleware(self) -> Middleware:
        """Time every `/predict` request and count it with its final status (after error mapping)."""

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path != "/predict":
                return await handler(request)
            started = time.monotonic()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as error:
                status = error.status
                raise
            except asyncio.CancelledError:  # cancelled because the client disconnected
                status = ClientDisconnected.status
                raise
            finally:
                self.observe_request(_request_models(request.get(PLANS, [])), status, time.monotonic() - started)

        return middleware


def daemon_gauges(app: web.Application) -> Gauges:
    """Readiness, requests in flight, and per loaded model: load time, queue depth, running batches."""
    connections = app[CONNECTIONS]
    yield (
        "immich_ml_ready",
        "1 once preloaded models are warm, 0 before and while draining",
        [],
        [([], float(app[STATE].ready and not connections.draining))],
    )
    yield (
        "immich_ml_requests_in_flight",
        "Predict requests being received or handled, and requests whose headers are arriving",
        [],
        [([], float(connections.in_flight))],
    )
    yield "immich_ml_resident_bytes", "Memory the process holds in RAM (VmRSS)", [], [([], float(resident_bytes()))]
    yield (
        "immich_ml_peak_resident_bytes",
        "The most memory the process has held in RAM at once (VmHWM)",
        [],
        [([], float(peak_resident_bytes()))],
    )
    yield "immich_ml_connections_open", "Client connections open now", [], [([], float(len(connections)))]
    yield (
        "immich_ml_connections_dropped",
        "Connections closed by the daemon since start: at the connection cap, or without headers in time",
        ["reason"],
        [(["connection_cap"], float(connections.evicted)), (["header_timeout"], float(connections.timed_out))],
    )
    if (registry := app.get(REGISTRY)) is None:
        return
    loaded = registry.loaded()
    yield "immich_ml_models_loaded", "Models in memory", [], [([], float(len(loaded)))]
    yield (
        "immich_ml_model_info",
        "1 per loaded model, with the providers it runs on",
        ["model", "providers"],
        [([str(key), ",".join(model.providers)], 1.0) for key, model in loaded.items()],
    )
    yield (
        "immich_ml_model_load_seconds",
        "Time the model took to load (download included)",
        ["model"],
        [([str(key)], seconds) for key, seconds in registry.load_seconds().items()],
    )
    yield (
        "immich_ml_model_memory_bytes",
        "Resident memory the process grew by while the model's session was built (weights, pre-packed copies)",
        ["model"],
        [([str(key)], float(size)) for key, size in registry.memory_bytes().items()],
    )
    yield (
        "immich_ml_queue_depth",
        "Inputs waiting for a batch, by model",
        ["model"],
        [([str(key)], float(model.queue_depth)) for key, model in loaded.items()],
    )
    yield (
        "immich_ml_batch_running_seconds",
        "How long the batch now running has run, by batcher",
        ["batcher"],
        [
            ([batcher.name], batcher.running_for_s)
            for model in loaded.values()
            for batcher in model.batcher_snapshots()
            if batcher.running_for_s is not None
        ],
    )


METRICS = web.AppKey("metrics", Metrics)


class GaugeCollector:
    """Gauges computed at scrape time by `read`, which yields (name, help, labels, samples) families."""

    def __init__(self, read: Callable[[], Gauges]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        for name, documentation, labels, samples in self._read():
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for values, value in samples:
                family.add_metric(values, value)
            yield family


class GpuMemory:
    """GPU memory per device through NVML; yields nothing where NVML is unavailable (no driver, no GPU)."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._tried = False

    def read(self) -> Gauges:
        if (nvml := self._load()) is None:
            return
        used: list[tuple[list[str], float]] = []
        total: list[tuple[list[str], float]] = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
                used.append(([str(index)], float(info.used)))
                total.append(([str(index)], float(info.total)))
        except nvml.NVMLError as error:
            log.debug("NVML query failed: %s", error)
            return
        yield "immich_ml_gpu_memory_used_bytes", "GPU memory in use (all processes), by device", ["device"], used
        yield "immich_ml_gpu_memory_total_bytes", "GPU memory size, by device", ["device"], total

    def _load(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as error:  # no binding, no driver, no device: GPU metrics are simply absent
                log.debug("GPU memory metrics unavailable: %s", error)
        return self._nvml
