"""Loaded models: one session build at a time, retry after corruption, preload, and unloading after a TTL."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from immich_ml.errors import CorruptModel, ImmichMLError, ModelLoadFailed, ModelUnavailable, UnknownModel
from immich_ml.inference.sessions import release_shared_arena
from immich_ml.log import MODELS_LOG as log
from immich_ml.memory import large_blocks_mapped, resident_bytes, return_freed_memory, return_heap
from immich_ml.models.catalog import is_known
from immich_ml.models.store import ModelStore
from immich_ml.models.tasks import ModelKey
from immich_ml.pipelines import MODEL_CLASSES, InferenceModel
from immich_ml.pipelines.base import Runtime

__all__ = ["ModelRegistry"]


_FAILURE_MEMORY_S = 60.0


@dataclass
class _Entry:
    model: InferenceModel
    pinned: bool
    last_used: float
    active: int = 0
    load_seconds: float = 0.0


class ModelRegistry:
    """Hands out loaded models by key, loading each at most once at a time and unloading idle ones."""

    def __init__(self, store: ModelStore, runtime: Runtime) -> None:
        self.store = store
        self.runtime = runtime
        self._entries: dict[ModelKey, _Entry] = {}
        self._locks: dict[ModelKey, asyncio.Lock] = {}
        self._failures: dict[ModelKey, tuple[float, ModelLoadFailed]] = {}
        self._memory: dict[ModelKey, int] = {}
        self._building = asyncio.Lock()
        """Sessions are built one at a time: their transient memory never adds up, and each model's share of
        the resident memory is measurable."""

    @asynccontextmanager
    async def use(self, key: ModelKey) -> AsyncIterator[InferenceModel]:
        """Yield the loaded model for `key`; it is not unloaded while in use."""
        entry = await self._entry(key, pinned=False)
        entry.active += 1
        try:
            yield entry.model
        finally:
            entry.active -= 1
            entry.last_used = time.monotonic()

    async def preload(self, keys: Iterable[ModelKey]) -> None:
        """Load and warm up models that never expire, before the daemon reports ready.

        The largest cached model loads first: building a session briefly needs about its file's size again
        (the parsed graph), and that peak is lowest while little else is resident.
        """
        for key in sorted(keys, key=self._cached_size, reverse=True):
            entry = await self._entry(key, pinned=True)
            started = time.monotonic()
            await entry.model.warmup()
            log.info("warmed up %s in %.2f s", key, time.monotonic() - started)

    def loaded(self) -> dict[ModelKey, InferenceModel]:
        """The models in memory now."""
        return {key: entry.model for key, entry in self._entries.items()}

    def _cached_size(self, key: ModelKey) -> int:
        """Bytes of the model's cached files (0 before it is downloaded)."""
        directory = self.store.model_dir(key)
        return sum(path.stat().st_size for path in directory.glob("*.onnx*")) if directory.is_dir() else 0

    def memory_bytes(self) -> dict[ModelKey, int]:
        """How much the resident memory grew while each loaded model's session was built."""
        return {key: self._memory.get(key, 0) for key in self._entries}

    def load_seconds(self) -> dict[ModelKey, float]:
        """How long each loaded model took to load (download included)."""
        return {key: entry.load_seconds for key, entry in self._entries.items()}

    async def unload_idle(self, ttl_s: float) -> list[ModelKey]:
        """Unload models unused for `ttl_s` seconds (never preloaded ones, never ones in use)."""
        now = time.monotonic()
        idle = [
            key for key, e in self._entries.items() if not e.pinned and e.active == 0 and now - e.last_used >= ttl_s
        ]
        for key in idle:
            await self._unload(key, now)
        if idle:  # the unloaded models are unreachable now: nothing here holds them
            await asyncio.get_running_loop().run_in_executor(self.runtime.pool, self._give_memory_back)
        return idle

    async def _unload(self, key: ModelKey, now: float) -> None:
        entry = self._entries.pop(key)
        self._memory.pop(key, None)
        await entry.model.close()
        log.info("unloaded %s after %.0f s idle", key, now - entry.last_used)

    def _give_memory_back(self) -> None:
        """After unloading: the unloaded sessions' memory in the shared arena and freed heap go back to the OS.
        Blocking (a collection, a run, `malloc_trim`): run it in a worker thread."""
        gc.collect()  # a session caught in a reference cycle frees its memory only now
        if self.runtime.sessions.uses_shared_arena:
            release_shared_arena()  # their activations (and weights), kept for the other models otherwise
        if self.runtime.settings.trim_memory:
            return_heap()

    async def evict_periodically(self) -> None:
        """Run `unload_idle` every poll interval, forever (a background task)."""
        settings = self.runtime.settings
        if settings.model_ttl_s <= 0 or settings.model_ttl_poll_s <= 0:
            return
        while True:
            await asyncio.sleep(settings.model_ttl_poll_s)
            await self.unload_idle(settings.model_ttl_s)

    async def close(self) -> None:
        """Finish queued work of every model and unload them all."""
        entries, self._entries = self._entries, {}
        await asyncio.gather(*(entry.model.close() for entry in entries.values()))

    async def _entry(self, key: ModelKey, *, pinned: bool) -> _Entry:
        if (entry := self._entries.get(key)) is not None:
            entry.pinned |= pinned
            entry.last_used = time.monotonic()
            return entry
        async with self._locks.setdefault(key, asyncio.Lock()):
            if (entry := self._entries.get(key)) is None:
                started = time.monotonic()
                model = await self._load(key)
                entry = _Entry(model, pinned, time.monotonic(), load_seconds=time.monotonic() - started)
                self._entries[key] = entry
            entry.pinned |= pinned
            return entry

    async def _load(self, key: ModelKey) -> InferenceModel:
        model_class = MODEL_CLASSES.get((key.task, key.type))
        if model_class is None or not (is_known(key) or self.store.is_cached(key)):
            relative = self.store.model_dir(key).relative_to(self.store.root)
            raise UnknownModel(
                f"Unknown model '{key.name}' for {key.task} {key.type}; see the supported models in docs/models.md, "
                f"or place an export in the model cache at {relative}/",
                log_detail=f"unknown model {key}; an export would go to {self.store.model_dir(key)}",
            )
        if (failure := self._failures.get(key)) and time.monotonic() - failure[0] < _FAILURE_MEMORY_S:
            raise ModelLoadFailed(f"{failure[1].detail} (retrying later)", log_detail=failure[1].log_detail)
        try:
            model = await self._load_or_repair(model_class, key)
        except ModelLoadFailed as error:
            self._failures[key] = (time.monotonic(), error)
            raise
        self._failures.pop(key, None)
        return model

    async def _load_or_repair(self, model_class: type[InferenceModel], key: ModelKey) -> InferenceModel:
        """Load; a damaged file (and only that file) is downloaded again once, when a download is possible."""
        try:
            return await self._load_files(model_class, key)
        except CorruptModel as damage:
            file = self._relative(key, damage.path)
            if not self.store.can_download(key):
                raise self._failed(
                    key,
                    f"{file} is damaged ({damage.reason}) and HF_HUB_OFFLINE forbids "
                    "downloading it again; replace it with `immich-ml models import`",
                    damage,
                ) from None
            log.info("%s: %s is damaged (%s); downloading that file again", key, file, damage.reason)
            try:
                await asyncio.get_running_loop().run_in_executor(self.runtime.pool, self.store.repair, key, file)
            except ModelUnavailable as error:
                raise self._failed(key, f"{file} is damaged and downloading it again failed", error) from None
            except OSError as error:  # a read-only or unwritable cache: nothing can be replaced
                raise self._failed(
                    key,
                    f"{file} is damaged and the model cache is not writable "
                    f"(read-only or permission denied: {error.strerror})",
                    error,
                ) from None
        try:
            return await self._load_files(model_class, key)
        except CorruptModel as damage:
            again = self._relative(key, damage.path)
            raise self._failed(key, f"{again} is still damaged after downloading it again", damage) from None

    async def _load_files(self, model_class: type[InferenceModel], key: ModelKey) -> InferenceModel:
        """Find or download the files and create the model. Damage raises `CorruptModel`; any other failure
        (configuration, provider, GPU memory) is a `ModelLoadFailed` that leaves the files alone."""
        loop, pool = asyncio.get_running_loop(), self.runtime.pool
        model = model_class(key, await loop.run_in_executor(pool, self.store.ensure, key), self.runtime)
        try:
            async with self._building:
                trim = self.runtime.settings.trim_memory
                if trim:  # freed pages left from before would hide part of this model's growth
                    await loop.run_in_executor(pool, return_freed_memory)
                before = resident_bytes()
                with large_blocks_mapped() if trim else nullcontext():
                    await loop.run_in_executor(pool, model.load)
                if trim:
                    await loop.run_in_executor(pool, return_freed_memory)
                self._memory[key] = max(0, resident_bytes() - before)
        except (CorruptModel, ImmichMLError):
            await model.close()
            raise
        except Exception as error:
            await model.close()
            raise self._failed(key, f"{type(error).__name__}: {error}", error) from error
        return model

    def _failed(self, key: ModelKey, reason: str, cause: BaseException) -> ModelLoadFailed:
        """A load failure whose reply names the cause without server paths; the log gets the paths."""
        return ModelLoadFailed(
            f"Failed to load model '{key.name}' ({key.task} {key.type}): {self.store.redact(reason)}",
            log_detail=f"failed to load {key}: {reason} [{cause}]",
        )

    def _relative(self, key: ModelKey, path: str) -> str:
        """A damaged file's path within its model (`visual/model.onnx`, `config.json`)."""
        try:
            return str(Path(path).relative_to(self.store.model_root(key)))
        except ValueError:
            return Path(path).name
