"""Fixtures for the container tests: the runner, the shared images, and a booted systemd machine.

Without a usable podman (not root, podman/runc/mmdebstrap missing) these tests skip with the reason;
with IMMICH_ML_REQUIRE_CONTAINERS=1 (`.ci/run` sets it) that is a failure instead, so CI cannot skip them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.containers import base
from tests.containers.clip_requests import answers_outside
from tests.containers.daemon_image import daemon_image
from tests.containers.oci_image import containerfile_image
from tests.containers.podman import Podman, skip_or_fail, unusable_reason

SYSTEMD_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "curl")
"""The systemd layer: an init, its bus, an interpreter for /opt/immich-ml's venv, curl for in-machine checks."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the test, so the runner's teardown knows whether to dump logs."""
    outcome: Any = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="session")
def podman_usable() -> None:
    reason = unusable_reason()
    if reason is not None:
        skip_or_fail(reason)


@pytest.fixture(scope="session")
def image_builder(podman_usable: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """The runner that builds the shared images (its build containers never outlive a build)."""
    runner = Podman(tmp_path_factory.mktemp("podman-images"))
    yield runner
    runner.cleanup(dump_logs=False)


@pytest.fixture(scope="session")
def debian_image(image_builder: Podman) -> str:
    """The minimal Debian base image (mmdebstrap + podman import)."""
    return base.base_image(image_builder)


@pytest.fixture(scope="session")
def systemd_image(image_builder: Podman, debian_image: str) -> str:
    """Debian with systemd as init, Python and curl."""
    return base.layer(image_builder, debian_image, "systemd", SYSTEMD_PACKAGES)


@pytest.fixture(scope="session")
def immich_ml_image(image_builder: Podman, systemd_image: str) -> str:
    """The systemd image with immich-ml in /opt/immich-ml, installed from this checkout's wheel."""
    return daemon_image(image_builder, systemd_image)


@pytest.fixture(scope="session")
def ml_image(image_builder: Podman, debian_image: str) -> str:
    """deploy/Containerfile's image, built on the Debian base image."""
    return containerfile_image(image_builder, debian_image)


@pytest.fixture(scope="session")
def clip_answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What `immich-ml serve` outside any container answers to the image tests' CLIP requests."""
    return answers_outside(tmp_path_factory.mktemp("outside"))


@pytest.fixture
def podman(podman_usable: None, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Podman]:
    """A runner for one test: its containers are removed afterwards, their logs printed if the test failed."""
    runner = Podman(tmp_path / "podman")
    yield runner
    call = getattr(request.node, "report_call", None)
    runner.cleanup(dump_logs=call is None or call.failed)
