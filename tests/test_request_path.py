"""scripts/request_path.py: its tracer on a synthetic package, and the four request paths it measures."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "request_path.py"
REQUESTS = ("CLIP visual", "CLIP textual", "faces", "OCR")

_SYNTHETIC = {
    "__init__.py": "",
    "a.py": """
import asyncio
from concurrent.futures import ThreadPoolExecutor

from synthpkg import b, c


async def run() -> None:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1) as pool:
        await loop.run_in_executor(pool, b.work)  # a thread-pool job: called by a
    task = asyncio.create_task(b.step())  # a task's first step: called by a
    task.add_done_callback(b.done)  # run by the event loop, registered by a
    await task
    for _ in range(3):
        b.helper()  # one edge, three calls
    c.relay()  # b's second caller
""",
    "b.py": """
import asyncio


def work() -> int:
    return helper()


def helper() -> int:
    return 1


async def step() -> int:
    await asyncio.sleep(0)  # resuming is not a new call
    return helper()


def done(task: object) -> None:
    pass
""",
    "c.py": """
from synthpkg import b


def relay() -> None:
    b.helper()
""",
}


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("request_path", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scheduled_work_is_called_by_the_module_that_scheduled_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "synthpkg"
    package.mkdir()
    for name, text in _SYNTHETIC.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    synthetic = importlib.import_module("synthpkg.a")
    tool = _tool()
    tracer = tool.Tracer("synthpkg")
    with tool.tracing(tracer):
        tracer.on = True
        asyncio.run(synthetic.run())
    for name in ("synthpkg", "synthpkg.a", "synthpkg.b", "synthpkg.c"):
        monkeypatch.delitem(sys.modules, name)

    assert tracer.summary() == {
        "files": ["a.py", "b.py", "c.py"],
        "edges": [
            {"caller": "a.py", "module": "b.py", "calls": 6},  # work, step, done, helper ×3
            {"caller": "a.py", "module": "c.py", "calls": 1},
            {"caller": "c.py", "module": "b.py", "calls": 1},
            {"caller": "outside", "module": "a.py", "calls": 1},  # asyncio.run's task
        ],
        "entered_from_more_than_one_place": {"b.py": ["a.py", "c.py"]},
        "old_entries_from_another_file": 9,  # the old measure: run, work, step, done, helper ×3, relay, helper
    }


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tool's JSON for the four requests, from one run of the script."""
    output = tmp_path_factory.mktemp("request_path") / "paths.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(output)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert all(name in run.stdout for name in REQUESTS), run.stdout
    paths: dict[str, Any] = json.loads(output.read_text())
    return paths


def test_every_request_runs_code_in_modules_reached_from_outside(paths: dict[str, Any]) -> None:
    assert sorted(paths) == sorted(REQUESTS)
    for name, path in paths.items():
        assert path["files"], name
        reached = {"outside"}
        while new := {e["module"] for e in path["edges"] if e["caller"] in reached} - reached:
            reached |= new
        assert set(path["files"]) <= reached, name
        calls = sum(e["calls"] for e in path["edges"])
        assert path["old_entries_from_another_file"] >= calls, name  # every call between modules is one


@pytest.mark.parametrize("name", REQUESTS)
def test_no_module_of_a_request_path_is_entered_from_more_than_one_place(paths: dict[str, Any], name: str) -> None:
    assert paths[name]["entered_from_more_than_one_place"] == {}
