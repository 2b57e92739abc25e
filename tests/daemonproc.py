"""The real daemon as a child process (`python -m immich_ml serve`), socket-activated on a port the test owns.

The test binds the listening socket and hands it over as systemd does (fd 3, `LISTEN_FDS=1`,
`LISTEN_PID` = the daemon's pid), so the port is known before start and never raced for.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests import modelgen

__all__ = ["Daemon", "Endpoint", "NotifySocket", "multipart", "write_slow_clip"]

_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
_START_TIMEOUT_S = 60


def multipart(entries: object, *, image: bytes | None = None, text: str | None = None) -> tuple[bytes, str]:
    """A multipart body like the Immich server's, and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [(b'name="entries"', json.dumps(entries).encode() if not isinstance(entries, bytes) else entries)]
    if image is not None:
        parts.append((b'name="image"; filename="blob"\r\nContent-Type: application/octet-stream', image))
    if text is not None:
        parts.append((b'name="text"', text.encode()))
    body = (
        b"".join(
            b"--%s\r\nContent-Disposition: form-data; %s\r\n\r\n%s\r\n" % (boundary.encode(), head, data)
            for head, data in parts
        )
        + b"--%s--\r\n" % boundary.encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.messages: list[str] = []

    def receive(self, timeout_s: float = _START_TIMEOUT_S) -> str:
        """The next message (blocking up to `timeout_s`)."""
        self.socket.settimeout(timeout_s)
        message = self.socket.recv(65536).decode()
        self.messages.append(message)
        return message

    def receive_until(self, predicate: Any, timeout_s: float = _START_TIMEOUT_S) -> list[str]:
        """Messages up to and including the first one for which `predicate(message)` is true."""
        deadline = time.monotonic() + timeout_s
        received = []
        while True:
            received.append(self.receive(max(0.01, deadline - time.monotonic())))
            if predicate(received[-1]):
                return received

    def queued(self) -> list[str]:
        """The messages already waiting, without blocking (all of them, once the sender has exited)."""
        self.socket.setblocking(False)
        try:
            while True:
                self.messages.append(self.socket.recv(65536).decode())
        except BlockingIOError:
            return self.messages
        finally:
            self.socket.setblocking(True)

    def close(self) -> None:
        self.socket.close()


class Endpoint:
    """An immich-ml HTTP endpoint at `host`:`port` (HTTPS when `tls_ca` verifies its certificate)."""

    def __init__(self, host: str, port: int, *, tls_ca: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.tls_ca = tls_ca

    def connection(self, timeout_s: float = 30) -> http.client.HTTPConnection:
        """A new keep-alive connection to the daemon."""
        if self.tls_ca is not None:
            context = ssl.create_default_context(cafile=str(self.tls_ca))
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout_s, context=context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """One request on a fresh connection: (status, body)."""
        connection = self.connection()
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def health(self) -> dict[str, Any]:
        """The `/health` document (answered with 503 before ready, 200 after)."""
        return json.loads(self.request("GET", "/health")[1])  # type: ignore[no-any-return]

    def predict(self, entries: object, *, image: bytes | None = None, text: str | None = None) -> tuple[int, Any]:
        body, content_type = multipart(entries, image=image, text=text)
        status, data = self.request("POST", "/predict", body, {"Content-Type": content_type})
        return status, json.loads(data)


class Daemon(Endpoint):
    """One daemon process; `env` adds to a clean environment pointing at `cache`."""

    def __init__(
        self,
        tmp_path: Path,
        cache: Path,
        env: dict[str, str] | None = None,
        *,
        tls_ca: Path | None = None,
        port: int = 0,
        file_limit: int | None = None,
        launcher: tuple[str, ...] = (),
        listener: socket.socket | None = None,
    ) -> None:
        """`port` 0 takes a free one; a fixed one restarts a daemon where a stopped one listened. `file_limit`
        sets the daemon's RLIMIT_NOFILE, soft and hard (a systemd `LimitNOFILE=`). `launcher` is a command
        that execs the daemon's (e.g. `taskset -c 0`), so the daemon keeps the pid started. A `listener`
        given is the caller's to keep open across daemons, as a systemd socket unit keeps it."""
        self.listener = listener or socket.create_server(("127.0.0.1", port))
        super().__init__("127.0.0.1", self.listener.getsockname()[1], tls_ca=tls_ca)
        self.log_path = tmp_path / f"daemon-{self.port}.log"
        base = {key: value for key, value in os.environ.items() if key not in _SYSTEMD_VARS}
        base |= {
            "MACHINE_LEARNING_CACHE_FOLDER": str(cache),
            "MACHINE_LEARNING_PROVIDER": "cpu",
            "MACHINE_LEARNING_REQUEST_THREADS": "2",
            "IMMICH_LOG_LEVEL": "info",
            "NO_COLOR": "1",
        }
        fd = self.listener.fileno()
        with self.log_path.open("ab") as log:  # a restart on the same port appends
            self.process = subprocess.Popen(
                [*launcher, sys.executable, "-c", _ACTIVATE, str(fd)],
                env=base | (env or {}),
                pass_fds=[fd],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=None if file_limit is None else functools.partial(_limit_files, file_limit),
            )
        if listener is None:
            self.listener.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """What the daemon wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Poll `/health` until it answers 200; fail with the daemon's log if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
            if self.request("GET", "/health")[0] == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready after {timeout_s} s:\n{self.log()}")

    def rss_bytes(self) -> int:
        """The daemon's resident set size now."""
        return _status_kib(self.pid, "VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        """The daemon's peak resident set size so far."""
        return _status_kib(self.pid, "VmHWM") * 1024

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


_ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "immich_ml", "serve"])
"""
"""Run by the child: put the socket at fd 3 and set LISTEN_PID to its own pid, which `exec` keeps."""


class KeepAlive:
    """One keep-alive connection to a daemon for many requests, opened again whenever the daemon closes it."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._connection = daemon.connection()

    def post(self, body: bytes, content_type: str, path: str = "/predict") -> int:
        """The reply's status, or 0 when the daemon closed the connection instead of answering."""
        try:
            self._connection.request("POST", path, body=body, headers={"Content-Type": content_type})
            response = self._connection.getresponse()
            response.read()
            return response.status
        except (http.client.HTTPException, ConnectionError):  # framing the daemon could not trust
            self._connection.close()
            self._connection = self._daemon.connection()
            return 0

    def close(self) -> None:
        self._connection.close()


def _limit_files(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def write_slow_clip(root: Path, name: str, *, iterations: int = 400, size: int = 384) -> Path:
    """A CLIP model whose visual graph is genuinely slow: a Loop of `iterations` size×size MatMuls.

    The loop's result is folded into the embedding (times zero), so ONNX Runtime cannot skip it. Returns
    the model directory.
    """
    model_dir = modelgen.write_clip(root, name)
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["state_in", "w"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [size, size]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [size, size]),
        ],
    )
    projection = rng.standard_normal((3, 512)).astype(np.float32)
    nodes = [
        helper.make_node("Loop", ["trips", "always", "w"], ["spun"], body=body),
        helper.make_node("ReduceSum", ["spun"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("ReduceMean", ["image"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["means", "projection"], ["projected"]),
        helper.make_node("Add", ["projected", "nothing"], ["shifted"]),
        helper.make_node("Sin", ["shifted"], ["embedding"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "always"),
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(projection, "projection"),
    ]
    graph = helper.make_graph(
        nodes,
        "slow_clip_visual",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 512])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, model_dir / "visual" / "model.onnx")
    return model_dir
