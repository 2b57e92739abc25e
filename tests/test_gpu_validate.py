"""scripts/gpu-validate on a host without a GPU (CI): it runs through, says so, and exercises what it can."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.gpuhost import cuda_missing

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-validate"


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module (its dataclasses look themselves up in sys.modules)."""
    loader = SourceFileLoader("gpu_validate", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_validate", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_validate", module)
    loader.exec_module(module)
    return module


@pytest.mark.skipif(cuda_missing() is None, reason="this host has a GPU and the CUDA build: the no-GPU path")
def test_quick_run_without_a_gpu_reports_no_gpu_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NO GPU found" in done.stdout
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    assert summary["gpu"] is False and summary["exit_code"] == 0

    tests = summary["steps"]["gpu-tests"]["data"]
    assert tests["collected"] >= 4 and tests["skipped"] == tests["collected"]
    for case in tests["cases"]:
        assert "::test_" in case["test"] and case["outcome"] == "skipped"
        assert case["message"].startswith("needs a GPU: "), case  # and says what is missing:
        assert "NVIDIA GPU" in case["message"] or "CUDAExecutionProvider" in case["message"], case

    checks = summary["steps"]["gpu-check"]["data"]["checks"]
    assert json.loads((out / "gpu-check.json").read_text())["checks"]  # immich-gpu-check's own JSON
    assert checks["api"]["status"] == "pass", checks["api"]  # /predict answered by the daemon the script started
    assert checks["driver"]["status"] == "fail" or checks["providers"]["status"] != "pass"
    assert summary["steps"]["bench"]["status"] == "skipped"

    # What the device tool brings back: at most 8 files, plainly named, no folders.
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    assert all((out / n).is_file() for n in names)


def visual_runs(**per_s: float) -> dict[str, Any]:
    return {name: {"result": {"per_s": value, "p50_ms": 10.0}} for name, value in per_s.items()}


def _system_python_without_onnxruntime() -> str | None:
    """A python3 on the system PATH that lacks onnxruntime (what the shebang finds outside the venv), or None."""
    probe = subprocess.run(
        ["/usr/bin/env", "python3", "-c", "import importlib.util as u; print(u.find_spec('onnxruntime') is None)"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    return "/usr/bin:/bin" if probe.stdout.strip() == "True" else None


@pytest.mark.skipif(_system_python_without_onnxruntime() is None, reason="no system python3 without onnxruntime")
def test_run_through_its_shebang_it_uses_the_checkouts_venv_or_says_what_to_run(tmp_path: Path) -> None:
    path = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run([SCRIPT, "--help"], env=path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "usage: gpu-validate" in done.stdout

    checkout = tmp_path / "checkout"  # a checkout without .venv
    (checkout / "scripts").mkdir(parents=True)
    copy = checkout / "scripts" / "gpu-validate"
    copy.write_bytes(SCRIPT.read_bytes())
    copy.chmod(0o755)
    done = subprocess.run([copy, "--help"], env=path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "gpu-validate: onnxruntime is missing; run `scripts/setup-venv --test`, "
        "then `.venv/bin/python scripts/gpu-validate`"
    ]


def test_bench_figures_cover_whatever_variants_bench_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    report = {
        "ceiling": {"1": {"1": 100.0, "16": 400.0}},
        "bare_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "runs": {"visual": {"16": visual_runs(on=300.0, off=150.0, serial=60.0)}, "gpu_mib": {"on": 900.0}},
    }
    figures = load_script(monkeypatch).bench_figures(report)
    at16 = figures["visual"]["16"]
    assert figures["bare_ceiling_per_s"] == 400.0
    assert at16["pct_of_bare_ceiling"] == {"on": 75.0, "off": 37.5, "serial": 15.0}
    assert at16["ratios"]["on/serial"] == 5.0 and at16["ratios"]["off/on"] == 0.5
    assert len(at16["ratios"]) == 6
    assert at16["pct_of_in_flight_ceiling"] == {}


def test_bench_figures_read_a_ceiling_of_measurement_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ceiling entry as a record (images/s beside CPU ms and thread counts) and a ceiling per client count."""
    record = {"per_s": 50.0, "cpu_ms_per_image": 900.0, "intra_op_threads": 2}
    report = {
        "ceiling": {"1": {"1": {**record, "per_s": 20.0}, "8": record}, "2": {"1": {**record, "per_s": 30.0}}},
        "in_flight_ceiling": {"8": {"per_s": 40.0, "runs": 1, "batch": 8}},
        "runs": {"visual": {"8": visual_runs(ours=30.0, upstream=10.0)}},
    }
    figures = load_script(monkeypatch).bench_figures(report)
    assert figures["bare_ceiling_per_s"] == 50.0
    assert figures["visual"]["8"]["pct_of_in_flight_ceiling"] == {"ours": 75.0, "upstream": 25.0}
    assert figures["visual"]["8"]["ratios"]["ours/upstream"] == 3.0


def test_the_carried_folders_are_git_ignored_and_are_the_ones_the_docs_carry() -> None:
    """Every path docs/gpu.md puts in a device call's `carry` is under scripts/gpu-carry's folder and ignored by
    git (a carried path must be ignored; otherwise the 244 MiB would also travel with every call)."""
    carried = set(re.findall(r'"(\.gpu-carry/[^"]+)"', (ROOT / "docs" / "gpu.md").read_text()))
    assert {".gpu-carry/wheels", ".gpu-carry/data", ".gpu-carry/part-1", ".gpu-carry/part-5"} <= carried
    assert "CARRY=.gpu-carry\n" in (ROOT / "scripts" / "gpu-carry").read_text()
    paths = sorted(carried | {".gpu-carry/part-2", ".gpu-carry/part-3", ".gpu-carry/part-4"})
    if shutil.which("git") is None or not (ROOT / ".gitignore").is_file():
        pytest.skip("needs git and the checkout's .gitignore (the Nix build has neither)")
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    assert ignored == paths
