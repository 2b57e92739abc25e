"""immich-gpu-check end to end: fakes only at the hardware/OS boundary (NVML, systemctl/journalctl, /proc, /dev).

The API check talks to the real immich-ml application over HTTP. onnxruntime is the real (CPU) build, so GPU
inference itself cannot be exercised here; those paths are covered by the CPU-build failure and skip tests.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from immich_ml.gpu_check import graphs
from immich_ml.gpu_check import main as gpu_check
from immich_ml.gpu_check.archs import OFFICIAL_BUILDS, ArchSet, judge, parse_archs
from immich_ml.gpu_check.envfile import parse_environment_file
from immich_ml.inference.sessions import SessionFactory
from immich_ml.settings import Provider, Settings
from tests.conftest import ClientFactory
from tests.daemonproc import Daemon
from tests.fakes.host import ALL_MODULES, CDI_UNIT, IMMICH_UNIT, FakeHost

FAKES = Path(__file__).parent.parent / "fakes"
MiB = 1024**2
GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0")
RUNNING = {
    "LoadState": "loaded",
    "ActiveState": "active",
    "SubState": "running",
    "MainPID": "4242",
    "NRestarts": "0",
    "Environment": "MACHINE_LEARNING_PROVIDER=cuda MACHINE_LEARNING_DEVICE_IDS=0",
}
GOOD_JOURNAL = (
    "Starting immich-ml.service - Immich machine learning...",
    "Started immich-ml.service - Immich machine learning.",
    "loaded clip/ViT-B-32__openai/visual using CUDAExecutionProvider, CPUExecutionProvider",
)
FALLBACK_LINE = (
    "CUDAExecutionProvider failed to initialise for clip/ViT-B-32__openai/visual; running on "
    "CPUExecutionProvider instead (check the driver, CUDA/cuDNN/TensorRT libraries and `immich-gpu-check`)"
)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh NVML stand-in in place of `pynvml`, with one healthy RTX 3060."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKES / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pynvml", module)  # before exec: its dataclasses look themselves up there
    spec.loader.exec_module(module)
    module.configure(gpus=[module.FakeGpu(processes=[(4242, 900 * MiB), (4243, 100 * MiB), (777, 3072 * MiB)])])
    return module


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    """A healthy GPU host: modules, nodes, CDI, the unit running as pid 4242 with a child, another GPU user."""
    fake = FakeHost(tmp_path)
    fake.modules("snd", *ALL_MODULES)
    fake.devices(*GPU_NODES)
    fake.process(1, 0, "systemd")
    fake.process(4242, 1, "immich-ml")
    fake.process(4243, 4242, "immich-ml")
    fake.process(777, 1, "ollama")
    fake.cdi_spec("0", "all")
    fake.unit(IMMICH_UNIT, **RUNNING)
    fake.unit(CDI_UNIT, LoadState="loaded", ActiveState="active", SubState="exited", Result="success")
    fake.journal(*GOOD_JOURNAL)
    fake.install(monkeypatch)
    return fake


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """Run the command with --json; the exit status and the checks by name."""
    status = gpu_check.main(["--json", *argv])
    report = json.loads(capsys.readouterr().out)
    return status, {check["name"]: check for check in report["checks"]}


def statuses(checks: dict[str, Any]) -> dict[str, str]:
    return {name: check["status"] for name, check in checks.items()}


def test_no_gpu_machine_fails_the_driver_check_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pynvml  # the real binding: this machine has no NVIDIA driver, so NVML fails for real

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    monkeypatch.setenv("PATH", str(tmp_path))  # no systemctl: not a systemd host
    status = gpu_check.main(["--root", str(tmp_path), "--skip", "api"])
    table = capsys.readouterr().out
    assert status == 1
    assert "no NVIDIA driver found: NVML library not loadable" in table
    assert "fix: install the NVIDIA driver (NixOS: hardware.nvidia" in table
    status, checks = run(capsys, "--root", str(tmp_path), "--skip", "api")
    assert checks["driver"]["status"] == "fail"
    for name in ("providers", "arch", "throughput"):
        assert checks[name]["status"] == "skipped"
        assert "needs the driver check: no NVIDIA driver found" in checks[name]["detail"]


def test_missing_nvidia_ml_py_says_how_to_install_it(
    host: FakeHost, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # what an absent package looks like to `import`
    status, checks = run(capsys, "--root", str(host.root), "--only", "driver")
    assert status == 1
    assert checks["driver"]["detail"].startswith("nvidia-ml-py is not installed")
    assert "pip install nvidia-ml-py" in checks["driver"]["fix"]


async def test_healthy_fake_gpu_stack_passes(
    nvml: ModuleType,
    host: FakeHost,
    make_client: ClientFactory,
    clip_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The real daemon on generated models; it runs on the CPU here (no GPU), so it is configured that way.
    client = await make_client(provider=Provider.CPU)
    argv = [
        "--json",
        "--url",
        str(client.make_url("")),
        "--root",
        str(host.root),
        "--skip",
        "providers,throughput",
        "--cuda-archs",
        "7.5;8.6",
    ]
    status = await asyncio.to_thread(gpu_check.main, argv)
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert statuses(checks) == {
        "driver": "pass",
        "modules": "pass",
        "cdi": "pass",
        "service": "pass",
        "providers": "skipped",
        "journal": "pass",
        "memory": "pass",
        "api": "pass",
        "arch": "pass",
        "throughput": "skipped",
    }
    assert status == 0
    assert (
        "driver 550.54.14, CUDA 12.4; GPU 0: NVIDIA GeForce RTX 3060, 12.0 GiB, compute 8.6"
        == checks["driver"]["detail"]
    )
    assert checks["cdi"]["data"]["devices"] == ["0", "all"]
    assert checks["memory"]["data"]["service_pids"] == [4242, 4243]
    assert "immich-ml uses 1000 MiB on GPU 0; shared with ollama (pid 777, 3.0 GiB)" in checks["memory"]["detail"]
    assert checks["journal"]["detail"] == "clip/ViT-B-32__openai/visual on CUDAExecutionProvider"
    assert checks["api"]["data"]["dimension"] == 512
    assert checks["api"]["data"]["providers"] == ["CPUExecutionProvider"]


async def test_api_check_catches_a_model_silently_on_the_cpu(
    nvml: ModuleType,
    host: FakeHost,
    make_client: ClientFactory,
    clip_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = await make_client()  # provider auto on a machine without CUDA: the real silent fallback
    argv = ["--json", "--url", str(client.make_url("")), "--only", "api"]
    status = await asyncio.to_thread(gpu_check.main, argv)
    api = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "api")
    assert status == 1
    assert api["status"] == "fail"
    assert "on CPUExecutionProvider although provider auto asks for the GPU" in api["detail"]
    assert "fell back to the CPU" in api["fix"]


def test_unreachable_api_fails_with_fix(
    nvml: ModuleType, host: FakeHost, capsys: pytest.CaptureFixture[str], unused_tcp_port: int
) -> None:
    status, checks = run(capsys, "--url", f"http://127.0.0.1:{unused_tcp_port}", "--only", "api")
    assert status == 1
    assert "unreachable" in checks["api"]["detail"]
    assert "systemctl start immich-ml" in checks["api"]["fix"]


def test_inactive_service_fails_with_fix(
    nvml: ModuleType, host: FakeHost, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    host.unit(
        IMMICH_UNIT,
        LoadState="loaded",
        ActiveState="failed",
        SubState="failed",
        MainPID="0",
        NRestarts="5",
        Result="exit-code",
    )
    host.install(monkeypatch)
    status, checks = run(capsys, "--root", str(host.root), "--only", "service,memory")
    assert status == 1
    assert checks["service"]["status"] == "fail"
    assert checks["service"]["detail"] == "immich-ml.service is failed (failed)"
    assert checks["service"]["fix"].startswith("sudo systemctl start immich-ml.service; journalctl -u")
    assert checks["memory"]["status"] == "skipped"


def test_journal_showing_cpu_fallback_fails_with_fix(
    nvml: ModuleType, host: FakeHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host.journal(
        "Started immich-ml.service - Immich machine learning.",
        FALLBACK_LINE,
        "loaded clip/ViT-B-32__openai/visual using CPUExecutionProvider",
    )
    status, checks = run(capsys, "--root", str(host.root), "--only", "journal")
    assert status == 1
    assert checks["journal"]["detail"] == f"CPU fallback: {FALLBACK_LINE}"
    assert "MACHINE_LEARNING_PROVIDER_STRICT=true" in checks["journal"]["fix"]


def test_strict_daemon_refusing_to_start_fails_service_and_journal(
    nvml: ModuleType,
    host: FakeHost,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The journal is what the real daemon logged when strict mode refused PROVIDER=cuda on this CPU-only
    onnxruntime; the unit is what systemd shows between `Restart=on-failure` attempts."""
    daemon = Daemon(
        tmp_path, tmp_path / "cache", {"MACHINE_LEARNING_PROVIDER": "cuda", "MACHINE_LEARNING_PROVIDER_STRICT": "true"}
    )
    assert daemon.process.wait(60) == 1
    host.journal("Starting immich-ml.service - Immich machine learning...", *daemon.log().splitlines())
    host.unit(IMMICH_UNIT, **(RUNNING | {"ActiveState": "activating", "SubState": "auto-restart", "MainPID": "0"}))
    host.install(monkeypatch)
    status, checks = run(capsys, "--root", str(host.root), "--only", "service,journal")
    assert status == 1
    assert checks["service"]["status"] == "fail"
    assert checks["service"]["detail"].startswith("activating (auto-restart): it exited with an error")
    assert checks["journal"]["status"] == "fail"
    assert checks["journal"]["detail"].startswith(
        "strict provider mode refused the start: provider cuda asked for, but this onnxruntime build lacks "
        "CUDAExecutionProvider"
    )


ENV_FILE = "/etc/immich-ml/immich-ml.env"


def test_settings_in_the_units_environment_file_are_checked(
    nvml: ModuleType, host: FakeHost, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Device ids set in the generic unit's `EnvironmentFile=-/etc/immich-ml/immich-ml.env` (systemd's syntax:
    comments, quotes, a continued line) override `Environment=` and are checked against the GPUs NVML lists."""
    host.file(
        ENV_FILE,
        "# written by the admin\n"
        "; another comment\n"
        "MACHINE_LEARNING_PROVIDER = 'cuda'\n"
        'MACHINE_LEARNING_DEVICE_IDS="0,\\\n3"\n'
        "MACHINE_LEARNING_GPU_MEM_LIMIT=2GiB   \n",
    )
    files = [f"{ENV_FILE} (ignore_errors=yes)", "/etc/immich-ml/absent.env (ignore_errors=yes)"]
    host.unit(IMMICH_UNIT, **(RUNNING | {"EnvironmentFiles": files}))
    host.install(monkeypatch)
    status, checks = run(capsys, "--root", str(host.root), "--only", "driver")
    assert status == 1
    assert checks["driver"]["detail"].endswith("configured device ids [3] do not exist")

    host.file(ENV_FILE, "MACHINE_LEARNING_GPU_MEM_LIMIT=lots\n")
    status, checks = run(capsys, "--root", str(host.root), "--only", "providers")
    assert checks["providers"]["status"] == "fail"
    assert "MACHINE_LEARNING_GPU_MEM_LIMIT" in checks["providers"]["detail"]


def test_a_missing_required_environment_file_fails_the_settings(
    nvml: ModuleType, host: FakeHost, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    host.unit(IMMICH_UNIT, **(RUNNING | {"EnvironmentFiles": [f"{ENV_FILE} (ignore_errors=no)"]}))
    host.install(monkeypatch)
    status, checks = run(capsys, "--root", str(host.root), "--only", "providers")
    assert checks["providers"]["status"] == "fail"
    assert (
        f"EnvironmentFile={ENV_FILE} of immich-ml.service: No such file or directory" in checks["providers"]["detail"]
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A=1\nB = two words  \n", {"A": "1", "B": "two words"}),
        ("# A=1\n;B=2\n\n  C=3", {"C": "3"}),
        ("A='it''s'\nB='$HOME \\n'\nC='two\nlines' # x", {"A": "its", "B": "$HOME \\n", "C": "two\nlines# x"}),
        ('A="say \\"hi\\" \\$x \\q"', {"A": 'say "hi" $x \\q'}),
        ("A=one\\\ntwo\nB=a\\ b", {"A": "onetwo", "B": "a b"}),
        ("export A=1\n=2\nB\n9X=3\nC=", {"C": ""}),
    ],
)
def test_environment_file_syntax(text: str, expected: dict[str, str]) -> None:
    assert parse_environment_file(text) == expected


def test_journal_before_the_last_start_is_ignored(
    nvml: ModuleType, host: FakeHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host.journal("Started immich-ml.service.", FALLBACK_LINE, "Stopping immich-ml.service...", *GOOD_JOURNAL)
    status, checks = run(capsys, "--root", str(host.root), "--only", "journal")
    assert (status, checks["journal"]["status"]) == (0, "pass")


def test_missing_nvidia_uvm_fails_with_modprobe_fix(
    nvml: ModuleType, host: FakeHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host.modules("nvidia", "nvidia_modeset", "nvidia_drm")
    status, checks = run(capsys, "--root", str(host.root), "--only", "modules")
    assert status == 1
    assert checks["modules"]["detail"] == "kernel module(s) not loaded: nvidia_uvm"
    assert 'boot.kernelModules = [ "nvidia_uvm" ]' in checks["modules"]["fix"]


def test_cpu_only_onnxruntime_build_fails_providers_and_skips_throughput(
    nvml: ModuleType, host: FakeHost, capsys: pytest.CaptureFixture[str]
) -> None:
    status, checks = run(capsys, "--root", str(host.root), "--only", "providers,throughput")
    assert status == 1
    assert "this build lacks CUDAExecutionProvider" in checks["providers"]["detail"]
    assert "onnxruntime-gpu" in checks["providers"]["fix"]
    assert checks["throughput"]["status"] == "skipped"


def test_remote_url_skips_the_local_service_checks(
    nvml: ModuleType, host: FakeHost, capsys: pytest.CaptureFixture[str]
) -> None:
    status, checks = run(capsys, "--url", "http://192.0.2.7:3003", "--only", "service,journal,memory")
    assert status == 0
    for name in ("service", "journal", "memory"):
        assert checks[name]["status"] == "skipped"
        assert "remote" in checks[name]["detail"]


def test_no_container_toolkit_skips_cdi(
    nvml: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = FakeHost(tmp_path)
    bare.install(monkeypatch)
    status, checks = run(capsys, "--root", str(bare.root), "--only", "cdi")
    assert (status, checks["cdi"]["status"]) == (0, "skipped")


def test_json_shape(nvml: ModuleType, host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check.main(["--json", "--root", str(host.root), "--only", "driver,service"])
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"ok", "url", "checks"}
    assert report["ok"] is True and report["url"] == "http://127.0.0.1:3003"
    assert [c["name"] for c in report["checks"]] == [c.name for c in gpu_check.CHECKS]
    for check in report["checks"]:
        assert set(check) == {"name", "title", "status", "detail", "fix", "data"}
        assert check["status"] in {"pass", "warn", "fail", "skipped"}
    assert report["checks"][0]["data"]["gpus"][0]["compute_capability"] == "8.6"


def test_skip_reports_skipped_on_request(nvml: ModuleType, host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    skipped = "modules,cdi,service,providers,journal,memory,api,arch,throughput"
    status, checks = run(capsys, "--root", str(host.root), "--skip", skipped)
    assert status == 0
    assert checks["driver"]["status"] == "pass"
    assert all(checks[name]["detail"] == "skipped on request" for name in skipped.split(","))


def test_unknown_check_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--skip", "drivers"])
    assert exit_info.value.code == 2
    assert "unknown check(s) drivers" in capsys.readouterr().err


def test_table_shows_fix_lines(nvml: ModuleType, host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.modules("nvidia")
    assert gpu_check.main(["--root", str(host.root), "--only", "driver,modules"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["1", "driver", "pass"]
    assert lines[2].split()[:3] == ["2", "modules", "fail"]
    assert lines[3].strip().startswith("fix: sudo modprobe nvidia_uvm")
    assert lines[-1].endswith("=>  FAILED")


@pytest.mark.parametrize(
    ("capability", "cuda", "ok"),
    [
        ((6, 1), 12, True),  # Pascal on a CUDA 12 wheel: the sm_60 cubin runs on 6.1
        ((8, 9), 12, True),  # Ada: sm_86 kernels run on 8.9
        ((9, 0), 12, True),
        ((12, 0), 12, None),  # Blackwell: not in the list, 90a PTX does not carry forward
        ((6, 1), 13, False),  # CUDA 13 dropped Pascal
        ((7, 5), 13, True),
    ],
)
def test_architecture_table(capability: tuple[int, int], cuda: int, ok: bool | None) -> None:
    assert judge(capability, OFFICIAL_BUILDS[cuda]).ok is ok


def test_ptx_runs_on_newer_gpus_and_arch_lists_parse() -> None:
    assert judge((12, 0), ArchSet(((8, 6),), ptx=(8, 6))).ok is True
    assert parse_archs("7.5;8.6") == parse_archs("75,86") == parse_archs("sm_75 sm_86") == ((7, 5), (8, 6))
    with pytest.raises(ValueError, match="not a CUDA architecture"):
        parse_archs("turing")


def test_arch_check_fails_for_a_gpu_older_than_the_build(
    nvml: ModuleType, host: FakeHost, capsys: pytest.CaptureFixture[str]
) -> None:
    nvml.configure(gpus=[nvml.FakeGpu(name="NVIDIA GeForce GTX 1080", compute_capability=(6, 1))])
    status, checks = run(capsys, "--root", str(host.root), "--only", "arch", "--cuda-archs", "75,86,89")
    assert status == 1
    assert "sm_61 is older than the oldest architecture in the build" in checks["arch"]["detail"]
    assert "cudaCapabilities" in checks["arch"]["fix"]


def _probe_graphs() -> dict[str, bytes]:
    """How graphs.ADD and graphs.CONV were made."""
    add = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "gpu_check_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    conv = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("GlobalAveragePool", ["r2"], ["features"]),
        ],
        "gpu_check_conv",
        [
            helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224]),
            helper.make_tensor_value_info("w1", TensorProto.FLOAT, [32, 3, 3, 3]),
            helper.make_tensor_value_info("w2", TensorProto.FLOAT, [64, 32, 3, 3]),
        ],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 64, 1, 1])],
    )
    models = {}
    for name, graph in (("ADD", add), ("CONV", conv)):
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8, producer_name="immich-gpu-check"
        )
        onnx.checker.check_model(model)
        models[name] = model.SerializeToString()
    return models


def test_embedded_probe_graphs_match_onnx_helper() -> None:
    assert _probe_graphs() == {"ADD": graphs.ADD, "CONV": graphs.CONV}


def test_probe_graphs_run_through_the_session_factory(tmp_path: Path) -> None:
    factory = SessionFactory(Settings(provider=Provider.CPU, cache_folder=tmp_path))
    (tmp_path / "add.onnx").write_bytes(graphs.ADD)
    (tmp_path / "conv.onnx").write_bytes(graphs.CONV)
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    assert np.array_equal(factory.create(tmp_path / "add.onnx", cache_key="t/add").run({"x": x})[0], x + x)
    rng = np.random.default_rng(0)
    feeds = {
        "image": rng.random((2, 3, 224, 224), dtype=np.float32),
        "w1": rng.standard_normal((32, 3, 3, 3), dtype=np.float32),
        "w2": rng.standard_normal((64, 32, 3, 3), dtype=np.float32),
    }
    (features,) = factory.create(tmp_path / "conv.onnx", cache_key="t/conv").run(feeds)
    assert features.shape == (2, 64, 1, 1)
