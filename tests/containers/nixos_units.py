"""The NixOS module's units, from its evaluation, rendered as NixOS writes unit files, for a Debian systemd.

`nix/tests/eval.nix --argstr output units` evaluates the module for a representative host and gives
`systemd.services`, `systemd.sockets`, `users` and `systemd.tmpfiles.rules` as JSON. The rendering rule is
NixOS' own (nixpkgs `nixos/lib/systemd-lib.nix` and `systemd-unit-options.nix`, read for the rule, no code
taken):

- `serviceConfig` goes to `[Service]` key by key in name order (`attrsToSection`): a list becomes one line
  per element (an empty list: no line at all), `true`/`false` become `true`/`false`, numbers their decimal.
- `environment` becomes `Environment="NAME=value"` lines (the pair JSON-quoted), in name order, before them.
- `description`, `after`, `wants`, `requires` become `[Unit]` `Description=`, and `After=` etc. with the
  list joined by spaces. `wantedBy` is a symlink in `TARGET.wants/`, not an `[Install]` section.
- `stopIfChanged = false` becomes `X-StopIfChanged=false` in `[Service]` (read by switch-to-configuration only).
- A socket's `listenStreams` become `ListenStream=` lines in `[Socket]`, before its `socketConfig`.
- What NixOS adds outside the module (`Environment=PATH=` from `path`, `LOCALE_ARCHIVE`, `TZDIR`) is not
  rendered: Debian's manager gives its own PATH.

Store paths follow ONE rule: the package's `/nix/store/HASH-immich-ml-VERSION` is `/opt/immich-ml`, the
virtual environment a non-NixOS install uses (both hold `bin/immich-ml`). Any other store path is an error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.containers.daemon_image import PREFIX

__all__ = [
    "STORE_PACKAGE",
    "LibraryMissing",
    "evaluate",
    "map_store_paths",
    "render_service",
    "render_socket",
    "render_sysusers",
]

ROOT = Path(__file__).resolve().parents[2]
STORE_PACKAGE = re.compile(r"/nix/store/[0-9a-z]{32}-immich-ml(?:-cuda)?-[0-9][^/\s]*")
"""The package's store path, which becomes PREFIX."""
_UNIT_LISTS = {"after": "After", "wants": "Wants", "requires": "Requires"}


class LibraryMissing(LookupError):
    """No nixpkgs library (real or the repository's stand-in) to evaluate the module with."""


def nix_library() -> Path:
    """The lib to evaluate with: `$NIXPKGS_LIB` (nixpkgs' own, a checkout or its lib/), else nix/stand-in."""
    given = os.environ.get("NIXPKGS_LIB")
    candidates = [Path(given) / "lib", Path(given)] if given else [ROOT / "nix" / "stand-in"]
    for candidate in candidates:
        if (candidate / "default.nix").is_file():
            return candidate
    raise LibraryMissing(f"no nixpkgs lib: tried {', '.join(map(str, candidates))}")


def evaluate() -> dict[str, Any]:
    """The module's units, users and tmpfiles rules for eval.nix's representative host."""
    result = subprocess.run(
        [
            "nix-instantiate",
            "--store",
            "dummy://",
            "--eval",
            "--strict",
            "--json",
            str(ROOT / "nix" / "tests" / "eval.nix"),
            "--arg",
            "lib",
            f"import {nix_library()}",
            "--argstr",
            "output",
            "units",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NIX_PATH": ""},
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"evaluating nix/tests/eval.nix failed:\n{result.stderr}")
    units: dict[str, Any] = json.loads(result.stdout)
    if units["tmpfiles"]:
        raise NotImplementedError("the module now has tmpfiles rules: render them here too")
    return units


def map_store_paths(text: str) -> str:
    """`text` with the package's store path replaced by PREFIX; any other store path is an error."""
    mapped = STORE_PACKAGE.sub(PREFIX, text)
    if "/nix/store/" in mapped:
        raise ValueError(f"a store path with no counterpart outside Nix: {text}")
    return mapped


def _value(value: object) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    return map_store_paths(str(value))


def _section(attrs: Mapping[str, Any]) -> str:
    lines = []
    for name in sorted(attrs):
        value = attrs[name]
        lines += [f"{name}={_value(item)}" for item in (value if isinstance(value, list) else [value])]
    return "".join(line + "\n" for line in lines)


def render_service(service: Mapping[str, Any]) -> str:
    """A `systemd.services.<name>` evaluation as the unit file NixOS would write."""
    unit: dict[str, Any] = {key: " ".join(service[option]) for option, key in _UNIT_LISTS.items() if service[option]}
    if service["description"]:
        unit["Description"] = service["description"]
    environment = "".join(
        f"Environment={json.dumps(f'{name}={_value(value)}')}\n"
        for name, value in sorted(service["environment"].items())
    )
    switch = "" if service["stopIfChanged"] else "X-StopIfChanged=false\n"
    return f"[Unit]\n{_section(unit)}\n[Service]\n{environment}{_section(service['serviceConfig'])}{switch}"


def render_socket(socket: Mapping[str, Any]) -> str:
    """A `systemd.sockets.<name>` evaluation as the unit file NixOS would write."""
    unit = {"Description": socket["description"]} if socket["description"] else {}
    listen = "".join(f"ListenStream={stream}\n" for stream in socket["listenStreams"])
    return f"[Unit]\n{_section(unit)}\n[Socket]\n{listen}{_section(socket['socketConfig'])}"


def render_sysusers(users: Mapping[str, Any]) -> str:
    """`users.users`/`users.groups` (system users) as a systemd-sysusers file: what NixOS' user creation does."""
    lines = [f"g {name} -" for name in sorted(users["groups"])]
    for name, user in sorted(users["users"].items()):
        if not user.get("isSystemUser"):
            raise ValueError(f"users.users.{name} is not a system user: only those are rendered")
        lines.append(f"u {name} -:{user['group']} - -")
    return "".join(line + "\n" for line in lines)
