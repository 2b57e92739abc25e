#!/usr/bin/env python3
"""Which immich_ml modules one warm request runs code in, and which module calls which: a CLIP image, a CLIP
text, a face and an OCR request.

The daemon's serving stack (aiohttp's `AppRunner` behind `TrackedSite`, the connection tracker) listens on a
loopback port with generated models (tests/modelgen.py, so run it from the repository with the test
dependencies: `.venv/bin/python scripts/request_path.py [--json PATH]`). A keep-alive client sends each
request twice; the first loads the model, the second is traced: every Python call in every thread
(`sys.setprofile`, `threading.setprofile` set before any thread starts). The thread pools start their threads
lazily; they are all started first, as in a daemon that has served a while, so no traced request starts one.

A new frame of an immich_ml module is one call of that module; a coroutine resuming is not. Its caller is the
nearest immich_ml frame below it, skipping library frames (asyncio, contextlib, functools). A frame with none
below it (an asyncio task's first step, a thread-pool job, a loop callback) is called by the module that
scheduled it: the nearest immich_ml frame when `create_task`, `call_soon`, `call_at`,
`call_soon_threadsafe`, `ThreadPoolExecutor.submit` or `Thread.start` was called for it, or that registered it with
`add_done_callback`; by "outside" if no module did (the event loop delivering bytes, aiohttp dispatching a
request). A module with more than one distinct caller is entered from more than one place; one caller
calling it many times is one edge. The old measure, every new frame called from another file, is printed as
a total for comparison. docs/architecture.md quotes the output.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dis
import functools
import inspect
import json
import socket
import sys
import tempfile
import threading
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from immich_ml.http.app import create_app  # noqa: E402
from immich_ml.http.appkeys import CONNECTIONS, REGISTRY  # noqa: E402
from immich_ml.http.connections import Connections, TrackedSite  # noqa: E402
from immich_ml.settings import Settings  # noqa: E402
from tests import modelgen, ocrimages  # noqa: E402
from tests.conftest import predict_form  # noqa: E402

CLIP = "ViT-B-32__openai"
OCR = "PP-OCRv5_mobile"
FACE = modelgen.Face(stride=16, cell_x=12, cell_y=14, anchor=0, score=0.92, distances=(40.3, 48.0, 40.0, 56.2))
OUTSIDE = "outside"

_SCHEDULERS: dict[CodeType, str] = {
    asyncio.BaseEventLoop.create_task.__code__: "coro",
    asyncio.BaseEventLoop.call_soon.__code__: "callback",
    asyncio.BaseEventLoop.call_at.__code__: "callback",  # call_later calls it
    asyncio.BaseEventLoop.call_soon_threadsafe.__code__: "callback",
    concurrent.futures.ThreadPoolExecutor.submit.__code__: "fn",  # run_in_executor calls it
    threading.Thread.start.__code__: "self",  # a pool's new thread runs its initializer
}
"""asyncio's, concurrent.futures' and threading's Python-level scheduling functions → the argument that is scheduled.
(`asyncio.Task` and `Future` are C: a task's first step is scheduled through `create_task`.)"""
_RESUMABLE = inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


@functools.cache
def _first_resume(code: CodeType) -> int:
    """Where a generator or coroutine frame stands when it first starts; a later position is a resumption."""
    return next(i.offset for i in dis.get_instructions(code) if i.opname == "RESUME")


def _code_of(scheduled: object) -> CodeType | None:
    """The code a scheduled callable will run: through partials and bound methods."""
    if isinstance(scheduled, threading.Thread):
        scheduled = getattr(scheduled, "_target", None) or scheduled.run
    while isinstance(scheduled, functools.partial):
        scheduled = scheduled.func
    scheduled = getattr(scheduled, "__func__", scheduled)
    code = getattr(scheduled, "__code__", None)
    return code if isinstance(code, CodeType) else None


class Tracer:
    """A profile hook that builds the call graph between the modules of one package, scheduling included."""

    def __init__(self, package: str = "immich_ml") -> None:
        self.on = False
        self._marker = f"/{package}/"
        self._modules: dict[CodeType, str | None] = {}
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded."""
        self.files: set[str] = set()
        """Modules that ran code (resumed coroutines included)."""
        self.edges: Counter[tuple[str, str]] = Counter()
        """(caller, module) → calls."""
        self.old_entries = 0
        """New frames called from another file (the old measure)."""
        self._coroutines: dict[int, tuple[FrameType, str]] = {}  # a scheduled coroutine's frame → its scheduler
        self._callables: dict[CodeType, deque[str]] = {}  # a scheduled callable's code → its schedulers, in order
        self._roots: dict[int, tuple[FrameType, str]] = {}  # a library frame running scheduled work → its scheduler
        self._done_callbacks: dict[int, tuple[object, str]] = {}  # a future → the module adding done callbacks

    def summary(self) -> dict[str, Any]:
        """Files, edges, the modules entered from more than one place, and the old measure, as plain data."""
        callers: dict[str, set[str]] = {}
        for caller, module in self.edges:
            callers.setdefault(module, set()).add(caller)
        return {
            "files": sorted(self.files),
            "edges": [{"caller": c, "module": m, "calls": n} for (c, m), n in sorted(self.edges.items())],
            "entered_from_more_than_one_place": {m: sorted(c) for m, c in sorted(callers.items()) if len(c) > 1},
            "old_entries_from_another_file": self.old_entries,
        }

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if not self.on:
            return
        if event == "c_call":
            if getattr(arg, "__name__", None) == "add_done_callback" and (module := self._nearest(frame)):
                future = getattr(arg, "__self__", None)
                with self._lock:
                    self._done_callbacks[id(future)] = (future, module)
            return
        if event != "call":
            return
        code = frame.f_code
        if (argument := _SCHEDULERS.get(code)) is not None:
            self._scheduled(frame, frame.f_locals.get(argument))
            return
        if (module := self._module(code)) is None:
            return
        with self._lock:
            self.files.add(module)
            if code.co_flags & _RESUMABLE and frame.f_lasti > _first_resume(code):
                return  # a coroutine or generator resuming, not a new call
            below = frame.f_back
            if below is None or below.f_code.co_filename != code.co_filename:
                self.old_entries += 1
            caller = self._nearest(below) or self._scheduler(frame)
            if caller != module:
                self.edges[caller, module] += 1

    def _module(self, code: CodeType) -> str | None:
        if code not in self._modules:
            path = code.co_filename
            self._modules[code] = path.split(self._marker, 1)[1] if self._marker in path else None
        return self._modules[code]

    def _nearest(self, frame: FrameType | None) -> str | None:
        """The module of the nearest frame of the package at or below `frame`."""
        while frame is not None:
            if module := self._module(frame.f_code):
                return module
            frame = frame.f_back
        return None

    def _scheduled(self, frame: FrameType, scheduled: object) -> None:
        """`frame` is a scheduling function's: remember who scheduled what it was given."""
        scheduler = self._nearest(frame)
        args = frame.f_locals.get("args") or ()
        with self._lock:
            if scheduler is None and args and id(args[0]) in self._done_callbacks:
                scheduler = self._done_callbacks[id(args[0])][1]  # a future's done callback, run by the loop
            scheduler = scheduler or OUTSIDE
            if (coroutine := getattr(scheduled, "cr_frame", None)) is not None:
                self._coroutines[id(coroutine)] = (coroutine, scheduler)
            elif (code := _code_of(scheduled)) is not None:
                self._callables.setdefault(code, deque()).append(scheduler)

    def _scheduler(self, frame: FrameType | None) -> str:
        """Who scheduled the work `frame` runs in: the first frame at or below it that was scheduled."""
        while frame is not None:
            for known in (self._coroutines, self._roots):
                if (entry := known.get(id(frame))) is not None and entry[0] is frame:
                    return entry[1]
            if pending := self._callables.get(frame.f_code):
                self._roots[id(frame)] = (frame, pending.popleft())
                return self._roots[id(frame)][1]
            frame = frame.f_back
        return OUTSIDE


@contextmanager
def tracing(tracer: Tracer) -> Iterator[None]:
    """Install `tracer` in this thread and in every thread started meanwhile (it starts switched off)."""
    sys.setprofile(tracer)
    threading.setprofile(tracer)
    try:
        yield
    finally:
        tracer.on = False
        sys.setprofile(None)
        threading.setprofile(None)


async def _settled(connections: Connections) -> None:
    """Wait until the daemon has finished every request (read, not called: that would be traced), and the
    callbacks they left have run."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while connections.in_flight and loop.time() < deadline:
        await asyncio.sleep(0)
    await asyncio.sleep(0)


def _order(edges: list[dict[str, Any]]) -> dict[str, int]:
    """Each module's distance from "outside" along the edges (breadth first), for printing in path order."""
    rank = {OUTSIDE: 0}
    frontier = [OUTSIDE]
    while frontier:
        frontier = [e["module"] for e in edges if e["caller"] in frontier and e["module"] not in rank]
        for module in frontier:
            rank.setdefault(module, len(rank))
    return rank


def describe(name: str, path: dict[str, Any]) -> str:
    """The human-readable report of one request's path."""
    lines = [
        f"{name}: {len(path['files'])} files, {len(path['edges'])} edges "
        f"(old measure: {path['old_entries_from_another_file']} entries from another file)",
        "  entered from more than one place:" + ("" if path["entered_from_more_than_one_place"] else " none"),
    ]
    lines += [f"    {m} ← {', '.join(c)}" for m, c in path["entered_from_more_than_one_place"].items()]
    lines.append("  calls:")
    rank = _order(path["edges"])
    for edge in sorted(path["edges"], key=lambda e: (rank.get(e["caller"], len(rank)), e["module"])):
        lines.append(f"    {edge['caller']} → {edge['module']}" + (f" ×{edge['calls']}" if edge["calls"] > 1 else ""))
    return "\n".join(lines)


async def trace_requests(cache: Path) -> dict[str, dict[str, Any]]:
    """Serve the app like the daemon does and trace the second of two identical requests of each kind."""
    modelgen.write_clip(cache, CLIP)
    modelgen.write_scrfd(cache, "buffalo_l", [FACE])
    modelgen.write_arcface(cache, "buffalo_l")
    settings = Settings(cache_folder=cache, request_threads=2, model_ttl_poll_s=0, hf_offline=True)
    modelgen.write_ocr(cache, OCR)
    image = modelgen.png_bytes(modelgen.make_gradient_image(640, 480, seed=3))
    page = modelgen.png_bytes(ocrimages.render([("Smart search finds text", (20, 30)), ("in photos", (20, 100))])[0])
    faces = {"detection": {"modelName": "buffalo_l"}, "recognition": {"modelName": "buffalo_l"}}
    requests: dict[str, tuple[str, dict[str, Any]]] = {
        "CLIP visual": (json.dumps({"clip": {"visual": {"modelName": CLIP}}}), {"image": image}),
        "CLIP textual": (json.dumps({"clip": {"textual": {"modelName": CLIP}}}), {"text": "a photo"}),
        "faces": (json.dumps({"facial-recognition": faces}), {"image": image}),
        "OCR": (
            json.dumps({"ocr": {"detection": {"modelName": OCR}, "recognition": {"modelName": OCR}}}),
            {"image": page},
        ),
    }
    tracer = Tracer()
    paths: dict[str, dict[str, Any]] = {}
    with tracing(tracer):  # before the app starts its threads, so they all inherit it
        app = create_app(settings)
        runner = web.AppRunner(app, keepalive_timeout=settings.keepalive_s, access_log=None)
        await runner.setup()
        listener = socket.create_server(("127.0.0.1", 0))
        site = TrackedSite(runner, listener, app[CONNECTIONS], ssl_context=None)
        await site.start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/predict"
        _start_pool_threads(app)
        try:
            async with aiohttp.ClientSession() as client:  # one keep-alive connection for every request
                for name, (entries, payload) in requests.items():
                    for traced in (False, True):  # the first request loads the model
                        tracer.reset()
                        tracer.on = traced
                        async with client.post(url, data=predict_form(entries, **payload)) as response:
                            assert response.status == 200, await response.text()
                            await response.read()
                        await _settled(app[CONNECTIONS])
                        tracer.on = False
                    paths[name] = tracer.summary()
        finally:
            await runner.cleanup()
    return paths


def _start_pool_threads(app: web.Application) -> None:
    """Start every thread of the daemon's two thread pools (each waits for all the others)."""
    runtime = app[REGISTRY].runtime
    for pool in (runtime.pool, runtime.images):
        barrier = threading.Barrier(pool._max_workers)
        concurrent.futures.wait([pool.submit(barrier.wait) for _ in range(pool._max_workers)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the paths as JSON to PATH")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        paths = asyncio.run(trace_requests(Path(folder)))
    print("\n".join(describe(name, path) for name, path in paths.items()))
    if options.json:
        options.json.write_text(json.dumps(paths, indent=2) + "\n")


if __name__ == "__main__":
    main()
