"""Query text for CLIP text encoders: cleaning, nllb language prefixes, and tokenisation."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from immich_ml.log import MODELS_LOG as log
from immich_ml.models.files import read_json

__all__ = ["TextTokenizer", "clean_text", "flores_code"]


_PUNCTUATION = str.maketrans("", "", string.punctuation)

# Immich UI locales (Weblate codes, hyphenated) to the FLORES-200 codes nllb-clip was trained with.
_FLORES = {
    "af": "afr_Latn",
    "ar": "arb_Arab",
    "az": "azj_Latn",
    "be": "bel_Cyrl",
    "bg": "bul_Cyrl",
    "ca": "cat_Latn",
    "cs": "ces_Latn",
    "da": "dan_Latn",
    "de": "deu_Latn",
    "el": "ell_Grek",
    "en": "eng_Latn",
    "es": "spa_Latn",
    "et": "est_Latn",
    "fa": "pes_Arab",
    "fi": "fin_Latn",
    "fr": "fra_Latn",
    "he": "heb_Hebr",
    "hi": "hin_Deva",
    "hr": "hrv_Latn",
    "hu": "hun_Latn",
    "hy": "hye_Armn",
    "id": "ind_Latn",
    "it": "ita_Latn",
    "ja": "jpn_Hira",
    "kmr": "kmr_Latn",
    "ko": "kor_Hang",
    "lb": "ltz_Latn",
    "lt": "lit_Latn",
    "lv": "lav_Latn",
    "mfa": "zsm_Latn",
    "mk": "mkd_Cyrl",
    "mn": "khk_Cyrl",
    "mr": "mar_Deva",
    "ms": "zsm_Latn",
    "nb-NO": "nob_Latn",
    "nn": "nno_Latn",
    "nl": "nld_Latn",
    "pl": "pol_Latn",
    "pt-BR": "por_Latn",
    "pt": "por_Latn",
    "ro": "ron_Latn",
    "ru": "rus_Cyrl",
    "sk": "slk_Latn",
    "sl": "slv_Latn",
    "sr-Cyrl": "srp_Cyrl",
    "sv": "swe_Latn",
    "ta": "tam_Taml",
    "te": "tel_Telu",
    "th": "tha_Thai",
    "tr": "tur_Latn",
    "uk": "ukr_Cyrl",
    "ur": "urd_Arab",
    "vi": "vie_Latn",
    "zh-CN": "zho_Hans",
    "zh-Hans": "zho_Hans",
    "zh-SIMPLIFIED": "zho_Hans",
    "zh-TW": "zho_Hant",
    "zh-Hant": "zho_Hant",
}


def flores_code(language: str) -> str:
    """The FLORES-200 prefix for a UI language; accepts `pt-BR` and the older `pt_BR` forms."""
    code = language.replace("_", "-")
    if code in _FLORES:
        return _FLORES[code]
    if (base := code.split("-")[0]) in _FLORES:
        return _FLORES[base]
    log.warning("Language '%s' not found, defaulting to 'en'", language)
    return _FLORES["en"]


def clean_text(text: str, *, canonicalize: bool) -> str:
    """Collapse whitespace; for SigLIP-style models also drop ASCII punctuation and lowercase."""
    if canonicalize:
        text = text.translate(_PUNCTUATION).lower()
    return " ".join(text.split())


class TextTokenizer:
    """A Hugging Face tokenizer padded and truncated to the model's context length."""

    def __init__(self, textual_dir: Path, context_length: int) -> None:
        self.context_length = context_length
        read_json(textual_dir / "tokenizer.json")  # damage is named; a valid file parses again below
        self._tokenizer = Tokenizer.from_file(str(textual_dir / "tokenizer.json"))
        config = read_json(textual_dir / "tokenizer_config.json")
        pad_token = config["pad_token"]
        if isinstance(pad_token, dict):  # some exports store an AddedToken object
            pad_token = pad_token["content"]
        pad_id = self._tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} of {textual_dir} is not in its tokenizer")
        self._tokenizer.enable_padding(length=context_length, pad_token=pad_token, pad_id=pad_id)
        self._tokenizer.enable_truncation(max_length=context_length)

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, int32 of length `context_length`."""
        encoding = self._tokenizer.encode(text)
        return (np.asarray(encoding.ids, dtype=np.int32), np.asarray(encoding.attention_mask, dtype=np.int32))
