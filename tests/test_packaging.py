"""Packaging: the CUDA requirements list stays in step with pyproject.toml's dependencies."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cuda_requirements_match_pyproject_except_the_onnxruntime_build() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    cuda = [
        line.strip()
        for line in (ROOT / "scripts/requirements-cuda.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sorted(cuda) == sorted(d.replace("onnxruntime>", "onnxruntime-gpu>") for d in declared)
