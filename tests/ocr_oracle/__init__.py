"""Upstream Immich's OCR as an oracle (oracle.py), run in its own virtual environment with upstream's pins.

The environment is made on first use from PyPI (`requirements.txt`, `--no-deps`) in `.venv-ocr-oracle/<key>`
at the repository root (git-ignored), keyed by the pins and the Python version, so it is made once per pin
set and reused; a half-made one is never used (it is built aside and renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["BLAS_CORETYPE", "UPSTREAM_CASES", "blas_kernel_is_pinned", "oracle_python", "run_oracle"]

_HERE = Path(__file__).resolve().parent
_REQUIREMENTS = _HERE / "requirements.txt"
_ROOT = _HERE.parent.parent / ".venv-ocr-oracle"

UPSTREAM_CASES = _HERE.parent / "data" / "ocr-upstream"
"""Upstream's recorded answers (cases.json) and the images they answer."""

BLAS_CORETYPE = "Haswell"
"""The OpenBLAS kernel every OCR comparison runs with: upstream's line crop solves a homography with NumPy's
float32 SVD, whose last bits differ per OpenBLAS kernel, and so do the crops and the text scores."""


def blas_kernel_is_pinned() -> bool:
    """Whether this process runs NumPy with upstream's OpenBLAS kernel (scripts/test sets it)."""
    return os.environ.get("OPENBLAS_CORETYPE") == BLAS_CORETYPE


def _key() -> str:
    pins = _REQUIREMENTS.read_bytes() + sys.version.split()[0].encode()
    return hashlib.sha256(pins).hexdigest()[:16]


def oracle_python() -> Path:
    """The oracle environment's interpreter, made first if needed (pip from PyPI, about 15 s)."""
    venv = _ROOT / _key()
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    building = venv.with_name(f"{venv.name}.{os.getpid()}.part")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(building)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(building / "bin" / "python"), "install", "--quiet"]
    result = subprocess.run(
        [*pip, "--no-deps", "--only-binary=:all:", "-r", str(_REQUIREMENTS)], capture_output=True, text=True
    )
    if result.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        raise RuntimeError(f"making the OCR oracle environment failed:\n{result.stdout}{result.stderr}")
    try:
        building.rename(venv)
    except OSError:  # another test process finished the same environment first
        shutil.rmtree(building, ignore_errors=True)
        if not python.is_file():
            raise
    return python


def run_oracle(requests: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """Upstream's answers to `requests` (`{"image": path, "entries": {...}}`), with the oracle's package
    versions and model hashes; NumPy runs with OPENBLAS_CORETYPE=Haswell."""
    output = workdir / "oracle-answers.json"
    env = {**os.environ, "OPENBLAS_CORETYPE": BLAS_CORETYPE}
    env.pop("PYTHONPATH", None)  # nothing of ours, nor of our environment, is importable there
    result = subprocess.run(
        [str(oracle_python()), "-I", str(_HERE / "oracle.py"), str(output)],
        input=json.dumps({"requests": requests}),
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the OCR oracle failed:\n{result.stderr[-4000:]}")
    return json.loads(output.read_text())  # type: ignore[no-any-return]
