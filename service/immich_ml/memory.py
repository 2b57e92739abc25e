"""The process's memory: resident-size readings, and giving freed heap back to the operating system (glibc
keeps it otherwise, so RSS stays high after a burst of large images, a session build or a model unload)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable
from pathlib import Path

__all__ = ["peak_resident_bytes", "resident_bytes", "return_freed_memory", "return_heap"]


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


_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status in bytes; 0 where the OS has no such file (not Linux)."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def resident_bytes() -> int:
    """Memory the process holds in RAM now (VmRSS)."""
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int:
    """The most memory the process has held in RAM at once (VmHWM)."""
    return _status_bytes("VmHWM")


def return_freed_memory() -> None:
    """Collect garbage, then give freed heap pages back to the OS (`return_heap`). Blocking.

    ONNX Runtime frees a model's parsed file and the unpacked copies of pre-packed weights once a session is
    built, and a model's arrays when it is unloaded; glibc keeps such freed pages mapped until told otherwise.
    """
    gc.collect()
    return_heap()
