"""Run the daemon: listen, report ready after warm-up, drain on SIGTERM/SIGINT and exit, or re-exec on SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time

from aiohttp import web

from immich_ml.daemon.handoff import Handoff, arm_backstop
from immich_ml.daemon.lifecycle import Lifecycle
from immich_ml.daemon.processes import inherited_sockets, is_worker, run_workers
from immich_ml.daemon.systemd import Notifier, listen_sockets
from immich_ml.http.app import create_app
from immich_ml.http.appkeys import CONNECTIONS, STATE
from immich_ml.http.connections import TrackedSite, raise_file_limit
from immich_ml.http.security import tls_context
from immich_ml.inference.sizing import heap_arenas, request_threads
from immich_ml.log import SERVER_LOG as log
from immich_ml.memory import cap_heap_arenas
from immich_ml.settings import Settings

__all__ = ["run", "serve"]


def run(settings: Settings) -> int:
    """`immich-ml serve`: one process, or a parent with MACHINE_LEARNING_WORKERS worker processes."""
    if settings.trim_memory:
        cap_heap_arenas(heap_arenas(settings))
    sockets = inherited_sockets() or listen_sockets()
    if settings.workers > 1 and not is_worker():
        return run_workers(settings, sockets)
    handoff = Handoff(sockets or [_bind(settings.host, settings.port)])
    code = asyncio.run(serve(settings, handoff, accept_when_ready=bool(sockets), reexec_on_hup=not is_worker()))
    if handoff.requested:
        handoff.exec()
    return code


async def serve(
    settings: Settings,
    handoff: Handoff,
    *,
    accept_when_ready: bool,
    reexec_on_hup: bool,
    notifier: Notifier | None = None,
) -> int:
    """Serve on `handoff.sockets` until SIGTERM or SIGINT (or SIGHUP: re-exec, when `reexec_on_hup`), then
    stop accepting, finish what was sent, and stop, all within MACHINE_LEARNING_SHUTDOWN_TIMEOUT_S. Returns the
    exit code: 1 when strict provider mode refused the start (READY=1 is then never sent), else 0.

    With `accept_when_ready` (sockets that were passed in, which queue connections while nobody accepts), the
    daemon accepts only once warm; otherwise at once, answering `/health` with 503 while it warms up.
    """
    notifier = notifier or Notifier.from_env()
    file_limit = raise_file_limit()
    app = create_app(settings)
    ssl_context = tls_context(settings.tls_cert, settings.tls_key) if settings.tls_cert and settings.tls_key else None
    reserve_s = min(_CLEANUP_RESERVE_S, settings.shutdown_timeout_s / 10)
    runner = web.AppRunner(
        app,
        keepalive_timeout=settings.keepalive_s,
        access_log=None,
        shutdown_timeout=reserve_s / 4,
        auto_decompress=False,  # compressed bodies are inflated by the form reader, in steps (http/inflate.py)
    )
    await runner.setup()
    sites = [TrackedSite(runner, sock, app[CONNECTIONS], ssl_context=ssl_context) for sock in handoff.sockets]
    if not accept_when_ready:
        await _accept(sites)
    log.info(
        "pid %d (device %d) listening on %s%s (models in %s; at most %d connections, open-file limit %d)",
        os.getpid(),
        settings.device_id,
        ", ".join(site.name for site in sites),
        " once warm" if accept_when_ready else "",
        settings.cache_folder,
        app[CONNECTIONS].max_connections,
        file_limit,
    )
    log.info(
        "usable CPUs: %s; %d request threads%s",
        settings.cpus.describe(),
        request_threads(settings),
        f", at most {heap_arenas(settings)} malloc arenas" if settings.trim_memory else "",
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if reexec_on_hup:
        loop.add_signal_handler(signal.SIGHUP, functools.partial(_request_reexec, handoff, stop))
    else:  # a worker: its parent re-executes and stops it
        loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP ignored: the parent process handles it")
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
        if ready.done() and not stop.is_set():
            log.info("ready")
            if accept_when_ready:
                await _accept(sites)
        await stopping
        lifecycle.stopping(reloading=handoff.requested)

    backstop = arm_backstop(settings.shutdown_timeout_s, handoff.exec if handoff.requested else _exit_now)
    deadline = time.monotonic() + settings.shutdown_timeout_s - reserve_s
    reporting.cancel()
    for site in sites:
        if site in runner.sites:
            await site.stop()  # new connections wait in the socket's backlog (or are refused, nobody holding it)
    if not handoff.requested:
        handoff.release()
    connections = app[CONNECTIONS]
    log.info(
        "stopping: accepting no more; %d request(s) in flight on %d open connection(s)",
        connections.in_flight,
        len(connections),
    )
    if not await connections.drain(deadline):
        log.warning(
            "%d request(s) still running after %.1f s; closing %d connection(s)",
            connections.in_flight,
            settings.shutdown_timeout_s - reserve_s,
            connections.abort("the stop's deadline passed"),
        )
    for waiter in (ready, failed, stopping):
        waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reporting
    await runner.cleanup()
    backstop.cancel()
    notifier.close()
    return 1 if state.start_failure else 0


_CLEANUP_RESERVE_S = 2.0
"""Of the stop's deadline, at most this much (and at most a tenth) is kept for closing the application after
the drain."""


def _request_reexec(handoff: Handoff, stop: asyncio.Event) -> None:
    if stop.is_set():  # already stopping (SIGTERM): the sockets may be let go already
        log.info("SIGHUP ignored: already stopping")
        return
    log.info("SIGHUP: finishing requests in flight, then re-executing on the same socket(s)")
    handoff.requested = True
    stop.set()


def _exit_now() -> None:
    logging.shutdown()
    os._exit(1)


async def _accept(sites: list[TrackedSite]) -> None:
    for site in sites:
        await site.start()


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host` (a name or an address; `::` also takes IPv4 where the system can)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    dualstack = family == socket.AF_INET6 and socket.has_dualstack_ipv6()
    return socket.create_server(address, family=family, dualstack_ipv6=dualstack)
