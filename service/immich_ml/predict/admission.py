"""Admission control on memory: a budget of decoded image pixels in flight across all requests.

An image's pixel count is known from its header, before it is decoded; a request whose image would take the
pixels in flight over MACHINE_LEARNING_MAX_PIXELS_IN_FLIGHT gets 503 with `Retry-After` instead of decoding.
Its pixels stay reserved until the request is answered (the decoded image lives that long). When the last
reservation of a burst ends, the heap is handed back to the OS so the resident size comes down again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from immich_ml.errors import Overloaded

__all__ = ["PixelBudget"]

_TRIM_AFTER_PIXELS = 20_000_000
"""Pixels admitted since the last trim (about 60 MB as RGB) before an idle budget returns the heap."""


class PixelBudget:
    """Pixels reserved by requests being served; thread-safe (reserved in the decoding threads)."""

    def __init__(self, limit: int, *, on_idle: Callable[[], None]) -> None:
        self.limit = limit
        self.in_use = 0
        self._since_trim = 0
        self._on_idle = on_idle
        self._lock = threading.Lock()

    @contextmanager
    def admission(self) -> Iterator[Callable[[int, int], None]]:
        """Yield `admit(width, height)`, which reserves an image's pixels or raises `Overloaded`; every
        reservation made through it is released when the block ends."""
        held = 0

        def admit(width: int, height: int) -> None:
            nonlocal held
            pixels = width * height
            with self._lock:
                if self.in_use + pixels > self.limit:
                    raise Overloaded(
                        f"Too many image pixels in flight ({self.in_use} + {pixels} of {self.limit}, "
                        "MACHINE_LEARNING_MAX_PIXELS_IN_FLIGHT); retry shortly"
                    )
                self.in_use += pixels
                self._since_trim += pixels
            held += pixels

        try:
            yield admit
        finally:
            if held:
                self._release(held)

    def _release(self, pixels: int) -> None:
        with self._lock:
            self.in_use -= pixels
            idle_after_burst = self.in_use == 0 and self._since_trim >= _TRIM_AFTER_PIXELS
            if idle_after_burst:
                self._since_trim = 0
        if idle_after_burst:
            self._on_idle()
