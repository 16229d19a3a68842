#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite on the CPU, offline.
#   bash scripts/test.sh            every test
#   bash scripts/test.sh --quick    the tests not marked slow (-m "not slow")
# Two pytest-xdist workers, one test file each at a time (module fixtures are built once); `-n 0` runs in
# this process. Other arguments go to pytest as they are (bash scripts/test.sh --quick tests/test_cache.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
[[ " $* " == *" -n "* ]] || args+=(-n 2 --dist loadfile)
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
