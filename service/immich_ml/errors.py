"""The daemon's error hierarchy and the one table that maps errors to HTTP responses."""

from __future__ import annotations

__all__ = [
    "BadImage",
    "BadRequest",
    "DependencyMissing",
    "ImmichMLError",
    "InvalidEntries",
    "ModelLoadFailed",
    "ModelUnavailable",
    "Overloaded",
    "PayloadTooLarge",
    "ShuttingDown",
    "UnknownModel",
    "WrongInput",
]


class ImmichMLError(Exception):
    """Base of every error the daemon reports to a client; `status` is the HTTP status."""

    status = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# -- the request is wrong -------------------------------------------------------------------------


class InvalidEntries(ImmichMLError):
    """The `entries` part is missing, not JSON, or not shaped like Immich's entries."""

    status = 422


class WrongInput(ImmichMLError):
    """Text sent to a visual model, or an image to a textual one."""

    status = 422


class BadRequest(ImmichMLError):
    """Neither image nor text was sent."""

    status = 400


class BadImage(ImmichMLError):
    """The image bytes could not be decoded, or decode to a zero-size image."""

    status = 400


class DependencyMissing(ImmichMLError):
    """A model that needs another model's output was requested without it."""

    status = 400


class UnknownModel(ImmichMLError):
    """The model name is not one this task supports."""

    status = 404


class PayloadTooLarge(ImmichMLError):
    """The body or the decoded image exceeds a configured limit."""

    status = 413


# -- the daemon cannot serve it now ---------------------------------------------------------------


class ModelUnavailable(ImmichMLError):
    """The model is not cached and cannot be downloaded (offline hub, network error)."""

    status = 503


class ModelLoadFailed(ImmichMLError):
    """The model files exist but could not be loaded, even after a fresh download."""

    status = 500


class Overloaded(ImmichMLError):
    """A model's queue is full; the client should retry later or use another URL."""

    status = 503
    retry_after_s = 1


class ShuttingDown(ImmichMLError):
    """The daemon is draining and accepts no new work."""

    status = 503
    retry_after_s = 5
