"""The CPUs this process may use: its affinity mask and the CFS quota of its cgroups (v1 and v2).

`os.cpu_count()` and ONNX Runtime see the host's cores; in a container with `--cpus=2` or a Kubernetes pod
with a CPU limit the kernel throttles the process to its quota, so thread pools sized for the host's cores
only queue up behind the throttle. `usable_cpus` reads what the process really has: the CPUs in
`sched_getaffinity` (taskset, cpusets) and the smallest `cpu.max` (v2) or `cpu.cfs_quota_us`/
`cpu.cfs_period_us` (v1) on the path from the process's cgroup up to the root of each mounted hierarchy.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuBudget", "Quota", "cpu_hierarchies", "usable_cpus"]

_ESCAPED = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Quota:
    """A CFS bandwidth limit: `quota` µs of CPU time every `period` µs, read from `source`."""

    quota: int
    period: int
    source: Path

    @property
    def cpus(self) -> float:
        return self.quota / self.period


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs the process may use: `affinity` CPUs it may run on, at most `quota` of CPU time."""

    affinity: int
    quota: Quota | None

    @property
    def cpus(self) -> float:
        """Usable CPUs as a fraction: the quota, or the affinity count where that is smaller or there is none."""
        return float(self.affinity) if self.quota is None else min(float(self.affinity), self.quota.cpus)

    @property
    def threads(self) -> int:
        """Threads that can run at once without being throttled: the quota rounded down, at least 1, at
        most the affinity count."""
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.floor(self.quota.cpus)))

    def describe(self) -> str:
        """E.g. `1.5 CPUs (quota 150000/100000 in /sys/fs/cgroup/cpu/x, affinity 4 CPUs), 1 thread`."""
        limit = f"quota {self.quota.quota}/{self.quota.period} in {self.quota.source}, " if self.quota else ""
        return (
            f"{self.cpus:g} CPUs ({limit}affinity {self.affinity} CPUs), "
            f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        )

    def as_json(self) -> dict[str, object]:
        """The figures for /health."""
        return {
            "usable": round(self.cpus, 3),
            "threads": self.threads,
            "affinity": self.affinity,
            "quota": None if self.quota is None else f"{self.quota.quota}/{self.quota.period}",
        }


def usable_cpus(
    *,
    proc_self: Path = Path("/proc/self"),
    root: Path = Path("/"),
    affinity: int | None = None,
) -> CpuBudget:
    """The CPU budget of the calling process.

    `proc_self` holds its `cgroup` and `mountinfo` files; `root` is prefixed to the mount points read from
    `mountinfo` (tests build a cgroup tree under a temporary folder); `affinity` defaults to the size of
    `os.sched_getaffinity(0)`. Files that are missing or unreadable count as no limit.
    """
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quotas = [quota for folder in _cpu_cgroup_folders(proc_self, root) for quota in _quotas_up_to_mount(*folder)]
    return CpuBudget(affinity=max(1, affinity), quota=min(quotas, key=lambda q: q.cpus, default=None))


def cpu_hierarchies(proc_self: Path = Path("/proc/self")) -> list[tuple[Path, int]]:
    """(mount point, cgroup version) of each mounted cgroup hierarchy that can hold a CPU quota (the
    benchmark of CPU limits makes its cgroups there)."""
    return [(Path(mount_point), version) for _, mount_point, version in _cpu_mounts(proc_self / "mountinfo")]


def _cpu_cgroup_folders(proc_self: Path, root: Path) -> Iterator[tuple[Path, Path, int]]:
    """(the process's cgroup folder, its hierarchy's mount point, cgroup version) for each mounted
    hierarchy with the cpu controller."""
    paths = _cgroup_paths(proc_self / "cgroup")
    for mount_root, mount_point, version in _cpu_mounts(proc_self / "mountinfo"):
        path = paths.get("cpu" if version == 1 else "")
        if path is None:
            continue
        mount = root / mount_point.lstrip("/")
        relative = os.path.relpath(path, mount_root)
        # Outside the mounted part (a container's cgroup namespace shows its own cgroup as the root): the
        # mount point itself is the process's cgroup.
        yield (mount if relative.startswith("..") else mount / relative), mount, version


def _cgroup_paths(cgroup_file: Path) -> dict[str, str]:
    """Controller → cgroup path from /proc/self/cgroup; cgroup v2's unified line under the key ''."""
    paths: dict[str, str] = {}
    for line in _read(cgroup_file).splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _cpu_mounts(mountinfo: Path) -> Iterator[tuple[str, str, int]]:
    """(root inside the hierarchy, mount point, version) of each cgroup mount that can limit the CPU."""
    for line in _read(mountinfo).splitlines():
        fields, _, tail = line.partition(" - ")
        parts, extra = fields.split(), tail.split()
        if len(parts) < 5 or len(extra) < 3:
            continue
        mount_root, mount_point = _unescape(parts[3]), _unescape(parts[4])
        if extra[0] == "cgroup2":
            yield mount_root, mount_point, 2
        elif extra[0] == "cgroup" and "cpu" in extra[2].split(","):
            yield mount_root, mount_point, 1


def _quotas_up_to_mount(folder: Path, mount: Path, version: int) -> Iterator[Quota]:
    """Every quota set on `folder` and its parents up to `mount`."""
    while True:
        quota = _read_quota(folder, version)
        if quota is not None:
            yield quota
        if folder == mount or mount not in folder.parents:
            return
        folder = folder.parent


def _read_quota(folder: Path, version: int) -> Quota | None:
    if version == 2:
        fields = _read(folder / "cpu.max").split()
        if len(fields) != 2 or fields[0] == "max":
            return None
        quota, period = fields
    else:
        quota, period = _read(folder / "cpu.cfs_quota_us").strip(), _read(folder / "cpu.cfs_period_us").strip()
    try:
        limit = Quota(int(quota), int(period), folder)
    except ValueError:
        return None
    return limit if limit.quota > 0 and limit.period > 0 else None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return _ESCAPED.sub(lambda match: chr(int(match.group(1), 8)), field)
