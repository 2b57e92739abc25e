"""A real nginx in front of two real daemons: clients see no failed request across a drain, a restart and a kill.

nginx (Debian's package, run as the current user with everything in tmp_path) gets the proxy directives that
nix/balancer.nix generates and docs/scaling.md shows. Under steady load from a few clients sending CLIP text
queries, one backend is stopped with SIGTERM (it drains: in-flight requests finish, new ones get 503, which nginx
retries on the other backend), restarted on the same port, and then the other backend is killed with SIGKILL
(nginx retries its in-flight and refused requests on the survivor).
"""

from __future__ import annotations

import http.client
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import modelgen
from tests.conftest import CLIP
from tests.daemonproc import Daemon, multipart

BACKEND_ENV = {"MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": CLIP, "MACHINE_LEARNING_PING_REQUIRES_READY": "true"}
CLIENTS = 4
DEADLINE_S = 20

# The location directives of nix/balancer.nix (and docs/scaling.md), timeouts shortened for a test.
PROXY_DIRECTIVES = """
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_next_upstream error timeout http_503 non_idempotent;
    proxy_next_upstream_tries 0;
    proxy_connect_timeout 1s;
    proxy_send_timeout 10s;
    proxy_read_timeout 10s;
    proxy_request_buffering on;
    client_body_buffer_size 1m;
    client_max_body_size 128m;
"""


@pytest.fixture
def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    assert found, "nginx is needed to balance two daemons (scripts/setup-venv --test installs it)"
    return found


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


class Nginx:
    """nginx in the foreground with a generated configuration, all of its files under `root`."""

    def __init__(self, binary: str, root: Path, backends: list[int]) -> None:
        self.port = _free_port()
        self.error_log = root / "error.log"
        temp = root / "temp"
        temp.mkdir(parents=True)
        # As root, workers would switch to `nobody`, who cannot write the temp dirs: stay the current user.
        user = f"user {pwd.getpwuid(os.getuid()).pw_name};" if os.geteuid() == 0 else ""
        servers = "".join(f"server 127.0.0.1:{port} max_fails=1 fail_timeout=1s;\n" for port in backends)
        config = root / "nginx.conf"
        config.write_text(f"""
{user}
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {self.error_log} warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  upstream immich-ml {{
    least_conn;
    {servers}
    keepalive 16;
    keepalive_timeout 5s;
  }}
  server {{
    listen 127.0.0.1:{self.port};
    location / {{
      proxy_pass http://immich-ml;
      add_header X-Upstream $upstream_addr always;
      {PROXY_DIRECTIVES}
    }}
  }}
}}
""")
        self.process = subprocess.Popen(
            [binary, "-p", str(root), "-e", str(self.error_log), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        _wait_for(self._listening, DEADLINE_S, lambda: f"nginx did not start:\n{self.log()}")

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def log(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Load:
    """Client threads sending CLIP text queries through nginx, each on its own keep-alive connection."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.successes = 0
        self.failures: list[str] = []
        self.upstreams: Counter[str] = Counter()
        self.retried = 0
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self, client: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = 0
        while not self.stopping.is_set():
            sent += 1
            body, content_type = multipart({"clip": {"textual": {"modelName": CLIP}}}, text=f"client {client} #{sent}")
            try:
                connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
                response = connection.getresponse()
                data = response.read()
                upstream = response.getheader("X-Upstream", "")
                outcome = None if response.status == 200 and b'"clip"' in data else f"{response.status} {data[:200]!r}"
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                upstream, outcome = "", f"{type(error).__name__}: {error}"
            with self.lock:
                if outcome is None:
                    self.successes += 1
                    # After retries nginx lists every backend it tried: "a, b".
                    self.upstreams[upstream.split(", ")[-1]] += 1
                    self.retried += ", " in upstream
                else:
                    self.failures.append(outcome)
        connection.close()

    def succeeded(self) -> int:
        with self.lock:
            return self.successes

    def wait_for_more(self, count: int, what: str) -> None:
        """Wait until `count` more requests have succeeded (fail early once any request failed)."""
        target = self.succeeded() + count

        def reached() -> bool:
            assert not self.failures, f"{what}: {self.failures[:5]}"
            return self.succeeded() >= target

        _wait_for(reached, DEADLINE_S, lambda: f"{what}: only {self.succeeded()} of {target} successes")

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(40)


def _wait_for(condition: Callable[[], bool], timeout_s: float, describe: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(describe())
        time.sleep(0.02)


def _served(daemon: Daemon) -> int:
    """Successful predict requests the daemon counted in /metrics (parsed with prometheus-client's parser)."""
    status, body = daemon.request("GET", "/metrics")
    assert status == 200, body
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
            if sample.name == "immich_ml_requests_total" and sample.labels.get("status") == "200"
        )
    )


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[list[Daemon]]:
    """Two daemons sharing one model cache; the test may replace them (the list is theirs to edit)."""
    cache = tmp_path / "cache"
    modelgen.write_clip(cache, CLIP)
    daemons = [Daemon(tmp_path, cache, BACKEND_ENV) for _ in range(2)]
    try:
        yield daemons
    finally:
        for daemon in daemons:
            daemon.kill()


def test_clients_see_no_failure_across_a_drain_a_restart_and_a_kill(
    tmp_path: Path, nginx_binary: str, backends: list[Daemon]
) -> None:
    for daemon in backends:
        daemon.wait_ready()
    first, second = backends
    nginx = Nginx(nginx_binary, tmp_path / "nginx", [first.port, second.port])
    load = Load(nginx.port, CLIENTS)
    started = time.monotonic()
    try:
        _wait_for(
            lambda: not load.failures and min(_served(first), _served(second)) >= 10,
            DEADLINE_S,
            lambda: f"both backends should take traffic: {load.failures[:5]} {load.upstreams}",
        )
        first_before_drain = _served(first)

        first.process.send_signal(signal.SIGTERM)  # drain
        assert first.process.wait(DEADLINE_S) == 0, first.log()
        load.wait_for_more(20, "with the first backend drained and gone")

        backends[0] = first = Daemon(tmp_path, tmp_path / "cache", BACKEND_ENV, port=first.port)
        first.wait_ready()
        _wait_for(
            lambda: _served(first) >= 10,
            DEADLINE_S,
            lambda: f"the restarted backend should get traffic again: {load.failures[:5]}",
        )
        second_before_kill = _served(second)

        second.process.kill()
        second.process.wait()
        load.wait_for_more(20, "with the second backend killed")
    finally:
        load.stop()
        nginx.stop()
    elapsed = time.monotonic() - started

    print(
        f"\nbalancer: {load.successes + len(load.failures)} requests in {elapsed:.1f} s from {CLIENTS} clients, "
        f"{len(load.failures)} failed, {load.retried} retried by nginx; served per backend (client side): "
        f"{dict(load.upstreams)}; /metrics: first {first_before_drain} before its drain and {_served(first)} "
        f"after its restart, second {second_before_kill} before its kill"
    )
    assert load.failures == [], load.failures[:10]
    assert first_before_drain > 0 and second_before_kill > 0 and _served(first) > 0
    assert load.retried > 0, "the drain and the kill should have made nginx retry some requests"
    assert "no live upstreams" not in nginx.log(), nginx.log()
