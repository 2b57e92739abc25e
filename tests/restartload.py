"""A load like the Immich server's (tests/immichload.mjs under Node) and what it saw across restarts.

A restart counts when, at the stop signal, at least one request was in flight (the daemon logs how many) and at
least one more was sent before the new instance was ready and answered after (it waited in the socket's
backlog). Times are wall-clock seconds (Node's and Python's clocks agree on one machine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ImmichLoad", "Restart", "summary"]

CLIENT = Path(__file__).with_name("immichload.mjs")


@dataclass
class Restart:
    """One restart: when it was signalled, how many requests the old instance had in flight then, when the new
    instance was ready."""

    signalled: float
    in_flight: int = 0
    ready: float = 0.0


@dataclass
class ImmichLoad:
    """Node's fetch sending `requests` (dicts with kind, entries, image or text, expected) `concurrency` at a time."""

    url: str
    requests: list[dict[str, Any]]
    workdir: Path
    concurrency: int = 3
    done: list[dict[str, Any]] = field(default_factory=list)
    in_flight: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        node = shutil.which("node")
        assert node, "Node.js is needed to play the Immich server (scripts/setup-venv --test installs it)"
        path = self.workdir / "requests.json"
        path.write_text(json.dumps(self.requests))
        self._changed = threading.Condition()
        self._stderr = (self.workdir / "immichload.err").open("w+")
        self.process = subprocess.Popen(
            [node, str(CLIENT), self.url, str(path), str(self.concurrency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = json.loads(line)
            with self._changed:
                if "sent" in event:
                    self.in_flight[event["sent"]] = event["kind"]
                else:
                    self.in_flight.pop(event["done"], None)
                    self.done.append(event)
                self._changed.notify_all()

    def wait(self, predicate: Any, timeout_s: float = 60) -> None:
        """Wait until `predicate(self)` holds (checked whenever a request is sent or answered)."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout_s):
                raise AssertionError(f"load: condition not met in {timeout_s} s; {len(self.done)} answered")

    def stop(self, timeout_s: float = 120) -> list[dict[str, Any]]:
        """Stop sending, wait for every answer; returns the records of all requests."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        try:
            code = self.process.wait(timeout_s)
            self._reader.join(10)
        finally:
            self.process.kill()
            self.process.stdout.close()
            self._stderr.seek(0)
            errors = self._stderr.read()
            self._stderr.close()
        assert code == 0, errors
        return self.done


def summary(records: list[dict[str, Any]], restarts: list[Restart]) -> dict[str, Any]:
    """What the restarts cost: counted restarts, failed requests, the longest request that overlapped a restart,
    and the most requests waiting in the backlog at a new instance's READY."""
    failed = [r for r in records if not r["ok"]]
    waiting = [
        [r for r in records if restart.signalled <= r["start"] / 1000 < restart.ready < r["end"] / 1000]
        for restart in restarts
    ]
    counted = [i for i, restart in enumerate(restarts) if restart.in_flight >= 1 and waiting[i]]
    overlapping = [
        (r["end"] - r["start"]) / 1000
        for r in records
        for restart in restarts
        if r["start"] / 1000 <= restart.ready and r["end"] / 1000 >= restart.signalled
    ]
    return {
        "requests": len(records),
        "failed": len(failed),
        "failures": failed[:5],
        "restarts": len(restarts),
        "counted": len(counted),
        "in_flight_at_signal": [restart.in_flight for restart in restarts],
        "waiting_at_ready": [len(w) for w in waiting],
        "peak_waiting_at_ready": max((len(w) for w in waiting), default=0),
        "restart_to_ready_s": [round(restart.ready - restart.signalled, 2) for restart in restarts],
        "longest_request_during_a_restart_s": round(max(overlapping, default=0.0), 2),
        "longest_request_s": round(max(((r["end"] - r["start"]) / 1000 for r in records), default=0.0), 2),
    }
