"""Text recognition maths (PP-OCR CTC recogniser): line crops, padded batch inputs, greedy CTC decoding.

Resizing, normalising and decoding are rapidocr's own (`TextRecognizer.resize_norm_img`, `CTCLabelDecode`),
applied exactly as its `TextRecognizer` applies them, so texts and scores are identical to upstream Immich's;
only the batching is ours (`pipelines/ocr/model.py`). The crop is upstream Immich's own (a Pillow warp), not
rapidocr's. Everything here is pure and blocking; the model runs it in worker threads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from rapidocr.ch_ppocr_rec import TextRecognizer as RapidTextRecognizer
from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode

__all__ = [
    "NARROW_LINE_ELEMENTS",
    "REC_HEIGHT",
    "Recognised",
    "crop_line",
    "ctc_decode",
    "recognition_batch",
    "recognition_order",
    "text_decoder",
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


@dataclass(frozen=True)
class Recognised:
    """One line's text and its score (mean confidence of the kept CTC steps; 0 when nothing was read)."""

    text: str
    score: float


def text_decoder(metadata: dict[str, str], charset_file: Path) -> CTCLabelDecode:
    """rapidocr's CTC decoder for the model's alphabet: the ONNX metadata key `character`, else `charset_file`
    (one character per line); the decoder adds the blank (index 0) and the space (last)."""
    if characters := metadata.get("character"):
        return CTCLabelDecode(character=characters.splitlines())
    if charset_file.is_file():
        return CTCLabelDecode(character_path=charset_file)
    raise ValueError(f"the recognition model has no 'character' metadata and there is no {charset_file}")


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


def _as_probabilities(output: NDArray[np.floating]) -> FloatArray:
    """The output as float32 probabilities: a softmax is applied when rows are not already distributions."""
    values = np.asarray(output, dtype=np.float32)
    sums = values.sum(axis=-1)
    if values.min(initial=0.0) >= 0 and np.allclose(sums, 1.0, atol=1e-2):
        return values
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def ctc_decode(output: NDArray[np.floating], decoder: CTCLabelDecode) -> list[Recognised]:
    """Greedy CTC over an [n,T,C] output (probabilities in any float dtype, or raw logits) by rapidocr's
    decoder: repeats collapse, then blanks go; the score is the mean of the kept steps' probabilities
    (each rounded to 5 decimals, as rapidocr does). A non-finite score becomes 0, so the line is dropped."""
    lines, _ = decoder(_as_probabilities(output))
    return [Recognised(str(text), float(score) if math.isfinite(score) else 0.0) for text, score in lines]
