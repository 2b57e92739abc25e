"""Execution-provider choice, including onnxruntime-gpu's silent fall-back to the CPU.

The only stand-in is the list of providers the onnxruntime build reports (`available_providers`): it plays a
GPU build on this CPU-only machine. Sessions are real; ONNX Runtime really falls back to the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from immich_ml.cpus import CpuBudget, Quota
from immich_ml.errors import ProviderError
from immich_ml.http.app import create_app
from immich_ml.inference.sessions import (
    CPU,
    CUDA,
    IDENTITY_GRAPH,
    TENSORRT,
    OnnxSession,
    SessionFactory,
    release_shared_arena,
)
from immich_ml.memory import resident_bytes
from immich_ml.settings import Provider, Settings
from tests import modelgen
from tests.conftest import VISUAL, predict_form

GPU_BUILD = [TENSORRT, CUDA, CPU]
ORT_FALLBACK_WARNING = "ignore:Specified provider:UserWarning"


def factory(provider: Provider, available: list[str], **settings: object) -> SessionFactory:
    return SessionFactory(
        Settings(provider=provider, **settings),  # type: ignore[arg-type]
        available_providers=lambda: available,
    )


@pytest.mark.parametrize(
    ("provider", "available", "wanted"),
    [
        (Provider.AUTO, [CPU], [CPU]),
        (Provider.AUTO, GPU_BUILD, [CUDA, CPU]),  # auto never picks TensorRT, like upstream
        (Provider.CPU, GPU_BUILD, [CPU]),
        (Provider.CUDA, GPU_BUILD, [CUDA, CPU]),
        (Provider.TENSORRT, GPU_BUILD, [TENSORRT, CUDA, CPU]),
        (Provider.TENSORRT, [CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_wanted_providers(provider: Provider, available: list[str], wanted: list[str]) -> None:
    assert factory(provider, available).wanted_providers() == wanted


def test_cuda_on_a_cpu_build_is_an_error_naming_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert factory(Provider.CUDA, [CPU]).wanted_providers() == [CPU]
    assert "lacks CUDAExecutionProvider" in caplog.text and "onnxruntime-gpu" in caplog.text
    with pytest.raises(ProviderError):
        factory(Provider.CUDA, [CPU], provider_strict=True).wanted_providers()


@pytest.mark.parametrize(
    ("cpus", "intra", "split_intra"),
    [
        (CpuBudget(affinity=1, quota=None), 1, 1),
        (CpuBudget(affinity=2, quota=None), 2, 1),  # upstream's 2 on 2 and 3 CPUs
        (CpuBudget(affinity=3, quota=None), 2, 1),
        (CpuBudget(affinity=8, quota=None), 4, 2),  # half the CPUs per model, split between 2 batches
        (CpuBudget(affinity=16, quota=None), 8, 4),
        (CpuBudget(affinity=16, quota=Quota(150000, 100000, Path("/q"))), 1, 1),  # never above the quota
    ],
)
def test_cpu_sessions_default_threads_follow_the_usable_cpus(cpus: CpuBudget, intra: int, split_intra: int) -> None:
    made = factory(Provider.CPU, [CPU], cpus=cpus)
    options = made._session_options([CPU])
    assert (options.inter_op_num_threads, options.intra_op_num_threads) == (1, intra)
    assert made._session_options([CPU], split_between=2).intra_op_num_threads == split_intra


def test_gpu_sessions_keep_onnx_runtimes_threads_unless_the_process_may_use_fewer_cpus() -> None:
    """A GPU session's CPU threads (and those of a session that fell back to the CPU) stay ONNX Runtime's
    choice on a whole host, and never exceed a container's quota."""
    host_cpus = os.cpu_count() or 1
    whole = factory(Provider.CUDA, GPU_BUILD, cpus=CpuBudget(affinity=host_cpus, quota=None))
    options = whole._session_options([CUDA, CPU])
    assert (options.inter_op_num_threads, options.intra_op_num_threads) == (0, 0)
    one_cpu = CpuBudget(affinity=host_cpus, quota=Quota(100000, 100000, Path("/q")))
    limited = factory(Provider.CUDA, GPU_BUILD, cpus=one_cpu)._session_options([CUDA, CPU])
    assert limited.intra_op_num_threads == (1 if host_cpus > 1 else 0)


def test_explicit_thread_settings_win_over_the_usable_cpus() -> None:
    one_cpu = CpuBudget(affinity=1, quota=None)
    configured = factory(Provider.CPU, [CPU], intra_op_threads=3, inter_op_threads=2, cpus=one_cpu)
    options = configured._session_options([CPU], split_between=2)
    assert (options.inter_op_num_threads, options.intra_op_num_threads) == (2, 3)


def test_gpu_provider_options_come_from_settings(tmp_path: Path) -> None:
    made = factory(
        Provider.TENSORRT,
        GPU_BUILD,
        device_id=1,
        gpu_mem_limit=2**30,
        cache_folder=tmp_path,
        tensorrt_fp16=False,
        cudnn_conv_algo_search="HEURISTIC",
    )
    cuda = made._provider_options(CUDA, "clip/x/visual")
    assert cuda == {
        "device_id": 1,
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "gpu_mem_limit": 2**30,
    }
    trt = made._provider_options(TENSORRT, "clip/x/visual")
    assert trt["trt_fp16_enable"] is False and trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path / "tensorrt" / "clip_x_visual")
    assert Path(trt["trt_engine_cache_path"]).is_dir()


@pytest.mark.filterwarnings(ORT_FALLBACK_WARNING)
async def test_silent_cpu_fallback_is_logged_and_visible(
    aiohttp_client: object, clip_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(cache_folder=clip_cache, provider=Provider.CUDA)
    app = create_app(settings, sessions=SessionFactory(settings, available_providers=lambda: GPU_BUILD))
    client = await aiohttp_client(app)  # type: ignore[operator]
    image = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 64))
    with caplog.at_level(logging.INFO):
        async with client.post("/predict", data=predict_form(VISUAL, image=image)) as resp:
            assert resp.status == 200
    assert "CUDAExecutionProvider failed to initialise for clip/ViT-B-32__openai/visual" in caplog.text
    assert "loaded clip/ViT-B-32__openai/visual using CPUExecutionProvider" in caplog.text
    async with client.get("/health") as resp:
        models = (await resp.json())["models"]
    assert [(model["model"], model["providers"]) for model in models] == [("clip/ViT-B-32__openai/visual", [CPU])]


@pytest.mark.filterwarnings(ORT_FALLBACK_WARNING)
async def test_strict_mode_refuses_to_run_on_the_cpu(aiohttp_client: object, clip_cache: Path) -> None:
    settings = Settings(cache_folder=clip_cache, provider=Provider.CUDA, provider_strict=True)
    app = create_app(settings, sessions=SessionFactory(settings, available_providers=lambda: GPU_BUILD))
    client = await aiohttp_client(app)  # type: ignore[operator]
    image = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 64))
    async with client.post("/predict", data=predict_form(VISUAL, image=image)) as resp:
        assert resp.status == 503  # a model that cannot load here: the server tries its next URL
        detail = (await resp.json())["detail"]
    assert "CUDAExecutionProvider failed to initialise" in detail
    assert (clip_cache / "clip/ViT-B-32__openai/visual/model.onnx").is_file()  # a config error deletes nothing
    assert json.loads((clip_cache / "clip/ViT-B-32__openai/config.json").read_text())


def test_two_onnxruntime_builds_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A second build's package metadata on the path (what `pip install onnxruntime-gpu` leaves) is an error."""
    dist_info = tmp_path / "onnxruntime_gpu-1.31.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.ERROR):
        SessionFactory(Settings())
    assert "both onnxruntime" in caplog.text and "onnxruntime-gpu 1.31.1" in caplog.text


def test_one_onnxruntime_build_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        SessionFactory(Settings())
    assert caplog.text == ""


def _doubling_session(tmp_path: Path) -> OnnxSession:
    """A real graph over [rows, width], both axes symbolic: `y = 2x`, and per row the rows of its run."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["y"]),
            helper.make_node("Shape", ["x"], ["rows"], end=1),
            helper.make_node("Concat", ["rows", "one"], ["target"], axis=0),
            helper.make_node("Expand", ["rows", "target"], ["run_rows"]),
        ],
        "doubling",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "width"])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "width"]),
            helper.make_tensor_value_info("run_rows", TensorProto.INT64, ["rows", 1]),
        ],
        [
            numpy_helper.from_array(np.array(2, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        ],
    )
    path = tmp_path / "doubling.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=modelgen.IR_VERSION)
    onnx.save(model, path)
    return SessionFactory(Settings(provider=Provider.CPU)).create(path, cache_key="doubling")


def test_run_rows_gives_every_input_its_own_rows_in_shared_runs(tmp_path: Path) -> None:
    session = _doubling_session(tmp_path)
    rng = np.random.default_rng(0)
    inputs = [
        {"x": rng.standard_normal((rows, width)).astype(np.float32)}
        for rows, width in [(1, 2), (2, 3), (3, 2), (1, 3), (4, 2)]
    ]
    outputs = session.run_rows(inputs, list, max_rows=4)
    for feeds, (doubled, rows_in_run) in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(doubled, 2 * feeds["x"])
        assert rows_in_run.shape == (len(feeds["x"]), 1)
    # equal widths share runs of at most 4 rows; an input of 4 rows fills a run of its own
    runs = {feeds["x"].shape: int(run[0, 0]) for feeds, (_, run) in zip(inputs, outputs, strict=True)}
    assert runs == {(1, 2): 4, (3, 2): 4, (4, 2): 4, (2, 3): 3, (1, 3): 3}


def test_run_rows_reads_each_run_before_the_next_one_is_made(tmp_path: Path) -> None:
    """`read` gets a run's outputs right after that run: with a `read` that keeps only a sum, no run's output
    arrays are alive when the next run's are read (a request's large outputs never pile up)."""
    session = _doubling_session(tmp_path)
    runs: list[weakref.ref[np.ndarray]] = []
    alive_at_reads: list[int] = []

    def read(outputs: list[np.ndarray]) -> float:
        doubled, _ = outputs
        if not any(run() is doubled.base for run in runs):
            runs.append(weakref.ref(doubled.base))
        alive_at_reads.append(sum(run() is not None for run in runs))
        return float(doubled.sum())

    inputs = [{"x": np.ones((2, width), dtype=np.float32)} for width in (1, 2, 3, 1, 2, 3)]
    assert session.run_rows(inputs, read, max_rows=4) == [4.0, 8.0, 12.0, 4.0, 8.0, 12.0]
    assert len(runs) == 3  # equal widths share a run
    assert alive_at_reads == [1] * 6


def test_wide_rows_run_fewer_at_a_time_under_an_element_limit(tmp_path: Path) -> None:
    """With `max_run_elements`, rows of an input wider than the limit allows are spread over several runs (an
    input too may span runs); every input still gets its own rows, in order."""
    session = _doubling_session(tmp_path)
    session.max_run_elements = 12
    rng = np.random.default_rng(1)
    inputs = [{"x": rng.standard_normal((rows, width)).astype(np.float32)} for rows, width in [(6, 2), (5, 4), (1, 13)]]
    outputs = session.run_rows(inputs, list, max_rows=6)
    for feeds, (doubled, _) in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(doubled, 2 * feeds["x"])
    assert [run[:, 0].tolist() for _, run in outputs] == [[6] * 6, [3, 3, 3, 2, 2], [1]]


def test_run_rows_without_split_runs_each_input_alone_and_returns_its_whole_outputs(tmp_path: Path) -> None:
    session = _doubling_session(tmp_path)
    inputs = [{"x": np.ones((rows, 2), dtype=np.float32)} for rows in (2, 3)]
    outputs = session.run_rows(inputs, list, max_rows=1, split=False)
    assert [[array.tolist() for array in per_input] for per_input in outputs] == [
        [[[2.0, 2.0]] * 2, [[2]] * 2],
        [[[2.0, 2.0]] * 3, [[3]] * 3],
    ]


@pytest.mark.parametrize(
    ("settings", "shared"),
    [({}, True), ({"shared_arena": False}, False), ({"model_arena": False}, False)],
)
def test_cpu_sessions_share_one_memory_arena_unless_told_otherwise(
    tmp_path: Path, settings: dict[str, bool], shared: bool
) -> None:
    """Real sessions of two models, one arena between them by default (upstream-style: one each), with the same
    answers either way."""
    clip = modelgen.write_clip(tmp_path, "ViT-B-32__openai")
    made = factory(Provider.CPU, [CPU], **settings)
    visual = made.create(clip / "visual" / "model.onnx", cache_key="clip/visual")
    textual = made.create(clip / "textual" / "model.onnx", cache_key="clip/textual")
    for session in (visual, textual):
        assert _config_entry(session, "session.use_env_allocators") == ("1" if shared else None)
    pixels = np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
    alone = factory(Provider.CPU, [CPU], model_arena=False).create(clip / "visual" / "model.onnx", cache_key="v")
    (name,) = visual.input_names
    np.testing.assert_array_equal(visual.run({name: pixels})[0], alone.run({name: pixels})[0])


def _config_entry(session: OnnxSession, key: str) -> str | None:
    """A session's configuration entry; None where it was never set."""
    try:
        return session._session.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # ONNX Runtime: "does not have configuration with key"
        return None


def test_the_identity_graph_is_what_onnx_writes() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "release",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert model.SerializeToString() == IDENTITY_GRAPH


def test_releasing_the_shared_arena_gives_a_models_activations_back(tmp_path: Path) -> None:
    """A real graph whose run needs 160 MiB of activations: the shared arena keeps them after the run (as each
    session's own arena would), and `release_shared_arena` hands them back."""
    rows, columns = 5120, 8192  # float32: 160 MiB
    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["x", "shape"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0),
        ],
        "big-activation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array([rows, columns], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(model, str(tmp_path / "big.onnx"))
    session = factory(Provider.CPU, [CPU]).create(tmp_path / "big.onnx", cache_key="t/big")
    release_shared_arena()
    before = resident_bytes()
    assert session.run({"x": np.ones((1, 1), np.float32)})[0] == rows * columns
    kept = resident_bytes() - before
    release_shared_arena()
    left = resident_bytes() - before
    assert kept > 120 * 2**20, f"the arena kept {kept / 2**20:.0f} MiB"
    assert left < 20 * 2**20, f"{left / 2**20:.0f} MiB left after the release"
