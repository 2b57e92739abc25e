"""nix/image.nix (`packages.<system>.image`, which cannot be built here) evaluated with stand-ins for dockerTools:
its environment, port, user, entrypoint and healthcheck are deploy/Containerfile's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.containerfile import image_facts

ROOT = Path(__file__).resolve().parents[2]
NANOSECONDS = 1_000_000_000


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    if shutil.which("nix-instantiate") is None:  # as tests/nix/: a skip here, a failure in CI
        if os.environ.get("IMMICH_ML_REQUIRE_NIX") == "1":
            pytest.fail("nix-instantiate is missing and IMMICH_ML_REQUIRE_NIX=1 (.ci/run installs nix-bin)")
        pytest.skip("nix-instantiate not installed (apt-get install nix-bin)")
    result = subprocess.run(
        ["nix-instantiate", "--store", "dummy://", "--eval", "--strict", "--json", "nix/tests/image-config.nix"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_environment_matches_the_containerfile(image: dict[str, Any]) -> None:
    env = dict(item.split("=", 1) for item in image["config"]["Env"])
    expected = image_facts().env
    assert {k: v for k, v in env.items() if k not in ("PATH", "SSL_CERT_FILE")} == {
        k: v for k, v in expected.items() if k != "PATH"
    }
    assert env["PATH"].endswith("-immich-ml-0.1.0/bin")  # where immich-ml, -init and -healthcheck are


def test_entrypoint_port_and_healthcheck_match_the_containerfile(image: dict[str, Any]) -> None:
    config, facts = image["config"], image_facts()
    assert config["Entrypoint"] == facts.entrypoint
    assert config["Cmd"] == facts.cmd
    assert config["ExposedPorts"] == {f"{facts.port}/tcp": {}}
    assert config["Volumes"] == {facts.env["MACHINE_LEARNING_CACHE_FOLDER"]: {}}
    healthcheck = dict(config["Healthcheck"])
    assert healthcheck.pop("Test") == ["CMD", *facts.healthcheck]
    retries = healthcheck.pop("Retries")
    assert {**{k: v // NANOSECONDS for k, v in healthcheck.items()}, "Retries": retries} == facts.healthcheck_timing


def test_user_and_cache_ownership_match_the_containerfile(image: dict[str, Any]) -> None:
    uid = image_facts().uid
    assert image["users"]["extraPasswdLines"] == [f"immich-ml:x:{uid}:{uid}:immich-ml:/home/immich-ml:/noshell"]
    assert image["users"]["extraGroupLines"] == [f"immich-ml:x:{uid}:"]
    assert f"chown {uid}:{uid} cache" in image["fakeRootCommands"]
