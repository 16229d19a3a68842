#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): ≤ 8 minutes on one H100/H200-class GPU; its tables go into
# docs/performance.md. Nothing is downloaded: the models are random-initialised at the shipped Qwen2
# shapes (configs/qwen2/); the tokenizer and text come from bench/out/gpu_inputs/ or ../shared/data/.
#   bash bench/gpu_check.sh --stage-inputs   copy them from ../shared/data into bench/out/gpu_inputs/
#                                            (git-ignored; carry that folder to a machine without ../shared)
#   bash bench/gpu_check.sh [--quick]        run it (further flags: python -m bench.gpu_check --help)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--stage-inputs" ]; then
    mkdir -p bench/out/gpu_inputs
    cp -r ../shared/data/qwen2-tokenizer ../shared/data/wikitext-2-raw-v1 bench/out/gpu_inputs/
    echo "[gpu_check] staged the tokenizer and WikiText-2 in bench/out/gpu_inputs/"
    exit 0
fi
# A GPU machine has its own CUDA build of torch: use a Python that has everything, else a .venv that
# sees the machine's packages (scripts/setup.sh would pin the CPU build).
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif ! "$PY" -c "import torch, transformers, textbrewer, h5py, hdf5plugin, accelerate" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
    .venv/bin/python -m pip install -q -e .
    PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 540 "$PY" -m bench.gpu_check "$@"
