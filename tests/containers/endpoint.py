"""The daemon in a container as a client sees it: a published port on the host, /ping, /health and /predict."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.containers.podman import Container
from tests.daemonproc import exchange, multipart

__all__ = ["Endpoint", "until"]

_START_TIMEOUT_S = 120.0


def until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s`, so a wait never hangs the suite."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s} s waiting for {what}")


@dataclass
class Endpoint:
    """`container`'s port 3003, published on the host's loopback."""

    container: Container
    port: int

    @classmethod
    def of(cls, container: Container) -> Endpoint:
        return cls(container, container.host_port(3003))

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """One request on a fresh connection: (status, body)."""
        return exchange(http.client.HTTPConnection("127.0.0.1", self.port, timeout=30), method, path, body, headers)

    def predict(self, entries: object, *, image: bytes | None = None, text: str | None = None) -> tuple[int, Any]:
        body, content_type = multipart(entries, image=image, text=text)
        status, data = self.request("POST", "/predict", body, {"Content-Type": content_type})
        return status, json.loads(data)

    def health(self) -> dict[str, Any]:
        return json.loads(self.request("GET", "/health")[1])  # type: ignore[no-any-return]

    def wait_ready(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Poll `/health` until it answers 200 (preloaded models warm); fail with the logs if the container
        stops or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.container.inspect()["State"]["Running"]:
                raise AssertionError(f"container exited:\n{self.container.logs()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except (ConnectionError, http.client.HTTPException):
                pass  # not listening yet (or the port forwarder answered before the daemon did)
        raise AssertionError(f"not ready after {timeout_s} s:\n{self.container.logs()}")
