"""Facial recognition: SCRFD face detection (insightface packs) and ArcFace embeddings of aligned faces."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from immich_ml.errors import InvalidEntries, ModelLoadFailed
from immich_ml.inference.sessions import OnnxSession
from immich_ml.pipelines.base import InferenceModel, Outputs, Payload, vector_string
from immich_ml.pipelines.faces.alignment import ARCFACE_SIZE, ARCFACE_TEMPLATE, align_face

__all__ = ["DEFAULT_MIN_SCORE", "FaceDetections", "FaceDetector", "FaceRecognizer", "decode_detections", "letterbox"]

DETECTION_SIZE = 640
STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2
NMS_THRESHOLD = 0.4
DEFAULT_MIN_SCORE = 0.7
"""Upstream's default `minScore`; the Immich server sends its own (also 0.7 by default)."""
MIN_SCORE_FLOOR = 0.1
"""The lowest `minScore` accepted: the Immich server's settings allow 0.1 to 1. Lower values make the detector
return every anchor (thousands of faces, megabytes of reply), so they are refused with 422."""


@dataclass(frozen=True)
class FaceDetections:
    """The faces found in one image, best first: detection's output and recognition's input.

    Plain lists, so that a detection-only request serialises to upstream's `{"boxes", "scores", "landmarks"}`.
    """

    boxes: list[list[float]]
    """`[x1, y1, x2, y2]` per face in image pixels, rounded to whole numbers."""
    scores: list[float]
    landmarks: list[list[list[float]]]
    """Five `[x, y]` points per face (eyes, nose tip, mouth corners), not rounded."""


def letterbox(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Scale an HWC image into the top-left of a black 640×640 canvas, keeping its aspect.

    Returns the canvas and the scale (canvas pixels per image pixel), computed like insightface.
    """
    height, width = image.shape[:2]
    ratio = height / width
    if ratio > 1:
        new_height, new_width = DETECTION_SIZE, int(DETECTION_SIZE / ratio)
    else:
        new_height, new_width = int(DETECTION_SIZE * ratio), DETECTION_SIZE
    new_height, new_width = max(new_height, 1), max(new_width, 1)
    canvas = np.zeros((DETECTION_SIZE, DETECTION_SIZE, image.shape[2]), dtype=np.uint8)
    resized = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
    canvas[:new_height, :new_width] = resized
    return canvas, new_height / height


@functools.cache
def anchor_centres(stride: int) -> np.ndarray:
    """Canvas `(x, y)` of every anchor of one stride: cells row by row, a cell's anchors side by side."""
    side = DETECTION_SIZE // stride
    ys, xs = np.mgrid[:side, :side]
    cells = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    centres = np.repeat(cells, ANCHORS_PER_CELL, axis=0)
    centres.flags.writeable = False
    return centres


def decode_detections(outputs: Sequence[np.ndarray], scale: float, min_score: float) -> FaceDetections:
    """Turn SCRFD's nine outputs for one image (scores, box distances, keypoint offsets per stride) into image
    faces."""
    levels = len(STRIDES)
    scores, boxes, points = [], [], []
    for level, stride in enumerate(STRIDES):
        level_scores = outputs[level].reshape(-1)
        kept = np.flatnonzero(level_scores >= min_score)
        centres = anchor_centres(stride)[kept]
        distances = outputs[level + levels].reshape(-1, 4)[kept] * stride
        offsets = outputs[level + 2 * levels].reshape(-1, 10)[kept] * stride
        scores.append(level_scores[kept])
        boxes.append(np.hstack([centres - distances[:, :2], centres + distances[:, 2:]]) / scale)
        points.append((np.tile(centres, 5) + offsets) / scale)
    all_scores = np.concatenate(scores)
    order = all_scores.argsort()[::-1]
    all_boxes, all_points = np.concatenate(boxes)[order], np.concatenate(points)[order]
    survivors = suppress_overlaps(all_boxes, NMS_THRESHOLD)
    return FaceDetections(
        boxes=all_boxes[survivors].round().tolist(),
        # float32 → the Python float with the same shortest text: JSON shows 0.92 like upstream's numpy output
        scores=[float(str(score)) for score in all_scores[order][survivors]],
        landmarks=all_points[survivors].reshape(-1, 5, 2).tolist(),
    )


def suppress_overlaps(boxes: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression of boxes sorted best first; areas count pixels (+1) like insightface."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    remaining = np.arange(len(boxes))
    kept: list[int] = []
    while remaining.size:
        best, rest = remaining[0], remaining[1:]
        kept.append(int(best))
        width = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        height = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        overlap = width * height
        with np.errstate(divide="ignore", invalid="ignore"):  # degenerate boxes: NaN counts as overlap
            iou = overlap / (areas[best] + areas[rest] - overlap)
        remaining = rest[iou <= threshold]
    return kept


def has_batch_axis(session: OnnxSession) -> bool:
    """Whether every output has a leading symbolic batch axis, so several images can share one run.

    The insightface exports (det_10g and friends) have `[rows, k]` outputs: their batch is the anchors of one
    image, so those graphs must run one image at a time.
    """
    shapes = [session.output_shape(i) for i in range(len(session.output_names))]
    return all(len(shape) == 3 and not isinstance(shape[0], int) for shape in shapes)


def _min_score(options: Mapping[str, Any]) -> float:
    value = options.get("minScore", DEFAULT_MIN_SCORE)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEntries(f"Invalid request format. minScore must be a number, not {value!r}.")
    if not MIN_SCORE_FLOOR <= value <= 1:
        raise InvalidEntries(
            f"Invalid request format. minScore must be from {MIN_SCORE_FLOOR} to 1 (the Immich server's own range), "
            f"not {value!r}."
        )
    return float(value)


class FaceDetector(InferenceModel):
    """SCRFD with keypoints (det_10g, det_2.5g, det_500m, scrfd_10g_bnkps): boxes, scores, five landmarks."""

    def configure(self) -> None:
        session = self._require_session()
        if len(session.output_names) != 3 * len(STRIDES):
            raise ModelLoadFailed(
                f"{self.model_path}: expected SCRFD with keypoints (9 outputs), got {len(session.output_names)} outputs"
            )
        self.input_name = session.input_names[0]
        self.batched = has_batch_axis(session)
        self.batcher = self.add_batcher()

    def stacks_inputs(self) -> bool:
        return self.batched

    def preprocess(self, image: Image.Image) -> tuple[np.ndarray, float]:
        """The CHW float32 RGB blob, (x − 127.5) / 128, of the letterboxed image, and the letterbox scale."""
        canvas, scale = letterbox(np.asarray(image))
        blob = (canvas.astype(np.float32) - 127.5) / 128.0
        return np.ascontiguousarray(blob.transpose(2, 0, 1)), scale

    async def predict(self, payload: Payload, options: Mapping[str, Any], dependency: Any = None) -> FaceDetections:
        image = self.image_of(payload)
        min_score = _min_score(options)
        loop = asyncio.get_running_loop()
        blob, scale = await loop.run_in_executor(self.pool, self.preprocess, image)
        outputs: Outputs = await self.batcher.submit({self.input_name: blob[None]})
        return await loop.run_in_executor(self.pool, decode_detections, outputs, scale, min_score)

    def warmup_payload(self) -> Payload:
        return Image.new("RGB", (DETECTION_SIZE, DETECTION_SIZE), (128, 128, 128))


def face_blob(crop: np.ndarray) -> np.ndarray:
    """The CHW float32 blob, `(x − 127.5) / 127.5`, of one aligned 112×112 RGB crop."""
    return np.ascontiguousarray(((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1))


class FaceRecognizer(InferenceModel):
    """ArcFace (w600k_r50, glintr100): a 512-float embedding per detected face, unnormalised like upstream."""

    def configure(self) -> None:
        self.input_name = self._require_session().input_names[0]
        self.batcher = self.add_batcher()

    def crops(self, image: Image.Image, landmarks: np.ndarray) -> list[dict[str, np.ndarray]]:
        """The graph's inputs, one row per face. Upstream warps the BGR image and swaps to RGB afterwards; a
        warp treats every channel alike, so warping the RGB image directly gives the same pixels."""
        pixels = np.asarray(image)
        return [{self.input_name: face_blob(align_face(pixels, points))[None]} for points in landmarks]

    async def predict(
        self, payload: Payload, options: Mapping[str, Any], dependency: Any = None
    ) -> list[dict[str, Any]]:
        image = self.image_of(payload)
        faces = self.dependency_of(dependency, FaceDetections)
        if not faces.scores:
            return []
        landmarks = np.asarray(faces.landmarks, dtype=np.float64)
        crops = await asyncio.get_running_loop().run_in_executor(self.pool, self.crops, image, landmarks)
        outputs = await self.batcher.submit_many(crops)
        return [
            {
                "boundingBox": dict(zip(("x1", "y1", "x2", "y2"), box, strict=True)),
                "embedding": vector_string(embedding[0]),
                "score": score,
            }
            for box, score, (embedding, *_) in zip(faces.boxes, faces.scores, outputs, strict=True)
        ]

    def warmup_payload(self) -> Payload:
        return Image.new("RGB", (ARCFACE_SIZE, ARCFACE_SIZE), (128, 128, 128))

    async def warmup(self) -> None:
        """Embed one synthetic face whose landmarks already sit on the template (no detector needed)."""
        face = FaceDetections(
            boxes=[[0.0, 0.0, float(ARCFACE_SIZE), float(ARCFACE_SIZE)]],
            scores=[1.0],
            landmarks=[ARCFACE_TEMPLATE.tolist()],
        )
        await self.predict(self.warmup_payload(), {}, face)
