"""`immich-ml-init`, the image's PID 1: take over the cache, drop root, run the daemon, pass signals on.

The kernel delivers to PID 1 only the signals it has a handler for, and an exited child of PID 1 stays a
zombie until PID 1 reaps it. So the daemon does not run as PID 1: this small process starts it, forwards
`docker stop`'s SIGTERM (and SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) to it from the first instant, reaps
every orphan, and exits with the daemon's status (0 after a drain).

Started as root (Docker's default, like upstream's image), it first makes the model cache owned by the
image's user (a `model-cache` volume filled by upstream's root image is root-owned), then drops to that
user for good before starting anything. Started as another user (`--user`, Kubernetes `runAsUser`), it
changes nothing and runs the daemon as that user.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from immich_ml.container.ownership import take_ownership
from immich_ml.errors import ConfigError
from immich_ml.settings import Settings

__all__ = ["DEFAULT_COMMAND", "IMAGE_USER", "main"]

IMAGE_USER = "immich-ml"
"""The unprivileged user the image creates and the daemon runs as."""
DEFAULT_COMMAND = ("immich-ml", "serve")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare as root if started so, then run `argv` (default `immich-ml serve`) until it exits."""
    command = list(sys.argv[1:] if argv is None else argv) or list(DEFAULT_COMMAND)
    if os.getuid() == 0:
        try:
            cache = Settings.from_env().cache_folder
        except ConfigError as error:
            print(f"immich-ml-init: configuration error: {error}", file=sys.stderr)
            return 2
        user = pwd.getpwnam(IMAGE_USER)
        try:
            if changed := take_ownership(cache, user.pw_uid, user.pw_gid):
                print(f"immich-ml-init: {cache}: {changed} entries now owned by {IMAGE_USER}", file=sys.stderr)
        except OSError as error:  # a read-only cache can still serve the models it holds
            print(f"immich-ml-init: cannot take ownership of {cache}: {error}", file=sys.stderr)
        _become(user)
    return _supervise(command)


def _become(user: pwd.struct_passwd) -> None:
    """Drop root for good: no supplementary groups, the user's group and id, its home."""
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    os.environ.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)


def _supervise(command: list[str]) -> int:
    """Run `command`, forwarding signals to it and reaping every child; its exit status, 128 + N for signal N."""
    pending: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)  # arrived before the daemon started: sent once it has
        else:
            child.send_signal(signum)

    for forwarded in FORWARDED:
        signal.signal(forwarded, forward)
    try:
        child = subprocess.Popen(command)
    except OSError as error:
        print(f"immich-ml-init: cannot run {command[0]}: {error}", file=sys.stderr)
        return 127
    for early in pending:
        child.send_signal(early)
    while True:
        pid, status = os.wait()  # any child: orphans re-parented to PID 1 are reaped here too
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code
