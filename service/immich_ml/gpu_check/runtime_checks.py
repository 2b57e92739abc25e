"""Checks of onnxruntime on the GPU: the build and a real inference, architectures, a throughput probe."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from immich_ml.errors import ConfigError
from immich_ml.gpu_check import graphs
from immich_ml.gpu_check.archs import OFFICIAL_BUILDS, ArchSet, judge
from immich_ml.gpu_check.context import Context
from immich_ml.gpu_check.host_checks import UVM_FIX, gpu_unavailable
from immich_ml.gpu_check.nvml import Gpu
from immich_ml.gpu_check.results import Result
from immich_ml.settings import Provider, Settings

if TYPE_CHECKING:
    from immich_ml.inference.sessions import OnnxSession

__all__ = ["check_arch", "check_providers", "check_throughput"]

T = TypeVar("T")

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
ORT_GPU_FIX = (
    "install onnxruntime-gpu instead of onnxruntime (pip uninstall onnxruntime onnxruntime-gpu; "
    "pip install onnxruntime-gpu — never both); "
    "NixOS: services.immich-ml.package = pkgs.immich-ml-cuda (the flake's overlay)"
)
ARCH_FIX = (
    "use an onnxruntime build with kernels for this GPU (NixOS: nixpkgs.config.cudaCapabilities "
    "for the onnxruntime override; older GPUs need a CUDA 12 build)"
)
_HINTS = (
    (
        "libcudnn",
        (
            "cuDNN missing or of the wrong major version for this build (onnxruntime-gpu for CUDA 12 "
            "wants cuDNN 9): install the matching cuDNN or use the packaged CUDA build"
        ),
    ),
    (
        "libcublas",
        (
            "CUDA libraries (cuBLAS) missing or of the wrong CUDA major version: install the CUDA "
            "runtime this build was made for"
        ),
    ),
    (
        "libcudart",
        (
            "CUDA runtime library missing or of the wrong major version: install the CUDA runtime "
            "this build was made for"
        ),
    ),
    (
        "libcuda.so",
        ("libcuda (the driver's library) not found: NixOS needs hardware.graphics.enable (/run/opengl-driver/lib)"),
    ),
    ("no kernel image", ARCH_FIX),
    ("insufficient for cuda runtime", "the driver is older than this build's CUDA version: update the driver"),
    ("failure 999", UVM_FIX),
    ("error 999", UVM_FIX),
)
_PROBE_BATCH = 16


class ProbeError(RuntimeError):
    """onnxruntime failed while loading or running a probe graph; `log` is what it printed."""

    def __init__(self, message: str, log: list[str]) -> None:
        super().__init__(message)
        self.log = log


def check_providers(ctx: Context) -> Result:
    """5: the onnxruntime build has the GPU providers, and a tiny graph really runs on them."""
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as error:
        return Result.failed(f"onnxruntime not importable: {error}", ORT_GPU_FIX)
    available = list(ort.get_available_providers())
    cuda_build = _build_cuda_version()
    detail = (
        f"onnxruntime {ort.__version__} ({ort.get_device()} build"
        f"{f', CUDA {cuda_build[0]}.{cuda_build[1]}' if cuda_build else ''}); "
        f"providers {', '.join(available)}"
    )
    data: dict[str, object] = {"version": ort.__version__, "device": ort.get_device(), "available": available}
    settings = ctx.settings
    if isinstance(settings, ConfigError):
        return Result.failed(
            f"{detail}; {settings}", "fix that variable (the unit's Environment= or EnvironmentFile=)", **data
        )
    if settings.provider is Provider.CPU:
        return Result.warned(
            f"{detail}; MACHINE_LEARNING_PROVIDER=cpu: the service will not use the GPU",
            "set MACHINE_LEARNING_PROVIDER=cuda (NixOS: services.immich-ml.gpu.enable = true)",
            **data,
        )
    if reason := gpu_unavailable(ctx):
        return Result.skipped(f"{detail}; no inference tried ({reason})", **data)
    wanted = [CUDA] + ([TENSORRT] if settings.provider is Provider.TENSORRT else [])
    if missing := [p for p in wanted if p not in available]:
        return Result.failed(f"{detail}; this build lacks {', '.join(missing)}", ORT_GPU_FIX, **data)
    for provider in wanted:
        if failure := _prove(settings, provider, detail, data):
            return failure
    return Result.passed(f"{detail}; test inference ran on {', '.join(wanted)}", **data)


def check_arch(ctx: Context) -> Result:
    """8: the GPUs' compute capability against the architectures the onnxruntime build carries."""
    if reason := gpu_unavailable(ctx):
        return Result.skipped(reason)
    build = _build_cuda_version()
    archs = (
        ArchSet(ctx.options.cuda_archs, source="--cuda-archs")
        if ctx.options.cuda_archs
        else OFFICIAL_BUILDS.get(build[0])
        if build
        else None
    )
    if archs is None:
        if build is None:
            return Result.skipped(
                "CPU-only onnxruntime build (see providers); --cuda-archs names a custom build's architectures"
            )
        return Result.warned(
            f"no architecture table for CUDA {build[0]} builds", "pass the build's architectures with --cuda-archs"
        )
    driver_cuda = ctx.nvml.cuda_version
    if build and driver_cuda and driver_cuda[0] < build[0]:
        return Result.failed(
            f"driver supports CUDA {driver_cuda[0]}.{driver_cuda[1]}, onnxruntime was built "
            f"for CUDA {build[0]}.{build[1]}",
            f"update the NVIDIA driver to one for CUDA {build[0]}, or use a CUDA {driver_cuda[0]} build of onnxruntime",
        )
    verdicts = [(gpu, judge(gpu.compute_capability, archs)) for gpu in _used_gpus(ctx)]
    detail = "; ".join(f"GPU {gpu.index}: {verdict.reason}" for gpu, verdict in verdicts)
    data = {"build_archs": archs.describe(), "source": archs.source}
    if any(verdict.ok is False for _, verdict in verdicts):
        return Result.failed(f"{detail} ({archs.describe()})", ARCH_FIX, **data)
    if any(verdict.ok is None for _, verdict in verdicts):
        return Result.warned(
            f"{detail} ({archs.describe()})", "the providers check's inference shows whether kernels load", **data
        )
    return Result.passed(f"{detail} ({archs.describe()})", **data)


def check_throughput(ctx: Context) -> Result:
    """9: images per second through a small convolutional graph on the CUDA provider."""
    if reason := gpu_unavailable(ctx):
        return Result.skipped(reason)
    settings = ctx.settings
    if isinstance(settings, ConfigError) or settings.provider is Provider.CPU:
        return Result.skipped("the service is not configured for the GPU (see providers)")
    if CUDA not in importlib.import_module("onnxruntime").get_available_providers():
        return Result.skipped(f"no {CUDA} in this onnxruntime build (see providers)")
    rng = np.random.default_rng(0)
    feeds = {
        "image": rng.random((_PROBE_BATCH, 3, 224, 224), dtype=np.float32),
        "w1": rng.standard_normal((32, 3, 3, 3), dtype=np.float32),
        "w2": rng.standard_normal((64, 32, 3, 3), dtype=np.float32),
    }
    seconds = ctx.options.probe_seconds

    def measure(session_providers: list[str], run: Callable[[], object]) -> float | None:
        if session_providers[0] != CUDA:
            return None
        for _ in range(3):
            run()
        started, batches = time.perf_counter(), 0
        while (elapsed := time.perf_counter() - started) < seconds or batches == 0:
            run()
            batches += 1
        return batches * _PROBE_BATCH / elapsed

    try:
        rate, _ = _with_session(
            settings, Provider.CUDA, graphs.CONV, lambda s: measure(s.providers, lambda: s.run(feeds))
        )
    except ProbeError as error:
        return Result.failed(f"throughput probe failed: {error}", _hint(str(error), error.log))
    if rate is None:
        return Result.skipped("the CUDA session fell back to the CPU (see providers)")
    return Result.passed(
        f"{rate:.0f} images/s (batch {_PROBE_BATCH}, 3x224x224, two 3x3 convolutions) on GPU {settings.device_id}",
        images_per_second=round(rate, 1),
    )


def _prove(settings: Settings, provider: str, detail: str, data: dict[str, object]) -> Result | None:
    """Run the ADD graph on `provider`; a failing Result, or None when the GPU provider really ran it."""
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    as_setting = Provider.TENSORRT if provider == TENSORRT else Provider.CUDA
    try:
        (providers, output), log = _with_session(
            settings, as_setting, graphs.ADD, lambda s: (s.providers, s.run({"x": x})[0])
        )
    except ProbeError as error:
        return Result.failed(f"{detail}; inference on {provider} failed: {error}", _hint(str(error), error.log), **data)
    data[f"{provider}_session"] = providers
    if providers[0] != provider:
        reason = next((line for line in log if "error" in line.lower()), "onnxruntime printed no reason")
        return Result.failed(
            f"{detail}; a session asking for {provider} ran on {providers[0]}: {reason}", _hint(reason, log), **data
        )
    if not np.array_equal(output, x + x):
        return Result.failed(
            f"{detail}; {provider} computed a wrong result",
            "the GPU or its driver is faulty: check `dmesg` for Xid errors",
            **data,
        )
    return None


def _with_session(
    settings: Settings, provider: Provider, graph: bytes, body: Callable[[OnnxSession], T]
) -> tuple[T, list[str]]:
    """Load `graph` through the service's SessionFactory and call `body(session)`; stderr is captured."""
    from immich_ml.inference.sessions import (
        SessionFactory,  # imports onnxruntime, whose absence check_providers reports
    )

    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="immich-gpu-check-") as tmp:
        path = Path(tmp) / "probe.onnx"
        path.write_bytes(graph)
        probe = settings.with_overrides(
            provider=provider, provider_strict=False, cache_folder=Path(tmp), tensorrt_cache_path=Path(tmp) / "tensorrt"
        )
        try:
            with _captured_stderr(log):
                session = SessionFactory(probe).create(path, cache_key=f"gpu-check/{provider}")
                return body(session), log
        # onnxruntime's pybind11 errors (Fail, RuntimeException, ...) share no base below Exception
        except Exception as error:  # noqa: BLE001
            raise ProbeError(str(error).strip().splitlines()[-1] if str(error).strip() else repr(error), log) from None


@contextmanager
def _captured_stderr(lines: list[str]) -> Iterator[None]:
    """Collect what is written to file descriptor 2 (onnxruntime's C++ logger) into `lines`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


def _hint(message: str, log: list[str]) -> str:
    text = " ".join([message, *log]).lower()
    return next(
        (fix for needle, fix in _HINTS if needle in text),
        "read the onnxruntime error; check that libcudart, libcublas and libcudnn of the build's CUDA "
        "version are on the library path",
    )


def _build_cuda_version() -> tuple[int, int] | None:
    """The CUDA version a GPU onnxruntime wheel was built for (None for CPU builds)."""
    try:
        info: ModuleType = importlib.import_module("onnxruntime.capi.build_and_package_info")
    except ImportError:
        return None
    parts = str(getattr(info, "cuda_version", "") or "").split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


def _used_gpus(ctx: Context) -> list[Gpu]:
    settings = ctx.settings
    ids = settings.device_ids if isinstance(settings, Settings) else ()
    return [gpu for gpu in ctx.nvml.gpus if gpu.index in ids] or ctx.nvml.gpus
