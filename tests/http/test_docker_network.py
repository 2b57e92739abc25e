"""docs/docker.md's network set-up, run for real: Linux network namespaces play the Immich container and a
stranger, the host side of their veth pairs plays Docker's bridges.

* "compose network" 172.31.N.0/24: the Immich server's namespace, gateway 172.31.N.1 on the host; its
  /etc/hosts maps `host.docker.internal` to the "docker0" address, as `extra_hosts: host-gateway` does.
* "docker0" 172.30.N.0/24: the host has 172.30.N.1 (what `host-gateway` resolves to); a stranger's namespace
  sits at 172.30.N.2, on a subnet the allowlist does not name.

The daemon is configured as the page says (`IMMICH_HOST`, `MACHINE_LEARNING_ALLOWED_CLIENTS` = the compose
subnet) and started as `immich-ml serve`. Needs root (CAP_NET_ADMIN) and iproute2; skips otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import modelgen

# What the Immich server does at start and for a smart search, reduced to the calls (Node's fetch, as the
# server): the availability check with a 2 s timeout, then one CLIP text query.
IMMICH_SEARCH = r"""
const [url] = process.argv.slice(1);
(async () => {
  const ping = await fetch(new URL('ping', url), { signal: AbortSignal.timeout(2000) });
  const pong = [ping.status, await ping.text()];  // within the 2 s the signal allows
  const form = new FormData();
  form.append('entries', JSON.stringify({ clip: { textual: { modelName: 'ViT-B-32__openai' } } }));
  form.append('text', 'a dog on the beach');
  const res = await fetch(new URL('predict', url), { method: 'POST', body: form });
  console.log(JSON.stringify({ ping: pong, predict: [res.status, await res.text()] }));
})().catch((error) => { console.error(error); process.exit(1); });
"""

_START_TIMEOUT_S = 60


@dataclass(frozen=True)
class Host:
    """The addresses of one namespaced set-up."""

    app: str  # namespace of the Immich server container
    stranger: str  # namespace of a container outside Immich's network
    compose_subnet: str
    bridge_address: str  # the host's "docker0" address, where host.docker.internal points


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _join(namespace: str, veth: str, host_cidr: str, inner_cidr: str, gateway: str) -> None:
    _ip("netns", "add", namespace)
    _ip("link", "add", f"{veth}h", "type", "veth", "peer", "name", f"{veth}n")
    _ip("link", "set", f"{veth}n", "netns", namespace)
    _ip("addr", "add", host_cidr, "dev", f"{veth}h")
    _ip("link", "set", f"{veth}h", "up")
    for command in (
        ["addr", "add", inner_cidr, "dev", f"{veth}n"],
        ["link", "set", f"{veth}n", "up"],
        ["link", "set", "lo", "up"],
        ["route", "add", "default", "via", gateway],
    ):
        _ip("-n", namespace, *command)


@pytest.fixture
def host() -> Iterator[Host]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip)")
    n = 100 + os.getpid() % 150  # distinct subnets and names for concurrent runs on one machine
    tag = f"imt{os.getpid() % 100000}"
    app, stranger = f"{tag}-app", f"{tag}-other"
    hosts_dir = Path("/etc/netns") / app  # `ip netns exec` bind-mounts these over /etc
    try:
        _join(app, f"{tag}a", f"172.31.{n}.1/24", f"172.31.{n}.2/24", f"172.31.{n}.1")
        _join(stranger, f"{tag}s", f"172.30.{n}.1/24", f"172.30.{n}.2/24", f"172.30.{n}.1")
        hosts_dir.mkdir(parents=True)
        (hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n172.30.{n}.1 host.docker.internal\n")
        yield Host(app, stranger, f"172.31.{n}.0/24", f"172.30.{n}.1")
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot create network namespaces here: {error.stderr.strip()}")
    finally:
        shutil.rmtree(hosts_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            hosts_dir.parent.rmdir()  # /etc/netns, if this test created it and nothing else is there
        for namespace in (app, stranger):  # deleting a namespace deletes its veth pair
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _free_port(address: str) -> int:
    with socket.create_server((address, 0)) as probe:
        return int(probe.getsockname()[1])


_PROBE = (
    "import sys, urllib.request, urllib.error\n"
    "try: print(urllib.request.urlopen(sys.argv[1], timeout=10).status)\n"
    "except urllib.error.HTTPError as e: print(e.code)\n"
    "except OSError as e: print(type(getattr(e, 'reason', e)).__name__)\n"
)
"""Prints the status of GET argv[1], or the name of the connection error."""


def _run(namespace: str | None, *command: str) -> subprocess.CompletedProcess[str]:
    """Run `command` inside `namespace` (None: on the host)."""
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=60)


def _http_get(namespace: str | None, url: str) -> str:
    """Status of GET `url` from inside `namespace` (None: the host), or the connection error's name."""
    return _run(namespace, sys.executable, "-c", _PROBE, url).stdout.strip()


def _wait_listening(process: subprocess.Popen[bytes], address: str, port: int, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"daemon exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"daemon not listening after {_START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.mark.parametrize("bind", ["bridge", "all"])
def test_immich_in_a_container_reaches_the_host_daemon_and_others_are_refused(
    host: Host, tmp_path: Path, bind: str
) -> None:
    node = shutil.which("node")
    assert node, "Node.js plays the Immich server (scripts/setup-venv --test installs it)"
    cache = tmp_path / "cache"
    modelgen.write_clip(cache, "ViT-B-32__openai")
    address = host.bridge_address if bind == "bridge" else "0.0.0.0"
    port = _free_port(address)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LISTEN_", "NOTIFY_"))}
    env |= {
        "IMMICH_HOST": address,
        "IMMICH_PORT": str(port),
        "MACHINE_LEARNING_ALLOWED_CLIENTS": host.compose_subnet,
        "MACHINE_LEARNING_CACHE_FOLDER": str(cache),
        "MACHINE_LEARNING_PROVIDER": "cpu",
        "MACHINE_LEARNING_REQUEST_THREADS": "2",
        "NO_COLOR": "1",
    }
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "immich_ml", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_listening(daemon, host.bridge_address, port, log)
        url = f"http://host.docker.internal:{port}/"
        immich = _run(host.app, node, "-e", IMMICH_SEARCH, url)
        assert immich.returncode == 0, immich.stderr
        answers = json.loads(immich.stdout)
        assert answers["ping"] == [200, "pong"]
        status, body = answers["predict"]
        assert status == 200, body
        assert len(json.loads(json.loads(body)["clip"])) == 512

        stranger = _http_get(host.stranger, f"http://{host.bridge_address}:{port}/ping")
        assert stranger == "403"
        # On the host itself: nothing on loopback when bound to the bridge; 403 when bound everywhere, since
        # the allowlist implies no loopback.
        on_host = _http_get(None, f"http://127.0.0.1:{port}/ping")
        assert on_host == ("ConnectionRefusedError" if bind == "bridge" else "403")
    finally:
        daemon.terminate()
        assert daemon.wait(60) == 0, log.read_text()
    assert "refused GET /ping from 172.30." in log.read_text()
