#!/usr/bin/env bash
# ResNet-50 (light_resnet50.onnx from the onnx wheel, batch dimension made
# dynamic) at a fixed concurrency, with and without dynamic batching, on a
# release build of ferrite-server. Run by `make bench-resnet50`; prints one
# JSON line per run (ferrite-loadgen's output).
set -euo pipefail
cd "$(dirname "$0")/.."
CONCURRENCY=${CONCURRENCY:-8}
DURATION=${DURATION:-20}
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -rf "$work"' EXIT

light=$(.venv/bin/python -c 'import onnx, os; print(os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_resnet50.onnx"))')
mkdir -p "$work/resnet50/1" "$work/resnet50_unbatched/1"
.venv/bin/python scripts/make_dynamic_batch.py "$light" "$work/resnet50/1/model.onnx" >/dev/null
cp "$work/resnet50/1/model.onnx" "$work/resnet50_unbatched/1/model.onnx"
echo '{"max_batch_size": 1}' > "$work/resnet50_unbatched/ferrite.json"

port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc=$(port); http=$(port)
target/release/ferrite-server serve --host 127.0.0.1 --model-repository "$work" \
  --grpc-port "$grpc" --http-port "$http" --metrics-port "$(port)" 2>"$work/server.log" &
server=$!
until curl -sf -o /dev/null "http://127.0.0.1:$http/v2/health/ready"; do
  kill -0 $server 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.2
done
# Interleaved, twice each, so drift on the machine affects both alike.
for round in 1 2; do
  for model in resnet50 resnet50_unbatched; do
    target/release/ferrite-loadgen --url "http://127.0.0.1:$grpc" --model "$model" \
      --concurrency "$CONCURRENCY" --warmup 3 --duration "$DURATION" --label "$model round $round"
  done
done
