"""What every model of every task provides, and the runtime it is given."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
from PIL import Image

from immich_ml.errors import WrongInput
from immich_ml.inference.batcher import Batcher, BatcherSnapshot
from immich_ml.inference.sessions import OnnxSession, SessionFactory
from immich_ml.inference.threads import ThreadPool, in_background_thread
from immich_ml.models.tasks import ModelKey
from immich_ml.settings import Settings

__all__ = ["InferenceModel", "Payload", "Runtime", "stack"]

In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")

Payload = Image.Image | str
"""What a request carries to a model: a decoded RGB image, or query text."""


@dataclass
class Runtime:
    """Shared services a model uses: settings, session creation, the thread pool, batchers."""

    settings: Settings
    sessions: SessionFactory
    pool: ThreadPool
    on_batch: Callable[[str, int, float], None] | None = None

    def batcher(
        self,
        name: str,
        run: Callable[[list[In]], Sequence[Out]],
        *,
        max_batch: int,
        concurrency: int = 1,
        niceness: int = 0,
    ) -> Batcher[In, Out]:
        """A batcher for one session, with the configured delay, queue size and metrics hook."""
        return Batcher(
            name,
            run,
            max_batch=max_batch,
            max_delay_s=self.settings.batch_delay_ms / 1000,
            queue_size=self.settings.queue_size,
            concurrency=concurrency,
            niceness=niceness,
            on_batch=self.on_batch,
        )


class InferenceModel(ABC):
    """One model of one task and type: its files, its session, and its pre- and post-processing.

    `load` is blocking and runs in a worker thread; `predict` runs on the event loop and sends every
    blocking step to the thread pool or to the model's batcher. Models that serve a waiting user set
    `interactive`; the others (bulk indexing) run their inference threads at a lower CPU priority
    (MACHINE_LEARNING_BULK_NICENESS), so a search query is not stuck behind a library scan.
    """

    interactive: ClassVar[bool] = False

    def __init__(self, key: ModelKey, model_dir: Path, runtime: Runtime) -> None:
        self.key = key
        self.model_dir = model_dir
        self.runtime = runtime
        self.session: OnnxSession | None = None
        self.batchers: list[Batcher[Any, Any]] = []

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
        """The one decision on how many inputs a batcher stacks: `batch_size`, or 1 with batching turned
        off (MACHINE_LEARNING_BATCHING=false) or a graph that cannot stack inputs."""
        return self.batch_size if self.runtime.settings.batching and self.stacks_inputs() else 1

    def add_batcher(self, run: Callable[[list[In]], Sequence[Out]], *, stage: str = "") -> Batcher[In, Out]:
        """A batcher of up to `max_batch` inputs for one of this model's session runs; closed with the model."""
        name = f"{self.key}{'/' + stage if stage else ''}"
        batcher = self.runtime.batcher(
            name, run, max_batch=self.max_batch, concurrency=self.concurrent_batches, niceness=self.niceness
        )
        self.batchers.append(batcher)
        return batcher

    @property
    def concurrent_batches(self) -> int:
        """How many batches of this model may run at once (bulk models: MACHINE_LEARNING_CONCURRENT_BATCHES)."""
        return 1 if self.interactive else self.runtime.settings.concurrent_batches

    @property
    def niceness(self) -> int:
        """How many steps below normal CPU priority this model's inference threads run."""
        return 0 if self.interactive else self.runtime.settings.bulk_niceness

    def create_session(self, path: Path, *, cache_key: str) -> OnnxSession:
        """A session whose inference threads run at this model's CPU priority. Blocking."""
        return in_background_thread(
            lambda: self.runtime.sessions.create(path, cache_key=cache_key, runs=self.concurrent_batches), self.niceness
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


def stack(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-request inputs into one batch array."""
    return np.stack(rows) if len(rows) > 1 else rows[0][None]
