"""The `entries` JSON of a predict request, parsed into the models to run and the order to run them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from immich_ml.errors import DependencyMissing, InvalidEntries
from immich_ml.models.catalog import served_key
from immich_ml.models.tasks import DEPENDS_ON, TASK_TYPES, ModelKey, ModelType, Task

__all__ = ["Entry", "TaskPlan", "parse_entries"]

_INVALID = "Invalid request format."
_MAX_NAME_BYTES = 200
"""Longest model name: it becomes a folder name (255 bytes at most on Linux file systems)."""


@dataclass(frozen=True)
class Entry:
    """One model to run, with this request's options for it."""

    key: ModelKey
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskPlan:
    """The models of one task in run order: a first model, then optionally one that consumes its output
    (`DEPENDS_ON`)."""

    task: Task
    first: Entry
    second: Entry | None = None


def parse_entries(raw: str | bytes) -> list[TaskPlan]:
    """Validate `entries` like upstream: bad JSON or shape → 422; a dependent model alone → 400."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidEntries(_INVALID) from None
    if not isinstance(document, dict):
        raise InvalidEntries(_INVALID)
    return [_plan(task_name, models) for task_name, models in document.items()]


def _plan(task_name: str, models: Any) -> TaskPlan:
    try:
        task = Task(task_name)
    except ValueError:
        raise InvalidEntries(f"{_INVALID} Unknown task '{task_name}'.") from None
    if not isinstance(models, dict) or not models:
        raise InvalidEntries(_INVALID)
    entries = {
        model_type: _entry(task, type_name, spec)
        for type_name, spec in models.items()
        for model_type in (_model_type(task, type_name),)
    }
    dependents = [t for t in entries if (task, t) in DEPENDS_ON]
    independents = [t for t in entries if (task, t) not in DEPENDS_ON]
    for dependent in dependents:
        needed = DEPENDS_ON[(task, dependent)]
        if needed not in entries:
            raise DependencyMissing(f"Task {task} of type {dependent} depends on output of {needed}")
    if len(independents) != 1 or len(dependents) > 1:
        raise InvalidEntries(f"{_INVALID} Task '{task}' accepts one model type per request.")
    second = entries[dependents[0]] if dependents else None
    return TaskPlan(task, entries[independents[0]], second)


def _model_type(task: Task, type_name: str) -> ModelType:
    try:
        model_type = ModelType(type_name)
    except ValueError:
        raise InvalidEntries(f"{_INVALID} Unknown model type '{type_name}' for task '{task}'.") from None
    if model_type not in TASK_TYPES[task]:
        raise InvalidEntries(f"{_INVALID} Unknown model type '{type_name}' for task '{task}'.")
    return model_type


def _entry(task: Task, type_name: str, spec: Any) -> Entry:
    if not isinstance(spec, dict):
        raise InvalidEntries(_INVALID)
    name = spec.get("modelName")
    options = spec.get("options", {})
    if not isinstance(name, str) or not name.strip() or not isinstance(options, dict):
        raise InvalidEntries(_INVALID)
    if len(name.encode()) > _MAX_NAME_BYTES or not name.isprintable():
        raise InvalidEntries(f"{_INVALID} 'modelName' must be printable and at most {_MAX_NAME_BYTES} bytes.")
    return Entry(served_key(task, ModelType(type_name), name.strip()), options)
