"""Shared fixtures: a temporary model cache with generated models, settings, and the real app over HTTP."""

from __future__ import annotations

import asyncio
import inspect
import shutil
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient

from immich_ml.cpus import CpuBudget
from immich_ml.http.app import create_app
from immich_ml.settings import Settings
from tests import modelgen

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]

CLIP = "ViT-B-32__openai"
TWO_CPUS = CpuBudget(affinity=2, quota=None)
"""The usable CPUs of `make_client`'s app: CI's 2 cores, whatever machine runs the tests."""
"""The CLIP model name the generated caches use."""
VISUAL = '{"clip":{"visual":{"modelName":"ViT-B-32__openai"}}}'
"""`entries` asking for a CLIP image embedding."""
TEXTUAL = '{"clip":{"textual":{"modelName":"ViT-B-32__openai"}}}'
"""`entries` asking for a CLIP text embedding."""


def installed(command: str) -> Path:
    """The installed `command`: beside the running interpreter (a virtual environment), else on PATH (the Nix
    build's check phase puts its output's bin/ there, next to an interpreter that has no scripts of ours)."""
    beside = Path(sysconfig.get_path("scripts")) / command
    found = beside if beside.is_file() else shutil.which(command)
    if found is None:
        pytest.fail(f"{command} is not installed beside {sys.executable} nor on PATH: install the package")
    return Path(found)


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
            "cpus": TWO_CPUS,
            "model_ttl_poll_s": 0,
            "hf_offline": True,
        }  # tests never reach the network; store tests use a local fake hub
        settings = Settings(**{**defaults, **overrides})
        app = create_app(settings)  # served as the daemon serves it: bodies inflated by http/inflate.py
        return await aiohttp_client(app, server_kwargs={"auto_decompress": False})  # type: ignore[no-any-return]

    return start


async def predict(
    client: TestClient[Any, Any], entries: str, *, image: bytes | None = None, text: str | None = None
) -> tuple[int, Any]:
    """POST /predict the way the Immich server does; the status and the decoded JSON body."""
    async with client.post("/predict", data=predict_form(entries, image=image, text=text)) as resp:
        return resp.status, await resp.json()


async def predict_ok(
    client: TestClient[Any, Any], entries: str, *, image: bytes | None = None, text: str | None = None
) -> Any:
    """The JSON body of a /predict that must succeed."""
    status, body = await predict(client, entries, image=image, text=text)
    assert status == 200, body
    return body


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], what: str, *, timeout_s: float = 60.0, interval_s: float = 0.0
) -> None:
    """Poll `condition` (plain or async) until it holds; after `timeout_s` fail naming `what`, so a poll
    never hangs the suite."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


def predict_form(entries: str, *, image: bytes | None = None, text: str | None = None) -> FormData:
    """A multipart body shaped like the Immich server's."""
    form = FormData()
    form.add_field("entries", entries)
    if image is not None:
        form.add_field("image", image, filename="blob", content_type="application/octet-stream")
    if text is not None:
        form.add_field("text", text)
    return form
