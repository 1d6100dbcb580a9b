#!/usr/bin/env python3
"""Build the small ONNX models used by ferrite-server's integration tests.

Usage:  python scripts/make_test_models.py OUTDIR

OUTDIR becomes a Triton-style model repository:

    OUTDIR/<model>/<version>/model.onnx
    OUTDIR/<model>/ferrite.json          (optional per-model settings)

Also importable: ``build_repository(outdir)`` and the numpy reference helpers
(``mlp_reference``, ``calc_reference``, ``strings_reference``...) are what the
tests use to compute expected outputs.

Every model is plain ONNX (opset 17, opset 20 for the string model) with
ir_version 9, which the pinned onnxruntime (1.31) loads.  All of them were
checked to load and run in onnxruntime's Python API; ``python
scripts/make_test_models.py --check OUTDIR`` repeats that check.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 9
OPSET = 17

# Triton datatype -> (ONNX element type, numpy dtype used on the client side).
# Every one of these runs through an ONNX Identity node in onnxruntime 1.31 on
# CPU (checked by --check). BF16 has no numpy dtype: tritonclient sends it from
# float32 arrays (truncating to the upper 16 bits), so the numpy dtype here is
# float32; ml_dtypes.bfloat16 is used for the onnxruntime check.
DATATYPES: dict[str, tuple[int, object]] = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "BF16": (TensorProto.BFLOAT16, np.float32),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, np.object_),
}

IDENTITY_WIDTH = 4
ADD_SUB_WIDTH = 16
MLP_IN, MLP_HIDDEN, MLP_OUT = 16, 32, 8
MLP_SEED = 1234
SLOW_WIDTH = 64


def identity_model_name(datatype: str) -> str:
    return "identity_" + datatype.lower()


def _model(graph, opset: int = OPSET) -> onnx.ModelProto:
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=IR_VERSION,
        producer_name="ferrite-tests",
    )
    onnx.checker.check_model(m)
    return m


def _save(repo: Path, name: str, model: onnx.ModelProto, version: int = 1, config: dict | None = None):
    d = repo / name / str(version)
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(d / "model.onnx"))
    if config is not None:
        (repo / name / "ferrite.json").write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------- identity
def make_identity(datatype: str) -> onnx.ModelProto:
    elem, _ = DATATYPES[datatype]
    x = helper.make_tensor_value_info("INPUT0", elem, ["batch", IDENTITY_WIDTH])
    y = helper.make_tensor_value_info("OUTPUT0", elem, ["batch", IDENTITY_WIDTH])
    g = helper.make_graph([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], "identity", [x], [y])
    return _model(g)


# ------------------------------------------------------------------ add_sub
def _two_in_two_out(op0: str, op1: str, name: str) -> onnx.ModelProto:
    a = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", ADD_SUB_WIDTH])
    b = helper.make_tensor_value_info("INPUT1", TensorProto.FLOAT, ["batch", ADD_SUB_WIDTH])
    o0 = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", ADD_SUB_WIDTH])
    o1 = helper.make_tensor_value_info("OUTPUT1", TensorProto.FLOAT, ["batch", ADD_SUB_WIDTH])
    g = helper.make_graph(
        [
            helper.make_node(op0, ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node(op1, ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        name,
        [a, b],
        [o0, o1],
    )
    return _model(g)


def make_add_sub() -> onnx.ModelProto:
    """Triton's 'simple' example: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    return _two_in_two_out("Add", "Sub", "add_sub")


def add_sub_reference(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    return {"OUTPUT0": a + b, "OUTPUT1": a - b}


# --------------------------------------------------------------------- calc
# Two versions of one model that give different answers: version 1 adds /
# subtracts, version 3 multiplies / takes the max. There is deliberately no
# version 2, so the default (highest) version is 3 and version 2 is NOT_FOUND.
CALC_VERSIONS = (1, 3)


def make_calc(version: int) -> onnx.ModelProto:
    if version == 1:
        return _two_in_two_out("Add", "Sub", "calc_v1")
    if version == 3:
        return _two_in_two_out("Mul", "Max", "calc_v3")
    raise ValueError(version)


def calc_reference(version: int, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    if version == 1:
        return {"OUTPUT0": a + b, "OUTPUT1": a - b}
    if version == 3:
        return {"OUTPUT0": a * b, "OUTPUT1": np.maximum(a, b)}
    raise ValueError(version)


# ---------------------------------------------------------------------- mlp
def mlp_weights(seed: int = MLP_SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.standard_normal((MLP_IN, MLP_HIDDEN)).astype(np.float32) * 0.5,
        "b1": rng.standard_normal((MLP_HIDDEN,)).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((MLP_HIDDEN, MLP_OUT)).astype(np.float32) * 0.5,
        "b2": rng.standard_normal((MLP_OUT,)).astype(np.float32) * 0.1,
    }


def make_mlp() -> onnx.ModelProto:
    w = mlp_weights()
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", MLP_IN])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", MLP_OUT])
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["INPUT0", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h2"]),
            helper.make_node("MatMul", ["h2", "w2"], ["o0"]),
            helper.make_node("Add", ["o0", "b2"], ["OUTPUT0"]),
        ],
        "mlp",
        [x],
        [y],
        initializer=inits,
    )
    return _model(g)


def mlp_reference(x: np.ndarray) -> np.ndarray:
    w = mlp_weights()
    h = np.maximum(x.astype(np.float32) @ w["w1"] + w["b1"], 0.0)
    return (h @ w["w2"] + w["b2"]).astype(np.float32)


# MLP batching settings used by the test repository: a queue delay long enough
# that concurrent requests really get batched together.
MLP_CONFIG = {
    "max_batch_size": 8,
    "max_queue_delay_microseconds": 20000,
    "max_queue_size": 256,
    "instance_count": 1,
}


# --------------------------------------------------------------------- slow
def make_slow(layers: int, rows: int = 512, width: int = 512) -> onnx.ModelProto:
    """OUTPUT0 == INPUT0 exactly, but only after `layers` [rows x width] @
    [width x width] MatMul+Tanh steps that depend on the input (so onnxruntime
    cannot constant-fold them away). INPUT0 is FP32 [1, SLOW_WIDTH]."""
    rng = np.random.default_rng(7)
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [1, SLOW_WIDTH])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [1, SLOW_WIDTH])
    inits = [
        numpy_helper.from_array(np.array([rows, SLOW_WIDTH], dtype=np.int64), "expand_shape"),
        numpy_helper.from_array((rng.standard_normal((SLOW_WIDTH, width)) * 0.1).astype(np.float32), "w_in"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Expand", ["INPUT0", "expand_shape"], ["e"]),
        helper.make_node("MatMul", ["e", "w_in"], ["h0"]),
    ]
    prev = "h0"
    for i in range(layers):
        wname = f"w{i}"
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), wname))
        nodes.append(helper.make_node("MatMul", [prev, wname], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        prev = f"t{i}"
    nodes += [
        helper.make_node("ReduceMean", [prev], ["r"], keepdims=0),  # scalar, bounded by tanh
        helper.make_node("Mul", ["r", "zero"], ["rz"]),
        helper.make_node("Add", ["INPUT0", "rz"], ["OUTPUT0"]),
    ]
    g = helper.make_graph(nodes, "slow", [x], [y], initializer=inits)
    return _model(g)


SLOW_LAYERS = 12
# `slow`: one instance, no batching, a queue of 2 -> easy to fill.
SLOW_CONFIG = {"max_batch_size": 1, "max_queue_size": 2, "instance_count": 1, "intra_op_threads": 1}
# `slow_q64`: same graph with a deep queue, for priority / deadline / drain tests.
SLOW_Q64_CONFIG = {"max_batch_size": 1, "max_queue_size": 64, "instance_count": 1, "intra_op_threads": 1}


# ------------------------------------------------------------------ strings
STRINGS_SUFFIX = "|ok"


def make_strings() -> onnx.ModelProto:
    """BYTES in, BYTES + BOOL out: OUTPUT0 = INPUT0 + "|ok" (StringConcat),
    OUTPUT1 = (INPUT0 == ""). 1-D input [n]. Uses opset 20 (StringConcat).
    (StringNormalizer was avoided: onnxruntime needs the en_US.UTF-8 locale
    installed for it, which minimal machines lack.)"""
    x = helper.make_tensor_value_info("INPUT0", TensorProto.STRING, ["n"])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.STRING, ["n"])
    z = helper.make_tensor_value_info("OUTPUT1", TensorProto.BOOL, ["n"])
    inits = [
        helper.make_tensor("suffix", TensorProto.STRING, [1], [STRINGS_SUFFIX.encode()]),
        helper.make_tensor("empty", TensorProto.STRING, [1], [b""]),
    ]
    g = helper.make_graph(
        [
            helper.make_node("StringConcat", ["INPUT0", "suffix"], ["OUTPUT0"]),
            helper.make_node("Equal", ["INPUT0", "empty"], ["OUTPUT1"]),
        ],
        "strings",
        [x],
        [y, z],
        initializer=inits,
    )
    return _model(g, opset=20)


def strings_reference(values: list[bytes]) -> dict[str, np.ndarray]:
    return {
        "OUTPUT0": np.array([v + STRINGS_SUFFIX.encode() for v in values], dtype=np.object_),
        "OUTPUT1": np.array([v == b"" for v in values], dtype=np.bool_),
    }


# -------------------------------------------------------------- fixed shape
def make_fixed() -> onnx.ModelProto:
    """A fixed-shape model (no dynamic dim, so never batched): OUTPUT0 = 2 * INPUT0,
    INPUT0 FP32 [2, 3]."""
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [2, 3])
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    g = helper.make_graph([helper.make_node("Mul", ["INPUT0", "two"], ["OUTPUT0"])], "fixed", [x], [y], initializer=[two])
    return _model(g)


# ---------------------------------------------------------------- repository
def build_repository(outdir: str | os.PathLike) -> Path:
    repo = Path(outdir)
    repo.mkdir(parents=True, exist_ok=True)
    for dt in DATATYPES:
        _save(repo, identity_model_name(dt), make_identity(dt))
    _save(repo, "add_sub", make_add_sub())
    for v in CALC_VERSIONS:
        _save(repo, "calc", make_calc(v), version=v)
    _save(repo, "mlp", make_mlp(), config=MLP_CONFIG)
    slow = make_slow(SLOW_LAYERS)
    _save(repo, "slow", slow, config=SLOW_CONFIG)
    _save(repo, "slow_q64", slow, config=SLOW_Q64_CONFIG)
    _save(repo, "strings", make_strings())
    _save(repo, "fixed", make_fixed())
    return repo


def check_repository(repo: str | os.PathLike) -> None:
    """Run every model in onnxruntime (Python) and compare with the references."""
    import time

    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    repo = Path(repo)

    def sess(name, version=1, threads=0):
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        return ort.InferenceSession(str(repo / name / str(version) / "model.onnx"), so, providers=["CPUExecutionProvider"])

    for dt, (_, npdt) in DATATYPES.items():
        s = sess(identity_model_name(dt))
        if dt == "BYTES":
            x = np.array([["a", "", "é", "日本"]] * 2, dtype=np.object_)
        elif dt == "BF16":
            # onnxruntime's Python API has no numpy type for bfloat16: feed the
            # raw bits through an OrtValue, and read the result back through a
            # Cast(to=FLOAT) appended to the same graph.
            f = np.array([[1.5, -2.0, 0.25, 3.0]] * 2, dtype=np.float32)
            bits = (f.view(np.uint32) >> 16).astype(np.uint16)
            m = onnx.load(str(repo / identity_model_name(dt) / "1" / "model.onnx"))
            m.graph.node.append(helper.make_node("Cast", ["OUTPUT0"], ["AS_FP32"], to=TensorProto.FLOAT))
            m.graph.output.append(helper.make_tensor_value_info("AS_FP32", TensorProto.FLOAT, ["batch", IDENTITY_WIDTH]))
            cs = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            v = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, TensorProto.BFLOAT16)
            outs = cs.run_with_ort_values(None, {"INPUT0": v})
            assert outs[0].data_type() == "tensor(bfloat16)" and outs[0].shape() == [2, 4]
            assert np.array_equal(outs[1].numpy(), f), dt
            print(f"ok identity {dt}")
            continue
        elif dt == "BOOL":
            x = np.array([[True, False, True, True]] * 2)
        else:
            x = (np.arange(8).reshape(2, 4) % 5).astype(npdt)
        (y,) = s.run(None, {"INPUT0": x})
        assert y.shape == x.shape and (y == x).all(), dt
        print(f"ok identity {dt}")
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.ones((1, 16), np.float32) * 3
    out = sess("add_sub").run(None, {"INPUT0": a, "INPUT1": b})
    ref = add_sub_reference(a, b)
    assert np.array_equal(out[0], ref["OUTPUT0"]) and np.array_equal(out[1], ref["OUTPUT1"])
    for v in CALC_VERSIONS:
        out = sess("calc", v).run(None, {"INPUT0": a, "INPUT1": b})
        ref = calc_reference(v, a, b)
        assert np.array_equal(out[0], ref["OUTPUT0"]) and np.array_equal(out[1], ref["OUTPUT1"]), v
    x = np.random.default_rng(0).standard_normal((5, MLP_IN)).astype(np.float32)
    (y,) = sess("mlp").run(None, {"INPUT0": x})
    np.testing.assert_allclose(y, mlp_reference(x), rtol=1e-5, atol=1e-5)
    vals = [b"hello", b"", "héllo wörld".encode(), "日本語".encode()]
    out = sess("strings").run(None, {"INPUT0": np.array([v.decode() for v in vals], dtype=np.object_)})
    ref = strings_reference(vals)
    assert [o.encode() for o in out[0]] == list(ref["OUTPUT0"]) and (out[1] == ref["OUTPUT1"]).all()
    (y,) = sess("fixed").run(None, {"INPUT0": np.ones((2, 3), np.float32)})
    assert (y == 2).all()
    s = sess("slow", threads=1)
    x = np.linspace(-1, 1, SLOW_WIDTH, dtype=np.float32).reshape(1, SLOW_WIDTH)
    s.run(None, {"INPUT0": x})
    t = time.perf_counter()
    (y,) = s.run(None, {"INPUT0": x})
    dt_ms = (time.perf_counter() - t) * 1000
    assert np.array_equal(y, x)
    print(f"ok all models; slow takes {dt_ms:.1f} ms per call (1 thread)")


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 1:
        print(__doc__)
        return 2
    repo = build_repository(args[0])
    print(f"wrote test model repository to {repo}")
    if "--check" in argv:
        check_repository(repo)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
