"""Run the daemon: listen, report ready after warm-up, drain on SIGTERM/SIGINT, exit cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket

from aiohttp import web

from immich_ml.daemon.lifecycle import Supervisor
from immich_ml.daemon.systemd import Notifier, listen_sockets
from immich_ml.http.app import create_app
from immich_ml.http.appkeys import STATE
from immich_ml.http.security import tls_context
from immich_ml.settings import Settings

__all__ = ["INHERITED_FDS", "PARENT_PID", "run", "serve"]

log = logging.getLogger("immich_ml.server")

INHERITED_FDS = "IMMICH_ML_INHERITED_FDS"
"""Listening sockets a worker process gets from its parent: comma-separated file descriptors."""
PARENT_PID = "IMMICH_ML_PARENT_PID"
"""The pid of a worker's parent, so the worker can tell whether it is still there."""


def run(settings: Settings) -> int:
    """`immich-ml serve`: one process, or a parent with MACHINE_LEARNING_WORKERS worker processes."""
    sockets = _inherited_sockets() or listen_sockets()
    if settings.workers > 1 and INHERITED_FDS not in os.environ:
        from immich_ml.daemon.processes import run_workers

        return run_workers(settings, sockets)
    return asyncio.run(serve(settings, sockets=sockets))


async def serve(
    settings: Settings, *, sockets: list[socket.socket] | None = None, notifier: Notifier | None = None
) -> int:
    """Serve until SIGTERM or SIGINT, then finish in-flight requests and stop. Returns the exit code.

    `sockets` are already listening (socket activation, or a worker's inherited ones); without them the
    daemon binds `settings.host`:`settings.port`.
    """
    notifier = notifier or Notifier.from_env()
    app = create_app(settings)
    ssl_context = tls_context(settings.tls_cert, settings.tls_key) if settings.tls_cert and settings.tls_key else None
    runner = web.AppRunner(
        app, keepalive_timeout=settings.keepalive_s, access_log=None, shutdown_timeout=settings.shutdown_timeout_s
    )
    await runner.setup()
    sites: list[web.BaseSite] = [web.SockSite(runner, sock, ssl_context=ssl_context) for sock in sockets or []]
    if not sites:
        sites.append(web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context))
    for site in sites:
        await site.start()
    log.info(
        "pid %d (device %d) listening on %s (models in %s)",
        os.getpid(),
        settings.device_id,
        ", ".join(site.name for site in sites),
        settings.cache_folder,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    supervisor = Supervisor(app, notifier)
    reporting = asyncio.create_task(supervisor.run(), name="systemd")
    state = app[STATE]
    ready = asyncio.create_task(state.ready_event.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        log.info("ready")
    await stopping

    supervisor.stopping()
    reporting.cancel()
    state.draining = True
    log.info("stopping: draining %d request(s) in flight", state.in_flight)
    if not await state.wait_idle(settings.shutdown_timeout_s):
        log.warning(
            "%d request(s) still running after %.0f s; stopping anyway", state.in_flight, settings.shutdown_timeout_s
        )
    ready.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reporting
    await runner.cleanup()
    notifier.close()
    return 0


def _inherited_sockets() -> list[socket.socket]:
    fds = os.environ.get(INHERITED_FDS, "")
    if fds:
        _stop_with_parent()
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd.strip()]


def _stop_with_parent() -> None:
    """A worker gets SIGTERM (and drains) when its parent dies, even by SIGKILL, instead of living on."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if str(os.getppid()) != os.environ.get(PARENT_PID):  # the parent died before that took effect
        os.kill(os.getpid(), signal.SIGTERM)
