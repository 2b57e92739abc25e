"""Every error class of the daemon, the one table from error to HTTP status, and the one place where library
errors (aiohttp, codecs, onnxruntime, the file system) become ours.

An `ImmichMLError`'s `detail` goes to the remote client and never names a server path; `log_detail` (which
may) goes to the log only.
"""

from __future__ import annotations

import errno
from typing import ClassVar

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError

__all__ = [
    "BadImage",
    "BadRequest",
    "ClientDisconnected",
    "ConfigError",
    "CorruptModel",
    "DependencyMissing",
    "DownloadFailed",
    "Forbidden",
    "HashMismatch",
    "ImmichMLError",
    "InferenceFailed",
    "InvalidEntries",
    "ModelLoadFailed",
    "ModelUnavailable",
    "NonFiniteOutput",
    "Overloaded",
    "PayloadTooLarge",
    "ProviderError",
    "RequestTimeout",
    "ShuttingDown",
    "UnknownModel",
    "WrongInput",
    "translate",
]


class ImmichMLError(Exception):
    """Base of every error the daemon reports to a client; the class attributes are its HTTP response."""

    status: ClassVar[int] = 500
    retry_after_s: ClassVar[int | None] = None
    """Seconds for a `Retry-After` header, for errors a client should simply retry."""
    closes_connection: ClassVar[bool] = False
    """Close the connection after the reply (its request body cannot be trusted to end)."""

    def __init__(self, detail: str, *, log_detail: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.log_detail = log_detail or detail


# -- the request is wrong (4xx) ----------------------------------------------------------------------


class BadRequest(ImmichMLError):
    """Neither image nor text was sent, or the body is not a well-formed form."""

    status = 400


class BadImage(ImmichMLError):
    """The image bytes could not be decoded, or decode to a zero-size image."""

    status = 400


class DependencyMissing(ImmichMLError):
    """A model that needs another model's output was requested without it."""

    status = 400


class Forbidden(ImmichMLError):
    """The client's address is not in MACHINE_LEARNING_ALLOWED_CLIENTS."""

    status = 403


class UnknownModel(ImmichMLError):
    """The model name is not one this task supports."""

    status = 404


class RequestTimeout(ImmichMLError):
    """The body did not arrive within MACHINE_LEARNING_BODY_TIMEOUT_S."""

    status = 408
    closes_connection = True


class PayloadTooLarge(ImmichMLError):
    """The body, a part of it (after inflating), or the decoded image exceeds a configured limit."""

    status = 413


class InvalidEntries(ImmichMLError):
    """The `entries` part is missing, not JSON, not shaped like Immich's entries, or an option is out of range."""

    status = 422


class WrongInput(ImmichMLError):
    """Text sent to a visual model, or an image to a textual one."""

    status = 422


class ClientDisconnected(ImmichMLError):
    """The client went away before its request was complete; nobody reads the reply (nginx's 499)."""

    status = 499


# -- the daemon cannot serve it now (503) or failed (500) -------------------------------------------


class InferenceFailed(ImmichMLError):
    """A model ran but its result is unusable (a server fault, named in the log with the model)."""

    status = 500


class NonFiniteOutput(InferenceFailed):
    """A model produced NaN or infinity, which must never reach the Immich server."""


class ModelUnavailable(ImmichMLError):
    """The model is not cached and cannot be downloaded (offline hub, network error, full disk)."""

    status = 503


class ModelLoadFailed(ImmichMLError):
    """The model files exist but do not load (damaged and not repairable now, or refused by the runtime)."""

    status = 503


class Overloaded(ImmichMLError):
    """A model's queue or the decoded-pixel budget is full; retry later or use another URL."""

    status = 503
    retry_after_s = 1


class ShuttingDown(ImmichMLError):
    """The daemon is draining and accepts no new work."""

    status = 503
    retry_after_s = 5


# -- not replies: raised and handled inside the daemon -----------------------------------------------


class ConfigError(ValueError):
    """A configuration value is malformed; the message names the variable."""


class ProviderError(RuntimeError):
    """A GPU provider was required (strict mode) but the session would run on the CPU."""


class DownloadFailed(Exception):
    """Every attempt to fetch a pinned file failed (network error or wrong bytes)."""


class HashMismatch(DownloadFailed):
    """The downloaded bytes are not the pinned file."""


class CorruptModel(Exception):
    """A model file is damaged (unparsable ONNX, truncated, undecodable JSON); `path` names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


def translate(error: BaseException) -> ImmichMLError | None:
    """Our error for a library error that reached the HTTP boundary; None for a real server fault (a bug).

    aiohttp's framing and payload errors (bad chunking, a body that does not inflate) are the client's;
    a connection reset while reading is a client that left; text that is not valid in its charset is a bad
    request; a read-only or unwritable model cache is an unavailable model.
    """
    if isinstance(error, ImmichMLError):
        return error
    if isinstance(error, HttpProcessingError):
        return BadRequest(f"Malformed request: {error.message or type(error).__name__}")
    if isinstance(error, RequestPayloadError):  # aiohttp's wrapper around a payload error while streaming
        cause = error.__cause__
        reason = cause.message if isinstance(cause, HttpProcessingError) and cause.message else "undecodable"
        return BadRequest(f"Malformed request body: {reason}")
    if isinstance(error, ConnectionError):
        return ClientDisconnected("Client disconnected")
    if isinstance(error, UnicodeDecodeError):
        return BadRequest(f"Text is not valid in its charset: {error.reason}")
    if isinstance(error, OSError) and error.errno in _READ_ONLY:
        return ModelUnavailable(
            "The model cache is not writable (read-only or permission denied)",
            log_detail=f"model cache not writable: {error}",
        )
    return None
