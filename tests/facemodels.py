"""A face-detection stand-in that modelgen does not make: SCRFD outputs with a real (symbolic) batch axis."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests import modelgen

__all__ = ["write_batched_scrfd"]


def write_batched_scrfd(root: Path, name: str, faces: Iterable[modelgen.Face]) -> Path:
    """Like `modelgen.write_scrfd`, but every output is `[batch, rows, k]`: the same faces for each image."""
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["input_mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["input_mean", "per_image"], ["input_column"]),
        helper.make_node("Mul", ["input_column", "zero"], ["input_zero"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([-1, 1, 1], dtype=np.int64), "per_image"),
    ]
    outputs = []
    arrays = modelgen.scrfd_outputs(faces)
    for out_name, array in zip(modelgen.SCRFD_OUTPUT_NAMES, arrays, strict=True):
        initializers.append(numpy_helper.from_array(array[None], f"{out_name}_const"))
        nodes.append(helper.make_node("Add", [f"{out_name}_const", "input_zero"], [out_name]))
        outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", *array.shape]))
    graph = helper.make_graph(
        nodes,
        "scrfd_batched",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, 640, 640])],
        outputs,
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    model_dir = root / "facial-recognition" / name
    (model_dir / "detection").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(model_dir / "detection" / "model.onnx"))
    return model_dir
