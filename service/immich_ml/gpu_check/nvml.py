"""NVML (through `nvidia-ml-py`'s `pynvml`): the driver, the GPUs and the processes using them."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["Gpu", "GpuProcess", "NvmlState", "compute_processes", "load_nvml"]

NO_DRIVER = "no NVIDIA driver found: NVML library not loadable"
NO_DRIVER_FIX = 'install the NVIDIA driver (NixOS: hardware.nvidia / services.xserver.videoDrivers = ["nvidia"])'
NO_BINDING = "nvidia-ml-py is not installed (`import pynvml` failed)"
NO_BINDING_FIX = "pip install nvidia-ml-py (it is a dependency of immich-ml; NixOS: python3Packages.nvidia-ml-py)"

_ERROR_FIXES = {
    "NVMLError_LibraryNotFound": (NO_DRIVER, NO_DRIVER_FIX),
    "NVMLError_DriverNotLoaded": (
        "NVIDIA driver installed but its kernel module is not loaded",
        "sudo modprobe nvidia, or reboot after a driver install (check `dmesg | grep -i nvidia`)",
    ),
    "NVMLError_LibRmVersionMismatch": (
        "NVIDIA driver/library version mismatch (the kernel module and libnvidia-ml differ)",
        "reboot so the kernel module matches the driver libraries installed by the last upgrade",
    ),
    "NVMLError_NoPermission": (
        "no permission to talk to the NVIDIA driver",
        "run as a user allowed to open /dev/nvidiactl (group video/render, or root)",
    ),
}


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML sees it."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    memory_total: int
    memory_used: int
    minor_number: int
    handle: Any = field(repr=False, compare=False)

    @property
    def sm(self) -> str:
        """`sm_86` style architecture name."""
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on a GPU; `used_memory` is None where the driver does not say."""

    gpu: int
    pid: int
    used_memory: int | None


@dataclass
class NvmlState:
    """NVML after initialisation: either `error`/`fix` or the driver facts and GPUs."""

    module: ModuleType | None = None
    error: str = ""
    fix: str = ""
    driver_version: str = ""
    cuda_version: tuple[int, int] | None = None
    gpus: list[Gpu] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.module is not None and not self.error

    def close(self) -> None:
        """Shut NVML down if it was initialised."""
        if self.module is not None:
            self.module.nvmlShutdown()
            self.module = None


def load_nvml() -> NvmlState:
    """Import `pynvml`, initialise NVML and read the driver and GPU facts; never raises on NVML errors."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        return NvmlState(error=NO_BINDING, fix=NO_BINDING_FIX)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        message, fix = _describe(error)
        return NvmlState(error=message, fix=fix)
    state = NvmlState(module=nvml)
    try:
        state.driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
        state.cuda_version = (cuda // 1000, cuda % 1000 // 10)
        state.gpus = [_gpu(nvml, index) for index in range(nvml.nvmlDeviceGetCount())]
    except nvml.NVMLError as error:
        state.error, state.fix = _describe(error)
    return state


def compute_processes(state: NvmlState) -> list[GpuProcess]:
    """Every compute process on every GPU."""
    assert state.module is not None
    nvml = state.module
    found: list[GpuProcess] = []
    for gpu in state.gpus:
        for process in nvml.nvmlDeviceGetComputeRunningProcesses(gpu.handle):
            used = process.usedGpuMemory
            found.append(GpuProcess(gpu.index, int(process.pid), int(used) if isinstance(used, int) else None))
    return found


def _gpu(nvml: ModuleType, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    try:
        minor_number = int(nvml.nvmlDeviceGetMinorNumber(handle))
    except nvml.NVMLError:
        minor_number = index
    return Gpu(
        index,
        _text(nvml.nvmlDeviceGetName(handle)),
        (int(major), int(minor)),
        int(memory.total),
        int(memory.used),
        minor_number,
        handle,
    )


def _describe(error: Exception) -> tuple[str, str]:
    for cls in type(error).__mro__:
        if cls.__name__ in _ERROR_FIXES:
            return _ERROR_FIXES[cls.__name__]
    return f"NVML failed: {error}", "check `nvidia-smi` and `dmesg | grep -i nvidia`"


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
