"""Copies an ONNX model with a dynamic batch dimension, so that ferrite's
dynamic batcher can join requests: dimension 0 of every graph input and
output becomes the symbol "batch", and every Reshape whose target shape is a
constant starting with the old batch size of 1 gets -1 there instead.

Usage: python scripts/make_dynamic_batch.py IN.onnx OUT.onnx
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import numpy_helper


def make_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    reshape_shapes = {node.input[1] for node in model.graph.node if node.op_type == "Reshape"}
    for init in model.graph.initializer:
        if init.name in reshape_shapes:
            shape = numpy_helper.to_array(init).copy()
            if shape.ndim == 1 and len(shape) > 0 and shape[0] == 1:
                shape[0] = -1
                init.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), init.name))
    # Stale shape annotations of intermediate values would pin the batch.
    del model.graph.value_info[:]
    return model


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    model = make_dynamic(onnx.load(source))
    onnx.checker.check_model(model)
    onnx.save(model, target)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
