"""Settings from `IMMICH_*`, `MACHINE_LEARNING_*` and command-line flags; a bad value names its variable."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from immich_ml.cpus import CpuBudget, usable_cpus
from immich_ml.errors import ConfigError
from immich_ml.models.tasks import TASK_TYPES, ModelType, Task

__all__ = ["Preprocessing", "Provider", "Settings", "parse_size", "variable_names"]

T = TypeVar("T")

_PREFIX = "MACHINE_LEARNING_"


class Provider(StrEnum):
    """Which ONNX Runtime execution provider to ask for."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


class Preprocessing(StrEnum):
    """Which upstream pre-processing to reproduce where released and newest upstream differ."""

    RELEASED = "released"
    LATEST = "latest"


_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse `123`, `100MiB`, `4GiB`, `2G` into bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use bytes or a suffix such as 512MiB or 4GiB)")
    unit = match.group(2).lower()
    if unit.endswith("b") and not unit.endswith("ib"):
        unit = unit[:-1]
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _parse_names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(
        _ipv4_if_mapped(ipaddress.ip_network(part.strip(), strict=False)) for part in text.split(",") if part.strip()
    )


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _ipv4_if_mapped(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """`::ffff:192.0.2.0/120` as `192.0.2.0/24`: peers are compared in IPv4 form (see http.security)."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


_LOG_LEVELS = {
    "verbose": "DEBUG",
    "debug": "DEBUG",
    "log": "INFO",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "critical": "CRITICAL",
    "fatal": "CRITICAL",
}


def _parse_log_level(text: str) -> str:
    try:
        return _LOG_LEVELS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {text!r} (one of {', '.join(_LOG_LEVELS)})") from None


def _default_cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "immich_ml"


@dataclass(frozen=True)
class Settings:
    """Everything the daemon can be told; defaults are upstream's except `host` (loopback)."""

    host: str = "127.0.0.1"
    port: int = 3003
    log_level: str = "INFO"
    no_color: bool = False
    cache_folder: Path = field(default_factory=_default_cache_folder)
    model_ttl_s: float = 300
    model_ttl_poll_s: float = 10
    request_threads: int = 0
    """0: the usable CPUs (`inference.sizing.request_threads`)."""
    inter_op_threads: int = 0
    intra_op_threads: int = 0
    model_arena: bool = True
    shared_arena: bool = True
    preload: Mapping[tuple[Task, ModelType], tuple[str, ...]] = field(default_factory=dict)
    workers: int = 1
    device_ids: tuple[int, ...] = (0,)
    device_id: int = 0
    keepalive_s: float = 10
    header_timeout_s: float = 10
    body_timeout_s: float = 60
    max_connections: int = 0
    max_batch_face_recognition: int = 4
    max_batch_ocr: int = 6
    max_batch_clip: int = 16
    max_batch_face_detection: int = 4
    batch_delay_ms: float = 2.0
    batch_gather_ms: float = 30.0
    queue_size: int = 256
    admission_wait_s: float = 5
    batching: bool = True
    bulk_niceness: int = 10
    thread_spinning: bool = False
    concurrent_batches: int = 0
    cpus: CpuBudget = field(default_factory=usable_cpus)
    """The CPUs this process may use (affinity and cgroup quota): every default thread count follows it."""
    trim_memory: bool = True
    provider: Provider = Provider.AUTO
    provider_strict: bool = False
    gpu_mem_limit: int | None = None
    cuda_arena_strategy: str = "kSameAsRequested"
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    tensorrt_cache_path: Path | None = None
    tensorrt_fp16: bool = True
    tensorrt_workspace: int = 2 * 1024**3
    preprocessing: Preprocessing = Preprocessing.RELEASED
    jpeg_draft: bool = False
    hf_organization: str = "immich-app"
    hf_revision: str = "main"
    ocr_model_base_url: str | None = None
    hf_endpoint: str | None = None
    hf_offline: bool = False
    max_body_size: int = 128 * 1024**2
    max_image_pixels: int = 100_000_000
    max_pixels_in_flight: int = 200_000_000
    max_ocr_resolution: int = 4096
    allowed_clients: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    ping_requires_ready: bool = False
    shutdown_timeout_s: float = 30
    watchdog_inference_timeout_s: float = 300

    def __post_init__(self) -> None:
        """Plain values become the fields' types, so `Settings(provider="cpu").provider is Provider.CPU`
        (an `is` comparison can never silently take the other branch), and `preload` keys become
        (Task, ModelType); a value that does not convert raises `ConfigError`."""
        for name, kind in _CONVERTED_FIELDS.items():
            value = getattr(self, name)
            if value is None or isinstance(value, kind):
                continue
            try:
                object.__setattr__(self, name, kind(value))
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{name}={value!r}: {error}") from None
        try:
            preload = {(Task(task), ModelType(kind)): tuple(names) for (task, kind), names in self.preload.items()}
        except ValueError as error:
            raise ConfigError(f"preload={dict(self.preload)!r}: {error}") from None
        if wrong := [f"{task}/{kind}" for task, kind in preload if kind not in TASK_TYPES[task]]:
            raise ConfigError(f"preload: no model type {', '.join(wrong)}")
        object.__setattr__(self, "preload", preload)

    def max_batch_size(self, task: Task, model_type: ModelType) -> int:
        """The configured inputs per session run for one model type (MACHINE_LEARNING_MAX_BATCH_SIZE__*)."""
        if task is Task.CLIP:
            return self.max_batch_clip
        if task is Task.OCR:
            return self.max_batch_ocr
        if model_type is ModelType.DETECTION:
            return self.max_batch_face_detection
        return self.max_batch_face_recognition

    def with_overrides(self, **changes: object) -> Settings:
        """A copy with some fields changed (command-line flags win over the environment)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read settings from the environment; raise `ConfigError` naming the first bad variable."""
        return cls._from_reader(_EnvReader(os.environ if env is None else env))

    @classmethod
    def _from_reader(cls, reader: _EnvReader) -> Settings:
        values: dict[str, object] = {}

        def put(attr: str, var: str, parse: Callable[[str], object]) -> None:
            if (value := reader.get(var, parse)) is not None:
                values[attr] = value

        put("host", "IMMICH_HOST", str.strip)
        put("port", "IMMICH_PORT", _port)
        put("log_level", "IMMICH_LOG_LEVEL", _parse_log_level)
        put("no_color", "NO_COLOR", lambda text: text != "" and text.lower() not in {"0", "false"})
        put("cache_folder", _PREFIX + "CACHE_FOLDER", Path)
        put("model_ttl_s", _PREFIX + "MODEL_TTL", float)
        put("model_ttl_poll_s", _PREFIX + "MODEL_TTL_POLL_S", float)
        put("request_threads", _PREFIX + "REQUEST_THREADS", _non_negative)
        put("inter_op_threads", _PREFIX + "MODEL_INTER_OP_THREADS", _non_negative)
        put("intra_op_threads", _PREFIX + "MODEL_INTRA_OP_THREADS", _non_negative)
        put("model_arena", _PREFIX + "MODEL_ARENA", _parse_bool)
        put("shared_arena", _PREFIX + "MODEL_SHARED_ARENA", _parse_bool)
        put("workers", _PREFIX + "WORKERS", _positive)
        put("device_ids", _PREFIX + "DEVICE_IDS", _parse_ints)
        put("device_id", _PREFIX + "DEVICE_ID", _non_negative)
        put("keepalive_s", _PREFIX + "HTTP_KEEPALIVE_TIMEOUT_S", float)
        put("header_timeout_s", _PREFIX + "HEADER_TIMEOUT_S", _positive_float)
        put("body_timeout_s", _PREFIX + "BODY_TIMEOUT_S", _positive_float)
        put("max_connections", _PREFIX + "MAX_CONNECTIONS", _non_negative)
        put("max_batch_face_recognition", _PREFIX + "MAX_BATCH_SIZE__FACIAL_RECOGNITION", _positive)
        put("max_batch_ocr", _PREFIX + "MAX_BATCH_SIZE__TEXT_RECOGNITION", _positive)
        put("max_batch_ocr", _PREFIX + "MAX_BATCH_SIZE__OCR", _positive)
        put("max_batch_clip", _PREFIX + "MAX_BATCH_SIZE__CLIP", _positive)
        put("max_batch_face_detection", _PREFIX + "MAX_BATCH_SIZE__FACE_DETECTION", _positive)
        put("batch_delay_ms", _PREFIX + "BATCH_DELAY_MS", float)
        put("batch_gather_ms", _PREFIX + "BATCH_GATHER_MS", _non_negative_float)
        put("queue_size", _PREFIX + "QUEUE_SIZE", _positive)
        put("admission_wait_s", _PREFIX + "ADMISSION_WAIT_S", _non_negative_float)
        put("batching", _PREFIX + "BATCHING", _parse_bool)
        put("bulk_niceness", _PREFIX + "BULK_NICENESS", _niceness)
        put("thread_spinning", _PREFIX + "MODEL_THREAD_SPINNING", _parse_bool)
        put("concurrent_batches", _PREFIX + "CONCURRENT_BATCHES", _non_negative)
        put("trim_memory", _PREFIX + "TRIM_MEMORY", _parse_bool)
        put("provider", "ONNXRUNTIME_PROVIDER", Provider)
        put("provider", _PREFIX + "PROVIDER", Provider)
        put("provider_strict", _PREFIX + "PROVIDER_STRICT", _parse_bool)
        put("gpu_mem_limit", _PREFIX + "GPU_MEM_LIMIT", parse_size)
        put("cuda_arena_strategy", _PREFIX + "CUDA_ARENA_STRATEGY", _one_of("kNextPowerOfTwo", "kSameAsRequested"))
        put("cudnn_conv_algo_search", _PREFIX + "CUDNN_CONV_ALGO_SEARCH", _one_of("EXHAUSTIVE", "HEURISTIC", "DEFAULT"))
        put("tensorrt_cache_path", "TENSORRT_CACHE_PATH", Path)
        put("tensorrt_cache_path", _PREFIX + "TENSORRT_CACHE_PATH", Path)
        put("tensorrt_fp16", _PREFIX + "TENSORRT_FP16", _parse_bool)
        put("tensorrt_workspace", _PREFIX + "TENSORRT_WORKSPACE_SIZE", parse_size)
        put("preprocessing", _PREFIX + "PREPROCESSING", Preprocessing)
        put("jpeg_draft", _PREFIX + "JPEG_DRAFT", _parse_bool)
        put("hf_organization", _PREFIX + "MODEL_ORGANIZATION", str.strip)
        put("hf_revision", _PREFIX + "MODEL_REVISION", str.strip)
        put("ocr_model_base_url", _PREFIX + "OCR_MODEL_BASE_URL", str.strip)
        put("hf_endpoint", "HF_ENDPOINT", lambda text: text.strip().rstrip("/"))
        put("hf_offline", "HF_HUB_OFFLINE", _parse_bool)
        put("max_body_size", _PREFIX + "MAX_BODY_SIZE", parse_size)
        put("max_image_pixels", _PREFIX + "MAX_IMAGE_PIXELS", _positive)
        put("max_pixels_in_flight", _PREFIX + "MAX_PIXELS_IN_FLIGHT", _positive)
        put("max_ocr_resolution", _PREFIX + "MAX_OCR_RESOLUTION", _positive)
        put("allowed_clients", _PREFIX + "ALLOWED_CLIENTS", _parse_networks)
        put("tls_cert", _PREFIX + "TLS_CERT", Path)
        put("tls_key", _PREFIX + "TLS_KEY", Path)
        put("ping_requires_ready", _PREFIX + "PING_REQUIRES_READY", _parse_bool)
        put("shutdown_timeout_s", _PREFIX + "SHUTDOWN_TIMEOUT_S", float)
        put("watchdog_inference_timeout_s", _PREFIX + "WATCHDOG_INFERENCE_TIMEOUT_S", float)

        preload: dict[tuple[Task, ModelType], tuple[str, ...]] = {}
        for task, model_type in _PRELOADABLE:
            var = f"{_PREFIX}PRELOAD__{task.name}__{model_type.name}"
            if names := reader.get(var, _parse_names):
                preload[(task, model_type)] = names
        values["preload"] = preload
        if "device_id" not in values and "device_ids" in values:
            values["device_id"] = values["device_ids"][0]  # type: ignore[index]
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        """Reject combinations no single variable can catch."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(f"{_PREFIX}TLS_CERT and {_PREFIX}TLS_KEY must be set together")
        if self.hf_revision != "main":
            raise ConfigError(
                f"{_PREFIX}MODEL_REVISION={self.hf_revision!r}: only 'main' (the fp32 exports "
                "Immich releases use) is supported"
            )
        if not self.device_ids:
            raise ConfigError(f"{_PREFIX}DEVICE_IDS: needs at least one device id")
        if self.max_pixels_in_flight < self.max_image_pixels:
            raise ConfigError(
                f"{_PREFIX}MAX_PIXELS_IN_FLIGHT ({self.max_pixels_in_flight}) must be at least "
                f"{_PREFIX}MAX_IMAGE_PIXELS ({self.max_image_pixels}), or the largest allowed image never fits"
            )

    @property
    def uses_gpu(self) -> bool:
        """Whether a GPU provider was asked for (auto counts: it tries CUDA)."""
        return self.provider is not Provider.CPU

    @property
    def tensorrt_cache(self) -> Path:
        """Where TensorRT engines and timing caches live."""
        return self.tensorrt_cache_path or self.cache_folder / "tensorrt"


_CONVERTED_FIELDS: dict[str, type[Any]] = {
    "provider": Provider,
    "preprocessing": Preprocessing,
    "cache_folder": Path,
    "tensorrt_cache_path": Path,
    "tls_cert": Path,
    "tls_key": Path,
}
"""Fields that `Settings.__post_init__` converts from plain values (strings) to their types."""


def variable_names() -> list[str]:
    """Every environment variable `Settings.from_env` reads, in reading order (the docs are checked against it)."""
    reader = _EnvReader({})
    Settings._from_reader(reader)
    return list(dict.fromkeys(reader.asked))


_PRELOADABLE = [(task, model_type) for task, types in TASK_TYPES.items() for model_type in types]


class _EnvReader:
    """Looks variables up case-insensitively, as upstream's pydantic settings do."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = {key.upper(): value for key, value in env.items()}
        self.asked: list[str] = []

    def get(self, name: str, parse: Callable[[str], T]) -> T | None:
        self.asked.append(name)
        raw = self._env.get(name.upper())
        if raw is None or (raw.strip() == "" and name != "NO_COLOR"):
            return None
        try:
            return parse(raw)
        except ValueError as error:
            raise ConfigError(f"{name}={raw!r}: {error}") from None


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError("not a TCP port (1-65535)")
    return port


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be more than 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be 0 or more")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _niceness(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 19:
        raise ValueError("must be 0 (off) to 19")
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return text

    return parse
