#!/usr/bin/env python3
"""How much the line crop's homography method changes the crops, on upstream's recorded OCR cases.

For every line box upstream answered (`tests/data/ocr-upstream/cases.json`, default options), the crop is made
twice: with upstream's homography (NumPy's float32 SVD of the 8×9 point system, what
`immich_ml.pipelines.ocr.lines.crop_line` does) and with the same homography solved exactly in float64
(`numpy.linalg.solve` of the 8×8 system, what immich-ml did before). Prints, per line, the largest distance
between the two mappings' sample positions and how many crop values (pixels × channels) differ, and by how
much. Run from the repository with OPENBLAS_CORETYPE=Haswell: `.venv/bin/python scripts/ocr_crop_difference.py`.
docs/models.md quotes the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from immich_ml.pipelines.ocr.lines import _perspective_coefficients, crop_line

CASES = Path(__file__).resolve().parent.parent / "tests" / "data" / "ocr-upstream"


def exact_coefficients(box: NDArray[np.float64], width: int, height: int) -> NDArray[np.float64]:
    """The homography mapping the upright rectangle onto `box`, solved exactly in float64 (h₃₃ = 1)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip([(0, 0), (width, 0), (width, height), (0, height)], box.tolist(), strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return np.linalg.solve(np.asarray(rows, np.float64), np.asarray(rhs, np.float64))


def sample_positions(coefficients: NDArray[np.float64], width: int, height: int) -> NDArray[np.float64]:
    """Where Pillow samples the source for each output pixel centre."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    a, b, c, d, e, f, g, h = coefficients
    scale = g * xs + h * ys + 1
    return np.stack([(a * xs + b * ys + c) / scale, (d * xs + e * ys + f) / scale])


def main() -> None:
    for case in json.loads((CASES / "cases.json").read_text())["cases"]:
        if not case["id"].startswith("ocr/default/"):
            continue
        body = case["upstream"]["body"]
        image = Image.open(CASES / case["id"].removeprefix("ocr/default/")).convert("RGB")
        size = np.float32([body["imageWidth"], body["imageHeight"]])
        boxes = np.round(np.float32(body["ocr"]["box"]).reshape(-1, 4, 2) * size)
        for box, text in zip(boxes, body["ocr"]["text"], strict=True):
            ours = crop_line(image, box)
            height, width = ours.shape[:2]
            exact = exact_coefficients(box.astype(np.float64), width, height)
            svd = np.asarray(_perspective_coefficients(box, width, height))
            shift = np.abs(sample_positions(exact, width, height) - sample_positions(svd, width, height)).max()
            before = np.asarray(
                image.transform((width, height), Image.Transform.PERSPECTIVE, tuple(exact), Image.Resampling.BICUBIC)
            )[:, :, ::-1]
            differ = int((ours != before).sum())
            largest = int(np.abs(ours.astype(np.int16) - before).max())
            print(f"{case['id']:40} {text[:28]:28} shift {shift:.1e} px, {differ} values differ (max {largest})")


if __name__ == "__main__":
    main()
