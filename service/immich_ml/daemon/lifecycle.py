"""What one serving process tells systemd: its status line, READY after warm-up, pings while no batch is stalled."""

from __future__ import annotations

import asyncio

from aiohttp import web

from immich_ml.daemon.systemd import Notifier, Reporter
from immich_ml.http.appkeys import CONNECTIONS, REGISTRY, SETTINGS, STATE
from immich_ml.log import SYSTEMD_LOG as log

__all__ = ["Lifecycle", "stalled_batchers", "status_line"]


_TICK_S = 1.0  # how often STATUS is refreshed (sent only when it changed)


def stalled_batchers(app: web.Application, older_than_s: float) -> list[str]:
    """Batchers whose current run started more than `older_than_s` ago (a wedged inference thread); none
    when `older_than_s` is 0 or less (the check is off)."""
    if (registry := app.get(REGISTRY)) is None or older_than_s <= 0:
        return []
    return [
        batcher.name
        for model in registry.loaded().values()
        for batcher in model.batcher_snapshots()
        if batcher.running_for_s is not None and batcher.running_for_s > older_than_s
    ]


def status_line(app: web.Application, stalled: list[str]) -> str:
    """One human-readable line for `systemctl status`: phase, models and providers, queue, requests."""
    state, connections = app[STATE], app[CONNECTIONS]
    registry = app.get(REGISTRY)
    loaded = registry.loaded() if registry is not None else {}
    if stalled:
        phase = f"inference stalled in {', '.join(stalled)}"
    elif connections.draining:
        phase = f"draining {connections.in_flight} request(s)"
    elif not state.ready:
        phase = "loading models"
    else:
        phase = "ready" if state.preload_error is None else "ready (preloading failed; loading on demand)"
    models = (
        ", ".join(
            f"{key} on {'/'.join(p.removesuffix('ExecutionProvider') for p in model.providers)}"
            for key, model in loaded.items()
        )
        or "none"
    )
    queued = sum(model.queue_depth for model in loaded.values())
    return f"{phase}; models: {models}; queued {queued}; in flight {connections.in_flight}"


class Lifecycle:
    """Reports the running daemon to systemd: status, READY=1 after warm-up, watchdog pings, STOPPING=1.

    WATCHDOG=1 is sent from the event loop at half of `WATCHDOG_USEC`, but not while an inference batch
    has run longer than MACHINE_LEARNING_WATCHDOG_INFERENCE_TIMEOUT_S, so systemd restarts a daemon whose
    inference thread is wedged as well as one whose event loop is.
    """

    def __init__(self, app: web.Application, notifier: Notifier) -> None:
        self.app = app
        self.reporter = Reporter(notifier)

    async def run(self) -> None:
        """Report until cancelled."""
        state = self.app[STATE]
        tick = self.reporter.tick_s(_TICK_S)
        while not state.ready_event.is_set():
            self._report(ready=False)
            try:
                await asyncio.wait_for(state.ready_event.wait(), tick)
            except TimeoutError:
                pass
        while True:
            self._report(ready=True)
            await asyncio.sleep(tick)

    def failed(self, status: str) -> None:
        """Tell systemd why the start failed (STATUS only: READY=1 is never sent), before stopping."""
        self.reporter.status = status
        self.reporter.notifier.send(f"STATUS={status}")

    def stopping(self, *, reloading: bool) -> None:
        """Tell systemd the daemon is stopping, or reloading (re-executing), before the drain starts."""
        what = "re-executing" if reloading else "stopping"
        self.reporter.stopping(f"{what}: draining {self.app[CONNECTIONS].in_flight} request(s)", reloading=reloading)

    def _report(self, *, ready: bool) -> None:
        stalled = stalled_batchers(self.app, self.app[SETTINGS].watchdog_inference_timeout_s)
        status = status_line(self.app, stalled)
        if stalled and not self.reporter.status.startswith("inference stalled"):
            log.error("%s; withholding watchdog pings", status.split(";")[0])
        self.reporter.report(ready=ready, status=status, healthy=not stalled)
