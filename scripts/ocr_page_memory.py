#!/usr/bin/env python3
"""How much a page of text raises a real daemon's peak memory: OCR of rendered pages with the real PP-OCR models.

For each page (lines × characters per line, rendered in DejaVu Sans like the OCR tests), a fresh daemon
(`python -m immich_ml serve`, tests/daemonproc.py) with the real PP-OCRv4 models under the PP-OCRv5_mobile name
(tests/modelgen.py) reads the page twice; printed: the peak RSS (`VmHWM`) above the ready daemon after the
second request, and how many lines it read. The first request loads both models. Run from the repository with
the test dependencies: `.venv/bin/python scripts/ocr_page_memory.py`. docs/benchmarks.md ("Memory") quotes it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import modelgen  # noqa: E402
from tests.daemonproc import Daemon  # noqa: E402
from tests.ocrimages import render  # noqa: E402

MODEL = "PP-OCRv5_mobile"
PAGES = ((120, 20, 736), (60, 60, 2000))
"""Lines, characters per line, and the request's `maxResolution`."""
LINE_PX = 34
FONT_PX = 26
CHAR_PX = 17


def page_png(lines: int, characters: int) -> tuple[bytes, tuple[int, int]]:
    """`lines` numbered lines of `characters` characters each, black on white; the PNG and its size."""
    text = ("Immich photos memory " * (1 + characters // 21))[:characters]
    size = (40 + CHAR_PX * (characters + 3), 40 + LINE_PX * lines)
    image, _ = render([(f"{i:02d} {text}", (20, 20 + LINE_PX * i)) for i in range(lines)], size, FONT_PX)
    return modelgen.png_bytes(image), size


def peak_growth_mib(png: bytes, max_resolution: int) -> tuple[float, int]:
    """A fresh daemon reads the page twice: its peak RSS above the ready daemon, and the lines it read."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        modelgen.write_ocr(cache, MODEL)
        entries = {
            "ocr": {
                "detection": {"modelName": MODEL, "options": {"maxResolution": max_resolution}},
                "recognition": {"modelName": MODEL},
            }
        }
        daemon = Daemon(Path(tmp), cache, {"MACHINE_LEARNING_MODEL_TTL": "0"})
        try:
            daemon.wait_ready()
            ready = daemon.peak_rss_bytes()
            for _ in range(2):
                status, body = daemon.predict(entries, image=png)
                if status != 200:
                    raise SystemExit(f"OCR answered {status}: {body}")
            return (daemon.peak_rss_bytes() - ready) / 2**20, len(body["ocr"]["text"])
        finally:
            daemon.stop()


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("| page | size (px) | `maxResolution` | lines read | peak above the ready daemon |\n|---|---|---|---|---|")
    for lines, characters, max_resolution in PAGES:
        png, (width, height) = page_png(lines, characters)
        growth, read = peak_growth_mib(png, max_resolution)
        print(
            f"| {lines} lines of {characters} characters | {width} × {height} | {max_resolution} | {read} "
            f"| +{growth:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
