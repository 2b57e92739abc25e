"""Check 7: the ML API answers `/ping`, is ready on `/health`, and serves a real CLIP `/predict`."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from PIL import Image

from immich_ml.gpu_check.context import Context
from immich_ml.gpu_check.results import Result

__all__ = ["DEFAULT_CLIP", "check_api"]

DEFAULT_CLIP = "ViT-B-32__openai"
_IMAGE_SIZE = (64, 48)
_CPU = "CPUExecutionProvider"


class _Client:
    """A minimal HTTP client for one base URL; proxies are ignored (the service is local or on the LAN)."""

    def __init__(self, base: str, timeout_s: float) -> None:
        self.base = base.rstrip("/")
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, path: str, body: bytes | None = None, content_type: str = "") -> tuple[int, bytes]:
        """Status and body; non-2xx statuses are returned, network errors raise OSError."""
        request = urllib.request.Request(self.base + path, data=body, method="POST" if body else "GET")
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read()

    def json(self, path: str) -> tuple[int, Any]:
        status, body = self.request(path)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, None


def check_api(ctx: Context) -> Result:
    """7: `/ping`, `/health` readiness, a CLIP `/predict` with a generated JPEG, and the provider it used."""
    url = ctx.options.url
    client = _Client(url, ctx.options.timeout_s)
    unreachable_fix = (
        "start the service (systemctl start immich-ml) or point --url at it "
        "(it listens on IMMICH_HOST:IMMICH_PORT, default 127.0.0.1:3003)"
    )
    try:
        status, body = client.request("/ping")
        if status != 200 or body.strip().strip(b'"') != b"pong":
            return Result.failed(
                f"GET {url}/ping answered {status} {body[:60]!r}, not pong",
                "is --url an immich machine-learning service?",
            )
        status, health = client.json("/health")
        if status == 503 or (isinstance(health, dict) and health.get("ready") is False):
            return Result.failed(
                "/ping pong, but /health says not ready (models still loading?)",
                f"wait for startup; journalctl -u {ctx.options.unit} -b -f shows progress",
            )
        model = ctx.options.model or _clip_model(health) or DEFAULT_CLIP
        started = time.perf_counter()
        status, answer = _predict(client, model)
        elapsed_ms = (time.perf_counter() - started) * 1000
    except OSError as error:
        return Result.failed(f"{url} unreachable: {getattr(error, 'reason', error)}", unreachable_fix)
    if status != 200:
        return Result.failed(
            f"POST /predict (clip {model}) answered {status}: {answer!r:.120}",
            "read the service's journal; give an installed CLIP model with --model",
        )
    if problem := _embedding_problem(answer):
        return Result.failed(
            f"POST /predict (clip {model}): {problem}",
            "the service answered off-protocol: check its version against Immich's",
        )
    dimension = len(json.loads(answer["clip"]))
    try:
        _, health = client.json("/health")
    except OSError:
        health = None
    providers = _model_providers(health, model)
    configured = _configured_provider(health)
    data = {
        "model": model,
        "dimension": dimension,
        "ms": round(elapsed_ms),
        "providers": providers,
        "configured": configured,
    }
    detail = (
        f"/ping pong, ready, /predict clip {model}: {dimension}-d embedding in {elapsed_ms:.0f} ms"
        f"{f' on {providers[0]}' if providers else ''}"
    )
    if providers and providers[0] == _CPU and configured not in (None, "cpu"):
        return Result.failed(
            f"{detail} although provider {configured} asks for the GPU",
            "the model fell back to the CPU: see the providers and journal checks",
            **data,
        )
    return Result.passed(detail, **data)


def _predict(client: _Client, model: str) -> tuple[int, Any]:
    entries = json.dumps({"clip": {"visual": {"modelName": model}}}).encode()
    body, content_type = _multipart([("entries", None, "", entries), ("image", "blob", "image/jpeg", _test_jpeg())])
    status, raw = client.request("/predict", body, content_type)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw[:200]


def _embedding_problem(answer: Any) -> str | None:
    """Why a `/predict` answer is not a CLIP embedding of the test image, or None."""
    if not isinstance(answer, dict) or not isinstance(answer.get("clip"), str):
        return f"no string `clip` in {str(answer)[:120]}"
    try:
        vector = json.loads(answer["clip"])
    except ValueError:
        return "`clip` is not a JSON array"
    if not isinstance(vector, list) or not vector or not all(isinstance(v, (int, float)) for v in vector):
        return "`clip` is not a non-empty list of numbers"
    width, height = _IMAGE_SIZE
    if (answer.get("imageWidth"), answer.get("imageHeight")) != (width, height):
        return f"image size {answer.get('imageWidth')}x{answer.get('imageHeight')}, sent {width}x{height}"
    return None


def _clip_model(health: Any) -> str | None:
    """The first CLIP visual model `/health` lists (`clip/<name>/visual`)."""
    for entry in _models(health):
        parts = str(entry.get("model", "")).split("/")
        if len(parts) == 3 and parts[0] == "clip" and parts[2] == "visual":
            return parts[1]
    return None


def _model_providers(health: Any, model: str) -> list[str]:
    wanted = f"clip/{model}/visual"
    return next((list(e.get("providers", [])) for e in _models(health) if e.get("model") == wanted), [])


def _configured_provider(health: Any) -> str | None:
    providers = health.get("providers") if isinstance(health, dict) else None
    return str(providers.get("configured")) if isinstance(providers, dict) else None


def _models(health: Any) -> list[dict[str, Any]]:
    models = health.get("models") if isinstance(health, dict) else None
    return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []


def _test_jpeg() -> bytes:
    image = Image.linear_gradient("L").resize(_IMAGE_SIZE).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def _multipart(fields: list[tuple[str, str | None, str, bytes]]) -> tuple[bytes, str]:
    """multipart/form-data from (name, filename, content type, bytes) fields; "" leaves the type out."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, filename, content_type, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        head += f"Content-Type: {content_type}\r\n" if content_type else ""
        chunks.append(f"{head}\r\n".encode() + data + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
