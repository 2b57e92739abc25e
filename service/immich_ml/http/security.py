"""Who may talk to the daemon (a client allowlist) and how (TLS from certificate and key files)."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from immich_ml.errors import Forbidden
from immich_ml.log import SECURITY_LOG as log
from immich_ml.log import Throttle

__all__ = ["allowlist_middleware", "client_address", "tls_context"]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(request: web.Request) -> Address | None:
    """The TCP peer's address (IPv4-mapped IPv6 as IPv4); None for a peer without one (a Unix socket)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def allowlist_middleware(allowed: Sequence[Network]) -> Middleware:
    """Refuse (403) every request, on every path, from a peer outside `allowed`; loopback is not implied.

    The peer is the TCP connection's address; headers such as `X-Forwarded-For` are ignored, because a
    client could set them to anything.
    """

    refusals = Throttle()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        address = client_address(request)
        if address is None or not any(address in network for network in allowed):
            logged, held = refusals.allow(address)
            if logged:
                log.warning(
                    "refused %s %s from %s (not in MACHINE_LEARNING_ALLOWED_CLIENTS)%s",
                    request.method,
                    request.path,
                    address or "an unknown peer",
                    f"; {held} more refused since the last line" if held else "; further refusals logged once a minute",
                )
            raise Forbidden("Client not allowed (MACHINE_LEARNING_ALLOWED_CLIENTS)")
        return await handler(request)

    return middleware


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or newer) from PEM certificate-chain and private-key files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
