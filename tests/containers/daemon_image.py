"""An image with immich-ml installed the way docs/operations.md tells a non-NixOS user to: a virtual
environment under /opt/immich-ml holding the checkout's wheel (ProtectHome hides /root and /home from the
unit, so nothing may run from there), with the GUI OpenCV swapped for the headless one as the README says.

pip runs inside the container with the host's CA bundle bind-mounted for that step only (never part of the
image) and the host's pip cache mounted, so a second build downloads nothing. The image is tagged by a hash
of the image below and of the package's sources (pyproject.toml, service/), so one CI run builds it once.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.containers.base import REPOSITORY, input_tag, lock
from tests.containers.podman import Podman

__all__ = ["PREFIX", "PROGRAM", "daemon_image"]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/opt/immich-ml"
PROGRAM = f"{PREFIX}/bin/immich-ml"
_PIP = f"{PREFIX}/bin/pip"
_CA_IN_CONTAINER = "/run/host-ca-certificates.crt"
_PIP_CACHE_IN_CONTAINER = "/run/host-pip-cache"
_WHEELS_IN_CONTAINER = "/run/wheels"
_PIP_ENV = {
    "PIP_CERT": _CA_IN_CONTAINER,
    "PIP_CACHE_DIR": _PIP_CACHE_IN_CONTAINER,
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_DEFAULT_TIMEOUT": "180",
}


def _sources_digest() -> str:
    """A hash of everything the wheel is built from."""
    digest = hashlib.sha256()
    files = [ROOT / "pyproject.toml", ROOT / "README.md", *sorted((ROOT / "service").rglob("*"))]
    for path in files:
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _host_ca_bundle() -> str:
    """The CA bundle pip uses on this host: $PIP_CERT, else OpenSSL's default file ($SSL_CERT_FILE honoured)."""
    bundle = os.environ.get("PIP_CERT") or ssl.get_default_verify_paths().cafile
    if not bundle:
        raise FileNotFoundError("no CA bundle for pip in the container: set PIP_CERT or SSL_CERT_FILE")
    return bundle


def _host_pip_cache() -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, check=False, timeout=60
    )
    cache = Path(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else None
    if cache is None:  # pip cache disabled: a cache of our own, kept for the next build
        cache = Path(tempfile.gettempdir()) / "immich-ml-test-pip-cache"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _build_wheel(into: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(into),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = into.glob("immich_ml-*.whl")
    return wheel


def daemon_image(podman: Podman, below: str) -> str:
    """`below` (which must have python3-venv) with immich-ml in a venv at /opt/immich-ml; built if missing."""
    ref = f"{REPOSITORY}/immich-ml:{input_tag([below, _sources_digest()])}"
    with lock():
        if podman.image_exists(ref):
            return ref
        with tempfile.TemporaryDirectory(prefix="immich-ml-wheel-") as scratch:
            wheel = _build_wheel(Path(scratch))
            volumes = [
                f"{scratch}:{_WHEELS_IN_CONTAINER}:ro",
                f"{_host_ca_bundle()}:{_CA_IN_CONTAINER}:ro",
                f"{_host_pip_cache()}:{_PIP_CACHE_IN_CONTAINER}",
            ]
            with podman.building(below, ref, volumes=volumes) as builder:
                builder.succeed("python3", "-m", "venv", PREFIX)
                builder.succeed(_PIP, "install", "--quiet", f"{_WHEELS_IN_CONTAINER}/{wheel.name}", env=_PIP_ENV)
                # rapidocr pulls in the GUI OpenCV over the headless one: keep the headless files (README).
                shown = builder.succeed(_PIP, "show", "opencv-python-headless", env=_PIP_ENV)
                version = next(line.split()[1] for line in shown.splitlines() if line.startswith("Version: "))
                builder.succeed(_PIP, "uninstall", "--quiet", "--yes", "opencv-python", env=_PIP_ENV)
                headless = f"opencv-python-headless=={version}"
                builder.succeed(_PIP, "install", "--quiet", "--force-reinstall", "--no-deps", headless, env=_PIP_ENV)
    return ref
