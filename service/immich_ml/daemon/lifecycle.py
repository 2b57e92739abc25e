"""Tell systemd how the daemon is doing: start-up extensions, READY, STATUS lines and watchdog pings."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from immich_ml.daemon.systemd import Notifier
from immich_ml.http.appkeys import REGISTRY, SETTINGS, STATE

__all__ = ["EXTEND_BY_USEC", "EXTEND_EVERY_S", "Supervisor", "stalled_batchers", "status_line"]

log = logging.getLogger("immich_ml.systemd")

_TICK_S = 1.0  # how often STATUS is refreshed (sent only when it changed)
EXTEND_EVERY_S = 5.0  # while preloading, ask systemd for more start-up time this often ...
EXTEND_BY_USEC = 20_000_000  # ... by this much each time


def stalled_batchers(app: web.Application, older_than_s: float) -> list[str]:
    """Batchers whose current run started more than `older_than_s` ago (a wedged inference thread); none
    when `older_than_s` is 0 or less (the check is off)."""
    if (registry := app.get(REGISTRY)) is None or older_than_s <= 0:
        return []
    now = time.monotonic()
    return [
        batcher.name
        for model in registry.loaded().values()
        for batcher in model.batchers
        if batcher.running_since is not None and now - batcher.running_since > older_than_s
    ]


def status_line(app: web.Application, stalled: list[str]) -> str:
    """One human-readable line for `systemctl status`: phase, models and providers, queue, requests."""
    state = app[STATE]
    registry = app.get(REGISTRY)
    loaded = registry.loaded() if registry is not None else {}
    if stalled:
        phase = f"inference stalled in {', '.join(stalled)}"
    elif state.draining:
        phase = f"draining {state.in_flight} request(s)"
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
    return f"{phase}; models: {models}; queued {queued}; in flight {state.in_flight}"


class Supervisor:
    """Runs beside the server and reports to systemd through a `Notifier`.

    Before ready it extends the start-up timeout every few seconds (model downloads and TensorRT
    builds can be long); READY=1 follows warm-up. WATCHDOG=1 is sent from the event loop at half of
    `WATCHDOG_USEC`, but not while an inference batch has run longer than
    MACHINE_LEARNING_WATCHDOG_INFERENCE_TIMEOUT_S, so systemd restarts a daemon whose inference
    thread is wedged as well as one whose event loop is.
    """

    def __init__(self, app: web.Application, notifier: Notifier) -> None:
        self.app = app
        self.notifier = notifier
        self._status = ""
        self._last_ping = float("-inf")

    async def run(self) -> None:
        """Report until cancelled."""
        state = self.app[STATE]
        tick = min(_TICK_S, self.notifier.watchdog_interval_s or _TICK_S)
        last_extend = float("-inf")
        while not state.ready_event.is_set():
            if time.monotonic() - last_extend >= EXTEND_EVERY_S:
                self.notifier.send(f"EXTEND_TIMEOUT_USEC={EXTEND_BY_USEC}")
                last_extend = time.monotonic()
            self._report()
            try:
                await asyncio.wait_for(state.ready_event.wait(), tick)
            except TimeoutError:
                pass
        self._status = self._status_now()
        self.notifier.send("READY=1", f"STATUS={self._status}")
        while True:
            self._report()
            await asyncio.sleep(tick)

    def stopping(self) -> None:
        """Tell systemd the daemon is stopping (before the drain starts)."""
        self._status = f"stopping: draining {self.app[STATE].in_flight} request(s)"
        self.notifier.send("STOPPING=1", f"STATUS={self._status}")

    def _status_now(self, stalled: list[str] | None = None) -> str:
        return status_line(self.app, stalled or [])

    def _report(self) -> None:
        stalled = stalled_batchers(self.app, self.app[SETTINGS].watchdog_inference_timeout_s)
        status = self._status_now(stalled)
        if status != self._status:
            if stalled and not self._status.startswith("inference stalled"):
                log.error("%s; withholding watchdog pings", status.split(";")[0])
            self.notifier.send(f"STATUS={status}")
            self._status = status
        interval = self.notifier.watchdog_interval_s
        if interval is not None and not stalled and time.monotonic() - self._last_ping >= interval:
            self.notifier.send("WATCHDOG=1")
            self._last_ping = time.monotonic()
