"""OCR model downloads: RapidOCR's ModelScope files, pinned by URL and SHA-256.

Upstream downloads PP-OCRv5 through the `rapidocr` package's model registry; the paths and hashes below
are that registry's (rapidocr 3.4.0, `default_models.yaml`, onnxruntime section), pinned here so a
download is checked against a known file. `MACHINE_LEARNING_OCR_MODEL_BASE_URL` points at a mirror.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from immich_ml.causes import cause_of
from immich_ml.errors import DownloadFailed, HashMismatch, ModelUnavailable
from immich_ml.log import MODELS_LOG as log
from immich_ml.models.catalog import ocr_language
from immich_ml.models.tasks import ModelKey, ModelType

__all__ = [
    "DEFAULT_BASE_URL",
    "PinnedFile",
    "download_ocr_model",
    "fetch_verified",
    "pinned_file",
]


DEFAULT_BASE_URL = "https://www.modelscope.cn/models/RapidAI/RapidOCR/resolve/v3.4.0"

_ATTEMPTS = 2
_TIMEOUT_S = 60
_CHUNK = 1024 * 1024

PinnedFile = tuple[str, str]
"""(path under the base URL, SHA-256 hex digest)."""

_DETECTION: dict[str, PinnedFile] = {
    "PP-OCRv5_mobile": (
        "onnx/PP-OCRv5/det/ch_PP-OCRv5_mobile_det.onnx",
        "4d97c44a20d30a81aad087d6a396b08f786c4635742afc391f6621f5c6ae78ae",
    ),
    "PP-OCRv5_server": (
        "onnx/PP-OCRv5/det/ch_PP-OCRv5_server_det.onnx",
        "0f8846b1d4bba223a2a2f9d9b44022fbc22cc019051a602b41a7fda9667e4cad",
    ),
}

_RECOGNITION: dict[tuple[str, str], PinnedFile] = {
    ("CH", "PP-OCRv5_mobile"): (
        "onnx/PP-OCRv5/rec/ch_PP-OCRv5_rec_mobile_infer.onnx",
        "5825fc7ebf84ae7a412be049820b4d86d77620f204a041697b0494669b1742c5",
    ),
    ("CH", "PP-OCRv5_server"): (
        "onnx/PP-OCRv5/rec/ch_PP-OCRv5_rec_server_infer.onnx",
        "e09385400eaaaef34ceff54aeb7c4f0f1fe014c27fa8b9905d4709b65746562a",
    ),
    ("EL", "PP-OCRv5_mobile"): (
        "onnx/PP-OCRv5/rec/el_PP-OCRv5_rec_mobile_infer.onnx",
        "b4368bccd557123c702b7549fee6cd1e94b581337d1c9b65310f109131542b7f",
    ),
    ("EN", "PP-OCRv5_mobile"): (
        "onnx/PP-OCRv5/rec/en_PP-OCRv5_rec_mobile_infer.onnx",
        "c3461add59bb4323ecba96a492ab75e06dda42467c9e3d0c18db5d1d21924be8",
    ),
    ("ESLAV", "PP-OCRv5_mobile"): (
        "onnx/PP-OCRv5/rec/eslav_PP-OCRv5_rec_mobile_infer.onnx",
        "08705d6721849b1347d26187f15a5e362c431963a2a62bfff4feac578c489aab",
    ),
    ("KOREAN", "PP-OCRv5_mobile"): (
        "onnx/PP-OCRv5/rec/korean_PP-OCRv5_rec_mobile_infer.onnx",
        "cd6e2ea50f6943ca7271eb8c56a877a5a90720b7047fe9c41a2e541a25773c9b",
    ),
    ("LATIN", "PP-OCRv5_mobile"): (
        "onnx/PP-OCRv5/rec/latin_PP-OCRv5_rec_mobile_infer.onnx",
        "b20bd37c168a570f583afbc8cd7925603890efbcdc000a59e22c269d160b5f5a",
    ),
    ("TH", "PP-OCRv5_mobile"): (
        "onnx/PP-OCRv5/rec/th_PP-OCRv5_rec_mobile_infer.onnx",
        "de541dd83161c241ff426f7ecfd602a0ba77d686cf3ab9a6c255ea82fd08006e",
    ),
}


def _ignore(total_bytes: int) -> None:
    """The default `expect`: nobody is watching the download."""


def pinned_file(key: ModelKey) -> PinnedFile:
    """The pinned (path, SHA-256) of an OCR model's ONNX file; `ModelUnavailable` if there is none."""
    language, base = ocr_language(key.name)
    pinned = _DETECTION.get(base) if key.type is ModelType.DETECTION else _RECOGNITION.get((language, base))
    if pinned is None:
        raise ModelUnavailable(
            f"No download is known for OCR model '{key.name}' ({key.type}); place its file at "
            "<cache>/ocr/<name>/<type>/model.onnx or use `immich-ml models import`."
        )
    return pinned


def download_ocr_model(
    key: ModelKey, model_dir: Path, expect: Callable[[int], None] = _ignore, *, base_url: str | None = None
) -> None:
    """Download `model_dir/model.onnx` for an OCR model from its pinned URL and check its SHA-256. Blocking.

    `base_url` replaces `DEFAULT_BASE_URL` (a mirror with the same layout); `expect` hears the size.
    """
    path, expected = pinned_file(key)
    base = (base_url or DEFAULT_BASE_URL).rstrip("/")
    model_dir.mkdir(parents=True, exist_ok=True)
    try:
        fetch_verified(f"{base}/{path}", expected, model_dir / "model.onnx", expect)
    except DownloadFailed as error:
        raise ModelUnavailable(
            f"Could not download OCR model '{key.name}' ({key.type}): {error}. Fix: let this host reach "
            f"{urllib.parse.urlsplit(base).netloc or base}, set MACHINE_LEARNING_OCR_MODEL_BASE_URL to a mirror, "
            f"or run `immich-ml models pull {key.name}` on a connected machine and `immich-ml models import` here."
        ) from error


def fetch_verified(url: str, expected_sha256: str, target: Path, expect: Callable[[int], None] = _ignore) -> None:
    """Download `url` to `target`, which appears only if the bytes hash to `expected_sha256`. Blocking.

    The bytes go to a temporary file next to `target` and are renamed into place after the check, so an
    interrupted or corrupted download never leaves `target`. A failed attempt is retried once. `expect` is
    told the size the server announces.
    """
    failure = ""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            _fetch_once(url, expected_sha256, target, expect)
            return
        # urllib raises OSErrors; a connection closed mid-body raises http.client.IncompleteRead.
        except (OSError, http.client.HTTPException, HashMismatch) as error:
            failure = cause_of(error)
            log.warning("download %d/%d of %s failed: %s", attempt, _ATTEMPTS, url, failure)
    raise DownloadFailed(f"{url} failed {_ATTEMPTS} times: {failure}")


def _fetch_once(url: str, expected: str, target: Path, expect: Callable[[int], None]) -> None:
    digest = hashlib.sha256()
    handle, partial_name = tempfile.mkstemp(dir=target.parent, prefix=".model-", suffix=".part")
    partial = Path(partial_name)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            expect(int(response.headers.get("Content-Length") or 0))
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise HashMismatch(f"SHA-256 {digest.hexdigest()} does not match the pinned {expected}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
