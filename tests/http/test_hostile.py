"""Hostile and unlucky clients against the real daemon process: malformed HTTP, stalled uploads, floods of
connections, SIGTERM mid-upload and compressed bodies. Always a 4xx or a 503, never a lost answer."""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import select
import socket
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import modelgen
from tests.daemonproc import Daemon, KeepAlive, multipart, write_slow_clip
from tests.http.test_fuzz import _requests as _multipart_requests

CLIP = "ViT-B-32__openai"
VISUAL = {"clip": {"visual": {"modelName": CLIP}}}
PRELOAD = {"MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": CLIP, "MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": CLIP}
FUZZ_EXAMPLES = int(os.environ.get("IMMICH_ML_FUZZ_EXAMPLES", "90"))
"""Fuzz examples (raw HTTP, multipart, urlencoded); `IMMICH_ML_FUZZ_EXAMPLES=10000` for the long run (scripts/fuzz)."""


def _image() -> bytes:
    return modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 48))


def exchange(port: int, data: bytes, *, wait_s: float = 2) -> bytes:
    """Send raw bytes on a fresh connection and return everything the daemon answers until it closes.

    A request the daemon is still waiting on after `wait_s` (incomplete framing) is half-closed, as a client
    that gives up would; complete requests carry `Connection: close` and are answered before that.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        received = b""
        sock.settimeout(wait_s)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
        if not received:
            sock.settimeout(10)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(65536):
                    received += chunk
        return received


def status_of(reply: bytes) -> int:
    """The status code of a raw HTTP reply; 0 for a connection closed without one."""
    if not reply.startswith(b"HTTP/1."):
        return 0
    return int(reply.split(b" ", 2)[1])


def request_bytes(body: bytes, content_type: str, *, path: str = "/predict", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def assert_not_a_server_fault(status: int, what: object) -> None:
    assert status == 503 or not 500 <= status < 600, f"{what!r} got {status}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One warm daemon serving the generated CLIP model, shared by the request-level tests."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    modelgen.write_clip(tmp_path / "cache", CLIP)
    started = Daemon(tmp_path, tmp_path / "cache", PRELOAD | {"MACHINE_LEARNING_MAX_BODY_SIZE": "4MiB"})
    try:
        started.wait_ready()
        yield started
    finally:
        assert started.stop() == 0, started.log()


def _urlencoded(body: bytes, charset: str = "") -> tuple[bytes, str]:
    return body, "application/x-www-form-urlencoded" + (f"; charset={charset}" if charset else "")


_ENTRIES = json.dumps({"clip": {"textual": {"modelName": CLIP}}}).encode()
_MALFORMED = {
    "300-character modelName": multipart({"clip": {"visual": {"modelName": "x" * 300}}}, image=_image()),
    "4096-byte modelName": multipart({"clip": {"textual": {"modelName": "é" * 2048}}}, text="a cat"),
    "non-UTF-8 urlencoded text": _urlencoded(b"entries=" + _ENTRIES + b"&text=\xff\xfe"),
    "non-UTF-8 percent-encoded text": _urlencoded(b"entries=" + _ENTRIES + b"&text=%ff%fe"),
    "bogus urlencoded charset": _urlencoded(b"entries=" + _ENTRIES + b"&text=cat", "x-bogus"),
    "bogus multipart charset": (
        multipart(VISUAL, image=_image())[0],
        multipart(VISUAL, image=_image())[1] + "; charset=x-bogus",
    ),
}


@pytest.mark.parametrize("case", list(_MALFORMED))
def test_a_malformed_request_is_a_4xx_and_the_daemon_serves_on(daemon: Daemon, case: str) -> None:
    body, content_type = _MALFORMED[case]
    status = status_of(exchange(daemon.port, request_bytes(body, content_type)))
    assert 400 <= status < 500, f"{case}: {status}"
    assert daemon.predict(VISUAL, image=_image())[0] == 200


@pytest.mark.parametrize(
    "encoding, payload",
    [
        ("deflate", b"this is not deflate data at all"),
        ("gzip", gzip.compress(b"--x\r\n" * 100)[:40]),
        ("gzip", b"\x1f\x8b\x08\x00garbage"),
        ("br", b"\x00\x01\x02"),
    ],
)
def test_a_body_that_does_not_inflate_is_a_4xx(daemon: Daemon, encoding: str, payload: bytes) -> None:
    _, content_type = multipart(VISUAL, image=_image())
    reply = exchange(daemon.port, request_bytes(payload, content_type, extra=f"Content-Encoding: {encoding}\r\n"))
    assert 400 <= status_of(reply) < 500, reply[:200]
    assert daemon.predict(VISUAL, image=_image())[0] == 200


_RAW = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /ping HTTP/1.1\r\nHost x\r\n\r\n",
    b"GET /ping HTTP/1.1\r\nHost: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: multipart/form-data; "
    b"boundary=b\r\n\r\nffffffffffffffff\r\n--b\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET /ping HTTP/1.1\r\nHost: x\r\nX: \x00\x01\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),
]


@pytest.mark.parametrize("data", _RAW, ids=range(len(_RAW)))
def test_malformed_http_is_never_a_server_fault(daemon: Daemon, data: bytes) -> None:
    assert_not_a_server_fault(status_of(exchange(daemon.port, data)), data[:80])
    assert daemon.request("GET", "/ping") == (200, b"pong")


_header_name = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1, max_size=20
)
_header_value = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def _raw_requests(draw: st.DrawFn) -> bytes:
    """A request that is HTTP-shaped but damaged: random method, target, headers, framing and body."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"BREW", b"post"]))
    target = draw(st.sampled_from([b"/predict", b"/ping", b"/health", b"/metrics", b"/", b"*", b"//x?%zz"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2", b""]))
    body = draw(st.binary(max_size=512))
    headers = draw(st.lists(st.tuples(_header_name.map(str.encode), _header_value), max_size=5))
    framing = draw(st.sampled_from(["length", "wrong-length", "chunked", "none"]))
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "wrong-length":
        headers.append((b"Content-Length", str(draw(st.integers(0, 2048))).encode()))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if draw(st.booleans()) else body
    if draw(st.booleans()):
        _, content_type = multipart(VISUAL, image=_image())
        headers.append((b"Content-Type", content_type.encode()))
    if draw(st.booleans()):
        headers.append((b"Content-Encoding", draw(st.sampled_from([b"gzip", b"deflate", b"br", b"x"]))))
    head = b"%s %s %s\r\n" % (method, target, version) + b"".join(b"%s: %s\r\n" % h for h in headers)
    return head + b"Connection: close\r\n\r\n" + body


_names = st.sampled_from([CLIP, "", "x" * 300, "é" * 130, "a\x00b", "../../etc", "nope"])
_charsets = st.sampled_from(["", "utf-8", "latin-1", "x-bogus", "utf-16", "ascii"])


@st.composite
def _urlencoded_requests(draw: st.DrawFn) -> tuple[bytes, str]:
    """An urlencoded form: entries naming odd models, text with odd bytes and escapes, odd charsets."""
    task, model_type = draw(st.sampled_from([("clip", "textual"), ("clip", "visual"), ("ocr", "detection")]))
    entries = json.dumps({task: {model_type: {"modelName": draw(_names)}}}).encode()
    text = draw(st.binary(max_size=64) | st.sampled_from([b"%ff%fe", b"%zz", b"cat", b"a" * 2000]))
    body = b"entries=" + urllib.parse.quote_from_bytes(entries).encode() + b"&text=" + text
    if draw(st.booleans()):
        body += b"&" + draw(st.binary(max_size=32))
    charset = draw(_charsets)
    return body, "application/x-www-form-urlencoded" + (f"; charset={charset}" if charset else "")


@st.composite
def _fuzzed(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """One of: raw damaged HTTP, a damaged multipart form (as in test_fuzz), an urlencoded form."""
    kind = draw(st.sampled_from(["raw", "multipart", "urlencoded"]))
    if kind == "raw":
        return kind, draw(_raw_requests()), ""
    body, content_type = draw(_multipart_requests() if kind == "multipart" else _urlencoded_requests())
    return kind, body, content_type


def test_fuzzed_requests_are_never_a_server_fault(daemon: Daemon) -> None:
    """Raw HTTP on fresh connections, forms on one keep-alive connection: no 5xx but 503, and the daemon serves on.

    `IMMICH_ML_FUZZ_EXAMPLES=10000 scripts/fuzz` is the long run; CI runs a few dozen examples.
    """
    statuses: dict[str, dict[int, int]] = {"raw": {}, "multipart": {}, "urlencoded": {}}
    connection = KeepAlive(daemon)

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(_fuzzed())
    def send(request: tuple[str, bytes, str]) -> None:
        kind, body, content_type = request
        if kind == "raw":
            status = status_of(exchange(daemon.port, body, wait_s=0.1))
        else:
            status = connection.post(body, content_type)
        statuses[kind][status] = statuses[kind].get(status, 0) + 1
        assert_not_a_server_fault(status, body[:200])

    try:
        send()
    finally:
        connection.close()
    total = sum(sum(counts.values()) for counts in statuses.values())
    faults = sum(n for counts in statuses.values() for status, n in counts.items() if 500 <= status != 503)
    print(
        f"\nfuzz: {total} requests, {faults} 5xx other than 503; by kind: "
        + "; ".join(f"{kind} {dict(sorted(counts.items()))}" for kind, counts in statuses.items())
    )
    assert daemon.predict(VISUAL, image=_image())[0] == 200


def _gzip_bomb(junk_mib: int) -> tuple[bytes, str]:
    """A multipart body, gzip-encoded: `entries`, a skipped part of `junk_mib` MiB of zeros, then a real image."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    parts = [
        b'--bomb\r\nContent-Disposition: form-data; name="entries"\r\n\r\n' + json.dumps(VISUAL).encode(),
        b'\r\n--bomb\r\nContent-Disposition: form-data; name="junk"\r\n\r\n',
    ]
    body = b"".join(compressor.compress(part) for part in parts)
    zeros = bytes(1 << 20)
    body += b"".join(compressor.compress(zeros) for _ in range(junk_mib))
    body += (
        compressor.compress(
            b'\r\n--bomb\r\nContent-Disposition: form-data; name="image"\r\n\r\n' + _image() + b"\r\n--bomb--\r\n"
        )
        + compressor.flush()
    )
    return body, "multipart/form-data; boundary=bomb"


def test_an_inflated_part_over_the_limit_is_refused(daemon: Daemon) -> None:
    """A gzip body whose skipped part inflates to 64 MiB (16 × MAX_BODY_SIZE) stops at the limit."""
    body, content_type = _gzip_bomb(64)
    reply = exchange(daemon.port, request_bytes(body, content_type, extra="Content-Encoding: gzip\r\n"), wait_s=30)
    assert status_of(reply) == 413, reply[:300]
    assert b"after decoding (MACHINE_LEARNING_MAX_BODY_SIZE)" in reply
    assert daemon.request("GET", "/ping") == (200, b"pong")


def _inflated_bytes(daemon: Daemon) -> int:
    """`immich_ml_inflated_bytes_total` from /metrics (0 while absent)."""
    status, text = daemon.request("GET", "/metrics")
    assert status == 200
    for line in text.decode().splitlines():
        if line.startswith("immich_ml_inflated_bytes_total "):
            return int(float(line.split()[1]))
    return 0


def test_ping_is_answered_while_a_body_is_still_inflating(tmp_path: Path) -> None:
    """A body inflating to 256 MiB, under the limit: /metrics counts its inflated bytes as they come, and
    /ping is answered between two readings that both show the inflation unfinished; then the request itself
    is answered. Before, aiohttp inflated on the event loop: nothing was answered until it had finished."""
    modelgen.write_clip(tmp_path / "cache", CLIP)
    daemon = Daemon(tmp_path, tmp_path / "cache", PRELOAD | {"MACHINE_LEARNING_MAX_BODY_SIZE": "1GiB"})
    try:
        daemon.wait_ready()
        body, content_type = _gzip_bomb(256)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=120) as sock:
            request = request_bytes(body, content_type, extra="Content-Encoding: gzip\r\n")
            sender = threading.Thread(target=sock.sendall, args=(request,))
            sender.start()
            while (before := _inflated_bytes(daemon)) == 0 and not select.select([sock], [], [], 0)[0]:
                continue  # until the inflation has started (or, before the fix, the request was answered)
            assert daemon.request("GET", "/ping") == (200, b"pong")
            after = _inflated_bytes(daemon)
            assert 0 < before <= after < 256 << 20, (before, after)
            sender.join()
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert status_of(reply) == 200, reply[:300]
        assert _inflated_bytes(daemon) > 256 << 20
    finally:
        assert daemon.stop() == 0, daemon.log()


# -- deadlines and connection limits ---------------------------------------------------------------


@functools.cache
def _upload_start(body_bytes: int) -> bytes:
    """The headers of a 10 MB image upload and the first `body_bytes` of its body."""
    body, content_type = multipart(VISUAL, image=b"\xff" * 10_000_000)
    return request_bytes(body, content_type)[: -len(body) + body_bytes]


def _stalled_upload(port: int, *, body_bytes: int = 500) -> socket.socket:
    """A client that sends the start of a 10 MB image upload, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(_upload_start(body_bytes))
    except OSError:
        sock.close()
        raise
    return sock


def _seconds_until_closed(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """How long until the daemon closes `sock` (reading whatever it answered first)."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := sock.recv(65536):
            received += chunk
    return time.monotonic() - started, received


def _sample(exposition: str, name: str) -> float:
    """One sample's value from a Prometheus text exposition."""
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in {exposition}")


def test_stalled_header_and_body_are_closed_within_their_deadlines(tmp_path: Path) -> None:
    daemon = Daemon(
        tmp_path,
        tmp_path / "cache",
        {"MACHINE_LEARNING_HEADER_TIMEOUT_S": "1", "MACHINE_LEARNING_BODY_TIMEOUT_S": "1.5"},
    )
    try:
        daemon.wait_ready()
        with _stalled_upload(daemon.port) as body_sock:
            body_s, body_reply = _seconds_until_closed(body_sock, 10)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as header_sock:
            header_sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
            header_s, _ = _seconds_until_closed(header_sock, 10)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as silent_sock:
            silent_s, _ = _seconds_until_closed(silent_sock, 10)
        print(
            f"\nstalled body closed after {body_s:.2f} s (deadline 1.5 s), stalled header {header_s:.2f} s, "
            f"silent connection {silent_s:.2f} s (deadline 1 s)"
        )
        assert body_s < 4 and status_of(body_reply) == 408, body_reply[:200]
        assert header_s < 4 and silent_s < 4
        exposition = daemon.request("GET", "/metrics")[1].decode()
        assert _sample(exposition, 'immich_ml_connections_dropped{reason="header_timeout"}') == 2
        assert daemon.request("GET", "/ping") == (200, b"pong")
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_more_stalled_clients_than_file_descriptors_leave_ping_answering(tmp_path: Path) -> None:
    """With systemd's default LimitNOFILE=1024, 1,100 stalled uploads: /ping still answers."""
    clients = 1100
    daemon = Daemon(tmp_path, tmp_path / "cache", {"MACHINE_LEARNING_BODY_TIMEOUT_S": "60"}, file_limit=1024)
    stalled: list[socket.socket] = []
    try:
        daemon.wait_ready()
        for _ in range(clients):
            with contextlib.suppress(OSError):
                stalled.append(_stalled_upload(daemon.port))
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            connection = daemon.connection(timeout_s=5)
            try:
                connection.request("GET", "/ping")
                reply = connection.getresponse()
                assert (reply.status, reply.read()) == (200, b"pong")
            finally:
                connection.close()
            latencies.append(time.monotonic() - started)
        print(
            f"\n/ping with {len(stalled)} stalled clients (LimitNOFILE=1024): "
            f"max {max(latencies) * 1000:.0f} ms over {len(latencies)}"
        )
        assert max(latencies) < 1
        exposition = daemon.request("GET", "/metrics")[1].decode()
        assert _sample(exposition, 'immich_ml_connections_dropped{reason="connection_cap"}') > 0
        assert _sample(exposition, "immich_ml_connections_open") <= 1024 - 448
    finally:
        for sock in stalled:
            sock.close()
        assert daemon.stop() == 0, daemon.log()


def test_a_request_whose_body_arrived_is_never_evicted_at_the_connection_cap(tmp_path: Path) -> None:
    """At the cap, new connections take the place of stalled ones, never of a request being answered (whose
    connection has been silent longest: it sent everything and waits)."""
    write_slow_clip(tmp_path / "cache", CLIP, iterations=600)
    settings = {**PRELOAD, "MACHINE_LEARNING_MAX_CONNECTIONS": "4", "MACHINE_LEARNING_BODY_TIMEOUT_S": "60"}
    daemon = Daemon(tmp_path, tmp_path / "cache", settings)
    stalled: list[socket.socket] = []
    try:
        daemon.wait_ready()
        body, content_type = multipart(VISUAL, image=modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 64)))
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=60) as answering:
            answering.sendall(request_bytes(body, content_type))
            deadline = time.monotonic() + 20
            while "immich_ml_batch_running_seconds{" not in daemon.request("GET", "/metrics")[1].decode():
                assert time.monotonic() < deadline, "the request never reached inference"
            stalled = [_stalled_upload(daemon.port) for _ in range(8)]  # twice the cap: four evictions
            reply = b""
            while chunk := answering.recv(65536):
                reply += chunk
        assert status_of(reply) == 200, reply[:300]
        exposition = daemon.request("GET", "/metrics")[1].decode()
        assert _sample(exposition, 'immich_ml_connections_dropped{reason="connection_cap"}') >= 4
    finally:
        for sock in stalled:
            sock.close()
        assert daemon.stop() == 0, daemon.log()


def test_an_upload_in_progress_at_sigterm_gets_its_answer(tmp_path: Path) -> None:
    modelgen.write_clip(tmp_path / "cache", CLIP)
    daemon = Daemon(tmp_path, tmp_path / "cache", PRELOAD)
    try:
        daemon.wait_ready()
        body, content_type = multipart(VISUAL, image=modelgen.jpeg_bytes(modelgen.make_gradient_image(640, 480)))
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
            head = request_bytes(body, content_type)[: -len(body)]
            sock.sendall(head + body[: len(body) // 2])
            deadline = time.monotonic() + 10
            while daemon.health()["inFlight"] < 1:
                assert time.monotonic() < deadline, "the upload in progress is not counted as in flight"
                time.sleep(0.02)
            daemon.process.send_signal(15)
            deadline = time.monotonic() + 10
            while "1 request(s) in flight" not in daemon.log():
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.02)
            sock.sendall(body[len(body) // 2 :])
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert status_of(reply) == 200, reply[:300]
        assert len(json.loads(reply.split(b"\r\n\r\n", 1)[1])["clip"].split(",")) == 512
        assert daemon.process.wait(20) == 0
    finally:
        daemon.kill()
