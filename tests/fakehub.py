"""A local stand-in for the Hugging Face hub's file API (the endpoints `snapshot_download` calls).

It serves the files of a folder per repository and records what was asked, so tests can count downloads,
break a transfer half-way, or hold one half-way until the test lets it finish.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    """Repositories (`org/name` → folder) and the behaviour of the next downloads."""

    repos: dict[str, Path] = field(default_factory=dict)
    downloads: Counter[str] = field(default_factory=Counter)
    truncations: Counter[str] = field(default_factory=Counter)
    held: dict[str, asyncio.Event] = field(default_factory=dict)
    """Paths whose transfer stops after the first half until the event is set (a slow link, held still)."""

    def files(self, repo: str) -> dict[str, bytes]:
        root = self.repos[repo]
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}/revision/{revision}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{revision}", self._tree)
        app.router.add_route("*", "/{org}/{name}/resolve/{revision}/{path:.*}", self._resolve)
        return app

    def _repo(self, request: web.Request) -> str:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"})
        return repo

    async def _info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        siblings = [{"rfilename": name} for name in self.files(repo)]
        return web.json_response({"id": repo, "sha": _COMMIT, "siblings": siblings})

    async def _tree(self, request: web.Request) -> web.Response:
        files = self.files(self._repo(request))
        return web.json_response(
            [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in files.items()
            ]
        )

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        path = request.match_info["path"]
        data = self.files(repo).get(path)
        if data is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        headers = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": _COMMIT}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        self.downloads[f"{repo}/{path}"] += 1
        if self.truncations[path] > 0:  # announce the full size, send half, then drop the connection
            self.truncations[path] -= 1
            response = web.StreamResponse(headers={**headers, "Content-Length": str(len(data))})
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        if path in self.held:
            response = web.StreamResponse(headers={**headers, "Content-Length": str(len(data))})
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            await self.held[path].wait()
            await response.write(data[len(data) // 2 :])
            await response.write_eof()
            return response
        return web.Response(body=data, headers=headers)
