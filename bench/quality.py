"""Quality study on real text: one teacher, one cache per setting, the same student distilled from each, with
intervals over seeds.

    python -m bench.quality [--out bench/out/quality] [--quick] [--jobs 2] [--results docs/results.md]
                            [--data-dir ../shared/data/wikitext-2-raw-v1]

On WikiText-2 raw (train on `wiki.valid.raw`, evaluate on `wiki.test.raw`, the upstream files in
`--data-dir`, by default `../shared/data/wikitext-2-raw-v1` next to the repository), at a scale two CPU
cores finish within 45 minutes (docs/results.md, "Wall time"):

1. a byte-level BPE tokenizer (`tiny_world.models.train_tokenizer`) trained on the training text;
2. a Qwen2 teacher trained from scratch on every packed block of it (`tiny_world.models.train_teacher`), and a
   randomly initialised Qwen2 student (same initialisation for every run), both configured by
   `tiny_world.models.model_config`, with padded vocabularies that differ from each other
   (`tiny_world.models.padded_vocab_sizes`);
3. one cache per setting through the real entry point `python -m stage1_teacher.dump`: full, top-k 12 and 64
   (tail bucket, and top-64 quantized), top-k 12 and 64 with 8 and 32 tail draws, sample with 12 and 50 draws;
   the caches that draw are dumped once per seed (`cache.seed`);
4. the same student trained through `python -m stage2_student.train` from each cache (and with hard labels
   only), once per seed: seed s sets `train.seed` (the data order) and, for the caches that draw, reads the
   cache dumped with `cache.seed=s`;
5. everything evaluated by `python -m stage2_student.evaluate --teacher` on the test split: nats per token,
   bits per byte, KL(teacher ‖ student), top-1 agreement with the teacher, ECE;

and writes the table (mean ± 95 % t-interval over the seeds, and each row's difference to full KD and to hard
labels, paired by seed) to `--results` (default `docs/results.md`, or `<out>/results.md` with `--quick`), and
the picture `docs/quality_vs_bytes.png` beside it. `--jobs` processes run side by side, one thread each (the
dumps, the students, the evaluations); `--quick` shrinks every stage to smoke-test the script in minutes.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
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
# two-sided 95 % quantiles of Student's t by degrees of freedom (the intervals of 2 to 11 seeds)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
HARD, FULL = "hard labels (CE)", "full KD"
PICTURE = "quality_vs_bytes.png"


@dataclass
class Scale:
    """Every size in the study; `quick()` is the smoke-test version."""
    vocab: int = 4096
    seq_len: int = 128
    teacher: ModelShape = ModelShape(hidden_size=192, num_hidden_layers=4, intermediate_size=576,
                                     tie_word_embeddings=False)
    student: ModelShape = ModelShape(hidden_size=128, num_hidden_layers=2, intermediate_size=384,
                                     tie_word_embeddings=True)
    teacher_steps: int = 1000  # of 16 blocks; the teacher trains on every block of the training text
    max_blocks: int | None = None  # blocks dumped and distilled on (the first ones); None = all
    student_steps: int = 300
    lr: float = 2e-3
    seeds: int = 3
    eval_stride: int = 128
    data_lines: int | None = None  # quick: only the first lines of each data file
    eval_lines: int | None = None  # evaluate on the first lines of wiki.test.raw; None = all of it
    runs: list[str] | None = None  # labels of the rows to make (smoke tests: fewer processes); None = all

    @classmethod
    def quick(cls) -> "Scale":
        return cls(vocab=1024, teacher_steps=20, max_blocks=48, student_steps=3, seeds=2, data_lines=300,
                   eval_lines=150)


@dataclass
class Row:
    """One row of the table: a label, the cache it reads (`{seed}` in the name: one cache per seed) and what
    differs from the shared training overrides."""
    label: str
    cache: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def cache_name(self, seed: int) -> str:
        return self.cache.format(seed=seed)


# cache name → its stage-one overrides; a name with "{seed}" is dumped once per seed with cache.seed = seed
CACHES: dict[str, dict[str, Any]] = {
    "full": {"cache.mode": "full"},
    "topk12": {"cache.mode": "topk", "cache.k": 12, "cache.tail_draws": 0},
    "topk64": {"cache.mode": "topk", "cache.k": 64, "cache.tail_draws": 0},
    "topk64q": {"cache.mode": "topk", "cache.k": 64, "cache.tail_draws": 0, "cache.quantize": "true"},
    **{f"topk{k}_tail{t}_s{{seed}}": {"cache.mode": "topk", "cache.k": k, "cache.tail_draws": t,
                                      "cache.sample_temperature": 1.0}
       for k in (12, 64) for t in (8, 32)},
    **{f"sample{m}_s{{seed}}": {"cache.mode": "sample", "cache.draws": m, "cache.sample_temperature": 1.0}
       for m in (12, 50)},
}
ROWS = [Row(HARD, "topk12", {"train.kd_weight": 0, "train.hard_weight": 1}),
        Row(FULL, "full"),
        Row("top-12, tail bucket", "topk12"),
        Row("top-64, tail bucket", "topk64"),
        Row("top-64, tail bucket, quantized", "topk64q"),
        *(Row(f"top-{k} + {t} tail draws", f"topk{k}_tail{t}_s{{seed}}") for k in (12, 64) for t in (8, 32)),
        *(Row(f"sample, {m} draws", f"sample{m}_s{{seed}}") for m in (12, 50))]


# --- helpers ------------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def overrides(values: dict[str, Any]) -> list[str]:
    """`key=value` arguments as the CLIs take them (None → null)."""
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def run_cli(module: str, args: list[str], log_path: str, threads: int | None = None) -> float:
    """Run `python -m module args…`, its output to `log_path` (with `threads` intra-op threads, when given);
    returns its wall time. Fails loudly."""
    cmd = [sys.executable, "-m", module, *args]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})}
    log(" ".join(shlex.quote(c) for c in cmd[1:]))
    start = time.time()
    with open(log_path, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        with open(log_path) as fh:
            tail = fh.read()[-3000:]
        raise SystemExit(f"{module} failed with status {proc.returncode}; see {log_path}:\n{tail}")
    return time.time() - start


def side_by_side(jobs: int, calls: list) -> list:
    """Each zero-argument call of `calls`, `jobs` at a time (each starts its own process), results in order."""
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(lambda call: call(), calls))


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

def dump_caches(out: str, common: dict[str, Any], names: list[str], jobs: int) -> dict[str, dict[str, Any]]:
    """Each cache of `names` (with its seed filled in) through `python -m stage1_teacher.dump`; returns each one's
    size and timing."""
    def dump(name: str) -> dict[str, Any]:
        template = next(t for t in CACHES if t == name or t.format(seed=name.rsplit("_s", 1)[-1]) == name)
        extra = dict(CACHES[template])
        if "{seed}" in template:
            extra["cache.seed"] = int(name.rsplit("_s", 1)[-1])
        cache_dir = os.path.join(out, "cache", name)
        args = overrides({**common, "teacher.model": os.path.join(out, "teacher"), "teacher.batch_size": 16,
                          "cache.dir": cache_dir, "cache.overwrite": "true", **extra})
        seconds = run_cli("stage1_teacher.dump", args, os.path.join(out, "logs", f"dump_{name}.log"),
                          threads=1 if jobs > 1 else None)
        return {"dir": cache_dir, "dump_seconds": round(seconds, 1), **cache_stats(cache_dir)}
    return dict(zip(names, side_by_side(jobs, [lambda n=n: dump(n) for n in names])))


def cache_stats(cache_dir: str) -> dict[str, Any]:
    """Bytes per token on disk (shard files over cached positions) and teacher ids stored per position (top-k
    with tail draws: the k and, apart, the mean number of unique tail ids)."""
    from cache.manifest import load_manifest

    manifest = load_manifest(cache_dir)
    stats = {"mode": manifest.mode, "bytes_per_token": manifest.bytes_on_disk / manifest.num_tokens,
             "positions": manifest.num_tokens, "quantized": "topk_sqrtp_by_id" in manifest.datasets}
    stats["tail_draws"] = manifest.tail.draws if manifest.tail is not None else 0
    if manifest.mode == "full":
        stats["ids_per_position"] = manifest.vocab_size
    elif manifest.mode == "topk":
        stats["ids_per_position"] = manifest.k
        stats["teacher_mass_in_topk"] = topk_mass(cache_dir)
        if manifest.tail is not None:  # unique tail ids, averaged over every cached position
            stats["tail_ids_per_position"] = sum_over_blocks(
                cache_dir, lambda b: int((b["tail_counts"] > 0).sum())) / manifest.num_tokens
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

def planned_rows(labels: list[str] | None) -> list[Row]:
    """The study's rows, or those of them named in `labels`."""
    unknown = sorted(set(labels or ()) - {row.label for row in ROWS})
    if unknown:
        raise UserError(f"no student run is labelled {', '.join(map(repr, unknown))}")
    return [row for row in ROWS if labels is None or row.label in labels]


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")


def median_step_seconds(metrics_path: str) -> float:
    """Median time between optimizer steps: robust to stalls when other jobs share the cores."""
    with open(metrics_path) as fh:
        elapsed = [json.loads(line)["elapsed_s"] for line in fh]
    return float(np.median(np.diff([0.0, *elapsed])))


def train_students(out: str, common: dict[str, Any], scale: Scale, rows: list[Row], jobs: int) -> list[dict[str, Any]]:
    """Every row once per seed, with the same student, steps and optimizer; returns run.json's essentials."""
    shared = {**common, "student.model": os.path.join(out, "student"), "train.batch_size": 8,
              "train.gradient_accumulation": 2, "train.epochs": 1000, "train.max_steps": scale.student_steps,
              "train.lr": scale.lr, "train.temperature": 1.0, "train.overwrite": "true"}

    def train(row: Row, seed: int) -> dict[str, Any]:
        name = f"{slug(row.label)}_seed{seed}"
        target = os.path.join(out, "students", name)
        args = ["--cache", os.path.join(out, "cache", row.cache_name(seed)),
                *overrides({**shared, "train.seed": SEED + seed, "train.output_dir": target,
                            "train.log_dir": os.path.join(out, "tb", name), **row.overrides})]
        wall = run_cli("stage2_student.train", args, os.path.join(out, "logs", f"train_{name}.log"),
                       threads=1 if jobs > 1 else None)
        with open(os.path.join(target, "run.json")) as fh:
            record = json.load(fh)
        return {"label": row.label, "seed": seed, "name": name, "dir": target, "cache": row.cache_name(seed),
                "steps": record["steps"], "seconds_per_step": record["seconds_per_step"],
                "median_step_seconds": median_step_seconds(os.path.join(target, "metrics.jsonl")),
                "wall_seconds": round(wall, 1)}
    calls = [lambda r=row, s=seed: train(r, s) for seed in range(scale.seeds) for row in rows]
    return side_by_side(jobs, calls)


# --- evaluation ------------------------------------------------------------------------------------------------

def evaluate(out: str, models: list[tuple[str, str]], local_dir: str, scale: Scale, jobs: int) -> dict[str, dict]:
    """Every model against the teacher, in `jobs` processes of `python -m stage2_student.evaluate --teacher`;
    returns the results by name."""
    groups = [models[i::jobs] for i in range(jobs) if models[i::jobs]]

    def run(index: int, group: list[tuple[str, str]]) -> dict[str, dict]:
        output = os.path.join(out, f"eval_test_{index}.json")
        args = [a for name, path in group for a in ("--model", path, "--name", name)]
        args += ["--teacher", os.path.join(out, "teacher")]
        # the study's numbers are strided token perplexities (docs/results.md): not the lm-eval default protocol
        args += overrides({"data.local_dir": local_dir, "data.seq_len": scale.seq_len, "eval.split": "test",
                           "eval.protocol": "strided", "eval.stride": scale.eval_stride, "eval.output": output,
                           "eval.models_per_pass": len(group)})  # the teacher's forward once for the group
        run_cli("stage2_student.evaluate", args, os.path.join(out, "logs", f"evaluate_{index}.log"),
                threads=1 if jobs > 1 else None)
        with open(output) as fh:
            return {r["name"]: r for r in json.load(fh)["results"]}
    scores: dict[str, dict] = {}
    for part in side_by_side(jobs, [lambda i=i, g=g: run(i, g) for i, g in enumerate(groups)]):
        scores.update(part)
    return scores


def eval_text(eval_dir: str, scale: Scale) -> str:
    """What the evaluation read, in words."""
    with open(os.path.join(eval_dir, "wiki.test.raw"), encoding="utf-8") as fh:
        text = fh.read()
    what = "the whole of wiki.test.raw" if scale.eval_lines is None else \
        f"the first {scale.eval_lines} lines of wiki.test.raw"
    return f"{what} ({len(text.split()):,} words)"


# --- statistics, the table and the picture ----------------------------------------------------------------------

def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t-interval); the half-width is NaN for a single value."""
    values = [float(v) for v in values]
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan")
    return mean, T_975.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / len(values) ** 0.5


METRICS = {"nats": "nll", "bpb": "bits_per_byte", "kl": "kl_to_teacher", "agreement": "top1_agreement",
           "ece": "ece"}


def summarize(rows: list[Row], runs: list[dict], caches: dict[str, dict], scores: dict[str, dict]) -> list[dict]:
    """Per row: each metric's mean and interval over the seeds, its cache's bytes per token (mean over the
    seeds' caches), s/step, and its nats/token difference to full KD and to hard labels, paired by seed."""
    by_row: dict[str, dict[int, dict]] = {}
    for run in runs:
        by_row.setdefault(run["label"], {})[run["seed"]] = {**run, **scores[run["name"]]}
    summary = []
    for row in rows:
        seeds = by_row[row.label]
        record: dict[str, Any] = {"label": row.label, "seeds": len(seeds)}
        for key, metric in METRICS.items():
            record[key] = interval([s[metric] for s in seeds.values()])
        record["step_seconds"] = interval([s["median_step_seconds"] for s in seeds.values()])
        stats = [caches[s["cache"]] for s in seeds.values()]
        record["bytes_per_token"] = None if row.label == HARD else float(np.mean([c["bytes_per_token"] for c in stats]))
        record["ids_per_position"] = float(np.mean([c["ids_per_position"] + c.get("tail_ids_per_position", 0)
                                                    for c in stats]))
        for other in (FULL, HARD):
            if other in by_row and row.label != other:
                paired = [seeds[s]["nll"] - by_row[other][s]["nll"] for s in seeds if s in by_row[other]]
                record[f"vs {other}"] = interval(paired)
        summary.append(record)
    return summary


def fmt(pair: tuple[float, float], digits: int = 3) -> str:
    mean, half = pair
    return f"{mean:.{digits}f}" + ("" if half != half else f" ± {half:.{digits}f}")


def verdicts(summary: list[dict]) -> tuple[list[str], str | None]:
    """Per row, where its nats/token lie against full KD's and hard labels' intervals; and the cheapest row
    (bytes per token) within full KD's interval and below hard labels' (the default's rule)."""
    rows = {r["label"]: r for r in summary}
    if FULL not in rows or HARD not in rows:
        return [], None
    (full_mean, full_half), (hard_mean, hard_half) = rows[FULL]["nats"], rows[HARD]["nats"]
    lines, eligible = [], []
    for r in summary:
        if r["label"] in (FULL, HARD):
            continue
        mean = r["nats"][0]
        within = abs(mean - full_mean) <= full_half
        better = mean < hard_mean - hard_half
        d_full, d_hard = r[f"vs {FULL}"], r[f"vs {HARD}"]
        paired = ("paired difference to full KD " + fmt(d_full) + (" (excludes 0)" if abs(d_full[0]) > d_full[1]
                                                                   else " (includes 0)") +
                  ", to hard labels " + fmt(d_hard) + (" (excludes 0)" if abs(d_hard[0]) > d_hard[1]
                                                       else " (includes 0)"))
        lines.append(f"- {r['label']}: {mean:.3f} nats/token, {'within' if within else 'outside'} full KD's interval "
                     f"({full_mean:.3f} ± {full_half:.3f}), {'below' if better else 'not below'} hard labels' "
                     f"({hard_mean:.3f} ± {hard_half:.3f}); {paired}.")
        if within and better:
            eligible.append(r)
    choice = min(eligible, key=lambda r: r["bytes_per_token"])["label"] if eligible else None
    return lines, choice


def which_cache(summary: list[dict]) -> str:
    """The "Which cache?" table: the settings no cheaper setting beats (lower mean test nats/token), cheapest
    first, each with its bytes per token and its paired difference to full KD."""
    cached = sorted((r for r in summary if r["bytes_per_token"] is not None and f"vs {FULL}" in r),
                    key=lambda r: r["bytes_per_token"])
    lines = ["| budget (cache B / token) | setting | Δ test nats / token vs full KD (paired, 95 %) |",
             "|---|---|---:|"]
    best = float("inf")
    for r in cached:
        if r["nats"][0] < best:
            best = r["nats"][0]
            lines.append(f"| ≥ {r['bytes_per_token']:,.0f} | {r['label']} | {fmt(r[f'vs {FULL}'])} |")
    full = next((r for r in summary if r["label"] == FULL), None)
    if full is not None:
        lines.append(f"| ≥ {full['bytes_per_token']:,.0f} | {FULL} | 0 |")
    return "\n".join(lines)


def table(summary: list[dict], scores: dict[str, dict]) -> str:
    head = ("| run | cache B / token | teacher ids / position | test nats / token | bits / byte | "
            "KL(teacher ‖ student) | top-1 agreement | ECE | s / step | Δ nats vs full KD | Δ nats vs hard labels |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for name in ("teacher", "untrained student"):
        s = scores[name]
        lines.append(f"| {name} | – | – | {s['nll']:.3f} | {s['bits_per_byte']:.3f} | {s['kl_to_teacher']:.3f} | "
                     f"{s['top1_agreement']:.3f} | {s['ece']:.4f} | – | – | – |")
    for r in summary:
        size = "–" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:,.1f}"
        ids = "–" if r["label"] == HARD else f"{r['ids_per_position']:.1f}"
        lines.append(f"| {r['label']} | {size} | {ids} | {fmt(r['nats'])} | {fmt(r['bpb'])} | {fmt(r['kl'])} | "
                     f"{fmt(r['agreement'])} | {fmt(r['ece'], 4)} | {fmt(r['step_seconds'])} | "
                     f"{fmt(r.get('vs ' + FULL, (0.0, float('nan'))))} | "
                     f"{fmt(r.get('vs ' + HARD, (0.0, float('nan'))))} |")
    return "\n".join(lines)


def picture(summary: list[dict], path: str, title: str) -> None:
    """Test nats/token against cache bytes/token (log scale), each row a point with its interval; hard labels
    and full KD as horizontal lines with their intervals as bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, color in ((HARD, "tab:red"), (FULL, "tab:green")):
        r = next((r for r in summary if r["label"] == label), None)
        if r is not None:
            mean, half = r["nats"]
            ax.axhline(mean, color=color, label=label)
            if half == half:
                ax.axhspan(mean - half, mean + half, color=color, alpha=0.15)
    points = sorted((r for r in summary if r["label"] != HARD), key=lambda r: r["bytes_per_token"])
    for i, r in enumerate(points):
        mean, half = r["nats"]
        # a number beside each point, its name in the legend: the points close to full KD crowd each other
        ax.errorbar(r["bytes_per_token"], mean, yerr=0 if half != half else half, fmt="o", capsize=3,
                    label=f"{i + 1}. {r['label']}")
        ax.annotate(str(i + 1), (r["bytes_per_token"], mean), textcoords="offset points",
                    xytext=(4, 4) if i % 2 == 0 else (4, -10), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("cache bytes per token (log scale)")
    ax.set_ylabel("test nats per token (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(path: str, command: str, info: dict[str, Any]) -> None:
    """The table, the verdicts and the scale; `docs/results.md`'s discussion is written by hand around the block."""
    t, s = info["models"]["teacher"], info["models"]["student"]
    sc = info["scale"]
    blocks = sc["max_blocks"]
    distilled = "all" if blocks is None else f"the first {blocks} blocks ({blocks * sc['seq_len']:,} tokens)"
    lines, choice = info["verdicts"], info["choice"]
    block = (f"<!-- generated by `{command}` -->\n\n{info['table']}\n\n"
             f"Mean ± 95 % t-interval over {sc['seeds']} seeds (seed s: `train.seed={SEED}+s`, and `cache.seed=s` for "
             f"the caches that draw); Δ columns: the difference in test nats/token to full KD and to hard labels, "
             f"paired by seed. ![test nats/token against cache bytes/token]({PICTURE})\n\n"
             + "\n".join(lines) + "\n\n"
             + (f"The cheapest setting (cache bytes/token) whose mean lies within full KD's interval and below hard "
                f"labels' interval: **{choice}**.\n\n" if choice else
                "No setting's mean lies both within full KD's interval and below hard labels' interval.\n\n")
             + "**Which cache?** Each setting that no cheaper one beats, with its gap to full KD:\n\n"
             + which_cache(info["summary"]) + "\n\n"
             + f"Scale: tokenizer {info['models']['tokenizer_size']} BPE tokens; training text "
             f"{info['models']['train_tokens']:,} tokens ({info['models']['train_blocks']} blocks of {sc['seq_len']}), "
             f"of which {distilled} are dumped and distilled on; teacher {t['params'] / 1e6:.2f} M params "
             f"({t['non_embedding_params'] / 1e6:.2f} M non-embedding, {t['num_hidden_layers']} layers × "
             f"{t['hidden_size']}), {sc['teacher_steps']} steps of 16 blocks in {t['train_seconds']:.0f} s "
             f"(training-text perplexity {t['train_ppl']}); student {s['params'] / 1e6:.2f} M params "
             f"({s['non_embedding_params'] / 1e6:.2f} M non-embedding, {s['num_hidden_layers']} layers × "
             f"{s['hidden_size']}), {sc['student_steps']} optimizer steps of 16 blocks (lr {sc['lr']}, T = 1.0) per "
             f"run; evaluation on {info['eval_text']}, windows of {sc['seq_len']} tokens, stride {sc['eval_stride']}; "
             f"{info['jobs']} processes side by side, one thread each; total wall time "
             f"{info['wall_seconds'] / 60:.1f} min.\n")
    replace_section(path, block, "<!-- BEGIN quality table -->", "<!-- END quality table -->", "Quality study")


# --- main ----------------------------------------------------------------------------------------------------------

def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/quality", help="scratch directory (default: bench/out/quality)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny everything: a smoke test of the script")
    size.add_argument("--scale-json", help=argparse.SUPPRESS)  # tests: Scale fields as JSON, smaller than --quick
    parser.add_argument("--jobs", type=int, default=2, help="processes side by side, one thread each (default 2; "
                        "1 = one process with every thread)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with WikiText-2 raw's wiki.valid.raw "
                        "and wiki.test.raw (default: ../shared/data/wikitext-2-raw-v1 next to the repository)")
    parser.add_argument("--results", default=None, help="markdown file for the table (default: docs/results.md, "
                        "or <out>/results.md with --quick); the picture is written beside it")
    parser.add_argument("--render", metavar="SUMMARY", help="only write the table and the picture again from an "
                        "earlier run's summary.json (after a change to how they are written)")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render, args.results or "docs/results.md")
    scale = Scale.quick() if args.quick else scale_from_json(Scale, args.scale_json) if args.scale_json else Scale()
    if args.jobs < 1:
        raise UserError(f"--jobs must be positive, got {args.jobs}")
    if scale.seeds < 2:
        raise UserError(f"an interval needs at least 2 seeds, got seeds={scale.seeds}")
    out = os.path.abspath(args.out)
    start = time.time()
    local_dir, eval_dir = data_dirs(out, os.path.abspath(args.data_dir), scale)  # checked before anything is written
    rows = planned_rows(scale.runs)
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
    names = list(dict.fromkeys(row.cache_name(seed) for seed in range(scale.seeds) for row in rows))
    caches = dump_caches(out, common, names, args.jobs)
    log("caches: " + ", ".join(f"{k} {v['bytes_per_token']:.1f} B/token" for k, v in caches.items()))
    runs = train_students(out, common, scale, rows, args.jobs)
    evaluated = [("teacher", os.path.join(out, "teacher")), ("untrained student", os.path.join(out, "student"))]
    scores = evaluate(out, evaluated + [(r["name"], r["dir"]) for r in runs], eval_dir, scale, args.jobs)
    summary = summarize(rows, runs, caches, scores)
    lines, choice = verdicts(summary)

    command = "python -m bench.quality" + (" --quick" if args.quick else "") + \
        (f" --scale-json {shlex.quote(args.scale_json)}" if args.scale_json else "") + \
        (f" --jobs {args.jobs}" if args.jobs != 2 else "") + \
        (f" --out {args.out}" if args.out != "bench/out/quality" else "") + \
        (f" --data-dir {args.data_dir}" if args.data_dir != DEFAULT_DATA_DIR else "") + \
        (f" --results {args.results}" if args.results else "")
    info = {"command": command, "scale": asdict(scale), "jobs": args.jobs, "models": models, "caches": caches,
            "runs": runs, "scores": scores, "summary": summary, "verdicts": lines, "choice": choice,
            "eval_text": eval_text(eval_dir, scale), "table": table(summary, scores),
            "wall_seconds": time.time() - start}
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    # the study's own record is docs/results.md; a smaller scale must not overwrite it by default
    full_study = not (args.quick or args.scale_json)
    results = args.results or ("docs/results.md" if full_study else os.path.join(out, "results.md"))
    publish(results, info)
    log(f"done in {info['wall_seconds'] / 60:.1f} min; wrote {results}, its picture and {out}/summary.json")
    return 0


def publish(results: str, info: dict[str, Any]) -> None:
    """The results block and the picture beside it, from the run's record."""
    write_results(results, info["command"], info)
    models = info["models"]
    picture(info["summary"], os.path.join(os.path.dirname(os.path.abspath(results)), PICTURE),
            f"{models['teacher']['params'] / 1e6:.1f} M teacher → {models['student']['params'] / 1e6:.1f} M student, "
            f"WikiText-2, {info['scale']['seeds']} seeds, 95 % t-intervals")
    print(info["table"])
    print("\n".join(info["verdicts"]))


def render(summary_path: str, results: str) -> int:
    """`--render`: the table, verdicts and picture again from a summary.json, without training anything."""
    try:
        with open(summary_path) as fh:
            info = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--render: cannot read {summary_path}: {err}") from None
    rows = [next(r for r in ROWS if r.label == s["label"]) for s in info["summary"]]
    info["summary"] = summarize(rows, info["runs"], info["caches"], info["scores"])
    info["verdicts"], info["choice"] = verdicts(info["summary"])
    info["table"] = table(info["summary"], info["scores"])
    publish(results, info)
    return 0


if __name__ == "__main__":
    run_main(main)
