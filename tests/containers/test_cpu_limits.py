"""The daemon under CPU limits: in a container with `--cpus` (a CFS quota: cgroup v1 on this host) and under
`taskset -c 0` (an affinity mask). /health must report the usable CPUs, and the threads the process really
has must follow them.

Each case starts the daemon with a small CLIP visual model preloaded, sends a burst of concurrent image
requests so every pool grows as far as it may, then compares /health with /proc/PID/task/*/comm (the pools
and ONNX Runtime's threads carry OS names: `immich_ml.inference.threads`).
"""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests import modelgen
from tests.containers.daemon_image import PROGRAM
from tests.containers.podman import Container, Podman
from tests.daemonproc import Daemon, multipart

CLIP = "ViT-B-32__openai"
ENV = {
    "MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": CLIP,
    "MACHINE_LEARNING_PROVIDER": "cpu",
    "HF_HUB_OFFLINE": "1",
    "IMMICH_LOG_LEVEL": "info",
    "NO_COLOR": "1",
}
VISUAL = {"clip": {"visual": {"modelName": CLIP}}}
BURST = 8
"""Concurrent requests: more than any pool may have threads here, so a pool sized too big would show."""
ORT_THREADS = "immich-ml-ort"
_READY_TIMEOUT_S = 120


def thread_names(pid: int) -> Counter[str]:
    """How many threads of process `pid` carry each OS name."""
    return Counter(comm.read_text().strip() for comm in Path(f"/proc/{pid}/task").glob("*/comm"))


def request(port: int, method: str, path: str, body: bytes | None = None, content_type: str = "") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type} if body else {})
        response = connection.getresponse()
        return response.status, response.read()
    except (ConnectionError, http.client.HTTPException):
        return 0, b""  # not listening yet (podman's port forwarder accepts, then drops the connection)
    finally:
        connection.close()


def wait_ready(port: int, running: Any) -> None:
    """Poll /health until it answers 200; fail if `running()` turns false or it takes too long."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while request(port, "GET", "/health")[0] != 200:
        assert running(), "the daemon exited before it was ready"
        assert time.monotonic() < deadline, f"daemon not ready after {_READY_TIMEOUT_S} s"
        time.sleep(0.1)


def serve_a_burst(port: int) -> dict[str, Any]:
    """`BURST` image requests at once, all answered 200; then the /health document."""
    body, content_type = multipart(VISUAL, image=modelgen.jpeg_bytes(modelgen.make_gradient_image(320, 240)))
    with ThreadPoolExecutor(BURST) as clients:
        statuses = list(clients.map(lambda _: request(port, "POST", "/predict", body, content_type)[0], range(BURST)))
    assert statuses == [200] * BURST
    status, health = request(port, "GET", "/health")
    assert status == 200
    return json.loads(health)  # type: ignore[no-any-return]


def assert_sized_for(health: dict[str, Any], threads: Counter[str], usable: int) -> None:
    """/health says `usable` threads and the process has no more than that in any pool."""
    assert (health["cpus"]["threads"], health["cpus"]["requestThreads"]) == (usable, usable)
    (model,) = health["models"]
    # CLIP's batches share the session's threads: half the usable CPUs, but upstream's 2 where there are 2.
    assert model["intraOpThreads"] == usable
    assert model["concurrentBatches"] == [min(2, usable)]
    assert threads[ORT_THREADS] == usable - 1  # ONNX Runtime runs on the caller's thread and usable - 1 of its own
    assert 1 <= threads["immich-ml-image"] <= usable  # decoding and pre-processing
    assert threads["immich-ml-query"] <= usable  # model loading and text queries


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cpu-limits-cache")
    modelgen.write_clip(cache, CLIP)
    return cache


@pytest.mark.parametrize(
    ("cpus", "usable", "quota"), [("1", 1, "100000/100000"), ("1.5", 1, "150000/100000"), ("2", 2, "200000/100000")]
)
def test_a_container_cpu_quota_sizes_the_threads(
    podman: Podman, immich_ml_image: str, model_cache: Path, cpus: str, usable: int, quota: str
) -> None:
    container = podman.run(
        immich_ml_image,
        PROGRAM,
        "serve",
        publish=["127.0.0.1::3003"],
        volumes=[f"{model_cache}:/cache"],
        env={**ENV, "MACHINE_LEARNING_CACHE_FOLDER": "/cache", "IMMICH_HOST": "0.0.0.0"},
        options=[f"--cpus={cpus}"],
    )
    port = container.host_port(3003)
    wait_ready(port, lambda: is_running(container))
    health = serve_a_burst(port)
    assert health["cpus"]["quota"] == quota and health["cpus"]["usable"] == float(cpus)
    assert_sized_for(health, thread_names(int(container.inspect()["State"]["Pid"])), usable)
    assert f"usable CPUs: {float(cpus):g} CPUs (quota {quota} in /sys/fs/cgroup/cpu, " in container.logs()


def test_taskset_to_one_cpu_sizes_the_threads(tmp_path: Path, model_cache: Path) -> None:
    daemon = Daemon(
        tmp_path, model_cache, {**ENV, "MACHINE_LEARNING_REQUEST_THREADS": "0"}, launcher=("taskset", "-c", "0")
    )
    try:
        wait_ready(daemon.port, lambda: daemon.process.poll() is None)
        health = serve_a_burst(daemon.port)
        assert health["cpus"]["affinity"] == 1
        assert_sized_for(health, thread_names(daemon.pid), 1)
        assert "usable CPUs: 1 CPUs (affinity 1 CPUs), 1 thread;" in daemon.log()
    finally:
        assert daemon.stop() == 0


def is_running(container: Container) -> bool:
    return bool(container.inspect()["State"]["Running"])
