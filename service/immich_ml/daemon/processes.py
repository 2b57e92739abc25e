"""Several worker processes on one port: a parent binds (or inherits) the socket, starts the workers,
relays their sd_notify messages to systemd as one service, and stops them all on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from immich_ml.daemon.lifecycle import EXTEND_BY_USEC, EXTEND_EVERY_S
from immich_ml.daemon.server import INHERITED_FDS, PARENT_PID
from immich_ml.daemon.systemd import Notifier
from immich_ml.settings import Settings

__all__ = ["run_workers"]

log = logging.getLogger("immich_ml.workers")


@dataclass
class _Worker:
    """One worker process and what it last told its private notify socket."""

    index: int
    device_id: int
    process: subprocess.Popen[bytes]
    ready: bool = False
    status: str = "starting"
    last_ping: float = field(default_factory=time.monotonic)


class _Relay(asyncio.DatagramProtocol):
    """Receives one worker's sd_notify datagrams."""

    def __init__(self, worker: _Worker, changed: asyncio.Event) -> None:
        self.worker = worker
        self.changed = changed

    def datagram_received(self, data: bytes, addr: object) -> None:
        for line in data.decode(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key == "READY" and value == "1":
                self.worker.ready = True
            elif key == "STATUS":
                self.worker.status = value
            elif key == "WATCHDOG" and value == "1":
                self.worker.last_ping = time.monotonic()
        self.changed.set()


def run_workers(settings: Settings, sockets: list[socket.socket]) -> int:
    """Run `settings.workers` worker processes sharing `sockets` (bound here if empty) until stopped."""
    if not sockets:
        sockets = [
            socket.create_server(
                (settings.host.strip("[]"), settings.port),
                backlog=128,
                family=socket.AF_INET6 if ":" in settings.host else socket.AF_INET,
            )
        ]
    log.info(
        "starting %d workers on %s (devices %s)",
        settings.workers,
        ", ".join(str(s.getsockname()[:2]) for s in sockets),
        ",".join(map(str, settings.device_ids)),
    )
    return asyncio.run(_supervise(settings, sockets, Notifier.from_env()))


async def _supervise(settings: Settings, sockets: list[socket.socket], notifier: Notifier) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    changed = asyncio.Event()

    def request_stop() -> None:
        stop.set()
        changed.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop)
    with tempfile.TemporaryDirectory(prefix="immich-ml-notify-") as notify_dir:
        workers, transports = [], []
        for index in range(settings.workers):
            path = Path(notify_dir) / f"worker-{index}"
            worker = _start(index, settings, sockets, path, notifier.watchdog_usec)
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Relay, worker, changed), local_addr=str(path), family=socket.AF_UNIX
            )
            workers.append(worker)
            transports.append(transport)
        for sock in sockets:
            sock.close()  # the workers hold their own copies
        code = await _relay(workers, notifier, stop, changed)
        notifier.send("STOPPING=1", "STATUS=stopping workers")
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        codes = [await loop.run_in_executor(None, worker.process.wait) for worker in workers]
        for transport in transports:
            transport.close()
    log.info("workers exited with %s", codes)
    notifier.close()
    return code or max(codes, key=abs)


def _start(
    index: int, settings: Settings, sockets: list[socket.socket], notify_path: Path, watchdog_usec: int | None
) -> _Worker:
    device_id = settings.device_ids[index % len(settings.device_ids)]
    env = {key: value for key, value in os.environ.items() if key not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env |= {
        "MACHINE_LEARNING_WORKERS": "1",
        "MACHINE_LEARNING_DEVICE_ID": str(device_id),
        "NOTIFY_SOCKET": str(notify_path),
        INHERITED_FDS: ",".join(str(s.fileno()) for s in sockets),
        PARENT_PID: str(os.getpid()),
    }
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    process = subprocess.Popen(
        [sys.executable, "-m", "immich_ml", "serve"], env=env, pass_fds=[s.fileno() for s in sockets]
    )
    log.info("worker %d: pid %d, device %d", index, process.pid, device_id)
    return _Worker(index, device_id, process)


async def _relay(workers: list[_Worker], notifier: Notifier, stop: asyncio.Event, changed: asyncio.Event) -> int:
    """Report the workers as one service until SIGTERM (0) or until a worker dies (1)."""
    interval = notifier.watchdog_interval_s
    watchdog_s = 2 * interval if interval else None
    ready_sent = False
    status = ""
    last_ping = last_extend = float("-inf")
    while not stop.is_set():
        if dead := [w for w in workers if w.process.poll() is not None]:
            log.error(
                "worker %d (pid %d) exited with %d; stopping the others",
                dead[0].index,
                dead[0].process.pid,
                dead[0].process.returncode,
            )
            return 1
        if not ready_sent and all(w.ready for w in workers):
            notifier.send("READY=1")
            ready_sent = True
        if not ready_sent and time.monotonic() - last_extend >= EXTEND_EVERY_S:
            notifier.send(f"EXTEND_TIMEOUT_USEC={EXTEND_BY_USEC}")
            last_extend = time.monotonic()
        new_status = " | ".join(
            f"worker {w.index} (pid {w.process.pid}, device {w.device_id}): {w.status}" for w in workers
        )
        if new_status != status:
            notifier.send(f"STATUS={new_status}")
            status = new_status
        now = time.monotonic()
        healthy = watchdog_s is not None and all(now - w.last_ping < watchdog_s for w in workers)
        if interval is not None and healthy and now - last_ping >= interval:
            notifier.send("WATCHDOG=1")
            last_ping = now
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), min(interval or 1.0, 1.0))
        except TimeoutError:
            pass
    return 0
