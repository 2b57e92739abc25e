"""The listening sockets across a restart: SIGHUP re-executes the daemon in the same process (same pid, so a
container's PID 1 or a supervisor sees no exit) with its listening sockets passed as systemd passes them, and
a stop is bounded by one deadline however it ends."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable

from immich_ml.daemon.systemd import LISTEN_FDS_START
from immich_ml.log import SERVER_LOG as log

__all__ = ["Handoff", "arm_backstop"]

_HIGH_FD = 256  # sockets are first moved above this, so placing them at 3, 4, … overwrites none of them


class Handoff:
    """Copies of the listening sockets that outlive the serving loop (which closes its own when it stops
    accepting), so that connections keep arriving in the backlog until the re-executed daemon accepts them."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self._copies = [os.dup(sock.fileno()) for sock in sockets]
        self.requested = False
        """Whether a re-exec was asked for (SIGHUP) rather than a stop."""

    def release(self) -> None:
        """Let the sockets go (a stop, not a re-exec): once the serving loop closes its own, they are closed."""
        for fd in self._copies:
            os.close(fd)
        self._copies = []

    def exec(self) -> None:
        """Replace this process with a new daemon started the same way, its listening sockets at fd 3, 4, …
        with `LISTEN_FDS`/`LISTEN_PID` as systemd sets them. Never returns."""
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, _HIGH_FD) for fd in self._copies]
        for offset, fd in enumerate(high):
            os.dup2(fd, LISTEN_FDS_START + offset, inheritable=True)
        env = {key: value for key, value in os.environ.items() if key != "LISTEN_FDNAMES"}
        env |= {"LISTEN_FDS": str(len(high)), "LISTEN_PID": str(os.getpid())}
        log.info("re-executing %s on the same listening socket(s)", " ".join(sys.orig_argv))
        logging.shutdown()  # flush what was logged: exec discards buffers
        os.execve(sys.executable, sys.orig_argv, env)


def arm_backstop(timeout_s: float, finish: Callable[[], None]) -> threading.Timer:
    """Call `finish` from a thread after `timeout_s` if the stop is still not over (a wedged inference thread,
    a model that will not close): the stop's one deadline holds whatever the loop is waiting for."""

    def overdue() -> None:
        log.error("the stop took longer than %.0f s; ending now", timeout_s)
        finish()

    timer = threading.Timer(timeout_s, overdue)
    timer.daemon = True
    timer.start()
    return timer
