"""Restarts without a package index: scripts/setup-venv reinstalls only when the dependencies changed, so
scripts/serve and scripts/test start from a complete .venv with the index unreachable."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".venv/.immich-ml-installed"
# An index that refuses connections, and pip told to use no index at all.
OFFLINE = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}


@pytest.fixture
def offline_env() -> dict[str, str]:
    if not (ROOT / ".venv").exists():
        # The Nix build's check phase: its dependencies come from Nix, and making a .venv needs the network.
        pytest.skip("no .venv in this tree, and creating one needs the package index")
    if not (ROOT / STAMP).is_file():
        pytest.fail(f"{STAMP} is missing: run scripts/setup-venv --test (scripts/test does) before this test")
    return {**os.environ, **OFFLINE}


def test_serve_restarts_with_no_package_index(offline_env: dict[str, str], tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    env = {**offline_env, "MACHINE_LEARNING_CACHE_FOLDER": str(tmp_path), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    log = tmp_path / "serve.log"
    started = time.monotonic()
    with log.open("wb") as out:
        serve = subprocess.Popen([ROOT / "scripts" / "serve", "--port", str(port)], env=env, stdout=out, stderr=out)
    try:
        deadline = started + 120
        while True:
            assert serve.poll() is None, f"scripts/serve exited with {serve.returncode}:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    assert response.read() == b"pong"
                    break
            except OSError:
                assert time.monotonic() < deadline, f"no /ping answer within 120 s:\n{log.read_text()}"
                time.sleep(0.1)
        print(f"\nscripts/serve, offline restart: first /ping after {time.monotonic() - started:.1f} s")
    finally:
        serve.send_signal(signal.SIGTERM)  # serve execs the daemon: this is the daemon
        assert serve.wait(60) == 0, log.read_text()
    output = log.read_text()
    assert "setup-venv: .venv up to date" in output
    assert "installing dependencies" not in output


def test_scripts_test_gets_to_pytest_with_no_package_index(offline_env: dict[str, str]) -> None:
    result = subprocess.run(
        [ROOT / "scripts" / "test", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_settings.py"],
        env=offline_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "setup-venv: .venv up to date" in result.stderr
    assert "tests collected" in result.stdout


@pytest.mark.parametrize("changed_file", ["pyproject.toml", "constraints/ocr.txt"])
def test_a_changed_dependency_file_reinstalls(offline_env: dict[str, str], tmp_path: Path, changed_file: str) -> None:
    """A copy of the project with a venv that has no pip: up to date while nothing changed; once pyproject.toml
    or the OCR version constraints change, setup-venv says it installs and fails (no index, no pip) instead of
    starting stale."""
    for name in ("scripts/setup-venv", "pyproject.toml", "constraints/ocr.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / ".venv"], check=True, timeout=120)
    shutil.copy2(ROOT / STAMP, tmp_path / STAMP)

    def setup() -> subprocess.CompletedProcess[str]:
        command = [tmp_path / "scripts" / "setup-venv", "--test"]
        return subprocess.run(command, env=offline_env, capture_output=True, text=True, timeout=300)

    unchanged = setup()
    assert unchanged.returncode == 0, unchanged.stderr
    assert "setup-venv: .venv up to date" in unchanged.stderr
    with (tmp_path / changed_file).open("a") as dependencies:
        dependencies.write("\n# a changed dependency list\n")
    changed = setup()
    assert changed.returncode != 0
    assert "setup-venv: installing dependencies (pip's progress follows)" in changed.stderr
    assert not (tmp_path / STAMP).exists()  # the stamp goes first, so a failed install is retried next time
