#!/usr/bin/env python3
"""What each kind of interruption costs an Immich-like client (issue 22), measured with the restart tests' load
(tests/immichload.mjs: Node's fetch, one URL, no retries, 4 requests in flight) against real daemons:

- crash: SIGKILL with the listening socket held (as systemd's socket unit holds it), the next daemon started at
  once on it (systemd waits RestartSec=5 first: that adds to the waiting, not to the failures);
- new socket: SIGTERM, then the next daemon binds the port anew once the old one has exited (a container image
  upgrade, or any restart without a held socket).

    PYTHONPATH=$PWD/service .venv/bin/python scripts/measure_interruptions.py [--rounds 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.daemonproc import Daemon  # noqa: E402
from tests.restartload import (  # noqa: E402
    ImmichLoad,
    Restart,
    expect_alone,
    immich_requests,
    in_flight_now,
    loaded_cache,
)


def _measure(scenario: str, rounds: int, scratch: Path) -> dict[str, object]:
    env = loaded_cache(scratch / "cache")
    listener = socket.create_server(("127.0.0.1", 0)) if scenario == "crash" else None
    daemon = Daemon(scratch, scratch / "cache", env, listener=listener)
    daemon.wait_ready()
    port = daemon.port
    requests = immich_requests(scratch)
    expect_alone(port, requests)
    load = ImmichLoad(f"http://127.0.0.1:{port}/", requests, scratch, concurrency=4)
    interruptions: list[Restart] = []
    try:
        for _ in range(rounds):
            load.steady(port, interruptions[-1].ready if interruptions else 0.0)
            interruptions.append(Restart(time.time(), in_flight=in_flight_now(port)))
            if scenario == "crash":
                daemon.process.send_signal(signal.SIGKILL)
                daemon.process.wait()
                daemon = Daemon(scratch, scratch / "cache", env, listener=listener)
            else:
                assert daemon.stop() == 0
                daemon = Daemon(scratch, scratch / "cache", env, port=port)
            daemon.wait_ready()
            interruptions[-1].ready = time.time()
    finally:
        records = load.stop()
        daemon.stop()
        if listener is not None:
            listener.close()
    failed = [
        sum(1 for r in records if not r["ok"] and i.signalled <= r["end"] / 1000 <= i.ready + 1) for i in interruptions
    ]
    return {
        "rounds": rounds,
        "requests": len(records),
        "failed_total": sum(not r["ok"] for r in records),
        "failed_per_interruption": failed,
        "in_flight_at_signal": [i.in_flight for i in interruptions],
        "signal_to_ready_s": [round(i.ready - i.signalled, 2) for i in interruptions],
        "errors": sorted({r.get("error", "")[:80] for r in records if not r["ok"]}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {}
    for scenario in ("crash", "new_socket"):
        with tempfile.TemporaryDirectory(prefix=f"immich-ml-{scenario}-") as scratch:
            results[scenario] = _measure(scenario, args.rounds, Path(scratch))
        print(scenario, json.dumps(results[scenario]), flush=True)
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
