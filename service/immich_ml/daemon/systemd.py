"""The systemd protocols: sd_notify messages, the lifecycle reporter, socket activation. Silent without systemd."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping

from immich_ml.log import SYSTEMD_LOG as log

__all__ = ["EXTEND_BY_USEC", "EXTEND_EVERY_S", "LISTEN_FDS_START", "Notifier", "Reporter", "listen_sockets"]


LISTEN_FDS_START = 3
"""The first file descriptor systemd passes to a socket-activated service (SD_LISTEN_FDS_START)."""
EXTEND_EVERY_S = 5.0  # while starting, ask systemd for more start-up time this often ...
EXTEND_BY_USEC = 20_000_000  # ... by this much each time


class Notifier:
    """Sends `KEY=value` lines to `$NOTIFY_SOCKET` (a datagram socket); does nothing when it is unset."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None  # opened on the first send

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` if meant for this process."""
        env = os.environ if env is None else env
        watchdog_usec = None
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (not pid or pid == str(os.getpid())):
            watchdog_usec = int(env["WATCHDOG_USEC"]) or None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given."""
        return bool(self.address)

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, or None without a watchdog."""
        return self.watchdog_usec / 2_000_000 if self.enabled and self.watchdog_usec else None

    def send(self, *lines: str) -> None:
        """Send one message made of `lines` (e.g. `"READY=1"`, `"STATUS=…"`); failures are logged, not raised."""
        if not self.address or not lines:
            return
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        try:
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as error:
            log.debug("sd_notify to %s failed: %s", self.address, error)

    def close(self) -> None:
        """Close the socket (a later send opens it again)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class Reporter:
    """The service's lifecycle told to systemd, for one process or for a parent of several workers.

    Call `report` every tick: while not ready it extends the start-up timeout every few seconds (model
    downloads and TensorRT builds can be long); READY=1 goes out once, with the status; STATUS whenever it
    changes; WATCHDOG=1 at the watchdog interval while the caller says the service is healthy.
    """

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.status = ""
        self._ready_sent = False
        self._last_extend = self._last_ping = float("-inf")

    def tick_s(self, longest: float) -> float:
        """How often to call `report`: at most `longest` apart, and often enough for the watchdog."""
        return min(longest, self.notifier.watchdog_interval_s or longest)

    def report(self, *, ready: bool, status: str, healthy: bool) -> None:
        """Send what changed since the last call, and the pings that are due."""
        now = time.monotonic()
        if ready and not self._ready_sent:
            self.notifier.send("READY=1", f"STATUS={status}")
            self._ready_sent, self.status = True, status
        elif not self._ready_sent and now - self._last_extend >= EXTEND_EVERY_S:
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={EXTEND_BY_USEC}")
            self._last_extend = now
        if status != self.status:
            self.notifier.send(f"STATUS={status}")
            self.status = status
        interval = self.notifier.watchdog_interval_s
        if interval is not None and healthy and now - self._last_ping >= interval:
            self.notifier.send("WATCHDOG=1")
            self._last_ping = now

    def stopping(self, status: str, *, reloading: bool = False) -> None:
        """STOPPING=1 before the drain starts; or RELOADING=1 before a re-exec, whose READY=1 ends it."""
        self.status = status
        if reloading:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")
        else:
            self.notifier.send("STOPPING=1", f"STATUS={status}")


def listen_sockets(env: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed (`LISTEN_FDS` for this `LISTEN_PID`), removing the variables.

    Empty when the service was not socket-activated. The variables are removed, as `sd_listen_fds(1)` does,
    so processes started later do not try to take the same descriptors.
    """
    env = os.environ if env is None else env
    count, pid = env.get("LISTEN_FDS", ""), env.get("LISTEN_PID", "")
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if not count.isdigit() or pid != str(os.getpid()):
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
