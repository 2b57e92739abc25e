"""Child process for the GPU memory tests: load models through immich-ml's SessionFactory, run each once, and
print the GPU memory this process holds as NVML sees it (one JSON line on stdout).

    python -m tests.vramprobe MODEL.onnx:1x3x224x224 [MODEL.onnx:SHAPE ...]

Settings come from the environment (MACHINE_LEARNING_PROVIDER, _GPU_MEM_LIMIT, ...). Each model gets one float32
input of SHAPE filled with random values. A fresh process per measurement keeps one test's CUDA arena out of
another's figure. NVML reports per-process memory by host pid; inside a container's pid namespace it may not
list this process, so the change in the device's used memory since before CUDA started is reported too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from immich_ml.gpu_check.nvml import NvmlState, compute_processes, load_nvml
from immich_ml.inference.sessions import SessionFactory
from immich_ml.settings import Settings


def device_used(state: NvmlState) -> int:
    """Bytes in use on GPU 0 now (every process)."""
    assert state.module is not None
    return int(state.module.nvmlDeviceGetMemoryInfo(state.gpus[0].handle).used)


def process_used(state: NvmlState) -> int | None:
    """Bytes this process holds on the GPUs, or None where NVML does not list it."""
    mine = [p.used_memory for p in compute_processes(state) if p.pid == os.getpid() and p.used_memory is not None]
    return sum(mine) if mine else None


def probe(specs: list[str]) -> dict[str, Any]:
    """Load and run every `path:shape` model; what ran where, what failed, and the memory held afterwards."""
    state = load_nvml()
    if not state.ok or not state.gpus:
        return {"error": state.error or "no GPU"}
    before = device_used(state)
    factory = SessionFactory(Settings.from_env(dict(os.environ)))
    result: dict[str, Any] = {"providers": [], "errors": []}
    sessions = []
    for index, spec in enumerate(specs):
        path, dims = spec.rsplit(":", 1)
        session = factory.create(Path(path), cache_key=f"vramprobe/{index}")
        result["providers"].append(session.providers)
        sessions.append((session, [int(d) for d in dims.split("x")]))
    for session, shape in sessions:  # all loaded before any runs: the arenas coexist, as in the daemon
        feeds = {session.input_names[0]: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        try:
            session.run(feeds)
            result["errors"].append(None)
        except Exception as error:  # the out-of-memory case is an expected outcome, reported to the test
            result["errors"].append(f"{type(error).__name__}: {error}")
    result["process_bytes"] = process_used(state)
    result["device_delta_bytes"] = device_used(state) - before
    state.close()
    return result


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1:])))
