"""Logging set-up for journald and terminals, and the daemon's loggers, each named once."""

from __future__ import annotations

import logging
import os
import sys
import time

__all__ = [
    "ACCESS_LOG",
    "BATCHER_LOG",
    "METRICS_LOG",
    "MODELS_LOG",
    "SECURITY_LOG",
    "SERVER_LOG",
    "SYSTEMD_LOG",
    "WORKERS_LOG",
    "Throttle",
    "setup_logging",
]

# The daemon's loggers, named once (docs/operations.md lists them; modules import them from here).
ACCESS_LOG = logging.getLogger("immich_ml.access")
"""One line per predict request, at debug level: models asked for, input size, time; never image or text."""
BATCHER_LOG = logging.getLogger("immich_ml.batcher")
METRICS_LOG = logging.getLogger("immich_ml.metrics")
MODELS_LOG = logging.getLogger("immich_ml.models")
"""Downloads, loading, providers in use, unloading."""
SECURITY_LOG = logging.getLogger("immich_ml.security")
SERVER_LOG = logging.getLogger("immich_ml.server")
SYSTEMD_LOG = logging.getLogger("immich_ml.systemd")
WORKERS_LOG = logging.getLogger("immich_ml.workers")
"""The parent of several worker processes."""

_COLOURS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[41m"}
_PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}  # syslog levels, for journald


class _Formatter(logging.Formatter):
    def __init__(self, *, colour: bool, timestamps: bool, journal: bool) -> None:
        fmt = "%(asctime)s " if timestamps else ""
        super().__init__(fmt + "%(levelname)s %(name)s: %(message)s")
        self.colour = colour
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.colour:
            return f"{_COLOURS.get(record.levelname, '')}{text}\033[0m"
        if self.journal:  # journald reads a "<N>" prefix as the line's priority (journalctl -p works)
            return f"<{_PRIORITIES.get(record.levelname, 6)}>{text}"
        return text


def _stderr_is_journal() -> bool:
    """Whether stderr is the journald stream systemd connected ($JOURNAL_STREAM names its device:inode)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return device.isdigit() and inode.isdigit() and (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def setup_logging(level: str, *, no_color: bool) -> None:
    """Log to stderr: colour and timestamps only on a terminal (NO_COLOR turns colour off); under journald,
    plain lines with a priority prefix."""
    on_terminal = sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Formatter(colour=on_terminal and not no_color, timestamps=on_terminal, journal=_stderr_is_journal())
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client-facing access lines are one per request at debug level (see routes); silence aiohttp's.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # The hub client's HTTP library logs every request at info level; progress has its own lines.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Throttle:
    """At most one log line per key per interval, so a scanner or a flood cannot fill the journal.

    `allow(key)` says whether to log now, and how many lines for that key were held back since the last one.
    """

    def __init__(self, interval_s: float = 60.0, max_keys: int = 1024) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: dict[object, tuple[float, int]] = {}

    def allow(self, key: object) -> tuple[bool, int]:
        now = time.monotonic()
        last, held = self._last.get(key, (float("-inf"), 0))
        if now - last < self.interval_s:
            self._last[key] = (last, held + 1)
            return False, held + 1
        if len(self._last) >= self.max_keys:  # forget the oldest keys rather than grow without bound
            for stale in sorted(self._last, key=lambda k: self._last[k][0])[: self.max_keys // 2]:
                del self._last[stale]
        self._last[key] = (now, 0)
        return True, held
