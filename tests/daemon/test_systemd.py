"""sd_notify and socket activation against the real daemon process and a real datagram socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from immich_ml.daemon.systemd import Notifier, listen_sockets
from tests import modelgen
from tests.conftest import CLIP
from tests.daemonproc import Daemon, NotifySocket, write_slow_clip

SLOW = "ViT-B-16__openai"
PRELOAD = {"MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": CLIP, "MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": CLIP}


def _keys(message: str) -> list[str]:
    return [line.split("=", 1)[0] + ("=1" if line.endswith("=1") else "") for line in message.splitlines()]


def test_notifier_is_silent_without_notify_socket() -> None:
    notifier = Notifier.from_env({})
    notifier.send("READY=1")
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "3000000"}
    assert Notifier.from_env(env).watchdog_interval_s == 1.5
    assert Notifier.from_env(env | {"WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 1.5
    assert Notifier.from_env(env | {"WATCHDOG_PID": "1"}).watchdog_interval_s is None


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"immich-ml-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        notifier.send("READY=1", "STATUS=ok")
        notifier.close()
        assert receiver.recv(100) == b"READY=1\nSTATUS=ok"


def test_listen_sockets_ignores_descriptors_meant_for_another_process() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "http"}
    assert listen_sockets(env) == []
    assert env == {}  # removed, so worker processes do not try to take them


def test_daemon_reports_ready_status_watchdog_and_stopping_in_order(
    tmp_path: Path, notify: NotifySocket, daemons: list[Daemon]
) -> None:
    modelgen.write_clip(tmp_path / "cache", CLIP)
    daemon = Daemon(
        tmp_path, tmp_path / "cache", PRELOAD | {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
    )
    daemons.append(daemon)

    before_ready = notify.receive_until(lambda message: "READY=1" in message)
    ready = before_ready[-1]
    assert "EXTEND_TIMEOUT_USEC" in before_ready[0]
    assert f"clip/{CLIP}/visual on CPU" in ready and f"clip/{CLIP}/textual on CPU" in ready
    assert ready.splitlines()[1].startswith("STATUS=ready;")
    assert daemon.health()["ready"]  # READY=1 came after warm-up: the daemon already answers as ready
    notify.receive_until(lambda message: message == "WATCHDOG=1", timeout_s=5)
    notify.receive_until(lambda message: message == "WATCHDOG=1", timeout_s=5)  # pings keep coming

    daemon.process.send_signal(15)
    stopping = notify.receive_until(lambda message: "STOPPING=1" in message, timeout_s=10)
    assert daemon.process.wait(30) == 0
    assert all("READY=1" not in message for message in stopping)
    order = [key for message in notify.messages for key in _keys(message)]
    assert order.index("EXTEND_TIMEOUT_USEC") < order.index("READY=1") < order.index("STOPPING=1")
    assert "WATCHDOG=1" in order[order.index("READY=1") : order.index("STOPPING=1")]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("preload", [False, True], ids=["nothing-preloaded", "preloaded"])
def test_strict_mode_without_the_provider_fails_the_start(
    tmp_path: Path, notify: NotifySocket, daemons: list[Daemon], workers: int, preload: bool
) -> None:
    """PROVIDER=cuda on this CPU-only onnxruntime, strict: no READY=1, /health never ready, a non-zero exit,
    and a log line naming the provider and what to install (docs/operations.md promises a failed start)."""
    modelgen.write_clip(tmp_path / "cache", CLIP)
    env = {
        "MACHINE_LEARNING_PROVIDER": "cuda",
        "MACHINE_LEARNING_PROVIDER_STRICT": "true",
        "MACHINE_LEARNING_WORKERS": str(workers),
        "NOTIFY_SOCKET": str(notify.path),
    }
    daemon = Daemon(tmp_path, tmp_path / "cache", (PRELOAD if preload else {}) | env)
    daemons.append(daemon)

    health = []
    while daemon.process.poll() is None and 200 not in health:  # until it exits by itself (or is ready)
        try:
            health.append(daemon.request("GET", "/health")[0])
        except ConnectionError:
            health.append(0)  # not listening (yet, or any more)

    assert 200 not in health, daemon.log()
    assert daemon.process.wait() == 1
    messages = notify.queued()
    assert not [message for message in messages if "READY=1" in message]
    lacks = "provider cuda asked for, but this onnxruntime build lacks CUDAExecutionProvider"
    assert f"refusing to start (MACHINE_LEARNING_PROVIDER_STRICT=true): {lacks}" in daemon.log()
    assert "install onnxruntime-gpu or use the CUDA package" in daemon.log()
    if workers == 1:
        assert any(line.startswith(f"STATUS=failed: {lacks}") for m in messages for line in m.splitlines())


def test_wedged_inference_withholds_watchdog_pings_until_it_finishes(
    tmp_path: Path, notify: NotifySocket, daemons: list[Daemon]
) -> None:
    # About 1.5 s per inference on a quiet 2-core machine: well over the 0.3 s stall limit below.
    write_slow_clip(tmp_path / "cache", SLOW, iterations=2000)
    daemon = Daemon(
        tmp_path,
        tmp_path / "cache",
        {
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": "200000",
            "MACHINE_LEARNING_WATCHDOG_INFERENCE_TIMEOUT_S": "0.3",
        },
    )
    daemons.append(daemon)
    notify.receive_until(lambda message: "READY=1" in message)
    image = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 48))
    slow = threading.Thread(
        target=daemon.predict, args=({"clip": {"visual": {"modelName": SLOW}}},), kwargs={"image": image}
    )
    slow.start()

    notify.receive_until(lambda message: message.startswith("STATUS=inference stalled"), timeout_s=30)
    assert daemon.health()["stalled"] == [f"clip/{SLOW}/visual"]
    while_stalled = notify.receive_until(lambda message: message.startswith("STATUS=ready"), timeout_s=60)
    assert "WATCHDOG=1" not in while_stalled
    notify.receive_until(lambda message: message == "WATCHDOG=1", timeout_s=5)  # pings resume
    slow.join(30)
    assert daemon.stop() == 0


def test_log_lines_carry_journald_priorities_only_on_the_journal_stream(tmp_path: Path) -> None:
    script = (
        "import logging; from immich_ml.log import setup_logging; setup_logging('INFO', no_color=False); "
        "logging.getLogger('immich_ml.test').error('boom'); logging.getLogger('immich_ml.test').info('fine')"
    )
    lines = {}
    for journal in (True, False):
        out = tmp_path / f"stderr-{journal}"
        with out.open("wb") as stderr:
            stat = os.fstat(stderr.fileno())
            env = {key: value for key, value in os.environ.items() if key != "JOURNAL_STREAM"}
            if journal:
                env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
            subprocess.run([sys.executable, "-c", script], env=env, stderr=stderr, check=True)
        lines[journal] = out.read_text().splitlines()
    assert lines[True] == ["<3>ERROR immich_ml.test: boom", "<6>INFO immich_ml.test: fine"]
    assert lines[False] == ["ERROR immich_ml.test: boom", "INFO immich_ml.test: fine"]  # no colour: not a TTY
