"""deploy/Containerfile's image, built on the harness' Debian base: the same answers as `immich-ml serve` outside
it, from a cache filled as root; unprivileged processes; `podman stop` drains a request in flight and exits 0;
the HEALTHCHECK is in the image and goes healthy."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import modelgen
from tests.containers.clip_requests import IMAGE, MODEL, PRELOAD, TEXT, TEXTUAL, VISUAL
from tests.containers.endpoint import ContainerEndpoint, until
from tests.containers.podman import Podman
from tests.daemonproc import multipart
from tests.deploy.containerfile import image_facts


def _root_cache(folder: Path) -> Path:
    """A model cache written by root, as upstream's image (which runs as root) leaves its volume."""
    cache = folder / "cache"
    modelgen.write_clip(cache, MODEL)
    assert os.geteuid() == 0 and cache.stat().st_uid == 0
    return cache


def _serve(podman: Podman, image: str, cache: Path) -> ContainerEndpoint:
    """The image serving `cache` at /cache, warm."""
    container = podman.run(image, publish=["127.0.0.1::3003"], volumes=[f"{cache}:/cache"], env=PRELOAD)
    endpoint = ContainerEndpoint(container)
    endpoint.wait_ready()
    return endpoint


@pytest.fixture(scope="module")
def root_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _root_cache(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def serving(
    podman_usable: None, ml_image: str, root_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ContainerEndpoint]:
    """One container for the tests that leave it running (a start costs several seconds on two cores)."""
    runner = Podman(tmp_path_factory.mktemp("podman"))
    yield _serve(runner, ml_image, root_cache)
    runner.cleanup(dump_logs=True)  # pytest shows it only with a failure


def test_answers_equal_the_daemon_outside_a_container(serving: ContainerEndpoint, clip_answers: dict[str, Any]) -> None:
    assert serving.request("GET", "/ping") == (200, b"pong")
    assert serving.predict(TEXTUAL, text=TEXT) == (200, clip_answers["text"])
    assert serving.predict(VISUAL, image=IMAGE) == (200, clip_answers["image"])


def test_runs_unprivileged_and_owns_a_cache_filled_as_root(serving: ContainerEndpoint, root_cache: Path) -> None:
    uid = image_facts().uid
    processes = serving.container.podman("top", serving.container.id, "pid", "user", "args").stdout.splitlines()[1:]
    assert len(processes) == 2, processes  # immich-ml-init (PID 1) and the daemon
    assert all(line.split()[1] == "immich-ml" for line in processes), processes
    status = serving.container.succeed("cat", "/proc/1/status")
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status
    assert "CapEff:\t0000000000000000" in status
    assert {path.stat().st_uid for path in [root_cache, *root_cache.rglob("*")]} == {uid}
    assert "entries now owned by immich-ml" in serving.container.logs()


def test_healthcheck_is_in_the_image_and_goes_healthy(
    podman: Podman, ml_image: str, serving: ContainerEndpoint
) -> None:
    [config] = json.loads(podman("image", "inspect", ml_image).stdout)
    healthcheck, facts = dict(config["Healthcheck"]), image_facts()
    assert healthcheck.pop("Test") == ["CMD", *facts.healthcheck]
    retries = healthcheck.pop("Retries")
    assert {**{k: v // 1_000_000_000 for k, v in healthcheck.items()}, "Retries": retries} == facts.healthcheck_timing
    result = podman("healthcheck", "run", serving.container.id, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert serving.container.inspect()["State"]["Health"]["Status"] == "healthy"


def test_a_healthcheck_fails_when_the_daemon_does_not_answer(serving: ContainerEndpoint) -> None:
    """The same command against a port nothing listens on: what Docker sees when the daemon is gone."""
    output = serving.container.fail("immich-ml-healthcheck", env={"IMMICH_PORT": "3004"})
    assert "127.0.0.1:3004/ping" in output


def test_stop_drains_a_request_in_flight_and_exits_0(
    podman: Podman, ml_image: str, tmp_path: Path, clip_answers: dict[str, Any]
) -> None:
    """An upload stalled half-way at `podman stop` (SIGTERM to PID 1, SIGKILL after 10 s) is still answered."""
    serving = _serve(podman, ml_image, _root_cache(tmp_path))
    body, content_type = multipart(TEXTUAL, text=TEXT)
    with socket.create_connection(("127.0.0.1", serving.port), timeout=30) as upload:
        head = (
            f"POST /predict HTTP/1.1\r\nHost: ml\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        upload.sendall(head.encode() + body[: len(body) // 2])
        until(lambda: serving.health()["inFlight"] == 1, "the upload to be in flight (its headers are in)")
        exit_codes: list[int] = []
        stopping = threading.Thread(target=lambda: exit_codes.append(serving.container.stop(timeout_s=10)))
        stopping.start()
        drain = "stopping: accepting no more; 1 request(s) in flight"
        until(lambda: drain in serving.container.logs(), "SIGTERM's drain")
        upload.sendall(body[len(body) // 2 :])
        response = http.client.HTTPResponse(upload)
        response.begin()
        assert response.status == 200
        assert json.loads(response.read()) == clip_answers["text"]
    stopping.join()
    assert exit_codes == [0], serving.container.logs()
