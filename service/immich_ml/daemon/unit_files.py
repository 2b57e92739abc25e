"""systemd files for hosts that are not NixOS: the unit, its GPU drop-in and the system user.

The unit mirrors the NixOS module's (`nix/module.nix`): `Type=notify` with the watchdog, a dedicated user,
the model cache as `CacheDirectory=` (`/var/cache/immich-ml`, created and owned by systemd, so no tmpfiles.d
snippet is needed) and the same hardening. Operator settings go to `/etc/immich-ml/immich-ml.env`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from immich_ml.http.connections import LISTEN_BACKLOG

__all__ = ["ENV_FILE", "HIDDEN_BY_PROTECT_HOME", "SOCKET", "UNIT", "UnitError", "install", "planned", "render"]

UNIT = PurePosixPath("etc/systemd/system/immich-ml.service")
SOCKET = PurePosixPath("etc/systemd/system/immich-ml.socket")
GPU_DROP_IN = PurePosixPath("etc/systemd/system/immich-ml.service.d/gpu.conf")
SYSUSERS = PurePosixPath("etc/sysusers.d/immich-ml.conf")
ENV_FILE = PurePosixPath("etc/immich-ml/immich-ml.env")

HIDDEN_BY_PROTECT_HOME = (PurePosixPath("/home"), PurePosixPath("/root"), PurePosixPath("/run/user"))
"""What `ProtectHome=yes` makes inaccessible to the service: the program must live elsewhere."""

_UNIT = """\
# immich-ml, written by `immich-ml systemd install`. Local changes belong in a drop-in
# (`systemctl edit immich-ml`); settings in /etc/immich-ml/immich-ml.env.
[Unit]
Description=Immich machine learning (immich-ml)
After=network.target
# immich-ml.socket listens, and keeps listening while this service restarts: connections wait in its
# backlog. Stop both (`systemctl stop immich-ml.socket immich-ml.service`); the socket alone starts the
# service again at the next connection. (The socket orders itself before the service.)
Requires=immich-ml.socket

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} serve
EnvironmentFile=-/etc/immich-ml/immich-ml.env
Environment=NO_COLOR=1
# PrivateDevices hides the GPU from this unit, so `auto` could only fail over to the CPU; `--gpu` adds the
# drop-in that opens the NVIDIA devices and sets cuda.
Environment=MACHINE_LEARNING_PROVIDER=cpu
Environment=MACHINE_LEARNING_CACHE_FOLDER=%C/immich-ml
Environment=XDG_CACHE_HOME=%C/immich-ml
Environment=HF_HOME=%C/immich-ml/huggingface
Restart=on-failure
RestartSec=5
# Long enough for a first start that downloads models; the daemon extends it while loading anyway.
TimeoutStartSec=30min
# The daemon's whole stop (finish the requests in flight, close) takes at most
# MACHINE_LEARNING_SHUTDOWN_TIMEOUT_S (30 s) after SIGTERM; raise this with it.
TimeoutStopSec=45
WatchdogSec=60
User=immich-ml
Group=immich-ml
CacheDirectory=immich-ml
CacheDirectoryMode=0750
WorkingDirectory=%C/immich-ml
UMask=0027
Nice=0
# One descriptor per client connection (Immich, or a balancer's keep-alive pool) plus model downloads; the
# soft default of 1024 refuses connections under a burst of clients. The NixOS module's value.
LimitNOFILE=65536

CapabilityBoundingSet=
NoNewPrivileges=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
PrivateTmp=yes
PrivateMounts=yes
PrivateUsers=yes
PrivateDevices=yes
DevicePolicy=closed
ProtectSystem=strict
ProtectHome=yes
ProtectProc=invisible
# onnxruntime reads /proc/cpuinfo and /proc/meminfo.
ProcSubset=all
ProtectClock=yes
ProtectControlGroups=yes
ProtectHostname=yes
ProtectKernelLogs=yes
ProtectKernelModules=yes
ProtectKernelTunables=yes
RemoveIPC=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
# @system-service includes @ipc (memfd_create, which the CUDA driver needs at initialisation);
# @resources stays allowed for NUMA and affinity calls (mbind, sched_setaffinity).
SystemCallFilter=@system-service @resources
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""

_SOCKET = """\
# immich-ml's listening socket, written by `immich-ml systemd install`. The address: a drop-in
# (`systemctl edit immich-ml.socket`) with `ListenStream=` emptied, then the new one.
[Unit]
Description=Immich machine learning (immich-ml) listening socket

[Socket]
ListenStream=3003
# Requests that arrive while the service restarts wait here (the daemon listens with the same backlog):
# many times what an Immich server has in flight, a few requests per job type, each waiting for its answer.
Backlog={backlog}

[Install]
WantedBy=sockets.target
"""

_GPU_DROP_IN = """\
# NVIDIA GPU for immich-ml, written by `immich-ml systemd install --gpu`.
[Unit]
# What CUDA needs from the host: the driver's kernel modules (loaded at boot) and, where the driver
# ships it, its persistence daemon. Ordering only: a host without either starts all the same.
After=systemd-modules-load.service nvidia-persistenced.service

[Service]
# CUDA needs /dev/nvidia-uvm. libcuda would load nvidia_uvm on demand through the setuid
# nvidia-modprobe, which NoNewPrivileges forbids: load it before the start, with privileges (+),
# and carry on (-) where there is no such module (immich-gpu-check then says what is missing).
ExecStartPre=+-modprobe -q nvidia_uvm
Environment=MACHINE_LEARNING_PROVIDER=cuda
# Fail rather than quietly run on the CPU when CUDA does not come up (check with immich-gpu-check).
Environment=MACHINE_LEARNING_PROVIDER_STRICT=true
# CUDA's PTX JIT cache; its default (~/.nv/ComputeCache) is read-only under ProtectSystem.
Environment=CUDA_CACHE_PATH=%C/immich-ml/cuda
# PrivateDevices hides /dev/nvidia*: allow the device classes instead (major numbers from /proc/devices
# also cover nodes created after start). PrivateUsers would map the video and render groups to nobody.
PrivateDevices=no
PrivateUsers=no
DevicePolicy=closed
DeviceAllow=char-nvidiactl rw
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw
SupplementaryGroups=video render
# Pinned host buffers for host-to-device copies.
LimitMEMLOCK=infinity
Nice=-10
"""

_SYSUSERS = """\
# The immich-ml service user (systemd-sysusers), written by `immich-ml systemd install`.
u immich-ml - "Immich machine learning" /var/cache/immich-ml
"""

_ENV_FILE = """\
# Settings for immich-ml (see docs/configuration.md); read at every start (the address is immich-ml.socket's).
# Examples:
# MACHINE_LEARNING_ALLOWED_CLIENTS=172.16.0.0/12,127.0.0.0/8
# MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL=ViT-B-32__openai
"""


class UnitError(ValueError):
    """The unit cannot be written as asked; the message says what to do instead."""


def render(executable: Path, *, gpu: bool = False) -> dict[PurePosixPath, str]:
    """The files to install (paths relative to the root) for `executable`, the installed `immich-ml`."""
    if not executable.is_absolute():
        raise UnitError(f"{executable}: the program path in ExecStart must be absolute")
    hidden = next((top for top in HIDDEN_BY_PROTECT_HOME if executable.is_relative_to(top)), None)
    if hidden is not None:
        raise UnitError(
            f"{executable} is under {hidden}, which the unit's ProtectHome=yes hides from the service. "
            "Install immich-ml outside home directories, e.g. `python3 -m venv /opt/immich-ml && "
            "/opt/immich-ml/bin/pip install .`, and run /opt/immich-ml/bin/immich-ml systemd install"
        )
    files = {
        UNIT: _UNIT.format(exec_start=_exec_argument(executable)),
        SOCKET: _SOCKET.format(backlog=LISTEN_BACKLOG),
        SYSUSERS: _SYSUSERS,
    }
    if gpu:
        files[GPU_DROP_IN] = _GPU_DROP_IN
    return files


def planned(files: Mapping[PurePosixPath, str], root: Path) -> dict[PurePosixPath, str]:
    """What `install` writes under `root`: `files`, plus the example settings file unless one exists there
    (the operator's settings are never overwritten)."""
    if (root / ENV_FILE).exists():
        return dict(files)
    return {**files, ENV_FILE: _ENV_FILE}


def install(files: Mapping[PurePosixPath, str], root: Path) -> list[Path]:
    """Write the `planned` files under `root`; returns what was written."""
    written = []
    for relative, text in planned(files, root).items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        written.append(target)
    return written


def _exec_argument(executable: Path) -> str:
    """`executable` quoted for ExecStart (spaces, quotes) with `%` escaped from specifier expansion."""
    text = str(executable).replace("%", "%%")
    if any(c in text for c in " \t\"'\\"):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text
