"""systemd as PID 1 in a container, driven like a nixpkgs VM test: `boot`, `wait_for_unit`, `succeed`, `fail`.

Every wait polls a condition (the manager's bus, a unit's state) until a deadline; no
wait sleeps for a guessed time. Each poll is a `podman exec`, which paces the loop by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.containers.podman import CommandError, Container, Podman

__all__ = ["Machine"]

_BOOT_TIMEOUT_S = 120


def _poll(condition: Callable[[], bool], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s} s waiting for {what}")


@dataclass
class Machine:
    """A container booted with systemd as PID 1 (`podman run --systemd=always`)."""

    container: Container

    @classmethod
    def boot(cls, podman: Podman, image: str, **run_options: Any) -> Machine:
        """Start `image` with /sbin/init and wait until the manager has finished starting up."""
        machine = cls(podman.run(image, systemd=True, **run_options))
        machine.wait_for_boot()
        return machine

    def wait_for_boot(self, timeout_s: float = _BOOT_TIMEOUT_S) -> None:
        """Until `systemctl is-system-running` says running (or degraded: a unit of the image failed, which
        `failed_units` reports); before the manager's bus exists the command fails at once, so poll."""

        def booted() -> bool:
            state = self.container.exec("systemctl", "is-system-running", "--wait").stdout.strip()
            return state in ("running", "degraded")

        _poll(booted, "systemd to finish booting", timeout_s)

    def succeed(self, *argv: str, **kwargs: Any) -> str:
        """Run `argv` in the machine; it must exit 0. Its stdout."""
        return self.container.succeed(*argv, **kwargs)

    def fail(self, *argv: str, **kwargs: Any) -> str:
        """Run `argv` in the machine; it must fail. Its stdout and stderr."""
        return self.container.fail(*argv, **kwargs)

    def systemctl(self, *args: str) -> str:
        """`systemctl ARGS`, which must succeed; its stdout."""
        return self.succeed("systemctl", *args)

    def properties(self, unit: str, *names: str) -> dict[str, str]:
        """`systemctl show` values of `names` for `unit`."""
        text = self.succeed("systemctl", "show", unit, *(f"--property={name}" for name in names))
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def wait_for_unit(self, unit: str, timeout_s: float = _BOOT_TIMEOUT_S) -> None:
        """Until `unit` is active; a unit that fails meanwhile fails the wait with its journal."""

        def active() -> bool:
            state = self.properties(unit, "ActiveState")["ActiveState"]
            if state == "failed":
                raise CommandError(f"{unit} failed\n{self.journal(unit)}")
            return state == "active"

        _poll(active, f"{unit} to be active", timeout_s)

    def journal(self, unit: str | None = None) -> str:
        """The journal (of `unit` only, if given), message text only."""
        selector = ("--unit", unit) if unit else ()
        return self.succeed("journalctl", "--no-pager", "--output=cat", *selector)

    def failed_units(self) -> list[str]:
        text = self.systemctl("list-units", "--failed", "--plain", "--no-legend")
        return [line.split()[0] for line in text.splitlines() if line.strip()]
