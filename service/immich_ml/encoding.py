"""Response encoding: vectors as the JSON-array strings the Immich server stores verbatim."""

from __future__ import annotations

import numpy as np
import orjson

__all__ = ["NonFiniteOutput", "vector_string"]


class NonFiniteOutput(ValueError):
    """A model produced NaN or infinity, which must never reach the Immich server."""


def vector_string(vector: np.ndarray) -> str:
    """Encode a 1-D vector as `[a,b,…]` (float32, shortest form), refusing NaN and infinity."""
    vector = np.ascontiguousarray(vector, dtype=np.float32)
    if not np.isfinite(vector).all():
        raise NonFiniteOutput("model output contains NaN or infinity")
    return orjson.dumps(vector, option=orjson.OPT_SERIALIZE_NUMPY).decode()
