# make models: LLM model directories (docs/llm.md) converted from a GGUF file, and
# encoder model directories (docs/encoders.md) converted from safetensors, cached
# under .cache/models/. Included by the top-level Makefile (uses its venv).
#   make models        SmolLM2-135M-Instruct, fp32 and int4 (MatMulNBits); the encoders
#   make test-models   the converters' checks (transformers / llama.cpp fixtures; numpy BERT),
#                      and every LLM family (Qwen2, Phi-3, Gemma 2, Mistral, Llama 3) on a tiny
#                      random-weight GGUF the test writes itself (models/test_families.py)
#   make llm-answer    greedy answer to "What is the capital of France?" (int4)
.PHONY: models test-models llm-answer

LLM_MODEL_DIR ?= $(CURDIR)/.cache/models/smollm2-135m-instruct-int4

models: venv ## LLM (SmolLM2-135M-Instruct fp32 + int4) and encoder model directories under .cache/models
	$(PY) models/build_models.py
	$(PY) models/build_encoders.py

test-models: models ort build ## the GGUF (every LLM family) and BERT -> ONNX converters against transformers, llama.cpp, numpy
	FERRITE_SERVER_BIN=$(SERVER_BIN) $(PY) -m pytest -q models/test_converter.py models/test_encoders.py \
	  models/test_families.py

llm-answer: models ## ask the converted model the capital of France (greedy)
	$(PY) models/llm_reference.py $(LLM_MODEL_DIR) "What is the capital of France?"
