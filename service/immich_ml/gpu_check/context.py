"""What the checks share: the command-line options and facts gathered once (NVML, the unit, settings)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

from immich_ml.errors import ConfigError
from immich_ml.gpu_check.envfile import parse_environment_file
from immich_ml.gpu_check.nvml import NvmlState, load_nvml
from immich_ml.gpu_check.systemd import CommandError, UnitState, show_unit
from immich_ml.settings import Settings

__all__ = ["Context", "Options"]

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"}


@dataclass(frozen=True)
class Options:
    """Command-line options the checks read."""

    url: str = "http://127.0.0.1:3003"
    model: str | None = None
    unit: str = "immich-ml.service"
    root: Path = Path("/")
    cuda_archs: tuple[tuple[int, int], ...] | None = None
    probe_seconds: float = 2.0
    timeout_s: float = 120.0

    def path(self, absolute: str) -> Path:
        """`absolute` (e.g. `/proc/modules`) under `--root`."""
        return self.root / absolute.lstrip("/")

    @property
    def url_is_local(self) -> bool:
        return (urlsplit(self.url).hostname or "") in _LOCAL_HOSTS


class Context:
    """Options plus lazily gathered facts; each fact is read at most once per run."""

    def __init__(self, options: Options) -> None:
        self.options = options

    @cached_property
    def nvml(self) -> NvmlState:
        return load_nvml()

    @cached_property
    def unit(self) -> UnitState | CommandError:
        """The service's unit, or why it could not be read."""
        try:
            return show_unit(self.options.unit)
        except CommandError as error:
            return error

    @cached_property
    def settings(self) -> Settings | ConfigError:
        """The service's settings: this environment overlaid with the unit's `Environment=`, then with its
        `EnvironmentFile=`s in order (systemd lets the files override `Environment=`), read under `--root`."""
        env = dict(os.environ)
        if isinstance(self.unit, UnitState):
            env.update(self.unit.environment)
            for file in self.unit.environment_files:
                try:
                    env.update(parse_environment_file(self.options.path(file.path).read_text()))
                except OSError as error:
                    if not file.optional:
                        return ConfigError(f"EnvironmentFile={file.path} of {self.unit.name}: {error.strerror}")
        try:
            return Settings.from_env(env)
        except ConfigError as error:
            return error

    def close(self) -> None:
        """Release NVML if it was loaded."""
        if "nvml" in self.__dict__:
            self.nvml.close()
