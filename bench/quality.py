"""Quality study on real text: one teacher, one cache per mode, the same student distilled from each.

    python -m bench.quality [--out bench/out/quality] [--quick | --large] [--results docs/results.md]
                            [--data-dir ../shared/data/wikitext-2-raw-v1]

On WikiText-2 raw (train on `wiki.valid.raw`, evaluate on `wiki.test.raw`, the upstream files in
`--data-dir`, by default `../shared/data/wikitext-2-raw-v1` next to the repository), at a scale two CPU
cores finish in under an hour:

1. a byte-level BPE tokenizer (`tiny_world.models.train_tokenizer`) trained on the training text;
2. a Qwen2 teacher trained from scratch on packed blocks of it (`tiny_world.models.train_teacher`), and a
   randomly initialised Qwen2 student (same seed for every run), both configured by
   `tiny_world.models.model_config`, with padded vocabularies that differ from each other
   (`tiny_world.models.padded_vocab_sizes`);
3. one cache per mode through the real entry point `python -m stage1_teacher.dump`: full, top-k 12,
   top-k 64 and sample (50 draws);
4. the same student, same seed and same optimizer steps, trained through `python -m stage2_student.train`
   with hard labels only, from each cache (top-k with the tail bucket and renormalized) and from the live
   teacher (`--live-teacher`, TextBrewer's usual route);
5. everything evaluated by `python -m stage2_student.evaluate` on the test split;

and writes one table (perplexity, ECE, cache bytes per token, seconds per optimizer step) to
`--results` (default `docs/results.md`, or `<out>/results.md` with `--quick`). `--quick` shrinks every
stage (and the data: the first lines of each file) to smoke-test the script in a few minutes;
`--large` uses every block, a longer-trained teacher and 3x the student steps.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from bench.report import DATA, DEFAULT_DATA_DIR, replace_section, scale_from_json
from common.cli import UserError, run_main
from tiny_world.models import (
    EOS,
    ModelShape,
    model_config,
    padded_vocab_sizes,
    perplexity,
    train_teacher,
    train_tokenizer,
)

DATA_FILES = ("wiki.valid.raw", "wiki.test.raw")  # training text, evaluation text
SEED = 42


@dataclass
class Scale:
    """Every size in the study; `quick()` is the smoke-test version."""
    vocab: int = 4096
    seq_len: int = 128
    teacher: ModelShape = ModelShape(hidden_size=192, num_hidden_layers=4, intermediate_size=576,
                                     tie_word_embeddings=False)
    student: ModelShape = ModelShape(hidden_size=128, num_hidden_layers=2, intermediate_size=384,
                                     tie_word_embeddings=True)
    teacher_steps: int = 400  # of 16 blocks; the teacher trains on every block of the training text
    max_blocks: int | None = 800  # blocks dumped and distilled on (the first ones); None = all
    student_steps: int = 100
    lr: float = 2e-3
    eval_stride: int = 128
    data_lines: int | None = None  # quick: only the first lines of each data file
    eval_lines: int | None = None  # evaluate on the first lines of wiki.test.raw; None = all of it
    runs: list[str] | None = None  # labels of the student runs to make (smoke tests: fewer processes); None = all

    @classmethod
    def large(cls) -> "Scale":
        return cls(teacher_steps=1000, max_blocks=None, student_steps=300)

    @classmethod
    def quick(cls) -> "Scale":
        return cls(vocab=1024, teacher_steps=20, max_blocks=48, student_steps=3, data_lines=300, eval_lines=150)


# the quantized cache's student against the lossless one's; the noise is the same lossless run with another
# train.seed (another data order)
QUANTIZED_RUN = "top-64, tail bucket, cache.quantize=true"
NOISE_RUN = "top-64, tail bucket, train.seed + 1"


@dataclass
class Run:
    """One student run: its label, the cache it reads and what differs from the shared overrides."""
    label: str
    cache: str
    overrides: dict[str, Any]
    live: bool = False


# --- helpers ------------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def overrides(values: dict[str, Any]) -> list[str]:
    """`key=value` arguments as the CLIs take them (None → null)."""
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def run_cli(module: str, args: list[str], log_path: str) -> float:
    """Run `python -m module args…`, its output to `log_path`; returns its wall time. Fails loudly."""
    cmd = [sys.executable, "-m", module, *args]
    log(" ".join(shlex.quote(c) for c in cmd[1:]))
    start = time.time()
    with open(log_path, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as fh:
            tail = fh.read()[-3000:]
        raise SystemExit(f"{module} failed with status {proc.returncode}; see {log_path}:\n{tail}")
    return time.time() - start


def prefix_dir(path: str, data_dir: str, lines: dict[str, int | None]) -> str:
    """`path` holding the first `lines[name]` lines of each file of `data_dir` (all of it for None)."""
    os.makedirs(path, exist_ok=True)
    for name, count in lines.items():
        with open(os.path.join(data_dir, name), encoding="utf-8") as src:
            text = src.readlines()[:count]
        with open(os.path.join(path, name), "w", encoding="utf-8", newline="\n") as dst:
            dst.writelines(text)
    return path


def data_dirs(out: str, data_dir: str, scale: Scale) -> tuple[str, str]:
    """(training folder, evaluation folder): `data_dir` itself, or its files' first lines under `out`."""
    missing = [name for name in DATA_FILES if not os.path.isfile(os.path.join(data_dir, name))]
    if missing:
        raise UserError(f"{data_dir} has no {' or '.join(missing)}; pass --data-dir with the WikiText-2 raw files")
    train = data_dir if scale.data_lines is None else \
        prefix_dir(os.path.join(out, "data"), data_dir, {"wiki.valid.raw": scale.data_lines})
    if scale.eval_lines is None:
        return train, data_dir
    return train, prefix_dir(os.path.join(out, "eval-data"), data_dir, {"wiki.test.raw": scale.eval_lines})


# --- stage 0: tokenizer, teacher, student ---------------------------------------------------------------------

def non_embedding_params(model: torch.nn.Module) -> int:
    embeds = {id(p) for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeds)


def build_models(out: str, local_dir: str, scale: Scale) -> dict[str, Any]:
    """Tokenizer on the training text, the trained teacher and the untrained student, saved under `out`."""
    from transformers import Qwen2ForCausalLM

    from common.config import DataConfig
    from common.data import load_rows, pack_blocks, tokenize_stream

    rows = load_rows(DataConfig(local_dir=local_dir, max_blocks=None), DATA["data.split"])
    tokenizer = train_tokenizer("".join(rows), scale.vocab)
    blocks = pack_blocks(tokenize_stream(tokenizer, rows), scale.seq_len, None)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    vocab = dict(zip(("teacher", "student"), padded_vocab_sizes(len(tokenizer))))
    info: dict[str, Any] = {"tokenizer_size": len(tokenizer), "train_tokens": int(blocks.size),
                            "train_blocks": len(blocks)}
    for role, shape in (("teacher", scale.teacher), ("student", scale.student)):
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(model_config(shape, vocab[role], eos_id))
        info[role] = {"vocab_size": vocab[role], **asdict(shape),
                      "params": sum(p.numel() for p in model.parameters()),
                      "non_embedding_params": non_embedding_params(model)}
        if role == "teacher":
            log(f"training the teacher ({info[role]['params'] / 1e6:.2f} M params) for {scale.teacher_steps} steps")
            info[role]["train_seconds"] = round(train_teacher(model, blocks, scale.teacher_steps, SEED), 1)
            info[role]["train_ppl"] = round(perplexity(model, blocks), 2)
        model.save_pretrained(os.path.join(out, role))
        tokenizer.save_pretrained(os.path.join(out, role))
    return info


# --- stage 1: caches ---------------------------------------------------------------------------------------------

CACHES = {"full": {"cache.mode": "full"}, "topk12": {"cache.mode": "topk", "cache.k": 12},
          "topk64": {"cache.mode": "topk", "cache.k": 64},
          "topk64q": {"cache.mode": "topk", "cache.k": 64, "cache.quantize": "true"},
          "sample50": {"cache.mode": "sample", "cache.draws": 50, "cache.sample_temperature": 1.0}}


def dump_caches(out: str, common: dict[str, Any], names: set[str]) -> dict[str, dict[str, Any]]:
    """Each cache of `names` through `python -m stage1_teacher.dump`; returns each one's size and timing."""
    stats = {}
    for name, mode in CACHES.items():
        if name not in names:
            continue
        cache_dir = os.path.join(out, "cache", name)
        args = overrides({**common, "teacher.model": os.path.join(out, "teacher"), "teacher.batch_size": 16,
                          "cache.dir": cache_dir, "cache.overwrite": "true", **mode})
        seconds = run_cli("stage1_teacher.dump", args, os.path.join(out, "logs", f"dump_{name}.log"))
        stats[name] = {"dir": cache_dir, "dump_seconds": round(seconds, 1), **cache_stats(cache_dir)}
    return stats


def cache_stats(cache_dir: str) -> dict[str, Any]:
    """Bytes per token on disk (shard files over cached positions) and teacher ids stored per position."""
    from cache.manifest import load_manifest

    manifest = load_manifest(cache_dir)
    stats = {"mode": manifest.mode, "bytes_per_token": manifest.bytes_on_disk / manifest.num_tokens,
             "positions": manifest.num_tokens, "quantized": "topk_sqrtp_by_id" in manifest.datasets}
    if manifest.mode == "full":
        stats["ids_per_position"] = manifest.vocab_size
    elif manifest.mode == "topk":
        stats["ids_per_position"] = manifest.k
        stats["teacher_mass_in_topk"] = topk_mass(cache_dir)
    else:  # unique drawn ids, averaged over every cached position
        stats["ids_per_position"] = sum_over_blocks(cache_dir, lambda b: int((b["sample_counts"] > 0).sum())) / \
            manifest.num_tokens
    return stats


def sum_over_blocks(cache_dir: str, fn) -> float:
    """Σ fn(block) over every block of the cache, read through the cache's reader."""
    from cache.reader import CacheReader

    reader = CacheReader(cache_dir)
    try:
        return sum(fn(reader.block(i)) for i in range(len(reader)))
    finally:
        reader.close()


def topk_mass(cache_dir: str) -> float:
    """Mean teacher probability held by the cached top-k ids (1 − the tail bucket), over every position."""
    from cache.manifest import load_manifest

    total = sum_over_blocks(cache_dir, lambda b: float(np.exp(b["topk_logprobs"].astype(np.float64)).sum()))
    return total / load_manifest(cache_dir).num_tokens


# --- stage 2: students --------------------------------------------------------------------------------------------

def student_runs(out: str, labels: list[str] | None = None) -> list[Run]:
    """The study's runs, or those of them named in `labels`."""
    cache = lambda name: os.path.join(out, "cache", name)  # noqa: E731
    hard = {"train.kd_weight": 0, "train.hard_weight": 1}
    runs = [Run("hard labels (CE)", cache("topk12"), hard),
            Run("full KD (cache)", cache("full"), {}),
            Run("full KD (live teacher)", cache("full"), {"teacher.model": os.path.join(out, "teacher")}, live=True),
            Run("top-12, tail bucket", cache("topk12"), {"train.topk_tail": "bucket"}),
            Run("top-12, renormalized", cache("topk12"), {"train.topk_tail": "renormalize"}),
            Run("top-64, tail bucket", cache("topk64"), {"train.topk_tail": "bucket"}),
            Run(NOISE_RUN, cache("topk64"), {"train.topk_tail": "bucket", "train.seed": SEED + 1}),
            Run(QUANTIZED_RUN, cache("topk64q"), {"train.topk_tail": "bucket"}),
            Run("top-64, renormalized", cache("topk64"), {"train.topk_tail": "renormalize"}),
            Run("sample, 50 draws", cache("sample50"), {})]
    unknown = sorted(set(labels or ()) - {run.label for run in runs})
    if unknown:
        raise UserError(f"no student run is labelled {', '.join(map(repr, unknown))}")
    return [run for run in runs if labels is None or run.label in labels]


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")


def median_step_seconds(metrics_path: str) -> float:
    """Median time between optimizer steps: robust to stalls when other jobs share the cores."""
    with open(metrics_path) as fh:
        elapsed = [json.loads(line)["elapsed_s"] for line in fh]
    return float(np.median(np.diff([0.0, *elapsed])))


def train_students(out: str, common: dict[str, Any], scale: Scale, runs: list[Run]) -> list[dict[str, Any]]:
    """Every run with the same student, seed, data order, steps and optimizer; returns run.json's essentials."""
    shared = {**common, "student.model": os.path.join(out, "student"), "train.batch_size": 8,
              "train.gradient_accumulation": 2, "train.epochs": 1000, "train.max_steps": scale.student_steps,
              "train.lr": scale.lr, "train.temperature": 1.0, "train.seed": SEED, "train.overwrite": "true"}
    results = []
    for run in runs:
        name = slug(run.label)
        target = os.path.join(out, "students", name)
        args = ["--cache", run.cache, *(["--live-teacher"] if run.live else []),
                *overrides({**shared, "train.output_dir": target, "train.log_dir": os.path.join(out, "tb", name),
                            **run.overrides})]
        wall = run_cli("stage2_student.train", args, os.path.join(out, "logs", f"train_{name}.log"))
        with open(os.path.join(target, "run.json")) as fh:
            record = json.load(fh)
        results.append({"label": run.label, "dir": target, "cache": os.path.basename(run.cache), "live": run.live,
                        "steps": record["steps"], "tokens": record["tokens"],
                        "seconds_per_step": record["seconds_per_step"],
                        "median_step_seconds": median_step_seconds(os.path.join(target, "metrics.jsonl")),
                        "wall_seconds": round(wall, 1),
                        "final_loss": record["final"].get("loss"), "final_hard_loss": record["final"].get("hard_loss")})
    return results


# --- evaluation and the table ------------------------------------------------------------------------------------

def evaluate(out: str, models: list[tuple[str, str]], local_dir: str, scale: Scale) -> dict[str, dict[str, Any]]:
    """All models in one `python -m stage2_student.evaluate`; returns its results by name."""
    output = os.path.join(out, "eval_test.json")
    args = [a for name, path in models for a in ("--model", path, "--name", name)]
    args += overrides({"data.local_dir": local_dir, "data.seq_len": scale.seq_len, "eval.split": "test",
                       "eval.stride": scale.eval_stride, "eval.output": output})
    run_cli("stage2_student.evaluate", args, os.path.join(out, "logs", "evaluate.log"))
    with open(output) as fh:
        return {r["name"]: r for r in json.load(fh)["results"]}


def eval_text(eval_dir: str, scale: Scale) -> str:
    """What the evaluation read, in words."""
    with open(os.path.join(eval_dir, "wiki.test.raw"), encoding="utf-8") as fh:
        text = fh.read()
    what = "the whole of wiki.test.raw" if scale.eval_lines is None else \
        f"the first {scale.eval_lines} lines of wiki.test.raw"
    return f"{what} ({len(text.split()):,} words)"


def table(runs: list[dict[str, Any]], caches: dict[str, dict[str, Any]], scores: dict[str, dict[str, Any]]) -> str:
    head = ("| run | cache mode | teacher ids / position | cache B / token | test perplexity | ECE | top-1 acc | "
            "s / step (mean) | s / step (median) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [head]
    for name in ("teacher", "untrained student"):
        s = scores[name]
        rows.append(f"| {name} | – | – | – | {s['perplexity']:.2f} | {s['ece']:.4f} | {s['accuracy']:.4f} | – | – |")
    for r in runs:
        s, c = scores[r["label"]], caches[r["cache"]]
        if r["label"].startswith("hard"):
            mode, ids, size = "none (hard labels)", "–", "–"
        else:
            k = f", k={c['ids_per_position']}" if c["mode"] == "topk" else ""
            k += ", quantized" if c.get("quantized") else ""
            mode = "live teacher" if r["live"] else c["mode"] + k
            ids = f"{c['ids_per_position']:.1f}" if c["mode"] == "sample" else str(c["ids_per_position"])
            size = "– (teacher run every step)" if r["live"] else f"{c['bytes_per_token']:,.1f}"
        rows.append(f"| {r['label']} | {mode} | {ids} | {size} | {s['perplexity']:.2f} | {s['ece']:.4f} | "
                    f"{s['accuracy']:.4f} | {r['seconds_per_step']:.3f} | {r['median_step_seconds']:.3f} |")
    return "\n".join(rows)


def quantized_vs_noise(scores: dict[str, dict[str, Any]]) -> str:
    """The quantized top-64 cache's student against the lossless one's, beside the noise: the difference between
    two runs from the lossless cache that differ only in train.seed."""
    lossless, noise, quantized = (scores.get(label) for label in ("top-64, tail bucket", NOISE_RUN, QUANTIZED_RUN))
    if not (lossless and noise and quantized):
        return ""
    gap, spread = (abs(other["perplexity"] - lossless["perplexity"]) for other in (quantized, noise))
    verdict = "within" if gap <= spread else "outside"
    return (f"\nQuantized top-64 cache (`cache.quantize=true`): test perplexity {quantized['perplexity']:.2f} against "
            f"{lossless['perplexity']:.2f} from the lossless cache, a difference of {gap:.2f}, {verdict} the noise: "
            f"{spread:.2f} between two lossless runs that differ only in `train.seed` (the data order).\n")


def write_results(path: str, command: str, info: dict[str, Any]) -> None:
    """The table and the scale; `docs/results.md`'s discussion is written by hand around the marked block."""
    t, s = info["models"]["teacher"], info["models"]["student"]
    blocks = info["scale"]["max_blocks"]
    distilled = "all" if blocks is None else f"the first {blocks} blocks ({blocks * info['scale']['seq_len']:,} tokens)"
    block = (f"<!-- generated by `{command}` -->\n\n{info['table']}\n\n"
             f"Scale: tokenizer {info['models']['tokenizer_size']} BPE tokens; training text "
             f"{info['models']['train_tokens']:,} tokens ({info['models']['train_blocks']} blocks of "
             f"{info['scale']['seq_len']}), of which {distilled} are dumped and distilled on; "
             f"teacher {t['params'] / 1e6:.2f} M params "
             f"({t['non_embedding_params'] / 1e6:.2f} M non-embedding, {t['num_hidden_layers']} layers × "
             f"{t['hidden_size']}), {info['scale']['teacher_steps']} steps of 16 blocks in {t['train_seconds']:.0f} s "
             f"(training-text perplexity {t['train_ppl']}); student {s['params'] / 1e6:.2f} M params "
             f"({s['non_embedding_params'] / 1e6:.2f} M non-embedding, {s['num_hidden_layers']} layers × "
             f"{s['hidden_size']}), {info['scale']['student_steps']} optimizer steps of 16 blocks "
             f"(lr {info['scale']['lr']}, T = 1.0, seed {SEED}) per run; evaluation on "
             f"{info['eval_text']}, windows of {info['scale']['seq_len']} tokens, "
             f"stride {info['scale']['eval_stride']}; "
             f"total wall time {info['wall_seconds'] / 60:.1f} min.\n" + quantized_vs_noise(info["scores"]))
    begin, end = "<!-- BEGIN quality table -->", "<!-- END quality table -->"
    replace_section(path, block, begin, end, "Quality study")


# --- main ----------------------------------------------------------------------------------------------------------

def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/quality", help="scratch directory (default: bench/out/quality)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny everything: a smoke test of the script")
    size.add_argument("--large", action="store_true", help="all blocks, a longer-trained teacher and "
                      "3x the student steps (about 15 min on two idle cores)")
    size.add_argument("--scale-json", help=argparse.SUPPRESS)  # tests: Scale fields as JSON, smaller than --quick
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with WikiText-2 raw's wiki.valid.raw "
                        "and wiki.test.raw (default: ../shared/data/wikitext-2-raw-v1 next to the repository)")
    parser.add_argument("--results", default=None, help="markdown file for the table (default: docs/results.md, "
                        "or <out>/results.md with --quick)")
    args = parser.parse_args(argv)
    scale = Scale.quick() if args.quick else Scale.large() if args.large else \
        scale_from_json(Scale, args.scale_json) if args.scale_json else Scale()
    out = os.path.abspath(args.out)
    start = time.time()
    local_dir, eval_dir = data_dirs(out, os.path.abspath(args.data_dir), scale)  # checked before anything is written
    planned = student_runs(out, scale.runs)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    datasets.disable_progress_bars()
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    common = {"data.local_dir": local_dir, **DATA, "data.seq_len": scale.seq_len, "data.max_blocks": scale.max_blocks}

    models = build_models(out, local_dir, scale)
    log(f"teacher trained in {models['teacher']['train_seconds']} s, training-text perplexity "
        f"{models['teacher']['train_ppl']}")
    caches = dump_caches(out, common, {os.path.basename(run.cache) for run in planned})
    log("caches: " + ", ".join(f"{k} {v['bytes_per_token']:.1f} B/token" for k, v in caches.items()))
    runs = train_students(out, common, scale, planned)
    evaluated = [("teacher", os.path.join(out, "teacher")), ("untrained student", os.path.join(out, "student"))]
    scores = evaluate(out, evaluated + [(r["label"], r["dir"]) for r in runs], eval_dir, scale)

    command = "python -m bench.quality" + (" --quick" if args.quick else "") + (" --large" if args.large else "") + \
        (f" --scale-json {shlex.quote(args.scale_json)}" if args.scale_json else "") + \
        (f" --out {args.out}" if args.out != "bench/out/quality" else "") + \
        (f" --data-dir {args.data_dir}" if args.data_dir != DEFAULT_DATA_DIR else "") + \
        (f" --results {args.results}" if args.results else "")
    info = {"command": command, "scale": asdict(scale), "models": models, "caches": caches, "runs": runs,
            "scores": scores, "eval_text": eval_text(eval_dir, scale), "table": table(runs, caches, scores),
            "wall_seconds": time.time() - start}
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    # the study's own record is docs/results.md; a smaller scale must not overwrite it by default
    full_study = not (args.quick or args.scale_json)
    results = args.results or ("docs/results.md" if full_study else os.path.join(out, "results.md"))
    write_results(results, command, info)
    print(info["table"])
    log(f"done in {info['wall_seconds'] / 60:.1f} min; wrote {results} and {out}/summary.json")
    return 0


if __name__ == "__main__":
    run_main(main)
