#!/usr/bin/env python3
"""What waiting instead of refusing costs in memory (MACHINE_LEARNING_ADMISSION_WAIT_S, issue 22).

A real daemon with one slow generated CLIP model (one input at a time) gets a burst of concurrent requests
with an Immich-sized preview (1440 × 1080 JPEG) while its queue (MACHINE_LEARNING_QUEUE_SIZE=1) or its pixel
budget (MACHINE_LEARNING_MAX_PIXELS_IN_FLIGHT = one image) is full, so all but one or two wait. Its resident
memory is sampled while they wait, against the same daemon idle just before:

    PYTHONPATH=$PWD/service .venv/bin/python scripts/bench_admission_wait.py [--requests 40] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import modelgen  # noqa: E402
from tests.daemonproc import Daemon, write_slow_clip  # noqa: E402

CLIP = "ViT-B-32__openai"
VISUAL = {"clip": {"visual": {"modelName": CLIP}}}
WIDTH, HEIGHT = 1440, 1080


def _burst(daemon: Daemon, image: bytes, count: int) -> dict[str, float]:
    """Send `count` requests at once; resident MiB before and while they all wait, and their statuses."""
    before = daemon.rss_bytes()
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(daemon.predict(VISUAL, image=image)[0])) for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    peak = before
    while daemon.health()["inFlight"] < count and any(thread.is_alive() for thread in threads):
        peak = max(peak, daemon.rss_bytes())
    while any(thread.is_alive() for thread in threads):  # sampled until the last one is answered
        peak = max(peak, daemon.rss_bytes())
        threads[-1].join(0.05)
    for thread in threads:
        thread.join()
    mib = 1024**2
    return {
        "idle_mib": round(before / mib, 1),
        "peak_waiting_mib": round(peak / mib, 1),
        "per_waiting_request_kib": round((peak - before) / max(1, count - 1) / 1024, 1),
        "answered_200": statuses.count(200),
        "requests": count,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    image = modelgen.jpeg_bytes(modelgen.make_gradient_image(WIDTH, HEIGHT, seed=3), quality=80)
    results = {"jpeg_bytes": len(image), "image": f"{WIDTH}x{HEIGHT}"}
    common = {
        "MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": CLIP,
        "MACHINE_LEARNING_MAX_BATCH_CLIP": "1",
        "MACHINE_LEARNING_CONCURRENT_BATCHES": "1",
        "MACHINE_LEARNING_ADMISSION_WAIT_S": "600",
    }
    scenarios = {
        "queue_full": {"MACHINE_LEARNING_QUEUE_SIZE": "1"},
        "pixel_budget_full": {"MACHINE_LEARNING_MAX_PIXELS_IN_FLIGHT": str(WIDTH * HEIGHT)},
    }
    with tempfile.TemporaryDirectory(prefix="immich-ml-bench-") as scratch:
        cache = Path(scratch) / "cache"
        write_slow_clip(cache, CLIP, iterations=400)
        for name, env in scenarios.items():
            daemon = Daemon(
                Path(scratch), cache, common | env | {"MACHINE_LEARNING_MAX_IMAGE_PIXELS": str(WIDTH * HEIGHT)}
            )
            try:
                daemon.wait_ready()
                _burst(daemon, image, 2)  # warm: the first run's buffers are not the waiting's cost
                results[name] = _burst(daemon, image, args.requests)
            finally:
                daemon.stop()
            print(name, results[name], flush=True)
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
