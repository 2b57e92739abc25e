"""Upstream Immich's OCR (immich-machine-learning v2.7.5), written from its documented behaviour on rapidocr.

Runs in its own virtual environment with upstream's pinned packages (requirements.txt beside this file) and
imports nothing from immich_ml. Reads `{"requests": [{"image": PATH, "entries": {"ocr": ...}}]}` as JSON on
stdin and writes `{"versions": {...}, "models": {...}, "answers": [BODY, ...]}` to the file named by its
argument (rapidocr logs on the standard streams), each BODY being what
upstream's /predict answers: `{"ocr": {"box", "text", "boxScore", "textScore"}, "imageHeight", "imageWidth"}`.

What upstream does, step by step:
* decode with Pillow (`Image.open`, `load`, converted to RGB when it is not);
* detector input: shorter side scaled to `maxResolution` but never up, both sides rounded to multiples of 32,
  Lanczos resize, BGR float32, minus 0.5, times the float32 reciprocal of 127.5; images under 32 px: nothing;
* rapidocr's `DBPostProcess` (threshold 0.3, box threshold `minScore`, at most 1000 candidates, unclip 1.6,
  dilation, `scoreMode`);
* upstream's own box sort (line numbers read through the y ranking twice), scores left in contour order;
* line crops: the homography from the upright rectangle (sides `int` of the longer opposite float32 edges) to
  the box, solved in float32 by NumPy's SVD, applied with Pillow's bicubic perspective transform, crops 1.5
  times taller than wide turned 90° anticlockwise, BGR;
* rapidocr's `TextRecognizer` on its own ONNX Runtime session (batches of 6, input shape 3×48×320), lines
  kept when their score is above the recognition `minScore`; boxes divided by the image size in float32.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import rapidocr
from numpy.typing import NDArray
from PIL import Image
from rapidocr.ch_ppocr_det.utils import DBPostProcess
from rapidocr.ch_ppocr_rec import TextRecInput, TextRecognizer
from rapidocr.utils.typings import EngineType, LangRec
from rapidocr.utils.vis_res import VisRes

MODELS = Path(rapidocr.__file__).parent / "models"
DETECTOR = MODELS / "ch_PP-OCRv4_det_infer.onnx"
RECOGNISER = MODELS / "ch_PP-OCRv4_rec_infer.onnx"
PACKAGES = ("rapidocr", "opencv-python-headless", "numpy", "pillow", "onnxruntime", "pyclipper", "shapely")


class _Options(dict[str, Any]):
    """The attribute-readable mapping rapidocr's recogniser takes as its configuration."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


def _recogniser() -> TextRecognizer:
    VisRes.__init__ = lambda self, **kwargs: None  # upstream never draws results; skip the font lookup
    session = ort.InferenceSession(str(RECOGNISER), providers=["CPUExecutionProvider"])
    options = _Options(
        engine_type=EngineType.ONNXRUNTIME,
        session=session,
        rec_batch_num=6,
        rec_img_shape=(3, 48, 320),
        lang_type=LangRec.CH,
        font_path=None,
    )
    return TextRecognizer(options)


def decode(path: str) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def detector_input(image: Image.Image, max_resolution: int) -> NDArray[np.float32]:
    ratio = min(float(max_resolution) / min(image.height, image.width), 1.0)
    height = int(round(int(image.height * ratio) / 32) * 32)
    width = int(round(int(image.width * ratio) / 32) * 32)
    resized = np.array(image.resize((width, height), resample=Image.Resampling.LANCZOS), dtype=np.float32)
    bgr = np.ascontiguousarray(resized[:, :, ::-1])
    bgr -= np.full(3, 0.5, np.float32)
    bgr *= np.float32(1.0) / (np.full(3, 0.5, np.float32) * 255.0)
    return bgr.transpose(2, 0, 1)[None]


def upstream_sort(boxes: NDArray[np.float32]) -> NDArray[np.float32]:
    ranked = np.argsort(boxes[:, 0, 1], kind="stable")
    ys = boxes[ranked, 0, 1]
    lines = np.zeros(len(boxes), np.int32)
    lines[1:] = np.cumsum(np.abs(np.diff(ys)) >= 10)
    keys = lines[ranked] * 1e6 + boxes[ranked, 0, 0]
    return boxes[ranked[np.argsort(keys, kind="stable")]]


def homographies(upright: NDArray[np.float32], boxes: NDArray[np.float32]) -> NDArray[np.float32]:
    count = len(boxes)
    x, y, u, v = upright[..., 0], upright[..., 1], boxes[..., 0], boxes[..., 1]
    system = np.zeros((count, 8, 9), np.float32)
    even, odd = system[:, 0::2], system[:, 1::2]
    even[..., 0], even[..., 1], even[..., 2] = x, y, 1
    even[..., 6], even[..., 7], even[..., 8] = -u * x, -u * y, -u
    odd[..., 3], odd[..., 4], odd[..., 5] = x, y, 1
    odd[..., 6], odd[..., 7], odd[..., 8] = -v * x, -v * y, -v
    vectors = np.linalg.svd(system)[2][:, -1, :]
    return (vectors / vectors[:, 8:9])[:, :8]


def crops(image: Image.Image, boxes: NDArray[np.float32]) -> list[NDArray[np.uint8]]:
    edge = np.linalg.norm
    widths = np.maximum(edge(boxes[:, 1] - boxes[:, 0], axis=1), edge(boxes[:, 2] - boxes[:, 3], axis=1))
    heights = np.maximum(edge(boxes[:, 0] - boxes[:, 3], axis=1), edge(boxes[:, 1] - boxes[:, 2], axis=1))
    widths, heights = widths.astype(np.int32), heights.astype(np.int32)
    upright = np.zeros((len(boxes), 4, 2), np.float32)
    upright[:, 1:3, 0] = widths[:, None]
    upright[:, 2:4, 1] = heights[:, None]
    result = []
    for data, width, height in zip(homographies(upright, boxes), widths, heights, strict=True):
        crop = image.transform(
            (int(width), int(height)),
            Image.Transform.PERSPECTIVE,
            tuple(data.tolist()),
            resample=Image.Resampling.BICUBIC,
        )
        if crop.height / crop.width >= 1.5:
            crop = crop.rotate(90, expand=True)
        result.append(np.asarray(crop)[:, :, ::-1])
    return result


def ocr(image: Image.Image, entries: dict[str, Any], detector: ort.InferenceSession, recogniser: TextRecognizer) -> Any:
    detection = entries["ocr"]["detection"].get("options", {})
    recognition = entries["ocr"]["recognition"].get("options", {})
    empty: dict[str, Any] = {"box": [], "text": [], "boxScore": [], "textScore": []}
    if image.width < 32 or image.height < 32:
        return empty
    (probability,) = detector.run(None, {"x": detector_input(image, detection.get("maxResolution", 736))})
    post = DBPostProcess(
        thresh=0.3,
        box_thresh=detection.get("minScore", 0.5),
        max_candidates=1000,
        unclip_ratio=1.6,
        use_dilation=True,
        score_mode=detection.get("scoreMode", "fast"),
    )
    found, scores = post(probability, (image.height, image.width))
    if len(found) == 0:
        return empty
    boxes = upstream_sort(np.asarray(found)).astype(np.float32)
    box_scores = np.asarray(scores, np.float32)
    read = recogniser(TextRecInput(img=crops(image, boxes)))
    boxes[:, :, 0] /= image.width
    boxes[:, :, 1] /= image.height
    text_scores = np.asarray(read.scores)
    kept = text_scores > recognition.get("minScore", 0.9)
    return {
        "box": boxes.reshape(-1, 8)[kept].reshape(-1).tolist(),
        "text": [text for text, keep in zip(read.txts, kept, strict=True) if keep],
        "boxScore": box_scores[kept].tolist(),
        "textScore": text_scores[kept].tolist(),
    }


def main() -> None:
    requests = json.load(sys.stdin)["requests"]
    detector = ort.InferenceSession(str(DETECTOR), providers=["CPUExecutionProvider"])
    recogniser = _recogniser()
    answers = []
    for request in requests:
        image = decode(request["image"])
        answer = ocr(image, request["entries"], detector, recogniser)
        answers.append({"ocr": answer, "imageHeight": image.height, "imageWidth": image.width})
    models = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (DETECTOR, RECOGNISER)}
    versions = {name: metadata.version(name) for name in PACKAGES}
    Path(sys.argv[1]).write_text(json.dumps({"versions": versions, "models": models, "answers": answers}))


if __name__ == "__main__":
    main()
