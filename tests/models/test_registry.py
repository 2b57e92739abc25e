"""Model lifecycle: one load per model, preload and warm-up, unloading after the TTL returns memory."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from immich_ml.memory import return_freed_memory
from tests import modelgen
from tests.conftest import TEXTUAL, VISUAL, ClientFactory, predict_form, predict_ok, wait_for

BIG_MODEL_MB = 200


def rss_mib() -> float:
    """Resident memory of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def loaded_models(client: Any) -> list[str]:
    async with client.get("/health") as resp:
        return [m["model"] for m in (await resp.json())["models"]]


async def wait_until(condition: Any, client: Any) -> None:
    """Poll the daemon's observable state until `condition(models)` holds (bounded)."""
    for _ in range(1000):
        if condition(await loaded_models(client)):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def test_unloading_after_ttl_returns_memory(make_client: ClientFactory, clip_cache: Path) -> None:
    modelgen.add_dead_weight(clip_cache / "clip/ViT-B-32__openai/visual/model.onnx", BIG_MODEL_MB)
    client = await make_client(model_ttl_s=0.3, model_ttl_poll_s=0.05)
    image = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 64))
    async with client.post("/predict", data=predict_form("{}", image=image)) as resp:  # warm the request path
        assert resp.status == 200
    return_freed_memory()  # the daemon trims before it builds a session: so does the baseline (earlier tests' garbage)
    before = rss_mib()
    async with client.post("/predict", data=predict_form(VISUAL, image=image)) as resp:
        assert resp.status == 200
    loaded = rss_mib()
    await wait_until(lambda models: models == [], client)  # gone from /health; its memory follows in the unload
    returned = f"RSS within {BIG_MODEL_MB * 0.25:.0f} MiB of {before:.0f} after the unload"
    await wait_for(lambda: rss_mib() - before < BIG_MODEL_MB * 0.25, returned, timeout_s=5.0, interval_s=0.01)
    unloaded = rss_mib()
    print(f"RSS before load {before:.0f} MiB, loaded {loaded:.0f} MiB, after TTL unload {unloaded:.0f} MiB")
    assert loaded - before > BIG_MODEL_MB * 0.8
    assert unloaded - before < BIG_MODEL_MB * 0.25


async def test_preloaded_models_are_warm_and_never_expire(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client(
        model_ttl_s=0.1, model_ttl_poll_s=0.02, preload={("clip", "visual"): ("ViT-B-32__openai",)}
    )
    await wait_until(lambda models: models == ["clip/ViT-B-32__openai/visual"], client)
    async with client.post("/predict", data=predict_form(TEXTUAL, text="a dog")) as resp:
        assert resp.status == 200
    # The on-demand textual model expires; the preloaded visual one stays.
    await wait_until(lambda models: models == ["clip/ViT-B-32__openai/visual"], client)


async def test_concurrent_requests_load_a_model_once(make_client: ClientFactory, clip_cache: Path, caplog: Any) -> None:
    client = await make_client()
    image = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 64))
    with caplog.at_level(logging.INFO, logger="immich_ml.models"):
        responses = await asyncio.gather(
            *(client.post("/predict", data=predict_form(VISUAL, image=image)) for _ in range(8))
        )
    assert [r.status for r in responses] == [200] * 8
    assert caplog.text.count("loaded clip/ViT-B-32__openai/visual using") == 1


async def test_failed_preload_is_reported_and_the_daemon_still_serves(
    make_client: ClientFactory, clip_cache: Path
) -> None:
    client = await make_client(preload={("clip", "visual"): ("ViT-Z-99__nobody",)}, hf_offline=True)
    for _ in range(1000):
        async with client.get("/health") as resp:
            health = await resp.json()
        if health["ready"]:
            break
        await asyncio.sleep(0.01)
    assert "ViT-Z-99__nobody" in health["preloadError"]
    async with client.post("/predict", data=predict_form(TEXTUAL, text="a dog")) as resp:
        assert resp.status == 200


async def test_a_preloaded_model_is_the_one_requests_use(make_client: ClientFactory, cache: Path) -> None:
    """Preload names resolve like request names: OCR detection shared between languages is loaded once."""
    modelgen.write_ocr(cache, "EN__PP-OCRv5_mobile")
    client = await make_client(preload={("ocr", "detection"): ("EN__PP-OCRv5_mobile",)})
    await wait_until(lambda models: models == ["ocr/PP-OCRv5_mobile/detection"], client)
    entries = '{"ocr":{"detection":{"modelName":"EN__PP-OCRv5_mobile"}}}'
    image = modelgen.png_bytes(modelgen.make_gradient_image(64, 64))
    await predict_ok(client, entries, image=image)
    assert await loaded_models(client) == ["ocr/PP-OCRv5_mobile/detection"]
