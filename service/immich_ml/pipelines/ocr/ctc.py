"""Reading the PP-OCR recogniser's output: greedy CTC decoding by rapidocr's own `CTCLabelDecode`, applied exactly
as its `TextRecognizer` applies it, so texts and scores are identical to upstream Immich's.

The recogniser's batcher calls `read_lines` on each chunk's outputs right after its run (in the batcher's
thread), so an output (a probability per character of the alphabet per step) is gone before the next run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode

__all__ = ["Recognised", "ctc_decode", "read_lines", "text_decoder"]

FloatArray = NDArray[np.float32]


@dataclass(frozen=True)
class Recognised:
    """One line's text and its score (mean confidence of the kept CTC steps; 0 when nothing was read)."""

    text: str
    score: float


def text_decoder(metadata: dict[str, str], charset_file: Path) -> CTCLabelDecode:
    """rapidocr's CTC decoder for the model's alphabet: the ONNX metadata key `character`, else `charset_file`
    (one character per line); the decoder adds the blank (index 0) and the space (last)."""
    if characters := metadata.get("character"):
        return CTCLabelDecode(character=characters.splitlines())
    if charset_file.is_file():
        return CTCLabelDecode(character_path=charset_file)
    raise ValueError(f"the recognition model has no 'character' metadata and there is no {charset_file}")


def _as_probabilities(output: NDArray[np.floating]) -> FloatArray:
    """The output as float32 probabilities: a softmax is applied when rows are not already distributions."""
    values = np.asarray(output, dtype=np.float32)
    sums = values.sum(axis=-1)
    if values.min(initial=0.0) >= 0 and np.allclose(sums, 1.0, atol=1e-2):
        return values
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)  # type: ignore[no-any-return]


def ctc_decode(output: NDArray[np.floating], decoder: CTCLabelDecode) -> list[Recognised]:
    """Greedy CTC over an [n,T,C] output (probabilities in any float dtype, or raw logits) by rapidocr's
    decoder: repeats collapse, then blanks go; the score is the mean of the kept steps' probabilities
    (each rounded to 5 decimals, as rapidocr does). A non-finite score becomes 0, so the line is dropped."""
    lines, _ = decoder(_as_probabilities(output))
    return [Recognised(str(text), float(score) if math.isfinite(score) else 0.0) for text, score in lines]


def read_lines(decoder: CTCLabelDecode, outputs: list[np.ndarray]) -> list[Recognised]:
    """A chunk's lines from its run's outputs (the first is the [n,T,C] output), one per row."""
    (probabilities, *_) = outputs
    return ctc_decode(probabilities, decoder)
