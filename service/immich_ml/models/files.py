"""Reading a model's files, where damage is told apart from everything else: an undecodable JSON file, an
ONNX file that does not parse, or a missing file raise `CorruptModel` naming the file; other failures
(a configuration the code does not support, a provider or GPU-memory error) are not damage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onnxruntime.capi.onnxruntime_pybind11_state import InvalidProtobuf, NoSuchFile

from immich_ml.errors import CorruptModel

__all__ = ["onnx_damage", "read_json", "read_text"]


def read_text(path: Path) -> str:
    """A model's text file; missing or not UTF-8 is damage."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptModel(str(path), "the file is missing") from None
    except UnicodeDecodeError as error:
        raise CorruptModel(str(path), f"not UTF-8 text ({error.reason})") from None


def read_json(path: Path) -> Any:
    """A model's JSON file (configs, tokenisers); undecodable is damage."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CorruptModel(str(path), f"not valid JSON ({error})") from None


@contextmanager
def onnx_damage(path: Path) -> Iterator[None]:
    """Turn ONNX Runtime's "cannot parse" and "no such file" errors for `path` into `CorruptModel`."""
    try:
        yield
    except (InvalidProtobuf, NoSuchFile) as error:
        raise CorruptModel(str(path), f"ONNX Runtime cannot read it ({type(error).__name__})") from error
