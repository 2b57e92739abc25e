"""A real daemon's memory while it preloads: the copy of a model a session build frees goes back to the OS at once,
so the peak at start is what the models hold (MACHINE_LEARNING_TRIM_MEMORY, `immich_ml.memory`)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from tests import modelgen
from tests.daemonproc import Daemon

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heap settings are glibc's")

MODELS = ("ViT-B-32__openai", "ViT-B-16__openai")
MODEL_MB = 150


@pytest.fixture(scope="module")
def heavy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two CLIP models whose visual graphs hold 150 MiB each in 60 weights of 2.5 MiB, as real models hold
    many mid-sized weights (glibc puts such blocks in its heap once a larger one has been freed)."""
    cache = tmp_path_factory.mktemp("heavy") / "cache"
    for name in MODELS:
        modelgen.write_clip(cache, name)
        modelgen.add_dead_weight(cache / f"clip/{name}/visual/model.onnx", MODEL_MB, pieces=60)
    return cache


def peak_and_resident_mib(tmp_path: Path, cache: Path, trim: str) -> tuple[float, float]:
    """VmHWM and VmRSS of a daemon that preloaded both models and reported ready."""
    env = {
        "MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": ",".join(MODELS),
        "MACHINE_LEARNING_TRIM_MEMORY": trim,
        "MACHINE_LEARNING_MODEL_TTL": "0",
    }
    daemon = Daemon(tmp_path, cache, env)
    try:
        daemon.wait_ready()
        return daemon.peak_rss_bytes() / 2**20, daemon.rss_bytes() / 2**20
    finally:
        daemon.stop()


def test_the_peak_while_preloading_is_what_the_loaded_models_hold(tmp_path: Path, heavy_cache: Path) -> None:
    """Against glibc's defaults (upstream's way), which keep the freed copies: the case that shows the first
    assertion can fail."""
    peak, resident = peak_and_resident_mib(tmp_path, heavy_cache, "true")
    default, _ = peak_and_resident_mib(tmp_path, heavy_cache, "false")
    print(f"preloaded: peak {peak:.0f} MiB, resident {resident:.0f} MiB; peak {default:.0f} MiB with glibc's defaults")
    assert peak - resident < MODEL_MB * 0.2
    assert default - peak > MODEL_MB * 0.8
