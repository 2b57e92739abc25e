"""The image's own commands outside a container: where the healthcheck asks, and what taking over a cache changes
(tests/containers/ runs both in the real image)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from immich_ml.container.healthcheck import ping_url
from immich_ml.container.ownership import take_ownership
from immich_ml.settings import Settings


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:3003/ping"),
        ("::", "http://127.0.0.1:3003/ping"),
        ("[::]", "http://127.0.0.1:3003/ping"),
        ("10.1.2.3", "http://10.1.2.3:3003/ping"),
        ("fd00::5", "http://[fd00::5]:3003/ping"),
    ],
)
def test_the_healthcheck_asks_where_the_daemon_listens(host: str, url: str) -> None:
    assert ping_url(Settings(host=host)) == url


def test_the_healthcheck_speaks_tls_when_the_daemon_does(tmp_path: Path) -> None:
    settings = Settings(host="0.0.0.0", port=3443, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    assert ping_url(settings) == "https://127.0.0.1:3443/ping"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_taking_over_a_cache_changes_owners_inside_it_only(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(b"x")
    cache = tmp_path / "cache"
    (cache / "clip" / "m" / "visual").mkdir(parents=True)
    (cache / "clip" / "m" / "visual" / "model.onnx").write_bytes(b"x")
    (cache / "link").symlink_to(outside)
    (cache / "folder-link").symlink_to(tmp_path)

    assert take_ownership(cache, 12345, 23456) == 7  # 4 folders, the model, 2 links
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [cache, *cache.rglob("*")]}
    assert owners == {(12345, 23456)}
    assert outside.stat().st_uid == 0 and tmp_path.stat().st_uid == 0  # links were not followed
    assert take_ownership(cache, 12345, 23456) == 0  # the next start changes nothing


def test_a_missing_cache_is_created(tmp_path: Path) -> None:
    cache = tmp_path / "new" / "cache"
    take_ownership(cache, os.getuid(), os.getgid())
    assert cache.is_dir()
