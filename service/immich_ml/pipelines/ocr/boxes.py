"""Text detection maths (PP-OCR DB detector): input resizing, probability map → quadrilaterals, reading order.

Everything here is pure and blocking; `pipelines/ocr.py` runs it in worker threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from immich_ml.imaging import to_bgr
from immich_ml.settings import Preprocessing

__all__ = [
    "MIN_SIDE",
    "DetectionParams",
    "TextBoxes",
    "boxes_from_probability",
    "detection_input",
    "detection_size",
    "order_corners",
    "reading_order",
]

MIN_SIDE = 32
"""Images narrower or shorter than this yield no text (the detector downsamples by 32)."""

_BINARY_THRESHOLD = 0.3
_MAX_CANDIDATES = 1000
_UNCLIP_RATIO = 1.6
_MIN_SIZE = 3
_LINE_GAP_PX = 10
_DILATE_KERNEL = np.ones((2, 2), dtype=np.uint8)

FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class DetectionParams:
    """The per-request knobs of DB post-processing (the `ocr.detection` options)."""

    box_threshold: float = 0.5
    max_resolution: int = 736
    score_mode: Literal["fast", "slow"] = "fast"


@dataclass(frozen=True)
class TextBoxes:
    """Detected lines: `boxes` [N,4,2] float32 pixel corners (TL, TR, BR, BL), `scores` [N] float32."""

    boxes: FloatArray
    scores: FloatArray

    @classmethod
    def empty(cls) -> TextBoxes:
        return cls(np.zeros((0, 4, 2), np.float32), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.scores)


def detection_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """The detector input size: shorter side towards `max_resolution` (never upscaled), multiples of 32."""
    ratio = min(max_resolution / min(width, height), 1.0)

    def side(length: int) -> int:
        return max(MIN_SIDE, round(int(length * ratio) / 32) * 32)

    return side(width), side(height)


def detection_input(image: Image.Image, max_resolution: int, preprocessing: Preprocessing) -> FloatArray:
    """The detector's [1,3,h,w] float32 input: LANCZOS resize, BGR, normalised per `preprocessing`.

    Released upstream feeds `(x − 0.5) / 127.5` (values in about [0, 2]); the newest feeds `x / 127.5 − 1`.
    """
    size = detection_size(image.width, image.height, max_resolution)
    pixels = to_bgr(image.resize(size, resample=Image.Resampling.LANCZOS)).astype(np.float32)
    if preprocessing is Preprocessing.RELEASED:
        pixels = (pixels - 0.5) / 127.5
    else:
        pixels = pixels / 127.5 - 1.0
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def boxes_from_probability(
    probability: NDArray[np.floating], image_size: tuple[int, int], params: DetectionParams
) -> TextBoxes:
    """DB post-processing of one [h,w] probability map into boxes on the original `image_size` (w, h).

    Threshold 0.3, 2×2 dilation, up to 1000 contours; each contour's minimum-area rectangle is scored
    (mean probability inside the rectangle, or inside the contour for `slow`), kept if the score reaches
    `box_threshold`, grown by `area·1.6/perimeter` on every side, scaled to the image, corner-ordered,
    clipped, and dropped when an edge is 3 px or shorter. Boxes with a non-finite score are dropped.
    """
    prob = np.asarray(probability, dtype=np.float32)
    map_h, map_w = prob.shape
    width, height = image_size
    mask = cv2.dilate((prob > _BINARY_THRESHOLD).astype(np.uint8), _DILATE_KERNEL)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    scale = np.array([width / map_w, height / map_h], dtype=np.float32)
    boxes, scores = [], []
    for contour in contours[:_MAX_CANDIDATES]:
        center, (rect_w, rect_h), angle = cv2.minAreaRect(contour)
        if min(rect_w, rect_h) < _MIN_SIZE:
            continue
        corners = cv2.boxPoints((center, (rect_w, rect_h), angle))
        region = corners if params.score_mode == "fast" else contour.reshape(-1, 2)
        score = _mean_inside(prob, region)
        if not np.isfinite(score) or score < params.box_threshold:
            continue
        grow = 2 * (rect_w * rect_h * _UNCLIP_RATIO) / (2 * (rect_w + rect_h))
        grown = (rect_w + grow, rect_h + grow)
        if min(grown) < _MIN_SIZE + 2:
            continue
        corners = np.round(cv2.boxPoints((center, grown, angle)) * scale)
        corners[:, 0] = np.clip(corners[:, 0], 0, width)
        corners[:, 1] = np.clip(corners[:, 1], 0, height)
        corners = order_corners(corners)
        corners[:, 0] = np.clip(corners[:, 0], 0, width - 1)
        corners[:, 1] = np.clip(corners[:, 1], 0, height - 1)
        if int(np.linalg.norm(corners[0] - corners[1])) <= _MIN_SIZE:
            continue
        if int(np.linalg.norm(corners[0] - corners[3])) <= _MIN_SIZE:
            continue
        boxes.append(corners)
        scores.append(score)
    if not boxes:
        return TextBoxes.empty()
    return reading_order(TextBoxes(np.asarray(boxes, np.float32), np.asarray(scores, np.float32)))


def _mean_inside(prob: FloatArray, polygon: np.ndarray) -> float:
    """Mean of `prob` over the pixels of `polygon` (0 when it covers none)."""
    map_h, map_w = prob.shape
    x0 = int(np.clip(np.floor(polygon[:, 0].min()), 0, map_w - 1))
    x1 = int(np.clip(np.ceil(polygon[:, 0].max()), 0, map_w - 1))
    y0 = int(np.clip(np.floor(polygon[:, 1].min()), 0, map_h - 1))
    y1 = int(np.clip(np.ceil(polygon[:, 1].max()), 0, map_h - 1))
    inside = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
    shifted = (polygon - np.array([x0, y0])).astype(np.int32)
    cv2.fillPoly(inside, [shifted], 1)
    values = prob[y0 : y1 + 1, x0 : x1 + 1][inside.astype(bool)]
    return float(values.mean()) if values.size else 0.0


def order_corners(corners: np.ndarray) -> np.ndarray:
    """Order four corners clockwise from the top left: TL, TR, BR, BL."""
    by_x = corners[np.argsort(corners[:, 0], kind="stable")]
    left = by_x[:2][np.argsort(by_x[:2, 1], kind="stable")]
    right = by_x[2:][np.argsort(by_x[2:, 1], kind="stable")]
    return np.stack([left[0], right[0], right[1], left[1]])


def reading_order(found: TextBoxes) -> TextBoxes:
    """Sort top to bottom, then left to right: a new line starts where the top-left y jumps by ≥ 10 px."""
    top_left = found.boxes[:, 0]
    by_y = np.lexsort((top_left[:, 0], top_left[:, 1]))
    line = np.zeros(len(by_y), dtype=np.int64)
    gaps = np.diff(top_left[by_y, 1]) >= _LINE_GAP_PX
    line[by_y[1:]] = np.cumsum(gaps)
    order = np.lexsort((top_left[:, 0], line))
    return TextBoxes(found.boxes[order], found.scores[order])
