#!/usr/bin/env bash
# The whole pipeline on the tiny offline default, on a CPU, in a few minutes:
# set up → build the tiny corpus/tokenizer/models → stage one (teacher → cache) → stage two
# (distilled student; and the hard-label baseline, same steps) → evaluation table (lm-evaluation-harness's
# wikitext metrics, fidelity to the teacher).
# Extra arguments are config overrides applied to every stage, e.g. `cache.mode=full`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CONFIG=configs/tiny.yaml
OUT=outputs/tiny

python -m tiny_world --out tiny
python -m stage1_teacher.dump --config "$CONFIG" cache.overwrite=true "$@"
python -m stage2_student.train --config "$CONFIG" train.overwrite=true \
    train.output_dir="$OUT/distilled" train.log_dir="$OUT/logs/distilled" "$@"
python -m stage2_student.train --config "$CONFIG" train.overwrite=true \
    train.output_dir="$OUT/hard_labels" train.log_dir="$OUT/logs/hard_labels" \
    train.kd_weight=0 train.hard_weight=1 "$@"
python -m stage2_student.evaluate --config "$CONFIG" --teacher tiny/teacher \
    --model tiny/teacher --name "teacher" \
    --model tiny/student --name "student before" \
    --model "$OUT/hard_labels" --name "student, hard labels only" \
    --model "$OUT/distilled" --name "student, distilled (KD)" \
    eval.output="$OUT/eval_test.json" "$@"
