"""The Debian images every container test starts from, each built once and reused while its inputs stay the same.

No registry is reachable here, so the base is a Debian rootfs made by `mmdebstrap --variant=minbase` and
turned into an image by `podman import`. Extra Debian packages come as layers on top of it (`layer`), e.g.
systemd for the units' tests. Every image is tagged by a hash of what it is made from (suite, mirror,
packages, the image below it), so a CI run builds each once and every test and issue after that reuses it;
locally it stays until `podman rmi`. A lock file serialises builds between test processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.containers.podman import Podman

__all__ = ["DEBIAN_MIRROR", "DEBIAN_SUITE", "REPOSITORY", "base_image", "input_tag", "layer", "lock"]

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
REPOSITORY = "localhost/immich-ml-test"
"""Where the test images live in podman's store; `podman images localhost/immich-ml-test/*` lists them."""

_LOCK = Path(tempfile.gettempdir()) / "immich-ml-test-images.lock"
_BUILD_TIMEOUT_S = 900


def input_tag(inputs: object) -> str:
    """The image tag for a build made from `inputs` (anything JSON can write): a short hash of them."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def lock() -> Iterator[None]:
    """Held while an image is built, so two test processes never build the same one at once."""
    with _LOCK.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_image(podman: Podman) -> str:
    """The minimal Debian image (`mmdebstrap --variant=minbase`), built if this store lacks it."""
    ref = f"{REPOSITORY}/debian:{input_tag(['mmdebstrap', 'minbase', DEBIAN_SUITE, DEBIAN_MIRROR])}"
    with lock():
        if not podman.image_exists(ref):
            with tempfile.TemporaryDirectory(prefix="immich-ml-rootfs-") as scratch:
                rootfs = Path(scratch) / "root.tar"
                subprocess.run(
                    ["mmdebstrap", "--quiet", "--variant=minbase", DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR],
                    check=True,
                    capture_output=True,
                    timeout=_BUILD_TIMEOUT_S,
                )
                podman("import", "--quiet", "--change", "CMD=/bin/bash", str(rootfs), ref)
    return ref


def layer(podman: Podman, below: str, name: str, packages: Sequence[str]) -> str:
    """`below` with Debian `packages` installed (apt, no recommends, lists removed), built if missing.
    `name` only names the image (`localhost/immich-ml-test/NAME:hash`); the hash covers `below` and `packages`."""
    ref = f"{REPOSITORY}/{name}:{input_tag([below, sorted(packages)])}"
    with lock():
        if not podman.image_exists(ref):
            with podman.building(below, ref) as builder:
                builder.succeed("apt-get", "update", "-qq")
                builder.succeed(
                    "apt-get",
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    *packages,
                    env={"DEBIAN_FRONTEND": "noninteractive"},
                )
                builder.succeed("apt-get", "clean")
                builder.succeed("find", "/var/lib/apt/lists", "-type", "f", "-delete")
    return ref
