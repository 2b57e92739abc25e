"""Configuration from the environment: upstream's variables and defaults, and errors that name the variable."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest

from immich_ml.errors import ConfigError
from immich_ml.models.tasks import ModelType, Task
from immich_ml.settings import Preprocessing, Provider, Settings, parse_size


def test_defaults_are_upstreams_except_the_bind_address() -> None:
    settings = Settings.from_env({"HOME": "/home/u"})
    assert (settings.host, settings.port) == ("127.0.0.1", 3003)
    assert (settings.model_ttl_s, settings.model_ttl_poll_s) == (300, 10)
    assert settings.model_arena is True
    assert settings.provider is Provider.AUTO
    assert settings.preprocessing is Preprocessing.RELEASED
    assert settings.max_body_size >= 100 * 1024**2
    assert settings.keepalive_s >= 5


def test_upstream_variables_are_read() -> None:
    settings = Settings.from_env(
        {
            "IMMICH_HOST": "0.0.0.0",
            "IMMICH_PORT": "3004",
            "IMMICH_LOG_LEVEL": "verbose",
            "MACHINE_LEARNING_CACHE_FOLDER": "/cache",
            "MACHINE_LEARNING_MODEL_TTL": "600",
            "MACHINE_LEARNING_MODEL_TTL_POLL_S": "5",
            "MACHINE_LEARNING_REQUEST_THREADS": "3",
            "MACHINE_LEARNING_MODEL_INTER_OP_THREADS": "1",
            "MACHINE_LEARNING_MODEL_INTRA_OP_THREADS": "4",
            "MACHINE_LEARNING_MODEL_ARENA": "false",
            "MACHINE_LEARNING_DEVICE_IDS": "1,2",
            "MACHINE_LEARNING_HTTP_KEEPALIVE_TIMEOUT_S": "7",
            "MACHINE_LEARNING_MAX_BATCH_SIZE__FACIAL_RECOGNITION": "8",
            "MACHINE_LEARNING_MAX_BATCH_SIZE__TEXT_RECOGNITION": "3",
            "machine_learning_preload__clip__textual": "ViT-B-32__openai, nllb-clip-base-siglip__v1",
            "MACHINE_LEARNING_PRELOAD__FACIAL_RECOGNITION__DETECTION": "buffalo_l",
        }
    )
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 3004, "DEBUG")
    assert settings.cache_folder == Path("/cache")
    assert (settings.model_ttl_s, settings.model_ttl_poll_s, settings.request_threads) == (600, 5, 3)
    assert (settings.inter_op_threads, settings.intra_op_threads, settings.model_arena) == (1, 4, False)
    assert (settings.device_ids, settings.device_id) == ((1, 2), 1)
    assert (settings.keepalive_s, settings.max_batch_face_recognition, settings.max_batch_ocr) == (7, 8, 3)
    assert settings.preload == {
        (Task.CLIP, ModelType.TEXTUAL): ("ViT-B-32__openai", "nllb-clip-base-siglip__v1"),
        (Task.FACIAL_RECOGNITION, ModelType.DETECTION): ("buffalo_l",),
    }


@pytest.mark.parametrize("variable", ["ONNXRUNTIME_PROVIDER", "MACHINE_LEARNING_PROVIDER"])
def test_provider_from_either_variable(variable: str) -> None:
    assert Settings.from_env({variable: "tensorrt"}).provider is Provider.TENSORRT


def test_gpu_and_security_settings() -> None:
    settings = Settings.from_env(
        {
            "MACHINE_LEARNING_GPU_MEM_LIMIT": "4GiB",
            "TENSORRT_CACHE_PATH": "/var/cache/trt",
            "MACHINE_LEARNING_TENSORRT_FP16": "no",
            "MACHINE_LEARNING_MAX_BODY_SIZE": "200MiB",
            "MACHINE_LEARNING_ALLOWED_CLIENTS": "192.168.1.0/24, fd00::/8",
        }
    )
    assert settings.gpu_mem_limit == 4 * 1024**3
    assert settings.tensorrt_cache == Path("/var/cache/trt")
    assert settings.tensorrt_fp16 is False
    assert settings.max_body_size == 200 * 1024**2
    assert settings.allowed_clients == (ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IMMICH_PORT", "http"),
        ("IMMICH_PORT", "70000"),
        ("IMMICH_LOG_LEVEL", "loud"),
        ("MACHINE_LEARNING_MODEL_TTL", "five minutes"),
        ("MACHINE_LEARNING_MODEL_ARENA", "maybe"),
        ("MACHINE_LEARNING_MODEL_SHARED_ARENA", "maybe"),
        ("MACHINE_LEARNING_BATCH_GATHER_MS", "-1"),
        ("MACHINE_LEARNING_PROVIDER", "rocm"),
        ("MACHINE_LEARNING_GPU_MEM_LIMIT", "lots"),
        ("MACHINE_LEARNING_ALLOWED_CLIENTS", "10.0.0.0/33"),
        ("MACHINE_LEARNING_DEVICE_IDS", "0,gpu1"),
        ("MACHINE_LEARNING_MAX_BATCH_SIZE__FACIAL_RECOGNITION", "0"),
        ("MACHINE_LEARNING_PREPROCESSING", "newest"),
        ("MACHINE_LEARNING_MODEL_REVISION", "v2"),
    ],
)
def test_malformed_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


def test_tls_needs_both_files() -> None:
    with pytest.raises(ConfigError, match="TLS_CERT and MACHINE_LEARNING_TLS_KEY"):
        Settings.from_env({"MACHINE_LEARNING_TLS_CERT": "/etc/ml.crt"})


def test_bad_configuration_stops_startup_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "immich_ml", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        # PYTHONPATH is how the Nix build hands the interpreter the package and its dependencies.
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "MACHINE_LEARNING_MODEL_TTL": "soon",
            **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"},
        },
    )
    assert result.returncode == 2
    assert "MACHINE_LEARNING_MODEL_TTL='soon'" in result.stderr


@pytest.mark.parametrize(
    ("text", "size"),
    [("123", 123), ("100MiB", 100 * 1024**2), ("2G", 2 * 10**9), ("1.5 GiB", int(1.5 * 1024**3)), ("4kb", 4000)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_command_line_flags_override_the_environment(tmp_path: Path) -> None:
    settings = Settings.from_env({"IMMICH_PORT": "3004"}).with_overrides(port=4000, host=None)
    assert (settings.host, settings.port) == ("127.0.0.1", 4000)


def test_settings_built_from_plain_strings_get_typed_values(tmp_path: Path) -> None:
    settings = Settings(provider="cpu", preprocessing="latest", cache_folder=str(tmp_path))  # type: ignore[arg-type]
    assert settings.provider is Provider.CPU and not settings.uses_gpu  # `is` takes the right branch
    assert settings.preprocessing is Preprocessing.LATEST
    assert settings.cache_folder == tmp_path and isinstance(settings.cache_folder, Path)
    assert settings.with_overrides(provider="cuda").provider is Provider.CUDA
    preload = Settings(preload={("ocr", "detection"): ["PP-OCRv5_mobile"]}).preload  # type: ignore[dict-item]
    assert preload == {(Task.OCR, ModelType.DETECTION): ("PP-OCRv5_mobile",)}
    assert all(type(task) is Task and type(kind) is ModelType for task, kind in preload)


def test_settings_built_from_a_value_that_does_not_convert_are_refused() -> None:
    with pytest.raises(ConfigError, match="preprocessing='newest'"):
        Settings(preprocessing="newest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="preload"):
        Settings(preload={("ocr", "visual"): ("PP-OCRv5_mobile",)})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="preload="):
        Settings(preload={("faces", "detection"): ("buffalo_l",)})  # type: ignore[dict-item]


def test_thread_and_memory_settings() -> None:
    defaults = Settings.from_env({})
    assert (defaults.concurrent_batches, defaults.trim_memory, defaults.thread_spinning) == (0, True, False)
    settings = Settings.from_env({"MACHINE_LEARNING_CONCURRENT_BATCHES": "3", "MACHINE_LEARNING_TRIM_MEMORY": "false"})
    assert (settings.concurrent_batches, settings.trim_memory) == (3, False)
    with pytest.raises(ConfigError, match="MACHINE_LEARNING_TRIM_MEMORY"):
        Settings.from_env({"MACHINE_LEARNING_TRIM_MEMORY": "sometimes"})
