"""Logging set-up for journald and terminals; named loggers per subsystem."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]

_COLOURS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m",
            "CRITICAL": "\033[41m"}


class _Formatter(logging.Formatter):
    def __init__(self, *, colour: bool, timestamps: bool) -> None:
        fmt = "%(asctime)s " if timestamps else ""
        super().__init__(fmt + "%(levelname)s %(name)s: %(message)s")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.colour:
            return f"{_COLOURS.get(record.levelname, '')}{text}\033[0m"
        return text


def setup_logging(level: str, *, no_color: bool) -> None:
    """Log to stderr: plain lines without timestamps under journald, colour only on a terminal."""
    on_terminal = sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(colour=on_terminal and not no_color, timestamps=on_terminal))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client-facing access lines are one per request at debug level (see routes); silence aiohttp's.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
