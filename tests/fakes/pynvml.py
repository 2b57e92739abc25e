"""An NVML stand-in with the slice of `pynvml`'s API that immich-gpu-check calls.

Load a fresh copy per test (its state is module-level, like the real library's) and put it in
`sys.modules["pynvml"]`; `configure()` sets the driver, GPUs and processes it reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace


class NVMLError(Exception):
    """Base of NVML errors, as in pynvml."""


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_DriverNotLoaded(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


@dataclass
class FakeGpu:
    """One fake GPU; `processes` are (pid, bytes) compute processes."""

    name: str = "NVIDIA GeForce RTX 3060"
    compute_capability: tuple[int, int] = (8, 6)
    total: int = 12 * 1024**3
    used: int = 2 * 1024**3
    minor: int = 0
    processes: list[tuple[int, int | None]] = field(default_factory=list)


_driver = "550.54.14"
_cuda = 12040
_gpus: list[FakeGpu] = []
_init_error: NVMLError | None = None
initialised = False


def configure(
    *, gpus: list[FakeGpu], driver: str = "550.54.14", cuda: int = 12040, init_error: NVMLError | None = None
) -> None:
    """Set what this fake NVML reports."""
    global _driver, _cuda, _gpus, _init_error
    _driver, _cuda, _gpus, _init_error = driver, cuda, gpus, init_error


def nvmlInit() -> None:
    global initialised
    if _init_error is not None:
        raise _init_error
    initialised = True


def nvmlShutdown() -> None:
    global initialised
    _require()
    initialised = False


def nvmlSystemGetDriverVersion() -> str:
    _require()
    return _driver


def nvmlSystemGetCudaDriverVersion() -> int:
    _require()
    return _cuda


def nvmlDeviceGetCount() -> int:
    _require()
    return len(_gpus)


def nvmlDeviceGetHandleByIndex(index: int) -> FakeGpu:
    _require()
    return _gpus[index]


def nvmlDeviceGetName(handle: FakeGpu) -> str:
    return handle.name


def nvmlDeviceGetMemoryInfo(handle: FakeGpu) -> SimpleNamespace:
    return SimpleNamespace(total=handle.total, used=handle.used, free=handle.total - handle.used)


def nvmlDeviceGetCudaComputeCapability(handle: FakeGpu) -> tuple[int, int]:
    return handle.compute_capability


def nvmlDeviceGetMinorNumber(handle: FakeGpu) -> int:
    return handle.minor


def nvmlDeviceGetComputeRunningProcesses(handle: FakeGpu) -> list[SimpleNamespace]:
    return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes]


def _require() -> None:
    if not initialised:
        raise NVMLError("Uninitialized")
