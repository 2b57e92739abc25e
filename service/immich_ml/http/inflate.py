"""Request bodies sent with `Content-Encoding: gzip` or `deflate`, inflated here rather than by aiohttp.

aiohttp's own inflation runs inside the protocol's `data_received`: a small compressed body that inflates to
gigabytes held the event loop for seconds (`/ping` unanswered meanwhile) and went on past the body limit. Here
the daemon reads the raw body (`auto_decompress=False`) and a task inflates it in steps of at most `STEP_BYTES`
of output, yielding to the event loop after each, reading more compressed input only when the last is used
up, pausing while more than two steps wait unread, and refusing (413) as soon as the output passes the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator

from aiohttp import StreamReader, hdrs, web
from prometheus_client import Counter

from immich_ml.errors import BadRequest, PayloadTooLarge

__all__ = ["STEP_BYTES", "inflated_body"]

STEP_BYTES = 256 * 1024
"""The most output one inflation step produces before the event loop runs other work."""
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_IDENTITY = ("", "identity")


@contextlib.asynccontextmanager
async def inflated_body(request: web.Request, *, limit: int, counter: Counter) -> AsyncIterator[StreamReader]:
    """The request's body as its form is read: the raw stream, or for gzip/deflate the inflated one, which
    fails with 413 once more than `limit` bytes come out; `counter` counts the bytes inflated as they come.
    Leaving the block stops the inflation."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if encoding in _IDENTITY:
        yield request.content
        return
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise BadRequest(f"Unsupported Content-Encoding {encoding[:40]!r}: send gzip, deflate or none")
    valve = _Valve()
    inflated = StreamReader(valve, STEP_BYTES, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    inflating = _inflate(request.content, _Output(inflated, valve, counter, limit), encoding)
    pump = asyncio.create_task(inflating, name="inflate")
    try:
        yield inflated
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


class _Valve:
    """The flow control `StreamReader` drives: it pauses the inflation while the reader has enough waiting."""

    connected = True  # the reader may wait for data (the raw stream's own connection is aiohttp's)

    def __init__(self) -> None:
        self._reading_paused = False
        self.open = asyncio.Event()
        self.open.set()

    def pause_reading(self) -> None:
        self._reading_paused = True
        self.open.clear()

    def resume_reading(self, *_: object, **__: object) -> None:
        self._reading_paused = False
        self.open.set()


class _Output:
    """Where inflated bytes go: the reader's stream, within the limit, counted, paced by the reader."""

    def __init__(self, stream: StreamReader, valve: _Valve, counter: Counter, limit: int) -> None:
        self.stream = stream
        self.valve = valve
        self.counter = counter
        self.limit = limit
        self.produced = 0

    async def put(self, piece: bytes) -> None:
        """Hand one step's output over, then let the event loop run others and wait while the reader is full."""
        self.produced += len(piece)
        self.counter.inc(len(piece))
        if self.produced > self.limit:
            raise PayloadTooLarge(f"Body exceeds {self.limit} bytes after decoding (MACHINE_LEARNING_MAX_BODY_SIZE)")
        if piece:
            self.stream.feed_data(piece)
        await asyncio.sleep(0)
        await self.valve.open.wait()


async def _inflate(source: StreamReader, out: _Output, encoding: str) -> None:
    """Feed `out` with `source` inflated, step by step; errors reach the reader as its stream's exception."""
    inflater: zlib._Decompress | None = None
    try:
        while not (inflater is not None and inflater.eof) and (data := await source.readany()):
            inflater = inflater or zlib.decompressobj(_wbits(encoding, data[0]))
            while data and not inflater.eof:
                await out.put(inflater.decompress(data, STEP_BYTES))
                data = inflater.unconsumed_tail
        if inflater is None or not inflater.eof:
            raise BadRequest(f"Malformed request body: the {encoding} stream is truncated")
        out.stream.feed_eof()
    except zlib.error as error:
        out.stream.set_exception(BadRequest(f"Malformed request body: it does not inflate as {encoding} ({error})"))
    except Exception as error:  # over the limit, truncated, or the raw stream failed (the client left, bad framing)
        out.stream.set_exception(error)


def _wbits(encoding: str, first: int) -> int:
    """zlib's window setting: gzip framing; for deflate the zlib wrapper, or raw deflate as some clients send."""
    if encoding != "deflate":
        return _GZIP_WBITS
    return zlib.MAX_WBITS if first & 0x0F == 8 else -zlib.MAX_WBITS
