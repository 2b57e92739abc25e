"""CLIP for smart search: image and text encoders (OpenCLIP, SigLIP, M-CLIP, nllb-clip)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from immich_ml.models.files import read_json
from immich_ml.pipelines.base import InferenceModel, Payload, vector_string
from immich_ml.pipelines.clip.tokenizer import TextTokenizer, clean_text, flores_code
from immich_ml.settings import Preprocessing

__all__ = ["ClipTextual", "ClipVisual", "resize_and_crop"]

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def resize_and_crop(image: Image.Image, size: int, *, resample: Image.Resampling, squash: bool) -> Image.Image:
    """Resize to `size`×`size`: squash directly, or shorter side to `size` then centre crop (upstream's way)."""
    if squash:
        return image.resize((size, size), resample=resample)
    width, height = image.size
    if width < height:
        new_size = (size, int(height / width * size))
    else:
        new_size = (int(width / height * size), size)
    image = image.resize(new_size, resample=resample)
    left = int(new_size[0] / 2 - size / 2)
    top = int(new_size[1] / 2 - size / 2)
    return image.crop((left, top, left + size, top + size))


class ClipVisual(InferenceModel):
    """Image encoder: `preprocess_cfg.json` drives resizing and normalisation; output is unit-norm."""

    shares_threads = True

    def configure(self) -> None:
        config = read_json(self.model_dir / "preprocess_cfg.json")
        size = config["size"]
        self.size = int(size[0] if isinstance(size, list) else size)
        self.mean = np.asarray(config["mean"], dtype=np.float32)
        self.std = np.asarray(config["std"], dtype=np.float32)
        if self.runtime.settings.preprocessing is Preprocessing.LATEST:
            self.resample = _RESAMPLE[config.get("interpolation", "bicubic")]
            mode = config.get("resize_mode", "shortest")
            if mode not in ("shortest", "squash"):
                raise ValueError(f"{self.model_dir}: unsupported resize_mode {mode!r}")
            self.squash = mode == "squash"
        else:  # the released upstream ignores both settings: bicubic, shortest side, centre crop
            self.resample, self.squash = Image.Resampling.BICUBIC, False
        self.input_name = self._require_session().input_names[0]
        self.batcher = self.add_batcher()

    @property
    def min_image_side(self) -> int:
        return self.size

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """The normalised CHW float32 array the graph takes for one image."""
        image = resize_and_crop(image, self.size, resample=self.resample, squash=self.squash)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        return ((pixels - self.mean) / self.std).transpose(2, 0, 1)

    async def predict(self, payload: Payload, options: Mapping[str, Any], dependency: Any = None) -> str:
        image = self.image_of(payload)
        # On its way while pre-processed: a batch starting meanwhile gathers it (two clients' images run together).
        preprocessing = asyncio.get_running_loop().run_in_executor(self.pool, self.feeds, image)
        (embedding, *_) = await self.batcher.submit_prepared(preprocessing)
        return vector_string(embedding[0])

    def feeds(self, image: Image.Image) -> dict[str, np.ndarray]:
        """The graph's input for one image (a batch of one)."""
        return {self.input_name: self.preprocess(image)[None]}

    def warmup_payload(self) -> Payload:
        return Image.new("RGB", (self.size, self.size), (128, 128, 128))


class ClipTextual(InferenceModel):
    """Text encoder: OpenCLIP (`text`) or M-CLIP (`input_ids` + `attention_mask`), told apart by the graph."""

    interactive = True

    def configure(self) -> None:
        config = read_json(self.model_dir.parent / "config.json")
        text_cfg = config.get("text_cfg", {})
        context_length = int(text_cfg.get("context_length", 77))
        self.canonicalize = text_cfg.get("tokenizer_kwargs", {}).get("clean") == "canonicalize"
        self.tokenizer = TextTokenizer(self.model_dir, context_length)
        self.input_names = self._require_session().input_names
        self.is_mclip = "input_ids" in self.input_names
        self.uses_language = self.key.name.startswith("nllb")
        self.batcher = self.add_batcher()

    def feeds(self, text: str, language: str | None) -> dict[str, np.ndarray]:
        """The graph's inputs for one query: cleaned, with the nllb language prefix where it applies, encoded
        (token ids, plus the attention mask for M-CLIP), as one row."""
        text = clean_text(text, canonicalize=self.canonicalize)
        if self.uses_language and language:
            text = flores_code(language) + text
        ids, mask = self.tokenizer.encode(text)
        if self.is_mclip:
            return {"input_ids": ids[None], "attention_mask": mask[None]}
        return {self.input_names[0]: ids[None]}

    async def predict(self, payload: Payload, options: Mapping[str, Any], dependency: Any = None) -> str:
        text = self.text_of(payload)
        language = options.get("language")
        language = language if isinstance(language, str) else None
        feeds = await asyncio.get_running_loop().run_in_executor(self.pool, self.feeds, text, language)
        (embedding, *_) = await self.batcher.submit(feeds)
        return vector_string(embedding[0])

    def warmup_payload(self) -> Payload:
        return "a photo of a cat"
