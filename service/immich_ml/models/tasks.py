"""Names from Immich's domain: tasks, their model types and dependencies, and the key of one loaded model."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["DEPENDS_ON", "TASK_TYPES", "ModelKey", "ModelType", "Task"]


class Task(StrEnum):
    """The `entries` top-level keys the Immich server sends."""

    CLIP = "clip"
    FACIAL_RECOGNITION = "facial-recognition"
    OCR = "ocr"


class ModelType(StrEnum):
    """The second-level keys of `entries`: which model of a task to run."""

    VISUAL = "visual"
    TEXTUAL = "textual"
    DETECTION = "detection"
    RECOGNITION = "recognition"


TASK_TYPES: dict[Task, tuple[ModelType, ModelType]] = {
    Task.CLIP: (ModelType.VISUAL, ModelType.TEXTUAL),
    Task.FACIAL_RECOGNITION: (ModelType.DETECTION, ModelType.RECOGNITION),
    Task.OCR: (ModelType.DETECTION, ModelType.RECOGNITION),
}
"""The model types each task has."""

DEPENDS_ON: dict[tuple[Task, ModelType], ModelType] = {
    (Task.FACIAL_RECOGNITION, ModelType.RECOGNITION): ModelType.DETECTION,
    (Task.OCR, ModelType.RECOGNITION): ModelType.DETECTION,
}
"""Within a task, the model of the key's type consumes the output of the model of the value's type."""


@dataclass(frozen=True, slots=True)
class ModelKey:
    """Identifies one model: its task, its type within the task and its cleaned name."""

    task: Task
    type: ModelType
    name: str

    def __str__(self) -> str:
        return f"{self.task}/{self.name}/{self.type}"
