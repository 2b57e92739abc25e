"""Rendering results: an aligned table for people, JSON for machines."""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Sequence

from immich_ml.gpu_check.results import Check, Result, Status

__all__ = ["render_json", "render_table"]

_COLOURS = {Status.PASS: "32", Status.WARN: "33", Status.FAIL: "31", Status.SKIP: "2"}


def render_table(rows: Sequence[tuple[Check, Result]], *, colour: bool) -> str:
    """One row per check (number, name, status, detail), a `fix:` line under failures and warnings."""
    width = max(60, shutil.get_terminal_size((120, 24)).columns)
    name_width = max(len(check.name) for check, _ in rows)
    indent = 4 + name_width + 2 + 9
    lines = [f"{'#':>2}  {'check':<{name_width}}  {'status':<8} detail"]
    for number, (check, result) in enumerate(rows, 1):
        status = f"{result.status.value:<8}"
        if colour:
            status = f"\033[{_COLOURS[result.status]}m{status}\033[0m"
        lines.append(f"{number:>2}  {check.name:<{name_width}}  {status} " + _wrap(result.detail, width, indent))
        if result.fix and result.status in (Status.FAIL, Status.WARN):
            lines.append(" " * indent + _wrap(f"fix: {result.fix}", width, indent))
    counts = {status: sum(r.status is status for _, r in rows) for status in Status}
    lines.append("")
    lines.append(
        ", ".join(f"{counts[s]} {s.value}" for s in Status) + ("  =>  FAILED" if counts[Status.FAIL] else "  =>  OK")
    )
    return "\n".join(lines)


def render_json(rows: Sequence[tuple[Check, Result]], *, url: str) -> str:
    """`{"ok": bool, "url": str, "checks": [{"name", "title", "status", "detail", "fix", "data"}]}`."""
    return json.dumps(
        {
            "ok": not any(result.status is Status.FAIL for _, result in rows),
            "url": url,
            "checks": [
                {
                    "name": check.name,
                    "title": check.title,
                    "status": result.status.value,
                    "detail": result.detail,
                    "fix": result.fix,
                    "data": result.data,
                }
                for check, result in rows
            ],
        },
        indent=2,
        default=str,
    )


def _wrap(text: str, width: int, indent: int) -> str:
    wrapped = textwrap.wrap(text, max(30, width - indent), break_on_hyphens=False) or [""]
    return ("\n" + " " * indent).join(wrapped)
