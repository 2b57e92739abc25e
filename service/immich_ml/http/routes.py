"""HTTP handlers: read the form, parse `entries` once, call the predictor, answer in Immich's JSON shapes."""

from __future__ import annotations

import os
import time

import onnxruntime as ort
import orjson
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from immich_ml.daemon.lifecycle import stalled_batchers
from immich_ml.errors import BadRequest, ImmichMLError, InvalidEntries, PayloadTooLarge, ShuttingDown
from immich_ml.http.appkeys import PREDICTOR, REGISTRY, SETTINGS, STATE
from immich_ml.http.metrics import CONTENT_TYPE, METRICS, PLANS
from immich_ml.log import ACCESS_LOG as log
from immich_ml.predict.entries import parse_entries
from immich_ml.predict.predictor import PredictInput

__all__ = ["routes"]


routes = web.RouteTableDef()

_TEXT_LIMIT = 1024 * 1024  # entries and query text: small fields, like upstream's 1 MiB form limit


def json_response(body: object, status: int = 200) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    return json_response({"message": "Immich ML"})


@routes.get("/ping")
async def ping(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.app[SETTINGS].ping_requires_ready and (not state.ready or state.draining):
        return web.Response(text="not ready", status=503)
    return web.Response(text="pong")


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Readiness: 503 until preloaded models are warm, then what is loaded and where it runs."""
    state = request.app[STATE]
    settings = request.app[SETTINGS]
    loaded = request.app[REGISTRY].loaded()
    stalled = stalled_batchers(request.app, settings.watchdog_inference_timeout_s)
    body = {
        "ready": state.ready and not state.draining and not stalled,
        "draining": state.draining,
        "preloadError": state.preload_error,
        "models": [{"model": str(key), "providers": model.providers} for key, model in loaded.items()],
        "providers": {"configured": str(settings.provider), "available": ort.get_available_providers()},
        "device": {"id": settings.device_id},
        "queue": {str(key): model.queue_depth for key, model in loaded.items()},
        "inFlight": state.in_flight,
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
    state = request.app[STATE]
    if state.draining:
        raise ShuttingDown("Shutting down; send requests to another machine-learning URL")
    started = time.monotonic()
    described = "(form not read)"
    try:
        predict_input = await _read_form(request)
        described = predict_input.describe()
        request[PLANS] = predict_input.plans
        with state.track_request():
            result = await request.app[PREDICTOR].predict(predict_input)
    except ImmichMLError as error:  # the access line names the error's kind, never its text (it may quote input)
        log.debug("predict %s: %d %s, %.1f ms", described, error.status, type(error).__name__, _ms_since(started))
        raise
    log.debug("predict %s: 200, %.1f ms", described, _ms_since(started))
    return json_response(result)


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000


async def _read_form(request: web.Request) -> PredictInput:
    """Read `entries` and `image`/`text` from the form body, enforcing the size limits."""
    if request.content_type == "application/x-www-form-urlencoded":  # text queries from simple clients
        form = await request.post()
        fields = {name: str(value).encode() for name, value in form.items() if name in ("entries", "text")}
    elif request.content_type.startswith("multipart/"):
        fields = await _read_multipart(request)
    else:
        raise InvalidEntries("Invalid request format. Expected multipart/form-data with an 'entries' part.")
    if "entries" not in fields:
        raise InvalidEntries("Invalid request format. The 'entries' field is required.")
    if fields.get("text") == b"":
        del fields["text"]  # an empty form field counts as absent, as in upstream's form parsing
    if "image" not in fields and "text" not in fields:
        raise BadRequest("Either image or text must be provided")
    text = fields["text"].decode("utf-8", errors="replace") if "text" in fields else None
    entries = fields["entries"]
    return PredictInput(entries=entries, plans=parse_entries(entries), image=fields.get("image"), text=text)


async def _read_multipart(request: web.Request) -> dict[str, bytes]:
    limit = request.app[SETTINGS].max_body_size
    fields: dict[str, bytes] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name not in ("entries", "image", "text"):
                continue  # nested multiparts and unknown fields are ignored, like upstream
            fields[part.name] = await _read_part(part, limit if part.name == "image" else _TEXT_LIMIT)
    except (ValueError, AssertionError, BadHttpMessage) as error:  # aiohttp's multipart parser on bad bodies
        raise BadRequest(f"Malformed multipart body: {error}") from None
    return fields


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    chunks = []
    size = 0
    while chunk := await part.read_chunk(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Part '{part.name}' exceeds {limit} bytes (MACHINE_LEARNING_MAX_BODY_SIZE)")
        chunks.append(chunk)
    return b"".join(chunks)
