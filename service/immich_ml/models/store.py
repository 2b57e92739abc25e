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

from immich_ml.causes import cause_of
from immich_ml.errors import ModelUnavailable
from immich_ml.log import MODELS_LOG as log
from immich_ml.models.catalog import cache_name
from immich_ml.models.downloads import download_ocr_model
from immich_ml.models.hub import STAGING, download_from_hub
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

    def can_download(self, key: ModelKey) -> bool:
        """Whether missing or damaged files of `key` may be fetched (not with HF_HUB_OFFLINE, for any task)."""
        return not self.settings.hf_offline

    def ensure(self, key: ModelKey) -> Path:
        """Return the model directory, downloading the model first if it is not cached. Blocking."""
        model_dir = self.model_dir(key)
        if self.is_cached(key):
            return model_dir
        if not self.can_download(key):
            raise self._unavailable(key, "HF_HUB_OFFLINE is set, so nothing is downloaded")
        log.info("downloading %s into %s", key, model_dir)
        self._fetch(key, None)
        if not self.is_cached(key):
            raise self._unavailable(key, "the download has no model.onnx")
        return model_dir

    def repair(self, key: ModelKey, file: str) -> None:
        """Download one damaged file of a cached model (`visual/model.onnx`) again. Blocking.

        The damaged copy is renamed aside first and put back if the download fails, so nothing is lost; a
        read-only cache raises the `OSError` of that rename before anything is fetched.
        """
        target = self.model_root(key) / file
        aside = target.with_name(target.name + ".damaged")
        if target.exists():
            os.replace(target, aside)
        try:
            self._fetch(key, file)
        except BaseException:
            if aside.exists() and not target.exists():
                os.replace(aside, target)
            raise
        aside.unlink(missing_ok=True)
        log.info("downloaded %s of %s again", file, key)

    def redact(self, text: str) -> str:
        """`text` with the cache folder's absolute path replaced by `<cache>` (for replies to clients)."""
        return text.replace(str(self.root), "<cache>")

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
                    _extract(archive, staging / "unpacked")
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

    def _fetch(self, key: ModelKey, file: str | None) -> None:
        """Download `file` of `key` (all of its files for None), watched by `transfers`; every failure is
        `ModelUnavailable`."""
        try:
            if file is not None and key.task not in self._downloaders:
                self._download_file_from_hub(key, file)
                return
            download = self._downloaders.get(key.task, functools.partial(download_from_hub, self.settings))
            arriving = [self.model_dir(key), self.model_root(key) / STAGING / key.type]
            with self.transfers.watch(str(key), arriving) as transfer:
                download(key, self.model_dir(key), transfer.expect)
        except ModelUnavailable:
            raise
        except Exception as error:
            raise self._unavailable(key, error) from error

    def _download_file_from_hub(self, key: ModelKey, file: str) -> None:
        from huggingface_hub import hf_hub_download  # imported lazily: it is slow to import

        hf_hub_download(
            f"{self.settings.hf_organization}/{key.name}",
            file,
            revision=self.settings.hf_revision,
            local_dir=self.model_root(key),
            endpoint=self.settings.hf_endpoint,
        )

    def _unavailable(self, key: ModelKey, reason: BaseException | str) -> ModelUnavailable:
        """One line: which model, why it could not be fetched, what fixes it; the cache path in the log only."""
        from huggingface_hub.errors import RepositoryNotFoundError  # imported lazily: it is slow to import

        pinned = key.task in self._downloaders
        repo = f"{self.settings.hf_organization}/{key.name}"
        hub = self.settings.hf_endpoint or "Hugging Face"
        source = "its pinned URL" if pinned else f"{hub} ({repo})"
        pull = f"or run `immich-ml models pull {key.name}` on a connected machine and `immich-ml models import` here"
        if self.settings.hf_offline:
            cause, fix = "HF_HUB_OFFLINE is set", f"unset HF_HUB_OFFLINE, {pull}"
        elif isinstance(reason, RepositoryNotFoundError):
            cause = f"there is no repository {repo}"
            fix = "check the model name (docs/models.md) and MACHINE_LEARNING_MODEL_ORGANIZATION"
        else:
            cause = reason if isinstance(reason, str) else cause_of(reason)
            mirror = "MACHINE_LEARNING_OCR_MODEL_BASE_URL" if pinned else "HF_ENDPOINT"
            fix = f"let this host reach {'it' if pinned else hub} ({mirror} names a mirror), {pull}"
        model = f"Model '{key.name}' ({key.task} {key.type})"
        download = f"could not be downloaded from {source}"
        return ModelUnavailable(
            f"{model} is not cached and {download}: {self.redact(cause)}. Fix: {fix}.",
            log_detail=f"{model} is not cached at {self.model_dir(key) / 'model.onnx'} and {download}: {cause}. "
            f"Fix: {fix}.",
        )


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


def _extract(archive: tarfile.TarFile, target: Path) -> None:
    """Unpack plain files and folders, refusing any member that is something else or names a place outside
    `target` (Python 3.11.0-3.11.3, e.g. Debian 12's, has no extraction filters; where there are, "data" too)."""
    for member in archive.getmembers():
        name = Path(member.name)
        if not (member.isfile() or member.isdir()) or name.is_absolute() or ".." in name.parts:
            raise ValueError(f"refusing archive member {member.name!r}: only plain files and folders are imported")
    if hasattr(tarfile, "data_filter"):
        archive.extractall(target, filter="data")
    else:
        archive.extractall(target)


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
