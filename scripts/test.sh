#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite on the CPU, offline.
#   bash scripts/test.sh            every test (about 7 minutes on 2 cores)
#   bash scripts/test.sh --quick    the tests not marked slow (-m "not slow"): every module, under 2 minutes
# Other arguments go to pytest as they are (bash scripts/test.sh --quick tests/test_cache.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for arg in "$@"; do
    if [[ "$arg" == "--quick" ]]; then
        args+=(-m "not slow")
    else
        args+=("$arg")
    fi
done
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest ${args[@]+"${args[@]}"}
