"""Text detection maths (PP-OCR DB detector): input resizing, probability map → quadrilaterals, box order.

The DB post-processing is rapidocr's own `DBPostProcess` (what upstream Immich's released OCR runs), so boxes
are identical to upstream's. Everything here is pure and blocking; `pipelines/ocr/model.py` runs it in worker
threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from rapidocr.ch_ppocr_det.utils import DBPostProcess

from immich_ml.settings import Preprocessing

__all__ = [
    "MIN_SIDE",
    "DetectionParams",
    "TextBoxes",
    "boxes_from_probability",
    "detection_input",
    "detection_size",
    "reading_order",
]

MIN_SIDE = 32
"""Images narrower or shorter than this yield no text (the detector downsamples by 32)."""

_LINE_GAP_PX = 10
_RELEASED_SCALE = np.float32(1.0) / np.float32(127.5)

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

    Released upstream feeds `(x − 0.5) · float32(1 / 127.5)` (values in about [0, 2]; multiplying by the float32
    reciprocal, not dividing, is what makes the input bit-identical to upstream's); the newest feeds
    `x / 127.5 − 1`.

    Written into one array and normalised in place, the same float32 operations in the same order (so the same
    bits), holding one float array at a time instead of two.
    """
    width, height = detection_size(image.width, image.height, max_resolution)
    rgb = np.asarray(image.resize((width, height), resample=Image.Resampling.LANCZOS))
    pixels = np.empty((1, 3, height, width), np.float32)
    pixels[0] = rgb.transpose(2, 0, 1)[::-1]  # planar BGR, cast exactly
    if preprocessing is Preprocessing.RELEASED:
        pixels -= np.float32(0.5)
        pixels *= _RELEASED_SCALE
    else:
        pixels /= np.float32(127.5)
        pixels -= np.float32(1.0)
    return pixels


def _post_processor(params: DetectionParams) -> DBPostProcess:
    """rapidocr's DB post-processor with upstream Immich's settings: threshold 0.3, 2×2 dilation, at most
    1000 contours, unclip ratio 1.6; the request's box threshold and score mode. Cheap, and one per call keeps
    requests with different options apart."""
    return DBPostProcess(
        thresh=0.3,
        box_thresh=params.box_threshold,
        max_candidates=1000,
        unclip_ratio=1.6,
        score_mode=params.score_mode,
        use_dilation=True,
    )


def boxes_from_probability(
    probability: NDArray[np.floating], image_size: tuple[int, int], params: DetectionParams
) -> TextBoxes:
    """DB post-processing of one [h,w] probability map into boxes on the original `image_size` (w, h).

    rapidocr's `DBPostProcess`: each contour's minimum-area rectangle (`get_mini_boxes`) is scored (mean
    probability inside it, or inside the contour for `slow`), kept if the score reaches `box_threshold`,
    grown by offsetting the polygon by `area·1.6/perimeter` (pyclipper), re-boxed, scaled to the image,
    rounded, corner-ordered and clipped; boxes with an edge of 3 px or less go. Boxes whose score is not
    finite (a broken fp16 export) are dropped too. Returned in upstream's order (`reading_order`).
    """
    width, height = image_size
    prob = np.asarray(probability, dtype=np.float32)[None, None]  # the detector's [1,1,h,w] output
    boxes, scores = _post_processor(params)(prob, (height, width))
    found = TextBoxes(np.asarray(boxes, np.float32).reshape(-1, 4, 2), np.asarray(scores, np.float32))
    finite = np.isfinite(found.scores)
    if not finite.any():
        return TextBoxes.empty()
    return reading_order(TextBoxes(found.boxes[finite], found.scores[finite]))


def reading_order(found: TextBoxes) -> TextBoxes:
    """Upstream Immich's order of the boxes, with the scores left in contour order, as upstream sends them.

    Upstream ranks the boxes by top-left y (stable), numbers the lines over that ranking (a new line where y
    jumps by ≥ 10 px), then sorts by `line · 10⁶ + x` where the line number of the box at rank j is read at
    rank `by_y[j]` instead of j. With one box per line, as DB post-processing returns them bottom to top, the
    result is the contour order itself (bottom to top); the scores, which upstream never reorders, then stay
    with their boxes. Reproduced as is, so our answers equal upstream's.
    """
    top_left = found.boxes[:, 0].astype(np.float64)
    by_y = np.argsort(top_left[:, 1], kind="stable")
    line = np.concatenate([[0], np.cumsum(np.abs(np.diff(top_left[by_y, 1])) >= _LINE_GAP_PX)])
    key = line[by_y] * 1e6 + top_left[by_y, 0]
    order = by_y[np.argsort(key, kind="stable")]
    return TextBoxes(found.boxes[order], found.scores)
