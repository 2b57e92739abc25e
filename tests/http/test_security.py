"""Client allowlist, TLS, size limits, hostile uploads, and what reaches the logs, over real HTTP."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import ssl
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from immich_ml.http.app import create_app
from immich_ml.http.appkeys import CONNECTIONS
from immich_ml.settings import Settings
from tests import modelgen
from tests.conftest import CLIP, TEXTUAL, VISUAL, ClientFactory, predict_form
from tests.daemonproc import Daemon, multipart


def _networks(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


def _image() -> bytes:
    return modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 48))


def _bomb_png(side: int) -> bytes:
    """A valid 1-bit greyscale PNG of side×side pixels that compresses to a few hundred KB."""
    row = b"\0" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command) and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=immich-ml",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


# -- allowlist -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ping", "/health", "/metrics", "/"])
async def test_client_outside_allowlist_gets_403_everywhere(make_client: ClientFactory, path: str) -> None:
    client = await make_client(allowed_clients=_networks("10.0.0.0/8"))
    async with client.get(path) as response:
        assert response.status == 403
        assert await response.json() == {"detail": "Client not allowed (MACHINE_LEARNING_ALLOWED_CLIENTS)"}


async def test_predict_from_outside_allowlist_gets_403(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client(allowed_clients=_networks("10.0.0.0/8", "fd00::/8"))
    async with client.post("/predict", data=predict_form(TEXTUAL, text="a dog")) as response:
        assert response.status == 403


async def test_client_inside_allowlist_is_served(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client(allowed_clients=_networks("10.0.0.0/8", "127.0.0.0/8"))
    async with client.get("/ping") as response:
        assert response.status == 200
        assert await response.text() == "pong"
    async with client.post("/predict", data=predict_form(TEXTUAL, text="a dog")) as response:
        assert response.status == 200


async def test_ipv4_client_on_a_dual_stack_socket_matches_ipv4_networks(cache: Path) -> None:
    try:
        sock = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    except OSError as error:
        pytest.skip(f"no dual-stack IPv6 here: {error}")
    runner = web.AppRunner(create_app(Settings(cache_folder=cache, allowed_clients=_networks("127.0.0.1/32"))))
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        async with aiohttp.ClientSession() as session:  # the peer is ::ffff:127.0.0.1 on this socket
            async with session.get(f"http://127.0.0.1:{sock.getsockname()[1]}/ping") as response:
                assert response.status == 200
    finally:
        await runner.cleanup()


# -- TLS -------------------------------------------------------------------------------------------


async def test_tls_serves_https_with_the_configured_certificate(
    aiohttp_server: Any, cache: Path, certificate: tuple[Path, Path]
) -> None:
    from immich_ml.http.security import tls_context

    cert, key = certificate
    server = await aiohttp_server(create_app(Settings(cache_folder=cache)), ssl=tls_context(cert, key))
    trusted = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"https://127.0.0.1:{server.port}/ping", ssl=trusted) as response:
            assert await response.text() == "pong"
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{server.port}/ping") as response:
                await response.read()


def test_daemon_with_tls_settings_speaks_only_https(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    daemon = Daemon(
        tmp_path,
        tmp_path / "cache",
        {"MACHINE_LEARNING_TLS_CERT": str(cert), "MACHINE_LEARNING_TLS_KEY": str(key)},
        tls_ca=cert,
    )
    try:
        daemon.wait_ready()
        assert daemon.request("GET", "/ping") == (200, b"pong")
        daemon.tls_ca = None
        with pytest.raises(ConnectionError):
            daemon.request("GET", "/ping")
    finally:
        assert daemon.stop() == 0


# -- limits and hostile uploads ---------------------------------------------------------------------


async def test_decompression_bomb_gets_413_without_a_memory_spike(make_client: ClientFactory, clip_cache: Path) -> None:
    bomb = _bomb_png(30_000)  # 900 million pixels: 900 MB once decoded to 8-bit, 2.7 GB as RGB
    assert len(bomb) < 500_000
    client = await make_client()
    peak_before = _peak_rss_kib()
    async with client.post("/predict", data=predict_form(VISUAL, image=bomb)) as response:
        assert response.status == 413
        assert "too large" in (await response.json())["detail"]
    assert _peak_rss_kib() - peak_before < 50_000  # KiB: the pixels were never decoded


async def test_image_over_max_pixels_gets_413(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client(max_image_pixels=64 * 47)
    async with client.post("/predict", data=predict_form(VISUAL, image=_image())) as response:
        assert response.status == 413


async def test_image_part_over_max_body_size_gets_413(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client(max_body_size=1000)
    async with client.post("/predict", data=predict_form(VISUAL, image=_image() + b"\0" * 2000)) as response:
        assert response.status == 413
        assert "MACHINE_LEARNING_MAX_BODY_SIZE" in (await response.json())["detail"]


async def _raw_request(
    port: int, body: bytes, content_type: str, *, declared: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {declared}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    return reader, writer


async def test_truncated_upload_does_not_break_the_daemon(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client()
    body, content_type = multipart({"clip": {"visual": {"modelName": CLIP}}}, image=_image())
    _, writer = await _raw_request(client.port, body[: len(body) // 2], content_type, declared=len(body))
    writer.close()  # the client goes away mid-body
    await writer.wait_closed()
    async with client.post("/predict", data=predict_form(VISUAL, image=_image())) as response:
        assert response.status == 200
    assert client.app[CONNECTIONS].in_flight == 0


async def test_slow_client_does_not_block_others(make_client: ClientFactory, clip_cache: Path) -> None:
    client = await make_client()
    body, content_type = multipart({"clip": {"visual": {"modelName": CLIP}}}, image=_image())
    reader, writer = await _raw_request(client.port, b"", content_type, declared=len(body))
    half = len(body) // 2
    for offset in range(0, half, 256):  # dribble half the body, a small piece at a time
        writer.write(body[offset : min(offset + 256, half)])
        await writer.drain()
        await asyncio.sleep(0.002)
    async with client.post("/predict", data=predict_form(VISUAL, image=_image())) as response:
        assert response.status == 200  # served while the slow upload is still open
    writer.write(body[half:])
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()


# -- logs ------------------------------------------------------------------------------------------


async def test_query_text_and_image_never_reach_the_logs(
    make_client: ClientFactory, clip_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "zebra-marker-7f3a"
    caplog.set_level(logging.DEBUG)
    client = await make_client()
    async with client.post("/predict", data=predict_form(TEXTUAL, text=secret)) as response:
        assert response.status == 200
    image = _image()
    async with client.post("/predict", data=predict_form(VISUAL, image=image + secret.encode())) as response:
        assert response.status == 200
    async with client.post("/predict", data=predict_form(VISUAL, image=secret.encode() * 10)) as response:
        assert response.status == 400
    access = [record.getMessage() for record in caplog.records if record.name == "immich_ml.access"]
    assert len(access) == 3  # one line per request, failed ones included
    assert re.fullmatch(r'predict \{"clip": ?\{"textual":.*\} \(text 17 chars\): 200, \d+\.\d ms', access[0]), access
    assert re.fullmatch(r"predict .* \(image 170 B\): 400 BadImage, \d+\.\d ms", access[2]), access
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert repr(image[:16]) not in record.getMessage()
