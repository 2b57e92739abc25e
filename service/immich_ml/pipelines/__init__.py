"""Which model class serves which (task, model type)."""

from __future__ import annotations

from immich_ml.models.tasks import ModelType, Task
from immich_ml.pipelines.base import InferenceModel
from immich_ml.pipelines.clip.model import ClipTextual, ClipVisual
from immich_ml.pipelines.faces.model import FaceDetector, FaceRecognizer
from immich_ml.pipelines.ocr.model import TextDetector, TextRecognizer

__all__ = ["MODEL_CLASSES", "InferenceModel"]

MODEL_CLASSES: dict[tuple[Task, ModelType], type[InferenceModel]] = {
    (Task.CLIP, ModelType.VISUAL): ClipVisual,
    (Task.CLIP, ModelType.TEXTUAL): ClipTextual,
    (Task.FACIAL_RECOGNITION, ModelType.DETECTION): FaceDetector,
    (Task.FACIAL_RECOGNITION, ModelType.RECOGNITION): FaceRecognizer,
    (Task.OCR, ModelType.DETECTION): TextDetector,
    (Task.OCR, ModelType.RECOGNITION): TextRecognizer,
}
