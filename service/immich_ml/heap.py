"""Give freed heap memory back to the operating system (glibc keeps it otherwise, so RSS stays high after a
burst of large images or after unloading a model)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["return_heap"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name is not None else None
    return getattr(libc, "malloc_trim", None)  # glibc only; musl and others have no such call


def return_heap() -> None:
    """Release free pages of every malloc arena (glibc's `malloc_trim(0)`); a no-op elsewhere. Blocking
    for a few milliseconds: call it from a worker thread."""
    if (trim := _malloc_trim()) is not None:
        trim(0)
