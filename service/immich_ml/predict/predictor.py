"""One predict request end to end: decode the input, run each task's models in order, build the response."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass
from typing import Any

from PIL import Image

from immich_ml.errors import Overloaded
from immich_ml.imaging import PixelBudget, Reservation, Size, decode_image
from immich_ml.inference.threads import ThreadPool
from immich_ml.memory import return_heap
from immich_ml.models.registry import ModelRegistry
from immich_ml.predict.entries import Entry, TaskPlan

__all__ = ["PredictInput", "Predictor"]

HEAP_RETURN_QUIET_S = 0.5
"""How long the pixel budget stays empty after a burst before the heap goes back to the OS: a request frees its
image and buffers only after giving its pixels back, and what is freed after `malloc_trim` stays resident."""


@dataclass(frozen=True)
class PredictInput:
    """A predict request as the HTTP edge read it: `entries` parsed once into plans, and the raw input."""

    entries: bytes
    plans: list[TaskPlan]
    image: bytes | None = None
    text: str | None = None

    def describe(self) -> str:
        """A log-safe summary: never the image or the query text."""
        kind = f"image {len(self.image)} B" if self.image is not None else f"text {len(self.text or '')} chars"
        return f"{self.entries[:200].decode(errors='replace')} ({kind})"


class Predictor:
    """Runs the models a request asks for and shapes the response like upstream."""

    def __init__(
        self,
        registry: ModelRegistry,
        pool: ThreadPool,
        *,
        max_image_pixels: int,
        max_pixels_in_flight: int,
        admission_wait_s: float = 0.0,
        jpeg_draft: bool = False,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.max_image_pixels = max_image_pixels
        self.pixels = PixelBudget(max_pixels_in_flight)
        self.admission_wait_s = admission_wait_s
        self._pixels_freed = asyncio.Event()
        """Set (and replaced) whenever a request gives its pixels back: a request that found the budget full
        tries again."""
        self.jpeg_draft = jpeg_draft
        self._heap_return: asyncio.TimerHandle | None = None

    async def predict(self, request: PredictInput) -> dict[str, Any]:
        """The response body: one key per task, plus the image size for image input (whose pixels count
        against the budget of pixels in flight until the response is built)."""
        if request.image is None:
            return await self._run_plans(request.plans, request.text or "")
        reservation = self.pixels.reservation()
        try:
            image, size = await self._decode(request.image, request.plans, reservation)
            response = await self._run_plans(request.plans, image)
        finally:
            if reservation.release():  # the last image of a burst is done: its heap goes back once all is freed
                self._return_heap_when_quiet()
            self._pixels_freed.set()
            self._pixels_freed = asyncio.Event()
        response["imageWidth"], response["imageHeight"] = size
        return response

    def close(self) -> None:
        """Cancel a pending return of the heap: before the thread pools shut down, and when a later image
        restarts the quiet period."""
        if self._heap_return is not None:
            self._heap_return.cancel()

    def _return_heap_when_quiet(self) -> None:
        """Hand the heap back `HEAP_RETURN_QUIET_S` from now, unless another image comes meanwhile."""
        self.close()
        self._heap_return = asyncio.get_running_loop().call_later(HEAP_RETURN_QUIET_S, self._return_heap_if_idle)

    def _return_heap_if_idle(self) -> None:
        self._heap_return = None
        if self.pixels.claim_heap_return():
            self.pool.submit(return_heap)

    async def _decode(self, data: bytes, plans: list[TaskPlan], reservation: Reservation) -> tuple[Image.Image, Size]:
        draft_size = await self._draft_size(plans) if self.jpeg_draft else None
        decode = functools.partial(
            decode_image, data, max_pixels=self.max_image_pixels, draft_size=draft_size, reservation=reservation
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.admission_wait_s
        while True:  # the Immich server never retries: wait (on the loop, never in a decoding thread) for pixels
            freed = self._pixels_freed
            try:
                return await loop.run_in_executor(self.pool, decode)
            except Overloaded:
                if loop.time() >= deadline:
                    raise
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(freed.wait(), deadline - loop.time())

    async def _run_plans(self, plans: list[TaskPlan], payload: Image.Image | str) -> dict[str, Any]:
        outcomes = await asyncio.gather(*(self._run_task(plan, payload) for plan in plans), return_exceptions=True)
        response: dict[str, Any] = {}
        for plan, outcome in zip(plans, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            response[plan.task.value] = outcome
        return response

    async def _draft_size(self, plans: list[TaskPlan]) -> int | None:
        """The smallest image side the request's only model needs, when that is all the request asks for."""
        if len(plans) != 1 or plans[0].second is not None:
            return None
        async with self.registry.use(plans[0].first.key) as model:
            return model.min_image_side

    async def _run_task(self, plan: TaskPlan, payload: Image.Image | str) -> Any:
        """The first model's output, or the second's, given the first's output (`DEPENDS_ON`)."""
        output = await self._run_model(plan.first, payload, None)
        if plan.second is not None:
            output = await self._run_model(plan.second, payload, output)
        return output

    async def _run_model(self, entry: Entry, payload: Image.Image | str, dependency: Any) -> Any:
        async with self.registry.use(entry.key) as model:
            return await model.predict(payload, entry.options, dependency)
