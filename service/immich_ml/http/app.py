"""Build the aiohttp application: routes, error handling, and the model registry's lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from immich_ml.daemon.state import DaemonState
from immich_ml.errors import ImmichMLError
from immich_ml.http.appkeys import PREDICTOR, REGISTRY, SETTINGS, STATE
from immich_ml.http.metrics import METRICS, GaugeCollector, GpuMemory, Metrics, daemon_gauges
from immich_ml.http.routes import json_response, routes
from immich_ml.http.security import allowlist_middleware
from immich_ml.inference.sessions import SessionFactory
from immich_ml.inference.threads import ThreadPool
from immich_ml.log import SERVER_LOG as log
from immich_ml.models.catalog import served_key
from immich_ml.models.registry import ModelRegistry
from immich_ml.models.store import ModelStore
from immich_ml.models.tasks import ModelKey
from immich_ml.pipelines.base import Runtime
from immich_ml.predict.predictor import Predictor
from immich_ml.settings import Settings

__all__ = ["create_app", "preload_keys"]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map errors to `{"detail": …}` JSON: our errors by their status, anything else to 500."""
    try:
        return await handler(request)
    except ImmichMLError as error:
        response = json_response({"detail": error.detail}, status=error.status)
        if (retry_after := getattr(error, "retry_after_s", None)) is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response
    except web.HTTPException as error:
        if error.status >= 400 and error.empty_body is False and error.content_type == "text/plain":
            detail = "Not Found" if error.status == 404 else error.reason
            return json_response({"detail": detail}, status=error.status)
        raise
    except Exception:
        log.exception("unexpected error while handling %s %s", request.method, request.path)
        return json_response({"detail": "Internal server error"}, status=500)


def preload_keys(settings: Settings) -> list[ModelKey]:
    """The models named by the MACHINE_LEARNING_PRELOAD__* variables, resolved like a request's names."""
    return [
        served_key(task, model_type, name) for (task, model_type), names in settings.preload.items() for name in names
    ]


def create_app(settings: Settings, *, sessions: SessionFactory | None = None) -> web.Application:
    """The application; models load in the background after start-up, never at import time."""
    metrics = Metrics()
    middlewares: list[Middleware] = [metrics.middleware(), error_middleware]
    if settings.allowed_clients:
        middlewares.append(allowlist_middleware(settings.allowed_clients))
    app = web.Application(client_max_size=settings.max_body_size, middlewares=middlewares)
    app[SETTINGS] = settings
    app[STATE] = DaemonState()
    app[METRICS] = metrics
    metrics.add_collector(GaugeCollector(lambda: daemon_gauges(app)))
    metrics.add_collector(GaugeCollector(GpuMemory().read))
    runtime = Runtime(
        settings,
        sessions or SessionFactory(settings),
        ThreadPool(settings.request_threads),
        on_batch=metrics.observe_batch,
    )

    async def models_context(app: web.Application) -> AsyncIterator[None]:
        registry = ModelRegistry(ModelStore(settings), runtime)
        app[REGISTRY] = registry
        app[PREDICTOR] = Predictor(
            registry, runtime.pool, max_image_pixels=settings.max_image_pixels, jpeg_draft=settings.jpeg_draft
        )
        background = [
            asyncio.create_task(_preload(app, registry, settings), name="preload"),
            asyncio.create_task(registry.evict_periodically(), name="evict"),
        ]
        yield
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await registry.close()
        runtime.pool.shutdown()

    app.cleanup_ctx.append(models_context)
    app.add_routes(routes)
    return app


async def _preload(app: web.Application, registry: ModelRegistry, settings: Settings) -> None:
    state = app[STATE]
    try:
        await registry.preload(preload_keys(settings))
    except Exception as error:
        state.preload_error = str(error)
        log.error("preloading failed: %s; models will load on first use", error)
    state.mark_ready()
