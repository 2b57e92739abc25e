"""Text recognition maths (PP-OCR CTC recogniser): line crops, padded batch inputs, greedy CTC decoding.

Everything here is pure and blocking; `pipelines/ocr.py` runs it in worker threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from immich_ml.imaging import to_bgr

__all__ = ["REC_HEIGHT", "Recognised", "crop_line", "ctc_decode", "load_charset", "recognition_batch"]

REC_HEIGHT = 48
_MIN_WIDTH_RATIO = 320 / REC_HEIGHT
_TALL_RATIO = 1.5

FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class Recognised:
    """One line's text and its score (mean confidence of the kept CTC steps; 0 when nothing was read)."""

    text: str
    score: float


def load_charset(metadata: dict[str, str], fallback: Sequence[str] | None) -> list[str]:
    """The CTC alphabet: blank, the model's characters (ONNX metadata `character`, else `fallback`), space."""
    if characters := metadata.get("character"):
        lines = characters.splitlines()
    elif fallback is not None:
        lines = list(fallback)
    else:
        raise ValueError("the recognition model has no 'character' metadata and there is no charset.txt")
    return ["<blank>", *lines, " "]


def _perspective_coefficients(source: NDArray[np.floating], width: int, height: int) -> list[float]:
    """PIL PERSPECTIVE data mapping the upright `width`×`height` rectangle onto the quadrilateral `source`."""
    target = [(0, 0), (width, 0), (width, height), (0, height)]
    rows = []
    rhs = []
    for (x, y), (u, v) in zip(target, source.tolist(), strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return [float(c) for c in np.linalg.solve(np.asarray(rows, np.float64), np.asarray(rhs, np.float64))]


def crop_line(image: Image.Image, corners: NDArray[np.floating]) -> Image.Image:
    """Warp one quadrilateral (TL, TR, BR, BL) to an upright crop; tall crops are turned 90° anticlockwise."""
    p = np.asarray(corners, dtype=np.float64)
    width = max(1, int(max(np.linalg.norm(p[1] - p[0]), np.linalg.norm(p[2] - p[3]))))
    height = max(1, int(max(np.linalg.norm(p[0] - p[3]), np.linalg.norm(p[1] - p[2]))))
    crop = image.transform(
        (width, height),
        Image.Transform.PERSPECTIVE,
        _perspective_coefficients(p, width, height),
        resample=Image.Resampling.BICUBIC,
    )
    if height / width >= _TALL_RATIO:
        crop = crop.rotate(90, expand=True)
    return crop


def recognition_batch(crops: Sequence[Image.Image]) -> FloatArray:
    """One [n,3,48,W] float32 input: crops resized to height 48 (bilinear), BGR, scaled to [-1,1],
    right-padded with 0 to `W = int(48·max(320/48, widest aspect ratio))`."""
    ratios = [crop.width / crop.height for crop in crops]
    batch_width = int(REC_HEIGHT * max(_MIN_WIDTH_RATIO, *ratios))
    batch = np.zeros((len(crops), 3, REC_HEIGHT, batch_width), dtype=np.float32)
    for row, (crop, ratio) in enumerate(zip(crops, ratios, strict=True)):
        width = min(batch_width, math.ceil(REC_HEIGHT * ratio))
        resized = cv2.resize(to_bgr(crop), (width, REC_HEIGHT), interpolation=cv2.INTER_LINEAR)
        batch[row, :, :, :width] = (resized.transpose(2, 0, 1).astype(np.float32) / 255 - 0.5) / 0.5
    return batch


def _as_probabilities(output: NDArray[np.floating]) -> FloatArray:
    """The output as float32 probabilities: a softmax is applied when rows are not already distributions."""
    values = np.asarray(output, dtype=np.float32)
    sums = values.sum(axis=-1)
    if values.min(initial=0.0) >= 0 and np.allclose(sums, 1.0, atol=1e-2):
        return values
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def ctc_decode(output: NDArray[np.floating], charset: Sequence[str]) -> list[Recognised]:
    """Greedy CTC over an [n,T,C] output (probabilities in any float dtype, or raw logits).

    Per step: the most likely class and its probability; repeats collapse, then blanks (index 0) go. The
    score is the mean probability of the kept steps; a non-finite score becomes 0 (so the line is dropped).
    """
    probabilities = _as_probabilities(output)
    indices = probabilities.argmax(axis=-1)
    confidences = probabilities.max(axis=-1)
    results = []
    for row_indices, row_confidences in zip(indices, confidences, strict=True):
        keep = np.ones(len(row_indices), dtype=bool)
        keep[1:] = row_indices[1:] != row_indices[:-1]
        keep &= row_indices != 0
        text = "".join(charset[i] if i < len(charset) else "" for i in row_indices[keep])
        score = float(row_confidences[keep].mean()) if keep.any() else 0.0
        results.append(Recognised(text, score if math.isfinite(score) else 0.0))
    return results
