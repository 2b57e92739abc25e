"""ONNX Runtime sessions: provider choice and options from settings, the providers really in use, and the one way
a batch of several callers' inputs runs (`OnnxSession.run_rows`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from immich_ml.errors import ProviderError
from immich_ml.inference.sizing import intra_op_threads
from immich_ml.log import MODELS_LOG as log
from immich_ml.models.files import onnx_damage
from immich_ml.settings import Provider, Settings

__all__ = [
    "CPU",
    "CUDA",
    "TENSORRT",
    "Feeds",
    "OnnxSession",
    "SessionFactory",
    "onnxruntime_builds",
    "release_shared_arena",
    "shared_cpu_arena",
]


CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

Feeds = Mapping[str, np.ndarray]
"""A graph's inputs by name."""

T = TypeVar("T")

_WANTED: dict[Provider, tuple[str, ...]] = {
    Provider.AUTO: (CUDA, CPU),
    Provider.CPU: (CPU,),
    Provider.CUDA: (CUDA, CPU),
    Provider.TENSORRT: (TENSORRT, CUDA, CPU),
}


class OnnxSession:
    """One loaded ONNX graph and the providers ONNX Runtime actually chose for it."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.providers: list[str] = session.get_providers()
        self.input_names = [node.name for node in session.get_inputs()]
        self.output_names = [node.name for node in session.get_outputs()]
        first_dim = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
        self.fixed_batch: int | None = first_dim if isinstance(first_dim, int) else None
        self.metadata: dict[str, str] = session.get_modelmeta().custom_metadata_map
        self.intra_op_threads: int = session.get_session_options().intra_op_num_threads
        """ONNX Runtime intra-op threads (0: ONNX Runtime's own choice, as on a GPU)."""
        self.max_run_elements: int | None = None
        """The most input elements (rows × a row's elements) one run takes, for a graph whose rows never
        affect one another and whose input size varies: wider rows then run fewer at a time. None: no limit."""

    def output_shape(self, index: int = 0) -> list[int | str | None]:
        """The declared shape of an output (symbolic dims are strings or None)."""
        return list(self._session.get_outputs()[index].shape)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the graph; rows beyond what one run may take (`rows_per_run`) go in further runs, and the
        outputs are stacked."""
        batch = _rows(feeds)
        step = self.rows_per_run(feeds)
        if step >= batch:
            return list(self._session.run(None, feeds))
        parts = [
            self._session.run(None, {name: value[i : i + step] for name, value in feeds.items()})
            for i in range(0, batch, step)
        ]
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]

    def rows_per_run(self, feeds: Feeds) -> int:
        """How many of these feeds' rows one run takes: 1 for a graph with a fixed batch of 1; as many as fit
        in `max_run_elements` (at least 1); else all."""
        if self.fixed_batch == 1:
            return 1
        if self.max_run_elements is None:
            return _rows(feeds)
        row_elements = sum(int(value[0].size) for value in feeds.values())
        return max(1, self.max_run_elements // max(1, row_elements))

    def run_rows(
        self, inputs: Sequence[Feeds], read: Callable[[list[np.ndarray]], T], *, max_rows: int, split: bool = True
    ) -> list[T]:
        """Run several callers' inputs, each a feeds dict whose arrays carry a leading axis of rows, and
        return `read` of every input's own outputs (rows kept): the batcher's one way to run a session.

        `read` runs right after the input's run, before the next run starts, so a run's outputs (ONNX
        Runtime's memory) are gone before the next one's are made unless `read` keeps them.
        Inputs of equal shape share runs of up to `max_rows` rows and get their rows back, so results never
        depend on which other inputs were queued alongside. With `split` false (a graph whose outputs are not
        per row, like insightface's SCRFD exports) each input runs alone and gets the whole outputs.
        """
        if not split:
            return [read(self.run(dict(feeds))) for feeds in inputs]
        outputs: dict[int, T] = {}
        for members in _runs(inputs, max_rows):
            outputs.update(self._run_together([inputs[i] for i in members], members, read))
        return [outputs[index] for index in range(len(inputs))]

    def _run_together(
        self, inputs: Sequence[Feeds], indices: Sequence[int], read: Callable[[list[np.ndarray]], T]
    ) -> dict[int, T]:
        """One run of equal-shape inputs stacked; `read` of each one's rows, by its index."""
        results = self.run({name: np.concatenate([feeds[name] for feeds in inputs]) for name in inputs[0]})
        bounds = np.cumsum([0, *(_rows(feeds) for feeds in inputs)])
        return {
            index: read([result[start:end] for result in results])
            for index, start, end in zip(indices, bounds[:-1], bounds[1:], strict=True)
        }


def _rows(feeds: Feeds) -> int:
    """How many rows an input carries (the leading axis of its arrays)."""
    return len(next(iter(feeds.values())))


def _runs(inputs: Sequence[Feeds], max_rows: int) -> list[list[int]]:
    """The inputs (by index) of each session run: equal shapes together, at most `max_rows` rows a run (an
    input larger than that runs alone)."""
    groups: dict[tuple[tuple[str, tuple[int, ...]], ...], list[int]] = {}
    for index, feeds in enumerate(inputs):
        groups.setdefault(tuple((name, array.shape[1:]) for name, array in feeds.items()), []).append(index)
    runs: list[list[int]] = []
    for members in groups.values():
        rows = 0
        runs.append([])
        for index in members:
            size = _rows(inputs[index])
            if runs[-1] and rows + size > max_rows:
                runs.append([])
                rows = 0
            runs[-1].append(index)
            rows += size
    return runs


def onnxruntime_builds() -> list[str]:
    """The ONNX Runtime distributions installed; more than one means they overwrite each other's files."""
    builds = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            builds.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return builds


@functools.cache
def shared_cpu_arena() -> ort.InferenceSession | None:
    """Register one CPU memory arena for every session of this process that asks for it (ONNX Runtime's
    environment allocator, growing by what is asked, as upstream's per-session arenas do), and return the
    session `release_shared_arena` runs; None where this ONNX Runtime build cannot.

    Per-session arenas each keep their own largest runs' activations, which add up over models; one shared
    arena holds what the models in flight need at once, and memory one model freed serves the next.
    """
    try:
        ort.create_and_register_allocator(
            ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
            ort.OrtArenaCfg(0, _SAME_AS_REQUESTED, -1, -1),
        )
    except (AttributeError, RuntimeError) as error:
        log.warning("no shared CPU memory arena (%s); each model keeps its own", error)
        return None
    # Built now, while the arena is empty: its few allocations then never pin a region that others freed.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(IDENTITY_GRAPH, sess_options=options, providers=[CPU])


_SAME_AS_REQUESTED = 1
"""`OrtArenaCfg`'s code for the kSameAsRequested extend strategy (0 is kNextPowerOfTwo)."""

IDENTITY_GRAPH = bytes.fromhex(
    "08083a3d0a100a017812017922084964656e74697479120772656c656173655a0f0a0178120a0a08080112040a020801620f0a0179120a"
    "0a08080112040a02080142040a00100d"
)
"""The ONNX model `y = Identity(x)` on float[1] (graph "release", opset 13, IR version 8), as `onnx.helper`
serialises it: the smallest run that can ask ONNX Runtime to shrink the shared arena."""


def release_shared_arena() -> None:
    """Hand the shared CPU arena's free regions back to the OS. ONNX Runtime shrinks an arena only at the end
    of a run that asks for it, so this runs a one-element graph that does, its input and output in arrays of
    ours (an output in the arena would keep a region). Blocking; call it after unloading models, whose
    activations would otherwise stay in the arena for the models left."""
    if (session := shared_cpu_arena()) is None:
        return
    binding = session.io_binding()
    binding.bind_cpu_input("x", np.zeros(1, np.float32))
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32)))
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    session.run_with_iobinding(binding, shrink)


class SessionFactory:
    """Creates sessions with the configured providers, threads and memory options."""

    def __init__(
        self,
        settings: Settings,
        *,
        available_providers: Callable[[], Sequence[str]] = ort.get_available_providers,
    ) -> None:
        self.settings = settings
        self._available_providers = available_providers
        self.uses_shared_arena = False
        """Whether a session of this factory allocates from the shared CPU arena (`shared_cpu_arena`)."""
        if len(builds := onnxruntime_builds()) > 1:
            log.error(
                "both %s are installed; they share one `onnxruntime` package and whichever was installed "
                "last wins. Uninstall both and install one (docs/gpu.md)",
                " and ".join(builds),
            )

    def wanted_providers(self) -> list[str]:
        """The providers to ask for, in order: the configured preference, limited to this build's."""
        available = set(self._available_providers())
        wanted = [p for p in _WANTED[self.settings.provider] if p in available or p == CPU]
        missing = [p for p in _WANTED[self.settings.provider] if p not in wanted]
        if missing and self.settings.provider not in (Provider.AUTO, Provider.CPU):
            message = (
                f"provider {self.settings.provider} asked for, but this onnxruntime build lacks "
                f"{', '.join(missing)} (it has {', '.join(sorted(available))}); "
                "install onnxruntime-gpu or use the CUDA package"
            )
            if self.settings.provider_strict:
                raise ProviderError(message)
            log.error(message)
        return wanted

    def create(
        self,
        model_path: Path,
        *,
        cache_key: str,
        split_between: int = 1,
        interactive: bool = False,
        input_size_varies: bool = False,
    ) -> OnnxSession:
        """Load `model_path`; log the providers in use; raise in strict mode if the first one asked for was lost.

        `split_between` > 1 divides the default CPU intra-op threads (`sizing.intra_op_threads`) between that
        many runs at once (each gets its part); with 1, or MACHINE_LEARNING_MODEL_INTRA_OP_THREADS set,
        concurrent runs share all of them. An `interactive` session's idle threads spin; one whose
        `input_size_varies` with each image plans no memory pattern (both below).
        """
        wanted = self.wanted_providers()
        options = [self._provider_options(p, cache_key) for p in wanted]
        with onnx_damage(model_path):
            session = OnnxSession(
                ort.InferenceSession(
                    str(model_path),
                    sess_options=self._session_options(wanted, split_between, interactive, input_size_varies),
                    providers=wanted,
                    provider_options=options,
                )
            )
        if session.providers[0] != wanted[0]:  # also TensorRT falling back to plain CUDA
            message = (
                f"{wanted[0]} failed to initialise for {cache_key}; running on {session.providers[0]} instead "
                "(check the driver, CUDA/cuDNN/TensorRT libraries and `immich-gpu-check`)"
            )
            if self.settings.provider_strict:
                raise ProviderError(message)
            if self.settings.provider is Provider.AUTO:
                log.warning(message)
            else:
                log.error(message)
        log.info("loaded %s using %s", cache_key, ", ".join(session.providers))
        return session

    def _session_options(
        self,
        providers: list[str],
        split_between: int = 1,
        interactive: bool = False,
        input_size_varies: bool = False,
    ) -> ort.SessionOptions:
        options = ort.SessionOptions()
        cpu_only = providers == [CPU]
        inter = self.settings.inter_op_threads or (1 if cpu_only else 0)
        options.inter_op_num_threads = inter
        options.intra_op_num_threads = intra_op_threads(self.settings, split_between=split_between, cpu_only=cpu_only)
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if inter > 1 else ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_cpu_mem_arena = self.settings.model_arena
        if cpu_only and self.settings.model_arena and self.settings.shared_arena and shared_cpu_arena() is not None:
            options.add_session_config_entry("session.use_env_allocators", "1")
            self.uses_shared_arena = True
        # The memory pattern plans one block of activations per input shape and keeps it in the arena: right
        # for graphs fed a few shapes, not for one whose input takes each image's own size.
        options.enable_mem_pattern = not input_size_varies
        # Idle ONNX Runtime threads spin by default; on few cores that steals time from decoding and other
        # sessions (measured in docs/benchmarks.md), so bulk sessions' threads sleep unless MODEL_THREAD_SPINNING
        # is set. A search query's threads spin: waking sleeping threads for each of its many small operators
        # cost a third of its latency, and a query is over in a few tens of milliseconds.
        spinning = "1" if self.settings.thread_spinning or interactive else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return options

    def _provider_options(self, provider: str, cache_key: str) -> dict[str, Any]:
        s = self.settings
        if provider == CPU:
            return {"arena_extend_strategy": "kSameAsRequested"}
        if provider == CUDA:
            options: dict[str, Any] = {
                "device_id": s.device_id,
                "arena_extend_strategy": s.cuda_arena_strategy,
                "cudnn_conv_algo_search": s.cudnn_conv_algo_search,
            }
            if s.gpu_mem_limit is not None:
                options["gpu_mem_limit"] = s.gpu_mem_limit
            return options
        engine_dir = s.tensorrt_cache / cache_key.replace("/", "_")
        engine_dir.mkdir(parents=True, exist_ok=True)
        return {
            "device_id": s.device_id,
            "trt_fp16_enable": s.tensorrt_fp16,
            "trt_max_workspace_size": s.tensorrt_workspace,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(engine_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(s.tensorrt_cache),
        }
