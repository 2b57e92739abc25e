"""GPU-marked tests: real CUDA sessions on an NVIDIA GPU with the onnxruntime-gpu build.

Every test here is marked `gpu` and skips, naming what is missing, where there is no GPU or no CUDA provider
(CI has neither). `scripts/gpu-validate` runs them (`pytest -m gpu`) on a borrowed GPU; docs/gpu.md,
"Validating on a borrowed GPU", says how. Figures (GPU memory) go to the JUnit report as properties.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image, ImageDraw, ImageFont

from immich_ml.inference.sessions import CPU, CUDA, ProviderError, SessionFactory
from immich_ml.settings import Provider, Settings
from tests import modelgen
from tests.conftest import ClientFactory, predict_form
from tests.gpuhost import cuda_missing

MISSING = cuda_missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=f"needs a GPU: {MISSING}")]

MiB = 1024**2
ROOT = Path(__file__).resolve().parents[2]
RecordProperty = Callable[[str, object], None]


# -- one request per model type, on CUDA and on the CPU ----------------------------------------------------------


def _text_image() -> bytes:
    image = Image.new("RGB", (800, 200), "white")
    ImageDraw.Draw(image).text((40, 60), "GPU validation 2026", font=ImageFont.load_default(size=48), fill="black")
    return modelgen.png_bytes(image)


def _clip(cache: Path) -> None:
    modelgen.write_clip(cache, "ViT-B-32__openai")


def _faces(cache: Path) -> None:
    modelgen.write_scrfd(cache, "buffalo_l")
    modelgen.write_arcface(cache, "buffalo_l")


def _ocr(cache: Path) -> None:
    modelgen.write_ocr(cache, "PP-OCRv5_mobile")


CLIP_VISUAL = {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}
CLIP_TEXTUAL = {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}
FACES = {
    "facial-recognition": {
        "detection": {"modelName": "buffalo_l", "options": {"minScore": 0.5}},
        "recognition": {"modelName": "buffalo_l"},
    }
}
OCR = {
    "ocr": {
        "detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5}},
        "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5}},
    }
}
PHOTO = modelgen.jpeg_bytes(modelgen.make_gradient_image(640, 480, seed=5))
Case = tuple[Callable[[Path], None], dict[str, Any], bytes | None, str | None]
CASES: dict[str, Case] = {  # model type: (writer, entries, image, text)
    "clip-visual": (_clip, CLIP_VISUAL, PHOTO, None),
    "clip-textual": (_clip, CLIP_TEXTUAL, None, "a photo of a dog"),
    "faces": (_faces, FACES, PHOTO, None),
    "ocr": (_ocr, OCR, _text_image(), None),
}


def vectors_and_labels(body: Any) -> tuple[list[np.ndarray], list[str]]:
    """The embeddings (CLIP's and each face's) and the recognised texts in a /predict answer."""
    vectors: list[np.ndarray] = []
    labels: list[str] = []
    if "clip" in body:
        vectors.append(np.asarray(json.loads(body["clip"]), dtype=np.float64))
    for face in body.get("facial-recognition", []):
        vectors.append(np.asarray(json.loads(face["embedding"]), dtype=np.float64))
        labels.append(f"face at {[round(v) for v in face['boundingBox'].values()]}")
    labels += body.get("ocr", {}).get("text", [])
    return vectors, labels


async def predict(client: Any, entries: dict[str, Any], image: bytes | None, text: str | None) -> Any:
    async with client.post("/predict", data=predict_form(json.dumps(entries), image=image, text=text)) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


@pytest.mark.parametrize("model_type", list(CASES))
async def test_model_type_runs_on_cuda_and_matches_the_cpu(
    make_client: ClientFactory, cache: Path, model_type: str
) -> None:
    write, entries, image, text = CASES[model_type]
    write(cache)
    gpu = await make_client(provider=Provider.CUDA, provider_strict=True)
    cpu = await make_client(provider=Provider.CPU)
    on_gpu = await predict(gpu, entries, image, text)
    on_cpu = await predict(cpu, entries, image, text)

    async with gpu.get("/health") as resp:
        models = (await resp.json())["models"]
    assert models, "the GPU app loaded no model"
    assert all(model["providers"][0] == CUDA for model in models), models
    gpu_vectors, gpu_labels = vectors_and_labels(on_gpu)
    cpu_vectors, cpu_labels = vectors_and_labels(on_cpu)
    assert gpu_vectors or gpu_labels, f"nothing to compare in {on_gpu}"
    assert gpu_labels == cpu_labels
    assert len(gpu_vectors) == len(cpu_vectors)
    for g, c in zip(gpu_vectors, cpu_vectors, strict=True):  # TF32 on the GPU: close, not equal
        assert float(g @ c / (np.linalg.norm(g) * np.linalg.norm(c))) > 0.99


# -- strict mode -------------------------------------------------------------------------------------------------


def test_strict_mode_refuses_a_real_cpu_fallback(clip_cache: Path) -> None:
    """A device id the machine lacks makes the CUDA provider fail for real; ONNX Runtime then falls back to
    the CPU, which strict mode refuses and non-strict mode reports."""
    model = clip_cache / "clip" / "ViT-B-32__openai" / "visual" / "model.onnx"
    env = {"MACHINE_LEARNING_PROVIDER": "cuda", "MACHINE_LEARNING_DEVICE_IDS": "97"}

    lenient = SessionFactory(Settings.from_env(env)).create(model, cache_key="lenient")
    assert lenient.providers[0] == CPU
    with pytest.raises(ProviderError, match="failed to initialise"):
        SessionFactory(Settings.from_env({**env, "MACHINE_LEARNING_PROVIDER_STRICT": "true"})).create(
            model, cache_key="strict"
        )


# -- GPU memory, as NVML sees it ---------------------------------------------------------------------------------


def write_tile_graph(path: Path, *, width: int, copies: int) -> Path:
    """x[1, width] → Tile to [copies, width] (the big intermediate) → ReduceSum → y[width]."""
    graph = helper.make_graph(
        [
            helper.make_node("Tile", ["x", "repeats"], ["tiled"]),
            helper.make_node("ReduceSum", ["tiled", "axes"], ["y"], keepdims=0),
        ],
        "tile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [width])],
        initializer=[
            helper.make_tensor("repeats", TensorProto.INT64, [2], [copies, 1]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def vram_probe(*models: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run tests/vramprobe.py in a fresh process on CUDA (strict); its JSON answer plus the bytes it held."""
    full_env = {
        **os.environ,
        "MACHINE_LEARNING_PROVIDER": "cuda",
        "MACHINE_LEARNING_PROVIDER_STRICT": "true",
        **(env or {}),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.vramprobe", *models],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in result, result
    assert all(providers[0] == CUDA for providers in result["providers"]), result
    process = result["process_bytes"]  # None where NVML does not list our pid (container pid namespace)
    result["held"] = process if process is not None else result["device_delta_bytes"]
    return result


def test_gpu_mem_limit_is_honoured(tmp_path: Path, record_property: RecordProperty) -> None:
    width, copies, limit = 1 << 20, 256, 256 * MiB  # a 1 GiB intermediate against a 256 MiB arena
    model = f"{write_tile_graph(tmp_path / 'tile.onnx', width=width, copies=copies)}:1x{width}"

    free = vram_probe(model)
    capped = vram_probe(model, env={"MACHINE_LEARNING_GPU_MEM_LIMIT": str(limit)})

    record_property("held_without_limit_mib", round(free["held"] / MiB))
    record_property("held_with_256mib_limit_mib", round(capped["held"] / MiB))
    assert free["errors"] == [None]
    assert free["held"] >= 4 * width * copies
    assert capped["errors"][0] is not None and "memory" in capped["errors"][0].lower(), capped
    assert capped["held"] <= free["held"] - (4 * width * copies - limit) // 2


def test_two_models_fit_a_vram_budget(clip_cache: Path, tmp_path: Path, record_property: RecordProperty) -> None:
    """Two models, each with its arena capped, stay within CUDA's own overhead plus the two caps."""
    limit = 128 * MiB
    env = {"MACHINE_LEARNING_GPU_MEM_LIMIT": str(limit)}
    visual = f"{clip_cache / 'clip' / 'ViT-B-32__openai' / 'visual' / 'model.onnx'}:8x3x224x224"
    arcface = f"{modelgen.write_arcface(tmp_path, 'buffalo_l') / 'recognition' / 'model.onnx'}:8x3x112x112"
    tiny = f"{write_tile_graph(tmp_path / 'tiny.onnx', width=4, copies=2)}:1x4"

    overhead = vram_probe(tiny, env=env)["held"]  # the CUDA context, handles and workspaces of one session
    alone = {name: vram_probe(model, env=env)["held"] for name, model in (("clip", visual), ("arcface", arcface))}
    both = vram_probe(visual, arcface, env=env)

    for name, held in alone.items():
        record_property(f"vram_{name}_mib", round((held - overhead) / MiB))
    record_property("vram_overhead_mib", round(overhead / MiB))
    record_property("vram_two_models_mib", round(both["held"] / MiB))
    assert both["errors"] == [None, None]
    assert both["held"] <= 2 * overhead + 2 * limit, (both, overhead)
