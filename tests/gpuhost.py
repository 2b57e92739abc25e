"""What this host offers for the GPU-marked tests: an NVIDIA GPU (NVML) and the CUDA build of onnxruntime.

`cuda_missing()` names what is missing, so a skip says why (CI has neither); `scripts/gpu-validate` uses the same
answer to decide whether the GPU parts run.
"""

from __future__ import annotations

import onnxruntime as ort

from immich_ml.gpu_check.nvml import load_nvml
from immich_ml.inference.sessions import CUDA

__all__ = ["cuda_missing", "gpu_names"]


def gpu_names() -> tuple[list[str], str]:
    """The NVIDIA GPUs NVML sees, and why there are none (empty when there are some)."""
    state = load_nvml()
    try:
        if not state.ok:
            return [], state.error
        names = [gpu.name for gpu in state.gpus]
        return names, "" if names else "NVML loads but lists no GPU"
    finally:
        state.close()


def cuda_missing() -> str | None:
    """None when an NVIDIA GPU and onnxruntime's CUDA provider are both present, else what is missing."""
    reasons = []
    names, why = gpu_names()
    if not names:
        reasons.append(f"no NVIDIA GPU ({why})")
    if CUDA not in ort.get_available_providers():
        reasons.append(
            f"onnxruntime {ort.__version__} ({ort.get_device()} build) lacks {CUDA}: "
            "install onnxruntime-gpu instead of onnxruntime (docs/gpu.md)"
        )
    return "; ".join(reasons) or None
