"""The on-disk model cache: upstream's layout, downloads from Hugging Face, import, listing and removal.

Layout (identical to upstream, so an existing cache folder is reused as is)::

    <cache>/<task>/<name>/config.json
    <cache>/<task>/<name>/<type>/model.onnx  (+ side files)

A model counts as cached when its `model.onnx` exists; files placed there by an operator are used as they
are. Downloads write to temporary names and rename into place, so an interrupted download never leaves a
file that looks complete.
"""

from __future__ import annotations

import functools
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from immich_ml.errors import ModelUnavailable
from immich_ml.log import MODELS_LOG as log
from immich_ml.models.catalog import cache_name
from immich_ml.models.downloads import download_ocr_model
from immich_ml.models.hub import STAGING, download_from_hub, failure_message
from immich_ml.models.progress import LogReport, Transfers
from immich_ml.models.tasks import ModelKey, ModelType, Task
from immich_ml.settings import Settings

__all__ = ["CachedModel", "Downloader", "ModelStore"]


Downloader = Callable[[ModelKey, Path, Callable[[int], None]], None]
"""Fetches one model's files into its model directory (`<cache>/<task>/<name>/<type>`); tells the third
argument the number of bytes to expect when it knows it."""


@dataclass(frozen=True)
class CachedModel:
    """One model type found in the cache, for `immich-ml models list`."""

    task: str
    name: str
    type: str
    size_bytes: int
    path: Path


class ModelStore:
    """Finds, downloads, imports and removes model files under the cache folder."""

    def __init__(self, settings: Settings, transfers: Transfers | None = None) -> None:
        self.root = settings.cache_folder
        self.settings = settings
        self.transfers = transfers or Transfers([LogReport()])
        """Downloads in progress, reported to the log (or a terminal bar) and `/health`."""
        ocr = functools.partial(download_ocr_model, base_url=settings.ocr_model_base_url)
        self._downloaders: dict[Task, Downloader] = {Task.OCR: ocr}

    def model_root(self, key: ModelKey) -> Path:
        """`<cache>/<task>/<name>`: where one model's types and shared config live."""
        return self.root / key.task / cache_name(key)

    def model_dir(self, key: ModelKey) -> Path:
        """`<cache>/<task>/<name>/<type>`."""
        return self.model_root(key) / key.type

    def is_cached(self, key: ModelKey) -> bool:
        """Whether the model's ONNX file is present."""
        return (self.model_dir(key) / "model.onnx").is_file()

    def ensure(self, key: ModelKey) -> Path:
        """Return the model directory, downloading the model first if it is not cached. Blocking."""
        model_dir = self.model_dir(key)
        if self.is_cached(key):
            return model_dir
        log.info("downloading %s into %s", key, model_dir)
        download = self._downloaders.get(key.task, functools.partial(download_from_hub, self.settings))
        arriving = [model_dir, self.model_root(key) / STAGING / key.type]
        try:
            with self.transfers.watch(str(key), arriving) as transfer:
                download(key, model_dir, transfer.expect)
        except ModelUnavailable:
            raise
        except Exception as error:
            raise ModelUnavailable(self._unavailable_message(key, error)) from error
        if not self.is_cached(key):
            raise ModelUnavailable(self._unavailable_message(key, "the download has no model.onnx"))
        return model_dir

    def remove_type(self, key: ModelKey) -> None:
        """Delete one model type's files (after a failed load), leaving other types alone."""
        model_dir = self.model_dir(key)
        if model_dir.is_symlink() or model_dir.is_file():
            model_dir.unlink()
        elif model_dir.exists():
            shutil.rmtree(model_dir)
        log.info("cleared cache directory for %s", key)

    def remove(self, task: Task, name: str) -> bool:
        """Delete every type of a model; returns whether anything was there."""
        target = self.root / task / name
        if not target.exists():
            return False
        shutil.rmtree(target)
        return True

    def cached(self) -> list[CachedModel]:
        """Every cached model type, with its size on disk."""
        found = []
        for model_file in sorted(self.root.glob("*/*/*/model.onnx")):
            type_dir = model_file.parent
            task_dir = type_dir.parent.parent
            if task_dir.name not in {t.value for t in Task}:
                continue
            found.append(
                CachedModel(task_dir.name, type_dir.parent.name, type_dir.name, _tree_size(type_dir), type_dir)
            )
        return found

    def import_models(self, source: Path) -> list[Path]:
        """Copy models from a folder or tar archive laid out like the cache (`<task>/<name>/…`).

        Each model lands under a temporary name first and is renamed into place, replacing any older copy.
        """
        with tempfile.TemporaryDirectory(dir=self._staging_parent()) as staging_name:
            staging = Path(staging_name)
            if source.is_dir():
                tree = source
            elif tarfile.is_tarfile(source):
                with tarfile.open(source) as archive:
                    archive.extractall(staging / "unpacked", filter="data")
                tree = staging / "unpacked"
            else:
                raise ValueError(f"{source} is neither a folder nor a tar archive")
            imported = []
            for model_root in _model_roots(tree):
                task, name = model_root.parent.name, model_root.name
                target = self.root / task / name
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = staging / f"{task}-{name}"
                shutil.copytree(model_root, partial)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(partial, target)
                imported.append(target)
            if not imported:
                raise ValueError(f"no models found in {source} (expected <task>/<name>/<type>/model.onnx)")
            return imported

    def _staging_parent(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def _unavailable_message(self, key: ModelKey, reason: BaseException | str) -> str:
        return failure_message(self.settings, key, self.model_dir(key) / "model.onnx", reason)


def _model_roots(tree: Path) -> Iterator[Path]:
    seen = set()
    for model_file in sorted(tree.glob("**/model.onnx")):
        type_dir = model_file.parent
        if type_dir.name not in {t.value for t in ModelType}:
            continue
        model_root = type_dir.parent
        if model_root.parent.name in {t.value for t in Task} and model_root not in seen:
            seen.add(model_root)
            yield model_root


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
