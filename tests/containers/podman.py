"""One podman runner for every container test: this host's containers.conf, the containers a test started,
their logs when it fails, and their removal afterwards.

podman 4.3 here needs runc (crun fails on this kernel's hybrid cgroups), cgroupfs (no systemd on the host)
and explicit resource limits: podman's defaults for root (nproc and nofile 1048576) need
CAP_SYS_RESOURCE, which this sandbox lacks, so runc fails "error setting rlimit". nofile takes this
process's hard limit; nproc is 4096, the highest runc could set here (measured: 4097 fails although the
hard limit reads 96367). The configuration goes to a file of our own pointed at by `CONTAINERS_CONF`, so
nothing in /etc changes.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import pytest

__all__ = ["CONTAINERS_CONF", "REQUIRE_ENV", "Container", "CommandError", "Podman", "skip_or_fail", "unusable_reason"]

CONTAINERS_CONF = """\
# Written by tests/containers/podman.py for the container tests.
[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

REQUIRE_ENV = "IMMICH_ML_REQUIRE_CONTAINERS"
"""Set to 1 (CI does) to turn a skipped container test into a failure."""

_TIMEOUT_S = 600
_NPROC = 4096


def unusable_reason() -> str | None:
    """Why podman cannot run the container tests on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "the container tests run podman as root (rootless podman lacks the cgroup and uid set-up here)"
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install podman runc mmdebstrap uidmap; .ci/run does)"
    return None


def skip_or_fail(reason: str) -> NoReturn:
    """Skip a container test that cannot run here, or fail it where it must run (REQUIRE_ENV=1, CI)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"required ({REQUIRE_ENV}=1) but cannot run: {reason}")
    pytest.skip(reason)


class CommandError(AssertionError):
    """A command in or around a container failed; the message carries its output."""


def _checked(result: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    if result.returncode != 0:
        raise CommandError(
            f"{what} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
    return result


@dataclass
class Podman:
    """The podman CLI with this project's containers.conf; remembers what it started so `cleanup` removes it."""

    state_dir: Path
    started: list[Container] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.state_dir / "containers.conf"
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        self.conf.write_text(CONTAINERS_CONF.format(nofile=nofile, nproc=_NPROC))

    @property
    def env(self) -> dict[str, str]:
        """The environment for podman and buildah (CONTAINERS_CONF pointing at our file)."""
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def __call__(
        self, *args: str, check: bool = True, timeout_s: float = _TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run `podman ARGS`; with `check`, a non-zero exit raises CommandError with the output."""
        result = subprocess.run(
            ["podman", *args], capture_output=True, text=True, env=self.env, timeout=timeout_s, check=False
        )
        return _checked(result, f"podman {' '.join(args)}") if check else result

    def image_exists(self, ref: str) -> bool:
        return self("image", "exists", ref, check=False).returncode == 0

    def run(
        self,
        image: str,
        *command: str,
        name: str | None = None,
        systemd: bool = False,
        network: str | None = None,
        publish: Sequence[str] = (),
        volumes: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
    ) -> Container:
        """Start a detached container from `image`. `systemd` boots systemd as PID 1 (`command` then
        defaults to /sbin/init). `publish` takes podman's `-p` forms, `volumes` its `-v` forms."""
        args = ["run", "--detach"]
        if name is not None:
            args += ["--name", name]
        if systemd:
            args += ["--systemd=always"]
            command = command or ("/sbin/init",)
        if network is not None:
            args += ["--network", network]
        for port in publish:
            args += ["--publish", port]
        for volume in volumes:
            args += ["--volume", volume]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        container_id = self(*args, *options, image, *command).stdout.strip()
        container = Container(self, container_id, systemd=systemd)
        self.started.append(container)
        return container

    @contextmanager
    def building(self, below: str, ref: str, *, volumes: Sequence[str] = ()) -> Iterator[Container]:
        """A throwaway container from `below` on the host's network (package indexes); when the block
        ends without an error, its file system becomes image `ref`. The container is removed either way."""
        builder = self.run(below, "sleep", "infinity", network="host", volumes=volumes)
        try:
            yield builder
            builder.commit(ref)
        finally:
            self("rm", "--force", "--time", "0", builder.id, check=False)
            self.started.remove(builder)

    def cleanup(self, *, dump_logs: bool) -> None:
        """Remove every container this runner started; print their logs first when `dump_logs` (a test failed)."""
        for container in reversed(self.started):
            if dump_logs:
                print(f"===== logs of container {container.name}\n{container.logs()}")
                if container.systemd:
                    print(f"===== its journal\n{container.exec('journalctl', '--no-pager', '--lines=300').stdout}")
            self("rm", "--force", "--time", "0", container.id, check=False)
        self.started.clear()


@dataclass
class Container:
    """A running container; `succeed`/`fail` read like nixpkgs' VM tests."""

    podman: Podman
    id: str
    systemd: bool = False

    @property
    def name(self) -> str:
        return str(self.inspect()["Name"])

    def exec(
        self, *argv: str, user: str | None = None, env: Mapping[str, str] | None = None, timeout_s: float = _TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the container (no shell); the completed process, whatever its exit status."""
        args = ["exec"]
        if user is not None:
            args += ["--user", user]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        return self.podman(*args, self.id, *argv, check=False, timeout_s=timeout_s)

    def succeed(self, *argv: str, **kwargs: Any) -> str:
        """Run `argv`, which must exit 0; its stdout."""
        return _checked(self.exec(*argv, **kwargs), " ".join(argv)).stdout

    def fail(self, *argv: str, **kwargs: Any) -> str:
        """Run `argv`, which must exit non-zero; its stdout and stderr."""
        result = self.exec(*argv, **kwargs)
        if result.returncode == 0:
            raise CommandError(f"{' '.join(argv)} succeeded but should have failed\n{result.stdout}{result.stderr}")
        return result.stdout + result.stderr

    def copy_in(self, source: Path, destination: str) -> None:
        """Copy a host file, or a folder's contents, to `destination` in the container (`podman cp`)."""
        self.podman("cp", f"{source}/." if source.is_dir() else str(source), f"{self.id}:{destination}")

    def write(self, path: str, text: str, *, scratch: Path) -> None:
        """Put `text` at `path` in the container (its folder created), staged in the host folder `scratch`."""
        staged = scratch / path.lstrip("/").replace("/", "__")
        staged.write_text(text)
        self.succeed("mkdir", "-p", str(PurePosixPath(path).parent))
        self.copy_in(staged, path)

    def inspect(self) -> dict[str, Any]:
        return json.loads(self.podman("inspect", self.id).stdout)[0]  # type: ignore[no-any-return]

    def host_port(self, container_port: int) -> int:
        """The host port published for `container_port`/tcp."""
        bindings = self.inspect()["NetworkSettings"]["Ports"][f"{container_port}/tcp"]
        return int(bindings[0]["HostPort"])

    def logs(self) -> str:
        result = self.podman("logs", self.id, check=False)
        return result.stdout + result.stderr

    def stop(self, *, timeout_s: int = 10) -> int:
        """`podman stop`, then the container's exit code."""
        self.podman("stop", "--time", str(timeout_s), self.id, timeout_s=timeout_s + 60)
        return int(self.inspect()["State"]["ExitCode"])

    def commit(self, ref: str) -> None:
        """Save the container's file system as image `ref`."""
        self.podman("commit", "--quiet", self.id, ref)
