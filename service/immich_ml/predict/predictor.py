"""One predict request end to end: decode the input, run each task's models in order, build the response."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from immich_ml.imaging import decode_image
from immich_ml.inference.threads import ThreadPool
from immich_ml.memory import return_heap
from immich_ml.models.registry import ModelRegistry
from immich_ml.predict.admission import PixelBudget
from immich_ml.predict.entries import Entry, TaskPlan

__all__ = ["PredictInput", "Predictor"]


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
        jpeg_draft: bool = False,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.max_image_pixels = max_image_pixels
        self.pixels = PixelBudget(max_pixels_in_flight, on_idle=self._return_heap)
        self.jpeg_draft = jpeg_draft
        self._trimming: set[asyncio.Task[None]] = set()

    async def predict(self, request: PredictInput) -> dict[str, Any]:
        """The response body: one key per task, plus the image size for image input (whose pixels count
        against the budget of pixels in flight until the response is built)."""
        with self.pixels.admission() as admit:
            return await self._predict(request, admit)

    def _return_heap(self) -> None:
        task = asyncio.get_running_loop().create_task(self.pool.run(return_heap))
        self._trimming.add(task)
        task.add_done_callback(self._trimming.discard)

    async def _predict(self, request: PredictInput, admit: Callable[[int, int], None]) -> dict[str, Any]:
        plans = request.plans
        response: dict[str, Any] = {}
        payload: Image.Image | str
        size = None
        if request.image is not None:
            draft_size = await self._draft_size(plans) if self.jpeg_draft else None
            payload, size = await self.pool.run(
                decode_image, request.image, max_pixels=self.max_image_pixels, draft_size=draft_size, admit=admit
            )
        else:
            payload = request.text or ""
        outcomes = await asyncio.gather(*(self._run_task(plan, payload) for plan in plans), return_exceptions=True)
        for plan, outcome in zip(plans, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            response[plan.task.value] = outcome
        if size is not None:
            response["imageWidth"], response["imageHeight"] = size
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
