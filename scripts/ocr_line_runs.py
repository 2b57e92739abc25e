#!/usr/bin/env python3
"""What splitting a chunk of wide text lines into several recogniser runs changes, on the real PP-OCRv4 model.

For chunks of 6 lines padded to widths from 320 to 1920 px, runs each chunk two ways in the same process, with
the daemon's own CPU session options (one intra-op thread, as each OCR run has on 2 cores; the shared arena):
`whole`, one run of 6 rows (upstream's chunk), and `split`, as the daemon runs it (`max_run_elements`: at
most 6 × 320 px of lines per run). Prints the arena growth of each way's first run (RSS, measured in a fresh
process per width and way: ONNX Runtime keeps a run's activations in the arena), the best of five timings
per line, and whether both ways give the same bits. Run from the repository:
`.venv/bin/python scripts/ocr_line_runs.py`. docs/benchmarks.md quotes the output.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WIDTHS = (320, 640, 960, 1280, 1920)
LINES = 6
HEADER = (
    "| line width (px) | rows per run, split | arena growth MiB, whole / split | ms per line, whole / split "
    "| same bits |\n|---|---|---|---|---|"
)


def measure(model: Path, width: int, split: bool) -> str:
    """One way at one width in this (fresh) process: `rows_per_run growth_MiB ms_per_line checksum`."""
    from immich_ml.cpus import CpuBudget
    from immich_ml.inference.sessions import SessionFactory
    from immich_ml.memory import resident_bytes
    from immich_ml.pipelines.ocr.lines import NARROW_LINE_ELEMENTS
    from immich_ml.settings import Provider, Settings

    settings = Settings(provider=Provider.CPU, cpus=CpuBudget(affinity=2, quota=None))
    session = SessionFactory(settings).create(model, cache_key="ocr/recognition", split_between=2)
    if split:
        session.max_run_elements = LINES * NARROW_LINE_ELEMENTS
    lines = np.random.default_rng(width).uniform(-1, 1, (LINES, 3, 48, width)).astype(np.float32)
    feeds = {session.input_names[0]: lines}
    before = resident_bytes()
    (output, *_) = session.run(feeds)
    growth = (resident_bytes() - before) / 2**20
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        session.run(feeds)
        best = min(best, time.perf_counter() - started)
    rows = session.rows_per_run(feeds)
    return f"{rows} {growth:.0f} {best * 1000 / LINES:.1f} {hashlib.sha256(output.tobytes()).hexdigest()}"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        print(measure(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "split"))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.modelgen
    from tests import modelgen

    with tempfile.TemporaryDirectory() as folder:
        model = modelgen.write_ocr(folder) / "recognition" / "model.onnx"
        print(HEADER)
        for width in WIDTHS:
            results = {
                way: subprocess.run(
                    [sys.executable, __file__, "--one", str(model), str(width), way],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.split()
                for way in ("whole", "split")
            }
            (_, grow_w, ms_w, sum_w), (rows, grow_s, ms_s, sum_s) = results["whole"], results["split"]
            print(f"| {width} | {rows} | {grow_w} / {grow_s} | {ms_w} / {ms_s} | {'yes' if sum_w == sum_s else 'NO'} |")


if __name__ == "__main__":
    main()
