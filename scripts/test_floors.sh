#!/usr/bin/env bash
# Checks the dependency floors: creates .venv-floors with every dependency of [project].dependencies in
# pyproject.toml at its declared minimum (`>=X` installed as `==X`, read from pyproject.toml itself), the CPU
# build of torch and the `test` extras, then runs the quick subset (-m "not slow") offline on the CPU.
# A stamp in .venv-floors skips pip when pyproject.toml and this script are unchanged (delete
# .venv-floors/.floors-stamp to force it). Needs Python 3.11+ (tomllib). Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-floors/bin/python ] || "$PYTHON" -m venv .venv-floors
. .venv-floors/bin/activate
stamp=$(cat pyproject.toml scripts/test_floors.sh | python -c "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
if [ "$(cat .venv-floors/.floors-stamp 2>/dev/null)" != "$stamp" ]; then
    rm -f .venv-floors/.floors-stamp
    python - > .venv-floors/floors.txt <<'EOF'
import re, tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name, version = re.fullmatch(r"([\w.-]+)\s*(?:>=|==)\s*([\w.]+)", dep.strip()).groups()
    print(f"{name}=={version}")
EOF
    python -m pip install -q --upgrade pip
    python -m pip install -q torch==2.13.0  # the CPU build (any other version pulls a multi-GB CUDA build)
    python -m pip install -q -c .venv-floors/floors.txt -e ".[test]"
    echo "$stamp" > .venv-floors/.floors-stamp
fi
python - <<'EOF'
from importlib.metadata import version
names = [line.split("==")[0] for line in open(".venv-floors/floors.txt")]
print("[floors]", ", ".join(f"{name} {version(name)}" for name in names))
EOF
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -m "not slow" -p no:cacheprovider "$@"
