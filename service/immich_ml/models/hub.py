"""Hugging Face downloads: one model type's files and the shared config, into upstream's cache layout."""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

from immich_ml.models.tasks import ModelKey
from immich_ml.settings import Settings

__all__ = ["STAGING", "download_from_hub"]

_IGNORED = ["*.armnn", "*.rknn"]

STAGING = Path(".cache") / "huggingface" / "download"
"""Where huggingface_hub keeps partial files (`*.incomplete`) under `local_dir`, by path in the repository."""


def download_from_hub(settings: Settings, key: ModelKey, model_dir: Path, expect: Callable[[int], None]) -> None:
    """Fetch `<org>/<name>`'s `<type>/*` and `config.json` into `model_dir`'s parent. Blocking.

    `expect` is told the size of those files first (from the repository's file list).
    """
    from huggingface_hub import snapshot_download  # imported lazily: it is slow to import
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()  # its bars would interleave with ours and the log; progress.py reports instead
    repo = f"{settings.hf_organization}/{key.name}"
    patterns = [f"{key.type}/*", "config.json"]
    if not settings.hf_offline:
        expect(_size(settings, repo, patterns))
    snapshot_download(
        repo,
        revision=settings.hf_revision,
        local_dir=model_dir.parent,
        allow_patterns=patterns,
        ignore_patterns=_IGNORED,
        endpoint=settings.hf_endpoint,
        local_files_only=settings.hf_offline,
    )


def _size(settings: Settings, repo: str, patterns: list[str]) -> int:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    listing = HfApi(endpoint=settings.hf_endpoint).list_repo_tree(repo, revision=settings.hf_revision, recursive=True)
    return sum(
        entry.size
        for entry in listing
        if isinstance(entry, RepoFile)
        and any(fnmatch(entry.path, pattern) for pattern in patterns)  # what snapshot_download selects
        and not any(fnmatch(entry.path, pattern) for pattern in _IGNORED)
    )
