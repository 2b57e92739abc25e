"""A real daemon reading a long document with the real PP-OCR models: each chunk of lines is decoded right after
its run, so the recogniser's outputs (a probability per character of its alphabet per step) never pile up
(`InferenceModel.add_reading_batcher`, docs/benchmarks.md "Memory")."""

from __future__ import annotations

from pathlib import Path

from tests import modelgen
from tests.daemonproc import Daemon
from tests.ocrimages import render

MODEL = "PP-OCRv5_mobile"
LINES = 120
DETECTION = {"modelName": MODEL, "options": {"minScore": 0.5, "maxResolution": 736}}
HELD_MIB = 170
"""What this document's recogniser outputs take when all are held until the last chunk is read: 20 chunks of 6
lines padded to 406–465 px, 50–58 steps of 6625 characters in float32 each (before this change the peak grew by
189 MiB here, now by 33)."""


def test_a_long_documents_chunks_of_lines_are_not_all_held_at_once(tmp_path: Path, daemons: list[Daemon]) -> None:
    cache = tmp_path / "cache"
    modelgen.write_ocr(cache, MODEL)
    image, _ = render([(f"{i:03d} Immich photos", (20, 20 + 34 * i)) for i in range(LINES)], (460, 40 + 34 * LINES), 26)
    png = modelgen.png_bytes(image)
    daemon = Daemon(
        tmp_path,
        cache,
        {
            "MACHINE_LEARNING_PRELOAD__OCR__DETECTION": MODEL,
            "MACHINE_LEARNING_PRELOAD__OCR__RECOGNITION": MODEL,
            "MACHINE_LEARNING_MODEL_TTL": "0",
        },
    )
    daemons.append(daemon)
    daemon.wait_ready()
    status, _ = daemon.predict({"ocr": {"detection": DETECTION}}, image=png)  # the detector's memory at this size
    assert status == 200
    before = daemon.peak_rss_bytes()
    status, body = daemon.predict(
        {"ocr": {"detection": DETECTION, "recognition": {"modelName": MODEL, "options": {"minScore": 0.5}}}},
        image=png,
    )
    grew_mib = (daemon.peak_rss_bytes() - before) / 2**20
    print(f"reading {LINES} lines grew the peak by {grew_mib:.0f} MiB")
    assert status == 200 and len(body["ocr"]["text"]) == LINES
    assert grew_mib < HELD_MIB / 2
