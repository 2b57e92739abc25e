"""A fake host: a root tree (/proc, /dev, /run) and fake `systemctl`/`journalctl` executables for PATH."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

IMMICH_UNIT = "immich-ml.service"
CDI_UNIT = "nvidia-container-toolkit-cdi-generator.service"
ALL_MODULES = ("nvidia", "nvidia_modeset", "nvidia_uvm", "nvidia_drm")
NOT_FOUND = {"LoadState": "not-found", "ActiveState": "inactive", "SubState": "dead", "MainPID": "0", "NRestarts": "0"}


class FakeHost:
    """Builds the fake host under `tmp_path`; `install()` puts only its bin/ on PATH."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.bin = tmp_path / "bin"
        self.bin.mkdir(parents=True)
        self.root.mkdir()
        self.units: dict[str, dict[str, str | list[str]]] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """PATH holds only the fake tools; --root points the checks at the fake tree."""
        self._write_systemctl()
        monkeypatch.setenv("PATH", str(self.bin))

    def modules(self, *names: str) -> None:
        """Write /proc/modules as the kernel formats it."""
        lines = [f"{name} 1234567 0 - Live 0x0000000000000000" for name in names]
        self._write("proc/modules", "\n".join(lines) + "\n")

    def devices(self, *nodes: str) -> None:
        """Create device nodes (as plain files: the checks only test that they exist)."""
        for node in nodes:
            self._write(node.lstrip("/"), "")

    def process(self, pid: int, ppid: int, comm: str) -> None:
        """A process in /proc with its parent pid and command name."""
        self._write(f"proc/{pid}/stat", f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0 0\n")
        self._write(f"proc/{pid}/comm", comm + "\n")

    def cdi_spec(self, *devices: str) -> None:
        """A CDI spec as the NixOS generator writes it."""
        spec = {"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu", "devices": [{"name": d} for d in devices]}
        self._write("run/cdi/nvidia-container-toolkit.json", json.dumps(spec))

    def unit(self, name: str, **properties: str | list[str]) -> None:
        """What `systemctl show <name>` prints (a list: one line per item, as for `EnvironmentFiles`); units
        not set here print LoadState=not-found."""
        self.units[name] = properties

    def journal(self, *lines: str) -> None:
        """What `journalctl -u ... -o cat` prints."""
        self._script("journalctl", "printf '%s\\n' " + " ".join(shlex.quote(line) for line in lines))

    def _write_systemctl(self) -> None:
        cases = [f"  *{shlex.quote(name)}*) {_printf(props)} ;;" for name, props in self.units.items()]
        cases.append(f"  *) {_printf(NOT_FOUND)} ;;")
        self._script("systemctl", 'case "$*" in\n' + "\n".join(cases) + "\nesac")

    def _script(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def file(self, path: str, text: str) -> None:
        """A file in the fake root, e.g. `/etc/immich-ml/immich-ml.env`."""
        self._write(path.lstrip("/"), text)

    def _write(self, relative: str, text: str) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _printf(properties: dict[str, str] | dict[str, str | list[str]]) -> str:
    lines = [
        f"{key}={item}" for key, value in properties.items() for item in (value if isinstance(value, list) else [value])
    ]
    return "printf '%s\\n' " + " ".join(shlex.quote(line) for line in lines)
