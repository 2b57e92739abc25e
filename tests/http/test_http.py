"""The HTTP contract: routes, response shapes and error statuses, against the real server."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import modelgen
from tests.conftest import TEXTUAL, VISUAL, ClientFactory, predict, predict_form, wait_for
from tests.daemonproc import Daemon, write_slow_clip

TEXTUAL_DE = '{"clip":{"textual":{"modelName":"ViT-B-32__openai","options":{"language":"de"}}}}'


@pytest.fixture
def jpeg() -> bytes:
    return modelgen.jpeg_bytes(modelgen.make_gradient_image(640, 480, seed=1))


async def test_root_and_ping(make_client: ClientFactory) -> None:
    client = await make_client()
    async with client.get("/") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.read() == b'{"message":"Immich ML"}'
    async with client.get("/ping") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        assert await resp.text() == "pong"


async def test_visual_embedding_is_a_json_string_with_image_size(
    make_client: ClientFactory, clip_cache: Path, jpeg: bytes
) -> None:
    client = await make_client()
    async with client.post("/predict", data=predict_form(VISUAL, image=jpeg)) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert set(body) == {"clip", "imageHeight", "imageWidth"}
    assert (body["imageWidth"], body["imageHeight"]) == (640, 480)
    assert isinstance(body["clip"], str) and " " not in body["clip"]
    vector = np.asarray(json.loads(body["clip"]), dtype=np.float32)
    assert vector.shape == (512,)
    assert abs(float(np.linalg.norm(vector)) - 1) < 1e-4


async def test_text_embedding_has_no_image_size(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client()
    async with client.post("/predict", data=predict_form(TEXTUAL_DE, text="a photo of a cat")) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert set(body) == {"clip"}
    assert len(json.loads(body["clip"])) == 512


async def test_different_inputs_give_different_embeddings(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client()
    vectors = []
    for seed in (1, 2):
        image = modelgen.jpeg_bytes(modelgen.make_gradient_image(300, 200, seed=seed))
        async with client.post("/predict", data=predict_form(VISUAL, image=image)) as resp:
            vectors.append(np.asarray(json.loads((await resp.json())["clip"])))
    assert float(vectors[0] @ vectors[1]) < 0.9


async def test_empty_entries_returns_empty_object_with_image_size(make_client: ClientFactory, jpeg: bytes) -> None:
    client = await make_client()
    async with client.post("/predict", data=predict_form("{}", image=jpeg)) as resp:
        assert resp.status == 200
        assert await resp.json() == {"imageHeight": 480, "imageWidth": 640}


@pytest.mark.parametrize(
    "entries",
    [
        "not json",
        "[]",
        '{"clip": "visual"}',
        '{"clip": {"visual": {}}}',
        '{"clip": {"visual": {"modelName": 3}}}',
        '{"clip": {"detection": {"modelName": "ViT-B-32__openai"}}}',
        '{"nope": {"visual": {"modelName": "ViT-B-32__openai"}}}',
        '{"clip": {"visual": {"modelName": "ViT-B-32__openai", "options": []}}}',
    ],
)
async def test_malformed_entries_get_422(make_client: ClientFactory, jpeg: bytes, entries: str) -> None:
    client = await make_client()
    async with client.post("/predict", data=predict_form(entries, image=jpeg)) as resp:
        assert resp.status == 422
        assert (await resp.json())["detail"].startswith("Invalid request format.")


async def test_missing_entries_gets_422(make_client: ClientFactory, jpeg: bytes) -> None:
    client = await make_client()
    form = predict_form(VISUAL, image=jpeg)
    form._fields.pop(0)  # drop the entries part
    async with client.post("/predict", data=form) as resp:
        assert resp.status == 422


async def test_no_input_gets_400(make_client: ClientFactory) -> None:
    client = await make_client()
    async with client.post("/predict", data=predict_form(VISUAL)) as resp:
        assert resp.status == 400
        assert await resp.json() == {"detail": "Either image or text must be provided"}


@pytest.mark.parametrize(
    ("text", "status"),
    [("", 400), (" ", 200)],
)
async def test_empty_text_field_counts_as_absent(
    text: str, status: int, make_client: ClientFactory, clip_cache: Path
) -> None:
    """Like upstream (an empty form field is no field): `text=""` is a 400; whitespace is still a query."""
    client = await make_client()
    got, body = await predict(client, TEXTUAL, text=text)
    assert got == status, str(body)[:200]
    if status == 400:
        assert body == {"detail": "Either image or text must be provided"}
    else:
        assert isinstance(json.loads(body["clip"]), list)


@pytest.mark.parametrize("image", [b"\xff\xd8\xff\xe0 this is not a jpeg", b"GIF89a", b"\x00" * 100, b"plain text"])
async def test_undecodable_image_gets_400(make_client: ClientFactory, clip_cache: Path, image: bytes) -> None:
    client = await make_client()
    async with client.post("/predict", data=predict_form(VISUAL, image=image)) as resp:
        assert resp.status == 400
        detail = (await resp.json())["detail"]
    assert detail.startswith("Image could not be decoded (") and " object at 0x" not in detail
    if image[:2] not in (b"\xff\xd8", b"GI"):  # no known format's signature
        assert detail == "Image could not be decoded (not a supported image format)"


async def test_truncated_jpeg_gets_400(make_client: ClientFactory, clip_cache: Path, jpeg: bytes) -> None:
    client = await make_client()
    async with client.post("/predict", data=predict_form(VISUAL, image=jpeg[: len(jpeg) // 2])) as resp:
        assert resp.status == 400
        detail = (await resp.json())["detail"]
    assert detail.startswith("Image could not be decoded (") and " object at 0x" not in detail


async def test_unknown_model_gets_404_naming_it(make_client: ClientFactory, jpeg: bytes) -> None:
    client = await make_client()
    entries = '{"clip":{"visual":{"modelName":"ViT-Z-99__nobody"}}}'
    async with client.post("/predict", data=predict_form(entries, image=jpeg)) as resp:
        assert resp.status == 404
        assert "ViT-Z-99__nobody" in (await resp.json())["detail"]


async def test_text_to_visual_model_gets_422(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client()
    async with client.post("/predict", data=predict_form(VISUAL, text="hello")) as resp:
        assert resp.status == 422


async def test_recognition_without_detection_gets_400(make_client: ClientFactory, jpeg: bytes) -> None:
    client = await make_client()
    entries = '{"facial-recognition":{"recognition":{"modelName":"buffalo_l"}}}'
    async with client.post("/predict", data=predict_form(entries, image=jpeg)) as resp:
        assert resp.status == 400
        assert (await resp.json())["detail"] == (
            "Task facial-recognition of type recognition depends on output of detection"
        )


async def test_body_over_limit_gets_413(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client(max_body_size=10_000)
    big = modelgen.png_bytes(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    assert len(big) > 10_000
    async with client.post("/predict", data=predict_form(VISUAL, image=big)) as resp:
        assert resp.status == 413
    async with client.get("/ping") as resp:
        assert resp.status == 200


async def test_unknown_path_and_method(make_client: ClientFactory) -> None:
    client = await make_client()
    async with client.get("/nope") as resp:
        assert resp.status == 404
        assert await resp.json() == {"detail": "Not Found"}
    async with client.get("/predict") as resp:
        assert resp.status == 405


def test_idle_keep_alive_connection_survives_five_seconds(tmp_path: Path, clip_cache: Path) -> None:
    """Node's client reuses sockets idle for up to ~4 s; the daemon must not close them first."""
    daemon = Daemon(tmp_path, clip_cache)
    try:
        daemon.wait_ready()
        connection = daemon.connection()
        connection.request("GET", "/ping")
        assert connection.getresponse().read() == b"pong"
        time.sleep(5.2)  # the idle period under test, not synchronisation
        connection.request("GET", "/ping")
        assert connection.getresponse().read() == b"pong"
        connection.close()
    finally:
        assert daemon.stop() == 0


async def test_health_reports_ready_and_loaded_models(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client(preload={("clip", "visual"): ("ViT-B-32__openai",)})
    body: dict[str, Any] = {}

    async def ready() -> bool:  # preload runs in the background; poll the observable state
        nonlocal body
        async with client.get("/health") as resp:
            body = await resp.json()
        return bool(body["ready"])

    await wait_for(ready, "/health to say ready", interval_s=0.01)
    assert [m["model"] for m in body["models"]] == ["clip/ViT-B-32__openai/visual"]
    assert body["models"][0]["providers"] == ["CPUExecutionProvider"]
    assert (body["models"][0]["intraOpThreads"], body["models"][0]["concurrentBatches"]) == (2, [2])
    assert body["cpus"] == {"usable": 2.0, "threads": 2, "affinity": 2, "quota": None, "requestThreads": 2}


async def test_ping_answers_quickly_while_inference_runs(make_client: ClientFactory, cache: Path, jpeg: bytes) -> None:
    modelgen.write_clip(cache, "ViT-B-32__openai", image_size=896)  # a larger graph: slower inference
    client = await make_client()
    inflight = [asyncio.ensure_future(client.post("/predict", data=predict_form(VISUAL, image=jpeg))) for _ in range(8)]
    latencies = []
    deadline = time.monotonic() + 120
    while not all(task.done() for task in inflight):
        assert time.monotonic() < deadline, "inference did not finish in 120 s"
        started = time.perf_counter()
        async with client.get("/ping") as resp:
            assert resp.status == 200
        latencies.append(time.perf_counter() - started)
    for task in inflight:
        assert (await task).status == 200
    assert len(latencies) >= 10, "inference finished too fast to observe /ping during it"
    # The 90th percentile, so one scheduling hiccup of a loaded CI machine does not decide the test.
    p90 = sorted(latencies)[int(len(latencies) * 0.9)]
    assert p90 < 0.05, f"/ping p90 {p90 * 1000:.1f} ms while inference ran"


async def test_ping_can_wait_for_readiness(make_client: ClientFactory, cache: Path) -> None:
    """With MACHINE_LEARNING_PING_REQUIRES_READY an Immich server with several URLs skips a warming host."""
    write_slow_clip(cache, "ViT-B-32__openai", iterations=2000)  # warm-up takes about 1.5 s
    client = await make_client(ping_requires_ready=True, preload={("clip", "visual"): ("ViT-B-32__openai",)})
    async with client.get("/ping") as resp:
        assert resp.status == 503
    replies: list[tuple[int, str]] = []

    async def pong() -> bool:  # polls the observable state, ends when warm-up does
        async with client.get("/ping") as resp:
            replies.append((resp.status, await resp.text()))
        return resp.status == 200

    await wait_for(pong, "/ping to answer 200 after warm-up", interval_s=0.05)
    assert replies[-1] == (200, "pong")
    async with client.get("/health") as resp:
        assert resp.status == 200
