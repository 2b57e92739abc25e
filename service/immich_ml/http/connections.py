"""Every open client connection: a header deadline, a cap below the file limit, the requests in flight counted
from their first byte, and the drain on stop.

The drain refuses nothing. The listening sockets are closed first (new connections wait in the socket's
backlog for the next instance where systemd or a re-exec keeps the socket), then every request sent on an
open connection is answered, with `Connection: close`, uploads still arriving included. A keep-alive connection
with no request is closed only once it has been idle for `IDLE_GRACE_S`: a client may be writing a POST on it at
that very moment, and Node's fetch (the Immich server's) does not retry a POST whose connection was closed; it
drops its own idle connections after 4 s, so past the grace the client has stopped using it.

The daemon's listening sites wrap aiohttp's protocol in `_Tracked`, which sees every byte arrive. At the cap,
a new connection (say, the Immich server's `/ping`) takes the place of the connection that has waited longest
without sending anything: an idle keep-alive first, then a stalled request; connections whose request is
being answered (their body is complete) are never closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import resource
import socket
import ssl
import time
from collections.abc import Callable

from aiohttp import StreamReader, web
from aiohttp.typedefs import Handler, Middleware

from immich_ml.log import SERVER_LOG as log

__all__ = [
    "IDLE_GRACE_S",
    "LISTEN_BACKLOG",
    "Connections",
    "TrackedSite",
    "default_max_connections",
    "raise_file_limit",
]


IDLE_GRACE_S = 5.0
"""How long an idle keep-alive connection is kept open while draining: longer than Node's (undici's) default
4 s keep-alive timeout, so the client has given the connection up before the daemon closes it."""

LISTEN_BACKLOG = 128
"""The listen backlog, which is also how many connections asyncio accepts in one go (and the socket unit's)."""
_RESERVED_FDS = 3 * LISTEN_BACKLOG + 64
"""File descriptors kept free beyond the cap. asyncio accepts a whole backlog before the new connections are
seen (and can evict), and evicted sockets close one loop iteration later, so up to three backlogs of sockets
can be open beyond the cap for a moment; 64 more for model files, pipes and the journal."""
_DEFAULT_CAP = 4096


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd leaves it at 1024 for select()); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, error)
    return soft


def default_max_connections() -> int:
    """The connection cap for this process's open-file limit (RLIMIT_NOFILE) when none is configured."""
    file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(8, min(_DEFAULT_CAP, file_limit - _RESERVED_FDS))


class _Phase(enum.Enum):
    IDLE = "idle"  # no request yet, or between keep-alive requests
    HEADERS = "headers"  # a request's first bytes arrived, its headers are not complete
    BODY = "body"  # a predict request is being read; answering (never evicted) once its body is complete
    ANSWERING = "answering"  # the request is complete and being handled: never evicted


class Connections:
    """The open connections of one application, the middleware that follows their requests, and the drain."""

    def __init__(self, *, header_timeout_s: float, max_connections: int = _DEFAULT_CAP) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self._open: dict[object, _Tracked] = {}  # aiohttp's protocol → its tracker
        self.evicted = 0
        self.timed_out = 0
        self.in_flight = 0
        """Requests whose first byte arrived and that are not answered yet (predictions, and any request whose
        headers are still arriving)."""
        self.draining_since: float | None = None
        self._changed = asyncio.Event()
        """Set when a request ends or a connection closes (the drain looks again)."""

    def __len__(self) -> int:
        return len(self._open)

    @property
    def draining(self) -> bool:
        """Whether the drain began (SIGTERM): answers from now on close their connection."""
        return self.draining_since is not None

    def start_draining(self) -> None:
        """Answer every request from now on with `Connection: close`."""
        self.draining_since = time.monotonic()
        self._changed.set()

    async def drain(self, deadline: float, idle_grace_s: float = IDLE_GRACE_S) -> bool:
        """Answer what is sent on open connections until each is closed (by its client, after its answer, or
        idle for `idle_grace_s`); False if connections were still open at `deadline` (monotonic time)."""
        self.start_draining()
        while self._open:
            now = time.monotonic()
            for tracked in [t for t in self._open.values() if t.phase is _Phase.IDLE and not t.counted]:
                if now - tracked.last_activity >= idle_grace_s:
                    del self._open[tracked.inner]
                    tracked.close(f"idle for {idle_grace_s:g} s while draining")
            if not self._open:
                break
            if now >= deadline:
                return False
            idle_since = [t.last_activity for t in self._open.values() if t.phase is _Phase.IDLE and not t.counted]
            wake = min([deadline, *(since + idle_grace_s for since in idle_since)])
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, wake - now))
        return True

    def abort(self, reason: str) -> int:
        """Drop every open connection at once; returns how many there were."""
        dropped = list(self._open.values())
        self._open.clear()
        for tracked in dropped:
            tracked.close(reason)
        return len(dropped)

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """Wrap aiohttp's protocol factory (`runner.server`) so every connection is tracked."""
        return lambda: _Tracked(self, inner())

    def middleware(self) -> Middleware:
        """Mark a request's headers complete; count it in flight (from its first byte) until it is answered;
        while draining, close the connection after the answer."""

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            tracked = self._open.get(request.protocol)
            predict = request.path == "/predict"  # only predictions count as in flight once their headers are in
            if tracked is None:  # a connection not made by our sites (tests' in-process servers): count from here
                if predict:
                    self._begin()
            else:
                tracked.headers_complete(request.content if predict else None)
                if not predict:
                    self._end(tracked)
            try:
                response = await handler(request)
                if self.draining:
                    response.force_close()
                return response
            finally:
                if tracked is not None:
                    self._end(tracked)
                    tracked.request_done()
                elif predict:
                    self._finish()

        return middleware

    def _begin(self) -> None:
        self.in_flight += 1

    def _finish(self) -> None:
        self.in_flight -= 1
        self._changed.set()

    def _end(self, tracked: _Tracked) -> None:
        if tracked.counted:
            tracked.counted = False
            self._finish()

    def _admit(self, new: _Tracked) -> bool:
        """Make room for `new` at the cap; False if every open connection is answering a request."""
        if len(self._open) < self.max_connections:
            self._open[new.inner] = new
            return True
        candidates = [c for c in self._open.values() if not c.answering]
        if not candidates:
            return False
        victim = min(candidates, key=lambda c: (c.phase is not _Phase.IDLE, c.last_activity))
        self.evicted += 1
        del self._open[victim.inner]  # closing now: neither counted nor chosen again before it is gone
        victim.close(f"at the connection limit ({self.max_connections}), made room for a new connection")
        self._open[new.inner] = new
        return True

    def _forget(self, tracked: _Tracked) -> None:
        self._open.pop(tracked.inner, None)
        self._end(tracked)
        self._changed.set()


class _Tracked(asyncio.Protocol):
    """aiohttp's protocol for one connection, seen from outside: when bytes arrive, and what for."""

    def __init__(self, connections: Connections, inner: asyncio.Protocol) -> None:
        self.connections = connections
        self.inner = inner
        self.phase = _Phase.IDLE
        self.last_activity = time.monotonic()
        self.counted = False
        self.body: StreamReader | None = None
        self.transport: asyncio.BaseTransport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        admitted = self.connections._admit(self)
        self.inner.connection_made(transport)
        if not admitted:
            self.close("at the connection limit with every connection busy")
            return
        self._arm_deadline()

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.phase is _Phase.IDLE and data:
            self.phase = _Phase.HEADERS
            if not self.counted:
                self.counted = True
                self.connections._begin()
            self._arm_deadline()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self.connections._forget(self)
        self.inner.connection_lost(exc)

    def headers_complete(self, body: StreamReader | None) -> None:
        """A request reached the application: stop the header deadline. A prediction's `body` is still arriving;
        other requests are answered at once."""
        self._cancel_deadline()
        self.phase = _Phase.BODY if body is not None else _Phase.ANSWERING
        self.body = body

    @property
    def answering(self) -> bool:
        """Whether the connection's request is complete and being answered (then it is never evicted)."""
        body_complete = self.phase is _Phase.BODY and self.body is not None and self.body.is_eof()
        return self.phase is _Phase.ANSWERING or body_complete

    def request_done(self) -> None:
        """The request was answered; the connection waits for the next one (keep-alive)."""
        self.phase = _Phase.IDLE
        self.body = None
        self.last_activity = time.monotonic()
        self.connections._changed.set()

    def close(self, reason: str) -> None:
        """Drop the connection at once (a stalled peer gets no lingering close)."""
        log.debug("closing a connection (%s): %s", self.phase.value, reason)
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.abort()
        elif self.transport is not None:
            self.transport.close()

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        if self.connections.header_timeout_s > 0:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(self.connections.header_timeout_s, self._header_deadline)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_deadline(self) -> None:
        self._deadline = None
        if self.phase in (_Phase.IDLE, _Phase.HEADERS):
            self.connections.timed_out += 1
            self.close(f"no complete request headers within {self.connections.header_timeout_s:g} s")


class TrackedSite(web.SockSite):
    """A listening socket whose connections `connections` tracks (aiohttp's SockSite, wrapped protocol)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        connections: Connections,
        *,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self._connections = connections

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner; SockSite.start would also listen
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._connections.protocol_factory(server), sock=self._sock, ssl=self._ssl_context, backlog=LISTEN_BACKLOG
        )
