"""Typed keys for what the application holds."""

from __future__ import annotations

from aiohttp import web

from immich_ml.daemon.state import DaemonState
from immich_ml.http.connections import Connections
from immich_ml.models.registry import ModelRegistry
from immich_ml.predict.predictor import Predictor
from immich_ml.settings import Settings

__all__ = ["CONNECTIONS", "PREDICTOR", "REGISTRY", "SETTINGS", "STATE"]

SETTINGS = web.AppKey("settings", Settings)
STATE = web.AppKey("state", DaemonState)
REGISTRY = web.AppKey("registry", ModelRegistry)
PREDICTOR = web.AppKey("predictor", Predictor)
CONNECTIONS = web.AppKey("connections", Connections)
