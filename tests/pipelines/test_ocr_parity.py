"""OCR parity with `rapidocr`, the library upstream Immich's released OCR is built on.

Every expected value here comes from rapidocr's own classes (`DBPostProcess`, `TextDetector.sorted_boxes`,
`TextRecognizer` with its own ONNX Runtime session on the same model file), driven with the parameters
upstream Immich uses, on the same detector output or the same image as ours. Only the two steps upstream
Immich does itself are re-stated here, from its description (docs/models.md): the detector input (Lanczos
resize, BGR, released normalisation) and the line crop (Pillow perspective warp, bicubic).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from PIL import Image
from rapidocr.ch_ppocr_det import TextDetector as RapidTextDetector
from rapidocr.ch_ppocr_det.utils import DBPostProcess
from rapidocr.ch_ppocr_rec import TextRecInput
from rapidocr.ch_ppocr_rec import TextRecognizer as RapidTextRecognizer
from rapidocr.main import DEFAULT_CFG_PATH
from rapidocr.utils.parse_parameters import ParseParams

from immich_ml.pipelines.ocr.boxes import DetectionParams, boxes_from_probability, detection_input
from immich_ml.settings import Preprocessing
from tests import modelgen
from tests.conftest import ClientFactory, predict_ok
from tests.ocrimages import render, skimage_image, with_text

MAX_RESOLUTION = 736
DET_MIN_SCORE = 0.5


def _lines() -> Image.Image:
    lines = [("Immich", (420, 40)), ("Brewery", (40, 44)), ("Hello World 2024", (40, 160)), ("photos", (40, 300))]
    return render(lines)[0]


def _invoice() -> Image.Image:
    lines = [("Invoice number 2024-117", (30, 30)), ("Total: 42.50 EUR", (30, 90)), ("Thank you!", (30, 150))]
    return render(lines, size=(520, 220), font_size=30)[0]


def _receipt() -> Image.Image:
    """Nine lines of different widths: two recogniser chunks of up to 6, so the chunk order matters."""
    items = [
        "Coffee 3.20",
        "Bagel with cream cheese 4.80",
        "Tea 2.10",
        "Orange juice 3.90",
        "Muffin 2.50",
        "Sparkling water 1.80",
        "Croissant 2.30",
        "Total 20.60",
        "Card payment accepted, thank you",
    ]
    return render([(item, (20, 14 + 40 * row)) for row, item in enumerate(items)], size=(560, 380), font_size=26)[0]


def _photo() -> Image.Image:
    return with_text(skimage_image("coffee"), "OPEN DAILY 7-19", (40, 30))


def _rotated() -> Image.Image:
    strip = render([("Rotated line 15", (10, 10))], size=(420, 70))[0]
    return strip.rotate(12, expand=True, fillcolor="white")


def _vertical() -> Image.Image:
    strip = render([("VERTICAL SIGN 42", (5, 5))], size=(400, 55))[0]
    image = Image.new("RGB", (300, 520), "white")
    image.paste(strip.rotate(-90, expand=True), (120, 60))  # reads top to bottom
    return image


CASES: dict[str, Callable[[], Image.Image]] = {
    "rendered-lines": _lines,
    "invoice": _invoice,
    "receipt": _receipt,
    "page": lambda: skimage_image("page"),
    "photo": _photo,
    "rotated": _rotated,
    "vertical": _vertical,
}


@pytest.fixture(scope="module")
def ocr_models() -> tuple[Path, Path]:
    return modelgen.ocr_wheel_models()


@pytest.fixture(scope="module")
def detector(ocr_models: tuple[Path, Path]) -> ort.InferenceSession:
    return ort.InferenceSession(str(ocr_models[0]), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def rapid_recognizer(ocr_models: tuple[Path, Path]) -> RapidTextRecognizer:
    """rapidocr's recogniser as upstream configures it: batches of 6, shape (3, 48, 320), charset from the model."""
    cfg = ParseParams.load(DEFAULT_CFG_PATH)
    cfg.Rec.engine_cfg = cfg.EngineConfig.onnxruntime
    cfg.Rec.model_path = str(ocr_models[1])
    cfg.Rec.font_path = None
    cfg.Rec.rec_batch_num = 6
    return RapidTextRecognizer(cfg.Rec)


def rapid_boxes(
    probability: NDArray[np.float32], width: int, height: int, score_mode: str = "fast"
) -> tuple[np.ndarray, np.ndarray]:
    """rapidocr's DB post-processing with upstream Immich's parameters, then its reading order
    (`sorted_boxes` returns the boxes only; each score follows its box)."""
    post = DBPostProcess(
        thresh=0.3,
        box_thresh=DET_MIN_SCORE,
        max_candidates=1000,
        unclip_ratio=1.6,
        use_dilation=True,
        score_mode=score_mode,
    )
    boxes, scores = post(probability, (height, width))
    if len(boxes) == 0:
        return np.zeros((0, 4, 2), np.float32), np.zeros(0)
    ordered = RapidTextDetector.sorted_boxes(boxes)
    unused = list(range(len(boxes)))
    order = []
    for box in ordered:
        index = next(i for i in unused if np.array_equal(boxes[i], box))
        unused.remove(index)
        order.append(index)
    return np.asarray(ordered, np.float64), np.asarray(scores, np.float64)[order]


def upstream_detector_input(image: Image.Image) -> NDArray[np.float32]:
    """Upstream Immich's released detector input: shorter side to 736 (never up), multiples of 32, Lanczos,
    BGR, `(x − 0.5) / 127.5`."""
    ratio = min(MAX_RESOLUTION / min(image.size), 1.0)
    size = tuple(max(32, round(int(side * ratio) / 32) * 32) for side in image.size)
    resized = np.asarray(image.resize(size, resample=Image.Resampling.LANCZOS), dtype=np.float32)[:, :, ::-1]
    return np.ascontiguousarray(((resized - 0.5) / 127.5).transpose(2, 0, 1)[None])


def upstream_crop(image: Image.Image, box: np.ndarray) -> NDArray[np.uint8]:
    """Upstream Immich's line crop: the quadrilateral warped (Pillow, bicubic) to `int(longest opposite
    edges)`, turned 90° anticlockwise when at least 1.5 times taller than wide; BGR."""
    quad = box.astype(np.float32)
    width = int(max(np.linalg.norm(quad[1] - quad[0]), np.linalg.norm(quad[2] - quad[3])))
    height = int(max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2])))
    upright = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    matrix = cv2.getPerspectiveTransform(upright, quad)  # output → input pixel, what Pillow wants
    coefficients = tuple((matrix / matrix[2, 2]).reshape(-1)[:8].tolist())
    crop = image.transform((width, height), Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BICUBIC)
    if crop.height / crop.width >= 1.5:
        crop = crop.rotate(90, expand=True)
    return np.ascontiguousarray(np.asarray(crop)[:, :, ::-1])


@pytest.mark.parametrize(
    ("preprocessing", "score_mode"),
    [(Preprocessing.RELEASED, "fast"), (Preprocessing.LATEST, "fast"), (Preprocessing.RELEASED, "slow")],
)
@pytest.mark.parametrize("case", list(CASES))
def test_detection_boxes_equal_rapidocr(
    case: str, preprocessing: Preprocessing, score_mode: Literal["fast", "slow"], detector: ort.InferenceSession
) -> None:
    image = CASES[case]()
    (probability,) = detector.run(None, {"x": detection_input(image, MAX_RESOLUTION, preprocessing)})
    expected_boxes, expected_scores = rapid_boxes(probability, image.width, image.height, score_mode)
    params = DetectionParams(box_threshold=DET_MIN_SCORE, score_mode=score_mode)
    found = boxes_from_probability(probability[0, 0], image.size, params)
    assert len(expected_boxes) > 0
    assert found.boxes.shape == expected_boxes.shape, (found.boxes.tolist(), expected_boxes.tolist())
    difference = float(np.abs(found.boxes - expected_boxes).max())
    print(f"{case}/{preprocessing.value}/{score_mode}: {len(found)} boxes, max difference {difference} px")
    assert difference <= 1e-6
    np.testing.assert_allclose(found.scores, expected_scores, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
async def test_predict_equals_rapidocr_pipeline(
    case: str,
    make_client: ClientFactory,
    cache: Path,
    detector: ort.InferenceSession,
    rapid_recognizer: RapidTextRecognizer,
) -> None:
    """/predict against rapidocr's pipeline as upstream Immich drives it, on the same image and models."""
    image = CASES[case]()
    (probability,) = detector.run(None, {"x": upstream_detector_input(image)})
    boxes, box_scores = rapid_boxes(probability, image.width, image.height)
    recognised = rapid_recognizer(TextRecInput(img=[upstream_crop(image, box) for box in boxes]))
    text_scores = np.asarray(recognised.scores, np.float64)
    kept = text_scores > 0.0

    modelgen.write_ocr(cache, "PP-OCRv5_mobile")
    client = await make_client()
    entries = {
        "ocr": {
            "detection": {
                "modelName": "PP-OCRv5_mobile",
                "options": {"minScore": DET_MIN_SCORE, "maxResolution": MAX_RESOLUTION},
            },
            "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.0}},
        }
    }
    ocr = (await predict_ok(client, json.dumps(entries), image=modelgen.png_bytes(image)))["ocr"]

    expected_texts = [text for text, keep in zip(recognised.txts, kept, strict=True) if keep]
    print(f"{case}: {len(expected_texts)} texts, ours {ocr['text']} / rapidocr {expected_texts}")
    assert ocr["text"] == expected_texts
    got_boxes = np.asarray(ocr["box"], np.float64).reshape(-1, 4, 2) * (image.width, image.height)
    assert got_boxes.shape == boxes[kept].shape
    assert float(np.abs(got_boxes - boxes[kept]).max(initial=0.0)) <= 1e-6
    np.testing.assert_allclose(ocr["boxScore"], box_scores[kept], atol=1e-4)
    np.testing.assert_allclose(ocr["textScore"], text_scores[kept], atol=1e-4)
    print(
        f"{case}: box difference {np.abs(got_boxes - boxes[kept]).max(initial=0.0)} px, text score difference "
        f"{np.abs(np.asarray(ocr['textScore']) - text_scores[kept]).max(initial=0.0)}"
    )
