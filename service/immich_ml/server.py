"""Run the daemon: listen, report ready after warm-up, drain on SIGTERM/SIGINT, exit cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from immich_ml.app import create_app
from immich_ml.appkeys import STATE
from immich_ml.settings import Settings

__all__ = ["serve"]

log = logging.getLogger("immich_ml.server")


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT, then finish in-flight requests and stop. Returns the exit code."""
    app = create_app(settings)
    runner = web.AppRunner(app, keepalive_timeout=settings.keepalive_s, access_log=None,
                           shutdown_timeout=settings.shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info("listening on http://%s:%d (models in %s)", settings.host, settings.port, settings.cache_folder)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    state = app[STATE]
    ready = asyncio.create_task(state.ready_event.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        log.info("ready")
    await stopping

    state.draining = True
    log.info("stopping: draining %d request(s) in flight", state.in_flight)
    if not await state.wait_idle(settings.shutdown_timeout_s):
        log.warning("%d request(s) still running after %.0f s; stopping anyway",
                    state.in_flight, settings.shutdown_timeout_s)
    await runner.cleanup()
    return 0
