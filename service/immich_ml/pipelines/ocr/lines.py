"""Text recognition inputs (PP-OCR CTC recogniser): line crops and padded batch inputs.

Resizing and normalising are rapidocr's own (`TextRecognizer.resize_norm_img`), applied exactly as its
`TextRecognizer` applies them, so inputs are identical to upstream Immich's; only the batching is ours
(`pipelines/ocr/model.py`); the decoding of the output is in `ctc.py`. The crop is upstream Immich's own (a Pillow
warp), not rapidocr's. Everything here is pure and blocking; the model runs it in worker threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import cast

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from rapidocr.ch_ppocr_rec import TextRecognizer as RapidTextRecognizer

__all__ = [
    "NARROW_LINE_ELEMENTS",
    "REC_HEIGHT",
    "crop_line",
    "recognition_batch",
    "recognition_order",
]

REC_HEIGHT = 48
_REC_SHAPE = (3, REC_HEIGHT, 320)
NARROW_LINE_ELEMENTS = math.prod(_REC_SHAPE)
"""Input elements of one line padded to the recogniser's narrowest width (320 px)."""
_MIN_WIDTH_RATIO = _REC_SHAPE[2] / REC_HEIGHT
_TALL_RATIO = 1.5
# `resize_norm_img` reads nothing from its recogniser but the input shape; this stands in for one, so the
# library's function runs without a session of its own.
_RESIZER = SimpleNamespace(rec_image_shape=_REC_SHAPE)

FloatArray = NDArray[np.float32]
Crop = NDArray[np.uint8]
"""One line as an upright BGR uint8 [h,w,3] array."""


def _perspective_coefficients(source: NDArray[np.float32], width: int, height: int) -> list[float]:
    """PIL PERSPECTIVE data mapping the upright `width`×`height` rectangle onto the quadrilateral `source`.

    As upstream Immich computes it, for bit-identical crops: the homography is the right singular vector of the
    smallest singular value of the 8×9 system `[x, y, 1, 0, 0, 0, −ux, −uy, −u]`, `[0, 0, 0, x, y, 1, −vx, −vy,
    −v]`, solved in float32 by NumPy's SVD (so its last bits depend on the OpenBLAS kernel), scaled so that
    its last entry is 1.
    """
    system = np.zeros((8, 9), np.float32)
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    for corner, ((x, y), (u, v)) in enumerate(zip(target, source, strict=True)):
        system[2 * corner] = [x, y, 1, 0, 0, 0, -u * x, -u * y, -u]
        system[2 * corner + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y, -v]
    homography = np.linalg.svd(system)[2][-1]
    return [float(c) for c in (homography / homography[8])[:8]]


def crop_line(image: Image.Image, corners: NDArray[np.floating]) -> Crop:
    """Warp one quadrilateral (TL, TR, BR, BL) to an upright crop (Pillow, bicubic), as upstream Immich does:
    `int` of the longer opposite edges (float32 lengths) as the size; tall crops are turned 90° anticlockwise."""
    p = np.asarray(corners, dtype=np.float32)
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
    return np.ascontiguousarray(np.asarray(crop)[:, :, ::-1])  # PP-OCR reads BGR


def _ratio(crop: Crop) -> float:
    return float(crop.shape[1] / crop.shape[0])


def recognition_order(crops: Sequence[Crop]) -> list[int]:
    """Crop indices by aspect ratio, narrowest first, exactly as rapidocr's `TextRecognizer` orders its
    batches (NumPy's default sort, ties included)."""
    return cast(list[int], np.argsort(np.array([_ratio(crop) for crop in crops])).tolist())


def recognition_batch(crops: Sequence[Crop]) -> FloatArray:
    """One [n,3,48,W] float32 input, by rapidocr's `resize_norm_img`: each crop resized to height 48
    (bilinear), scaled to [-1,1] and right-padded with 0 to `W = int(48·max(320/48, widest aspect ratio))`."""
    max_ratio = max(_MIN_WIDTH_RATIO, *(_ratio(crop) for crop in crops))
    rows = [RapidTextRecognizer.resize_norm_img(cast(RapidTextRecognizer, _RESIZER), crop, max_ratio) for crop in crops]
    return np.stack(rows).astype(np.float32)
