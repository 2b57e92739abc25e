"""The image deploy/Containerfile builds, on the harness' Debian base (`BASE`), built once per set of inputs.

`podman build --format docker` (the OCI format has no HEALTHCHECK). The wheels come from the host: `pip wheel`
there fills a folder from the host's own index configuration and cache (25 s here, against minutes of downloads
inside the build, where pip's HTTP cache stores nothing behind this network's proxy), and the build installs from
it without an index (`PIP_FIND_LINKS`, `PIP_NO_INDEX`). pip also gets the host's CA bundle as a build secret.
Neither goes into a layer.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from tests.containers.base import REPOSITORY, input_tag, lock
from tests.containers.podman import Podman

__all__ = ["CONTEXT_FILES", "containerfile_image"]

ROOT = Path(__file__).resolve().parents[2]
CONTEXT_FILES = ("deploy/Containerfile", ".containerignore", "pyproject.toml", "README.md", "scripts/opencv-headless")
"""With service/, everything the image is made from (the build context .containerignore lets through)."""
_WHEELS_IN_BUILD = "/run/wheels"
_BUILD_TIMEOUT_S = 900


def _context_digest() -> str:
    digest = hashlib.sha256()
    files = [ROOT / name for name in CONTEXT_FILES] + sorted((ROOT / "service").rglob("*.py"))
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def containerfile_image(podman: Podman, base: str) -> str:
    """deploy/Containerfile built on `base`; built if this store lacks it."""
    ref = f"{REPOSITORY}/containerfile:{input_tag([base, _context_digest()])}"
    with lock():
        if podman.image_exists(ref):
            return ref
        ca_bundle = ssl.get_default_verify_paths().cafile or os.environ.get("SSL_CERT_FILE", "")
        with tempfile.TemporaryDirectory(prefix="immich-ml-wheelhouse-") as wheelhouse:
            _fill_wheelhouse(Path(wheelhouse))
            _build(podman, ref, base, Path(wheelhouse), ca_bundle)
    return ref


def _fill_wheelhouse(wheelhouse: Path) -> None:
    """Wheels of the package's dependencies and of its build back-end, from the host's pip."""
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheelhouse), str(ROOT), *build_requires],
        check=True,
        capture_output=True,
        timeout=_BUILD_TIMEOUT_S,
    )


def _build(podman: Podman, ref: str, base: str, wheelhouse: Path, ca_bundle: str) -> None:
    podman(
        "build",
        "--format",
        "docker",
        "--file",
        str(ROOT / "deploy" / "Containerfile"),
        "--build-arg",
        f"BASE={base}",
        "--build-arg",
        f"PIP_FIND_LINKS={_WHEELS_IN_BUILD}",
        "--build-arg",
        "PIP_NO_INDEX=1",
        "--volume",
        f"{wheelhouse}:{_WHEELS_IN_BUILD}:ro",
        "--secret",
        f"id=pip-ca,src={ca_bundle}",
        "--tag",
        ref,
        str(ROOT),
        timeout_s=_BUILD_TIMEOUT_S,
    )
