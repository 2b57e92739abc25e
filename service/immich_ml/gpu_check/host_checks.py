"""Checks of the host: driver and GPUs, kernel modules and device nodes, CDI, the unit, its journal, VRAM."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from immich_ml.gpu_check.context import Context
from immich_ml.gpu_check.nvml import GpuProcess, compute_processes
from immich_ml.gpu_check.results import Result
from immich_ml.gpu_check.systemd import CommandError, UnitState, journal_since_start, show_unit
from immich_ml.settings import Provider, Settings

__all__ = [
    "check_cdi",
    "check_driver",
    "check_journal",
    "check_memory",
    "check_modules",
    "check_service",
    "format_bytes",
    "gpu_unavailable",
]

UVM_FIX = 'sudo modprobe nvidia_uvm (NixOS: boot.kernelModules = [ "nvidia_uvm" ]), then systemctl restart immich-ml'
CDI_UNIT = "nvidia-container-toolkit-cdi-generator.service"
CDI_SPECS = (
    "/run/cdi/nvidia-container-toolkit.json",
    "/var/run/cdi/nvidia-container-toolkit.json",
    "/etc/cdi/nvidia.yaml",
    "/etc/cdi/nvidia.json",
)
_REQUIRED_MODULES = ("nvidia", "nvidia_uvm")
_DISPLAY_MODULES = ("nvidia_modeset", "nvidia_drm")
_LOADED = re.compile(r"loaded (\S+) using (.+)$")
_FAILED = re.compile(r"(\w+ExecutionProvider) failed to initialise for (\S+)")
_REFUSED = re.compile(r"refusing to start \(MACHINE_LEARNING_PROVIDER_STRICT=true\): (.+)$")


def format_bytes(size: int) -> str:
    """`812 MiB`, `11.8 GiB`."""
    return f"{size / 1024**3:.1f} GiB" if size >= 1024**3 else f"{size // 1024**2} MiB"


def gpu_unavailable(ctx: Context) -> str | None:
    """Why GPU checks cannot run here, or None when NVML sees at least one GPU."""
    if not ctx.nvml.ok:
        return f"needs the driver check: {ctx.nvml.error}"
    if not ctx.nvml.gpus:
        return "needs the driver check: NVML sees no GPU"
    return None


def check_driver(ctx: Context) -> Result:
    """1: NVML loads and sees the GPUs the service is configured for."""
    nvml = ctx.nvml
    if not nvml.ok:
        return Result.failed(nvml.error, nvml.fix)
    if not nvml.gpus:
        return Result.failed(
            f"driver {nvml.driver_version} loaded but NVML sees no GPU",
            "check `nvidia-smi -L` and `dmesg | grep -i nvidia` (GPU fallen off the bus?)",
        )
    cuda = ".".join(map(str, nvml.cuda_version)) if nvml.cuda_version else "?"
    gpus = "; ".join(
        f"GPU {g.index}: {g.name}, {format_bytes(g.memory_total)}, "
        f"compute {g.compute_capability[0]}.{g.compute_capability[1]}"
        for g in nvml.gpus
    )
    detail = f"driver {nvml.driver_version}, CUDA {cuda}; {gpus}"
    data = {
        "driver": nvml.driver_version,
        "cuda": cuda,
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "memory_total": g.memory_total,
                "compute_capability": f"{g.compute_capability[0]}.{g.compute_capability[1]}",
            }
            for g in nvml.gpus
        ],
    }
    settings = ctx.settings
    if isinstance(settings, Settings):
        missing = [i for i in settings.device_ids if i >= len(nvml.gpus)]
        if missing and settings.uses_gpu:
            return Result.failed(
                f"{detail}; configured device ids {missing} do not exist",
                "set MACHINE_LEARNING_DEVICE_IDS (NixOS: gpu.deviceIds) to ids NVML lists",
                **data,
            )
    return Result.passed(detail, **data)


def check_modules(ctx: Context) -> Result:
    """2: the nvidia kernel modules are loaded and their device nodes exist."""
    loaded = _loaded_modules(ctx.options.path("/proc/modules"))
    nodes = ["/dev/nvidiactl", "/dev/nvidia-uvm"] + [f"/dev/nvidia{n}" for n in _gpu_minors(ctx)]
    absent = [node for node in nodes if not ctx.options.path(node).exists()]
    data: dict[str, Any] = {"modules": sorted(loaded) if isinstance(loaded, set) else [], "missing_nodes": absent}
    missing = [m for m in _REQUIRED_MODULES if m not in loaded] if isinstance(loaded, set) else []
    if missing:
        fix = (
            UVM_FIX
            if missing == ["nvidia_uvm"]
            else (
                'enable the driver (NixOS: hardware.nvidia, services.xserver.videoDrivers = [ "nvidia" ], '
                'boot.kernelModules = [ "nvidia_uvm" ]) and reboot'
            )
        )
        return Result.failed(f"kernel module(s) not loaded: {', '.join(missing)}", fix, **data)
    if absent:
        fix = UVM_FIX if absent == ["/dev/nvidia-uvm"] else "check `dmesg | grep -i nvidia`; reload the driver"
        return Result.failed(f"device node(s) missing: {', '.join(absent)}", fix, **data)
    if isinstance(loaded, str):
        return Result.warned(f"{loaded}; device nodes present", **data)
    if display := [m for m in _DISPLAY_MODULES if m not in loaded]:
        return Result.warned(
            f"compute modules and nodes present; {', '.join(display)} not loaded (only needed for a display)", **data
        )
    return Result.passed(
        f"{', '.join(_REQUIRED_MODULES + _DISPLAY_MODULES)} loaded; {', '.join(nodes)} present", **data
    )


def check_cdi(ctx: Context) -> Result:
    """3: the container toolkit's CDI generator ran and left a spec (only where the toolkit is used)."""
    try:
        unit: UnitState | None = show_unit(CDI_UNIT)
    except CommandError:
        unit = None
    specs = list(dict.fromkeys(p.resolve() for p in map(ctx.options.path, CDI_SPECS) if p.is_file()))
    if not specs and (unit is None or not unit.installed):
        return Result.skipped("container toolkit not in use (no CDI generator unit, no CDI spec)")
    restart = f"sudo systemctl restart {CDI_UNIT}; journalctl -u {CDI_UNIT} -b says why it failed"
    if unit is not None and unit.installed and unit.active_state != "active":
        return Result.failed(f"{CDI_UNIT} is {unit.active_state} ({unit.sub_state}, result {unit.result})", restart)
    if not specs:
        return Result.failed("no CDI spec in /run/cdi or /etc/cdi", restart)
    return _describe_spec(specs[0], restart)


def check_service(ctx: Context) -> Result:
    """4: the immich-ml unit is active and running."""
    if reason := _local_unit_unavailable(ctx):
        return Result.skipped(reason)
    unit = ctx.unit
    assert isinstance(unit, UnitState)
    data = {
        "active_state": unit.active_state,
        "sub_state": unit.sub_state,
        "main_pid": unit.main_pid,
        "restarts": unit.restarts,
    }
    state = f"{unit.active_state} ({unit.sub_state})"
    logs = f"journalctl -u {unit.name} -b"
    if unit.running:
        detail = f"{state}, MainPID {unit.main_pid}, {unit.restarts} restarts"
        if unit.restarts:
            return Result.warned(detail, f"it restarted since boot: {logs} says why", **data)
        return Result.passed(detail, **data)
    if unit.sub_state == "auto-restart":
        return Result.failed(
            f"{state}: it exited with an error and systemd is restarting it", f"{logs} says why", **data
        )
    if unit.active_state in ("activating", "reloading"):
        return Result.warned(
            f"{state}: still starting (loading models or building TensorRT engines)",
            f"wait, or follow it with {logs} -f",
            **data,
        )
    return Result.failed(
        f"{unit.name} is {state}", f"sudo systemctl start {unit.name}; {logs} says why it stopped", **data
    )


def check_journal(ctx: Context) -> Result:
    """5b: since the service last started, it did not refuse to start (strict provider mode), and every model
    loaded on the GPU provider it asked for."""
    if reason := _local_unit_unavailable(ctx):
        return Result.skipped(reason)
    try:
        lines = journal_since_start(ctx.options.unit)
    except CommandError as error:
        return Result.skipped(str(error))
    if refusals := [m.group(1) for m in map(_REFUSED.search, lines) if m]:
        return Result.failed(
            f"strict provider mode refused the start: {refusals[-1]}",
            "install the GPU build the message names (docs/gpu.md), or run the providers check for the reason",
            refusals=refusals,
        )
    loads = {m.group(1): m.group(2).split(", ") for m in map(_LOADED.search, lines) if m}
    failures = [line.strip() for line in lines if _FAILED.search(line)]
    data = {"loaded": loads, "failures": failures}
    settings = ctx.settings
    wants_gpu = not isinstance(settings, Settings) or settings.uses_gpu
    on_cpu = sorted(model for model, providers in loads.items() if providers[0] == "CPUExecutionProvider")
    fix = (
        "the GPU provider did not load: run the providers check for the reason "
        "(CUDA/cuDNN libraries, nvidia_uvm); MACHINE_LEARNING_PROVIDER_STRICT=true makes this fatal"
    )
    if wants_gpu and (failures or on_cpu):
        first = failures[0] if failures else f"{', '.join(on_cpu)} loaded on the CPU"
        return Result.failed(f"CPU fallback: {first}", fix, **data)
    if not loads:
        if not lines:
            return Result.warned(
                f"no journal lines for {ctx.options.unit} this boot",
                "run as root or as a member of systemd-journal",
                **data,
            )
        return Result.warned(
            "no model loaded since the service started",
            "models load on first use or with MACHINE_LEARNING_PRELOAD__*; rerun afterwards",
            **data,
        )
    summary = "; ".join(f"{model} on {providers[0]}" for model, providers in sorted(loads.items()))
    return Result.passed(summary, **data)


def check_memory(ctx: Context) -> Result:
    """6: GPU memory held by the service's processes, and who else shares the GPU."""
    if reason := _local_unit_unavailable(ctx) or gpu_unavailable(ctx):
        return Result.skipped(reason)
    unit = ctx.unit
    assert isinstance(unit, UnitState)
    if not unit.main_pid:
        return Result.skipped(f"{unit.name} has no main process")
    ours = _process_tree(ctx.options.path("/proc"), unit.main_pid)
    processes = compute_processes(ctx.nvml)
    mine = [p for p in processes if p.pid in ours]
    others = [p for p in processes if p.pid not in ours]
    used = sum(p.used_memory or 0 for p in mine)
    data = {
        "service_pids": sorted(ours),
        "service_bytes": used,
        "others": [{"pid": p.pid, "gpu": p.gpu, "bytes": p.used_memory} for p in others],
    }
    shared = _describe_others(ctx, others)
    if not mine:
        settings = ctx.settings
        if isinstance(settings, Settings) and settings.provider is Provider.CPU:
            return Result.skipped("the service is configured for the CPU", **data)
        return Result.warned(
            f"the service (MainPID {unit.main_pid}) holds no GPU memory{shared}",
            "no model loaded yet, or models run on the CPU: see the journal and API checks",
            **data,
        )
    low = [g for g in ctx.nvml.gpus if g.memory_total and (g.memory_total - g.memory_used) < g.memory_total / 10]
    detail = f"immich-ml uses {format_bytes(used)} on GPU {_gpu_list(mine)}{shared}"
    if low:
        return Result.warned(
            f"{detail}; under 10% free on GPU {', '.join(str(g.index) for g in low)}",
            "cap it with MACHINE_LEARNING_GPU_MEM_LIMIT (NixOS: gpu.memoryLimit) or move "
            "services to different GPUs (gpu.deviceIds)",
            **data,
        )
    return Result.passed(detail, **data)


def _local_unit_unavailable(ctx: Context) -> str | None:
    if not ctx.options.url_is_local:
        return f"the service at {ctx.options.url} is remote; run immich-gpu-check on that host"
    if isinstance(ctx.unit, CommandError):
        return str(ctx.unit)
    if not ctx.unit.installed:
        return f"{ctx.options.unit} is not installed here (use --unit, or --url for a service elsewhere)"
    return None


def _loaded_modules(modules_file: Path) -> set[str] | str:
    """Module names from /proc/modules, or why it could not be read."""
    try:
        return {line.split()[0] for line in modules_file.read_text().splitlines() if line.strip()}
    except OSError as error:
        return f"cannot read /proc/modules ({error.strerror}); modules not checked"


def _gpu_minors(ctx: Context) -> list[int]:
    return [g.minor_number for g in ctx.nvml.gpus] if ctx.nvml.ok and ctx.nvml.gpus else [0]


def _describe_spec(spec: Path, fix: str) -> Result:
    if spec.suffix != ".json":
        return Result.passed(f"CDI spec {spec} ({spec.stat().st_size} bytes)")
    try:
        names = [device["name"] for device in json.loads(spec.read_text()).get("devices", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return Result.failed(f"CDI spec {spec} is not valid: {error}", fix)
    if not names:
        return Result.failed(f"CDI spec {spec} lists no devices", fix)
    return Result.passed(f"CDI spec {spec}: devices {', '.join(names)}", devices=names)


def _process_tree(proc: Path, root_pid: int) -> set[int]:
    """`root_pid` and its descendants, from the parent pids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def _describe_others(ctx: Context, others: list[GpuProcess]) -> str:
    if not others:
        return ""
    names = []
    for p in others:
        try:
            name = ctx.options.path(f"/proc/{p.pid}/comm").read_text().strip()
        except OSError:
            name = "?"
        size = format_bytes(p.used_memory) if p.used_memory is not None else "? MiB"
        names.append(f"{name} (pid {p.pid}, {size})")
    return f"; shared with {', '.join(names)}"


def _gpu_list(processes: list[GpuProcess]) -> str:
    return ", ".join(str(gpu) for gpu in sorted({p.gpu for p in processes}))
