"""The process's resident memory, and giving freed heap back to the OS."""

from __future__ import annotations

import gc
from pathlib import Path

from immich_ml.heap import return_heap

__all__ = ["peak_resident_bytes", "resident_bytes", "return_freed_memory"]

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
    """Collect garbage, then give freed heap pages back to the OS (`immich_ml.heap`). Blocking.

    ONNX Runtime frees a model's parsed file and the unpacked copies of pre-packed weights once a session is
    built, and a model's arrays when it is unloaded; glibc keeps such freed pages mapped until told otherwise.
    """
    gc.collect()
    return_heap()
