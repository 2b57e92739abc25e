"""OCR: the PP-OCRv5 text detector and the CTC text recogniser that reads its boxes."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from immich_ml.errors import InvalidEntries
from immich_ml.inference.sessions import CPU
from immich_ml.pipelines.base import InferenceModel, Payload
from immich_ml.pipelines.ocr.boxes import MIN_SIDE, DetectionParams, boxes_from_probability, detection_input
from immich_ml.pipelines.ocr.ctc import read_lines, text_decoder
from immich_ml.pipelines.ocr.lines import NARROW_LINE_ELEMENTS, crop_line, recognition_batch, recognition_order

__all__ = ["TextDetections", "TextDetector", "TextRecognizer"]


def _number(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEntries(f"Invalid request format. Option '{name}' must be a number, not {value!r}.")
    return float(value)


def detection_params(options: Mapping[str, Any], *, resolution_cap: int) -> DetectionParams:
    """The `ocr.detection` options of one request (`minScore`, `maxResolution`, `scoreMode`). A `maxResolution`
    over `resolution_cap` (MACHINE_LEARNING_MAX_OCR_RESOLUTION) is served at the cap, never refused: the Immich
    server accepts any value ≥ 1, and since the image is only ever scaled down, a large one means full size."""
    max_resolution = _number(options, "maxResolution", DetectionParams.max_resolution)
    if max_resolution < 1 or max_resolution != int(max_resolution):
        raise InvalidEntries(
            f"Invalid request format. Option 'maxResolution' must be a positive integer, not {max_resolution!r}."
        )
    score_mode = options.get("scoreMode", "fast")
    if score_mode not in ("fast", "slow"):
        raise InvalidEntries(
            f"Invalid request format. Option 'scoreMode' must be 'fast' or 'slow', not {score_mode!r}."
        )
    return DetectionParams(
        box_threshold=_number(options, "minScore", DetectionParams.box_threshold),
        max_resolution=int(min(max_resolution, resolution_cap)),
        score_mode=score_mode,
    )


@dataclass(frozen=True)
class TextDetections:
    """The text boxes found in one image, in upstream's order: detection's output and recognition's input.

    Plain lists, so that a detection-only request serialises to upstream's `{"boxes", "scores"}`.
    """

    boxes: list[list[list[float]]]
    """Four `[x, y]` corners per box, in image pixels."""
    scores: list[float]


class TextDetector(InferenceModel):
    """DB text detector. `maxResolution`, `minScore` and `scoreMode` are per-request parameters, so one
    loaded instance serves requests with any of them (upstream's newest code keys instances by
    `maxResolution`; here that is unnecessary). Returns `{"boxes": [N×4×[x,y]], "scores": [N]}` in
    image pixels, in upstream's order, as plain lists (also the detection-only response)."""

    input_size_varies = True

    @property
    def max_batch(self) -> int:
        """One image per run on the CPU, where stacking saves no work: the shared arena's regions then fit one
        image's feature maps, which concurrent requests reuse, instead of also one stacked run's twice as large
        (docs/benchmarks.md "Memory"). A GPU stacks inputs of equal size (previews with one aspect ratio)."""
        return 1 if self._require_session().providers[0] == CPU else super().max_batch

    def configure(self) -> None:
        self.input_name = self._require_session().input_names[0]
        self.batcher = self.add_batcher()

    async def predict(self, payload: Payload, options: Mapping[str, Any], dependency: Any = None) -> TextDetections:
        image = self.image_of(payload)
        params = detection_params(options, resolution_cap=self.runtime.settings.max_ocr_resolution)
        if image.width < MIN_SIDE or image.height < MIN_SIDE:
            return TextDetections(boxes=[], scores=[])
        loop, pool, preprocessing = asyncio.get_running_loop(), self.pool, self.runtime.settings.preprocessing
        pixels = await loop.run_in_executor(pool, detection_input, image, params.max_resolution, preprocessing)
        (probability, *_) = await self.batcher.submit({self.input_name: pixels})
        found = await loop.run_in_executor(pool, boxes_from_probability, probability[0, 0], image.size, params)
        return TextDetections(boxes=found.boxes.tolist(), scores=found.scores.tolist())

    def warmup_payload(self) -> Payload:
        return Image.new("RGB", (64, 64), (255, 255, 255))


@dataclass(frozen=True)
class _Chunk:
    """Up to `max_batch_ocr` crops of one request, resized and padded to one width: one batcher item."""

    members: list[int]
    pixels: np.ndarray


class TextRecognizer(InferenceModel):
    """CTC recogniser over the detector's boxes; keeps lines whose text score is above `minScore`.

    Crops are sorted by aspect ratio and cut into chunks of `max_batch_ocr`, each padded to its own width
    as upstream does, so a request's results never depend on other requests. A whole chunk is one batcher
    item: chunks of equal width (most short lines pad to 320 px) from concurrent requests share a run, and on
    the CPU a chunk of wider lines runs a few rows at a time (`configure`).
    """

    def configure(self) -> None:
        session = self._require_session()
        self.decoder = text_decoder(session.metadata, self.model_dir / "charset.txt")
        self.input_name = session.input_names[0]
        if session.providers[0] == CPU:
            # A run holds at most one chunk of the narrowest lines' pixels: wide lines run fewer at a time.
            # On the CPU that costs less memory and less time per line (docs/benchmarks.md), and the model
            # reads each row alone, so results are the same bits (tests/pipelines/test_ocr.py).
            session.max_run_elements = self.batch_size * NARROW_LINE_ELEMENTS
        # Each chunk is decoded right after its run: its output (6 MiB for six 320-px lines) is freed at once,
        # not held until a document's last chunk is read (docs/benchmarks.md "Memory").
        self.batcher = self.add_reading_batcher(functools.partial(read_lines, self.decoder))

    def _chunks(self, image: Image.Image, boxes: np.ndarray) -> list[_Chunk]:
        crops = [crop_line(image, corners) for corners in boxes]
        order = recognition_order(crops)
        return [
            _Chunk(members, recognition_batch([crops[i] for i in members]))
            for start in range(0, len(order), self.batch_size)
            for members in (order[start : start + self.batch_size],)
        ]

    async def predict(self, payload: Payload, options: Mapping[str, Any], dependency: Any = None) -> dict[str, Any]:
        image = self.image_of(payload)
        min_score = _number(options, "minScore", 0.9)
        detections = self.dependency_of(dependency, TextDetections)
        if not detections.scores:
            return {"box": [], "boxScore": [], "text": [], "textScore": []}
        boxes = np.asarray(detections.boxes, dtype=np.float64)
        loop = asyncio.get_running_loop()
        chunks = await loop.run_in_executor(self.pool, self._chunks, image, boxes)
        read = await self.batcher.submit_many([{self.input_name: chunk.pixels} for chunk in chunks])
        lines = {
            index: line
            for chunk, chunk_lines in zip(chunks, read, strict=True)
            for index, line in zip(chunk.members, chunk_lines, strict=True)
        }
        kept = [i for i in range(len(boxes)) if lines[i].score > min_score]
        normalised = boxes[kept] / np.array([image.width, image.height], dtype=np.float64)
        return {
            "box": normalised.reshape(-1).tolist(),
            "boxScore": [float(detections.scores[i]) for i in kept],
            "text": [lines[i].text for i in kept],
            "textScore": [lines[i].score for i in kept],
        }

    def warmup_payload(self) -> Payload:
        return Image.new("RGB", (320, 48), (255, 255, 255))

    async def warmup(self) -> None:
        line = [[0.0, 0.0], [319.0, 0.0], [319.0, 47.0], [0.0, 47.0]]
        await self.predict(self.warmup_payload(), {}, TextDetections(boxes=[line], scores=[1.0]))
