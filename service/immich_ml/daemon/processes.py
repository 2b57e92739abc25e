"""Several worker processes on one port: a parent binds (or inherits) the socket, starts the workers,
relays their sd_notify messages to systemd as one service, and stops them all on SIGTERM (on SIGHUP it then
re-executes itself on the same socket); a worker takes its sockets from the parent and stops with it."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from immich_ml.daemon.handoff import Handoff
from immich_ml.daemon.systemd import Notifier, Reporter
from immich_ml.log import WORKERS_LOG as log
from immich_ml.settings import Settings

__all__ = ["inherited_sockets", "is_worker", "run_workers"]


INHERITED_FDS = "IMMICH_ML_INHERITED_FDS"
"""Listening sockets a worker process gets from its parent: comma-separated file descriptors."""
PARENT_PID = "IMMICH_ML_PARENT_PID"
"""The pid of a worker's parent, so the worker can tell whether it is still there."""


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
    handoff = Handoff(sockets)
    code = asyncio.run(_supervise(settings, handoff, Notifier.from_env()))
    if handoff.requested:
        handoff.exec()
    return code


async def _supervise(settings: Settings, handoff: Handoff, notifier: Notifier) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    changed = asyncio.Event()
    sockets = handoff.sockets

    def request_stop(reexec: bool) -> None:
        if not stop.is_set():  # the first signal decides: a SIGHUP during a stop re-executes nothing
            handoff.requested = reexec
        stop.set()
        changed.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, False)
    loop.add_signal_handler(signal.SIGHUP, request_stop, True)
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
            sock.close()  # the workers hold their own copies, and `handoff` one for a re-exec
        code = await _relay(workers, notifier, stop, changed)
        if not handoff.requested:
            handoff.release()
        Reporter(notifier).stopping(
            "re-executing" if handoff.requested else "stopping workers", reloading=handoff.requested
        )
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
    reporter = Reporter(notifier)
    interval = notifier.watchdog_interval_s
    watchdog_s = 2 * interval if interval else None
    while not stop.is_set():
        if dead := [w for w in workers if w.process.poll() is not None]:
            log.error(
                "worker %d (pid %d) exited with %d; stopping the others",
                dead[0].index,
                dead[0].process.pid,
                dead[0].process.returncode,
            )
            return 1
        status = " | ".join(
            f"worker {w.index} (pid {w.process.pid}, device {w.device_id}): {w.status}" for w in workers
        )
        now = time.monotonic()
        healthy = watchdog_s is not None and all(now - w.last_ping < watchdog_s for w in workers)
        reporter.report(ready=all(w.ready for w in workers), status=status, healthy=healthy)
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), reporter.tick_s(1.0))
        except TimeoutError:
            pass
    return 0


def is_worker() -> bool:
    """Whether this process is a worker started by `run_workers` (it then serves, never starts workers)."""
    return INHERITED_FDS in os.environ


def inherited_sockets() -> list[socket.socket]:
    """A worker's listening sockets from its parent (empty outside a worker); from then on it stops with the parent."""
    fds = os.environ.get(INHERITED_FDS, "")
    if fds:
        _stop_with_parent()
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd.strip()]


def _stop_with_parent() -> None:
    """A worker gets SIGTERM (and drains) when its parent dies, even by SIGKILL, instead of living on."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if str(os.getppid()) != os.environ.get(PARENT_PID):  # the parent died before that took effect
        os.kill(os.getpid(), signal.SIGTERM)
