# ferrite's front door. Every target installs what it needs, idempotently.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
PY          := $(VENV)/bin/python
ORT_VERSION := $(shell sed -n 's/^onnxruntime==//p' requirements-dev.txt)
ORT_LIB     := $(CURDIR)/.cache/onnxruntime/libonnxruntime.so
SERVER_BIN  := $(CURDIR)/target/debug/ferrite-server
# Tools the Makefile installs for itself (cargo-deny, uv), pinned and cached.
TOOLS       := $(CURDIR)/.cache/tools
CARGO_DENY_VERSION := 0.20.2
CARGO_DENY  := $(TOOLS)/bin/cargo-deny

# ort (load-dynamic) finds ONNX Runtime through this variable.
export ORT_DYLIB_PATH := $(ORT_LIB)

# The control plane (etcd, kube-apiserver, ...) built from pinned Go modules.
include e2e/e2e.mk
# OCI images of ferrite-server and ferrite-operator, written without Docker.
include images/images.mk
# make bench: ferrite against raw ONNX Runtime and Triton.
include bench/bench.mk
# make models: LLM model directories converted from GGUF (docs/llm.md).
include models/models.mk

.PHONY: help venv lock deny ort build release test test-rust test-python test-hostile demo-local fuzz bench-resnet50 manifests storage-servers clean gpu-check

help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# requirements-lock.txt pins every package with the SHA-256 of its files: pip
# refuses any file whose hash is not listed (--require-hashes). The venv is
# made anew when the lock changes, so nothing installed without a hash stays.
# pip's report (the wheel and hash of each package) feeds the images' SBOM.
venv: $(VENV)/.installed ## Python virtualenv for tests and tools (hash-checked)
$(VENV)/.installed: requirements-dev.txt requirements-lock.txt
	python3 scripts/check_lock.py requirements-dev.txt requirements-lock.txt
	@echo "==> creating $(VENV) (requirements-lock.txt, --require-hashes)"
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --progress-bar on --require-hashes --report $(VENV)/pip-report.json -r requirements-lock.txt
	touch $@

# uv resolves requirements-dev.txt and writes every file's hash; the versions
# already in requirements-lock.txt are kept unless requirements-dev.txt moves them.
lock: ## re-pin requirements-lock.txt (with hashes) after editing requirements-dev.txt
	[ -x $(TOOLS)/uv/bin/uv ] || { python3 -m venv $(TOOLS)/uv && \
	  $(TOOLS)/uv/bin/pip install --require-hashes -r scripts/requirements-uv.txt; }
	sed -n '1,/^[^#]/{/^#/p}' requirements-lock.txt > $(TOOLS)/lock-header.txt
	$(TOOLS)/uv/bin/uv pip compile requirements-dev.txt --generate-hashes --python-version 3.11 \
	  --no-header --quiet -o requirements-lock.txt
	cat $(TOOLS)/lock-header.txt requirements-lock.txt > $(TOOLS)/lock.txt && mv $(TOOLS)/lock.txt requirements-lock.txt
	python3 scripts/check_lock.py requirements-dev.txt requirements-lock.txt

# cargo-deny (deny.toml): licenses, bans and sources of every crate in
# Cargo.lock. Built once into .cache/tools (cold: about 18 min on the shared
# 2-core machine, 3.5 min of CPU); skipped when that version is there.
deny: ## cargo deny check: licenses, bans, sources (deny.toml)
	@$(CARGO_DENY) --version 2>/dev/null | grep -qx "cargo-deny $(CARGO_DENY_VERSION)" || \
	  cargo install --locked cargo-deny@$(CARGO_DENY_VERSION) --root $(TOOLS)
	$(CARGO_DENY) check --hide-inclusion-graph licenses bans sources

ort: $(ORT_LIB) ## ONNX Runtime shared library, taken from the pinned onnxruntime wheel
$(ORT_LIB): $(VENV)/.installed
	@mkdir -p $(dir $@)
	cp -f $(VENV)/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.$(ORT_VERSION) $@
	@echo "==> ONNX Runtime $(ORT_VERSION) at $@"

build: ## build every binary (debug)
	cargo build --workspace --bins

release: ## build every binary (optimized), for benchmarks
	cargo build --workspace --bins --release

bench-resnet50: venv ort release ## ResNet-50 at concurrency 8, with and without dynamic batching
	bash bench/resnet50.sh

# On a machine with an NVIDIA GPU: the CUDA provider proven (tritonclient
# model checks, ResNet-50 and SmolLM2 against the CPU) and measured against raw
# ONNX Runtime CUDA and Triton; bench/gpu/results.json, docs/benchmarks-gpu.md.
# The preflight (standard library) stops at once, non-zero, without a GPU.
gpu-check: ## prove and measure ferrite on an NVIDIA GPU (a few minutes; fails loudly without one)
	@python3 bench/gpu/gpu_check.py --preflight
	$(MAKE) --no-print-directory venv ort release models cuda-libs
	$(PY) bench/gpu/gpu_check.py

demo-local: venv ort build ## no cluster: run the server on its embedded demo model as a local process and call it
	$(PY) scripts/demo.py $(SERVER_BIN)

# The end-to-end tests (e2e/e2e.mk) come last: they need root, the images
# (here packed from the debug build, see images/images.mk) and the cluster
# binaries, and say so loudly when they cannot run (failing under CI=true).
test: test-rust test-python test-hostile test-models ## run every test
	$(MAKE) --no-print-directory e2e IMAGE_PROFILE=debug

# ferrite-fetch's tests run against real storage servers: MinIO (s3://),
# fake-gcs-server (gs://), Azurite (az://). Cold, MinIO's build takes about
# 10 minutes on 2 cores, fake-gcs-server's 2-3, Azurite's npm install 1;
# cached in .cache/storage (and Go's build cache) after that.
storage-servers: ## MinIO and fake-gcs-server (pinned Go modules), Azurite (npm) for ferrite-fetch's tests (cached)
	fetch/storage-servers.sh

# The operator's tests run against a real API server, and start
# ferrite-server processes with the test models (venv); the activator's
# test streams SSE from the SmolLM2 model (models).
test-rust: deny venv ort control-plane storage-servers build models
	cargo test --workspace

manifests: build control-plane ## regenerate manifests/crd.yaml and manifests/install.yaml
	target/debug/ferrite-operator crdgen > manifests/crd.yaml
	HELM=$(K8S_BIN)/helm bash scripts/render-install.sh

test-python: venv ort build models
	FERRITE_SERVER_BIN=$(SERVER_BIN) $(PY) -m pytest -q server/tests/python
	$(PY) -m pytest -q images/test_images.py -k "not test_built_images"
	$(PY) -m pytest -q bench/gpu/test_gpu_check.py bench/test_embed_bench.py

# Every attack of docs/security.md against a running server, while a
# well-behaved client keeps calling and the server's peak RSS is measured;
# the table lands in target/hostile/report.md.
test-hostile: venv ort build models ## attacks against a running server (docs/security.md)
	FERRITE_SERVER_BIN=$(SERVER_BIN) $(PY) -m pytest -q server/tests/hostile

FUZZ_SECONDS ?= 60
fuzz: ## coverage-guided fuzzing of request decoding and validation (nightly toolchain)
	cargo install --locked cargo-fuzz@0.13.1
	cd fuzz && cargo +nightly fuzz run grpc_request -- -max_total_time=$(FUZZ_SECONDS)
	cd fuzz && cargo +nightly fuzz run http_request -- -max_total_time=$(FUZZ_SECONDS)

clean:
	rm -rf target .cache
