"""The daemon's lifecycle state: ready after warm-up, draining on stop, and requests in flight."""

from __future__ import annotations

import asyncio
import time

__all__ = ["DaemonState"]


class DaemonState:
    """Readiness and in-flight accounting shared by the HTTP layer and the server lifecycle."""

    def __init__(self) -> None:
        self.ready = False
        self.draining_since: float | None = None
        self.preload_error: str | None = None
        self.in_flight = 0
        self.ready_event = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def draining(self) -> bool:
        """Whether SIGTERM arrived: no new work is accepted."""
        return self.draining_since is not None

    def mark_ready(self) -> None:
        """Preloading and warm-up are over (successfully or not): start reporting ready."""
        self.ready = True
        self.ready_event.set()

    def start_draining(self) -> None:
        """Stop accepting requests that begin from now on; those already arriving are finished."""
        self.draining_since = time.monotonic()

    def accepts(self, first_byte: float) -> bool:
        """Whether a request whose first byte arrived at `first_byte` (monotonic) is served."""
        return self.draining_since is None or first_byte < self.draining_since

    def begin_request(self) -> None:
        """A request started arriving (its first byte)."""
        self.in_flight += 1
        self._idle.clear()

    def end_request(self) -> None:
        """A request was answered, or its connection closed."""
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
