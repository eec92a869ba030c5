#!/usr/bin/env bash
# On a lent GPU machine, in one call (prepared here by bench/gpu_prepare.sh): the carried wheels into
# /tmp/site, the versions it runs with, then bench/gpu_side_by_side.py (padding-free varlen against
# separate forwards on CUDA; TRL's fastest configuration vs sft in bf16 and in fp32, SmolLM2-135M and
# a Llama-3.2-1B-shaped model at 2048 tokens; tokens/s, MFU, peak VRAM). Everything it prints goes to
# $OUT/gpu_run.log, and the section it appends to bench/RESULTS.md to $OUT/results_section.md.
#
# Usage: bash bench/gpu_run.sh [extra gpu_side_by_side.py arguments, e.g. --tiny for a CPU check]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-run-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py="${PYTHON:-python3}"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "gpu_run: installing .whl/ failed"; exit 1; }
        export PYTHONPATH="/tmp/site:src"
    else
        export PYTHONPATH="src"
    fi
    "$py" - <<'PY' || { echo "gpu_run: a package does not import (above); carry its wheel in .whl/"; exit 1; }
import importlib
for name in ("torch", "transformers", "trl", "datasets", "pyarrow", "peft", "accelerate", "gguf", "sft"):
    m = importlib.import_module(name)
    print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available())
PY
    lines=$(wc -l <bench/RESULTS.md)
    # the 1B shape first: its figures are the targets (>= 1.5x TRL, >= 40% MFU); each JSON line is printed as it lands
    timeout 480 "$py" bench/gpu_side_by_side.py --assets runs/gpu-assets --work /tmp/gpu-side-by-side \
        --models llama-3.2-1b,smollm2-135m --fp32 --child-timeout 150 --append "$@"
    echo "gpu_side_by_side exit $?"
    tail -n +"$((lines + 1))" bench/RESULTS.md >"$out/results_section.md"
    date -u
} 2>&1 | tee "$out/gpu_run.log"
