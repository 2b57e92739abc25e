"""OCR parity with upstream Immich: our /predict answers equal upstream's, checked two ways.

1. Against upstream's own answers, recorded from its released service (`tests/data/ocr-upstream/`: five
   requests, three images, three option sets; upstream v2.7.5 with its pinned packages).
2. Against an oracle (`tests/ocr_oracle/oracle.py`) that does what upstream's OCR does with rapidocr, in its own
   environment with upstream's pinned versions, whatever versions this environment has. It first reproduces the
   recorded answers, then answers more images and options (rendered lines, an invoice, a receipt, a printed
   page, text on a photo, a rotated and a vertical line; default, slow-score and low-threshold options).

Equal means: the same texts in the same order, the same text scores (5 decimals), and boxes and box scores
equal as float32 (upstream computes them in float32; we send the same values). Both sides run NumPy with
OPENBLAS_CORETYPE=Haswell: upstream's line crop goes through NumPy's SVD, whose last bits depend on the
OpenBLAS kernel, so equality holds per kernel.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests import modelgen
from tests.conftest import ClientFactory, predict_ok
from tests.ocr_oracle import UPSTREAM_CASES, blas_kernel_is_pinned, run_oracle
from tests.ocrimages import render, skimage_image, with_text

_RECORDED = json.loads((UPSTREAM_CASES / "cases.json").read_text())["cases"]
_UPSTREAM_VERSIONS = {
    "rapidocr": "3.6.0",
    "opencv-python-headless": "4.13.0.92",
    "numpy": "2.3.5",
    "pillow": "12.1.1",
    "onnxruntime": "1.24.1",
}
"""The versions cases.json names as upstream's; the oracle must run these."""


def _lines() -> Image.Image:
    lines = [("Immich", (420, 40)), ("Brewery", (40, 44)), ("Hello World 2024", (40, 160)), ("photos", (40, 300))]
    return render(lines)[0]


def _invoice() -> Image.Image:
    lines = [("Invoice number 2024-117", (30, 30)), ("Total: 42.50 EUR", (30, 90)), ("Thank you!", (30, 150))]
    return render(lines, size=(520, 220), font_size=30)[0]


def _receipt() -> Image.Image:
    """Nine lines of different widths: two recogniser chunks of up to 6, so the chunk order matters."""
    items = [
        "Coffee 3.20",
        "Bagel with cream cheese 4.80",
        "Tea 2.10",
        "Orange juice 3.90",
        "Muffin 2.50",
        "Sparkling water 1.80",
        "Croissant 2.30",
        "Total 20.60",
        "Card payment accepted, thank you",
    ]
    return render([(item, (20, 14 + 40 * row)) for row, item in enumerate(items)], size=(560, 380), font_size=26)[0]


def _photo() -> Image.Image:
    return with_text(skimage_image("coffee"), "OPEN DAILY 7-19", (40, 30))


def _rotated() -> Image.Image:
    strip = render([("Rotated line 15", (10, 10))], size=(420, 70))[0]
    return strip.rotate(12, expand=True, fillcolor="white")


def _vertical() -> Image.Image:
    strip = render([("VERTICAL SIGN 42", (5, 5))], size=(400, 55))[0]
    image = Image.new("RGB", (300, 520), "white")
    image.paste(strip.rotate(-90, expand=True), (120, 60))  # reads top to bottom
    return image


IMAGES: dict[str, Callable[[], Image.Image]] = {
    "rendered-lines": _lines,
    "invoice": _invoice,
    "receipt": _receipt,
    "page": lambda: skimage_image("page"),
    "photo": _photo,
    "rotated": _rotated,
    "vertical": _vertical,
}
OPTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "all-lines": ({"minScore": 0.5, "maxResolution": 736}, {"minScore": 0.0}),
    "slow,detMin=0.3,maxRes=1024": ({"minScore": 0.3, "maxResolution": 1024, "scoreMode": "slow"}, {"minScore": 0.5}),
}
ORACLE_CASES = [f"{image}/{options}" for image in IMAGES for options in OPTIONS]


def _entries(detection: dict[str, Any], recognition: dict[str, Any]) -> dict[str, Any]:
    name = "PP-OCRv5_mobile"
    return {
        "ocr": {
            "detection": {"modelName": name, "options": detection},
            "recognition": {"modelName": name, "options": recognition},
        }
    }


def _recorded_request(case: dict[str, Any]) -> tuple[str, Path]:
    parts = {part["name"]: part for part in case["parts"]}
    return parts["entries"]["value"], UPSTREAM_CASES / parts["image"]["file"]


def assert_same_ocr(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Same texts and text scores; boxes and box scores equal as float32 (upstream's precision)."""
    assert ours["text"] == theirs["text"]
    assert ours["textScore"] == theirs["textScore"]
    for key in ("box", "boxScore"):
        np.testing.assert_array_equal(np.float32(ours[key]), np.float32(theirs[key]), err_msg=key)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The oracle's answers: first the recorded requests, then every image of IMAGES with every OPTIONS,
    keyed by case id; also its package versions and model hashes."""
    folder = tmp_path_factory.mktemp("ocr-oracle")
    requests = []
    for case in _RECORDED:
        entries, image = _recorded_request(case)
        requests.append({"id": case["id"], "image": str(image), "entries": json.loads(entries)})
    for name, make in IMAGES.items():
        path = folder / f"{name}.png"
        path.write_bytes(modelgen.png_bytes(make()))
        for options, (detection, recognition) in OPTIONS.items():
            requests.append(
                {"id": f"{name}/{options}", "image": str(path), "entries": _entries(detection, recognition)}
            )
    result = run_oracle(requests, folder)
    answers = zip(requests, result["answers"], strict=True)
    result["by_id"] = {request["id"]: (request, answer) for request, answer in answers}
    return result


def test_oracle_runs_upstreams_versions_and_models(oracle: dict[str, Any]) -> None:
    assert {name: oracle["versions"][name] for name in _UPSTREAM_VERSIONS} == _UPSTREAM_VERSIONS
    ours = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in modelgen.ocr_wheel_models()}
    assert oracle["models"] == ours  # rapidocr 3.6.0's PP-OCRv4 files are rapidocr-onnxruntime 1.4.4's


@pytest.mark.parametrize("case", _RECORDED, ids=[case["id"] for case in _RECORDED])
def test_oracle_reproduces_upstream_recorded(case: dict[str, Any], oracle: dict[str, Any]) -> None:
    _, answer = oracle["by_id"][case["id"]]
    expected = case["upstream"]["body"]
    assert (answer["imageWidth"], answer["imageHeight"]) == (expected["imageWidth"], expected["imageHeight"])
    assert_same_ocr(answer["ocr"], expected["ocr"])


@pytest.mark.parametrize("case", _RECORDED, ids=[case["id"] for case in _RECORDED])
async def test_predict_equals_upstream_recorded(case: dict[str, Any], make_client: ClientFactory, cache: Path) -> None:
    """The recorded request replayed to our daemon over HTTP: the same multipart parts, the same image bytes."""
    assert blas_kernel_is_pinned(), "run with OPENBLAS_CORETYPE=Haswell (scripts/test sets it)"
    entries, image = _recorded_request(case)
    modelgen.write_ocr(cache, json.loads(entries)["ocr"]["recognition"]["modelName"])
    client = await make_client()
    body = await predict_ok(client, entries, image=image.read_bytes())
    expected = case["upstream"]["body"]
    assert (body["imageWidth"], body["imageHeight"]) == (expected["imageWidth"], expected["imageHeight"])
    assert_same_ocr(body["ocr"], expected["ocr"])


@pytest.mark.parametrize("case", ORACLE_CASES)
async def test_predict_equals_oracle(
    case: str, oracle: dict[str, Any], make_client: ClientFactory, cache: Path
) -> None:
    assert blas_kernel_is_pinned(), "run with OPENBLAS_CORETYPE=Haswell (scripts/test sets it)"
    request, answer = oracle["by_id"][case]
    modelgen.write_ocr(cache, request["entries"]["ocr"]["recognition"]["modelName"])
    client = await make_client()
    body = await predict_ok(client, json.dumps(request["entries"]), image=Path(request["image"]).read_bytes())
    print(f"{case}: {answer['ocr']['text']}")
    assert answer["ocr"]["text"], "the oracle read nothing: the case tests nothing"
    assert_same_ocr(body["ocr"], answer["ocr"])
