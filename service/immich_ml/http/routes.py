"""HTTP handlers: read the form, parse `entries` once, call the predictor, answer in Immich's JSON shapes."""

from __future__ import annotations

import os
import time

import onnxruntime as ort
import orjson
from aiohttp import web

from immich_ml.daemon.lifecycle import stalled_batchers
from immich_ml.errors import ImmichMLError
from immich_ml.http.appkeys import CONNECTIONS, PREDICTOR, REGISTRY, SETTINGS, STATE
from immich_ml.http.forms import read_form
from immich_ml.http.metrics import CONTENT_TYPE, METRICS, PLANS
from immich_ml.inference.sizing import request_threads
from immich_ml.log import ACCESS_LOG as log

__all__ = ["routes"]


routes = web.RouteTableDef()


def json_response(body: object, status: int = 200) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    return json_response({"message": "Immich ML"})


@routes.get("/ping")
async def ping(request: web.Request) -> web.Response:
    if request.app[SETTINGS].ping_requires_ready and (
        not request.app[STATE].ready or request.app[CONNECTIONS].draining
    ):
        return web.Response(text="not ready", status=503)
    return web.Response(text="pong")


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Readiness: 503 until preloaded models are warm, then what is loaded and where it runs."""
    state, connections = request.app[STATE], request.app[CONNECTIONS]
    settings = request.app[SETTINGS]
    loaded = request.app[REGISTRY].loaded()
    stalled = stalled_batchers(request.app, settings.watchdog_inference_timeout_s)
    body = {
        "ready": state.ready and not connections.draining and not stalled,
        "draining": connections.draining,
        "preloadError": state.preload_error,
        "models": [
            {
                "model": str(key),
                "providers": model.providers,
                "intraOpThreads": model.session.intra_op_threads if model.session else None,
                "concurrentBatches": [batcher.concurrency for batcher in model.batchers],
            }
            for key, model in loaded.items()
        ],
        "cpus": {**settings.cpus.as_json(), "requestThreads": request_threads(settings)},
        "providers": {"configured": str(settings.provider), "available": ort.get_available_providers()},
        "device": {"id": settings.device_id},
        "queue": {str(key): model.queue_depth for key, model in loaded.items()},
        "inFlight": connections.in_flight,
        "stalled": stalled,
        "downloads": [progress.as_json() for progress in request.app[REGISTRY].store.transfers.active()],
        "pid": os.getpid(),
    }
    return json_response(body, status=200 if body["ready"] else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics in the text exposition format."""
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


@routes.post("/predict")
async def predict(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    started = time.monotonic()
    described = "(form not read)"
    try:
        predict_input = await read_form(
            request, max_body_size=settings.max_body_size, timeout_s=settings.body_timeout_s
        )
        described = predict_input.describe()
        request[PLANS] = predict_input.plans
        result = await request.app[PREDICTOR].predict(predict_input)
    except ImmichMLError as error:  # the access line names the error's kind, never its text (it may quote input)
        log.debug("predict %s: %d %s, %.1f ms", described, error.status, type(error).__name__, _ms_since(started))
        raise
    log.debug("predict %s: 200, %.1f ms", described, _ms_since(started))
    return json_response(result)


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000
