"""Default thread counts, sized from the CPUs the process may use (`Settings.cpus`, see `immich_ml.cpus`).

The rule (docs/configuration.md, "Threads and cores"): every pool follows the usable CPUs `n`, never the
host's core count. Image decoding and pre-processing, and model loading and text queries, get a pool of `n`
threads each. On the CPU, Immich's default job concurrency keeps about two models busy at once (smart search
and faces, two requests each), so one model's ONNX Runtime session gets half the usable CPUs, but never
fewer than upstream's 2 where there are 2, nor more than `n`; a model whose batches in flight each take a part
(faces, OCR) divides its half between them, while CLIP's batches share theirs (a lone batch gets it all).
Explicit MACHINE_LEARNING_* settings always win.
"""

from __future__ import annotations

import os

from immich_ml.settings import Settings

__all__ = ["concurrent_batches", "heap_arenas", "intra_op_threads", "request_threads"]

UPSTREAM_INTRA_OP_THREADS = 2
"""Upstream's CPU default for ONNX Runtime intra-op threads per session."""


def request_threads(settings: Settings) -> int:
    """Threads in each of the two request pools: MACHINE_LEARNING_REQUEST_THREADS, else the usable CPUs."""
    return settings.request_threads or settings.cpus.threads


def heap_arenas(settings: Settings) -> int:
    """glibc malloc arenas (`memory.cap_heap_arenas`): one per usable CPU, at least 2 (one arena for all
    threads held more after loading than two, docs/benchmarks.md)."""
    return max(2, settings.cpus.threads)


def concurrent_batches(settings: Settings) -> int:
    """Batches of one bulk model that may run at once on the CPU: MACHINE_LEARNING_CONCURRENT_BATCHES, else 2
    (two requests in flight run side by side) where there are 2 usable CPUs or more, else 1."""
    return settings.concurrent_batches or min(2, settings.cpus.threads)


def intra_op_threads(settings: Settings, *, split_between: int = 1, cpu_only: bool = True) -> int:
    """ONNX Runtime intra-op threads of one session: MACHINE_LEARNING_MODEL_INTRA_OP_THREADS, else on the CPU
    half the usable CPUs (at least upstream's 2, at most the usable CPUs) divided between `split_between`
    batches that each take a part, at least 1. With a GPU provider: 0 (ONNX Runtime's own choice, one per
    physical core of the host, as upstream), or the usable CPUs where the process may use fewer CPUs than
    the host has, as a session that falls back to the CPU would otherwise run threads for the host's cores."""
    if settings.intra_op_threads:
        return settings.intra_op_threads
    usable = settings.cpus.threads
    if not cpu_only:
        return usable if usable < (os.cpu_count() or usable) else 0
    model_share = max(min(UPSTREAM_INTRA_OP_THREADS, usable), usable // 2)
    return max(1, model_share // split_between)
