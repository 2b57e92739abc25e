"""What every model of every task provides, the runtime it is given, and vectors as the Immich server stores them."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import orjson
from PIL import Image

from immich_ml.errors import NonFiniteOutput, WrongInput
from immich_ml.inference.batcher import Batcher, BatcherSnapshot, BatchMetrics
from immich_ml.inference.sessions import CPU, Feeds, OnnxSession, SessionFactory
from immich_ml.inference.sizing import concurrent_batches
from immich_ml.inference.threads import ThreadPool, in_background_thread
from immich_ml.models.tasks import ModelKey
from immich_ml.settings import Settings

__all__ = ["InferenceModel", "Outputs", "Payload", "Runtime", "SessionBatcher", "vector_string"]

T = TypeVar("T")

Payload = Image.Image | str
"""What a request carries to a model: a decoded RGB image, or query text."""

Outputs = list[np.ndarray]
"""A graph's outputs for one input, in the graph's order, each with the input's leading axis of rows."""

SessionBatcher = Batcher[Feeds, Outputs]
"""A batcher that runs one session on the feeds of concurrent calls (`OnnxSession.run_rows`)."""


@dataclass
class Runtime:
    """Shared services a model uses: settings, session creation, the thread pool, batchers."""

    settings: Settings
    sessions: SessionFactory
    pool: ThreadPool
    batch_metrics: BatchMetrics | None = None
    image_pool: ThreadPool | None = None
    """Where bulk (image) work runs: decoding, pre- and post-processing, at MACHINE_LEARNING_BULK_NICENESS, so
    a text query's tokenising never queues behind photos being decoded and indexing yields the cores to it.
    None: `pool` does everything."""

    @property
    def images(self) -> ThreadPool:
        """The pool for image work (`image_pool`, else `pool`)."""
        return self.image_pool or self.pool

    def batcher(
        self,
        name: str,
        session: OnnxSession,
        read: Callable[[Outputs], T],
        *,
        max_batch: int,
        split: bool,
        concurrency: int,
        niceness: int,
    ) -> Batcher[Feeds, T]:
        """A batcher that runs `session` on up to `max_batch` inputs at once (`OnnxSession.run_rows`, in the
        batcher's own threads) and gives each caller `read` of its outputs, with the configured delay, queue
        size and metrics.

        With batching turned off (MACHINE_LEARNING_BATCHING=false) a batch holds one call's inputs only (a
        photo's faces still run together, as upstream runs them), never inputs of different requests.
        """
        return Batcher(
            name,
            functools.partial(session.run_rows, read=read, max_rows=max_batch, split=split),
            max_batch=max_batch,
            max_delay_s=self.settings.batch_delay_ms / 1000,
            gather_s=self.settings.batch_gather_ms / 1000,
            queue_size=self.settings.queue_size,
            admission_wait_s=self.settings.admission_wait_s,
            concurrency=concurrency,
            niceness=niceness,
            across_calls=self.settings.batching,
            metrics=self.batch_metrics,
        )


class InferenceModel(ABC):
    """One model of one task and type: its files, its session, and its pre- and post-processing.

    `load` is blocking and runs in a worker thread; `predict` runs on the event loop and sends every
    blocking step to the thread pool or to the model's batcher. Models that serve a waiting user set
    `interactive`; the others (bulk indexing) run their inference threads at a lower CPU priority
    (MACHINE_LEARNING_BULK_NICENESS), so a search query is not stuck behind a library scan.
    """

    interactive: ClassVar[bool] = False
    shares_threads: ClassVar[bool] = False
    """Whether batches of this model that run at once share the session's intra-op threads (a lone batch gets
    all of them) instead of each getting an equal part. Sharing suits one-image-per-request models, whose lone
    request can only go faster with more threads; an equal part each suits face and OCR pipelines, where
    two requests' runs are usually in flight together and one-thread runs side by side cost about 30 % less
    CPU per image than runs sharing two threads (docs/benchmarks.md)."""

    input_size_varies: ClassVar[bool] = False
    """Whether the graph's input takes each image's own size (OCR detection), rather than a fixed size with a
    batch axis: its session then plans no memory pattern, which would keep a block of activations per size."""

    def __init__(self, key: ModelKey, model_dir: Path, runtime: Runtime) -> None:
        self.key = key
        self.model_dir = model_dir
        self.runtime = runtime
        self.session: OnnxSession | None = None
        self.batchers: list[Batcher[Feeds, Any]] = []
        self.pool: ThreadPool = runtime.pool if self.interactive else runtime.images
        """The thread pool for this model's pre- and post-processing: the normal one for interactive models,
        the image pool for bulk ones. Steps go in with `loop.run_in_executor(self.pool, …)`."""

    @property
    def model_path(self) -> Path:
        """The ONNX file this model loads."""
        return self.model_dir / "model.onnx"

    @property
    def min_image_side(self) -> int | None:
        """The smallest image side this model's pre-processing needs; None when it needs full resolution."""
        return None

    @property
    def providers(self) -> list[str]:
        """The execution providers in use (empty before `load`)."""
        return self.session.providers if self.session else []

    def batcher_snapshots(self) -> list[BatcherSnapshot]:
        """The state of each of this model's batchers (queue depth, running batch, counters)."""
        return [batcher.snapshot() for batcher in self.batchers]

    @property
    def queue_depth(self) -> int:
        """Inputs waiting in this model's batchers."""
        return sum(snapshot.depth for snapshot in self.batcher_snapshots())

    @property
    def batch_size(self) -> int:
        """The configured inputs per session run for this model type (MACHINE_LEARNING_MAX_BATCH_SIZE__*)."""
        return self.runtime.settings.max_batch_size(self.key.task, self.key.type)

    def stacks_inputs(self) -> bool:
        """Whether the loaded graph can run several inputs stacked into one batch; overridden where not."""
        return True

    @property
    def max_batch(self) -> int:
        """The one decision on how many inputs a batcher stacks: `batch_size`, or 1 for a graph that cannot
        stack inputs. (With batching off, the inputs stacked all come from one call: `Runtime.batcher`.)"""
        return self.batch_size if self.stacks_inputs() else 1

    def add_batcher(self) -> SessionBatcher:
        """A batcher of up to `max_batch` inputs for this model's session; closed with the model."""
        return self.add_reading_batcher(list)  # each caller's outputs as its run made them

    def add_reading_batcher(self, read: Callable[[Outputs], T]) -> Batcher[Feeds, T]:
        """`add_batcher` whose callers get `read` of their outputs, computed in the batcher's thread right
        after their run: large outputs are then gone before the next run, instead of waiting in ONNX Runtime's
        memory until a request's last input is done."""
        batcher = self.runtime.batcher(
            str(self.key),
            self._require_session(),
            read,
            max_batch=self.max_batch,
            split=self.stacks_inputs(),
            concurrency=self.concurrent_batches,
            niceness=self.niceness,
        )
        self.batchers.append(batcher)
        return batcher

    @property
    def concurrent_batches(self) -> int:
        """How many batches of this model may run at once (their threads: `shares_threads`).

        Interactive models: 1 (a query gets all threads). Bulk models: MACHINE_LEARNING_CONCURRENT_BATCHES, or
        by default 2 on the CPU (two requests in flight run side by side instead of one waiting while the
        other decodes; 1 with a single usable CPU, `sizing.concurrent_batches`) and 1 on a GPU.
        """
        if self.interactive:
            return 1
        if self._require_session().providers[0] == CPU or self.runtime.settings.concurrent_batches:
            return concurrent_batches(self.runtime.settings)
        return 1

    @property
    def niceness(self) -> int:
        """How many steps below normal CPU priority this model's inference threads run."""
        return 0 if self.interactive else self.runtime.settings.bulk_niceness

    def create_session(self, path: Path, *, cache_key: str) -> OnnxSession:
        """A session whose inference threads run at this model's CPU priority. Blocking."""
        # The session does not exist yet: split as for the CPU (the factory ignores it for GPU sessions).
        split = 1 if self.shares_threads or self.interactive else concurrent_batches(self.runtime.settings)
        return in_background_thread(
            lambda: self.runtime.sessions.create(
                path,
                cache_key=cache_key,
                split_between=split,
                interactive=self.interactive,
                input_size_varies=self.input_size_varies,
            ),
            self.niceness,
        )

    def load(self) -> None:
        """Read the model's files and create its session(s). Blocking."""
        self.session = self.create_session(self.model_path, cache_key=str(self.key))
        self.configure()

    def configure(self) -> None:  # noqa: B027 - an optional hook, empty unless a model has side files
        """Read side files (configs, tokenisers) once the session exists; override where needed."""

    @abstractmethod
    async def predict(self, payload: Payload, options: Mapping[str, Any], dependency: Any = None) -> Any:
        """Run the model on one request's input; returns this model's part of the response."""

    @abstractmethod
    def warmup_payload(self) -> Payload:
        """A small input that exercises the whole model once (used before reporting ready)."""

    async def warmup(self) -> None:
        """Run one inference so the first real request does not pay for lazy initialisation."""
        await self.predict(self.warmup_payload(), {})

    async def close(self) -> None:
        """Finish queued work and release the session."""
        for batcher in self.batchers:
            await batcher.close()
        self.batchers.clear()
        self.session = None

    def image_of(self, payload: Payload) -> Image.Image:
        """The payload as an image; text sent to an image model is a client error."""
        if not isinstance(payload, Image.Image):
            raise WrongInput(f"{self.key.task} {self.key.type} ({self.key.name}) needs an image, not text")
        return payload

    def text_of(self, payload: Payload) -> str:
        """The payload as query text; an image sent to a text model is a client error."""
        if not isinstance(payload, str):
            raise WrongInput(f"{self.key.task} {self.key.type} ({self.key.name}) needs text, not an image")
        return payload

    def dependency_of(self, dependency: object, kind: type[T]) -> T:
        """The first model's output that this (second) model consumes; anything else is a bug."""
        if not isinstance(dependency, kind):
            raise TypeError(f"{self.key} got {type(dependency).__name__} instead of {kind.__name__}. This is a bug.")
        return dependency

    def _require_session(self) -> OnnxSession:
        if self.session is None:
            raise RuntimeError(f"{self.key} used before load. This is a bug.")
        return self.session


def vector_string(vector: np.ndarray) -> str:
    """Encode a 1-D vector as the `[a,b,…]` JSON-array string the Immich server stores verbatim (float32,
    shortest form), refusing NaN and infinity."""
    vector = np.ascontiguousarray(vector, dtype=np.float32)
    if not np.isfinite(vector).all():
        raise NonFiniteOutput("model output contains NaN or infinity")
    return orjson.dumps(vector, option=orjson.OPT_SERIALIZE_NUMPY).decode()
