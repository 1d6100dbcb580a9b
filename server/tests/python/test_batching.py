"""Dynamic batching on `mlp` (ferrite.json: max_batch_size 8, 20 ms queue delay,
one instance): many concurrent clients each get their own correct rows back,
and batches larger than one really form."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient

import ferrite_testlib as fl

tm = fl.make_test_models
N_CLIENTS = 64


def _input(i: int, rows: int = 1) -> np.ndarray:
    rng = np.random.default_rng(1000 + i)
    return rng.standard_normal((rows, tm.MLP_IN)).astype(np.float32) + i


def _batch_hist(server):
    samples = fl.parse_metrics(server.metrics_text())
    buckets = fl.metric_find(samples, "ferrite_batch_size_bucket", model="mlp")
    count = fl.metric_sum(samples, "ferrite_batch_size_count", model="mlp")
    total = fl.metric_sum(samples, "ferrite_batch_size_sum", model="mlp")
    return buckets, count, total


def _stats(client):
    st = client.get_inference_statistics("mlp")
    m = [x for x in st.model_stats if x.name == "mlp"][0]
    return m.inference_count, m.execution_count


def test_64_concurrent_grpc_clients_get_their_own_results(server):
    _, count0, sum0 = _batch_hist(server)
    probe = server.grpc_client()
    inf0, exe0 = _stats(probe)
    clients = [server.grpc_client() for _ in range(N_CLIENTS)]
    barrier = threading.Barrier(N_CLIENTS)
    results: dict[int, np.ndarray] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(i):
        x = _input(i)
        try:
            barrier.wait(timeout=30)
            for rep in range(2):
                inp = grpcclient.InferInput("INPUT0", [1, tm.MLP_IN], "FP32").set_data_from_numpy(x)
                res = clients[i].infer("mlp", [inp], request_id=f"c{i}-{rep}")
                assert res.get_response().id == f"c{i}-{rep}"
                with lock:
                    results[(i, rep)] = res.as_numpy("OUTPUT0")
        except Exception as e:  # collected and asserted below
            with lock:
                errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for c in clients:
        c.close()
    assert not errors, errors[:5]
    assert len(results) == 2 * N_CLIENTS
    for (i, rep), y in results.items():
        np.testing.assert_allclose(y, tm.mlp_reference(_input(i)), rtol=1e-5, atol=1e-5, err_msg=f"client {i} rep {rep}")

    buckets, count1, sum1 = _batch_hist(server)
    assert buckets, "no ferrite_batch_size_bucket{model=\"mlp\"} series on /metrics"
    new_batches = count1 - count0
    new_rows = sum1 - sum0  # _sum of the histogram: rows in those batches
    assert new_batches >= 1
    assert new_rows == 2 * N_CLIENTS, f"ferrite_batch_size_sum grew by {new_rows}, expected {2 * N_CLIENTS}"
    assert new_rows > new_batches, f"no batch larger than 1 formed: {new_batches} batches for {new_rows} rows"
    assert new_batches < 2 * N_CLIENTS, f"{new_batches} batches for {2 * N_CLIENTS} requests: nothing was batched"
    inf1, exe1 = _stats(probe)
    probe.close()
    assert inf1 - inf0 == 2 * N_CLIENTS
    assert exe1 - exe0 < inf1 - inf0, f"execution_count grew by {exe1 - exe0} for {inf1 - inf0} inferences"


def test_64_concurrent_asyncio_requests(server):
    async def run():
        client = grpcaio.InferenceServerClient(server.grpc_url)
        try:

            async def one(i):
                x = _input(i, rows=1 + i % 3)
                inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                res = await client.infer("mlp", [inp])
                return i, x, res.as_numpy("OUTPUT0")

            return await asyncio.gather(*(one(i) for i in range(N_CLIENTS)))
        finally:
            await client.close()

    out = asyncio.run(run())
    assert len(out) == N_CLIENTS
    for i, x, y in out:
        assert y.shape == (x.shape[0], tm.MLP_OUT), (i, y.shape)
        np.testing.assert_allclose(y, tm.mlp_reference(x), rtol=1e-5, atol=1e-5, err_msg=f"request {i}")


def test_concurrent_http_clients_mixed_rows(server):
    results, errors = {}, []
    lock = threading.Lock()

    def worker(i):
        c = server.http_client()
        try:
            x = _input(500 + i, rows=1 + i % 4)
            inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=i % 2 == 0)
            out = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=i % 3 == 0)]
            y = c.infer("mlp", [inp], outputs=out).as_numpy("OUTPUT0")
            with lock:
                results[i] = (x, y)
        except Exception as e:
            with lock:
                errors.append(f"http client {i}: {e!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:5]
    assert len(results) == 24
    for i, (x, y) in results.items():
        np.testing.assert_allclose(y, tm.mlp_reference(x), rtol=1e-5, atol=1e-5, err_msg=f"http client {i}")


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_single_request_batch_sizes(grpc_client, rows):
    x = _input(77, rows=rows)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32").set_data_from_numpy(x)
    y = grpc_client.infer("mlp", [inp]).as_numpy("OUTPUT0")
    np.testing.assert_allclose(y, tm.mlp_reference(x), rtol=1e-5, atol=1e-5)


def _concurrent(n, fn):
    out, errors = {}, []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait(30)
            r = fn(i)
            with lock:
                out[i] = r
        except Exception as e:
            with lock:
                errors.append(f"{i}: {e!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    assert len(out) == n
    return out


def test_concurrent_bytes_requests_are_scattered_correctly(server):
    """`strings` batches (dynamic 1-D input): concurrent requests with different
    numbers of strings of different lengths each get exactly their own strings."""
    clients = [server.grpc_client() for _ in range(32)]

    def call(i):
        vals = [f"req{i}-{k}-{'é' * (i % 5)}{'x' * k}".encode() for k in range(1 + i % 4)]
        x = np.array(vals, dtype=np.object_)
        res = clients[i].infer("strings", [grpcclient.InferInput("INPUT0", [len(vals)], "BYTES").set_data_from_numpy(x)])
        return vals, res.as_numpy("OUTPUT0"), res.as_numpy("OUTPUT1")

    out = _concurrent(32, call)
    for c in clients:
        c.close()
    for i, (vals, o0, o1) in out.items():
        ref = tm.strings_reference(vals)
        assert [bytes(v) for v in o0] == list(ref["OUTPUT0"]), f"request {i}"
        assert o1.tolist() == ref["OUTPUT1"].tolist(), f"request {i}"


@pytest.mark.parametrize("dt", ["FP16", "BOOL", "INT8", "UINT64", "BF16"])
def test_concurrent_identity_requests_are_scattered_correctly(server, dt):
    clients = [server.grpc_client() for _ in range(16)]

    def sample(i):
        rows = 1 + i % 3
        if dt == "BOOL":
            return (np.arange(rows * 4).reshape(rows, 4) + i) % 3 == 0
        if dt == "BF16":
            return (np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + i) * 0.5
        return (np.arange(rows * 4).reshape(rows, 4) + i * 7).astype(tm.DATATYPES[dt][1])

    def call(i):
        x = sample(i)
        res = clients[i].infer(
            tm.identity_model_name(dt), [grpcclient.InferInput("INPUT0", list(x.shape), dt).set_data_from_numpy(x)]
        )
        return x, res.as_numpy("OUTPUT0")

    out = _concurrent(16, call)
    for c in clients:
        c.close()
    for i, (x, y) in out.items():
        np.testing.assert_array_equal(y, x, err_msg=f"request {i}")
