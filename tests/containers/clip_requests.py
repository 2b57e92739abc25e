"""The CLIP requests the image tests send, and their answers from `immich-ml serve` outside any container."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests import modelgen
from tests.daemonproc import Daemon

__all__ = ["IMAGE", "MODEL", "PRELOAD", "TEXT", "TEXTUAL", "VISUAL", "answers_outside"]

MODEL = "ViT-B-32__openai"
TEXTUAL = {"clip": {"textual": {"modelName": MODEL}}}
VISUAL = {"clip": {"visual": {"modelName": MODEL}}}
PRELOAD = {
    "MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": MODEL,
    "MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": MODEL,
    "MACHINE_LEARNING_HF_OFFLINE": "true",
}
IMAGE = modelgen.jpeg_bytes(modelgen.make_gradient_image(640, 480, seed=3))
TEXT = "a photo of a dog on the beach"


def answers_outside(folder: Path) -> dict[str, Any]:
    """{"text": …, "image": …}: the JSON bodies of TEXTUAL and VISUAL from a daemon on this host, with MODEL
    generated under `folder`."""
    modelgen.write_clip(folder / "cache", MODEL)
    daemon = Daemon(folder, folder / "cache", PRELOAD)
    try:
        daemon.wait_ready()
        answers = {"text": daemon.predict(TEXTUAL, text=TEXT), "image": daemon.predict(VISUAL, image=IMAGE)}
    finally:
        assert daemon.stop() == 0
    assert answers["text"][0] == answers["image"][0] == 200, answers
    return {kind: body for kind, (_, body) in answers.items()}
