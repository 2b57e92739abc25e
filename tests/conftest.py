"""Shared fixtures: a temporary model cache with generated models, settings, and the real app over HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient

from immich_ml.http.app import create_app
from immich_ml.settings import Settings
from tests import modelgen

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """An empty model cache folder."""
    folder = tmp_path / "cache"
    folder.mkdir()
    return folder


@pytest.fixture
def clip_cache(cache: Path) -> Path:
    """A cache holding a generated ViT-B-32__openai (visual and textual)."""
    modelgen.write_clip(cache, "ViT-B-32__openai")
    return cache


@pytest.fixture
def make_client(aiohttp_client: Any, cache: Path) -> ClientFactory:
    """Start the real application on a loopback port with settings for the test cache."""

    async def start(**overrides: Any) -> TestClient[Any, Any]:
        defaults = {
            "cache_folder": cache,
            "request_threads": 2,
            "model_ttl_poll_s": 0,
            "hf_offline": True,
        }  # tests never reach the network; store tests use a local fake hub
        settings = Settings(**{**defaults, **overrides})
        return await aiohttp_client(create_app(settings))  # type: ignore[no-any-return]

    return start


def predict_form(entries: str, *, image: bytes | None = None, text: str | None = None) -> FormData:
    """A multipart body shaped like the Immich server's."""
    form = FormData()
    form.add_field("entries", entries)
    if image is not None:
        form.add_field("image", image, filename="blob", content_type="application/octet-stream")
    if text is not None:
        form.add_field("text", text)
    return form
