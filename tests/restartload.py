"""A load like the Immich server's (tests/immichload.mjs under Node) and what it saw across restarts.

A restart counts when, at the stop signal, at least one request was in flight (the daemon logs how many) and at
least one more was sent before the new instance was ready and answered after (it waited in the socket's
backlog). Times are wall-clock seconds (Node's and Python's clocks agree on one machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import modelgen
from tests.conftest import CLIP
from tests.daemonproc import Endpoint, write_slow_clip

__all__ = [
    "RESTARTS",
    "ImmichLoad",
    "Restart",
    "expect_alone",
    "immich_requests",
    "in_flight_at_stops",
    "in_flight_now",
    "loaded_cache",
    "report",
    "summary",
]

CLIENT = Path(__file__).with_name("immichload.mjs")
SLOW = "ViT-B-16__openai"
TEXT = {"clip": {"textual": {"modelName": CLIP}}}


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

    def steady(self, port: int, since_s: float) -> None:
        """Until at least 6 requests were answered since `since_s` and the daemon on `port` has a request in
        flight: the moment to interrupt it."""
        while True:
            self.wait(lambda load: sum(r["end"] > since_s * 1000 for r in load.done) >= 6)
            self.wait(lambda load: "slow" in load.in_flight.values())
            if in_flight_now(port) >= 1:  # sent, arrived, and not answered yet
                return

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


RESTARTS = 20
FACES = "buffalo_l"


def immich_requests(tmp_path: Path) -> list[dict[str, Any]]:
    """The requests an Immich server sends while indexing and searching, on a few generated previews."""
    images = []
    for seed in range(2):
        path = tmp_path / f"preview-{seed}.jpg"
        path.write_bytes(modelgen.jpeg_bytes(modelgen.make_gradient_image(1440, 1080, seed=seed), quality=80))
        images.append(str(path))
    faces = {"detection": {"modelName": FACES, "options": {"minScore": 0.7}}, "recognition": {"modelName": FACES}}
    return [
        *({"kind": "index", "entries": {"clip": {"visual": {"modelName": CLIP}}}, "image": i} for i in images),
        *({"kind": "search", "entries": TEXT, "text": text} for text in ("a dog on a beach", "ein Hund")),
        {"kind": "slow", "entries": {"clip": {"visual": {"modelName": SLOW}}}, "image": images[0]},
        {"kind": "faces", "entries": {"facial-recognition": faces}, "image": images[1]},
    ]


def loaded_cache(cache: Path) -> dict[str, str]:
    """Generated models for every request of `immich_requests`, and the settings that preload them all."""
    modelgen.write_clip(cache, CLIP)
    write_slow_clip(cache, SLOW, iterations=400)  # a request of about 0.3 s keeps one in flight
    modelgen.write_scrfd(cache, FACES)
    modelgen.write_arcface(cache, FACES)
    return {
        "MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": f"{CLIP},{SLOW}",
        "MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": CLIP,
        "MACHINE_LEARNING_PRELOAD__FACIAL_RECOGNITION__DETECTION": FACES,
        "MACHINE_LEARNING_PRELOAD__FACIAL_RECOGNITION__RECOGNITION": FACES,
    }


def expect_alone(port: int, requests: list[dict[str, Any]]) -> None:
    """Each request's answer from the daemon on `port` when sent alone, as `expected`."""
    endpoint = Endpoint("127.0.0.1", port)
    for request in requests:
        image = Path(request["image"]).read_bytes() if "image" in request else None
        status, answer = endpoint.predict(request["entries"], image=image, text=request.get("text"))
        assert status == 200, answer
        request["expected"] = answer


def in_flight_now(port: int) -> int:
    """The requests in flight in the daemon on `port` now (its `/health`)."""
    return int(Endpoint("127.0.0.1", port).health()["inFlight"])


def in_flight_at_stops(log: str) -> list[int]:
    """The requests in flight at each stop signal, as the daemon logged them."""
    return [int(count) for count in re.findall(r"accepting no more; (\d+) request", log)]


def report(setting: str, result: dict[str, Any]) -> None:
    """Print the restarts' figures; also write them to $IMMICH_ML_RESTARTS_REPORT_DIR when set (for the docs)."""
    print(f"{setting}: {json.dumps(result)}")
    if target := os.environ.get("IMMICH_ML_RESTARTS_REPORT_DIR"):
        (Path(target) / f"restarts-{setting}.json").write_text(json.dumps(result, indent=1) + "\n")
