"""Run blocking work off the event loop, in the shared pre-processing pool."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["Workers"]

P = ParamSpec("P")
R = TypeVar("R")


class Workers:
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
