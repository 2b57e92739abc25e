"""Response encoding: vectors as the JSON-array strings the Immich server stores verbatim."""

from __future__ import annotations

import numpy as np
import orjson

from immich_ml.errors import NonFiniteOutput

__all__ = ["vector_string"]


def vector_string(vector: np.ndarray) -> str:
    """Encode a 1-D vector as `[a,b,…]` (float32, shortest form), refusing NaN and infinity."""
    vector = np.ascontiguousarray(vector, dtype=np.float32)
    if not np.isfinite(vector).all():
        raise NonFiniteOutput("model output contains NaN or infinity")
    return orjson.dumps(vector, option=orjson.OPT_SERIALIZE_NUMPY).decode()
