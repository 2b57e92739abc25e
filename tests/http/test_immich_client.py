"""The daemon as an unmodified Immich server sees it: Node's fetch and FormData (undici), like the server's
machine-learning repository, sending the exact requests of smart search, search queries, faces and OCR."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests import modelgen
from tests.daemonproc import Daemon

# What the Immich server does, reduced to the calls: availability check with a 2 s timeout, then
# POST <url>/predict with a FormData body of `entries` and the preview JPEG as a Blob named "blob".
IMMICH_CLIENT = r"""
const [url, imagePath] = process.argv.slice(1);
const fs = require('node:fs');
async function predict(entries, payload) {
  const form = new FormData();
  form.append('entries', JSON.stringify(entries));
  if (payload.image) form.append('image', new Blob([fs.readFileSync(payload.image)]), 'blob');
  if (payload.text) form.append('text', payload.text);
  const res = await fetch(new URL('predict', url), { method: 'POST', body: form });
  if (res.status >= 400) throw new Error(`status ${res.status}: ${await res.text()}`);
  return res.json();
}
(async () => {
  const ping = await fetch(new URL('ping', url), { signal: AbortSignal.timeout(2000) });
  const out = { ping: [ping.status, await ping.text()] };
  out.index = await predict({ clip: { visual: { modelName: 'ViT-B-32__openai' } } }, { image: imagePath });
  out.search = await predict({ clip: { textual: { modelName: 'ViT-B-32__openai', options: { language: 'de' } } } },
                             { text: 'ein Hund am Strand' });
  out.faces = await predict({ 'facial-recognition': {
      detection: { modelName: 'buffalo_l', options: { minScore: 0.7 } },
      recognition: { modelName: 'buffalo_l' } } }, { image: imagePath });
  out.ocr = await predict({ ocr: {
      detection: { modelName: 'PP-OCRv5_mobile', options: { minScore: 0.5, maxResolution: 736 } },
      recognition: { modelName: 'PP-OCRv5_mobile', options: { minScore: 0.8 } } } }, { image: imagePath });
  console.log(JSON.stringify(out));
})().catch((error) => { console.error(error); process.exit(1); });
"""


@pytest.fixture
def node() -> str:
    found = shutil.which("node")
    assert found, "Node.js is needed to play the Immich server (scripts/setup-venv --test installs it)"
    return found


def test_an_immich_server_indexes_searches_and_detects_faces(tmp_path: Path, node: str) -> None:
    cache = tmp_path / "cache"
    modelgen.write_clip(cache, "ViT-B-32__openai")
    modelgen.write_scrfd(cache, "buffalo_l")
    modelgen.write_arcface(cache, "buffalo_l")
    modelgen.write_ocr(cache, "PP-OCRv5_mobile")
    image = tmp_path / "preview.jpg"
    image.write_bytes(modelgen.jpeg_bytes(modelgen.make_gradient_image(1440, 1080, seed=4), quality=80))
    daemon = Daemon(tmp_path, cache)
    try:
        daemon.wait_ready()
        result = subprocess.run(
            [node, "-e", IMMICH_CLIENT, f"http://127.0.0.1:{daemon.port}/", str(image)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        assert daemon.stop() == 0
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ping"] == [200, "pong"]
    assert (out["index"]["imageWidth"], out["index"]["imageHeight"]) == (1440, 1080)
    for vector in (out["index"]["clip"], out["search"]["clip"]):
        assert isinstance(vector, str)
        assert np.linalg.norm(np.asarray(json.loads(vector))) == pytest.approx(1, abs=1e-4)
    faces = out["faces"]["facial-recognition"]
    assert faces and all(set(face) == {"boundingBox", "embedding", "score"} for face in faces)
    for face in faces:
        assert all(float(value).is_integer() for value in face["boundingBox"].values())
        assert len(json.loads(face["embedding"])) == 512
    ocr = out["ocr"]["ocr"]
    assert set(ocr) == {"box", "boxScore", "text", "textScore"}
    assert len(ocr["box"]) == 8 * len(ocr["text"]) == 8 * len(ocr["boxScore"]) == 8 * len(ocr["textScore"])
