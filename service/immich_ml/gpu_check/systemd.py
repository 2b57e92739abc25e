"""systemd through its command-line tools (`systemctl show`, `journalctl`), so tests can put fakes on PATH."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field

__all__ = ["CommandError", "EnvironmentFile", "UnitState", "journal_since_start", "show_unit"]

_TIMEOUT_S = 15


class CommandError(RuntimeError):
    """A systemd tool is missing or failed; the message says which and why."""


@dataclass(frozen=True)
class EnvironmentFile:
    """One `EnvironmentFile=` of a unit; `optional` for the `-` prefix (a missing file is no error)."""

    path: str
    optional: bool


@dataclass(frozen=True)
class UnitState:
    """The properties of a unit that the checks use."""

    name: str
    load_state: str
    active_state: str
    sub_state: str
    main_pid: int
    restarts: int
    result: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    environment_files: list[EnvironmentFile] = field(default_factory=list)

    @property
    def installed(self) -> bool:
        return self.load_state not in ("not-found", "")

    @property
    def running(self) -> bool:
        return self.active_state == "active" and self.sub_state == "running"


def show_unit(unit: str) -> UnitState:
    """`systemctl show` the unit; raise CommandError when systemctl is missing or fails."""
    output = _run(
        [
            "systemctl",
            "show",
            unit,
            "--no-pager",
            "-p",
            "LoadState,ActiveState,SubState,MainPID,NRestarts,Result,Environment,EnvironmentFiles",
        ]
    )
    pairs = [line.split("=", 1) for line in output.splitlines() if "=" in line]
    props = dict(pairs)
    return UnitState(
        name=unit,
        load_state=props.get("LoadState", ""),
        active_state=props.get("ActiveState", ""),
        sub_state=props.get("SubState", ""),
        main_pid=_int(props.get("MainPID", "0")),
        restarts=_int(props.get("NRestarts", "0")),
        result=props.get("Result", ""),
        environment=_parse_environment(props.get("Environment", "")),
        environment_files=[_parse_environment_file(value) for key, value in pairs if key == "EnvironmentFiles"],
    )


def journal_since_start(unit: str) -> list[str]:
    """This boot's journal lines of the unit after its last start (systemd's own `Starting`/`Started` line)."""
    output = _run(["journalctl", "-u", unit, "-b", "--no-pager", "-o", "cat"])
    lines = [line for line in output.splitlines() if not line.startswith("-- ")]
    starts = [i for i, line in enumerate(lines) if line.startswith(("Starting ", "Started "))]
    return lines[starts[-1] + 1 :] if starts else lines


def _run(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        raise CommandError(f"{argv[0]} not found (not a systemd host?)")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CommandError(f"{shlex.join(argv)}: {error}") from None
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise CommandError(f"{argv[0]} failed: {reason}")
    return done.stdout


def _parse_environment(text: str) -> dict[str, str]:
    """`Environment=` as `systemctl show` prints it: space-separated, shell-quoted `KEY=value` words."""
    try:
        words = shlex.split(text)
    except ValueError:
        return {}
    return dict(word.split("=", 1) for word in words if "=" in word)


def _parse_environment_file(text: str) -> EnvironmentFile:
    """One `EnvironmentFiles=` line as `systemctl show` prints it: `/path (ignore_errors=yes)`."""
    path, _, flags = text.partition(" (ignore_errors=")
    return EnvironmentFile(path=path.strip(), optional=flags.startswith("yes"))


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0
