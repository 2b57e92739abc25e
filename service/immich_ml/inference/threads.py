"""Thread pools for blocking work off the event loop, at a chosen CPU priority."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from immich_ml.log import SERVER_LOG as log

__all__ = ["SESSION_THREADS", "ThreadPool", "in_background_thread", "lower_thread_priority", "start_thread"]


R = TypeVar("R")

SESSION_THREADS = "immich-ml-ort"
"""The OS name of ONNX Runtime's threads (set on the thread that creates a session; its threads inherit it)."""


class ThreadPool(ThreadPoolExecutor):
    """An executor for blocking work (decoding, pre- and post-processing, model loading) whose threads all run
    `niceness` steps below normal CPU priority. Work goes in with the event loop's own
    `loop.run_in_executor(pool, func, *args)`, called where the work is decided, so no wrapper of ours sits
    between a step and the code that asked for it."""

    def __init__(self, threads: int, *, niceness: int = 0, name: str = "immich-ml-query") -> None:
        super().__init__(
            max_workers=max(1, threads),
            thread_name_prefix=name,
            initializer=start_thread,
            initargs=(name, niceness),
        )


def start_thread(name: str, niceness: int) -> None:
    """Name the calling thread for the OS (`top -H`, /proc/PID/task/TID/comm: at most 15 characters) and
    lower its priority by `niceness`. A pool's initializer."""
    try:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[:15])
    except OSError:
        pass  # not Linux, or /proc not mounted: the thread keeps its name
    lower_thread_priority(niceness)


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
    """Call `func` in a fresh thread named `SESSION_THREADS`, `niceness` steps below normal priority, and
    return its result.

    Used to create sessions: ONNX Runtime starts its intra-op threads in the session constructor, so they
    inherit the name and, for bulk sessions, the lower priority, while sessions for interactive queries keep
    the normal one.
    """
    with ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix=SESSION_THREADS,
        initializer=start_thread,
        initargs=(SESSION_THREADS, niceness),
    ) as pool:
        return pool.submit(func).result()
