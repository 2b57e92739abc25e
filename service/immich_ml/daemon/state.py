"""The daemon's readiness: ready once preloading and warm-up are over, why preloading failed if it did, and
why the start failed when strict provider mode refuses it."""

from __future__ import annotations

import asyncio

__all__ = ["DaemonState"]


class DaemonState:
    """Readiness shared by the HTTP layer and the server lifecycle (the drain is `Connections`')."""

    def __init__(self) -> None:
        self.ready = False
        self.preload_error: str | None = None
        self.ready_event = asyncio.Event()
        self.start_failure: str | None = None
        self.failed_event = asyncio.Event()

    def mark_ready(self) -> None:
        """Preloading and warm-up are over (successfully or not): start reporting ready."""
        self.ready = True
        self.ready_event.set()

    def fail_start(self, reason: str) -> None:
        """The daemon must not serve (strict provider mode cannot use its provider): never report ready."""
        self.start_failure = reason
        self.failed_event.set()
