"""`immich-ml-healthcheck`: the image's HEALTHCHECK, `GET /ping` on the daemon's own address and port."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

from immich_ml.errors import ConfigError
from immich_ml.settings import Settings

__all__ = ["main", "ping_url"]

TIMEOUT_S = 2.0
"""The Immich server's own /ping timeout."""
_ANY_ADDRESS = {"", "0.0.0.0", "::", "[::]"}


def ping_url(settings: Settings) -> str:
    """Where the daemon answers /ping from inside its container: loopback when it listens on every address."""
    host = "127.0.0.1" if settings.host in _ANY_ADDRESS else settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if settings.tls_cert else "http"
    return f"{scheme}://{host}:{settings.port}/ping"


def main() -> int:
    """Exit 0 when /ping answers `pong`, 1 (with the reason on stdout, which Docker keeps) otherwise."""
    try:
        url = ping_url(Settings.from_env())
    except ConfigError as error:
        print(f"configuration error: {error}")
        return 1
    context = ssl.create_default_context()
    context.check_hostname = False  # liveness of our own daemon, not the certificate's name
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:
            body = response.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        print(f"{url}: {error}")
        return 1
    if body != "pong":
        print(f"{url}: unexpected answer {body[:80]!r}")
        return 1
    return 0
