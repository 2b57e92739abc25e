"""The drop-in claim, literally: an operator's compose project (tests/containers/compose/docker-compose.yml) with
deploy/compose's override, run by podman-compose. The `model-cache` volume was filled by root; a client container
on the project network sends a CLIP /predict to `immich-machine-learning` by name and gets the answer that
`immich-ml serve` outside any container gives."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import modelgen
from tests.containers.clip_requests import IMAGE, MODEL, TEXT, TEXTUAL, VISUAL
from tests.containers.podman import Podman
from tests.deploy.containerfile import image_facts

ROOT = Path(__file__).resolve().parents[2]
FILES = [
    ROOT / "tests" / "containers" / "compose" / "docker-compose.yml",
    ROOT / "deploy" / "compose" / "docker-compose.override.yml",
]
SERVICE_URL = "http://immich-machine-learning:3003"
VOLUME = "immich_model-cache"


class Project:
    """`podman-compose -f docker-compose.yml -f docker-compose.override.yml` with our podman configuration."""

    def __init__(self, podman: Podman, env: dict[str, str]) -> None:
        self.podman = podman
        self.env = podman.env | env

    def __call__(self, *args: str) -> str:
        files = [arg for path in FILES for arg in ("-f", str(path))]
        command = [sys.executable, "-m", "podman_compose", *files, *args]
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=600, check=False)
        assert result.returncode == 0, f"podman-compose {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout


@pytest.fixture
def project(podman: Podman, ml_image: str, tmp_path: Path) -> Iterator[Project]:
    """The project with its `model-cache` volume created and filled by root beforehand, taken down afterwards."""
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    shutil.copy(ROOT / "tests" / "containers" / "compose" / "predict_client.py", client_dir)
    (client_dir / "image.jpg").write_bytes(IMAGE)
    podman("volume", "create", VOLUME)
    mountpoint = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", VOLUME).stdout.strip())
    modelgen.write_clip(mountpoint, MODEL)
    compose = Project(podman, {"IMMICH_ML_IMAGE": ml_image, "CLIENT_DIR": str(client_dir)})
    try:
        yield compose
    finally:
        compose("--profile", "client", "down", "--volumes")
        podman("volume", "rm", "--force", VOLUME, check=False)


def _ask(project: Project, entries: object, *options: str) -> Any:
    output = project("--profile", "client", "run", "--rm", "client", SERVICE_URL, json.dumps(entries), *options)
    answer = json.loads(output.strip().splitlines()[-1])
    assert answer["status"] == 200, answer
    return answer["body"]


def test_only_the_image_changes() -> None:
    """The override replaces the operator's image and states compose's own stop default, nothing else."""
    [service] = yaml.safe_load(FILES[1].read_text())["services"].values()
    assert set(service) == {"image", "stop_grace_period"}
    assert float(service["stop_grace_period"].removesuffix("s")) > float(
        image_facts().env["MACHINE_LEARNING_SHUTDOWN_TIMEOUT_S"]
    )


def test_a_client_on_the_project_network_gets_the_answers_from_outside(
    project: Project, clip_answers: dict[str, Any]
) -> None:
    project("up", "-d", "immich-machine-learning")
    assert _ask(project, TEXTUAL, "--text", TEXT) == clip_answers["text"]
    assert _ask(project, VISUAL, "--image", "/client/image.jpg") == clip_answers["image"]
    owners = {
        path.stat().st_uid
        for path in Path(
            project.podman("volume", "inspect", "--format", "{{.Mountpoint}}", VOLUME).stdout.strip()
        ).rglob("*")
    }
    assert owners == {image_facts().uid}
