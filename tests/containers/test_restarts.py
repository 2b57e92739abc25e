"""Restarts and upgrades under a real systemd (PID 1 in a container) with the units `immich-ml systemd install`
writes: immich-ml.socket keeps the port while immich-ml.service restarts, and an Immich-like load (Node's fetch
on the host, through a published port) sees no failed request. Every other restart is an upgrade: the service
comes back with another ExecStart."""

from __future__ import annotations

import time
from pathlib import Path

from tests.containers.daemon_image import PREFIX, PROGRAM
from tests.containers.machine import Machine
from tests.containers.podman import Podman
from tests.restartload import (
    RESTARTS,
    ImmichLoad,
    Restart,
    expect_alone,
    immich_requests,
    in_flight_at_stops,
    loaded_cache,
    report,
    summary,
)

CACHE = "/var/cache/immich-ml"
UPGRADE = "/etc/systemd/system/immich-ml.service.d/upgrade.conf"
UPGRADED = f"[Service]\nExecStart=\nExecStart={PREFIX}/bin/python -m immich_ml serve\n"
"""Another ExecStart for the same daemon: what a package upgrade changes in the unit."""


def _ready_times(machine: Machine) -> list[float]:
    """When each instance logged that it is ready, from the journal (wall-clock seconds)."""
    text = machine.succeed("journalctl", "--no-pager", "--unit=immich-ml.service", "--output=short-unix")
    return [float(line.split()[0]) for line in text.splitlines() if line.endswith("immich_ml.server: ready")]


def test_systemd_restarts_and_upgrades_under_an_immich_like_load_fail_no_request(
    podman: Podman, immich_ml_image: str, tmp_path: Path
) -> None:
    machine = Machine.boot(podman, immich_ml_image, publish=["127.0.0.1::3003"])
    machine.succeed(PROGRAM, "systemd", "install")
    machine.succeed("systemd-sysusers", "/etc/sysusers.d/immich-ml.conf")
    settings = loaded_cache(tmp_path / "cache") | {"MACHINE_LEARNING_REQUEST_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    machine.container.copy_in(tmp_path / "cache", CACHE)
    machine.succeed("chown", "-R", "immich-ml:immich-ml", CACHE)
    env_file = "".join(f"{key}={value}\n" for key, value in settings.items())
    machine.container.write("/etc/immich-ml/immich-ml.env", env_file, scratch=tmp_path)
    machine.succeed("mkdir", "-p", str(Path(UPGRADE).parent))
    machine.systemctl("daemon-reload")
    machine.systemctl("enable", "--now", "immich-ml.socket")
    machine.systemctl("start", "immich-ml.service")  # returns at READY=1, after the preload
    port = machine.container.host_port(3003)
    requests = immich_requests(tmp_path)
    expect_alone(port, requests)

    load = ImmichLoad(f"http://127.0.0.1:{port}/", requests, tmp_path, concurrency=4)
    restarts: list[Restart] = []
    started_as: set[str] = set()
    try:
        while summary(load.done, restarts)["counted"] < RESTARTS and len(restarts) < 2 * RESTARTS:
            if len(restarts) % 2:
                machine.container.write(UPGRADE, UPGRADED, scratch=tmp_path)
            else:
                machine.succeed("rm", "-f", UPGRADE)
            machine.systemctl("daemon-reload")
            load.steady(port, restarts[-1].ready if restarts else 0.0)  # then signal at once
            restarts.append(Restart(time.time()))
            machine.systemctl("restart", "immich-ml.service")  # returns once the new instance sent READY=1
            journal = machine.journal("immich-ml.service")
            restarts[-1].ready = _ready_times(machine)[-1]
            restarts[-1].in_flight = in_flight_at_stops(journal)[-1]
            main_pid = machine.properties("immich-ml.service", "MainPID")["MainPID"]
            started_as.add(machine.succeed("cat", f"/proc/{main_pid}/cmdline").replace("\0", " ").strip())
    finally:
        records = load.stop()
    journal = machine.journal("immich-ml.service")
    assert len(in_flight_at_stops(journal)) == len(restarts), journal
    assert started_as == {f"{PREFIX}/bin/python3 {PROGRAM} serve", f"{PREFIX}/bin/python -m immich_ml serve"}
    result = summary(records, restarts)
    report("systemd", result)
    assert result["failed"] == 0, result
    assert result["counted"] >= RESTARTS, result
