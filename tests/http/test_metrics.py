"""/metrics over real HTTP after real requests, parsed with prometheus-client's own parser."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from immich_ml.http.appkeys import CONNECTIONS, STATE
from tests import modelgen
from tests.conftest import CLIP, TEXTUAL, VISUAL, ClientFactory, predict_form
from tests.daemonproc import Daemon


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _scrape(client: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with client.get("/metrics") as response:  # type: ignore[attr-defined]
        assert response.status == 200
        assert response.content_type == "text/plain"
        return _samples(await response.text())


async def test_requests_batches_and_models_are_counted(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client()
    image = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 48))
    for _ in range(2):
        async with client.post("/predict", data=predict_form(VISUAL, image=image)) as response:
            assert response.status == 200
    async with client.post("/predict", data=predict_form(TEXTUAL, text="a dog")) as response:
        assert response.status == 200
    async with client.post("/predict", data=predict_form("not json", text="a dog")) as response:
        assert response.status == 422
    async with client.post("/predict", data=predict_form(VISUAL, image=b"not an image")) as response:
        assert response.status == 400

    samples = await _scrape(client)
    visual, textual = f"{CLIP}/visual", f"{CLIP}/textual"
    assert samples[("immich_ml_requests_total", (("model", visual), ("status", "200"), ("task", "clip")))] == 2
    assert samples[("immich_ml_requests_total", (("model", textual), ("status", "200"), ("task", "clip")))] == 1
    assert samples[("immich_ml_requests_total", (("model", visual), ("status", "400"), ("task", "clip")))] == 1
    assert samples[("immich_ml_requests_total", (("model", ""), ("status", "422"), ("task", "invalid")))] == 1
    assert samples[("immich_ml_request_duration_seconds_count", (("task", "clip"),))] == 4
    batcher = (("batcher", f"clip/{visual}"),)
    assert samples[("immich_ml_batch_size_count", batcher)] == 2
    assert samples[("immich_ml_batch_size_sum", batcher)] == 2
    assert samples[("immich_ml_batch_duration_seconds_count", batcher)] == 2
    assert samples[("immich_ml_models_loaded", ())] == 2
    assert samples[("immich_ml_queue_depth", (("model", f"clip/{visual}"),))] == 0
    assert samples[("immich_ml_model_load_seconds", (("model", f"clip/{textual}"),))] > 0
    assert samples[("immich_ml_model_info", (("model", f"clip/{visual}"), ("providers", "CPUExecutionProvider")))] == 1
    assert samples[("immich_ml_requests_in_flight", ())] == 0


def _documented_metrics() -> set[str]:
    """The metric names in the table of docs/operations.md's metrics section."""
    text = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `immich_ml_")]
    return {name for row in rows for name in re.findall(r"`(immich_ml_\w+)`", row.split("|")[1])}


async def test_every_exported_metric_is_in_the_operations_table(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client()
    image = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 48))
    async with client.post("/predict", data=predict_form(VISUAL, image=image)) as response:
        assert response.status == 200  # a loaded model and a batch: every family is exported now
    async with client.get("/metrics") as response:
        families = list(text_string_to_metric_families(await response.text()))
    exported = {
        f.name + "_total" if f.type == "counter" else f.name
        for f in families
        if f.name.startswith("immich_ml_") and not f.name.endswith("_created")  # the client's creation times
    }
    assert "immich_ml_model_memory_bytes" in exported
    assert exported - _documented_metrics() == set()


async def test_ready_gauge_follows_preload(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client(preload={})
    await client.app[STATE].ready_event.wait()
    assert (await _scrape(client))[("immich_ml_ready", ())] == 1
    client.app[CONNECTIONS].start_draining()
    assert (await _scrape(client))[("immich_ml_ready", ())] == 0


async def test_two_apps_in_one_process_keep_separate_metrics(make_client: ClientFactory, clip_cache: Path) -> None:
    first, second = await make_client(), await make_client()
    async with first.post("/predict", data=predict_form(TEXTUAL, text="a dog")) as response:
        assert response.status == 200
    assert (
        "immich_ml_requests_total",
        (("model", f"{CLIP}/textual"), ("status", "200"), ("task", "clip")),
    ) not in await _scrape(second)


def test_memory_is_reported_per_model_and_for_the_process(tmp_path: Path, cache: Path) -> None:
    """Each loaded model's share of the resident memory covers at least its weights (a 25 MB visual tower).

    In a daemon process of its own: in a process that has run other tests, freed heap could hide the growth.
    """
    modelgen.write_clip(cache, CLIP, embed_dim=32768)
    weights = (cache / "clip" / CLIP / "visual" / "model.onnx").stat().st_size
    assert weights > 20_000_000
    daemon = Daemon(
        tmp_path,
        cache,
        {"MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": CLIP, "MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": CLIP},
    )
    try:
        daemon.wait_ready()
        status, body = daemon.request("GET", "/metrics")
        assert status == 200
        samples = _samples(body.decode())
        visual = samples[("immich_ml_model_memory_bytes", (("model", f"clip/{CLIP}/visual"),))]
        assert visual >= 0.8 * weights
        assert ("immich_ml_model_memory_bytes", (("model", f"clip/{CLIP}/textual"),)) in samples
        resident, peak = samples[("immich_ml_resident_bytes", ())], samples[("immich_ml_peak_resident_bytes", ())]
        assert resident >= visual
        assert peak >= resident
    finally:
        daemon.stop()
