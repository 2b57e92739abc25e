"""The daemon's lifecycle state: ready after warm-up, draining on stop, and requests in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DaemonState"]


class DaemonState:
    """Readiness and in-flight accounting shared by the HTTP layer and the server lifecycle."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.preload_error: str | None = None
        self.in_flight = 0
        self.ready_event = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def mark_ready(self) -> None:
        """Preloading and warm-up are over (successfully or not): start reporting ready."""
        self.ready = True
        self.ready_event.set()

    @contextmanager
    def track_request(self) -> Iterator[None]:
        """Count a request as in flight for the duration of the block."""
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
