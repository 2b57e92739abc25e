"""Memory admission: decoded pixels in flight are bounded as a whole (a request beyond the budget waits for
room, and gets 503 + Retry-After only past MACHINE_LEARNING_ADMISSION_WAIT_S), and the heap goes back to the OS
after a burst of large images."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
from aiohttp.test_utils import TestClient
from PIL import Image

from tests import modelgen
from tests.conftest import ClientFactory, predict_form
from tests.daemonproc import Daemon, multipart, write_slow_clip

CLIP = "ViT-B-32__openai"
VISUAL = json.dumps({"clip": {"visual": {"modelName": CLIP}}})
RSS_SLACK = 48 * 1024**2
"""What may stay after a burst: less than the 55–60 MiB a thread arena's heap kept when only `malloc_trim` returned
memory (its top is never trimmed there), more than the −4 to +3 MiB left once that top goes back on free."""


def _noise_jpeg(width: int, height: int, seed: int) -> bytes:
    """A JPEG that decodes to width × height pixels (noise, so it is not tiny on disk either)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
    return modelgen.jpeg_bytes(Image.fromarray(small).resize((width, height)), quality=80)


async def _burst(client: TestClient, count: int) -> list[tuple[int, str | None]]:
    image = _noise_jpeg(2000, 2000, seed=1)  # 4 MP: two fit the budget

    async def send() -> tuple[int, str | None]:
        async with client.post("/predict", data=predict_form(VISUAL, image=image)) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Retry-After")

    return await asyncio.gather(*(send() for _ in range(count)))


async def test_concurrent_large_images_beyond_the_pixel_budget_get_503_with_retry_after_without_a_wait(
    make_client: ClientFactory, cache: Path
) -> None:
    write_slow_clip(cache, CLIP, iterations=600)  # each request holds its pixels for a while
    client = await make_client(max_image_pixels=4_000_000, max_pixels_in_flight=8_000_000, admission_wait_s=0)
    replies = await _burst(client, 6)
    assert {status for status, _ in replies} == {200, 503}, replies
    assert all(retry is not None for status, retry in replies if status == 503)
    assert (await _burst(client, 1))[0][0] == 200  # the budget is free again afterwards


async def test_images_beyond_the_pixel_budget_wait_for_room_instead_of_failing(
    make_client: ClientFactory, cache: Path
) -> None:
    write_slow_clip(cache, CLIP, iterations=200)
    client = await make_client(max_image_pixels=4_000_000, max_pixels_in_flight=8_000_000, admission_wait_s=120)
    replies = await _burst(client, 6)  # three times the budget at once: the last two pairs wait their turn
    assert [status for status, _ in replies] == [200] * 6, replies


def _large_image_burst(daemon: Daemon, entries: dict[str, object]) -> list[int]:
    """4 clients × 3 requests of 15-MP JPEGs (46 MB each as RGB) at once; the statuses."""
    images = [_noise_jpeg(4800, 3200, seed) for seed in range(4)]
    statuses: list[int] = []

    def client(image: bytes) -> None:
        for _ in range(3):
            body, content_type = multipart(entries, image=image)
            statuses.append(daemon.request("POST", "/predict", body, {"Content-Type": content_type})[0])

    threads = [threading.Thread(target=client, args=(image,)) for image in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def _rss_once_returned(daemon: Daemon, before: int) -> int:
    """RSS once within `RSS_SLACK` of `before` (the heap is handed back in a worker thread), or after 10 s."""
    deadline = time.monotonic() + 10
    after = daemon.rss_bytes()
    while after - before > RSS_SLACK and time.monotonic() < deadline:
        time.sleep(0.1)
        after = daemon.rss_bytes()
    return after


def test_rss_returns_near_its_value_before_a_burst_of_large_images(tmp_path: Path) -> None:
    """Two bursts: where the last frees of a burst land in the heap varies from run to run."""
    modelgen.write_clip(tmp_path / "cache", CLIP)
    daemon = Daemon(
        tmp_path,
        tmp_path / "cache",
        {"MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": CLIP, "MACHINE_LEARNING_REQUEST_THREADS": "4"},
    )
    try:
        daemon.wait_ready()
        small = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 48))
        entries = {"clip": {"visual": {"modelName": CLIP}}}
        assert daemon.predict(entries, image=small)[0] == 200
        before = daemon.rss_bytes()
        for burst in (1, 2):
            statuses = _large_image_burst(daemon, entries)
            assert statuses and set(statuses) <= {200, 503}, statuses
            after = _rss_once_returned(daemon, before)
            print(
                f"\nRSS before burst {burst} {before / 2**20:.0f} MiB, peak {daemon.peak_rss_bytes() / 2**20:.0f} MiB, "
                f"after {after / 2**20:.0f} MiB ({statuses.count(200)} × 200, {statuses.count(503)} × 503)"
            )
            assert after - before <= RSS_SLACK
    finally:
        assert daemon.stop() == 0, daemon.log()
