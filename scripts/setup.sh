#!/usr/bin/env bash
# Creates .venv with the project and its test tools. Pins the CPU build of torch (a bare
# `pip install torch` would pull a multi-GB CUDA build); set TORCH_SPEC to choose another.
# A stamp in .venv records what was installed: a rerun with the same pyproject.toml, this script and
# TORCH_SPEC skips pip (it would only confirm what is there); delete .venv/.setup-stamp to force it.
# EXTRAS names the optional dependencies installed (default `test`; CI: `test,harness`, lm-evaluation-harness).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
stamp=$(cat pyproject.toml scripts/setup.sh | python -c "import hashlib, os, sys; print(hashlib.sha256(sys.stdin.buffer.read() + os.environ.get('TORCH_SPEC', '').encode() + os.environ.get('EXTRAS', 'test').encode()).hexdigest())")
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp" ]; then
    rm -f .venv/.setup-stamp
    python -m pip install -q --upgrade pip
    python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    python -m pip install -q -e ".[${EXTRAS:-test}]"
    echo "$stamp" > .venv/.setup-stamp
fi
python -c "import torch, transformers, textbrewer, h5py; print(f'[setup] torch {torch.__version__}, transformers {transformers.__version__}, textbrewer {textbrewer.__version__}, h5py {h5py.__version__}')"
