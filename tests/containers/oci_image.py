"""The image deploy/Containerfile builds, on the harness' Debian base (`BASE`), built once per set of inputs.

`podman build --format docker` (the OCI format has no HEALTHCHECK); pip gets the host's CA bundle as a build
secret (in no layer). The host's pip cache cannot be lent to the build: pip's HTTP cache stores nothing behind
this network's proxy (the host's cache stays empty). `build` can instead install from a wheelhouse `pip wheel`
fills on the host (`PIP_FIND_LINKS`, `PIP_NO_INDEX`); scripts/measure-image found it no faster than the index.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

from tests.containers.base import REPOSITORY, input_tag, lock
from tests.containers.podman import Podman

__all__ = ["CONTEXT_FILES", "build", "containerfile_image"]

ROOT = Path(__file__).resolve().parents[2]
CONTEXT_FILES = (
    "deploy/Containerfile",
    ".containerignore",
    "pyproject.toml",
    "README.md",
    "scripts/opencv-headless",
    "constraints/ocr.txt",
)
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
    """deploy/Containerfile built on `base` as `docker build` would (pip reaching the index); built if this
    store lacks it. A host wheelhouse was measured no faster here (scripts/measure-image, docs/docker.md)."""
    ref = f"{REPOSITORY}/containerfile:{input_tag([base, _context_digest()])}"
    with lock():
        if not podman.image_exists(ref):
            build(podman, ref, base, wheelhouse=False)
    return ref


def build(podman: Podman, ref: str, base: str, *, wheelhouse: bool, extra: Sequence[str] = ()) -> None:
    """`podman build` deploy/Containerfile as `ref` on `base`: pip installs from a wheelhouse the host fills,
    or (`wheelhouse=False`) from the package index inside the build, as `docker build` does. `extra`: more
    `podman build` options."""
    ca_bundle = ssl.get_default_verify_paths().cafile or os.environ.get("SSL_CERT_FILE", "")
    options = ["--format", "docker", "--file", str(ROOT / "deploy" / "Containerfile"), "--build-arg", f"BASE={base}"]
    options += ["--secret", f"id=pip-ca,src={ca_bundle}", "--tag", ref, *extra]
    with tempfile.TemporaryDirectory(prefix="immich-ml-wheelhouse-") as folder:
        if wheelhouse:
            _fill_wheelhouse(Path(folder))
            options += ["--volume", f"{folder}:{_WHEELS_IN_BUILD}:ro"]
            options += ["--build-arg", f"PIP_FIND_LINKS={_WHEELS_IN_BUILD}", "--build-arg", "PIP_NO_INDEX=1"]
        podman("build", *options, str(ROOT), timeout_s=_BUILD_TIMEOUT_S)


def _fill_wheelhouse(wheelhouse: Path) -> None:
    """Wheels of the package's dependencies (at the versions constraints/ocr.txt pins, as the build asks) and of
    its build back-end, from the host's pip."""
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheelhouse)),
            *("--constraint", str(ROOT / "constraints" / "ocr.txt"), str(ROOT), *build_requires),
        ],
        check=True,
        capture_output=True,
        timeout=_BUILD_TIMEOUT_S,
    )
