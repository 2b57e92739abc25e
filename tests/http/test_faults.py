"""Faults of the model store and of clients, over real HTTP: nothing intact is deleted, every refusal is a
clear 4xx/503 with its reason in the log (once) and no server path in the reply, and metrics tell the truth."""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from immich_ml.settings import Settings
from tests import modelgen
from tests.conftest import ClientFactory, predict_form

CLIP = "ViT-B-32__openai"
VISUAL = json.dumps({"clip": {"visual": {"modelName": CLIP}}})
TEXTUAL = json.dumps({"clip": {"textual": {"modelName": CLIP}}})
OCR_DETECTION = json.dumps({"ocr": {"detection": {"modelName": "PP-OCRv5_mobile"}}})


@pytest.fixture
def jpeg() -> bytes:
    return modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 48))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


async def predict(client: Any, entries: str, **parts: Any) -> tuple[int, dict[str, Any], Any]:
    async with client.post("/predict", data=predict_form(entries, **parts)) as resp:
        return resp.status, await resp.json(), resp.headers


def assert_no_server_path(detail: str, *paths: Path) -> None:
    for path in paths:
        assert str(path) not in detail, detail
    assert "/tmp/" not in detail and "/var/" not in detail, detail


# -- model files: never deleted when intact or when nothing can replace them ------------------------


async def test_offline_bad_preprocess_config_keeps_every_file_and_says_why(
    make_client: ClientFactory, clip_cache: Path, jpeg: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (clip_cache / "clip" / CLIP / "visual" / "preprocess_cfg.json").write_text("{not json")
    before = snapshot(clip_cache)
    client = await make_client(hf_offline=True)
    replies = [await predict(client, VISUAL, image=jpeg) for _ in range(2)]
    assert snapshot(clip_cache) == before
    for status, body, _ in replies:
        assert status == 503
        assert "preprocess_cfg.json" in body["detail"] and "not cached" not in body["detail"]
        assert_no_server_path(body["detail"], clip_cache)
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING and "preprocess_cfg.json" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]  # remembered, not retried


async def test_offline_truncated_model_file_is_kept_and_named(
    make_client: ClientFactory, clip_cache: Path, jpeg: bytes
) -> None:
    model = clip_cache / "clip" / CLIP / "visual" / "model.onnx"
    model.write_bytes(model.read_bytes()[:100])
    before = snapshot(clip_cache)
    client = await make_client(hf_offline=True)
    status, body, _ = await predict(client, VISUAL, image=jpeg)
    assert status == 503 and "model.onnx" in body["detail"], body
    assert snapshot(clip_cache) == before
    status, _, _ = await predict(client, TEXTUAL, text="the other type still works")
    assert status == 200


def _write_incompatible_graph(path: Path) -> None:
    """A well-formed ONNX file that ONNX Runtime refuses for a reason other than damage (an unknown op)."""
    model = onnx.load(str(path))
    model.graph.node[0].op_type = "NoSuchOperator"
    model.graph.node[0].domain = "example.invalid"
    model.opset_import.append(onnx.helper.make_opsetid("example.invalid", 1))
    onnx.save(model, str(path))


async def test_a_load_error_that_is_not_damage_never_touches_files_even_online(
    make_client: ClientFactory, clip_cache: Path, jpeg: bytes
) -> None:
    _write_incompatible_graph(clip_cache / "clip" / CLIP / "visual" / "model.onnx")
    before = snapshot(clip_cache)
    client = await make_client(hf_offline=False, hf_endpoint="http://127.0.0.1:9")  # any download would fail
    status, body, _ = await predict(client, VISUAL, image=jpeg)
    assert status == 503 and "NoSuchOperator" in body["detail"], body
    assert snapshot(clip_cache) == before


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make `folder` and everything below it unwritable, also for root (the immutable attribute)."""
    targets = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    if os.geteuid() != 0:
        for target in targets:
            target.chmod(0o555)
        undo = [["chmod", "-R", "u+w", str(folder)]]
    else:
        if subprocess.run(["chattr", "+i", *map(str, targets)], capture_output=True, check=False).returncode:
            pytest.skip("cannot make a folder read-only for root here (chattr +i refused)")
        undo = [["chattr", "-i", *map(str, targets)]]
    try:
        yield
    finally:
        for command in undo:
            subprocess.run(command, check=True)


async def test_a_damaged_model_in_a_read_only_cache_is_a_clear_remembered_503(
    make_client: ClientFactory, clip_cache: Path, jpeg: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (clip_cache / "clip" / CLIP / "visual" / "model.onnx").write_bytes(b"not protobuf")
    before = snapshot(clip_cache)
    client = await make_client(hf_offline=False, hf_endpoint="http://127.0.0.1:9")
    with read_only(clip_cache):
        replies = [await predict(client, VISUAL, image=jpeg) for _ in range(2)]
    for status, body, _ in replies:
        assert status == 503, body
        assert "read-only" in body["detail"] or "Read-only" in body["detail"] or "ermission" in body["detail"]
    assert snapshot(clip_cache) == before
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING and CLIP in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]


async def test_online_recovery_downloads_only_the_damaged_file(
    make_client: ClientFactory, cache: Path, tmp_path: Path, jpeg: bytes
) -> None:
    from tests.fakehub import FakeHub

    hub = FakeHub()
    modelgen.write_clip(tmp_path / "hub", CLIP)
    hub.repos[f"immich-app/{CLIP}"] = tmp_path / "hub" / "clip" / CLIP
    server = TestServer(hub.app(), host="127.0.0.1")
    await server.start_server()
    try:
        modelgen.write_clip(cache, CLIP)
        visual = cache / "clip" / CLIP / "visual"
        (visual / "model.onnx").write_bytes(b"damaged")
        (visual / "operator-notes.txt").write_text("kept")  # not the hub's: recovery must leave it alone
        client = await make_client(hf_offline=False, hf_endpoint=str(server.make_url("")).rstrip("/"))
        status, body, _ = await predict(client, VISUAL, image=jpeg)
        assert status == 200, body
        assert (visual / "operator-notes.txt").read_text() == "kept"
        assert hub.downloads[f"immich-app/{CLIP}/visual/model.onnx"] == 1
    finally:
        await server.close()


async def test_the_ocr_downloader_honours_hf_hub_offline(make_client: ClientFactory, cache: Path) -> None:
    asked: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        client = await make_client(hf_offline=True, ocr_model_base_url=str(server.make_url("/mirror/")))
        status, body, _ = await predict(
            client, OCR_DETECTION, image=modelgen.png_bytes(modelgen.make_gradient_image(64, 64))
        )
        assert status == 503 and "HF_HUB_OFFLINE" in body["detail"], body
        assert asked == []
    finally:
        await server.close()


# -- what the operator sees ------------------------------------------------------------------------


async def test_an_unavailable_model_is_logged_once_with_its_path_and_replied_without_it(
    make_client: ClientFactory, cache: Path, jpeg: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(hf_offline=True)
    status, body, _ = await predict(client, VISUAL, image=jpeg)
    assert status == 503 and CLIP in body["detail"]
    assert_no_server_path(body["detail"], cache)
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(logged) == 1 and str(cache) in logged[0].getMessage(), [r.getMessage() for r in logged]
    status, body, _ = await predict(client, '{"clip":{"visual":{"modelName":"ViT-Z-99__nobody"}}}', image=jpeg)
    assert status == 404
    assert_no_server_path(body["detail"], cache)


async def test_a_client_that_disconnects_mid_upload_is_info_and_499(
    make_client: ClientFactory, clip_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = await make_client()
    form = predict_form(VISUAL, image=modelgen.jpeg_bytes(modelgen.make_gradient_image(640, 480)))
    payload = form()
    body = b"".join([chunk async for chunk in _chunks(payload)])
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {payload.content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(head + body[: len(body) // 2])
    await writer.drain()
    for _ in range(500):  # until the handler is reading the body
        if any("/predict" in line for line in await _in_flight(client)):
            break
        await asyncio.sleep(0.01)
    writer.close()
    exposition = ""
    for _ in range(500):  # until the request is counted
        async with client.get("/metrics") as resp:
            exposition = await resp.text()
        if 'status="499"' in exposition:
            break
        await asyncio.sleep(0.01)
    assert 'status="499"' in exposition and 'status="500"' not in exposition, exposition
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    assert any(r.levelno == logging.INFO and "disconnect" in r.getMessage() for r in caplog.records)


async def _chunks(payload: Any) -> Any:
    class Sink:
        def __init__(self) -> None:
            self.parts: list[bytes] = []

        async def write(self, data: bytes) -> None:
            self.parts.append(bytes(data))

    sink = Sink()
    await payload.write(sink)
    for part in sink.parts:
        yield part


async def _in_flight(client: Any) -> list[str]:
    async with client.get("/health") as resp:
        count = (await resp.json())["inFlight"]
    return ["/predict"] if count >= 1 else []


async def test_refused_clients_are_logged_rate_limited(
    make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(allowed_clients=(ipaddress.ip_network("10.0.0.0/8"),))
    for _ in range(50):
        async with client.get("/ping") as resp:
            assert resp.status == 403
    refusals = [r for r in caplog.records if r.name.startswith("immich_ml") and "refused" in r.getMessage()]
    assert 1 <= len(refusals) <= 2, [r.getMessage() for r in refusals]


async def test_ipv4_mapped_allowlist_entries_match_ipv4_peers(make_client: ClientFactory) -> None:
    allowed = Settings.from_env({"MACHINE_LEARNING_ALLOWED_CLIENTS": "::ffff:127.0.0.2/128"}).allowed_clients
    client = await make_client(allowed_clients=allowed)

    async def status_from(source: str) -> int:
        def exchange() -> bytes:
            with socket.socket() as sock:
                sock.bind((source, 0))
                sock.settimeout(10)
                sock.connect(("127.0.0.1", client.port))
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return sock.recv(100)

        return int((await asyncio.to_thread(exchange)).split(b" ", 2)[1])

    assert await status_from("127.0.0.2") == 200
    assert await status_from("127.0.0.1") == 403


# -- per-request limits ----------------------------------------------------------------------------


async def test_urlencoded_text_over_the_text_limit_is_413(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client()
    body = b"entries=" + TEXTUAL.encode() + b"&text=" + b"a" * (2 * 1024 * 1024)
    async with client.post(
        "/predict", data=io.BytesIO(body), headers={"Content-Type": "application/x-www-form-urlencoded"}
    ) as resp:
        assert resp.status == 413
    async with client.post(
        "/predict",
        data=b"entries=" + TEXTUAL.encode() + b"&text=cat",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "entries",
    [
        {
            "facial-recognition": {
                "detection": {"modelName": "buffalo_l", "options": {"minScore": 0}},
                "recognition": {"modelName": "buffalo_l"},
            }
        },
        {
            "facial-recognition": {
                "detection": {"modelName": "buffalo_l", "options": {"minScore": 0.01}},
                "recognition": {"modelName": "buffalo_l"},
            }
        },
    ],
)
async def test_options_beyond_the_documented_caps_are_422(
    make_client: ClientFactory, cache: Path, entries: dict[str, Any], jpeg: bytes
) -> None:
    modelgen.write_scrfd(cache, "buffalo_l", faces=())
    modelgen.write_arcface(cache, "buffalo_l")
    modelgen.write_ocr(cache, "PP-OCRv5_mobile")
    client = await make_client()
    status, body, _ = await predict(client, json.dumps(entries), image=jpeg)
    assert status == 422, body
    assert "Invalid request format." in body["detail"]
