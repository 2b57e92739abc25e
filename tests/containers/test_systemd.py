"""immich-ml under a real systemd (252, Debian bookworm) as PID 1 in a container, with both units users get:
(a) the generic one written by `immich-ml systemd install` and (b) the NixOS module's own, rendered from the
module's evaluation (tests/containers/nixos_units.py). This is the CPU path of nix/tests/vm.nix on a real
systemd, until a machine with nixpkgs and KVM runs that.

Both are installed into the same image, where immich-ml lives in /opt/immich-ml as docs/operations.md installs
it; the operator's settings (listen on the container's network, allow the host's requests, preload CLIP)
are the same for both: the env file for (a), the module's options in nix/tests/eval.nix for (b).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import modelgen
from tests.conftest import CLIP
from tests.containers import nixos_units
from tests.containers.daemon_image import PROGRAM
from tests.containers.machine import Machine
from tests.containers.podman import Podman, skip_or_fail
from tests.daemonproc import Endpoint, write_slow_clip

ROOT = Path(__file__).resolve().parents[2]
UNIT = "immich-ml.service"
UNIT_FILE = f"/etc/systemd/system/{UNIT}"
SOCKET_FILE = "/etc/systemd/system/immich-ml.socket"
CACHE = "/var/cache/immich-ml"
PORT = 3003
SLOW = "ViT-B-16__openai"
"""A CLIP model that computes for about a second per image: a request that is surely in flight at a stop."""
SETTINGS = f"""\
IMMICH_HOST=0.0.0.0
MACHINE_LEARNING_ALLOWED_CLIENTS=10.88.0.0/16
MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL={CLIP}
MACHINE_LEARNING_PRELOAD__CLIP__VISUAL={CLIP}
"""
"""The generic unit's /etc/immich-ml/immich-ml.env: what nix/tests/eval.nix's `unitsHost` sets for (b).
Requests from the host reach the container from podman's network (10.88.0.0/16)."""
IMAGE = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 48))


def _nixos_units() -> dict[str, Any]:
    try:
        return nixos_units.evaluate()
    except (nixos_units.LibraryMissing, FileNotFoundError) as missing:  # FileNotFoundError: no nix-instantiate
        skip_or_fail(f"cannot evaluate the NixOS module: {missing}")


def install_generic(machine: Machine, scratch: Path) -> str:
    """As docs/operations.md: `immich-ml systemd install`, the settings file. The unit's user."""
    machine.succeed(PROGRAM, "systemd", "install")
    machine.container.write("/etc/immich-ml/immich-ml.env", SETTINGS, scratch=scratch)
    return "immich-ml"


def install_nixos(machine: Machine, scratch: Path) -> str:
    """The module's units (the service and its socket) and users as NixOS would write them. The unit's user."""
    units = _nixos_units()
    service = units["services"]["immich-ml"]
    machine.container.write(UNIT_FILE, nixos_units.render_service(service), scratch=scratch)
    socket_unit = nixos_units.render_socket(units["sockets"]["immich-ml"])
    machine.container.write(SOCKET_FILE, socket_unit, scratch=scratch)
    machine.container.write("/etc/sysusers.d/immich.conf", nixos_units.render_sysusers(units["users"]), scratch=scratch)
    return str(service["serviceConfig"]["User"])


INSTALLERS: dict[str, Callable[[Machine, Path], str]] = {"generic": install_generic, "nixos": install_nixos}


@dataclass
class Service:
    """The unit installed in a booted machine (not started), and the daemon's port as the host reaches it."""

    machine: Machine
    endpoint: Endpoint
    user: str

    def main_pid(self) -> str:
        return self.machine.properties(UNIT, "MainPID")["MainPID"]

    def journal(self) -> list[str]:
        """The unit's journal, one message per line, the daemon's without their `LEVEL logger: ` prefix."""
        return [re.sub(r"^[A-Z]+ immich_ml[.a-z_]*: ", "", line) for line in self.machine.journal(UNIT).splitlines()]


@pytest.fixture(params=sorted(INSTALLERS))
def service(request: pytest.FixtureRequest, podman: Podman, immich_ml_image: str, tmp_path: Path) -> Service:
    models = tmp_path / "models"
    modelgen.write_clip(models, CLIP)
    write_slow_clip(models, SLOW, iterations=1500)
    machine = Machine.boot(podman, immich_ml_image, publish=[f"127.0.0.1::{PORT}"])
    machine.succeed("mkdir", "-p", CACHE)
    machine.container.copy_in(models, CACHE)  # root-owned: CacheDirectory= hands it to the unit's user
    user = INSTALLERS[request.param](machine, tmp_path)
    machine.succeed("systemd-sysusers")
    machine.systemctl("daemon-reload")
    return Service(machine, Endpoint("127.0.0.1", machine.container.host_port(PORT)), user)


def start_and_serve(service: Service) -> float:
    """The story every unit must pass: start returns once warm, the daemon answers and runs as it should.
    Returns the seconds from the main process's start to READY=1."""
    machine = service.machine
    machine.systemctl("start", UNIT)  # Type=notify: returns once the daemon sent READY=1
    journal = service.journal()
    # READY=1 comes after the warm-up: both preloaded models were loaded, then "ready" was logged.
    loaded = [f"loaded clip/{CLIP}/{kind} using CPUExecutionProvider" for kind in ("textual", "visual")]
    assert all(line in journal for line in loaded), journal
    assert max(journal.index(line) for line in loaded) < journal.index("ready"), journal

    assert service.endpoint.request("GET", "/ping") == (200, b"pong")
    status, text = service.endpoint.predict({"clip": {"textual": {"modelName": CLIP}}}, text="a photo of a dog")
    assert status == 200 and len(text["clip"].split(",")) == 512, text
    status, visual = service.endpoint.predict({"clip": {"visual": {"modelName": CLIP}}}, image=IMAGE)
    assert status == 200 and len(visual["clip"].split(",")) == 512, visual

    pid = service.main_pid()
    assert machine.succeed("stat", "-c", "%U", f"/proc/{pid}").strip() == service.user
    assert machine.succeed("stat", "-c", "%U %a", CACHE).split() == [service.user, "750"]
    # LimitNOFILE=65536: systemd grants at most the container's hard limit (runc cannot raise it).
    hard = int(machine.succeed("prlimit", "--nofile", "--output=HARD", "--noheadings", "--pid=1"))
    limits = machine.succeed("prlimit", "--nofile", "--output=SOFT,HARD", "--noheadings", f"--pid={pid}").split()
    assert limits == [str(min(65536, hard))] * 2
    # The hardening is in force on the process, not only written down.
    process = dict(line.split(":\t", 1) for line in machine.succeed("cat", f"/proc/{pid}/status").splitlines())
    assert (process["NoNewPrivs"], process["Seccomp"], process["CapBnd"]) == ("1", "2", "0000000000000000")
    nice = machine.succeed("cat", f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[16]  # field 19, after comm
    assert nice == machine.properties(UNIT, "Nice")["Nice"]
    times = machine.properties(UNIT, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    return (int(times["ActiveEnterTimestampMonotonic"]) - int(times["ExecMainStartTimestampMonotonic"])) / 1e6


@contextmanager
def request_in_flight(endpoint: Endpoint) -> Iterator[dict[str, Any]]:
    """A slow /predict running on its own thread for the block; afterwards the dict holds its (status, body)."""
    outcome: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(answer=endpoint.predict({"clip": {"visual": {"modelName": SLOW}}}, image=IMAGE))
    )
    thread.start()
    try:
        while endpoint.health()["inFlight"] < 1:  # accepted and running
            assert thread.is_alive(), outcome
        yield outcome
    finally:
        thread.join(120)


def _documented() -> dict[str, tuple[str, str]]:
    """docs/nixos.md's table of measured systemd figures: unit → (exposure, directives systemd 252 ignores)."""
    rows = re.findall(r"^\| (generic|nixos) \| ([0-9.]+) \| (.*?) \|$", (ROOT / "docs" / "nixos.md").read_text(), re.M)
    return {unit: (exposure, ignored) for unit, exposure, ignored in rows}


def _verify(machine: Machine) -> list[str]:
    """`systemd-analyze verify` of the unit (and its drop-ins): the keys this systemd does not know, which it
    ignores with a warning; any other output, or a failure, fails the test."""
    verify = machine.container.exec("systemd-analyze", "verify", UNIT_FILE)
    lines = (verify.stdout + verify.stderr).splitlines()
    unknown = re.compile(r"Unknown key '([A-Za-z]+)' in section \[[A-Za-z]+\], ignoring\.$")  # systemd 252's words
    assert verify.returncode == 0 and [line for line in lines if not unknown.search(line)] == [], lines
    return sorted({match[1] for line in lines if (match := unknown.search(line))})


def _exposure(machine: Machine) -> str:
    """The overall exposure `systemd-analyze security` gives the unit (0 to 10, lower is better)."""
    security = machine.succeed("systemd-analyze", "security", "--no-pager", UNIT)
    exposure = re.search(rf"Overall exposure level for {re.escape(UNIT)}: ([0-9.]+)", security)
    assert exposure is not None, security
    return exposure[1]


def test_systemd_accepts_starts_serves_restarts_and_stops_the_unit(
    service: Service, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The whole story, as a VM test tells it. `systemd-analyze verify` is silent except for directives this
    systemd does not know yet, which are listed (here and in docs/nixos.md), never dropped."""
    machine = service.machine
    variant = request.node.callspec.params["service"]
    ignored, exposure = _verify(machine), _exposure(machine)
    seconds = start_and_serve(service)
    print(
        f"{variant}: exposure {exposure}; ignored by systemd 252: {ignored or 'none'}; start to READY {seconds:.2f} s"
    )
    assert _documented()[variant] == (exposure, ", ".join(ignored) or "none")

    # systemd logs a main process's clean exit at debug level only (a failure at notice), and forgets a
    # stopped unit's exit status once it unloads it: the journal is the record.
    machine.succeed("systemd-analyze", "log-level", "debug")
    first = service.main_pid()
    with request_in_flight(service.endpoint) as outcome:
        machine.systemctl("restart", UNIT)  # returns when the new process is ready
    assert outcome["answer"][0] == 200, outcome
    assert service.main_pid() != first
    assert service.endpoint.request("GET", "/ping") == (200, b"pong")

    with request_in_flight(service.endpoint) as outcome:
        machine.systemctl("stop", UNIT)
    assert outcome["answer"][0] == 200, outcome
    assert machine.properties(UNIT, "ActiveState")["ActiveState"] == "inactive"  # not "failed"
    journal = service.journal()
    stops = [line for line in journal if line.startswith("stopping: accepting no more; 1 request(s) in flight")]
    assert len(stops) == 2, journal
    assert journal.count(f"{UNIT}: Main process exited, code=exited, status=0/SUCCESS (success)") == 2, journal
    assert journal.count(f"{UNIT}: Deactivated successfully.") == 2, journal
    assert not [line for line in journal if "timed out" in line or "Failed with result" in line], journal

    # A directive newer than this systemd (PrivatePIDs=, systemd 257) is listed, not passed over.
    machine.container.write(
        f"/etc/systemd/system/{UNIT}.d/newer.conf", "[Service]\nPrivatePIDs=yes\n", scratch=tmp_path
    )
    assert _verify(machine) == sorted([*ignored, "PrivatePIDs"])


BREAKING = {
    "cache hidden": f"InaccessiblePaths={CACHE}",
    "no sockets": "SystemCallFilter=~@network-io",
}


@pytest.mark.parametrize("service", ["nixos"], indirect=True)
@pytest.mark.parametrize("directive", BREAKING.values(), ids=BREAKING.keys())
def test_a_hardening_directive_that_breaks_the_daemon_fails_the_story(
    service: Service, directive: str, tmp_path: Path
) -> None:
    drop_in = f"/etc/systemd/system/{UNIT}.d/broken.conf"
    service.machine.container.write(drop_in, f"[Service]\n{directive}\n", scratch=tmp_path)
    service.machine.systemctl("daemon-reload")
    with pytest.raises(AssertionError) as failure:
        start_and_serve(service)
    why = "\n".join(service.journal()[-8:])
    print(f"{directive} fails the story: {str(failure.value).splitlines()[0]}\n{why}")


def test_every_evaluated_setting_is_in_the_rendered_unit() -> None:
    service = _nixos_units()["services"]["immich-ml"]
    rendered = nixos_units.render_service(service).splitlines()
    keys = {line.split("=", 1)[0] for line in rendered if "=" in line}
    config = service["serviceConfig"]
    empty = sorted(key for key, value in config.items() if value == [])  # NixOS writes no line for them
    assert empty == [
        "DeviceAllow",
        "EnvironmentFile",
        "IPAddressAllow",
        "IPAddressDeny",
        "LoadCredential",
        "SupplementaryGroups",
    ]
    assert set(config) - set(empty) <= keys
    assert {f'Environment="{name}={value}"' for name, value in service["environment"].items()} <= set(rendered)
    assert "ExecStart=/opt/immich-ml/bin/immich-ml serve" in rendered
    assert not any("/nix/store" in line for line in rendered)


def test_the_store_path_rule_maps_only_the_package() -> None:
    store = "/nix/store/" + "a" * 32
    assert nixos_units.map_store_paths(f"{store}-immich-ml-0.1.0/bin/immich-ml serve") == f"{PROGRAM} serve"
    assert nixos_units.map_store_paths(f"{store}-immich-ml-cuda-0.1.0/bin/immich-ml") == PROGRAM
    with pytest.raises(ValueError, match="no counterpart outside Nix"):
        nixos_units.map_store_paths(f"{store}-python3-3.13/bin/python3")
