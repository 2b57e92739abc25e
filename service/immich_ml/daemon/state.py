"""The daemon's readiness: ready once preloading and warm-up are over, and why preloading failed if it did."""

from __future__ import annotations

import asyncio

__all__ = ["DaemonState"]


class DaemonState:
    """Readiness shared by the HTTP layer and the server lifecycle (the drain is `Connections`')."""

    def __init__(self) -> None:
        self.ready = False
        self.preload_error: str | None = None
        self.ready_event = asyncio.Event()

    def mark_ready(self) -> None:
        """Preloading and warm-up are over (successfully or not): start reporting ready."""
        self.ready = True
        self.ready_event.set()
