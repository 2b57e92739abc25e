"""Model downloads, corruption recovery and the air-gapped workflow, against a local fake of the hub."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pty
import re
import resource
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from immich_ml.cli import main as cli_main
from immich_ml.errors import ModelUnavailable
from immich_ml.models.catalog import is_known, known_names
from immich_ml.models.store import ModelStore
from immich_ml.models.tasks import TASK_TYPES, ModelKey, ModelType, Task
from immich_ml.settings import Settings
from tests import modelgen
from tests.conftest import VISUAL, ClientFactory, installed, predict_form, wait_for
from tests.fakehub import FakeHub

TEXTUAL_WITH_ORGANIZATION = '{"clip":{"textual":{"modelName":"immich-app/ViT-B-32__openai"}}}'


@pytest.fixture
async def hub(tmp_path: Path) -> Any:
    """A fake hub serving a generated ViT-B-32__openai repository."""
    fake = FakeHub()
    source = tmp_path / "hub"
    modelgen.write_clip(source, "ViT-B-32__openai")
    fake.repos["immich-app/ViT-B-32__openai"] = source / "clip" / "ViT-B-32__openai"
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.endpoint = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    yield fake
    await server.close()


@pytest.fixture
def jpeg() -> bytes:
    return modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 48))


async def test_missing_model_is_downloaded_into_upstream_layout(
    make_client: ClientFactory, hub: Any, cache: Path, jpeg: bytes
) -> None:
    client = await make_client(hf_endpoint=hub.endpoint, hf_offline=False)
    async with client.post("/predict", data=predict_form(VISUAL, image=jpeg)) as resp:
        assert resp.status == 200
    assert (cache / "clip/ViT-B-32__openai/visual/model.onnx").is_file()
    assert (cache / "clip/ViT-B-32__openai/config.json").is_file()
    assert not (cache / "clip/ViT-B-32__openai/textual").exists()  # only the type asked for


async def test_concurrent_requests_cause_one_download(make_client: ClientFactory, hub: Any, jpeg: bytes) -> None:
    client = await make_client(hf_endpoint=hub.endpoint, hf_offline=False)
    responses = await asyncio.gather(
        *(client.post("/predict", data=predict_form(VISUAL, image=jpeg)) for _ in range(5))
    )
    assert [r.status for r in responses] == [200] * 5
    assert hub.downloads["immich-app/ViT-B-32__openai/visual/model.onnx"] == 1


async def test_interrupted_download_leaves_no_complete_looking_file(
    make_client: ClientFactory, hub: Any, cache: Path, jpeg: bytes
) -> None:
    hub.truncations["visual/model.onnx"] = 10  # more than the hub client's own retries
    client = await make_client(hf_endpoint=hub.endpoint, hf_offline=False)
    async with client.post("/predict", data=predict_form(VISUAL, image=jpeg)) as resp:
        assert resp.status == 503
    assert not (cache / "clip/ViT-B-32__openai/visual/model.onnx").exists()
    hub.truncations.clear()
    async with client.post("/predict", data=predict_form(VISUAL, image=jpeg)) as resp:
        assert resp.status == 200  # the next request downloads it whole


async def test_a_transfer_cut_once_is_resumed_to_the_exact_file(
    make_client: ClientFactory, hub: Any, cache: Path, jpeg: bytes
) -> None:
    hub.truncations["visual/model.onnx"] = 1
    client = await make_client(hf_endpoint=hub.endpoint, hf_offline=False)
    async with client.post("/predict", data=predict_form(VISUAL, image=jpeg)) as resp:
        assert resp.status == 200
    source = hub.repos["immich-app/ViT-B-32__openai"] / "visual/model.onnx"
    assert (cache / "clip/ViT-B-32__openai/visual/model.onnx").read_bytes() == source.read_bytes()


async def test_corrupt_cached_model_is_removed_and_downloaded_again(
    make_client: ClientFactory, hub: Any, cache: Path, jpeg: bytes
) -> None:
    model = cache / "clip/ViT-B-32__openai/visual/model.onnx"
    modelgen.write_clip(cache, "ViT-B-32__openai")
    model.write_bytes(b"definitely not protobuf")
    client = await make_client(hf_endpoint=hub.endpoint, hf_offline=False)
    async with client.post("/predict", data=predict_form(VISUAL, image=jpeg)) as resp:
        assert resp.status == 200
    assert hub.downloads["immich-app/ViT-B-32__openai/visual/model.onnx"] == 1
    assert model.read_bytes() != b"definitely not protobuf"


async def test_model_corrupt_on_the_hub_too_fails_clearly_and_fast(
    make_client: ClientFactory, hub: Any, jpeg: bytes
) -> None:
    (hub.repos["immich-app/ViT-B-32__openai"] / "visual/model.onnx").write_bytes(b"broken")
    client = await make_client(hf_endpoint=hub.endpoint, hf_offline=False)
    for _ in range(2):
        async with client.post("/predict", data=predict_form(VISUAL, image=jpeg)) as resp:
            assert resp.status == 503
            assert "Failed to load model 'ViT-B-32__openai'" in (await resp.json())["detail"]
    # The first request downloads, fails to load, clears and downloads once more; the second fails fast.
    assert hub.downloads["immich-app/ViT-B-32__openai/visual/model.onnx"] == 2


async def test_operator_placed_files_are_used_without_the_hub(
    make_client: ClientFactory, clip_cache: Path, jpeg: bytes
) -> None:
    client = await make_client(hf_endpoint="http://127.0.0.1:9", hf_offline=True)
    async with client.post("/predict", data=predict_form(TEXTUAL_WITH_ORGANIZATION, text="forest")) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("offline", [True, False])
async def test_uncached_model_without_hub_fails_at_once_with_a_fix(
    make_client: ClientFactory, cache: Path, jpeg: bytes, offline: bool, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(hf_endpoint="http://127.0.0.1:9", hf_offline=offline)  # port 9: refused
    async with client.post("/predict", data=predict_form(VISUAL, image=jpeg)) as resp:
        assert resp.status == 503
        detail = (await resp.json())["detail"]
    assert "ViT-B-32__openai" in detail
    assert "immich-ml models pull" in detail
    model_file = str(cache / "clip/ViT-B-32__openai/visual/model.onnx")
    assert model_file not in detail  # the server's paths stay in its log
    assert any(model_file in record.getMessage() for record in caplog.records)


async def test_models_pull_list_import_remove(
    hub: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    connected, airgapped = tmp_path / "connected", tmp_path / "airgapped"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    # The command blocks, so it runs in a thread while this loop serves the fake hub.
    pull = ["models", "--cache", str(connected), "pull", "ViT-B-32::openai"]
    assert await asyncio.to_thread(cli_main, pull) == 0
    assert (connected / "clip/ViT-B-32__openai/textual/tokenizer.json").is_file()

    archive = tmp_path / "models.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(connected / "clip", arcname="clip")
    assert cli_main(["models", "--cache", str(airgapped), "import", str(archive)]) == 0
    capsys.readouterr()
    assert cli_main(["models", "--cache", str(airgapped), "list"]) == 0
    listing = capsys.readouterr().out
    assert "ViT-B-32__openai" in listing and "visual" in listing and "textual" in listing and "MiB" in listing

    assert cli_main(["models", "--cache", str(airgapped), "remove", "ViT-B-32__openai"]) == 0
    assert not (airgapped / "clip/ViT-B-32__openai").exists()
    assert cli_main(["models", "--cache", str(airgapped), "remove", "ViT-B-32__openai"]) == 1


def test_import_rejects_a_folder_without_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["models", "--cache", str(tmp_path / "c"), "import", str(empty)]) == 1
    assert "no models found" in capsys.readouterr().err


def test_import_replaces_an_older_copy_whole(tmp_path: Path) -> None:
    old, new, cache = tmp_path / "old", tmp_path / "new", tmp_path / "cache"
    modelgen.write_clip(old, "ViT-B-32__openai")
    (old / "clip/ViT-B-32__openai/stale.txt").write_text("old")
    shutil.copytree(old, cache)
    modelgen.write_clip(new, "ViT-B-32__openai", embed_dim=768)
    assert cli_main(["models", "--cache", str(cache), "import", str(new)]) == 0
    config = json.loads((cache / "clip/ViT-B-32__openai/config.json").read_text())
    assert config["embed_dim"] == 768
    assert not (cache / "clip/ViT-B-32__openai/stale.txt").exists()


async def test_a_full_disk_fails_the_download_clearly_and_the_daemon_recovers(
    make_client: ClientFactory, hub: Any, cache: Path, jpeg: bytes
) -> None:
    """No space for the model file: 503 with the reason, no partial model, and a retry works once there is room.

    The disk limit is the process's file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes past it
    fail with EFBIG like a full disk fails with ENOSPC), set only while the download runs.
    """
    client = await make_client(hf_endpoint=hub.endpoint, hf_offline=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        async with client.post("/predict", data=predict_form(VISUAL, image=jpeg)) as resp:
            status, detail = resp.status, (await resp.json())["detail"]
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert status == 503
    assert "ViT-B-32__openai" in detail and "File too large" in detail
    assert not (cache / "clip/ViT-B-32__openai/visual/model.onnx").exists()
    async with client.get("/ping") as resp:
        assert resp.status == 200
    async with client.post("/predict", data=predict_form(VISUAL, image=jpeg)) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("ViT-B-32__openai", "clip"),
        ("buffalo_l", "facial-recognition"),
        ("PP-OCRv5_mobile", "ocr"),
        ("EN__PP-OCRv5_mobile", "ocr"),
    ],
)
def test_models_pull_finds_the_task_from_the_name(name: str, task: str) -> None:
    from immich_ml.models.catalog import task_of

    assert task_of(name) == task


def test_models_pull_refuses_an_unknown_name_with_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a download attempt would fail differently
    assert cli_main(["models", "--cache", str(tmp_path), "pull", "nope-model"]) == 1
    message = capsys.readouterr().err
    assert message.startswith("immich-ml: unknown model 'nope-model'")
    for known in (
        "ViT-B-32__openai",
        "nllb-clip-base-siglip__v1",
        "buffalo_l",
        "PP-OCRv5_mobile",
        "EN__PP-OCRv5_mobile",
    ):
        assert known in message.split()
    assert list(tmp_path.iterdir()) == []


def test_every_listed_known_name_is_accepted_by_the_catalog() -> None:
    for task in Task:
        names = known_names(task)
        assert names and all(is_known(ModelKey(task, t, name)) for name in names for t in TASK_TYPES[task])


_PADDING = 24 * 1000**2  # over the hub client's 10 MB write chunk, so half a transfer is visible on disk


@pytest.fixture
def held_hub(hub: Any) -> tuple[Any, asyncio.Event, int]:
    """The hub with a large side file in the visual folder whose transfer stops half-way until released."""
    (hub.repos["immich-app/ViT-B-32__openai"] / "visual" / "padding.bin").write_bytes(bytes(_PADDING))
    release = asyncio.Event()
    hub.held["visual/padding.bin"] = release
    files = hub.files("immich-app/ViT-B-32__openai")
    total = sum(len(data) for name, data in files.items() if name.startswith("visual/") or name == "config.json")
    return hub, release, total


async def test_a_download_in_progress_shows_in_health_and_in_log_lines(
    make_client: ClientFactory, held_hub: Any, jpeg: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    hub, release, total = held_hub
    caplog.set_level(logging.INFO, logger="immich_ml.models")
    client = await make_client(hf_endpoint=hub.endpoint, hf_offline=False)
    request = asyncio.ensure_future(client.post("/predict", data=predict_form(VISUAL, image=jpeg)))
    try:
        seen: dict[str, Any] = {}

        async def halfway() -> bool:
            async with client.get("/health") as resp:
                downloads = (await resp.json())["downloads"]
            seen["download"] = downloads[0] if downloads else None
            return bool(downloads) and downloads[0]["doneBytes"] >= 10 * 1000**2

        await wait_for(halfway, "the download half-way in /health", interval_s=0.05)
        download = seen["download"]
        assert download["model"] == "clip/ViT-B-32__openai/visual"
        assert download["totalBytes"] == total
        assert 40 <= download["percent"] < 60 and download["bytesPerSecond"] > 0

        def progress_lines() -> list[str]:
            prefix = "downloading clip/ViT-B-32__openai/visual: "
            return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]

        await wait_for(progress_lines, "a progress line in the log", interval_s=0.05)
        line = progress_lines()[0]
        assert re.fullmatch(
            rf"downloading clip/ViT-B-32__openai/visual: \d+% \(\d+\.\d of {total / 1e6:.1f} MB\) at \d+\.\d MB/s", line
        ), line
    finally:
        release.set()  # the hub client gives up on a transfer idle for 10 s
    response = await request
    assert response.status == 200
    async with client.get("/health") as resp:
        assert (await resp.json())["downloads"] == []
    assert f"downloaded clip/ViT-B-32__openai/visual: {total / 1e6:.1f} MB in" in caplog.text


async def test_models_pull_draws_a_bar_on_a_terminal(held_hub: Any, tmp_path: Path) -> None:
    hub, release, total = held_hub
    release.set()  # not held: the finished bar is the point here
    controller, terminal = pty.openpty()
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "NO_COLOR": "1"}
    program = installed("immich-ml")
    pull = [program, "models", "--cache", str(tmp_path / "c"), "pull", "ViT-B-32__openai", "--type", "visual"]
    process = await asyncio.create_subprocess_exec(*pull, env=env, stdout=asyncio.subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    stdout, _ = await asyncio.wait_for(process.communicate(), 120)
    screen = _read_all(controller)
    assert process.returncode == 0, screen
    assert "\rclip/ViT-B-32__openai/visual [" + "#" * 30 + "] 100% (" in screen
    assert f"of {total / 1e6:.1f} MB)" in screen and screen.endswith("\r\n")
    assert "downloading clip/ViT-B-32__openai/visual: " not in screen  # the bar replaces the progress lines
    assert stdout.decode().startswith("clip/ViT-B-32__openai/visual: ")


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


async def test_models_pull_prints_lines_when_not_on_a_terminal(
    hub: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    pull = ["models", "--cache", str(tmp_path), "pull", "ViT-B-32__openai", "--type", "textual"]
    assert await asyncio.to_thread(cli_main, pull) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(
        r"^INFO immich_ml.models: downloaded clip/ViT-B-32__openai/textual: \d+\.\d MB in \d+ s$", err, re.M
    )


@pytest.mark.parametrize("offline", [True, False])
async def test_a_failed_download_is_one_line_with_cause_and_fix(tmp_path: Path, offline: bool) -> None:
    settings = Settings(cache_folder=tmp_path, hf_endpoint="http://127.0.0.1:9", hf_offline=offline)
    with pytest.raises(ModelUnavailable) as failure:
        await asyncio.to_thread(ModelStore(settings).ensure, ModelKey(Task.CLIP, ModelType.VISUAL, "ViT-B-32__openai"))
    message, logged = failure.value.detail, failure.value.log_detail
    for text in (message, logged):
        assert "\n" not in text and ".." not in text and "Please check" not in text
    cause = "HF_HUB_OFFLINE is set" if offline else "Connection refused"
    where = f" at {tmp_path}/clip/ViT-B-32__openai/visual/model.onnx"
    for text, path in ((message, ""), (logged, where)):  # the client is never told the server's paths
        assert re.fullmatch(
            rf"Model 'ViT-B-32__openai' \(clip visual\) is not cached{re.escape(path)} and could not be downloaded "
            rf"from http://127.0.0.1:9 \(immich-app/ViT-B-32__openai\): {cause}\. Fix: .*immich-ml models pull "
            rf"ViT-B-32__openai.*\.",
            text,
        ), text


async def test_a_model_missing_on_the_hub_says_so_and_what_to_check(hub: Any, tmp_path: Path) -> None:
    settings = Settings(cache_folder=tmp_path, hf_endpoint=hub.endpoint, hf_offline=False)
    with pytest.raises(ModelUnavailable) as failure:
        await asyncio.to_thread(ModelStore(settings).ensure, ModelKey(Task.CLIP, ModelType.VISUAL, "ViT-B-16__openai"))
    assert "there is no repository immich-app/ViT-B-16__openai. Fix: check the model name" in str(failure.value)


async def test_a_failed_ocr_download_is_one_line_with_cause_and_fix(tmp_path: Path) -> None:
    settings = Settings(cache_folder=tmp_path, ocr_model_base_url="http://127.0.0.1:9/mirror")
    with pytest.raises(ModelUnavailable) as failure:
        await asyncio.to_thread(ModelStore(settings).ensure, ModelKey(Task.OCR, ModelType.DETECTION, "PP-OCRv5_mobile"))
    assert re.fullmatch(
        r"Could not download OCR model 'PP-OCRv5_mobile' \(detection\): http://127\.0\.0\.1:9/mirror/\S+\.onnx failed "
        r"2 times: Connection refused\. Fix: let this host reach 127\.0\.0\.1:9, set "
        r"MACHINE_LEARNING_OCR_MODEL_BASE_URL to a mirror, or run `immich-ml models pull PP-OCRv5_mobile` on a "
        r"connected machine and `immich-ml models import` here\.",
        str(failure.value),
    ), str(failure.value)
