"""What deploy/Containerfile promises about the image it builds, read from the file itself (its final stage), so
the chart, the compose override and the Nix image are checked against one source."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CONTAINERFILE", "ImageFacts", "image_facts"]

CONTAINERFILE = Path(__file__).resolve().parents[2] / "deploy" / "Containerfile"


@dataclass(frozen=True)
class ImageFacts:
    """The final stage's environment, user id, port, healthcheck (its command, and its timings under the image
    config's names: Interval, Timeout, StartPeriod in seconds, Retries), entrypoint and command."""

    env: dict[str, str]
    uid: int
    port: int
    healthcheck: list[str]
    healthcheck_timing: dict[str, int]
    entrypoint: list[str]
    cmd: list[str]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the last stage, continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]
    last_from = max(i for i, pair in enumerate(pairs) if pair[0].upper() == "FROM")
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs[last_from:]]


_HEALTHCHECK_OPTIONS = {
    "interval": "Interval",
    "timeout": "Timeout",
    "start-period": "StartPeriod",
    "retries": "Retries",
}


def _healthcheck_timing(options: str) -> dict[str, int]:
    """`--interval=30s --retries=3` → {"Interval": 30, "Retries": 3} (durations in whole seconds)."""
    pairs = (option.removeprefix("--").split("=", 1) for option in options.split())
    return {_HEALTHCHECK_OPTIONS[key]: int(value.removesuffix("s")) for key, value in pairs}


def image_facts(path: Path = CONTAINERFILE) -> ImageFacts:
    """Read `path`'s final stage."""
    steps = _instructions(path.read_text())
    env: dict[str, str] = {}
    for _, arguments in (step for step in steps if step[0] == "ENV"):
        env |= dict(item.split("=", 1) for item in shlex.split(arguments))
    [uid] = [
        int(m.group(1)) for kind, args in steps if kind == "RUN" and (m := re.search(r"useradd .*--uid (\d+)", args))
    ]
    [expose] = [args for kind, args in steps if kind == "EXPOSE"]
    [healthcheck] = [args for kind, args in steps if kind == "HEALTHCHECK"]
    [entrypoint] = [args for kind, args in steps if kind == "ENTRYPOINT"]
    [cmd] = [args for kind, args in steps if kind == "CMD"]
    return ImageFacts(
        env=env,
        uid=uid,
        port=int(expose.split("/")[0]),
        healthcheck=json.loads(healthcheck.split(" CMD ", 1)[1]),
        healthcheck_timing=_healthcheck_timing(healthcheck.split(" CMD ", 1)[0]),
        entrypoint=json.loads(entrypoint),
        cmd=json.loads(cmd),
    )
