#!/usr/bin/env python3
"""Which immich_ml files one warm request runs code in: a CLIP image, a CLIP text and a face request.

Every Python call in every thread is traced (`sys.setprofile`, `threading.setprofile` set before any thread
starts) during the second of two identical requests to the real application on a loopback port, with
generated models (tests/modelgen.py, so run it from the repository with the test dependencies:
`.venv/bin/python scripts/request_path.py`). A module counts as entered each time a new frame of it is
called from another file; a coroutine resuming is not a new entry. docs/architecture.md quotes the output.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from immich_ml.http.app import create_app  # noqa: E402
from immich_ml.settings import Settings  # noqa: E402
from tests import modelgen  # noqa: E402
from tests.conftest import predict_form  # noqa: E402

CLIP = "ViT-B-32__openai"
FACE = modelgen.Face(stride=16, cell_x=12, cell_y=14, anchor=0, score=0.92, distances=(40.3, 48.0, 40.0, 56.2))


class Tracer:
    """A profile hook that counts, per immich_ml file, the frames run and the entries from other files."""

    def __init__(self) -> None:
        self.on = False
        self.files: Counter[str] = Counter()
        self.entries: Counter[str] = Counter()
        self._seen: dict[int, FrameType] = {}

    def reset(self) -> None:
        self.files.clear()
        self.entries.clear()
        self._seen.clear()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if not self.on or event != "call" or "/immich_ml/" not in frame.f_code.co_filename:
            return
        if self._seen.get(id(frame)) is frame:  # a coroutine resuming, not a new call
            return
        self._seen[id(frame)] = frame  # kept alive, so ids are not reused during the request
        path = frame.f_code.co_filename
        module = path.split("/immich_ml/", 1)[1]
        self.files[module] += 1
        if frame.f_back is None or frame.f_back.f_code.co_filename != path:
            self.entries[module] += 1


async def main() -> None:
    tracer = Tracer()
    sys.setprofile(tracer)
    threading.setprofile(tracer)  # before the app starts its threads, so they all inherit it
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder)
        modelgen.write_clip(cache, CLIP)
        modelgen.write_scrfd(cache, "buffalo_l", [FACE])
        modelgen.write_arcface(cache, "buffalo_l")
        settings = Settings(cache_folder=cache, request_threads=2, model_ttl_poll_s=0, hf_offline=True)
        client = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        image = modelgen.png_bytes(modelgen.make_gradient_image(640, 480, seed=3))
        faces = {"detection": {"modelName": "buffalo_l"}, "recognition": {"modelName": "buffalo_l"}}
        requests = {
            "CLIP visual": (json.dumps({"clip": {"visual": {"modelName": CLIP}}}), {"image": image}),
            "CLIP textual": (json.dumps({"clip": {"textual": {"modelName": CLIP}}}), {"text": "a photo"}),
            "faces": (json.dumps({"facial-recognition": faces}), {"image": image}),
        }
        try:
            for name, (entries, payload) in requests.items():
                for traced in (False, True):  # the first request loads the model
                    tracer.reset()
                    tracer.on = traced
                    async with client.post("/predict", data=predict_form(entries, **payload)) as response:
                        assert response.status == 200, await response.text()
                    tracer.on = False
                repeated = ", ".join(f"{m} ×{n}" for m, n in sorted(tracer.entries.items()) if n > 1)
                print(f"{name}: {len(tracer.files)} files; entered more than once: {repeated or 'none'}")
                print("   ", " ".join(sorted(tracer.files)))
        finally:
            await client.close()
    sys.setprofile(None)
    threading.setprofile(None)  # type: ignore[arg-type]


if __name__ == "__main__":
    asyncio.run(main())
