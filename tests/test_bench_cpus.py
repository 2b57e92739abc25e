"""scripts/bench-cpus runs end to end: a daemon under a CFS quota of its own cgroup and one under taskset,
each serving real requests, with /health's CPU figure and the quota's throttling counters in the report.
A short window on generated models: it checks the script, not the figures (those come from a quiet machine,
docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import modelgen

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench-cpus"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("taskset") is None, reason="cgroups need root; taskset")
def test_bench_cpus_reports_each_limit(tmp_path: Path) -> None:
    modelgen.write_clip(tmp_path / "models", "ViT-B-32__openai")
    out = tmp_path / "bench-cpus.json"
    command = [sys.executable, str(SCRIPT), "--models", str(tmp_path / "models"), "--limits", "quota:1.5,taskset:0"]
    command += ["--clients", "2", "--variants", "ours", "--seconds", "1", "--images", "2", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())["runs"]
    quota, taskset = runs["quota:1.5"]["ours"], runs["taskset:0"]["ours"]
    assert (quota["cpus"]["quota"], quota["cpus"]["threads"]) == ("150000/100000", 1)
    assert (taskset["cpus"]["affinity"], taskset["cpus"]["threads"]) == (1, 1)
    for entry in (quota, taskset):
        window = entry["clients"]["2"]
        assert window["per_s"] > 0 and window["errors"] == 0
        assert window["load_generator_cores"] >= 0 and window["periods_throttled"] >= 0  # 10 ms clock ticks
    assert not list(Path("/sys/fs/cgroup").glob("*/immich-ml-bench-*"))  # its cgroups are removed
