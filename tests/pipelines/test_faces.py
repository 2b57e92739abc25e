"""Facial recognition over HTTP: SCRFD decoding through the letterbox, per-request minScore, ArcFace
alignment, batching, and the response shape the Immich server stores."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from immich_ml.http.appkeys import REGISTRY
from immich_ml.inference.sessions import SessionFactory
from immich_ml.inference.threads import ThreadPool
from immich_ml.models.tasks import ModelKey, ModelType, Task
from immich_ml.pipelines.base import InferenceModel, Runtime
from immich_ml.pipelines.faces.alignment import similarity_transform
from immich_ml.pipelines.faces.model import FaceDetector, FaceRecognizer
from immich_ml.settings import Settings
from tests import modelgen
from tests.conftest import ClientFactory, predict_form, predict_ok
from tests.facemodels import write_batched_scrfd
from tests.modelgen import Face

# Canvas boxes: A ≈ [151.7, 176, 232, 280.2] (non-integer, to test rounding); C overlaps A (IoU ≈ 0.67)
# with a lower score, so NMS drops it; D is apart from the others and scores below the default minScore.
FACE_A = Face(stride=16, cell_x=12, cell_y=14, anchor=0, score=0.92, distances=(40.3, 48.0, 40.0, 56.2))
FACE_B = Face(stride=32, cell_x=13, cell_y=6, anchor=1, score=0.81, distances=(64.0, 72.0, 64.0, 88.0))
FACE_C = Face(stride=8, cell_x=25, cell_y=28, anchor=1, score=0.85, distances=(40.0, 48.0, 40.0, 56.0))
FACE_D = Face(stride=16, cell_x=30, cell_y=5, anchor=0, score=0.5, distances=(30.0, 30.0, 30.0, 30.0))
FACES = (FACE_A, FACE_B, FACE_C, FACE_D)

RECOGNITION = ModelKey(Task.FACIAL_RECOGNITION, ModelType.RECOGNITION, "buffalo_l")
DETECTION = ModelKey(Task.FACIAL_RECOGNITION, ModelType.DETECTION, "buffalo_l")


def entries(min_score: float | None = None, *, recognition: bool = True, name: str = "buffalo_l") -> str:
    detection: dict[str, Any] = {"modelName": name}
    if min_score is not None:
        detection["options"] = {"minScore": min_score}
    task: dict[str, Any] = {"detection": detection}
    if recognition:
        task["recognition"] = {"modelName": name}
    return json.dumps({"facial-recognition": task})


def image_png(width: int, height: int, seed: int = 3) -> bytes:
    return modelgen.png_bytes(modelgen.make_gradient_image(width, height, seed=seed))


async def post(client: TestClient[Any, Any], body: str, image: bytes) -> dict[str, Any]:
    return await predict_ok(client, body, image=image)  # type: ignore[no-any-return]


def loaded(client: TestClient[Any, Any], key: ModelKey) -> InferenceModel:
    assert client.app is not None
    model: InferenceModel = client.app[REGISTRY].loaded()[key]
    return model


@pytest.fixture
def face_cache(cache: Path) -> Path:
    modelgen.write_scrfd(cache, "buffalo_l", faces=FACES)
    modelgen.write_arcface(cache, "buffalo_l")
    return cache


def independent_embedding(rgb: np.ndarray, landmarks: np.ndarray, *, bgr_blob: bool = False) -> np.ndarray:
    """ArcFace output computed without the daemon's code: a 4-parameter least-squares fit and a cv2 warp."""
    rows, targets = [], []
    for (x, y), (u, v) in zip(landmarks, modelgen.ARCFACE_TEMPLATE, strict=True):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]  # u = a·x − b·y + tx, v = b·x + a·y + ty
        targets += [u, v]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
    matrix = np.array([[a, -b, tx], [b, a, ty]])
    crop = cv2.warpAffine(rgb, matrix, (112, 112), flags=cv2.INTER_LINEAR, borderValue=0)
    if bgr_blob:
        crop = crop[:, :, ::-1]
    blob = ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    embedding: np.ndarray = modelgen.arcface_reference(blob)[0]
    return embedding


# -- detection -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "scale"), [(1280, 720, 0.5), (720, 1280, 0.5), (320, 240, 2.0)])
async def test_boxes_and_landmarks_are_mapped_back_through_the_letterbox(
    make_client: ClientFactory, face_cache: Path, width: int, height: int, scale: float
) -> None:
    assert modelgen.scrfd_scale(width, height) == scale
    client = await make_client()
    body = await post(client, entries(0.7, recognition=False), image_png(width, height))
    faces = body["facial-recognition"]
    assert (body["imageWidth"], body["imageHeight"]) == (width, height)
    assert set(faces) == {"boxes", "scores", "landmarks"}
    expected = [modelgen.expected_detection(face, scale) for face in (FACE_A, FACE_B)]
    assert faces["boxes"] == [np.round(e.box).tolist() for e in expected]
    assert faces["scores"] == [0.92, 0.81]
    np.testing.assert_allclose(faces["landmarks"], [e.landmarks for e in expected], rtol=1e-5)


async def test_min_score_applies_to_its_own_request_only(make_client: ClientFactory, face_cache: Path) -> None:
    client = await make_client()
    image = image_png(1280, 720)
    counts = []
    for min_score in (0.4, 0.9, None, 0.4, 0.7):
        body = await post(client, entries(min_score, recognition=False), image)
        counts.append(len(body["facial-recognition"]["scores"]))
    assert counts == [3, 1, 2, 3, 2]


async def test_a_non_numeric_min_score_is_a_request_error(make_client: ClientFactory, face_cache: Path) -> None:
    client = await make_client()
    body = '{"facial-recognition":{"detection":{"modelName":"buffalo_l","options":{"minScore":"x"}}}}'
    form = predict_form(body, image=image_png(64, 64))
    async with client.post("/predict", data=form) as resp:
        assert resp.status == 422
        assert "minScore" in (await resp.json())["detail"]


async def test_detection_batches_across_requests_only_when_the_graph_has_a_batch_axis(
    make_client: ClientFactory, cache: Path
) -> None:
    modelgen.write_scrfd(cache, "buffalo_s", faces=FACES, batch_axis=True)  # leading axis fixed at 1
    write_batched_scrfd(cache, "buffalo_m", FACES)
    client = await make_client(max_batch_face_detection=3)
    image = image_png(1280, 720)
    for name in ("buffalo_s", "buffalo_m"):
        body = await post(client, entries(name=name, recognition=False), image)
        assert body["facial-recognition"]["scores"] == [0.92, 0.81]
    fixed = loaded(client, ModelKey(Task.FACIAL_RECOGNITION, ModelType.DETECTION, "buffalo_s"))
    batched = loaded(client, ModelKey(Task.FACIAL_RECOGNITION, ModelType.DETECTION, "buffalo_m"))
    assert [b.max_batch for b in fixed.batchers] == [1]
    assert [b.max_batch for b in batched.batchers] == [3]


async def test_a_batched_detector_splits_one_run_into_per_image_outputs(cache: Path) -> None:
    write_batched_scrfd(cache, "buffalo_m", [FACE_A])
    settings = Settings(cache_folder=cache)
    runtime = Runtime(settings, SessionFactory(settings), ThreadPool(1))
    key = ModelKey(Task.FACIAL_RECOGNITION, ModelType.DETECTION, "buffalo_m")
    detector = FaceDetector(key, cache / "facial-recognition" / "buffalo_m" / "detection", runtime)
    detector.load()
    blob, _ = detector.preprocess(Image.new("RGB", (640, 640)))
    feeds = {detector.input_name: blob[None]}
    try:
        outputs = await detector.batcher.submit_many([feeds, feeds])
    finally:
        await detector.close()
        runtime.pool.shutdown()
    assert detector.batched and detector.batcher.snapshot().batches == 1
    shapes = [(1, rows, k) for k in (1, 4, 10) for rows in (12800, 3200, 800)]
    assert [[output.shape for output in per_image] for per_image in outputs] == [shapes, shapes]


# -- recognition ---------------------------------------------------------------------------------------------


async def test_response_has_the_shape_the_immich_server_stores(make_client: ClientFactory, face_cache: Path) -> None:
    client = await make_client()
    async with client.post("/predict", data=predict_form(entries(0.7), image=image_png(1280, 720))) as resp:
        assert resp.status == 200
        text = await resp.text()
    body = json.loads(text)
    assert set(body) == {"facial-recognition", "imageHeight", "imageWidth"}
    faces = body["facial-recognition"]
    assert [set(face) for face in faces] == [{"boundingBox", "embedding", "score"}] * 2
    assert faces[0]["boundingBox"] == {"x1": 303.0, "y1": 352.0, "x2": 464.0, "y2": 560.0}
    assert '"boundingBox":{"x1":303.0,"y1":352.0,"x2":464.0,"y2":560.0}' in text
    assert '"score":0.92' in text and [face["score"] for face in faces] == [0.92, 0.81]
    for face in faces:
        assert isinstance(face["embedding"], str) and " " not in face["embedding"]
        assert len(json.loads(face["embedding"])) == 512


@pytest.mark.parametrize("fixed_batch", [False, True], ids=["dynamic-batch", "fixed-batch-1"])
async def test_embeddings_equal_arcface_of_independently_aligned_crops(
    make_client: ClientFactory, cache: Path, fixed_batch: bool
) -> None:
    modelgen.write_scrfd(cache, "buffalo_l", faces=FACES)
    modelgen.write_arcface(cache, "buffalo_l", fixed_batch=fixed_batch)
    pixels = modelgen.make_gradient_image(1280, 720, seed=5)
    client = await make_client()
    image = modelgen.png_bytes(pixels)
    # The landmarks the daemon aligns with (float32, checked against the Face records by the detection tests).
    detected = (await post(client, entries(0.4, recognition=False), image))["facial-recognition"]
    faces = (await post(client, entries(0.4), image))["facial-recognition"]
    assert len(faces) == 3
    for face, landmarks in zip(faces, detected["landmarks"], strict=True):
        embedding = np.asarray(json.loads(face["embedding"]), dtype=np.float32)
        np.testing.assert_allclose(embedding, independent_embedding(pixels, np.array(landmarks)), atol=1e-5)
        assert not np.allclose(embedding, independent_embedding(pixels, landmarks, bgr_blob=True), atol=1e-2)


async def test_no_faces_returns_an_empty_list_without_running_recognition(
    make_client: ClientFactory, cache: Path
) -> None:
    modelgen.write_scrfd(cache, "buffalo_l", faces=[FACE_D])
    modelgen.write_arcface(cache, "buffalo_l")
    client = await make_client()
    image = image_png(640, 480)
    body = await post(client, entries(), image)
    assert body == {"facial-recognition": [], "imageHeight": 480, "imageWidth": 640}
    recognizer = loaded(client, RECOGNITION)
    assert recognizer.batchers[0].snapshot().items == 0
    assert len((await post(client, entries(0.4), image))["facial-recognition"]) == 1  # the observable works
    assert recognizer.batchers[0].snapshot().items == 1


async def test_five_faces_with_max_batch_two_run_as_two_two_one(make_client: ClientFactory, cache: Path) -> None:
    five = [Face(stride=32, cell_x=2 + 4 * i, cell_y=8, score=0.9 - 0.01 * i, distances=(40.0,) * 4) for i in range(5)]
    modelgen.write_scrfd(cache, "buffalo_l", faces=five)
    modelgen.write_arcface(cache, "buffalo_l")
    client = await make_client(max_batch_face_recognition=2)
    pixels = modelgen.make_gradient_image(640, 640, seed=7)
    faces = (await post(client, entries(), modelgen.png_bytes(pixels)))["facial-recognition"]
    assert [face["score"] for face in faces] == [0.9, 0.89, 0.88, 0.87, 0.86]
    stats = loaded(client, RECOGNITION).batchers[0].snapshot()
    assert (stats.batches, stats.items, stats.sizes) == (3, 5, {2: 2, 1: 1})  # two batches may run at once
    for face, expected in zip(faces, five, strict=True):
        landmarks = modelgen.expected_detection(expected, 1.0).landmarks
        np.testing.assert_allclose(
            np.asarray(json.loads(face["embedding"])), independent_embedding(pixels, landmarks), atol=2e-4
        )


async def test_recognition_warms_up_without_a_detector(face_cache: Path) -> None:
    settings = Settings(cache_folder=face_cache)
    runtime = Runtime(settings, SessionFactory(settings), ThreadPool(1))
    model_dir = face_cache / "facial-recognition" / "buffalo_l" / "recognition"
    recognizer = FaceRecognizer(RECOGNITION, model_dir, runtime)
    recognizer.load()
    try:
        await recognizer.warmup()
        assert [snapshot.sizes for snapshot in recognizer.batcher_snapshots()] == [{1: 1}]
    finally:
        await recognizer.close()
        runtime.pool.shutdown()


def test_similarity_transform_is_the_least_squares_fit_and_never_mirrors() -> None:
    rng = np.random.default_rng(0)
    template = modelgen.ARCFACE_TEMPLATE
    for mirrored in (False, True):
        noise = rng.normal(0, 2, size=(5, 2))
        points = template * rng.uniform(0.5, 3.0) + rng.uniform(-50, 50, size=2) + noise
        if mirrored:
            points[:, 0] = -points[:, 0]
        matrix = similarity_transform(points, template)
        rows = np.array([row for x, y in points for row in ([x, -y, 1, 0], [y, x, 0, 1])])
        (a, b, tx, ty), *_ = np.linalg.lstsq(rows, template.reshape(-1), rcond=None)
        np.testing.assert_allclose(matrix, [[a, -b, tx], [b, a, ty]], atol=1e-9)
        assert np.linalg.det(matrix[:, :2]) > 0


# -- image formats -------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _sixteen_bit() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 300, dtype=np.uint16), (200, 1))
    return _encode(Image.fromarray(ramp), "PNG")


def _rgb(width: int = 300, height: int = 200) -> Image.Image:
    return Image.fromarray(modelgen.make_gradient_image(width, height, seed=9))


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param(_sixteen_bit, id="png-16-bit"),
        pytest.param(lambda: _encode(_rgb().quantize(64), "PNG"), id="png-palette"),
        pytest.param(lambda: _encode(_rgb().convert("RGBA"), "PNG"), id="png-rgba"),
        pytest.param(lambda: _encode(_rgb().convert("L"), "PNG"), id="png-grayscale"),
        pytest.param(lambda: _encode(_rgb().convert("CMYK"), "JPEG"), id="jpeg-cmyk"),
    ],
)
async def test_image_modes_decode_and_report_their_size(
    make_client: ClientFactory, face_cache: Path, encoded: Any
) -> None:
    client = await make_client()
    body = await post(client, entries(), encoded())
    assert (body["imageWidth"], body["imageHeight"]) == (300, 200)
    assert len(body["facial-recognition"]) == 2
    assert all(len(json.loads(face["embedding"])) == 512 for face in body["facial-recognition"])
