"""Runs ferrite-server on its embedded demo model and calls it the way a user
would: tritonclient over gRPC and HTTP, then prints what happened.

Usage: python scripts/demo.py PATH/TO/ferrite-server
(`make demo-local` builds the server and the ONNX Runtime library first.)
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    binary = sys.argv[1]
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    print(f"==> starting {binary} (embedded demo model) on 127.0.0.1, gRPC :{grpc_port}, HTTP :{http_port}")
    server = subprocess.Popen(
        [binary, "serve", "--host", "127.0.0.1", "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)],
    )
    try:
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 60
        while True:
            try:
                if grpc.is_server_ready():
                    break
            except Exception:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print("server did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.2)

        meta = grpc.get_model_metadata("demo", as_json=True)
        print(f"==> model 'demo': inputs {meta['inputs']}, outputs {meta['outputs']}")

        flowers = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
        request = grpcclient.InferInput("input", list(flowers.shape), "FP32")
        request.set_data_from_numpy(flowers)
        result = grpc.infer("demo", [request]).as_numpy("probabilities")
        print(f"==> gRPC ModelInfer: {flowers.tolist()} -> probabilities {np.round(result, 4).tolist()}")

        http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        request = httpclient.InferInput("input", list(flowers.shape), "FP32")
        request.set_data_from_numpy(flowers)
        over_http = http.infer("demo", [request]).as_numpy("probabilities")
        same = np.allclose(result, over_http)
        print(f"==> HTTP infer gives the same answer: {same}")

        stats = grpc.get_inference_statistics("demo", as_json=True)["model_stats"][0]
        print(f"==> statistics: {stats['inference_count']} inferences in {stats['execution_count']} executions")
        return 0 if same else 1
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"==> server drained and exited with {code}")


if __name__ == "__main__":
    sys.exit(main())
