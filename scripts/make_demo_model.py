#!/usr/bin/env python3
"""Write server/assets/demo.onnx, the model ferrite-server embeds and serves as
`demo` when started without --model-repository / --model.

A tiny classifier: input `input` FP32 [-1, 4] -> Gemm(4x16) -> Relu ->
Gemm(16x3) -> Softmax -> output `probabilities` FP32 [-1, 3]. Weights come from
a fixed seed, so re-running this script reproduces the committed file byte for
byte. `demo_reference(x)` computes the expected output in numpy (the tests use
it).

Usage: python scripts/make_demo_model.py [OUTPUT_PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20240601
HIDDEN = 16
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "server" / "assets" / "demo.onnx"


def demo_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {
        "fc1_w": (rng.standard_normal((4, HIDDEN)) * 0.5).astype(np.float32),
        "fc1_b": (rng.standard_normal((HIDDEN,)) * 0.1).astype(np.float32),
        "fc2_w": (rng.standard_normal((HIDDEN, 3)) * 0.5).astype(np.float32),
        "fc2_b": (rng.standard_normal((3,)) * 0.1).astype(np.float32),
    }


def make_demo_model() -> onnx.ModelProto:
    w = demo_weights()
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])
    g = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "fc1_w", "fc1_b"], ["h"]),
            helper.make_node("Relu", ["h"], ["hr"]),
            helper.make_node("Gemm", ["hr", "fc2_w", "fc2_b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "ferrite_demo",
        [x],
        [y],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9, producer_name="ferrite-demo")
    onnx.checker.check_model(m)
    return m


def demo_reference(x: np.ndarray) -> np.ndarray:
    w = demo_weights()
    h = np.maximum(x.astype(np.float32) @ w["fc1_w"] + w["fc1_b"], 0.0)
    logits = h @ w["fc2_w"] + w["fc2_b"]
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DEFAULT_PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(make_demo_model(), str(out))
    try:  # sanity check against onnxruntime when it is installed
        import onnxruntime as ort

        x = np.array([[0.1, 0.2, 0.3, 0.4], [-1.0, 2.0, 0.5, -0.5]], dtype=np.float32)
        (y,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})
        np.testing.assert_allclose(y, demo_reference(x), rtol=1e-5, atol=1e-6)
    except ImportError:
        pass
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
