"""scripts/apt-install (what scripts/setup-venv, so ./scripts/test and ./scripts/serve, and .ci/run install
Debian packages with) waits for a package manager that holds the dpkg lock, as on a freshly booted machine
running unattended-upgrades, instead of failing; in a throwaway Debian container with a real lock holder."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.containers.podman import Podman

ROOT = Path(__file__).resolve().parents[2]
LOCK = "/var/lib/dpkg/lock-frontend"
HOLD_LOCK = (
    "import fcntl, sys\n"
    f"lock = open({LOCK!r}, 'w')\n"
    "fcntl.lockf(lock, fcntl.LOCK_EX)  # the fcntl lock apt and dpkg take\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()  # until the test closes our stdin\n"
)


def test_apt_install_waits_for_the_dpkg_lock_and_says_so(podman: Podman, systemd_image: str) -> None:
    machine = podman.run(systemd_image, "sleep", "infinity", network="host")  # network: Debian's mirror
    machine.copy_in(ROOT / "scripts" / "apt-install", "/usr/local/bin/apt-install")
    holder = subprocess.Popen(
        ["podman", "exec", "-i", machine.id, "python3", "-c", HOLD_LOCK],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=podman.env,
    )
    installer: subprocess.Popen[str] | None = None
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        refused = machine.fail("apt-get", "install", "-y", "-qq", "hello")  # what setup-venv ran before
        assert f"Could not get lock {LOCK}. It is held by process" in refused

        installer = subprocess.Popen(
            ["podman", "exec", machine.id, "apt-install", "hello"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=podman.env,
        )
        assert installer.stdout is not None
        said = []
        while not (line := installer.stdout.readline()).startswith("Waiting for cache lock"):
            assert line, f"apt-install ended without waiting for the lock: {''.join(said)}"
            said.append(line)
        assert "this waits for it" in "".join(said)
        assert f"Could not get lock {LOCK}. It is held by process" in line and "(python3)" in line
        assert installer.poll() is None  # still waiting, not failed

        holder.stdin.close()  # type: ignore[union-attr]  # the other package manager finishes
        assert holder.wait(60) == 0
        rest = installer.stdout.read()
        assert installer.wait(300) == 0, rest
        assert machine.succeed("dpkg-query", "--show", "--showformat=${Status}", "hello") == "install ok installed"
    finally:
        for process in (holder, installer):
            if process is None:
                continue
            if process.poll() is None:
                process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()
