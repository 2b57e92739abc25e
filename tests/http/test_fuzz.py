"""Hundreds (IMMICH_ML_FUZZ_EXAMPLES: thousands) of malformed requests against the real daemon process;
afterwards it still answers and its memory stayed bounded. The figures go to the test output (`-s`) and to
docs/security.md (measured with IMMICH_ML_FUZZ_EXAMPLES=3000)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import modelgen
from tests.conftest import CLIP
from tests.daemonproc import Daemon, KeepAlive, multipart

EXAMPLES = int(os.environ.get("IMMICH_ML_FUZZ_EXAMPLES", "300"))
"""Requests per run: 300 by default so the suite stays fast; the long run for docs/security.md uses 3000."""
RSS_GROWTH_LIMIT = 64 * 1024**2

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=12,
)
_entries = st.one_of(
    _json,
    st.dictionaries(
        st.sampled_from(["clip", "facial-recognition", "ocr", "x"]),
        st.dictionaries(
            st.sampled_from(["visual", "textual", "detection", "recognition", ""]),
            st.fixed_dictionaries(
                {"modelName": st.sampled_from([CLIP, "", "../../etc", "nope"])}, optional={"options": _json}
            ),
            max_size=3,
        ),
        max_size=3,
    ),
)
_image = st.one_of(
    st.binary(max_size=2048),
    st.builds(
        lambda data, cut: data[:cut],
        st.just(modelgen.jpeg_bytes(modelgen.make_gradient_image(32, 24))),
        st.integers(0, 2000),
    ),
    st.builds(
        lambda data, junk: data[:64] + junk,
        st.just(modelgen.png_bytes(modelgen.make_gradient_image(16, 16))),
        st.binary(max_size=256),
    ),
)


@st.composite
def _requests(draw: st.DrawFn) -> tuple[bytes, str]:
    """A body and Content-Type: a plausible multipart with random parts, or random bytes."""
    kind = draw(st.sampled_from(["form", "form", "form", "raw"]))
    if kind == "raw":
        boundary = uuid.uuid4().hex
        return draw(st.binary(max_size=4096)), draw(
            st.sampled_from(
                [f"multipart/form-data; boundary={boundary}", "multipart/form-data", "application/json", "text/plain"]
            )
        )
    entries = json.dumps(draw(_entries)).encode()
    image = draw(st.none() | _image)
    text = draw(st.none() | st.text(max_size=200))
    body, content_type = multipart(entries, image=image, text=text if image is None else None)
    if draw(st.booleans()):  # damage the framing too
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=64)) + body[cut:]
    return body, content_type


def test_malformed_requests_leave_the_daemon_healthy_and_bounded(tmp_path: Path) -> None:
    modelgen.write_clip(tmp_path / "cache", CLIP)
    daemon = Daemon(
        tmp_path,
        tmp_path / "cache",
        {"MACHINE_LEARNING_PRELOAD__CLIP__VISUAL": CLIP, "MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL": CLIP},
    )
    statuses: dict[int, int] = {}
    connection = KeepAlive(daemon)
    try:
        daemon.wait_ready()
        image = modelgen.jpeg_bytes(modelgen.make_gradient_image(64, 48))
        assert daemon.predict({"clip": {"visual": {"modelName": CLIP}}}, image=image)[0] == 200
        rss_before = daemon.rss_bytes()

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(_requests())
        def send(request: tuple[bytes, str]) -> None:
            status = connection.post(*request)
            statuses[status] = statuses.get(status, 0) + 1
            assert status != 500 or False, "a malformed request must never be a server error"

        send()
        rss_after = daemon.rss_bytes()
        print(
            f"\nfuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}, "
            f"RSS {rss_before / 2**20:.1f} MiB before, {rss_after / 2**20:.1f} MiB after, "
            f"peak {daemon.peak_rss_bytes() / 2**20:.1f} MiB"
        )
        assert sum(statuses.values()) >= EXAMPLES
        assert daemon.process.poll() is None
        status, body = daemon.predict({"clip": {"visual": {"modelName": CLIP}}}, image=image)
        assert status == 200 and len(body["clip"].split(",")) == 512
        assert rss_after - rss_before < RSS_GROWTH_LIMIT
    finally:
        connection.close()
        assert daemon.stop() == 0, daemon.log()
