"""The model names upstream supports per task, and where each model's files come from."""

from __future__ import annotations

import re

from immich_ml.models.tasks import TASK_TYPES, ModelKey, ModelType, Task

__all__ = [
    "OCR_LANGUAGES",
    "cache_name",
    "clean_name",
    "is_known",
    "known_names",
    "ocr_language",
    "served_key",
    "task_of",
]

_SEPARATORS = re.compile(r"[:\\/]")


def clean_name(model_name: str) -> str:
    """Normalise a model name like upstream: last path part, `:`/`\\`/`/` → `_`, dots removed."""
    return _SEPARATORS.sub("_", model_name.split("/")[-1]).replace(".", "")


_OPENCLIP = frozenset(
    """
RN101__openai RN101__yfcc15m RN50__cc12m RN50__openai RN50__yfcc15m RN50x16__openai RN50x4__openai
RN50x64__openai ViT-B-16-SigLIP-256__webli ViT-B-16-SigLIP-384__webli ViT-B-16-SigLIP-512__webli
ViT-B-16-SigLIP-i18n-256__webli ViT-B-16-SigLIP__webli ViT-B-16-plus-240__laion400m_e31
ViT-B-16-plus-240__laion400m_e32 ViT-B-16__laion400m_e31 ViT-B-16__laion400m_e32 ViT-B-16__openai
ViT-B-32__laion2b-s34b-b79k ViT-B-32__laion2b_e16 ViT-B-32__laion400m_e31 ViT-B-32__laion400m_e32
ViT-B-32__openai ViT-H-14-378-quickgelu__dfn5b ViT-H-14-quickgelu__dfn5b ViT-H-14__laion2b-s32b-b79k
ViT-L-14-336__openai ViT-L-14-quickgelu__dfn2b ViT-L-14__laion2b-s32b-b82k ViT-L-14__laion400m_e31
ViT-L-14__laion400m_e32 ViT-L-14__openai ViT-L-16-SigLIP-256__webli ViT-L-16-SigLIP-384__webli
ViT-SO400M-14-SigLIP-384__webli ViT-g-14__laion2b-s12b-b42k XLM-Roberta-Base-ViT-B-32__laion5b_s13b_b90k
XLM-Roberta-Large-ViT-H-14__frozen_laion5b_s13b_b90k nllb-clip-base-siglip__mrl nllb-clip-base-siglip__v1
nllb-clip-large-siglip__mrl nllb-clip-large-siglip__v1 ViT-B-16-SigLIP2__webli ViT-B-32-SigLIP2-256__webli
ViT-L-16-SigLIP2-256__webli ViT-L-16-SigLIP2-384__webli ViT-L-16-SigLIP2-512__webli
ViT-SO400M-14-SigLIP2-378__webli ViT-SO400M-14-SigLIP2__webli ViT-SO400M-16-SigLIP2-256__webli
ViT-SO400M-16-SigLIP2-384__webli ViT-SO400M-16-SigLIP2-512__webli ViT-gopt-16-SigLIP2-256__webli
ViT-gopt-16-SigLIP2-384__webli
""".split()
)

MCLIP = frozenset(
    "LABSE-Vit-L-14 XLM-Roberta-Large-Vit-B-16Plus XLM-Roberta-Large-Vit-B-32 XLM-Roberta-Large-Vit-L-14".split()
)

_INSIGHTFACE = frozenset("antelopev2 buffalo_s buffalo_m buffalo_l".split())

OCR_LANGUAGES = ("CH", "EL", "EN", "ESLAV", "KOREAN", "LATIN", "TH")
_OCR_BASES = frozenset({"PP-OCRv5_server", "PP-OCRv5_mobile"})
_OCR_MOBILE_ONLY = frozenset(OCR_LANGUAGES) - {"CH"}


def ocr_language(name: str) -> tuple[str, str]:
    """Split an OCR model name into (language, base name): `EN__PP-OCRv5_mobile` → (`EN`, `PP-OCRv5_mobile`)."""
    language, sep, base = name.partition("__")
    return (language, base) if sep else ("CH", name)


def is_known(key: ModelKey) -> bool:
    """Whether upstream supports this model name for this task and type."""
    if key.type not in TASK_TYPES[key.task]:
        return False
    if key.task is Task.CLIP:
        return key.name in _OPENCLIP or key.name in MCLIP
    if key.task is Task.FACIAL_RECOGNITION:
        return key.name in _INSIGHTFACE
    language, base = ocr_language(key.name)
    if base not in _OCR_BASES or language not in OCR_LANGUAGES:
        return False
    return not (language in _OCR_MOBILE_ONLY and base.endswith("_server"))


def known_names(task: Task) -> list[str]:
    """The model names upstream supports for `task`, sorted (OCR: each language's name once)."""
    if task is Task.CLIP:
        return sorted(_OPENCLIP | MCLIP)
    if task is Task.FACIAL_RECOGNITION:
        return sorted(_INSIGHTFACE)
    return sorted(_OCR_BASES) + [f"{language}__PP-OCRv5_mobile" for language in sorted(_OCR_MOBILE_ONLY)]


def task_of(name: str) -> Task:
    """The task a supported model name belongs to (CLIP for names this catalog does not know)."""
    if name in _INSIGHTFACE:
        return Task.FACIAL_RECOGNITION
    if ocr_language(name)[1] in _OCR_BASES:
        return Task.OCR
    return Task.CLIP


def cache_name(key: ModelKey) -> str:
    """The folder name under `<cache>/<task>/`: OCR detection is shared between languages."""
    if key.task is Task.OCR and key.type is ModelType.DETECTION:
        return ocr_language(key.name)[1]
    return key.name


def served_key(task: Task, model_type: ModelType, model_name: str) -> ModelKey:
    """The loaded model that serves a requested name: cleaned like upstream, and models that share files
    share one instance (OCR detection is the same for every language)."""
    key = ModelKey(task, model_type, clean_name(model_name))
    return ModelKey(task, model_type, cache_name(key))
