"""Cross-request batching: stacking, per-caller results, failure isolation, backpressure and bulk priority."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from aiohttp.test_utils import TestClient

from immich_ml.cpus import CpuBudget
from immich_ml.errors import ConfigError, Overloaded
from immich_ml.http.appkeys import REGISTRY
from immich_ml.inference.batcher import Batcher
from immich_ml.inference.sessions import SessionFactory
from immich_ml.inference.threads import in_background_thread
from immich_ml.models.tasks import ModelKey, ModelType, Task
from immich_ml.settings import Settings
from tests import modelgen
from tests.conftest import TEXTUAL, VISUAL, ClientFactory, predict_form, wait_for

VISUAL_KEY = ModelKey(Task.CLIP, ModelType.VISUAL, "ViT-B-32__openai")


class GatedRun:
    """A blocking `run` that records each batch and holds the first one until `release()`."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        self.gate.wait()
        if self.fail_on in items:
            raise ValueError(f"bad input {self.fail_on}")
        return [item * 10 for item in items]

    async def wait_running(self) -> None:
        await asyncio.to_thread(self.started.wait)

    def release(self) -> None:
        self.gate.set()


async def start_blocked(batcher: Batcher[int, int], run: GatedRun) -> asyncio.Task[int]:
    """Submit input 0 and return once its batch is running (and holding the session)."""
    first = asyncio.create_task(batcher.submit(0))
    await run.wait_running()
    return first


async def queued(batcher: Batcher[int, int], count: int) -> None:
    """Wait until `count` inputs are queued behind the running batch."""
    await wait_for(lambda: batcher.snapshot().depth >= count, f"{count} queued inputs", timeout_s=10)


async def test_inputs_arriving_while_a_batch_runs_are_stacked_up_to_max_batch() -> None:
    run = GatedRun()
    batcher = Batcher("test", run, max_batch=3, max_delay_s=0)
    first = await start_blocked(batcher, run)
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
    await queued(batcher, 5)
    run.release()
    assert [await first, *await asyncio.gather(*rest)] == [0, 10, 20, 30, 40, 50]
    assert run.batches == [[0], [1, 2, 3], [4, 5]]
    assert dict(batcher.snapshot().sizes) == {1: 1, 3: 1, 2: 1}
    assert batcher.snapshot().peak_depth == 5
    await batcher.close()


async def test_inputs_within_the_delay_join_one_batch() -> None:
    run = GatedRun()
    run.release()
    batcher = Batcher("test", run, max_batch=8, max_delay_s=5.0)  # the batch closes when full, not by the clock
    assert await asyncio.gather(*(batcher.submit(i) for i in range(8))) == [i * 10 for i in range(8)]
    assert run.batches == [list(range(8))]
    await batcher.close()


async def test_submit_many_from_different_callers_share_a_batch_in_order() -> None:
    run = GatedRun()
    batcher = Batcher("test", run, max_batch=16, max_delay_s=0)
    first = await start_blocked(batcher, run)
    faces_a = asyncio.create_task(batcher.submit_many([1, 2]))
    faces_b = asyncio.create_task(batcher.submit_many([3, 4, 5]))
    await queued(batcher, 5)
    run.release()
    assert (await first, await faces_a, await faces_b) == (0, [10, 20], [30, 40, 50])
    assert run.batches == [[0], [1, 2, 3, 4, 5]]
    await batcher.close()


async def test_a_failed_batch_fails_only_its_own_inputs() -> None:
    run = GatedRun(fail_on=0)
    batcher = Batcher("test", run, max_batch=4, max_delay_s=0)
    first = await start_blocked(batcher, run)
    later = asyncio.create_task(batcher.submit_many([1, 2]))
    await queued(batcher, 2)
    run.release()
    with pytest.raises(ValueError, match="bad input 0"):
        await first
    assert await later == [10, 20]
    assert (batcher.snapshot().batches, batcher.snapshot().items) == (1, 2)
    await batcher.close()


async def test_a_full_queue_refuses_new_inputs_and_keeps_the_admitted_ones() -> None:
    run = GatedRun()
    batcher = Batcher("test", run, max_batch=8, max_delay_s=0, queue_size=3)
    first = await start_blocked(batcher, run)
    admitted = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
    await queued(batcher, 3)
    with pytest.raises(Overloaded) as refused:
        await batcher.submit(4)
    assert refused.value.status == 503 and refused.value.retry_after_s >= 1
    with pytest.raises(Overloaded):  # all of a multi-input call or none of it
        await batcher.submit_many([5, 6])
    run.release()
    assert [await first, *await asyncio.gather(*admitted)] == [0, 10, 20, 30]
    assert (batcher.snapshot().rejected, batcher.snapshot().peak_depth) == (3, 3)
    await batcher.close()


async def test_a_full_queue_admits_an_input_that_waited_for_room() -> None:
    run = GatedRun()
    batcher = Batcher("test", run, max_batch=1, max_delay_s=0, queue_size=2, admission_wait_s=60)
    first = await start_blocked(batcher, run)
    admitted = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await queued(batcher, 2)
    waiting = asyncio.create_task(batcher.submit(3))  # the queue is full: it waits instead of failing
    await asyncio.sleep(0)
    assert not waiting.done() and batcher.snapshot().depth == 2
    run.release()
    assert [await first, *await asyncio.gather(*admitted), await waiting] == [0, 10, 20, 30]
    assert batcher.snapshot().rejected == 0
    await batcher.close()


async def test_close_finishes_queued_inputs() -> None:
    run = GatedRun()
    batcher = Batcher("test", run, max_batch=2, max_delay_s=0)
    first = await start_blocked(batcher, run)
    rest = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
    await queued(batcher, 3)
    closing = asyncio.create_task(batcher.close())
    run.release()
    await closing
    assert [await first, *await asyncio.gather(*rest)] == [0, 10, 20, 30]


def _niceness_of(thread_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread_id)


async def test_bulk_batcher_thread_runs_at_lower_priority() -> None:
    base = _niceness_of(threading.get_native_id())
    if base + 5 > 19:
        pytest.skip("already at the lowest priority")
    seen: list[int] = []

    def run(items: list[int]) -> list[int]:
        seen.append(_niceness_of(threading.get_native_id()))
        return items

    bulk = Batcher("bulk", run, max_batch=1, niceness=5)
    interactive = Batcher("interactive", run, max_batch=1)
    await bulk.submit(1)
    await interactive.submit(1)
    assert seen == [base + 5, base]
    await bulk.close()
    await interactive.close()


def test_bulk_session_threads_inherit_the_lower_priority(tmp_path: Path) -> None:
    model = modelgen.write_clip(tmp_path, "ViT-B-32__openai") / "visual" / "model.onnx"
    base = _niceness_of(threading.get_native_id())
    if base + 7 > 19:
        pytest.skip("already at the lowest priority")

    def threads() -> dict[int, int]:
        niceness = {}
        for tid in map(int, os.listdir("/proc/self/task")):
            try:
                niceness[tid] = _niceness_of(tid)
            except ProcessLookupError:  # a thread of an earlier test that has just exited
                continue
        return niceness

    def create() -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    before = threads()
    session = in_background_thread(create, 7)
    pool = {tid: nice for tid, nice in threads().items() if tid not in before}
    assert pool and set(pool.values()) == {base + 7}  # ONNX Runtime's intra-op thread
    assert _niceness_of(threading.get_native_id()) == base
    del session


async def test_without_batching_across_calls_a_batch_holds_one_calls_inputs() -> None:
    """MACHINE_LEARNING_BATCHING=false: a photo's faces still run together, never with another photo's."""
    batches: list[list[int]] = []
    gate = threading.Event()

    def run(items: list[int]) -> list[int]:
        gate.wait()
        batches.append(list(items))
        return [item * 10 for item in items]

    batcher = Batcher("test", run, max_batch=4, max_delay_s=0.05, across_calls=False)
    first = asyncio.create_task(batcher.submit(0))  # runs alone; the calls below queue behind it
    await asyncio.sleep(0)
    calls = [asyncio.create_task(batcher.submit_many(items)) for items in ([1, 2, 3], [4, 5], [6, 7, 8, 9, 10])]
    while batcher.snapshot().depth < 10:
        await asyncio.sleep(0.001)
    gate.set()
    assert await first == 0
    assert [await call for call in calls] == [[10, 20, 30], [40, 50], [60, 70, 80, 90, 100]]
    assert batches == [[0], [1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    await batcher.close()


def test_batching_can_be_turned_off() -> None:
    settings = Settings.from_env({"MACHINE_LEARNING_BATCHING": "false", "MACHINE_LEARNING_BULK_NICENESS": "0"})
    assert (settings.batching, settings.bulk_niceness) == (False, 0)
    with pytest.raises(ConfigError, match="MACHINE_LEARNING_BULK_NICENESS"):
        Settings.from_env({"MACHINE_LEARNING_BULK_NICENESS": "25"})


# -- over HTTP, with a real generated CLIP graph ------------------------------------------------------------------


async def embed(client: TestClient[Any, Any], image: bytes) -> tuple[int, np.ndarray | None, str | None]:
    """Status, embedding (on 200) and Retry-After (on 503) of one visual request."""
    async with client.post("/predict", data=predict_form(VISUAL, image=image)) as resp:
        body = await resp.json()
        vector = np.asarray(json.loads(body["clip"])) if resp.status == 200 else None
        return resp.status, vector, resp.headers.get("Retry-After")


@pytest.fixture
def images() -> list[bytes]:
    return [modelgen.jpeg_bytes(modelgen.make_gradient_image(160 + 8 * i, 120, seed=i)) for i in range(8)]


@pytest.mark.parametrize("batching", [True, False])
async def test_concurrent_requests_each_get_their_own_embedding(
    make_client: ClientFactory, clip_cache: Path, images: list[bytes], batching: bool
) -> None:
    client = await make_client(batch_delay_ms=100, batching=batching, concurrent_batches=1)  # one slot: stacks
    alone = [(await embed(client, image))[1] for image in images]
    order = [i % len(images) for i in range(3 * len(images))]
    together = await asyncio.gather(*(embed(client, images[i]) for i in order))
    for i, (status, vector, _) in zip(order, together, strict=True):
        assert status == 200
        np.testing.assert_allclose(vector, alone[i], atol=1e-5)
    assert client.app is not None
    stats = client.app[REGISTRY].loaded()[VISUAL_KEY].batchers[0].snapshot()
    if batching:
        assert max(stats.sizes) > 1, f"no batch was stacked: {stats.sizes}"
    else:  # MACHINE_LEARNING_BATCHING=false: one call (here one input) per run
        assert set(stats.sizes) == {1}, stats.sizes


async def test_a_flood_gets_results_or_503_and_nothing_else(
    make_client: ClientFactory, cache: Path, images: list[bytes]
) -> None:
    modelgen.write_clip(cache, "ViT-B-32__openai", image_size=896)  # a slower graph, so the queue fills
    client = await make_client(
        queue_size=2,
        max_batch_clip=1,
        batch_delay_ms=0,
        concurrent_batches=1,
        request_threads=8,
        bulk_niceness=0,
        admission_wait_s=0,  # refused at once: the flood must overflow the queue
    )
    alone = [(await embed(client, image))[1] for image in images]
    order = [i % len(images) for i in range(40)]
    outcomes = await asyncio.gather(*(embed(client, images[i]) for i in order))
    statuses = [status for status, _, _ in outcomes]
    assert set(statuses) == {200, 503}, statuses
    for i, (status, vector, retry_after) in zip(order, outcomes, strict=True):
        if status == 200:
            np.testing.assert_allclose(vector, alone[i], atol=1e-5)
        else:
            assert retry_after is not None and int(retry_after) >= 1
    assert client.app is not None
    stats = client.app[REGISTRY].loaded()[VISUAL_KEY].batchers[0].snapshot()
    assert stats.rejected == statuses.count(503)
    assert stats.items == len(images) + statuses.count(200)


@pytest.mark.parametrize(
    ("value", "interactive", "expected"), [(None, False, "0"), ("true", False, "1"), (None, True, "1")]
)
def test_idle_inference_threads_sleep_unless_spinning_is_asked_for_or_a_user_waits(
    tmp_path: Path, value: str | None, interactive: bool, expected: str
) -> None:
    model = modelgen.write_clip(tmp_path, "ViT-B-32__openai") / "visual" / "model.onnx"
    env = {"MACHINE_LEARNING_PROVIDER": "cpu"} | ({"MACHINE_LEARNING_MODEL_THREAD_SPINNING": value} if value else {})
    session = SessionFactory(Settings.from_env(env)).create(model, cache_key="clip/visual", interactive=interactive)
    options = session._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == expected


async def test_a_lone_caller_does_not_wait_for_the_delay() -> None:
    run = GatedRun()
    run.release()
    batcher = Batcher("test", run, max_batch=8, max_delay_s=600)
    assert await asyncio.wait_for(batcher.submit(1), timeout=60) == 10
    assert await asyncio.wait_for(batcher.submit(2), timeout=60) == 20
    assert run.batches == [[1], [2]]
    await batcher.close()


async def test_when_inputs_wait_the_batch_stays_open_for_stragglers() -> None:
    run = GatedRun()
    batcher = Batcher("test", run, max_batch=3, max_delay_s=600)
    first = await start_blocked(batcher, run)
    waiting = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await queued(batcher, 2)
    run.release()
    assert await first == 0
    snapshot = batcher.snapshot
    # the second batch took 1 and 2 and waits for more
    await wait_for(lambda: snapshot().batches >= 1 and not snapshot().depth, "the second batch", timeout_s=10)
    straggler = asyncio.create_task(batcher.submit(3))
    assert await asyncio.gather(*waiting, straggler) == [10, 20, 30]
    assert run.batches == [[0], [1, 2, 3]]
    await batcher.close()


async def gathering(
    run: GatedRun,
) -> tuple[Batcher[int, int], asyncio.Future[int], asyncio.Task[int], asyncio.Task[int]]:
    """A batcher whose batch holds input 1 and waits for an input still being prepared: the batcher, the
    preparation (a future to resolve), and the tasks of the input on its way and of input 1."""
    batcher = Batcher("test", run, max_batch=8, max_delay_s=0, gather_s=600)
    prepared: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    on_its_way = asyncio.create_task(batcher.submit_prepared(prepared))
    await asyncio.sleep(0)  # submit_prepared has counted it
    first = asyncio.create_task(batcher.submit(1))
    await wait_for(lambda: not batcher.snapshot().depth, "the first input taken for a batch", timeout_s=10)
    return batcher, prepared, on_its_way, first


async def test_a_batch_gathers_an_input_still_being_prepared() -> None:
    run = GatedRun()
    run.release()
    batcher, prepared, on_its_way, first = await gathering(run)
    assert run.batches == []  # the batch waits for the input on its way
    prepared.set_result(2)
    assert await asyncio.gather(first, on_its_way) == [10, 20]
    assert run.batches == [[1, 2]]
    await batcher.close()


async def test_a_batch_stops_gathering_when_a_preparation_fails() -> None:
    run = GatedRun()
    run.release()
    batcher, prepared, on_its_way, first = await gathering(run)
    prepared.set_exception(ValueError("undecodable"))
    with pytest.raises(ValueError, match="undecodable"):
        await on_its_way
    assert await asyncio.wait_for(first, timeout=60) == 10  # long before gather_s: nothing is on its way
    assert run.batches == [[1]]
    await batcher.close()


async def test_with_concurrency_two_batches_run_at_once() -> None:
    begun = threading.Semaphore(0)
    gate = threading.Event()
    batches: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        batches.append(list(items))
        begun.release()
        gate.wait()
        return [item * 10 for item in items]

    batcher = Batcher("test", run, max_batch=4, max_delay_s=0, concurrency=2)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.to_thread(begun.acquire)
    second = asyncio.create_task(batcher.submit(2))
    await asyncio.to_thread(begun.acquire)  # the second batch started while the first still runs
    assert batcher.snapshot().running_for_s is not None
    gate.set()
    assert (await first, await second) == (10, 20)
    assert batches == [[1], [2]]
    await batcher.close()


@pytest.mark.parametrize(
    ("cpus", "threads", "batches"),
    [(1, 1, 1), (2, 2, 2), (16, 8, 2)],  # half the usable CPUs per model, at least upstream's 2 where there are 2
)
async def test_concurrent_bulk_batches_share_the_intra_op_threads(
    make_client: ClientFactory, clip_cache: Path, images: list[bytes], cpus: int, threads: int, batches: int
) -> None:
    client = await make_client(provider="cpu", cpus=CpuBudget(affinity=cpus, quota=None))
    assert (await embed(client, images[0]))[0] == 200
    async with client.post(
        "/predict", data=predict_form('{"clip":{"textual":{"modelName":"ViT-B-32__openai"}}}', text="a cat")
    ) as resp:
        assert resp.status == 200
    assert client.app is not None
    models = client.app[REGISTRY].loaded()
    visual, textual = models[VISUAL_KEY], models[ModelKey(Task.CLIP, ModelType.TEXTUAL, "ViT-B-32__openai")]
    assert [b.concurrency for b in visual.batchers] == [batches]
    assert [b.concurrency for b in textual.batchers] == [1]  # interactive: one run with all threads
    sessions = {name: model.session for name, model in (("visual", visual), ("textual", textual))}
    # Shared by the concurrent batches: one alone gets them all.
    assert {name: session.intra_op_threads for name, session in sessions.items() if session} == {
        "visual": threads,
        "textual": threads,
    }


@pytest.mark.parametrize(
    ("cpus", "configured", "expected", "batches"),
    [
        (2, {}, 1, 2),
        (2, {"intra_op_threads": 2}, 2, 2),
        (8, {}, 2, 2),
        (1, {}, 1, 1),
        (1, {"concurrent_batches": 3}, 1, 3),
    ],
)
async def test_face_batches_that_run_at_once_each_get_a_part_of_the_threads(
    make_client: ClientFactory, cache: Path, cpus: int, configured: dict[str, int], expected: int, batches: int
) -> None:
    """By default face batches at once each get a part of the model's half of the usable CPUs; an explicit
    thread count is kept per session, an explicit batch count whatever the CPUs."""
    modelgen.write_scrfd(cache, "buffalo_l", faces=[modelgen.Face()])
    modelgen.write_arcface(cache, "buffalo_l")
    client = await make_client(provider="cpu", cpus=CpuBudget(affinity=cpus, quota=None), **configured)
    entries = json.dumps(
        {"facial-recognition": {"detection": {"modelName": "buffalo_l"}, "recognition": {"modelName": "buffalo_l"}}}
    )
    image = modelgen.jpeg_bytes(modelgen.make_gradient_image(640, 480))
    async with client.post("/predict", data=predict_form(entries, image=image)) as resp:
        assert resp.status == 200
        assert len((await resp.json())["facial-recognition"]) == 1
    assert client.app is not None
    models = client.app[REGISTRY].loaded()
    assert len(models) == 2
    for model in models.values():
        assert [b.concurrency for b in model.batchers] == [batches]
        assert model.session is not None and model.session.intra_op_threads == expected


async def test_image_work_runs_in_its_own_lower_priority_pool(
    make_client: ClientFactory, clip_cache: Path, images: list[bytes]
) -> None:
    """Decoding photos never holds up a text query's tokenising, and yields the cores to it."""
    client = await make_client(bulk_niceness=5, request_threads=2)
    assert (await embed(client, images[0]))[0] == 200
    async with client.post("/predict", data=predict_form(TEXTUAL, text="a cat")) as resp:
        assert resp.status == 200
    assert client.app is not None
    runtime = client.app[REGISTRY].runtime
    assert runtime.images is not runtime.pool
    base = _niceness_of(threading.get_native_id())
    image_threads = [t.native_id for t in runtime.images._threads]
    query_threads = [t.native_id for t in runtime.pool._threads]
    assert image_threads and query_threads
    assert {_niceness_of(t) for t in image_threads if t is not None} == {min(19, base + 5)}
    assert {_niceness_of(t) for t in query_threads if t is not None} == {base}
