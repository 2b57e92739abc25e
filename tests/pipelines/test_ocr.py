"""OCR over HTTP with the real PP-OCRv4 models; the detection and CTC maths; the pinned-model downloader."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from immich_ml.errors import DownloadFailed
from immich_ml.http.appkeys import REGISTRY
from immich_ml.models.downloads import fetch_verified, pinned_file
from immich_ml.models.tasks import ModelKey, ModelType, Task
from immich_ml.pipelines.ocr.boxes import (
    DetectionParams,
    TextBoxes,
    boxes_from_probability,
    detection_size,
    reading_order,
)
from immich_ml.pipelines.ocr.ctc import ctc_decode, text_decoder
from immich_ml.settings import Preprocessing
from tests import modelgen
from tests.conftest import ClientFactory, predict_form, predict_ok
from tests.ocrimages import render

OCR = (
    '{"ocr":{"detection":{"modelName":"PP-OCRv5_mobile","options":{"minScore":0.5,"maxResolution":736}},'
    '"recognition":{"modelName":"PP-OCRv5_mobile","options":{"minScore":0.8}}}}'
)
DETECTION_ONLY = '{"ocr":{"detection":{"modelName":"PP-OCRv5_mobile"}}}'


def ocr_entries(*, det_score: float = 0.5, rec_score: float = 0.8) -> str:
    return json.dumps(
        {
            "ocr": {
                "detection": {
                    "modelName": "PP-OCRv5_mobile",
                    "options": {"minScore": det_score, "maxResolution": 736},
                },
                "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": rec_score}},
            }
        }
    )


@pytest.fixture
def ocr_cache(cache: Path) -> Path:
    """A cache holding the real PP-OCRv4 detector and recogniser under the PP-OCRv5_mobile name."""
    modelgen.write_ocr(cache, "PP-OCRv5_mobile")
    return cache


def pixel_boxes(ocr: dict[str, list[float]], width: int, height: int) -> np.ndarray:
    return np.asarray(ocr["box"], dtype=np.float64).reshape(-1, 4, 2) * (width, height)


def assert_inside(box: np.ndarray, region: tuple[int, int, int, int], margin: float = 15) -> None:
    """The box hugs the drawn glyphs: within `margin` px of their bounding box on every side."""
    left, top, right, bottom = region
    assert box[:, 0].min() >= left - margin and box[:, 0].max() <= right + margin, (box, region)
    assert box[:, 1].min() >= top - margin and box[:, 1].max() <= bottom + margin, (box, region)
    assert box[:, 0].max() - box[:, 0].min() >= (right - left) * 0.8
    assert box[:, 1].max() - box[:, 1].min() >= (bottom - top) * 0.8


async def post(client: TestClient[Any, Any], entries: str, image: Image.Image) -> dict[str, object]:
    return await predict_ok(client, entries, image=modelgen.png_bytes(image))  # type: ignore[no-any-return]


# -- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preprocessing", list(Preprocessing))
async def test_reads_rendered_lines_in_upstreams_order(
    make_client: ClientFactory, ocr_cache: Path, preprocessing: Preprocessing
) -> None:
    image, lines = render(
        [
            ("Immich", (420, 40)),
            ("Brewery", (40, 44)),
            ("Hello World 2024", (40, 160)),
            ("photos", (40, 300)),
        ],
    )
    client = await make_client(preprocessing=preprocessing)
    body = await post(client, OCR, image)
    assert set(body) == {"ocr", "imageHeight", "imageWidth"}
    assert (body["imageWidth"], body["imageHeight"]) == (800, 420)
    ocr = body["ocr"]
    assert isinstance(ocr, dict) and set(ocr) == {"box", "boxScore", "text", "textScore"}
    assert ocr["text"] == ["photos", "Hello World 2024", "Brewery", "Immich"]  # upstream's order: bottom to top
    assert len(ocr["box"]) == 8 * len(ocr["text"]) == 2 * len(ocr["boxScore"]) * 4
    assert all(0 <= v <= 1 for v in ocr["box"])
    assert all(0.5 <= s <= 1 for s in ocr["boxScore"]) and all(0.8 < s <= 1 for s in ocr["textScore"])
    by_text = {line.text: line for line in lines}
    for text, box in zip(ocr["text"], pixel_boxes(ocr, 800, 420), strict=True):
        assert_inside(box, by_text[text].region)
        (tl, tr, br, bl) = box
        assert tl[0] < tr[0] and bl[0] < br[0] and tl[1] < bl[1] and tr[1] < br[1]  # TL, TR, BR, BL


async def test_concurrent_requests_read_the_same_as_one_alone(make_client: ClientFactory, ocr_cache: Path) -> None:
    image, _ = render([("Immich", (40, 40)), ("photos", (40, 200))], size=(400, 320))
    client = await make_client()
    alone = (await post(client, OCR, image))["ocr"]
    together = await asyncio.gather(*(post(client, OCR, image) for _ in range(4)))
    assert isinstance(alone, dict) and client.app is not None
    for body in together:
        ocr = body["ocr"]
        assert isinstance(ocr, dict)
        assert ocr["text"] == alone["text"] == ["photos", "Immich"]
        assert ocr["box"] == alone["box"]
        assert ocr["textScore"] == pytest.approx(alone["textScore"], abs=1e-4)

    detector = client.app[REGISTRY].loaded()[ModelKey(Task.OCR, ModelType.DETECTION, "PP-OCRv5_mobile")]
    (batcher,) = detector.batchers
    assert batcher.max_batch == 1  # on the CPU one image per detector run, however many requests wait
    assert set(batcher.snapshot().sizes) == {1}


async def test_wide_lines_run_a_few_at_a_time_with_the_same_results(
    make_client: ClientFactory, ocr_cache: Path
) -> None:
    """On the CPU a run of the recogniser never takes more pixels than a chunk of the narrowest lines (6 × 320 px
    wide by default): wider lines run fewer at a time, which costs less memory and time per line. Results stay
    upstream's because the real model reads every row alone: split runs give the very bits one run gives."""
    client = await make_client()
    await post(client, OCR, render([("Immich", (40, 40))], size=(400, 160))[0])
    assert client.app is not None
    recogniser = client.app[REGISTRY].loaded()[ModelKey(Task.OCR, ModelType.RECOGNITION, "PP-OCRv5_mobile")]
    session = recogniser.session
    assert session is not None
    assert session.max_run_elements == 6 * 3 * 48 * 320  # MACHINE_LEARNING_MAX_BATCH_SIZE__OCR lines of 320 px
    lines = np.random.default_rng(2).uniform(-1, 1, (6, 3, 48, 960)).astype(np.float32)
    (name,) = session.input_names
    assert session.rows_per_run({name: lines}) == 2
    split = session.run({name: lines})
    session.max_run_elements = None
    np.testing.assert_array_equal(split[0], session.run({name: lines})[0])


def _detection_at(max_resolution: float) -> str:
    return json.dumps(
        {
            "ocr": {
                "detection": {"modelName": "PP-OCRv5_mobile", "options": {"maxResolution": max_resolution}},
                "recognition": {"modelName": "PP-OCRv5_mobile"},
            }
        }
    )


async def test_max_resolution_above_the_cap_is_served_scaled_down(make_client: ClientFactory, ocr_cache: Path) -> None:
    """The Immich server accepts any `maxResolution` ≥ 1 and upstream never upscales: a value above the image's
    shorter side is full resolution, and one above MACHINE_LEARNING_MAX_OCR_RESOLUTION is served at the cap."""
    image, _ = render([("Immich", (40, 40)), ("photos", (40, 200))], size=(400, 320))
    full = (await post(await make_client(), _detection_at(320), image))["ocr"]
    capped = await make_client(max_ocr_resolution=160)
    at_cap = (await post(capped, _detection_at(160), image))["ocr"]
    assert isinstance(full, dict) and isinstance(at_cap, dict)
    assert sorted(full["text"]) == ["Immich", "photos"]  # in upstream's box order, not reading order
    assert at_cap["box"] != full["box"]  # the cap did scale the image down
    uncapped = await make_client()
    for asked in (5000, 1e9):
        for client, expected in ((uncapped, full), (capped, at_cap)):
            ocr = (await post(client, _detection_at(asked), image))["ocr"]
            assert isinstance(ocr, dict)
            assert (ocr["text"], ocr["box"]) == (expected["text"], expected["box"])
            assert ocr["textScore"] == pytest.approx(expected["textScore"], abs=1e-4)


async def test_reads_text_rotated_to_vertical(make_client: ClientFactory, ocr_cache: Path) -> None:
    strip, _ = render([("VERTICAL", (5, 5))], size=(220, 55))
    image = Image.new("RGB", (300, 400), "white")
    image.paste(strip.rotate(-90, expand=True), (120, 60))  # reads top to bottom
    client = await make_client()
    ocr = (await post(client, OCR, image))["ocr"]
    assert isinstance(ocr, dict)
    assert ocr["text"] == ["VERTICAL"]
    (box,) = pixel_boxes(ocr, 300, 400)
    assert box[:, 1].max() - box[:, 1].min() > 3 * (box[:, 0].max() - box[:, 0].min())
    assert_inside(box, (120, 60, 175, 280))


async def test_image_under_32_px_gives_empty_results(make_client: ClientFactory, ocr_cache: Path) -> None:
    image = Image.new("RGB", (300, 31), "white")
    client = await make_client()
    assert (await post(client, OCR, image))["ocr"] == {"box": [], "boxScore": [], "text": [], "textScore": []}
    assert (await post(client, DETECTION_ONLY, image))["ocr"] == {"boxes": [], "scores": []}


async def test_detection_only_returns_plain_lists(make_client: ClientFactory, ocr_cache: Path) -> None:
    image, (line,) = render([("Detection", (60, 80))], size=(400, 200))
    client = await make_client()
    ocr = (await post(client, DETECTION_ONLY, image))["ocr"]
    assert isinstance(ocr, dict) and set(ocr) == {"boxes", "scores"}
    assert np.asarray(ocr["boxes"]).shape == (1, 4, 2) and len(ocr["scores"]) == 1
    assert_inside(np.asarray(ocr["boxes"][0]), line.region)


async def test_min_scores_apply_to_their_request_only(make_client: ClientFactory, ocr_cache: Path) -> None:
    image, _ = render([("Immich", (40, 40)), ("photos", (40, 200))], size=(400, 320))
    client = await make_client()
    strict_recognition = (await post(client, ocr_entries(rec_score=1.0), image))["ocr"]
    strict_detection = (await post(client, ocr_entries(det_score=0.99), image))["ocr"]
    default = (await post(client, ocr_entries(), image))["ocr"]
    assert isinstance(strict_recognition, dict) and isinstance(strict_detection, dict) and isinstance(default, dict)
    assert strict_recognition["text"] == [] and strict_recognition["box"] == []  # scores are ≤ 1: none is > 1
    assert strict_detection["text"] == []
    assert default["text"] == ["photos", "Immich"]


async def test_malformed_option_is_422(make_client: ClientFactory, ocr_cache: Path) -> None:
    entries = '{"ocr":{"detection":{"modelName":"PP-OCRv5_mobile","options":{"minScore":"high"}}}}'
    client = await make_client()
    form = predict_form(entries, image=modelgen.png_bytes(Image.new("RGB", (64, 64), "white")))
    async with client.post("/predict", data=form) as resp:
        assert resp.status == 422
        assert "minScore" in (await resp.json())["detail"]


# -- detection maths ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_resolution", "expected"),
    [
        ((1920, 1440), 736, (992, 736)),  # shorter side to 736, both sides to multiples of 32
        ((640, 480), 736, (640, 480)),  # never upscaled
        ((3000, 40), 16, (1216, 32)),  # at least 32; Python rounding (half to even) like upstream
    ],
)
def test_detection_size(size: tuple[int, int], max_resolution: int, expected: tuple[int, int]) -> None:
    assert detection_size(*size, max_resolution) == expected


def test_box_is_the_region_grown_by_area_over_perimeter() -> None:
    probability = np.zeros((100, 200), np.float32)
    probability[40:60, 50:150] = 0.9  # 100×20 px
    found = boxes_from_probability(probability, (400, 200), DetectionParams())
    (box,), (score,) = found.boxes, found.scores
    assert 0.8 < score <= 0.9  # the rectangle includes the 1 px the dilation added
    # Dilation adds 1 px; the contour through pixel centres spans 100×20; d = 100·20·1.6/240 ≈ 13.3 px.
    width, height = (box[1, 0] - box[0, 0]) / 2, (box[3, 1] - box[0, 1]) / 2  # the image is twice the map
    assert width == pytest.approx(100 + 2 * 13.3, abs=2)
    assert height == pytest.approx(20 + 2 * 13.3, abs=2)


def test_boxes_below_min_score_or_non_finite_are_dropped() -> None:
    probability = np.zeros((64, 64), np.float32)
    probability[10:20, 5:60] = 0.6
    probability[40:50, 5:60] = np.nan
    assert len(boxes_from_probability(probability, (64, 64), DetectionParams(box_threshold=0.7))) == 0
    found = boxes_from_probability(probability, (64, 64), DetectionParams(box_threshold=0.5))
    assert len(found) == 1 and np.isfinite(found.scores).all()


def _found(*top_left: tuple[float, float]) -> TextBoxes:
    """Boxes 20×8 px at `top_left`, in contour order, scored 0.1, 0.2, … in that order."""
    boxes = [[[x, y], [x + 20, y], [x + 20, y + 8], [x, y + 8]] for x, y in top_left]
    return TextBoxes(np.asarray(boxes, np.float32), np.arange(1, len(boxes) + 1, dtype=np.float32) / 10)


def test_reading_order_keeps_bottom_to_top_contours_and_their_scores() -> None:
    """One box per line, bottom to top (how DB post-processing returns them): upstream's sort leaves them so."""
    found = _found((10, 90), (60, 50), (10, 10))
    ordered = reading_order(found)
    assert ordered.boxes[:, 0].tolist() == [[10, 90], [60, 50], [10, 10]]
    assert ordered.scores.tolist() == found.scores.tolist()


def test_reading_order_reads_line_numbers_through_the_y_ranking_twice() -> None:
    """By hand, upstream's rule: y ranking C, D, B, A; line numbers by rank 0, 0, 1, 1 (new line at ≥ 10 px);
    rank j takes the line number of rank `ranking[j]`: C→1, D→1, B→0, A→0; sorted by (line, x): B, A, C, D.
    The scores stay in contour order."""
    found = _found((100, 52), (10, 45), (10, 10), (50, 12))  # A, B, C, D
    ordered = reading_order(found)
    assert ordered.boxes[:, 0].tolist() == [[10, 45], [100, 52], [10, 10], [50, 12]]
    assert ordered.scores.tolist() == found.scores.tolist()


# -- CTC decoding -------------------------------------------------------------------------------------------

DECODER = text_decoder({"character": "a\nb\nc"}, Path("/nonexistent"))  # classes: blank, a, b, c, space
CLASSES = 5


def one_hot_steps(indices: list[int], confidence: float = 0.9) -> np.ndarray:
    steps = np.full((len(indices), CLASSES), (1 - confidence) / (CLASSES - 1), np.float32)
    steps[np.arange(len(indices)), indices] = confidence
    return steps


def test_alphabet_from_metadata_else_charset_file(tmp_path: Path) -> None:
    charset = tmp_path / "charset.txt"
    with pytest.raises(ValueError, match="charset.txt"):
        text_decoder({}, charset)
    charset.write_text("x\ny\n", encoding="utf-8")
    (line,) = ctc_decode(one_hot_steps([1, 0, 3, 2])[None], text_decoder({}, charset))
    assert line.text == "x y"  # 1 = x, 3 = the space the decoder appends, 2 = y


def test_ctc_collapses_repeats_then_drops_blanks_in_float16() -> None:
    steps = one_hot_steps([1, 1, 0, 1, 2, 2, 0, 4, 3])
    (line,) = ctc_decode(steps[None].astype(np.float16), DECODER)
    assert line.text == "aab c"
    assert line.score == pytest.approx(0.9, abs=1e-3)


def test_ctc_applies_softmax_to_raw_logits() -> None:
    logits = np.log(one_hot_steps([2, 0, 3], confidence=0.8))[None] + 5.0  # shifted: rows no longer sum to 1
    (line,) = ctc_decode(logits, DECODER)
    assert line.text == "bc"
    assert line.score == pytest.approx(0.8, abs=1e-5)


def test_ctc_all_blank_or_nan_scores_zero() -> None:
    blank, broken = ctc_decode(np.stack([one_hot_steps([0, 0]), np.full((2, 5), np.nan, np.float32)]), DECODER)
    assert (blank.text, blank.score) == ("", 0.0)
    assert broken.score == 0.0


# -- downloads ----------------------------------------------------------------------------------------------

GOOD = b"pretend onnx bytes" * 1000
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()


@dataclass
class FileServer:
    """A local HTTP server that answers each request with the next planned reply."""

    replies: list[str]  # "good", "bad" or "cut"
    paths: list[str]


async def serve(replies: list[str]) -> tuple[TestServer, FileServer]:
    state = FileServer(replies, [])

    async def handler(request: web.Request) -> web.StreamResponse:
        state.paths.append(request.path)
        reply = state.replies.pop(0)
        response = web.StreamResponse()
        response.content_length = len(GOOD)
        await response.prepare(request)
        if reply == "cut":
            await response.write(GOOD[:100])
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(GOOD if reply == "good" else GOOD[::-1])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app)
    await server.start_server()
    return server, state


async def test_hash_mismatch_is_retried_once(tmp_path: Path) -> None:
    server, state = await serve(["bad", "good"])
    target = tmp_path / "model.onnx"
    await asyncio.to_thread(fetch_verified, str(server.make_url("/m.onnx")), GOOD_SHA, target)
    assert target.read_bytes() == GOOD and state.replies == []
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    await server.close()


@pytest.mark.parametrize("reply", ["bad", "cut"])
async def test_failed_download_leaves_no_model(tmp_path: Path, reply: str) -> None:
    server, state = await serve([reply, reply])
    url = str(server.make_url("/m.onnx"))
    with pytest.raises(DownloadFailed) as failure:
        await asyncio.to_thread(fetch_verified, url, GOOD_SHA, tmp_path / "model.onnx")
    assert url in str(failure.value) and GOOD_SHA in str(failure.value)
    assert list(tmp_path.iterdir()) == [] and state.replies == []
    await server.close()


async def test_missing_ocr_model_is_fetched_from_the_configured_mirror(make_client: ClientFactory, cache: Path) -> None:
    server, state = await serve(["bad", "bad"])
    client = await make_client(ocr_model_base_url=str(server.make_url("/mirror/")), hf_offline=False)
    form = predict_form(DETECTION_ONLY, image=modelgen.png_bytes(Image.new("RGB", (64, 64), "white")))
    async with client.post("/predict", data=form) as resp:
        assert resp.status == 503
        detail = (await resp.json())["detail"]
    path, sha = pinned_file(ModelKey(Task.OCR, ModelType.DETECTION, "PP-OCRv5_mobile"))
    assert state.paths == [f"/mirror/{path}"] * 2
    assert sha in detail and f"/mirror/{path}" in detail
    assert not (cache / "ocr" / "PP-OCRv5_mobile" / "detection" / "model.onnx").exists()
    await server.close()


def test_language_variants_share_detection_and_pin_their_recogniser() -> None:
    detection = {
        pinned_file(ModelKey(Task.OCR, ModelType.DETECTION, name))
        for name in ("PP-OCRv5_mobile", "EN__PP-OCRv5_mobile", "KOREAN__PP-OCRv5_mobile")
    }
    assert len(detection) == 1
    path, sha = pinned_file(ModelKey(Task.OCR, ModelType.RECOGNITION, "EN__PP-OCRv5_mobile"))
    assert path.endswith("/en_PP-OCRv5_rec_mobile_infer.onnx") and len(sha) == 64
