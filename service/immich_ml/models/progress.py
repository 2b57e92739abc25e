"""Downloads in progress: bytes so far, expected total and rate, for the log, a terminal bar and `/health`.

A transfer is measured by what has arrived on disk under its folders (polled), so any downloader works the
same: the hub client's `.incomplete` files and our own `.part` files both count. A downloader that learns the
total size says so with `Transfer.expect`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from immich_ml.log import MODELS_LOG as log

__all__ = ["LogReport", "Progress", "ProgressListener", "TerminalBar", "Transfer", "Transfers"]

_MB = 1000**2


@dataclass(frozen=True)
class Progress:
    """One download at one moment."""

    model: str
    done_bytes: int
    total_bytes: int | None
    seconds: float

    @property
    def fraction(self) -> float | None:
        """Share done (0 to 1), when the total is known."""
        if not self.total_bytes:
            return None
        return min(1.0, self.done_bytes / self.total_bytes)

    @property
    def bytes_per_second(self) -> float:
        return self.done_bytes / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """`40% (690.2 of 1725.4 MB) at 12.5 MB/s`, or without the share when the total is unknown."""
        rate = f"at {self.bytes_per_second / _MB:.1f} MB/s"
        if self.fraction is None or self.total_bytes is None:
            return f"{self.done_bytes / _MB:.1f} MB {rate}"
        return f"{self.fraction:.0%} ({self.done_bytes / _MB:.1f} of {self.total_bytes / _MB:.1f} MB) {rate}"

    def as_json(self) -> dict[str, object]:
        """The `/health` entry."""
        fraction = self.fraction
        return {
            "model": self.model,
            "doneBytes": self.done_bytes,
            "totalBytes": self.total_bytes,
            "percent": None if fraction is None else round(fraction * 100, 1),
            "bytesPerSecond": round(self.bytes_per_second),
            "seconds": round(self.seconds, 1),
        }


ProgressListener = Callable[[Progress, bool], None]
"""Called with the latest progress about once per poll, and once more with `finished=True`."""


class Transfer:
    """One download being watched."""

    def __init__(self, model: str, folders: Sequence[Path]) -> None:
        self.model = model
        self._folders = tuple(folders)
        self._baseline = self._on_disk()
        self._started = time.monotonic()
        self._total: int | None = None

    def expect(self, total_bytes: int) -> None:
        """The downloader's word on how many bytes will arrive."""
        self._total = total_bytes if total_bytes > 0 else None

    def progress(self) -> Progress:
        done = max(0, self._on_disk() - self._baseline)
        return Progress(self.model, done, self._total, time.monotonic() - self._started)

    def _on_disk(self) -> int:
        total = 0
        for folder in self._folders:
            for path in folder.rglob("*") if folder.is_dir() else ():
                try:
                    total += path.stat().st_size if path.is_file() else 0
                except OSError:  # renamed or removed between listing and stat: counted in its new place
                    pass
        return total


class Transfers:
    """The downloads of one model store, each polled by a small thread that tells the listeners."""

    def __init__(self, listeners: Sequence[ProgressListener] = (), *, poll_s: float = 0.5) -> None:
        self.listeners = list(listeners)
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._active: list[Transfer] = []

    def active(self) -> list[Progress]:
        """Downloads in progress now."""
        with self._lock:
            transfers = list(self._active)
        return [transfer.progress() for transfer in transfers]

    @contextmanager
    def watch(self, model: str, folders: Sequence[Path]) -> Iterator[Transfer]:
        """Watch a download for as long as the block runs."""
        transfer = Transfer(model, folders)
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(transfer, stop), name=f"progress {model}", daemon=True)
        with self._lock:
            self._active.append(transfer)
        poller.start()
        try:
            yield transfer
        finally:
            stop.set()
            poller.join()
            with self._lock:
                self._active.remove(transfer)
        self._tell(transfer.progress(), finished=True)

    def _poll(self, transfer: Transfer, stop: threading.Event) -> None:
        while not stop.wait(self._poll_s):
            self._tell(transfer.progress(), finished=False)

    def _tell(self, progress: Progress, *, finished: bool) -> None:
        for listener in self.listeners:
            listener(progress, finished)


class LogReport:
    """Log lines for the daemon's journal: every `every_s` seconds or 10 % steps, whichever comes first."""

    def __init__(self, every_s: float = 5.0) -> None:
        self._every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}  # model → (time of the last line, tenths reported)

    def __call__(self, progress: Progress, finished: bool) -> None:
        if finished:
            self._last.pop(progress.model, None)
            log.info("downloaded %s: %.1f MB in %.0f s", progress.model, progress.done_bytes / _MB, progress.seconds)
            return
        if progress.done_bytes == 0:
            return
        last_time, last_tenth = self._last.get(progress.model, (0.0, -1))
        tenth = -1 if progress.fraction is None else int(progress.fraction * 10)
        if tenth > last_tenth or time.monotonic() - last_time >= self._every_s:
            self._last[progress.model] = (time.monotonic(), tenth)
            log.info("downloading %s: %s", progress.model, progress.describe())


class TerminalBar:
    """A progress bar redrawn in place on a terminal (`immich-ml models pull`)."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self._stream = stream
        self._width = width

    def __call__(self, progress: Progress, finished: bool) -> None:
        if progress.done_bytes == 0 and not finished:
            return  # nothing arrived yet: no bar of question marks
        fraction = progress.fraction
        filled = round((1.0 if finished else fraction or 0.0) * self._width)
        bar = "#" * filled + "-" * (self._width - filled) if fraction is not None or finished else "?" * self._width
        self._stream.write(f"\r{progress.model} [{bar}] {progress.describe()}\033[K" + ("\n" if finished else ""))
        self._stream.flush()
