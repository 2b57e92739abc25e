"""MACHINE_LEARNING_WORKERS=2: two processes on one (socket-activated) port, one voice towards systemd."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests import modelgen
from tests.conftest import CLIP
from tests.daemonproc import Daemon, NotifySocket


def test_two_workers_share_one_port_with_round_robin_devices(tmp_path: Path) -> None:
    modelgen.write_clip(tmp_path / "cache", CLIP)
    notify = NotifySocket(tmp_path / "notify")
    daemon = Daemon(
        tmp_path,
        tmp_path / "cache",
        {
            "MACHINE_LEARNING_WORKERS": "2",
            "MACHINE_LEARNING_DEVICE_IDS": "0,1",
            "MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": CLIP,
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": "400000",
        },
    )
    try:
        *before_ready, ready = notify.receive_until(lambda message: message.startswith("READY=1"))
        assert all("READY=1" not in message for message in before_ready)
        status = ready.splitlines()[1]  # READY=1 carries the status: every worker is ready
        assert status.startswith("STATUS=") and status.count("ready;") == 2, ready
        assert "device 0" in status and "device 1" in status

        workers: dict[int, int] = {}
        deadline = time.monotonic() + 30  # each request on a new connection; either worker may accept it, and
        while time.monotonic() < deadline:  # on a busy machine one worker can win many accepts in a row
            health = daemon.health()
            assert health["ready"]
            workers[health["pid"]] = health["device"]["id"]
            if len(workers) == 2:
                break
        assert sorted(workers.values()) == [0, 1]
        assert daemon.pid not in workers  # the parent only supervises
        notify.receive_until(lambda message: message == "WATCHDOG=1", timeout_s=5)

        daemon.process.send_signal(signal.SIGTERM)
        notify.receive_until(lambda message: "STOPPING=1" in message, timeout_s=10)
        assert daemon.process.wait(30) == 0
    finally:
        daemon.kill()
        notify.close()


def test_a_dying_worker_stops_the_service(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, tmp_path / "cache", {"MACHINE_LEARNING_WORKERS": "2"})
    try:
        daemon.wait_ready()
        pid = daemon.health()["pid"]
        os.kill(pid, signal.SIGKILL)
        assert daemon.process.wait(30) == 1  # systemd's Restart= brings the whole set back
    finally:
        daemon.kill()


def test_workers_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    """SIGKILL to the parent (an OOM kill, say) must not leave orphaned workers holding the port and models."""
    daemon = Daemon(tmp_path, tmp_path / "cache", {"MACHINE_LEARNING_WORKERS": "2"})
    try:
        daemon.wait_ready()
        # The workers as the kernel knows them (which worker answers HTTP depends on scheduling, not on this test).
        workers = _children(daemon.pid)
        assert len(workers) == 2
        assert daemon.health()["pid"] in workers
        daemon.process.kill()
        daemon.process.wait(30)
        for _ in range(600):  # bounded: the workers drain and exit within seconds
            if not any(_running(pid) for pid in workers):
                break
            time.sleep(0.05)
        alive = [pid for pid in workers if _running(pid)]
        assert alive == [], f"workers {alive} outlived their parent"
    finally:
        daemon.kill()


def _children(pid: int) -> set[int]:
    """The direct child processes of `pid`, from /proc."""
    return {
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    }


def _running(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie waiting to be reaped counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
