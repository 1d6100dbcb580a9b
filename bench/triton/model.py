"""Triton Python-backend model for ferrite's benchmark: runs one ONNX file
with onnxruntime, with the same thread settings as ferrite-server (one
session, `intra_op_threads` from the model's parameters, one inter-op
thread). Requests that Triton's dynamic batcher hands over together are
joined along the first dimension, run once, and split again.

numpy < 2 and onnxruntime come from the virtualenv named by the
`venv_site_packages` parameter (the stub is built against numpy 1.x).
"""

import json
import sys


def _param(config, key, default=None):
    value = config.get("parameters", {}).get(key)
    return value["string_value"] if value else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        site = _param(config, "venv_site_packages")
        if site and site not in sys.path:
            sys.path.insert(0, site)
        global np, pb_utils
        import numpy as np
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_param(config, "intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # bench/gpu: "CUDAExecutionProvider,CPUExecutionProvider"; the GPU run
        # checks below that CUDA really took the model.
        providers = _param(config, "providers", "CPUExecutionProvider").split(",")
        self.session = ort.InferenceSession(_param(config, "onnx_path"), options, providers=providers)
        if self.session.get_providers()[0] != providers[0]:
            raise RuntimeError(f"onnxruntime runs on {self.session.get_providers()}, not {providers[0]}")
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.strings = {i.name for i in self.session.get_inputs() if i.type == "tensor(string)"}
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        feeds, rows = {}, []
        for name in self.inputs:
            parts = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            rows = [len(p) for p in parts]
            value = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if self.ranks[name] == 1:
                value = value.reshape(-1)  # Triton's batch dimension plus dims [1]
            if name in self.strings:
                value = np.array([v.decode() for v in value.ravel()], dtype=np.object_).reshape(value.shape)
            feeds[name] = value
        results = self.session.run(self.outputs, feeds)
        responses, start = [], 0
        for n in rows:
            tensors = []
            for name, value in zip(self.outputs, results):
                part = value[start : start + n]
                if part.ndim == 1:
                    part = part.reshape(-1, 1)
                tensors.append(pb_utils.Tensor(name, part))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
