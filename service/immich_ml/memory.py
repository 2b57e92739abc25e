"""The process's memory: resident-size readings, and glibc's heap kept close to what is in use (it keeps freed
memory otherwise, so RSS stays high after a burst of large images, a session build or a model unload)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "cap_heap_arenas",
    "large_blocks_mapped",
    "peak_resident_bytes",
    "resident_bytes",
    "return_freed_memory",
    "return_heap",
]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name is not None else None


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
"""glibc's `mallopt` parameters (malloc.h)."""

_MiB = 1 << 20
LOADING_MAPPED_BYTES = _MiB
"""While sessions are built, blocks this large or larger get a mapping of their own."""
SERVING_MAPPED_BYTES = 32 * _MiB
"""Afterwards, where glibc's own threshold ends once large blocks have been freed (its maximum on 64 bits)."""
SERVING_TRIM_BYTES = 16 * _MiB
"""Afterwards, free memory at the top of a heap beyond this goes back to the OS when a block next to it is freed.
`malloc_trim` never shrinks the top of a thread's arena (a heap of at most 64 MiB), so glibc's own threshold
(twice the mapping threshold, 64 MiB) would keep up to a whole heap per arena after a burst of large images."""


def _mallopt(parameter: int, value: int) -> bool:
    mallopt = getattr(_libc(), "mallopt", None)  # glibc only
    return mallopt is not None and bool(mallopt(parameter, value))


def cap_heap_arenas(arenas: int) -> bool:
    """At most `arenas` malloc arenas. glibc gives every thread that allocates while another does an arena of
    its own, up to 8 per core, and each keeps what was freed in it: with six models on 2 cores the peak at
    start was 80–150 MiB higher without the cap (docs/benchmarks.md). Call before starting threads. Returns whether
    glibc took it (False elsewhere)."""
    return _mallopt(_M_ARENA_MAX, arenas)


@contextlib.contextmanager
def large_blocks_mapped() -> Iterator[None]:
    """While inside, blocks of `LOADING_MAPPED_BYTES` or more get their own mapping, handed back the moment
    they are freed: building a session parses the whole model file and copies its weights, and glibc would
    otherwise keep the freed copy in its heap (the peak at start was about 230 MiB lower with six models).
    Afterwards the threshold is `SERVING_MAPPED_BYTES`, so decoded images and batches are reused from the
    heap instead of mapped and faulted in anew by every request (1–5 % of CLIP throughput when mapped).
    Process-wide: wrap one session build at a time. A no-op without glibc."""
    _mallopt(_M_MMAP_THRESHOLD, LOADING_MAPPED_BYTES)
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, SERVING_MAPPED_BYTES)
        _mallopt(_M_TRIM_THRESHOLD, SERVING_TRIM_BYTES)


def return_heap() -> None:
    """Release free pages of every malloc arena (glibc's `malloc_trim(0)`; a thread arena's top is left to
    `SERVING_TRIM_BYTES`); a no-op elsewhere. Blocking for a few milliseconds: call it from a worker thread."""
    if (trim := getattr(_libc(), "malloc_trim", None)) is not None:  # glibc only
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
