"""The generated test models load in onnxruntime with the upstream names/shapes and behave as documented."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from tokenizers import Tokenizer

try:
    from tests import modelgen
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import modelgen  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parent.parent


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _io(
    session: ort.InferenceSession,
) -> tuple[list[tuple[str, str, list[object]]], list[tuple[str, list[object]]]]:
    inputs = [(i.name, i.type, list(i.shape)) for i in session.get_inputs()]
    outputs = [(o.name, list(o.shape)) for o in session.get_outputs()]
    return inputs, outputs


def _padded_tokenizer(text_dir: Path, context_length: int) -> Tokenizer:
    """Configure the tokenizer the way the daemon does (pad to the context length with the config's pad token)."""
    tokenizer = Tokenizer.from_file(str(text_dir / "tokenizer.json"))
    pad = json.loads((text_dir / "tokenizer_config.json").read_text())["pad_token"]
    tokenizer.enable_padding(length=context_length, pad_token=pad, pad_id=tokenizer.token_to_id(pad))
    tokenizer.enable_truncation(max_length=context_length)
    return tokenizer


def _preprocess(image: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    x = (image.astype(np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    modelgen.write_clip(root)
    modelgen.write_clip(root, "ViT-B-16-SigLIP__webli", embed_dim=768, context_length=64, canonicalize=True)
    modelgen.write_clip(root, "XLM-Roberta-Large-Vit-B-32", kind="mclip")
    return root


def test_clip_files_follow_upstream_layout(clip_root: Path) -> None:
    model = clip_root / "clip" / "ViT-B-32__openai"
    for rel in (
        "config.json",
        "visual/model.onnx",
        "visual/preprocess_cfg.json",
        "textual/model.onnx",
        "textual/tokenizer.json",
        "textual/tokenizer_config.json",
        "textual/special_tokens_map.json",
    ):
        assert (model / rel).is_file(), rel
    config = json.loads((model / "config.json").read_text())
    assert config["embed_dim"] == 512
    assert config["vision_cfg"]["image_size"] == 224
    assert config["text_cfg"]["context_length"] == 77
    assert "tokenizer_kwargs" not in config["text_cfg"]
    preprocess = json.loads((model / "visual/preprocess_cfg.json").read_text())
    assert preprocess["size"] == [224, 224]
    assert preprocess["mean"] == list(modelgen.OPENAI_CLIP_MEAN)
    assert preprocess["std"] == list(modelgen.OPENAI_CLIP_STD)
    assert preprocess["resize_mode"] == "shortest"
    assert json.loads((model / "textual/tokenizer_config.json").read_text())["pad_token"] == "<|endoftext|>"

    siglip = clip_root / "clip" / "ViT-B-16-SigLIP__webli"
    config = json.loads((siglip / "config.json").read_text())
    assert config["text_cfg"]["tokenizer_kwargs"] == {"clean": "canonicalize"}
    assert config["text_cfg"]["context_length"] == 64
    preprocess = json.loads((siglip / "visual/preprocess_cfg.json").read_text())
    assert (preprocess["mean"], preprocess["std"], preprocess["resize_mode"]) == (
        [0.5] * 3,
        [0.5] * 3,
        "squash",
    )


def test_clip_tokenizer_matches_real_clip_ids(clip_root: Path) -> None:
    tokenizer = Tokenizer.from_file(str(clip_root / "clip/ViT-B-32__openai/textual/tokenizer.json"))
    assert tokenizer.get_vocab_size() == modelgen.CLIP_VOCAB_SIZE
    assert tokenizer.token_to_id("<|startoftext|>") == 49406
    assert tokenizer.token_to_id("<|endoftext|>") == 49407
    assert tokenizer.encode("a photo of a cat").ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # Lowercasing and whitespace collapsing happen in the normaliser.
    assert tokenizer.encode("A  Photo\nof a CAT").ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.decode(tokenizer.encode("a photo of a cat").ids) == "a photo of a cat"

    padded = _padded_tokenizer(clip_root / "clip/ViT-B-32__openai/textual", 77)
    ids = padded.encode("word " * 100).ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407


def test_synthetic_tokenizers_pad_as_configured(clip_root: Path) -> None:
    siglip = _padded_tokenizer(clip_root / "clip/ViT-B-16-SigLIP__webli/textual", 64)
    encoding = siglip.encode("a photo of a cat")
    assert len(encoding.ids) == 64
    assert encoding.tokens[:6] == ["\u2581a", "\u2581photo", "\u2581of", "\u2581a", "\u2581cat", "</s>"]
    assert set(encoding.ids[6:]) == {siglip.token_to_id("</s>")}

    mclip = _padded_tokenizer(clip_root / "clip/XLM-Roberta-Large-Vit-B-32/textual", 77)
    assert (mclip.token_to_id("<s>"), mclip.token_to_id("<pad>"), mclip.token_to_id("</s>")) == (0, 1, 2)
    encoding = mclip.encode("a photo of a cat")
    assert encoding.ids[0] == 0 and encoding.ids[6] == 2 and set(encoding.ids[7:]) == {1}
    assert sum(encoding.attention_mask) == 7


def test_clip_visual_graph_separates_images(clip_root: Path) -> None:
    model = clip_root / "clip" / "ViT-B-32__openai"
    session = _session(model / "visual/model.onnx")
    assert _io(session) == (
        [("image", "tensor(float)", ["batch", 3, 224, 224])],
        [("embedding", ["batch", 512])],
    )
    preprocess = json.loads((model / "visual/preprocess_cfg.json").read_text())
    images = [modelgen.make_gradient_image(224, 224, seed) for seed in range(3)]
    recoded = np.asarray(Image.open(io.BytesIO(modelgen.jpeg_bytes(images[0], quality=90))))
    batch = np.concatenate([_preprocess(i, preprocess["mean"], preprocess["std"]) for i in [*images, recoded]])
    (embeddings,) = session.run(None, {"image": batch})
    assert embeddings.shape == (4, 512) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] < 0.5 and similarity[0, 2] < 0.5 and similarity[1, 2] < 0.5
    assert similarity[0, 3] > 0.95  # a JPEG round trip barely moves the embedding
    np.testing.assert_allclose(embeddings, modelgen.clip_visual_reference(batch), atol=1e-4)
    # Deterministic: the same pixels give the same embedding in a batch of one.
    np.testing.assert_allclose(session.run(None, {"image": batch[:1]})[0], embeddings[:1], atol=1e-6)


@pytest.mark.parametrize(
    ("name", "context_length", "dim", "kind"),
    [
        ("ViT-B-32__openai", 77, 512, "openclip"),
        ("ViT-B-16-SigLIP__webli", 64, 768, "openclip"),
        ("XLM-Roberta-Large-Vit-B-32", 77, 512, "mclip"),
    ],
)
def test_clip_textual_graph_separates_texts(
    clip_root: Path, name: str, context_length: int, dim: int, kind: str
) -> None:
    model = clip_root / "clip" / name
    session = _session(model / "textual/model.onnx")
    inputs, outputs = _io(session)
    names = ["text"] if kind == "openclip" else ["input_ids", "attention_mask"]
    assert inputs == [(n, "tensor(int32)", ["batch", context_length]) for n in names]
    assert outputs == [("embedding", ["batch", dim])]

    tokenizer = _padded_tokenizer(model / "textual", context_length)
    encodings = tokenizer.encode_batch(["a photo of a cat", "a photo of a dog", "a cat photo of a"])
    ids = np.array([e.ids for e in encodings], dtype=np.int32)
    feeds = {"text": ids}
    if kind == "mclip":
        feeds = {
            "input_ids": ids,
            "attention_mask": np.array([e.attention_mask for e in encodings], np.int32),
        }
    (embeddings,) = session.run(None, feeds)
    assert embeddings.shape == (3, dim)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] < 0.9 and similarity[0, 2] < 0.9 and similarity[1, 2] < 0.9


@pytest.mark.parametrize("fixed_batch", [False, True])
def test_scrfd_outputs_fire_at_configured_anchors(tmp_path: Path, fixed_batch: bool) -> None:
    faces = [
        modelgen.Face(stride=8, cell_x=20, cell_y=30, anchor=1, score=0.75, distances=(16, 20, 18, 22)),
        modelgen.Face(
            stride=32,
            cell_x=5,
            cell_y=9,
            anchor=0,
            score=0.95,
            distances=(64, 64, 80, 96),
            keypoints=((140, 270), (190, 272), (165, 300), (145, 330), (185, 331)),
        ),
    ]
    model = modelgen.write_scrfd(tmp_path, faces=faces, fixed_batch=fixed_batch)
    session = _session(model / "detection/model.onnx")
    inputs, outputs = _io(session)
    shape = [1, 3, 640, 640] if fixed_batch else ["batch", 3, "height", "width"]
    assert inputs == [("input.1", "tensor(float)", shape)]
    rows = [12800, 3200, 800]
    assert [o[1] for o in outputs] == [[r, 1] for r in rows] + [[r, 4] for r in rows] + [[r, 10] for r in rows]

    blob = np.random.default_rng(0).uniform(-1, 1, (1, 3, 640, 640)).astype(np.float32)
    results = session.run(None, {"input.1": blob})
    # Decode as the daemon does: centres on the stride grid, two anchors per cell, distances × stride.
    found = []
    for index, stride in enumerate(modelgen.SCRFD_STRIDES):
        scores, boxes, kps = results[index][:, 0], results[index + 3], results[index + 6]
        side = 640 // stride
        cells = np.repeat(np.arange(side * side), 2)
        centres = np.stack([(cells % side) * stride, (cells // side) * stride], axis=1).astype(np.float64)
        for row in np.flatnonzero(scores >= 0.5):
            c = centres[row]
            box = np.concatenate([c - boxes[row, :2] * stride, c + boxes[row, 2:] * stride])
            found.append((float(scores[row]), box, c + kps[row].reshape(5, 2) * stride))
    assert len(found) == len(faces)
    scale = modelgen.scrfd_scale(1280, 960)
    assert scale == 0.5
    for face in faces:
        expected = modelgen.expected_detection(face, scale)
        _, box, landmarks = next(f for f in found if abs(f[0] - face.score) < 1e-6)
        np.testing.assert_allclose(box / scale, expected.box, atol=1e-3)
        np.testing.assert_allclose(landmarks / scale, expected.landmarks, atol=1e-3)
    np.testing.assert_allclose(modelgen.expected_detection(faces[1], 1.0).landmarks, faces[1].keypoints, atol=1e-9)


def test_scrfd_scale_follows_the_letterbox() -> None:
    assert modelgen.scrfd_scale(640, 640) == 1.0
    assert modelgen.scrfd_scale(480, 960) == pytest.approx(640 / 960)  # portrait: height fills the canvas
    assert modelgen.scrfd_scale(1000, 333) == int(640 * 333 / 1000) / 333


@pytest.mark.parametrize("fixed_batch", [False, True])
def test_arcface_matches_numpy_reference(tmp_path: Path, fixed_batch: bool) -> None:
    model = modelgen.write_arcface(tmp_path, fixed_batch=fixed_batch)
    session = _session(model / "recognition/model.onnx")
    batch: object = 1 if fixed_batch else "batch"
    assert _io(session) == (
        [("input.1", "tensor(float)", [batch, 3, 112, 112])],
        [(modelgen.ARCFACE_OUTPUT, [batch, 512])],
    )
    n = 1 if fixed_batch else 3
    blob = np.random.default_rng(1).uniform(-1, 1, (n, 3, 112, 112)).astype(np.float32)
    (embeddings,) = session.run(None, {"input.1": blob})
    assert embeddings.shape == (n, 512) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, modelgen.arcface_reference(blob), atol=1e-4)


def test_image_helpers_round_trip() -> None:
    image = modelgen.make_gradient_image(64, 48, seed=3)
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert not np.array_equal(image, modelgen.make_gradient_image(64, 48, seed=4))
    np.testing.assert_array_equal(image, modelgen.make_gradient_image(64, 48, seed=3))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(modelgen.png_bytes(image)))), image)
    decoded = np.asarray(Image.open(io.BytesIO(modelgen.jpeg_bytes(Image.fromarray(image), quality=95))))
    assert decoded.shape == image.shape and np.abs(decoded.astype(int) - image).mean() < 8


def test_ocr_models_come_from_the_wheel(tmp_path: Path) -> None:
    model = modelgen.write_ocr(tmp_path, "EN__PP-OCRv5_mobile")
    det = _session(tmp_path / "ocr/PP-OCRv5_mobile/detection/model.onnx")
    rec = _session(model / "recognition/model.onnx")
    assert [i.name for i in det.get_inputs()] == ["x"]
    assert [i.name for i in rec.get_inputs()] == ["x"]
    charset = rec.get_modelmeta().custom_metadata_map["character"].splitlines()
    assert len(charset) > 1000
    (prob,) = det.run(None, {"x": np.zeros((1, 3, 64, 96), np.float32)})
    assert prob.shape == (1, 1, 64, 96)
    (probs,) = rec.run(None, {"x": np.zeros((2, 3, 48, 160), np.float32)})
    assert probs.shape[0] == 2 and probs.shape[2] == len(charset) + 2  # blank + charset + space
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, atol=1e-3)


def test_cli_writes_requested_group(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/make-test-models"), "--out", str(tmp_path), "--only", "faces"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (tmp_path / "facial-recognition/buffalo_l/detection/model.onnx").is_file()
    assert (tmp_path / "facial-recognition/buffalo_l/recognition/model.onnx").is_file()
    assert not (tmp_path / "clip").exists()
    assert result.stdout.split() == [str(tmp_path / "facial-recognition/buffalo_l")]
