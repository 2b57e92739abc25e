#!/usr/bin/env python3
"""Write real-architecture models with random weights into an Immich-layout model cache.

The files are for throughput benchmarks only: the graphs (and so the compute cost) match the models Immich
uses by default, the weights are random.  Nothing is downloaded; everything is built locally with torch.

    python scripts/bench_models.py --out DIR [--models clip-b32,siglip-b16,scrfd,arcface] [--no-verify]

Layout written (the default revision of the upstream cache):

    DIR/clip/ViT-B-32__openai/{config.json, visual/{model.onnx,preprocess_cfg.json},
                               textual/{model.onnx,tokenizer.json,tokenizer_config.json}}
    DIR/clip/ViT-B-16-SigLIP__webli/...                         (same set)
    DIR/facial-recognition/buffalo_l/detection/model.onnx       (SCRFD-10G-like, 9 outputs)
    DIR/facial-recognition/buffalo_l/recognition/model.onnx     (ArcFace iresnet50, [N,3,112,112] -> [N,512])

Needs the packages in scripts/requirements-bench.txt (CPU torch, open_clip_torch, onnx, onnxruntime,
tokenizers, numpy), kept in their own virtual environment (.venv-bench), never in the service's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ALL_MODELS = ("clip-b32", "siglip-b16", "scrfd", "arcface")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bench-models"
OPSET = 17


def log(msg: str) -> None:
    print(msg, flush=True)


def import_open_clip():
    """Import open_clip next to the CPU torch.

    torchvision's compiled ops (pulled in by open_clip's transforms) are not needed; its
    `_meta_registrations` module fails against a torch it was not built for, so a stub takes its place.
    """
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import open_clip

    return open_clip


def export_onnx(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    module.eval()
    # nn.MultiheadAttention's inference fast path (aten::_native_multi_head_attention) has no ONNX export
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------


def clip_bpe_path() -> Path:
    open_clip = import_open_clip()
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def _modelgen():
    """The test suite's model generators (tests/modelgen.py), whose CLIP BPE tokenizer builder is reused."""
    tests_dir = str(Path(__file__).resolve().parent.parent / "tests")
    sys.path.insert(0, tests_dir)
    try:
        import modelgen
    finally:
        sys.path.remove(tests_dir)
    return modelgen


def build_clip_tokenizer():
    """OpenAI CLIP's BPE tokenizer (49408 ids, SOT 49406, EOT/pad 49407), built offline from open_clip's
    bpe_simple_vocab_16e6.txt.gz by tests/modelgen.py."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_modelgen().clip_bpe_tokenizer_json(clip_bpe_path()))


CLIP_TOKENIZER_CONFIG = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "model_max_length": 77,
    "do_lower_case": True,
    "tokenizer_class": "CLIPTokenizer",
}


def build_siglip_tokenizer(vocab_size: int = 32000):
    """A synthetic SentencePiece-style Unigram tokenizer with SigLIP's shape.

    The real one (a 32k SentencePiece model) is only on the hub.  This one has the same vocabulary size,
    special tokens (<pad> 0, </s> 1 = eos = pad, <unk> 2), metaspace pre-tokenisation and an appended </s>;
    its pieces are English words taken from the CLIP BPE vocabulary, so ordinary text tokenises into a
    realistic number of ids.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>"]
    pieces: list[str] = list(specials)
    seen = set(pieces)

    def add(p: str) -> None:
        if p and p not in seen and len(pieces) < vocab_size:
            seen.add(p)
            pieces.append(p)

    add("\u2581")
    for c in (chr(i) for i in range(0x21, 0x7F)):
        add(c)
        add("\u2581" + c)
    vocab = build_clip_tokenizer().get_vocab(with_added_tokens=False)
    for tok in sorted(vocab, key=vocab.__getitem__)[512:]:
        if tok.startswith("<|"):
            continue
        if not all(0x21 <= ord(ch) < 0x7F for ch in tok.replace("</w>", "")):
            continue  # skip byte-level characters outside printable ASCII
        add("\u2581" + tok[: -len("</w>")] if tok.endswith("</w>") else tok)
    n = 0
    while len(pieces) < vocab_size:  # pad with unused pieces (not reached with the CLIP vocabulary)
        add(f"\u2581<extra_{n}>")
        n += 1
    # Unigram picks the segmentation with the largest total score: near-constant negative scores favour
    # the fewest pieces, frequent (low-rank) pieces first.
    scored = [(p, 0.0) for p in specials] + [(p, -5.0 - i * 1e-4) for i, p in enumerate(pieces[3:])]
    tok = Tokenizer(models.Unigram(scored, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(p, special=True) for p in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", 1)]
    )
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


SIGLIP_TOKENIZER_CONFIG = {
    "eos_token": "</s>",
    "pad_token": "</s>",
    "unk_token": "<unk>",
    "model_max_length": 64,
    "tokenizer_class": "T5TokenizerFast",
}


# ----------------------------------------------------------------------------------------------------------
# CLIP (open_clip towers)
# ----------------------------------------------------------------------------------------------------------


class VisualTower(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model.encode_image(image, normalize=True)


class TextTower(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, text):
        return self.model.encode_text(text.to(torch.int64), normalize=True)


CLIP_SPECS = {
    "clip-b32": {
        "name": "ViT-B-32",
        "dir": "ViT-B-32__openai",
        "quick_gelu": True,  # the OpenAI weights use QuickGELU
        "preprocess": None,  # open_clip's default (OpenAI mean/std, shortest-side resize)
    },
    "siglip-b16": {
        "name": "ViT-B-16-SigLIP",
        "dir": "ViT-B-16-SigLIP__webli",
        "quick_gelu": False,
        "preprocess": {
            "size": [224, 224],
            "mode": "RGB",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "squash",
            "fill_color": 0,
        },
    },
}


def make_clip(key: str, out: Path) -> list[Path]:
    open_clip = import_open_clip()
    spec = CLIP_SPECS[key]
    root = out / "clip" / spec["dir"]
    torch.manual_seed(0)
    model = open_clip.create_model(spec["name"], pretrained=None, force_quick_gelu=spec["quick_gelu"]).eval()

    config = open_clip.get_model_config(spec["name"])
    if spec["quick_gelu"]:
        config["quick_gelu"] = True
    text_cfg = config["text_cfg"]
    ctx = int(text_cfg.get("context_length", 77))
    write_json(root / "config.json", config)

    if spec["preprocess"] is None:
        pp = dict(open_clip.get_model_preprocess_cfg(model))
        pp = {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}
    else:
        pp = spec["preprocess"]
    write_json(root / "visual" / "preprocess_cfg.json", pp)
    size = pp["size"][0] if isinstance(pp["size"], list) else int(pp["size"])

    t0 = time.perf_counter()
    export_onnx(
        VisualTower(model),
        (torch.randn(1, 3, size, size),),
        root / "visual" / "model.onnx",
        ["image"],
        ["embedding"],
        {"image": {0: "batch_size"}, "embedding": {0: "batch_size"}},
    )
    log(f"  visual exported in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    vocab_size = int(text_cfg.get("vocab_size", 49408))
    dummy_text = torch.randint(0, vocab_size - 2, (1, ctx), dtype=torch.int32)
    export_onnx(
        TextTower(model),
        (dummy_text,),
        root / "textual" / "model.onnx",
        ["text"],
        ["embedding"],
        {"text": {0: "batch_size"}, "embedding": {0: "batch_size"}},
    )
    log(f"  textual exported in {time.perf_counter() - t0:.1f}s")

    if key == "clip-b32":
        tok = build_clip_tokenizer()
        tok_cfg = dict(CLIP_TOKENIZER_CONFIG, model_max_length=ctx)
    else:
        tok = build_siglip_tokenizer(vocab_size)
        tok_cfg = dict(SIGLIP_TOKENIZER_CONFIG, model_max_length=ctx)
    tok.save(str(root / "textual" / "tokenizer.json"))
    write_json(root / "textual" / "tokenizer_config.json", tok_cfg)
    write_json(
        root / "textual" / "special_tokens_map.json",
        {k: v for k, v in tok_cfg.items() if k.endswith("_token")},
    )
    return [root / "visual" / "model.onnx", root / "textual" / "model.onnx"]


# ----------------------------------------------------------------------------------------------------------
# SCRFD-10G (written from the SCRFD paper's description: ResNet-v1e backbone with basic blocks, PAFPN neck,
# heads shared across strides, 2 anchors per location, strides 8/16/32, scores + distances + 5 keypoints)
# ----------------------------------------------------------------------------------------------------------


def conv_bn_relu(cin: int, cout: int, k: int = 3, s: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, stride)
        self.conv2 = conv_bn_relu(cout, cout, 3, 1, relu=False)
        self.down = None
        if stride != 1 or cin != cout:
            # "v1d/e" shortcut: average-pool then 1x1 conv instead of a strided 1x1 conv
            pool = (
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
            )
            self.down = nn.Sequential(pool, conv_bn_relu(cin, cout, 1, 1, relu=False))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return F.relu(self.conv2(self.conv1(x)) + identity)


class ScrfdBackbone(nn.Module):
    def __init__(self, base: int = 56, blocks=(3, 4, 2, 3), planes=(56, 88, 88, 224)):
        super().__init__()
        # deep stem: three 3x3 convs (the first strided), then a max-pool -> stride 4
        self.stem = nn.Sequential(
            conv_bn_relu(3, base // 2, 3, 2),
            conv_bn_relu(base // 2, base // 2, 3, 1),
            conv_bn_relu(base // 2, base, 3, 1),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        cin = base
        for i, (n, c) in enumerate(zip(blocks, planes, strict=False)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(cin, c, stride)] + [BasicBlock(c, c, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs  # strides 4, 8, 16, 32


class PAFPN(nn.Module):
    """FPN top-down path plus the PANet bottom-up path, on the stride 8/16/32 features."""

    def __init__(self, in_channels=(88, 88, 224), out: int = 56):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out, 1) for c in in_channels)
        self.fpn = nn.ModuleList(nn.Conv2d(out, out, 3, 1, 1) for _ in in_channels)
        self.down = nn.ModuleList(nn.Conv2d(out, out, 3, 2, 1) for _ in in_channels[1:])
        self.pafpn = nn.ModuleList(nn.Conv2d(out, out, 3, 1, 1) for _ in in_channels[1:])

    def forward(self, feats):
        lat = [conv(f) for conv, f in zip(self.lateral, feats, strict=False)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        inter = [conv(x) for conv, x in zip(self.fpn, lat, strict=False)]
        for i in range(len(inter) - 1):
            inter[i + 1] = inter[i + 1] + self.down[i](inter[i])
        return [inter[0]] + [conv(x) for conv, x in zip(self.pafpn, inter[1:], strict=False)]


class ScrfdHead(nn.Module):
    """Shared (across strides) stacked convs; per anchor: 1 score logit, 4 distances, 10 keypoint offsets."""

    def __init__(self, cin: int = 56, feat: int = 80, stacked: int = 3, anchors: int = 2, strides=(8, 16, 32)):
        super().__init__()
        self.anchors = anchors
        convs = [conv_bn_relu(cin, feat)] + [conv_bn_relu(feat, feat) for _ in range(stacked - 1)]
        self.tower = nn.Sequential(*convs)
        self.cls = nn.Conv2d(feat, anchors * 1, 3, 1, 1)
        self.reg = nn.Conv2d(feat, anchors * 4, 3, 1, 1)
        self.kps = nn.Conv2d(feat, anchors * 10, 3, 1, 1)
        self.scales = nn.Parameter(torch.ones(len(strides)))  # per-stride bbox scale
        # Score control for benchmarks (see make_scrfd): logit = gain * (z - max z over the image) + peak.
        # gain 0 with peak 0 would be the plain random head; the defaults are replaced by the calibration.
        self.register_buffer("score_gain", torch.tensor(1.0))
        self.register_buffer("score_peak", torch.tensor(0.0))

    @staticmethod
    def _flat(x, c: int):
        # [1, A*c, H, W] -> [H*W*A, c], row-major over (y, x), anchors innermost
        return x.permute(0, 2, 3, 1).reshape(-1, c)

    def raw_logits(self, feats) -> list[torch.Tensor]:
        return [self._flat(self.cls(self.tower(f)), 1) for f in feats]

    def forward(self, feats):
        towers = [self.tower(f) for f in feats]
        logits = [self._flat(self.cls(t), 1) for t in towers]
        # With random weights every anchor would score about 0.5.  Scoring relative to the image's best anchor
        # makes the number of "faces" controllable: the best anchor scores sigmoid(peak), and only anchors
        # within (peak - logit(minScore)) / gain of it clear the threshold: a few faces per image.
        top = torch.amax(torch.cat([torch.amax(z, dim=0) for z in logits]))
        scores = [torch.sigmoid((z - top) * self.score_gain + self.score_peak) for z in logits]
        boxes = [self._flat(self.reg(t) * self.scales[i], 4) for i, t in enumerate(towers)]
        kpss = [self._flat(self.kps(t), 10) for t in towers]
        return (*scores, *boxes, *kpss)


class SCRFD(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = ScrfdBackbone()
        self.neck = PAFPN()
        self.head = ScrfdHead()

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)[1:]))


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Give BatchNorm layers plausible running statistics (fresh ones are identities, which lets the
    activations of a deep random net explode or vanish)."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.05)


def _calibrate_bn(model: nn.Module, batches: list[np.ndarray]) -> None:
    """Data-dependent initialisation: BatchNorm running statistics measured on sample inputs, so that every
    layer's activations are normalised and the outputs vary with the image rather than with the biases."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_parameters()
        bn.momentum = None  # cumulative average over the calibration passes
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(np.concatenate(batches)))
    model.eval()


def _synthetic_canvases(n: int, seed: int) -> list[np.ndarray]:
    """Letterboxed 640x640 "photos" (smooth colour fields, blobs, noise), normalised like SCRFD input."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (640, int(rng.integers(360, 641))) if i % 2 else (int(rng.integers(360, 641)), 640)
        low = rng.uniform(0, 255, (3, 6, 8)).astype(np.float32)
        img = F.interpolate(torch.from_numpy(low)[None], size=(h, w), mode="bicubic", align_corners=False)[0].numpy()
        yy, xx = np.mgrid[0:h, 0:w]
        for _ in range(int(rng.integers(2, 6))):  # a few ellipses ("heads") and noise
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(20, 120)
            mask = ((yy - cy) ** 2 + ((xx - cx) * 0.8) ** 2) < r * r
            img[:, mask] = rng.uniform(0, 255, (3, 1))
        img += rng.normal(0, 8, img.shape).astype(np.float32)
        img = np.clip(img, 0, 255)
        canvas = np.zeros((3, 640, 640), np.float32)
        canvas[:, :h, :w] = img
        out.append(((canvas - 127.5) / 128.0)[None].astype(np.float32))
    return out


def _nms_count(boxes: np.ndarray, scores: np.ndarray, thr: float = 0.4) -> int:
    order = scores.argsort()[::-1]
    keep = 0
    while order.size:
        i = order[0]
        keep += 1
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx2 - xx1 + 1, 0, None) * np.clip(yy2 - yy1 + 1, 0, None)
        area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
        iou = inter / (area[i] + area[order[1:]] - inter)
        order = order[1:][iou <= thr]
    return keep


def scrfd_decode_count(outs, min_score: float) -> tuple[int, int]:
    """(anchors >= min_score, faces after NMS) for one image, decoded as the protocol describes."""
    all_boxes, all_scores = [], []
    for idx, stride in enumerate((8, 16, 32)):
        scores, dist = outs[idx][:, 0], outs[idx + 3] * stride
        n = 640 // stride
        ys, xs = np.mgrid[:n, :n]
        centers = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride
        centers = np.repeat(centers, 2, axis=0)
        sel = scores >= min_score
        c, d = centers[sel], dist[sel]
        all_boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], 1))
        all_scores.append(scores[sel])
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    return int(scores.size), (_nms_count(boxes, scores) if scores.size else 0)


def make_scrfd(out: Path, faces_target: float = 3.0) -> list[Path]:
    torch.manual_seed(10)
    model = SCRFD().eval()
    calib = _synthetic_canvases(6, seed=1)
    _calibrate_bn(model, calib)
    head = model.head
    with torch.no_grad():
        # Regression and keypoint outputs: a fixed, face-like layout around each anchor centre (bias) plus a
        # small input-dependent perturbation (weights), so decoded boxes and landmarks are sane and the
        # alignment in face recognition sees non-degenerate landmarks.  Units: strides.
        for conv, bias in (
            (head.reg, [1.5, 1.8, 1.5, 2.2]),
            (head.kps, [-0.6, -0.5, 0.6, -0.5, 0.0, 0.2, -0.5, 0.9, 0.5, 0.9]),
        ):
            nn.init.normal_(conv.weight, 0.0, 1e-3)
            conv.bias.copy_(torch.tensor(bias * head.anchors, dtype=torch.float32))
        nn.init.normal_(head.cls.weight, 0.0, 0.01)
        head.cls.bias.zero_()

    # Calibrate the score gain: the best anchor of every image scores PEAK; choose the gain so that on the
    # (synthetic, letterboxed) calibration images the median number of faces left after NMS at the default
    # minScore 0.7 is about `faces_target`.
    peak = math.log(0.9 / 0.1)
    with torch.no_grad():
        head.score_peak.fill_(peak)
        raw = []
        for x in calib:
            z = torch.cat(head.raw_logits(model.neck(model.backbone(torch.from_numpy(x))[1:])))
            raw.append(z)
        spread = float(np.mean([z.std().item() for z in raw]))
        outs_fixed = [[o.numpy() for o in model(torch.from_numpy(x))] for x in calib]
        best = None
        for delta in np.linspace(0.05, 3.0, 60):  # how far below the best anchor (in units of spread) passes
            gain = (peak - math.log(0.7 / 0.3)) / (delta * spread)
            counts = []
            for z, outs in zip(raw, outs_fixed, strict=False):
                sc = torch.sigmoid((z - z.max()) * gain + peak).numpy()
                parts = np.split(sc.reshape(-1, 1), np.cumsum([o.shape[0] for o in outs[:2]]))
                counts.append(scrfd_decode_count([*parts, *outs[3:]], 0.7)[1])
            med = float(np.median(counts))
            if best is None or abs(med - faces_target) < abs(best[1] - faces_target):
                best = (gain, med, counts)
        head.score_gain.fill_(best[0])
        log(f"  score gain {best[0]:.3g}: faces per calibration image {best[2]}")
    path = out / "facial-recognition" / "buffalo_l" / "detection" / "model.onnx"
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    export_onnx(
        model,
        (torch.from_numpy(calib[0]),),
        path,
        ["input.1"],
        names,
        {"input.1": {2: "height", 3: "width"}},
    )
    return [path]


# ----------------------------------------------------------------------------------------------------------
# ArcFace iresnet50 (the "improved residual" network of the ArcFace paper: BN-Conv-BN-PReLU-Conv-BN blocks,
# stages of 3/4/14/3 blocks with 64/128/256/512 channels, BN-Dropout-FC-BN embedding head)
# ----------------------------------------------------------------------------------------------------------


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + identity


class IResNet(nn.Module):
    def __init__(self, layers=(3, 4, 14, 3), widths=(64, 128, 256, 512), emb: int = 512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        blocks: list[nn.Module] = []
        cin = 64
        for n, c in zip(layers, widths, strict=False):
            blocks.append(IBasicBlock(cin, c, 2))
            blocks += [IBasicBlock(c, c, 1) for _ in range(n - 1)]
            cin = c
        self.body = nn.Sequential(*blocks)
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(cin * 7 * 7, emb)
        self.features = nn.BatchNorm1d(emb, eps=1e-5)

    def forward(self, x):
        x = self.body(self.prelu(self.bn1(self.conv1(x))))
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def make_arcface(out: Path) -> list[Path]:
    gen = torch.Generator().manual_seed(50)
    torch.manual_seed(50)
    model = IResNet().eval()
    _randomise_bn(model, gen)
    path = out / "facial-recognition" / "buffalo_l" / "recognition" / "model.onnx"
    export_onnx(
        model,
        (torch.randn(2, 3, 112, 112),),
        path,
        ["input.1"],
        ["fc1"],
        {"input.1": {0: "batch"}, "fc1": {0: "batch"}},
    )
    return [path]


# ----------------------------------------------------------------------------------------------------------
# Verification and CPU latency
# ----------------------------------------------------------------------------------------------------------


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _time(sess, feed, runs: int) -> float:
    sess.run(None, feed)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise SystemExit(f"verification failed: {msg}")


def verify_clip(key: str, out: Path, runs: int) -> dict[str, float]:
    from tokenizers import Tokenizer

    root = out / "clip" / CLIP_SPECS[key]["dir"]
    cfg = json.loads((root / "config.json").read_text())
    pp = json.loads((root / "visual" / "preprocess_cfg.json").read_text())
    size = pp["size"][0] if isinstance(pp["size"], list) else int(pp["size"])
    dim = int(cfg["embed_dim"])
    ctx = int(cfg["text_cfg"].get("context_length", 77))
    res = {}

    vis = _session(root / "visual" / "model.onnx")
    _check([i.name for i in vis.get_inputs()] == ["image"], "visual input name")
    _check([o.name for o in vis.get_outputs()] == ["embedding"], "visual output name")
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    emb = vis.run(None, {"image": img})[0]
    _check(emb.shape == (2, dim), f"visual shape {emb.shape}")
    _check(np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-3), "visual not unit norm")
    _check(not np.allclose(emb[0], emb[1]), "visual output ignores the input")
    res["visual"] = _time(vis, {"image": img[:1]}, runs)
    del vis

    tok = Tokenizer.from_file(str(root / "textual" / "tokenizer.json"))
    tok_cfg = json.loads((root / "textual" / "tokenizer_config.json").read_text())
    pad = tok_cfg["pad_token"]
    tok.enable_padding(length=ctx, pad_token=pad, pad_id=tok.token_to_id(pad))
    tok.enable_truncation(max_length=ctx)
    ids = np.array([tok.encode("a photo of a dog on the beach").ids], dtype=np.int32)
    _check(ids.shape == (1, ctx), f"token ids shape {ids.shape}")
    txt = _session(root / "textual" / "model.onnx")
    _check([i.name for i in txt.get_inputs()] == ["text"], "textual input name")
    _check(txt.get_inputs()[0].type == "tensor(int32)", "textual input dtype")
    emb = txt.run(None, {"text": ids})[0]
    _check(emb.shape == (1, dim), f"textual shape {emb.shape}")
    _check(np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-3), "textual not unit norm")
    res["textual"] = _time(txt, {"text": ids}, runs)
    return res


def verify_scrfd(out: Path, runs: int) -> dict[str, float]:
    path = out / "facial-recognition" / "buffalo_l" / "detection" / "model.onnx"
    sess = _session(path)
    _check([i.name for i in sess.get_inputs()] == ["input.1"], "detection input name")
    x = _synthetic_canvases(1, seed=123)[0]
    outs = sess.run(None, {"input.1": x})
    expect = [
        (12800, 1),
        (3200, 1),
        (800, 1),
        (12800, 4),
        (3200, 4),
        (800, 4),
        (12800, 10),
        (3200, 10),
        (800, 10),
    ]
    _check([o.shape for o in outs] == expect, f"detection shapes {[o.shape for o in outs]}")
    counts = []
    for x in _synthetic_canvases(8, seed=777):  # held-out images
        counts.append(scrfd_decode_count(sess.run(None, {"input.1": x}), 0.7))
    log(f"  held-out images: (anchors >= 0.7, faces after NMS) = {counts}")
    anchors05 = [scrfd_decode_count(sess.run(None, {"input.1": x}), 0.5)[0] for x in _synthetic_canvases(3, seed=777)]
    log(f"  anchors >= 0.5 on 3 of them: {anchors05}")
    black = np.full((1, 3, 640, 640), -127.5 / 128.0, np.float32)
    log(f"  black image: {scrfd_decode_count(sess.run(None, {'input.1': black}), 0.7)}")
    return {"640x640": _time(sess, {"input.1": x}, runs)}


def verify_arcface(out: Path, runs: int) -> dict[str, float]:
    path = out / "facial-recognition" / "buffalo_l" / "recognition" / "model.onnx"
    sess = _session(path)
    _check([i.name for i in sess.get_inputs()] == ["input.1"], "recognition input name")
    rng = np.random.default_rng(0)
    res = {}
    for n in (1, 8):
        x = rng.uniform(-1, 1, (n, 3, 112, 112)).astype(np.float32)
        y = sess.run(None, {"input.1": x})[0]
        _check(y.shape == (n, 512), f"recognition shape {y.shape}")
        _check(bool(np.isfinite(y).all()), "recognition output not finite")
        if n > 1:
            _check(not np.allclose(y[0], y[1]), "recognition output ignores the input")
        res[f"batch{n}"] = _time(sess, {"input.1": x}, max(3, runs // (2 if n > 1 else 1)))
    return res


# ----------------------------------------------------------------------------------------------------------


MODEL_FILES = {
    "clip-b32": lambda out: [out / "clip/ViT-B-32__openai" / t / "model.onnx" for t in ("visual", "textual")],
    "siglip-b16": lambda out: [out / "clip/ViT-B-16-SigLIP__webli" / t / "model.onnx" for t in ("visual", "textual")],
    "scrfd": lambda out: [out / "facial-recognition/buffalo_l/detection/model.onnx"],
    "arcface": lambda out: [out / "facial-recognition/buffalo_l/recognition/model.onnx"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cache root to write (default {DEFAULT_OUT})")
    ap.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated subset of {','.join(ALL_MODELS)}")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check and latency measurement")
    ap.add_argument("--runs", type=int, default=10, help="timed runs per model (median reported)")
    ap.add_argument("--verify-only", action="store_true", help="do not build; check and time the models in --out")
    args = ap.parse_args(argv)

    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(ALL_MODELS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {','.join(ALL_MODELS)}")
    out: Path = args.out.resolve()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    written: list[Path] = []
    latencies: dict[str, dict[str, float]] = {}
    t_all = time.perf_counter()
    for key in wanted:
        t0 = time.perf_counter()
        if args.verify_only:
            files = MODEL_FILES[key](out)
        else:
            log(f"[{key}] building")
            if key in CLIP_SPECS:
                files = make_clip(key, out)
            else:
                files = make_scrfd(out) if key == "scrfd" else make_arcface(out)
            log(f"[{key}] written in {time.perf_counter() - t0:.1f}s")
        written += files
        if not args.no_verify:
            if key in CLIP_SPECS:
                latencies[key] = verify_clip(key, out, args.runs)
            elif key == "scrfd":
                latencies[key] = verify_scrfd(out, args.runs)
            else:
                latencies[key] = verify_arcface(out, args.runs)
            log(f"[{key}] ok; CPU latency (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in latencies[key].items()))

    log(f"\nwrote into {out} in {time.perf_counter() - t_all:.0f}s:")
    for p in written:
        log(f"  {p.stat().st_size / 1e6:8.1f} MB  {p.relative_to(out)}")
    if latencies:
        log(f"\nsingle-image CPU latency, onnxruntime, {os.cpu_count()} cores (median of {args.runs}):")
        for key, vals in latencies.items():
            log(f"  {key:11s} " + "  ".join(f"{k} {v:7.1f} ms" for k, v in vals.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
