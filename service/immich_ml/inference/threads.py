"""Run blocking work off the event loop, in the shared thread pool, and at a chosen CPU priority."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from immich_ml.log import SERVER_LOG as log

__all__ = ["ThreadPool", "in_background_thread", "lower_thread_priority"]


P = ParamSpec("P")
R = TypeVar("R")


class ThreadPool:
    """The thread pool for decoding, pre- and post-processing and model loading."""

    def __init__(self, threads: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="immich-ml")

    async def run(self, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Call `func` in the pool and await its result."""
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    def shutdown(self) -> None:
        """Wait for running work and stop the threads."""
        self.executor.shutdown(wait=True, cancel_futures=False)


def lower_thread_priority(niceness: int) -> None:
    """Make the calling thread `niceness` steps nicer than it is (Linux nice values are per thread).

    Threads it starts later inherit the value. Raising niceness needs no privilege; where the OS refuses,
    the thread keeps its priority and a warning says so.
    """
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + niceness))
    except OSError as error:
        log.warning("could not lower the priority of bulk inference threads: %s", error)


def in_background_thread(func: Callable[[], R], niceness: int) -> R:
    """Call `func` in a fresh thread `niceness` steps below normal priority and return its result.

    Used to create bulk sessions: ONNX Runtime starts its intra-op threads in the session constructor, so
    they inherit the lower priority, while sessions for interactive queries keep the normal one.
    """
    if niceness <= 0:
        return func()
    with ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="immich-ml-bulk", initializer=lower_thread_priority, initargs=(niceness,)
    ) as pool:
        return pool.submit(func).result()
