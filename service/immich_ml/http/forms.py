"""Read a predict request's form (multipart, or urlencoded for simple text clients) within its limits.

Every byte counts after inflating (`Content-Encoding: gzip`/`deflate` bodies are inflated as they are read,
in bounded steps: `http.inflate`): a part over its limit, or a body whose parts together exceed
MACHINE_LEARNING_MAX_BODY_SIZE, is refused with 413 as soon as it crosses the limit, skipped parts included.
The whole body must arrive within MACHINE_LEARNING_BODY_TIMEOUT_S (408 otherwise).
"""

from __future__ import annotations

import asyncio
import codecs
import urllib.parse

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web

from immich_ml.errors import BadRequest, InvalidEntries, PayloadTooLarge, RequestTimeout
from immich_ml.http.inflate import inflated_body
from immich_ml.http.metrics import METRICS
from immich_ml.predict.entries import parse_entries
from immich_ml.predict.predictor import PredictInput

__all__ = ["TEXT_LIMIT", "read_form"]

TEXT_LIMIT = 1024 * 1024
"""Largest `entries` or `text` field: small fields, like upstream's 1 MiB form-field limit."""

_FIELDS = ("entries", "image", "text")
_CHUNK = 256 * 1024
_FRAMING = 64 * 1024  # an inflated body's multipart boundaries and part headers, beyond its parts' bytes


class _Budget:
    """Bytes a body may still deliver (after inflating), across all of its parts."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def take(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise PayloadTooLarge(f"Body exceeds {self.limit} bytes after decoding (MACHINE_LEARNING_MAX_BODY_SIZE)")


async def read_form(request: web.Request, *, max_body_size: int, timeout_s: float) -> PredictInput:
    """`entries` and `image`/`text` of the request; 400/408/413/422 for bodies that are not a usable form."""
    _check_charset(request.charset)
    budget = _Budget(max_body_size + 2 * TEXT_LIMIT)
    try:
        inflated = inflated_body(request, limit=budget.limit + _FRAMING, counter=request.app[METRICS].inflated)
        async with asyncio.timeout(timeout_s), inflated as body:
            if request.content_type == "application/x-www-form-urlencoded":
                fields = await _read_urlencoded(body, request.charset or "utf-8")
            elif request.content_type.startswith("multipart/"):
                fields = await _read_multipart(request, body, max_body_size, budget)
            else:
                raise InvalidEntries("Invalid request format. Expected multipart/form-data with an 'entries' part.")
    except TimeoutError:
        raise RequestTimeout(f"Request body not received within {timeout_s:g} s") from None
    if "entries" not in fields:
        raise InvalidEntries("Invalid request format. The 'entries' field is required.")
    if fields.get("text") == b"":
        del fields["text"]  # an empty form field counts as absent, as in upstream's form parsing
    if "image" not in fields and "text" not in fields:
        raise BadRequest("Either image or text must be provided")
    text = fields["text"].decode("utf-8", errors="replace") if "text" in fields else None
    entries = fields["entries"]
    return PredictInput(entries=entries, plans=parse_entries(entries), image=fields.get("image"), text=text)


def _check_charset(charset: str | None) -> None:
    if charset is None:
        return
    try:
        codecs.lookup(charset)
    except LookupError:
        raise BadRequest(f"Unknown charset {charset[:40]!r}") from None


async def _read_urlencoded(content: StreamReader, charset: str) -> dict[str, bytes]:
    limit = 2 * TEXT_LIMIT + 64 * 1024  # entries and text, plus the form's own syntax
    body = bytearray()
    while chunk := await content.read(_CHUNK):
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"Form exceeds {limit} bytes ('entries' and 'text' are limited to {TEXT_LIMIT} each)")
    try:
        pairs = urllib.parse.parse_qsl(body.decode(charset), keep_blank_values=True, encoding=charset, errors="strict")
    except UnicodeError as error:
        raise BadRequest(f"Form is not valid {charset}: {error}") from None
    fields = {name: value.encode() for name, value in pairs if name in ("entries", "text")}
    for name, value in fields.items():
        if len(value) > TEXT_LIMIT:
            raise PayloadTooLarge(f"Field '{name}' exceeds {TEXT_LIMIT} bytes")
    return fields


async def _read_multipart(
    request: web.Request, content: StreamReader, max_body_size: int, budget: _Budget
) -> dict[str, bytes]:
    fields: dict[str, bytes] = {}
    try:
        reader = MultipartReader(request.headers, content)
        while (part := await reader.next()) is not None:
            if isinstance(part, BodyPartReader) and part.name in _FIELDS:
                limit = max_body_size if part.name == "image" else TEXT_LIMIT
                fields[part.name] = await _read_part(part, limit, budget)
            else:  # unknown fields and nested multiparts are ignored, like upstream, but their bytes count
                await _skip(part, budget)
    except (ValueError, AssertionError) as error:  # aiohttp's multipart parser on bad framing
        raise BadRequest(f"Malformed multipart body: {error}") from None
    return fields


async def _read_part(part: BodyPartReader, limit: int, budget: _Budget, *, keep: bool = True) -> bytes:
    chunks = []
    size = 0
    while chunk := await part.read_chunk(_CHUNK):
        size += len(chunk)
        budget.take(len(chunk))
        if size > limit:
            raise PayloadTooLarge(f"Part '{part.name}' exceeds {limit} bytes (MACHINE_LEARNING_MAX_BODY_SIZE)")
        if keep:
            chunks.append(chunk)
    return b"".join(chunks)


async def _skip(part: BodyPartReader | MultipartReader, budget: _Budget) -> None:
    if isinstance(part, BodyPartReader):
        await _read_part(part, budget.limit, budget, keep=False)
        return
    while (inner := await part.next()) is not None:
        await _skip(inner, budget)
