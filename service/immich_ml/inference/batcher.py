"""Per-model dynamic batching: concurrent calls for one session are stacked into single runs."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prometheus_client import Histogram

from immich_ml.errors import Overloaded, ShuttingDown
from immich_ml.inference.threads import start_thread
from immich_ml.log import BATCHER_LOG as log

__all__ = ["BatchMetrics", "Batcher", "BatcherSnapshot"]

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Item(Generic[In, Out]):
    payload: In
    future: asyncio.Future[Out]
    followers: int = 0
    """How many inputs of the same call are queued right behind this one."""


@dataclass
class _Counters:
    """What a batcher has done so far; mutated on the event loop only."""

    batches: int = 0
    items: int = 0
    last_batch_size: int = 0
    sizes: Counter[int] = field(default_factory=Counter)
    peak_depth: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class BatchMetrics:
    """The Prometheus histograms every finished batch is recorded in, labelled by batcher name. The batcher
    observes them itself (prometheus-client is thread-safe), so inference never calls back into the HTTP layer."""

    size: Histogram
    seconds: Histogram

    def of(self, batcher: str) -> BatchMetrics:
        """The histograms of one batcher (its label values)."""
        return BatchMetrics(self.size.labels(batcher), self.seconds.labels(batcher))


@dataclass(frozen=True)
class BatcherSnapshot:
    """One batcher at one moment: what `/health`, the metrics and the watchdog read, instead of its internals."""

    name: str
    depth: int
    """Inputs waiting for a batch (not counting those running)."""
    running_for_s: float | None
    """How long the oldest batch now running has run; None when idle."""
    batches: int
    items: int
    last_batch_size: int
    sizes: dict[int, int]
    """How many batches had each size."""
    peak_depth: int
    """The most inputs ever waiting at once."""
    rejected: int
    """Inputs refused with 503 because the queue was full."""


class Batcher(Generic[In, Out]):
    """Stack concurrent calls for one model into single session runs.

    `run` is blocking: it gets a list of inputs and returns one output per input, in order. It runs in
    the batcher's own threads, at most `concurrency` batches at once (with 1, one session never runs two
    batches at once), and the event loop never blocks. Items that arrive while batches run join the next
    batch, up to `max_batch`. When more inputs already wait behind the first one, the batch also stays
    open up to `max_delay_s` for stragglers; when inputs are on their way (`submit_prepared`: a caller still
    decoding its image), it stays open up to `gather_s` for them, since one run of several inputs costs less
    than one run each. A lone or pipelined caller never pays either delay. With
    `across_calls` false, a batch holds inputs of one `submit_many` call only (up to `max_batch`). A failed
    run fails every item in it and nothing else.

    Admission is bounded: when `queue_size` inputs already wait, `submit` waits up to `admission_wait_s` for
    room (the Immich server never retries, so a short wait beats a refusal), then raises `Overloaded` (503
    with `Retry-After`); an input once admitted always gets its output or its batch's error.
    `niceness` > 0 runs the batcher's threads that many steps below normal CPU priority (bulk work that
    must yield the cores to interactive queries).
    """

    def __init__(
        self,
        name: str,
        run: Callable[[list[In]], Sequence[Out]],
        *,
        max_batch: int,
        max_delay_s: float = 0.002,
        gather_s: float = 0.0,
        queue_size: int = 256,
        admission_wait_s: float = 0.0,
        concurrency: int = 1,
        niceness: int = 0,
        across_calls: bool = True,
        metrics: BatchMetrics | None = None,
    ) -> None:
        self.name = name
        self.max_batch = max(1, max_batch)
        self.across_calls = across_calls
        self.max_delay_s = max_delay_s
        self.gather_s = gather_s
        self._on_the_way = 0
        """Inputs being prepared by `submit_prepared` callers, not yet queued."""
        self._news = asyncio.Event()
        """Set when an input is queued or stops being on its way (a gathering batch looks again)."""
        self.queue_size = queue_size
        self.admission_wait_s = admission_wait_s
        self._room = asyncio.Event()
        """Set whenever inputs leave the queue for a batch (a caller waiting for room looks again)."""
        self.concurrency = max(1, concurrency)
        self._stats = _Counters()
        self._run = run
        self._metrics = metrics.of(name) if metrics is not None else None
        self._queue: asyncio.Queue[_Item[In, Out]] = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._running: dict[asyncio.Task[None], float] = {}
        self._executor = ThreadPoolExecutor(
            max_workers=self.concurrency,
            thread_name_prefix=f"infer-{name}",
            initializer=start_thread,
            initargs=(f"infer-{name}", niceness),
        )
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def snapshot(self) -> BatcherSnapshot:
        """Queue depth, the running batch's age and the counters so far, copied."""
        running_since = min(self._running.values(), default=None)
        stats = self._stats
        return BatcherSnapshot(
            name=self.name,
            depth=self._queue.qsize(),
            running_for_s=None if running_since is None else time.monotonic() - running_since,
            batches=stats.batches,
            items=stats.items,
            last_batch_size=stats.last_batch_size,
            sizes=dict(stats.sizes),
            peak_depth=stats.peak_depth,
            rejected=stats.rejected,
        )

    async def submit(self, payload: In) -> Out:
        """Queue one input and wait for its own output."""
        (result,) = await self.submit_many([payload])
        return result

    async def submit_prepared(self, prepare: Awaitable[In]) -> Out:
        """Submit the input `prepare` computes, counting it as on its way meanwhile: a batch that starts before
        it is ready waits up to `gather_s` for it."""
        self._on_the_way += 1
        try:
            payload = await prepare
        finally:
            self._on_the_way -= 1
            self._news.set()
        return await self.submit(payload)

    async def submit_many(self, payloads: Sequence[In]) -> list[Out]:
        """Queue several inputs at once (all admitted or none) and wait for their outputs, in order."""
        if self._closing:
            raise ShuttingDown(f"{self.name} is shutting down")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.admission_wait_s
        while (waiting := self._queue.qsize()) + len(payloads) > self.queue_size and waiting > 0:
            # full (one oversized call alone is admitted): wait for room, up to the deadline
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), deadline - loop.time())
            except TimeoutError:
                self._stats.rejected += len(payloads)
                raise Overloaded(
                    f"{self.name}: queue full ({waiting} waiting) for {self.admission_wait_s:g} s; retry later"
                ) from None
        self._ensure_started()
        items = [
            _Item[In, Out](payload, loop.create_future(), len(payloads) - 1 - i) for i, payload in enumerate(payloads)
        ]
        for item in items:
            self._queue.put_nowait(item)
        self._news.set()
        self._stats.peak_depth = max(self._stats.peak_depth, self._queue.qsize())
        return list(await asyncio.gather(*(item.future for item in items)))

    async def close(self) -> None:
        """Stop admitting, finish everything already queued, then stop the worker thread."""
        self._closing = True
        if self._task is not None:
            await self._queue.join()
            task, self._task = self._task, None
            task.cancel()
            # Waited for without gather, whose future would keep the task, and through its cancellation's
            # traceback this batcher and its session, alive for as long as the future lives.
            await asyncio.wait({task})
        self._executor.shutdown(wait=True)

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"batcher-{self.name}")

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            batch = [await self._queue.get()]
            if not self.across_calls:  # the call's own inputs only, which are queued right behind its first
                batch += [self._queue.get_nowait() for _ in range(min(batch[0].followers, self.max_batch - 1))]
                self._start(loop, batch)
                continue
            now = loop.time()
            stragglers_until = now + (self.max_delay_s if not self._queue.empty() else 0.0)
            gather_until = now + self.gather_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                deadline = max(stragglers_until, gather_until if self._on_the_way else now)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._news.clear()
                try:
                    await asyncio.wait_for(self._news.wait(), remaining)
                except TimeoutError:
                    break
            self._start(loop, batch)

    def _start(self, loop: asyncio.AbstractEventLoop, batch: list[_Item[In, Out]]) -> None:
        self._room.set()
        task = loop.create_task(self._run_batch(loop, batch), name=f"batch-{self.name}")
        self._running[task] = time.monotonic()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        del self._running[task]
        self._slots.release()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item[In, Out]]) -> None:
        try:
            if live := [item for item in batch if not item.future.done()]:  # skip callers that left
                await self._run_live(loop, live)
        finally:
            for _ in batch:
                self._queue.task_done()

    async def _run_live(self, loop: asyncio.AbstractEventLoop, live: list[_Item[In, Out]]) -> None:
        started = time.monotonic()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run, [i.payload for i in live])
            if len(outputs) != len(live):
                raise RuntimeError(f"{self.name}: {len(outputs)} outputs for {len(live)} inputs. This is a bug.")
        except Exception as error:  # every caller in the batch gets the error; the batcher lives on
            log.warning("%s: batch of %d failed: %s", self.name, len(live), error)
            for item in live:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        for item, output in zip(live, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(output)
        self._stats.batches += 1
        self._stats.items += len(live)
        self._stats.last_batch_size = len(live)
        self._stats.sizes[len(live)] += 1
        if self._metrics is not None:
            self._metrics.size.observe(len(live))
            self._metrics.seconds.observe(time.monotonic() - started)
