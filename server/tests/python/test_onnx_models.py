"""Real models shipped in the onnx wheel, served by ferrite and compared with
their reference outputs.

* onnx/backend/test/data/light/light_*.onnx: ImageNet-size CNNs (ResNet-50,
  VGG-19, AlexNet, DenseNet-121, Inception v1/v2, ShuffleNet, SqueezeNet,
  ZFNet-512) whose float initializers were replaced by ConstantOfShape (so
  the files are small; onnxruntime materializes the weights at load).
  Input: Runner.generate_dummy_data(value_info, seed=0, random=False), as
  onnx's own backend test does; expected output: light_*_output_0.pb.
  All nine are included: in onnxruntime 1.31 (Python, CPU) each matches its
  reference exactly and runs in < 0.6 s (VGG-19 is the slowest, ~0.5 s;
  loading all of them takes ~5 s), which keeps this module well under a minute.
* onnx/backend/test/data/pytorch-converted/* and pytorch-operator/*:
  model.onnx + test_data_set_0/{input,output}_N.pb.

The lists below are explicit. Every case in the installed onnx is either
INCLUDED or EXCLUDED (with the reason); test_case_lists_are_complete fails if
an onnx upgrade adds or removes cases. The exclusions are exactly the models
onnxruntime 1.31 itself refuses to load in Python (it has no kernels for those
old operator versions, e.g. "Could not find an implementation for
AveragePool(1)"). Every included case was checked to run and match in
onnxruntime's Python API with rtol 1e-3 / atol 1e-7; through ferrite we allow
atol 1e-6 (rtol 1e-3, as onnx's backend tests), since session options such as
thread counts may differ from the Python defaults.

The server runs with --max-batch-size 1 so every shape is passed through
untouched, and --instances 1 to bound memory (the light VGG/AlexNet/ZFNet
weights are a few hundred MB once materialized).
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import numpy_helper
from onnx.backend.test.runner import Runner
from tritonclient.utils import np_to_triton_dtype

import ferrite_testlib as fl

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
# `make gpu-check` widens them for the CUDA provider (cuDNN rounds otherwise).
RTOL = float(os.environ.get("FERRITE_TEST_RTOL", "1e-3"))
ATOL = float(os.environ.get("FERRITE_TEST_ATOL", "1e-6"))

LIGHT = [
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
]

PYTORCH_CONVERTED = [
    "ConstantPad2d", "Conv1d", "Conv1d_dilated", "Conv1d_groups", "Conv1d_pad1", "Conv1d_pad1size1",
    "Conv1d_pad2", "Conv1d_pad2size1", "Conv1d_stride", "Conv2d", "Conv2d_depthwise", "Conv2d_depthwise_padded",
    "Conv2d_depthwise_strided", "Conv2d_depthwise_with_multiplier", "Conv2d_dilated", "Conv2d_groups",
    "Conv2d_groups_thnn", "Conv2d_no_bias", "Conv2d_padding", "Conv2d_strided", "Conv3d", "Conv3d_dilated",
    "Conv3d_dilated_strided", "Conv3d_groups", "Conv3d_no_bias", "Conv3d_stride", "Conv3d_stride_padding",
    "ConvTranspose2d", "ConvTranspose2d_no_bias", "ELU", "Embedding", "Embedding_sparse", "LeakyReLU",
    "LeakyReLU_with_negval", "Linear_no_bias", "LogSoftmax", "MaxPool1d", "MaxPool1d_stride",
    "MaxPool1d_stride_padding_dilation", "MaxPool2d", "MaxPool2d_stride_padding_dilation", "MaxPool3d",
    "MaxPool3d_stride", "MaxPool3d_stride_padding", "PixelShuffle", "ReLU", "ReflectionPad2d", "ReplicationPad2d",
    "SELU", "Sigmoid", "Softmax", "Softmin", "Softplus", "Tanh", "ZeroPad2d", "log_softmax_dim3",
    "log_softmax_lastdim", "softmax_functional_dim3", "softmax_lastdim",
]  # fmt: skip

PYTORCH_OPERATOR = [
    "operator_chunk", "operator_clip", "operator_concat2", "operator_conv", "operator_convtranspose",
    "operator_exp", "operator_flatten", "operator_index", "operator_max", "operator_maxpool", "operator_min",
    "operator_pad", "operator_permute2", "operator_reduced_mean", "operator_reduced_mean_keepdim",
    "operator_reduced_sum", "operator_reduced_sum_keepdim", "operator_repeat", "operator_repeat_dim_overflow",
    "operator_selu", "operator_sqrt", "operator_symbolic_override", "operator_symbolic_override_nested",
    "operator_view",
]  # fmt: skip

_NO_KERNEL = "onnxruntime 1.31 itself cannot load it: no kernel for {}"
EXCLUDED = {
    **{f"pytorch-converted/{n}": _NO_KERNEL.format("AveragePool(1)") for n in (
        "AvgPool1d", "AvgPool1d_stride", "AvgPool2d", "AvgPool2d_stride", "AvgPool3d", "AvgPool3d_stride",
        "AvgPool3d_stride1_pad0_gpu_input")},
    **{f"pytorch-converted/{n}": _NO_KERNEL.format("BatchNormalization(6)") for n in (
        "BatchNorm1d_3d_input_eval", "BatchNorm2d_eval", "BatchNorm2d_momentum_eval", "BatchNorm3d_eval",
        "BatchNorm3d_momentum_eval")},
    **{f"pytorch-converted/{n}": _NO_KERNEL.format("PRelu(6)") for n in (
        "PReLU_1d", "PReLU_1d_multiparam", "PReLU_2d", "PReLU_2d_multiparam", "PReLU_3d", "PReLU_3d_multiparam")},
    "pytorch-converted/GLU": _NO_KERNEL.format("Mul(6)"),
    "pytorch-converted/GLU_dim": _NO_KERNEL.format("Mul(6)"),
    "pytorch-converted/PoissonNLLLLoss_no_reduce": _NO_KERNEL.format("Mul(6)"),
    "pytorch-converted/Linear": _NO_KERNEL.format("Gemm(6)"),
    "pytorch-converted/Softsign": _NO_KERNEL.format("Add(6)"),
    **{f"pytorch-operator/{n}": _NO_KERNEL.format("Add(6)") for n in (
        "operator_add_broadcast", "operator_add_size1_broadcast", "operator_add_size1_right_broadcast",
        "operator_add_size1_singleton_broadcast", "operator_addconstant", "operator_basic",
        "operator_non_float_params", "operator_params")},
    "pytorch-operator/operator_addmm": _NO_KERNEL.format("Gemm(6)"),
    "pytorch-operator/operator_mm": _NO_KERNEL.format("Gemm(6)"),
    "pytorch-operator/operator_pow": _NO_KERNEL.format("Pow(1)"),
}  # fmt: skip


def _model_name(case: str) -> str:
    kind, name = case.split("/")
    prefix = {"light": "light_", "pytorch-converted": "ptc_", "pytorch-operator": "pto_"}[kind]
    return prefix + name


def _case_model_path(case: str) -> Path:
    kind, name = case.split("/")
    if kind == "light":
        return DATA / "light" / f"light_{name}.onnx"
    return DATA / kind / f"test_{name}" / "model.onnx"


CASES = (
    [f"light/{n}" for n in LIGHT]
    + [f"pytorch-converted/{n}" for n in PYTORCH_CONVERTED]
    + [f"pytorch-operator/{n}" for n in PYTORCH_OPERATOR]
)


def _graph_inputs(model: onnx.ModelProto):
    inits = {i.name for i in model.graph.initializer}
    return [x for x in model.graph.input if x.name not in inits]


def load_case(case: str):
    """-> (list of (input name, array)), list of (output name, expected array)."""
    kind, name = case.split("/")
    path = _case_model_path(case)
    model = onnx.load(str(path), load_external_data=False)
    ins = _graph_inputs(model)
    outs = [o.name for o in model.graph.output]
    if kind == "light":
        feeds = [(x.name, Runner.generate_dummy_data(x, seed=0, random=False)) for x in ins]
        expected = [numpy_helper.to_array(onnx.load_tensor(str(path)[: -len(".onnx")] + f"_output_{i}.pb")) for i in range(len(outs))]
    else:
        ds = path.parent / "test_data_set_0"
        feeds = [(x.name, numpy_helper.to_array(onnx.load_tensor(str(ds / f"input_{i}.pb")))) for i, x in enumerate(ins)]
        expected = [numpy_helper.to_array(onnx.load_tensor(str(ds / f"output_{i}.pb"))) for i in range(len(outs))]
    return feeds, list(zip(outs, expected))


def test_case_lists_are_complete():
    present = {f"light/{Path(p).stem[len('light_'):]}" for p in glob.glob(str(DATA / "light" / "light_*.onnx"))}
    for kind in ("pytorch-converted", "pytorch-operator"):
        present |= {f"{kind}/{os.path.basename(d)[len('test_'):]}" for d in glob.glob(str(DATA / kind / "test_*"))}
    listed = set(CASES) | set(EXCLUDED)
    assert not set(CASES) & set(EXCLUDED)
    assert present == listed, (
        f"onnx's test data changed: new {sorted(present - listed)}, gone {sorted(listed - present)}; "
        "check them with onnxruntime and add each to CASES or EXCLUDED"
    )
    assert "light/resnet50" in CASES


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("onnx_backend_repo")
    for case in CASES:
        d = repo / _model_name(case) / "1"
        d.mkdir(parents=True)
        shutil.copyfile(_case_model_path(case), d / "model.onnx")
    s = fl.FerriteServer(
        [
            "--model-repository", str(repo),
            "--max-batch-size", "1",
            "--instances", "1",
            "--max-message-bytes", str(64 * 1024 * 1024),
        ],
        tmp_path_factory.mktemp("onnx_server_logs"),
        name="onnx-backend",
    )
    s.start()
    yield s
    rc = s.terminate()
    assert rc == 0, f"onnx-backend server exited with {rc} after SIGTERM\n{s.log_tail()}"


@pytest.fixture(scope="module")
def onnx_client(onnx_server):
    c = onnx_server.grpc_client()
    yield c
    c.close()


def test_all_backend_models_ready(onnx_client):
    # First test on this server: right after readiness, every model must be loaded.
    idx = {m.name: m.state for m in onnx_client.get_model_repository_index().models}
    not_ready = {_model_name(c): idx.get(_model_name(c)) for c in CASES if idx.get(_model_name(c)) != "READY"}
    assert not not_ready, f"models not READY: {not_ready}"


def _compare(case, got: dict, expected):
    for name, want in expected:
        g = got[name]
        assert g is not None, f"{case}: output {name!r} missing"
        assert list(g.shape) == list(want.shape), f"{case}: output {name!r} shape {g.shape} != {want.shape}"
        np.testing.assert_allclose(g, want, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=f"{case}: {name}")


@pytest.mark.parametrize("case", CASES)
def test_onnx_backend_model_grpc(onnx_client, case):
    feeds, expected = load_case(case)
    inputs = []
    for name, arr in feeds:
        inp = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(np.ascontiguousarray(arr))
        inputs.append(inp)
    res = onnx_client.infer(_model_name(case), inputs, client_timeout=120)
    _compare(case, {n: res.as_numpy(n) for n, _ in expected}, expected)


@pytest.mark.parametrize("case", ["light/resnet50", "light/squeezenet", "pytorch-converted/Embedding", "pytorch-operator/operator_chunk"])
def test_onnx_backend_model_http(onnx_server, case):
    feeds, expected = load_case(case)
    c = onnx_server.http_client()
    try:
        inputs = []
        for name, arr in feeds:
            inp = httpclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            inp.set_data_from_numpy(np.ascontiguousarray(arr))
            inputs.append(inp)
        res = c.infer(_model_name(case), inputs)
        _compare(case, {n: res.as_numpy(n) for n, _ in expected}, expected)
    finally:
        c.close()


def test_light_model_metadata_hides_initializers(onnx_client):
    # IR-3 models list their initializers as graph inputs too; only the real input is an input.
    md = onnx_client.get_model_metadata("light_resnet50")
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("gpu_0/data_0", "FP32", [1, 3, 224, 224])]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("gpu_0/softmax_1", "FP32", [1, 1000])]
    cfg = onnx_client.get_model_config("light_resnet50").config
    assert cfg.max_batch_size == 0
    assert [list(i.dims) for i in cfg.input] == [[1, 3, 224, 224]]
