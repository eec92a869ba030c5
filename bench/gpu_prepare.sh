#!/usr/bin/env bash
# Here (a machine with PyPI): everything bench/gpu_run.sh needs on a lent GPU machine, which has no
# network. Its image has torch, transformers, accelerate, peft and pyarrow but not trl, datasets,
# gguf, dill or multiprocess (/work/.library/device/KINDS.md): their wheels go to .whl/ (ignored by
# git), the SmolLM2 tokenizer and the alpaca rows to runs/gpu-assets. Then one device call:
#
#     run(command="bash bench/gpu_run.sh", carry=[".whl", "runs/gpu-assets"], timeout_s=540)
#
# Usage: bash bench/gpu_prepare.sh [PYTHON_VERSION]   (default 3.12, the GPU image's Python)
set -euo pipefail
cd "$(dirname "$0")/.."
pyver="${1:-3.12}"
[ -x .venv/bin/python ] || { echo "gpu_prepare: no .venv here; run 'make test' (or 'make install') first" >&2; exit 1; }
mkdir -p .whl  # ignored by .gitignore
rm -f .whl/*.whl
# the versions sft's own environment tests with (trl: bench/trl_side_by_side.py's)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python bench/gpu_side_by_side.py --prepare runs/gpu-assets
du -sh .whl runs/gpu-assets
echo 'next, on the GPU: run(command="bash bench/gpu_run.sh", carry=[".whl", "runs/gpu-assets"], timeout_s=540)'
