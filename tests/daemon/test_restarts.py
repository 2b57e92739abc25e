"""Restarts on a socket that outlives the daemon (a systemd socket unit, or SIGHUP's re-exec): nothing sent is
refused, new connections wait in the backlog for the next instance, and a stop never outlasts its deadline."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import modelgen
from tests.conftest import CLIP
from tests.daemonproc import Daemon, NotifySocket, multipart, write_slow_clip
from tests.restartload import (
    RESTARTS,
    ImmichLoad,
    Restart,
    expect_alone,
    immich_requests,
    in_flight_at_stops,
    loaded_cache,
    report,
    summary,
)

SLOW = "ViT-B-16__openai"
PRELOAD = {"MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": CLIP, "MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": CLIP}
TEXT = {"clip": {"textual": {"modelName": CLIP}}}


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """The listening socket, held by the test as systemd's socket unit holds it."""
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def _wait_for_log(daemon: Daemon, text: str, *, times: int = 1, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while daemon.log().count(text) < times:
        assert daemon.process.poll() is None, daemon.log()
        assert time.monotonic() < deadline, f"not {times} × {text!r} in:\n{daemon.log()}"
        time.sleep(0.02)


def _post(connection: http.client.HTTPConnection, entries: object, **inputs: Any) -> tuple[int, Any, str | None]:
    body, content_type = multipart(entries, **inputs)
    connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
    response = connection.getresponse()
    return response.status, json.loads(response.read()), response.getheader("Connection")


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_what_was_sent_and_leaves_new_connections_to_the_next_instance(
    tmp_path: Path, notify: NotifySocket, listener: socket.socket, daemons: list[Daemon], workers: int
) -> None:
    cache = tmp_path / "cache"
    modelgen.write_clip(cache, CLIP)
    write_slow_clip(cache, SLOW, iterations=2000)  # still running when SIGTERM arrives
    settings = PRELOAD | {"MACHINE_LEARNING_WORKERS": str(workers)}
    env = settings | {"NOTIFY_SOCKET": str(notify.path)}
    old = Daemon(tmp_path, cache, env, listener=listener)
    daemons.append(old)
    notify.receive_until(lambda message: "READY=1" in message)
    idle = old.connection()  # a keep-alive connection, idle at SIGTERM, that the client then uses
    idle.request("GET", "/ping")
    assert idle.getresponse().read() == b"pong"

    outcome: dict[str, object] = {}
    image = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 48))
    slow = threading.Thread(
        target=lambda: outcome.update(slow=old.predict({"clip": {"visual": {"modelName": SLOW}}}, image=image))
    )
    slow.start()
    deadline = time.monotonic() + 60
    while old.health()["inFlight"] != 1:  # the request was accepted and is running (by the worker asked)
        assert slow.is_alive() and time.monotonic() < deadline, outcome
    old.process.send_signal(signal.SIGTERM)  # to the parent, with workers: it stops them
    _wait_for_log(old, "stopping: accepting no more;", times=workers)  # every worker
    assert "accepting no more; 1 request(s) in flight" in old.log()
    assert "STOPPING=1" in "".join(notify.receive_until(lambda message: "STOPPING=1" in message, timeout_s=10))

    status, on_idle, connection_header = _post(idle, TEXT, text="a dog")  # sent after SIGTERM: answered, not refused
    assert (status, connection_header) == (200, "close"), on_idle
    waiting = threading.Thread(target=lambda: outcome.update(waiting=old.predict(TEXT, text="a dog")))
    waiting.start()  # a new connection: nobody accepts it now, it waits in the listener's backlog
    slow.join(60)
    assert outcome["slow"][0] == 200, outcome  # type: ignore[index]
    assert old.process.wait(30) == 0, old.log()
    assert waiting.is_alive() and "waiting" not in outcome  # the old daemon is gone: it never answered it

    new = Daemon(tmp_path, cache, settings, listener=listener)
    daemons.append(new)
    waiting.join(60)
    assert outcome["waiting"] == (200, on_idle), outcome
    assert new.predict(TEXT, text="a dog") == (200, on_idle)  # the same input sent alone


def test_a_stop_with_a_stalled_upload_ends_within_the_one_deadline(tmp_path: Path, daemons: list[Daemon]) -> None:
    cache = tmp_path / "cache"
    modelgen.write_clip(cache, CLIP)
    env = PRELOAD | {"MACHINE_LEARNING_SHUTDOWN_TIMEOUT_S": "3", "MACHINE_LEARNING_BODY_TIMEOUT_S": "600"}
    daemon = Daemon(tmp_path, cache, env)
    daemons.append(daemon)
    daemon.wait_ready()
    body, content_type = multipart({"clip": {"visual": {"modelName": CLIP}}}, image=b"\xff\xd8" + bytes(100_000))
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as stalled:
        stalled.sendall(head + body[: len(body) // 2])  # half the body, then nothing
        deadline = time.monotonic() + 10
        while daemon.health()["inFlight"] < 1:
            assert time.monotonic() < deadline, "the stalled upload is not counted as in flight"
        signalled = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(3 + 5) == 0, daemon.log()  # bounded by the one deadline, not twice it
        took_s = time.monotonic() - signalled
        try:
            reply = stalled.recv(65536)
        except ConnectionResetError:
            reply = b""
    assert reply == b"", reply  # closed without an answer: the upload never finished
    assert "1 request(s) still running after 2.7 s; closing 1 connection(s)" in daemon.log(), daemon.log()
    assert took_s < 3 + 2, took_s


def test_sighup_restarts_under_an_immich_like_load_fail_no_request(
    tmp_path: Path, notify: NotifySocket, daemons: list[Daemon]
) -> None:
    env = loaded_cache(tmp_path / "cache") | {"NOTIFY_SOCKET": str(notify.path)}
    daemon = Daemon(tmp_path, tmp_path / "cache", env)
    daemons.append(daemon)
    notify.receive_until(lambda message: "READY=1" in message)
    requests = immich_requests(tmp_path)
    expect_alone(daemon.port, requests)
    load = ImmichLoad(f"http://127.0.0.1:{daemon.port}/", requests, tmp_path, concurrency=4)
    restarts: list[Restart] = []
    try:
        while summary(load.done, restarts)["counted"] < RESTARTS and len(restarts) < 2 * RESTARTS:
            load.steady(daemon.port, restarts[-1].ready if restarts else 0.0)
            restarts.append(Restart(time.time()))
            daemon.process.send_signal(signal.SIGHUP)
            notify.receive_until(lambda message: "READY=1" in message)
            restarts[-1].ready = time.time()
            assert daemon.process.poll() is None, daemon.log()  # the same process, re-executed
            restarts[-1].in_flight = in_flight_at_stops(daemon.log())[-1]
    finally:
        records = load.stop()
    assert len(in_flight_at_stops(daemon.log())) == len(restarts)
    result = summary(records, restarts)
    report("sighup", result)
    assert result["failed"] == 0, result
    assert result["counted"] >= RESTARTS, result


def test_an_idle_keep_alive_connection_is_closed_after_its_grace_not_held_to_the_deadline(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    cache = tmp_path / "cache"
    modelgen.write_clip(cache, CLIP)
    daemon = Daemon(tmp_path, cache, PRELOAD | {"MACHINE_LEARNING_SHUTDOWN_TIMEOUT_S": "120"})
    daemons.append(daemon)
    daemon.wait_ready()
    idle = daemon.connection()
    idle.request("GET", "/ping")
    assert idle.getresponse().read() == b"pong"
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(60) == 0, daemon.log()  # the idle grace (5 s), far from the 120 s deadline
    try:
        assert idle.sock is not None and idle.sock.recv(1) == b""  # closed by the daemon, never answered half-way
    finally:
        idle.close()
    assert "still running" not in daemon.log()
