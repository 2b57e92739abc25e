"""Usable CPUs read from real files: a cgroup v1, v2 and hybrid tree built under tmp_path, as the kernel
lays them out (/proc/self/cgroup, /proc/self/mountinfo, the hierarchies' cpu files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from immich_ml.cpus import usable_cpus

HYBRID_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 {root} /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTS = "30 23 0:27 {root} /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc(tmp_path: Path, cgroup: str, mounts: str, mount_root: str = "/") -> Path:
    """/proc/self with `cgroup` and `mounts` (mount root substituted)."""
    proc_self = tmp_path / "proc" / "self"
    write(proc_self / "cgroup", cgroup)
    write(proc_self / "mountinfo", mounts.format(root=mount_root))
    return proc_self


def v1_quota(folder: Path, quota: int, period: int = 100000) -> None:
    write(folder / "cpu.cfs_quota_us", f"{quota}\n")
    write(folder / "cpu.cfs_period_us", f"{period}\n")


def test_v1_the_smallest_quota_on_the_path_up_to_the_root_wins(tmp_path: Path) -> None:
    proc_self = proc(tmp_path, "4:memory:/pod/app\n2:cpu,cpuacct:/pod/app\n0::/\n", HYBRID_MOUNTS)
    hierarchy = tmp_path / "sys/fs/cgroup/cpu,cpuacct"
    v1_quota(hierarchy, -1)
    v1_quota(hierarchy / "pod", 150000)  # the pod's limit, above the process's own cgroup
    v1_quota(hierarchy / "pod/app", 300000)
    budget = usable_cpus(proc_self=proc_self, root=tmp_path, affinity=4)
    assert budget.cpus == 1.5
    assert budget.threads == 1
    assert budget.quota is not None and budget.quota.source == hierarchy / "pod"
    assert budget.describe().startswith("1.5 CPUs (quota 150000/100000 in ")
    assert budget.describe().endswith("affinity 4 CPUs), 1 thread")
    assert budget.as_json() == {"usable": 1.5, "threads": 1, "affinity": 4, "quota": "150000/100000"}


def test_v1_without_a_quota_the_affinity_counts(tmp_path: Path) -> None:
    proc_self = proc(tmp_path, "2:cpu,cpuacct:/user.slice\n", HYBRID_MOUNTS)
    v1_quota(tmp_path / "sys/fs/cgroup/cpu,cpuacct/user.slice", -1)
    budget = usable_cpus(proc_self=proc_self, root=tmp_path, affinity=3)
    assert (budget.quota, budget.cpus, budget.threads) == (None, 3.0, 3)


@pytest.mark.parametrize(("quota", "affinity", "threads"), [(250000, 8, 2), (50000, 8, 1), (800000, 2, 2)])
def test_threads_are_the_quota_rounded_down_at_least_one_at_most_the_affinity(
    tmp_path: Path, quota: int, affinity: int, threads: int
) -> None:
    proc_self = proc(tmp_path, "0::/app.slice/immich-ml.service\n", V2_MOUNTS)
    write(tmp_path / "sys/fs/cgroup/app.slice/immich-ml.service/cpu.max", f"{quota} 100000\n")
    assert usable_cpus(proc_self=proc_self, root=tmp_path, affinity=affinity).threads == threads


def test_v2_max_means_no_limit_and_a_parent_limit_still_counts(tmp_path: Path) -> None:
    proc_self = proc(tmp_path, "0::/kubepods/pod1/ctr\n", V2_MOUNTS)
    cgroup = tmp_path / "sys/fs/cgroup"
    write(cgroup / "kubepods/pod1/ctr/cpu.max", "max 100000\n")
    write(cgroup / "kubepods/pod1/cpu.max", "200000 50000\n")  # 4 CPUs at a 50 ms period
    write(cgroup / "kubepods/cpu.max", "max 100000\n")
    budget = usable_cpus(proc_self=proc_self, root=tmp_path, affinity=16)
    assert (budget.cpus, budget.threads) == (4.0, 4)


def test_a_namespaced_cgroup_reads_the_mount_point_as_its_own(tmp_path: Path) -> None:
    """Inside a container the hierarchy is mounted at the container's cgroup while /proc/self/cgroup may
    still name the host's path (v1 without a cgroup namespace): the mount root maps it back."""
    proc_self = proc(
        tmp_path, "2:cpu,cpuacct:/machine.slice/libpod-ab.scope\n", HYBRID_MOUNTS, "/machine.slice/libpod-ab.scope"
    )
    v1_quota(tmp_path / "sys/fs/cgroup/cpu,cpuacct", 100000)
    assert usable_cpus(proc_self=proc_self, root=tmp_path, affinity=2).threads == 1
    # With a cgroup namespace the path reads "/" while the mount root is the host's: the mount point again.
    proc_self = proc(tmp_path, "0::/\n", V2_MOUNTS, "/kubepods/pod1")
    write(tmp_path / "sys/fs/cgroup/cpu.max", "100000 100000\n")
    assert usable_cpus(proc_self=proc_self, root=tmp_path, affinity=2).threads == 1


def test_the_hybrid_v2_hierarchy_without_the_cpu_controller_limits_nothing(tmp_path: Path) -> None:
    proc_self = proc(tmp_path, "2:cpu,cpuacct:/\n0::/user.slice\n", HYBRID_MOUNTS)
    write(tmp_path / "sys/fs/cgroup/unified/user.slice/cgroup.procs", "1\n")
    assert usable_cpus(proc_self=proc_self, root=tmp_path, affinity=2).quota is None


def test_missing_or_garbled_files_count_as_no_limit(tmp_path: Path) -> None:
    assert usable_cpus(proc_self=tmp_path / "nowhere", root=tmp_path, affinity=2).threads == 2
    proc_self = proc(tmp_path, "0::/a\n", V2_MOUNTS)
    write(tmp_path / "sys/fs/cgroup/a/cpu.max", "lots 100000\n")
    assert usable_cpus(proc_self=proc_self, root=tmp_path, affinity=2).quota is None


def test_this_process_has_at_least_one_thread_and_no_more_than_its_affinity() -> None:
    budget = usable_cpus()
    assert 1 <= budget.threads <= len(os.sched_getaffinity(0))
