"""What a check returns, and how checks are declared."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from immich_ml.gpu_check.context import Context

__all__ = ["Check", "Result", "Status"]


class Status(StrEnum):
    """Outcome of one check; only FAIL makes the command exit non-zero."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skipped"


@dataclass(frozen=True)
class Result:
    """One row of the report: a status, a one-line detail, a one-line fix for failures and warnings."""

    status: Status
    detail: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def passed(cls, detail: str, **data: Any) -> Result:
        return cls(Status.PASS, detail, data=data)

    @classmethod
    def failed(cls, detail: str, fix: str, **data: Any) -> Result:
        return cls(Status.FAIL, detail, fix, data=data)

    @classmethod
    def warned(cls, detail: str, fix: str = "", **data: Any) -> Result:
        return cls(Status.WARN, detail, fix, data=data)

    @classmethod
    def skipped(cls, reason: str, **data: Any) -> Result:
        return cls(Status.SKIP, reason, data=data)


@dataclass(frozen=True)
class Check:
    """A named check: `name` is what `--skip`/`--only` take, `title` what the table shows."""

    name: str
    title: str
    run: Callable[[Context], Result]
