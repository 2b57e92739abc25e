"""Build the aiohttp application: routes, error handling, and the model registry's lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from immich_ml.daemon.state import DaemonState
from immich_ml.errors import ClientDisconnected, ImmichMLError, ProviderError, translate
from immich_ml.http.appkeys import CONNECTIONS, PREDICTOR, REGISTRY, SETTINGS, STATE
from immich_ml.http.connections import Connections, default_max_connections
from immich_ml.http.metrics import METRICS, GaugeCollector, GpuMemory, Metrics, daemon_gauges
from immich_ml.http.routes import json_response, routes
from immich_ml.http.security import allowlist_middleware
from immich_ml.inference.sessions import SessionFactory
from immich_ml.inference.sizing import request_threads
from immich_ml.inference.threads import ThreadPool
from immich_ml.log import SERVER_LOG as log
from immich_ml.log import Throttle
from immich_ml.models.catalog import served_key
from immich_ml.models.registry import ModelRegistry
from immich_ml.models.store import ModelStore
from immich_ml.models.tasks import ModelKey
from immich_ml.pipelines.base import Runtime
from immich_ml.predict.predictor import Predictor
from immich_ml.settings import Settings

__all__ = ["create_app", "preload_keys"]


_logged = Throttle()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The HTTP boundary: every error becomes `{"detail": …}` JSON with its status (`errors.translate`);
    anything unknown is a 500. Server-side failures are logged once with their reason."""
    try:
        return await handler(request)
    except asyncio.CancelledError:  # the client left and aiohttp cancelled the handler
        _log_reply(request, ClientDisconnected("Client disconnected"))
        raise
    except web.HTTPException as http_error:
        if http_error.status >= 400 and http_error.empty_body is False and http_error.content_type == "text/plain":
            detail = "Not Found" if http_error.status == 404 else http_error.reason
            return json_response({"detail": detail}, status=http_error.status)
        raise
    except Exception as raised:
        if (error := translate(raised)) is None:
            log.exception("unexpected error while handling %s %s", request.method, request.path)
            return json_response({"detail": "Internal server error"}, status=500)
        return await _reply(request, error)


async def _reply(request: web.Request, error: ImmichMLError) -> web.Response:
    _log_reply(request, error)
    response = json_response({"detail": error.detail}, status=error.status)
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(error.retry_after_s)
    if error.closes_connection:  # send the reply, then close at once: no lingering read of a stalled body
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
    return response


def _log_reply(request: web.Request, error: ImmichMLError) -> None:
    """Disconnects at INFO; 5xx at WARNING (500 at ERROR), each distinct reason at most once a minute."""
    if isinstance(error, ClientDisconnected):
        log.info("client disconnected during %s %s", request.method, request.path)
        return
    if error.status < 500:
        log.debug("%s %s: %d %s", request.method, request.path, error.status, error.detail)
        return
    allowed, held = _logged.allow((error.status, error.log_detail))
    if allowed:
        level = logging.ERROR if error.status == 500 else logging.WARNING
        again = f" (and {held} more time(s))" if held else ""
        log.log(level, "%s %s: %d %s%s", request.method, request.path, error.status, error.log_detail, again)


def preload_keys(settings: Settings) -> list[ModelKey]:
    """The models named by the MACHINE_LEARNING_PRELOAD__* variables, resolved like a request's names."""
    return [
        served_key(task, model_type, name) for (task, model_type), names in settings.preload.items() for name in names
    ]


def create_app(settings: Settings, *, sessions: SessionFactory | None = None) -> web.Application:
    """The application; models load in the background after start-up, never at import time."""
    metrics = Metrics()
    state = DaemonState()
    connections = Connections(
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections or default_max_connections(),
    )
    middlewares: list[Middleware] = [connections.middleware(), metrics.middleware(), error_middleware]
    if settings.allowed_clients:
        middlewares.append(allowlist_middleware(settings.allowed_clients))
    app = web.Application(client_max_size=settings.max_body_size, middlewares=middlewares)
    app[SETTINGS] = settings
    app[STATE] = state
    app[CONNECTIONS] = connections
    app[METRICS] = metrics
    metrics.add_collector(GaugeCollector(lambda: daemon_gauges(app)))
    metrics.add_collector(GaugeCollector(GpuMemory().read))
    runtime = Runtime(
        settings,
        sessions or SessionFactory(settings),
        ThreadPool(request_threads(settings)),
        batch_metrics=metrics.batches,
        image_pool=ThreadPool(request_threads(settings), niceness=settings.bulk_niceness, name="immich-ml-image"),
    )

    async def models_context(app: web.Application) -> AsyncIterator[None]:
        registry = ModelRegistry(ModelStore(settings), runtime)
        app[REGISTRY] = registry
        app[PREDICTOR] = Predictor(
            registry,
            runtime.images,
            max_image_pixels=settings.max_image_pixels,
            max_pixels_in_flight=settings.max_pixels_in_flight,
            admission_wait_s=settings.admission_wait_s,
            jpeg_draft=settings.jpeg_draft,
        )
        background = [
            asyncio.create_task(_preload(app, registry, runtime), name="preload"),
            asyncio.create_task(registry.evict_periodically(), name="evict"),
        ]
        yield
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        app[PREDICTOR].close()
        await registry.close()
        runtime.images.shutdown()
        runtime.pool.shutdown()

    app.cleanup_ctx.append(models_context)
    app.add_routes(routes)
    return app


async def _preload(app: web.Application, registry: ModelRegistry, runtime: Runtime) -> None:
    """Preload and warm up, then report ready; in strict provider mode, a provider this onnxruntime lacks, or
    one that fails to start for a preloaded model, fails the start instead (checked even with nothing to
    preload, so a strict daemon never looks healthy without its provider)."""
    state, settings = app[STATE], runtime.settings
    try:
        if settings.provider_strict:
            runtime.sessions.wanted_providers()
        await registry.preload(preload_keys(settings))
    except Exception as error:
        if (refused := _provider_error(error)) is not None:
            state.fail_start(str(refused))
            return
        state.preload_error = str(error)
        log.error("preloading failed: %s; models will load on first use", error)
    state.mark_ready()


def _provider_error(error: BaseException) -> ProviderError | None:
    """The strict-mode `ProviderError` behind `error` (a model load wraps it), if that is what failed."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ProviderError):
            return cause
        cause = cause.__cause__
    return None
