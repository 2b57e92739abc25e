"""The daemon in a container as a client sees it: its port 3003 published on the host's loopback."""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable

from tests.containers.podman import Container
from tests.daemonproc import Endpoint

__all__ = ["ContainerEndpoint", "until"]

_START_TIMEOUT_S = 120.0


def until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s`, so a wait never hangs the suite."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s} s waiting for {what}")


class ContainerEndpoint(Endpoint):
    """`container`'s port 3003, published on 127.0.0.1."""

    def __init__(self, container: Container) -> None:
        super().__init__("127.0.0.1", container.host_port(3003))
        self.container = container

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
