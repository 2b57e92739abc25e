"""Run the daemon: listen, report ready after warm-up, drain on SIGTERM/SIGINT, exit cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

from aiohttp import web

from immich_ml.daemon.lifecycle import Lifecycle
from immich_ml.daemon.processes import inherited_sockets, is_worker, run_workers
from immich_ml.daemon.systemd import Notifier, listen_sockets
from immich_ml.http.app import create_app
from immich_ml.http.appkeys import CONNECTIONS, STATE
from immich_ml.http.connections import TrackedSite, raise_file_limit
from immich_ml.http.security import tls_context
from immich_ml.inference.sizing import request_threads
from immich_ml.log import SERVER_LOG as log
from immich_ml.settings import Settings

__all__ = ["run", "serve"]


def run(settings: Settings) -> int:
    """`immich-ml serve`: one process, or a parent with MACHINE_LEARNING_WORKERS worker processes."""
    sockets = inherited_sockets() or listen_sockets()
    if settings.workers > 1 and not is_worker():
        return run_workers(settings, sockets)
    return asyncio.run(serve(settings, sockets=sockets))


async def serve(
    settings: Settings, *, sockets: list[socket.socket] | None = None, notifier: Notifier | None = None
) -> int:
    """Serve until SIGTERM or SIGINT, then finish in-flight requests and stop. Returns the exit code: 1 when
    strict provider mode refused the start (READY=1 is then never sent), else 0.

    `sockets` are already listening (socket activation, or a worker's inherited ones); without them the
    daemon binds `settings.host`:`settings.port`.
    """
    notifier = notifier or Notifier.from_env()
    file_limit = raise_file_limit()
    app = create_app(settings)
    ssl_context = tls_context(settings.tls_cert, settings.tls_key) if settings.tls_cert and settings.tls_key else None
    runner = web.AppRunner(
        app,
        keepalive_timeout=settings.keepalive_s,
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout_s,
        auto_decompress=False,  # compressed bodies are inflated by the form reader, in steps (http/inflate.py)
    )
    await runner.setup()
    sockets = sockets or [_bind(settings.host, settings.port)]
    sites = [TrackedSite(runner, sock, app[CONNECTIONS], ssl_context=ssl_context) for sock in sockets]
    for site in sites:
        await site.start()
    log.info(
        "pid %d (device %d) listening on %s (models in %s; at most %d connections, open-file limit %d)",
        os.getpid(),
        settings.device_id,
        ", ".join(site.name for site in sites),
        settings.cache_folder,
        app[CONNECTIONS].max_connections,
        file_limit,
    )
    log.info("usable CPUs: %s; %d request threads", settings.cpus.describe(), request_threads(settings))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    lifecycle = Lifecycle(app, notifier)
    reporting = asyncio.create_task(lifecycle.run(), name="systemd")
    state = app[STATE]
    ready = asyncio.create_task(state.ready_event.wait())
    failed = asyncio.create_task(state.failed_event.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, failed, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        log.critical("refusing to start (MACHINE_LEARNING_PROVIDER_STRICT=true): %s", state.start_failure)
        reporting.cancel()
        lifecycle.failed(f"failed: {state.start_failure}")
    else:
        if ready.done():
            log.info("ready")
        await stopping
        lifecycle.stopping()

    reporting.cancel()
    connections = app[CONNECTIONS]
    connections.start_draining()
    log.info("stopping: draining %d request(s) in flight", connections.in_flight)
    if not await connections.wait_idle(settings.shutdown_timeout_s):
        log.warning(
            "%d request(s) still running after %.0f s; stopping anyway",
            connections.in_flight,
            settings.shutdown_timeout_s,
        )
    for waiter in (ready, failed, stopping):
        waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reporting
    await runner.cleanup()
    notifier.close()
    return 1 if state.start_failure else 0


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host` (a name or an address; `::` also takes IPv4 where the system can)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    dualstack = family == socket.AF_INET6 and socket.has_dualstack_ipv6()
    return socket.create_server(address, family=family, dualstack_ipv6=dualstack)
