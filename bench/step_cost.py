"""Stage two's step cost against plain cross-entropy, route by route, side by side.

    python -m bench.step_cost [--quick] [--device cpu|cuda] [--out bench/out/step_cost]
                              [--data-dir ../shared/data/wikitext-2-raw-v1] [--tokenizer ../shared/data/qwen2-tokenizer]
                              [--docs docs/performance.md] [--plot docs/step_cost.png] [--num-workers N]

On Qwen2's real vocabulary (the tokenizer in `--tokenizer`, 151,646 tokens; the student's padded 151,936,
the teacher's 152,064), with a randomly initialised Qwen2 student (4 layers × 256, tied embeddings) and a
teacher about twice its size (8 layers × 512), both from `tiny_world.models.model_config`, and the first
blocks of WikiText-2's validation text (`--data-dir`):

1. a top-64, a sample (50 draws) and a full cache, dumped once through `python -m stage1_teacher.dump`
   into `--out` and reused while the settings are the same;
2. in one process, alternating the routes, a warm-up and then `repeats` micro-batches of each (batch
   2 × 256, an optimizer step every micro-batch: clipping, AdamW, zero_grad): (a) the student alone with
   a plain HF forward with `labels=`, (b–d) this project's distiller (`build_distiller`, TextBrewer's
   `train_on_batch`) from each cache, (e) the live teacher through the original recipe's online TextBrewer
   route (dense logits, TextBrewer's `ce` loss times T²), (f) this project with `kd_weight=0
   hard_weight=1`, (g) this project with `--live-teacher`; the median time of each, and its ratio to (a);
3. the peak memory of each route in a process of its own (peak RSS on the CPU, `max_memory_allocated`
   on a GPU), a few steps after the same set-up;
4. a data-only pass: blocks/s from each cache through the DataLoader and the collate function, against
   the blocks/s of the training step that reads it;

then prints the tables, rewrites the "step cost" section of `--docs` with them and the command, and
draws the time ratios into `--plot`. `--quick` takes fewer repeats (the same shapes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from bench.report import (
    DATA,
    DEFAULT_DATA_DIR,
    DEFAULT_TOKENIZER,
    REPO,
    cpu_name,
    replace_section,
    scale_from_json,
)
from common.cli import UserError, run_main
from tiny_world.models import ModelShape, model_config, padded_vocab_sizes

SEED = 42
BEGIN, END = "<!-- BEGIN step cost -->", "<!-- END step cost -->"


@dataclass
class Scale:
    """Every size of the benchmark; `quick()` repeats less. The vocabularies default to Qwen2's padded ones
    (None: `padded_vocab_sizes` of the tokenizer, for other tokenizers)."""
    seq_len: int = 256
    batch: int = 2
    blocks: int = 8  # dumped per cache (the first blocks of the text); the steps cycle through them
    student: ModelShape = ModelShape(hidden_size=256, num_hidden_layers=4, intermediate_size=768,
                                     tie_word_embeddings=True)
    teacher: ModelShape = ModelShape(hidden_size=512, num_hidden_layers=8, intermediate_size=1536,
                                     tie_word_embeddings=False)
    student_vocab: int | None = 151_936
    teacher_vocab: int | None = 152_064
    k: int = 64
    draws: int = 50
    warmup: int = 2  # micro-batches of each route before timing
    repeats: int = 11
    memory_steps: int = 3
    data_repeats: int = 5  # data-only passes over the cached blocks

    @classmethod
    def quick(cls) -> "Scale":
        return cls(warmup=1, repeats=5, memory_steps=2, data_repeats=3)

    def world_key(self, tokenizer: str, data_dir: str, device: str) -> str:
        """What the models and caches depend on (not the repeats)."""
        world = {k: v for k, v in asdict(self).items() if k not in ("warmup", "repeats", "memory_steps",
                                                                      "data_repeats")}
        text = json.dumps({"scale": world, "tokenizer": tokenizer, "data": data_dir, "device": device}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RouteSpec:
    key: str
    template: str  # the label, with the scale's {k} and {draws}
    cache: str | None  # the cache whose teacher data the route reads; None = tokens only
    live: str | None = None  # "original" (the original recipe's route) or "project" (`--live-teacher`)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields besides the common ones

    def label(self, scale: Scale) -> str:
        return self.template.format(k=scale.k, draws=scale.draws)


ROUTES = [
    RouteSpec("a", "plain HF forward with `labels=` + AdamW (student-only CE)", None),
    RouteSpec("b", "this project, top-{k} cache (T = 2)", "topk"),
    RouteSpec("c", "this project, sample cache, {draws} draws (T = 1)", "sample", train={"temperature": 1.0}),
    RouteSpec("d", "this project, full cache (T = 2)", "full"),
    RouteSpec("e", "live teacher, the original recipe's online TextBrewer route (T = 2)", None, live="original"),
    RouteSpec("f", "this project, `train.kd_weight=0 train.hard_weight=1` (top-{k} cache, T = 2)", "topk",
              train={"kd_weight": 0.0, "hard_weight": 1.0}),
    RouteSpec("g", "this project, `--live-teacher` (T = 2)", None, live="project"),
]
ROUTE_BY_KEY = {route.key: route for route in ROUTES}
CACHES = {"topk": lambda s: {"cache.mode": "topk", "cache.k": s.k, "cache.tail_draws": 0},
          "sample": lambda s: {"cache.mode": "sample", "cache.draws": s.draws, "cache.sample_temperature": 1.0},
          "full": lambda s: {"cache.mode": "full"}}


def log(msg: str) -> None:
    print(f"[step_cost {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the world: tokenizer, models, caches ------------------------------------------------------------------

def build_world(world: str, scale: Scale, tokenizer_dir: str, data_dir: str, device: str) -> dict[str, Any]:
    """Models and caches under `world`, built once: `world.json` is written last and marks it complete."""
    info_path = os.path.join(world, "world.json")
    if os.path.isfile(info_path):
        with open(info_path) as fh:
            return json.load(fh)
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from cache.manifest import load_manifest

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    teacher_vocab, student_vocab = padded_vocab_sizes(len(tokenizer))
    vocab = {"teacher": scale.teacher_vocab or teacher_vocab, "student": scale.student_vocab or student_vocab}
    info: dict[str, Any] = {"tokenizer_size": len(tokenizer)}
    for role, shape in (("teacher", scale.teacher), ("student", scale.student)):
        torch.manual_seed(SEED)
        with torch.device(device):  # a 7B-shaped model initialises in seconds on a GPU, in minutes on the CPU
            model = Qwen2ForCausalLM(model_config(shape, vocab[role], eos_id))
        if device == "cuda":
            model.to(torch.bfloat16)  # saved as GPU checkpoints are: half the bytes to write and read back
        unique = sum(p.numel() for p in model.parameters())
        tied = model.config.tie_word_embeddings
        info[role] = {"vocab_size": vocab[role], **asdict(shape), "params": unique,
                      "params_untied": unique + (model.get_input_embeddings().weight.numel() if tied else 0)}
        model.save_pretrained(os.path.join(world, role))
        tokenizer.save_pretrained(os.path.join(world, role))
    info["caches"] = {}
    for name, mode in CACHES.items():
        cache_dir = os.path.join(world, "cache", name)
        args = overrides({"teacher.model": os.path.join(world, "teacher"), "teacher.device": device,
                          "teacher.batch_size": scale.batch, "data.local_dir": data_dir, **DATA,
                          "data.seq_len": scale.seq_len, "data.max_blocks": scale.blocks, "cache.dir": cache_dir,
                          "cache.overwrite": "true", **mode(scale)})
        run_cli("stage1_teacher.dump", args, os.path.join(world, f"dump_{name}.log"))
        manifest = load_manifest(cache_dir)
        info["caches"][name] = {"dir": cache_dir, "bytes_per_token": manifest.bytes_on_disk / manifest.num_tokens}
    with open(info_path + ".tmp", "w") as fh:
        json.dump(info, fh, indent=2)
    os.replace(info_path + ".tmp", info_path)
    return info


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def run_cli(module: str, args: list[str], log_path: str) -> None:
    """`python -m module args…` from the repository, its output to `log_path`; fails loudly."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log(f"python -m {module} " + " ".join(shlex.quote(a) for a in args))
    with open(log_path, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", module, *args], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        with open(log_path) as fh:
            raise SystemExit(f"{module} failed with status {proc.returncode}; see {log_path}:\n{fh.read()[-3000:]}")


# --- the routes ------------------------------------------------------------------------------------------

class Bench:
    """The student, its optimizer and (when a route needs it) the teacher, shared by every route: only the
    loss path differs between routes, and only one student's memory is held."""

    def __init__(self, world: str, info: dict[str, Any], scale: Scale, device: torch.device, num_workers: int):
        from stage2_student.train import mixed_precision

        self.world, self.info, self.scale, self.device, self.num_workers = world, info, scale, device, num_workers
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision("auto", device))
        self.student = self._load("student").train()
        self.student.config.use_cache = False
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-5)
        self.teacher: torch.nn.Module | None = None
        self.readers: dict[str, Any] = {}

    def _load(self, role: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        # fp32 master weights for the student; the frozen teacher in the autocast dtype, as a GPU user loads it
        dtype = self.amp_dtype if role == "teacher" and self.amp_dtype is not None else torch.float32
        return AutoModelForCausalLM.from_pretrained(os.path.join(self.world, role), dtype=dtype).to(self.device)

    def reader(self, cache: str):
        from cache.reader import CacheReader

        if cache not in self.readers:
            self.readers[cache] = CacheReader(self.info["caches"][cache]["dir"])
        return self.readers[cache]

    def loader(self, cache: str, tokens_only: bool):
        """The blocks of `cache` in order, batched as stage two batches them (CachedBlocks, the collate)."""
        from torch.utils.data import DataLoader

        from stage2_student.batches import CachedBlocks, collate_cached, collate_live

        return DataLoader(CachedBlocks(self.reader(cache), tokens_only=tokens_only), batch_size=self.scale.batch,
                          shuffle=False, collate_fn=collate_live if tokens_only else collate_cached,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=self.device.type == "cuda")

    def batches(self, cache: str, tokens_only: bool) -> Iterator[dict]:
        """The loader's batches, epoch after epoch, read again each time (as a training run reads them)."""
        loader = self.loader(cache, tokens_only)
        while True:
            yield from loader

    def live_teacher(self) -> torch.nn.Module:
        if self.teacher is None:
            self.teacher = self._load("teacher").eval()
        return self.teacher

    def train_config(self, route: RouteSpec):
        from common.config import TrainConfig

        return TrainConfig(batch_size=self.scale.batch, gradient_accumulation=1,
                           output_dir=os.path.join(self.world, "distiller_out"), **route.train)

    def step_fn(self, route: RouteSpec) -> Callable[[], None]:
        """One micro-batch of `route` and an optimizer step, as stage two's optimizer_step does them."""
        vocab = self.info["tokenizer_size"]
        if route.key == "a":
            batches = self.batches("topk", tokens_only=True)

            def forward() -> list[torch.Tensor]:
                ids = next(batches)["student"]["input_ids"].to(self.device)
                return [self.student(input_ids=ids, labels=ids).loss]
        else:
            from stage2_student.distiller import build_distiller

            train = self.train_config(route)
            if route.live == "original":
                distiller = original_recipe_distiller(train, self.student, self.live_teacher(), vocab, self.device)
            else:
                teacher = self.live_teacher() if route.live == "project" else None
                distiller = build_distiller(train, self.student, vocab, self.device, teacher)
            batches = self.batches(route.cache or "topk", tokens_only=route.cache is None)

            def forward() -> list[torch.Tensor]:
                total, parts = distiller.train_on_batch(next(batches), {})
                return [total, *(v for v in parts.values() if isinstance(v, torch.Tensor))]

        def step() -> None:
            autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
            with autocast:
                total, *logged = forward()
            total.backward()
            for value in (total, *logged):
                value.item()  # the training loop logs them (a device sync on a GPU)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return step

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def original_recipe_distiller(train, student, teacher, vocab_size: int, device: torch.device):
    """The original recipe's online route: TextBrewer's GeneralDistiller running the teacher, both models'
    logits truncated to the tokenizer's vocabulary, TextBrewer's `ce` KD loss times T²."""
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    from textbrewer.losses import kd_ce_loss
    from textbrewer.presets import register_new

    register_new("kd_loss", "original_ce_t2", lambda s, t, temperature: kd_ce_loss(s, t, temperature) * temperature**2)
    adaptor = lambda batch, outputs: {"logits": outputs.logits[..., :vocab_size]}  # noqa: E731
    return GeneralDistiller(TrainingConfig(device=device, output_dir=train.output_dir, log_dir=None, ckpt_steps=1),
                            DistillationConfig(temperature=train.temperature, kd_loss_type="original_ce_t2",
                                               kd_loss_weight=train.kd_weight, hard_label_weight=0.0),
                            model_T=teacher, model_S=student, adaptor_T=adaptor, adaptor_S=adaptor)


# --- measurements ----------------------------------------------------------------------------------------

def time_routes(bench: Bench, routes: list[RouteSpec]) -> dict[str, list[float]]:
    """Seconds per micro-batch of each route: warm-ups, then repeats, the routes alternating (each round
    starts one route later, so no route always runs right after the same one)."""
    steps = {route.key: bench.step_fn(route) for route in routes}
    times: dict[str, list[float]] = {route.key: [] for route in routes}
    for round_ in range(bench.scale.warmup + bench.scale.repeats):
        order = routes[round_ % len(routes):] + routes[: round_ % len(routes)]
        for route in order:
            bench.synchronize()
            start = time.perf_counter()
            steps[route.key]()
            bench.synchronize()
            if round_ >= bench.scale.warmup:
                times[route.key].append(time.perf_counter() - start)
        log(f"round {round_ + 1}/{bench.scale.warmup + bench.scale.repeats}: " +
            " ".join(f"{key} {values[-1]:.2f}s" for key, values in times.items() if values))
    return times


def time_data(bench: Bench) -> dict[str, list[float]]:
    """Seconds per batch of a data-only pass over each cache (every block, through the DataLoader),
    the caches alternating."""
    times: dict[str, list[float]] = {name: [] for name in CACHES}
    batches = -(-bench.scale.blocks // bench.scale.batch)
    for _ in range(bench.scale.data_repeats):
        for name in CACHES:
            loader = bench.loader(name, tokens_only=False)
            start = time.perf_counter()
            for batch in loader:
                if bench.device.type == "cuda":  # pinned batches, copied as the distiller copies them
                    {k: v.to(bench.device) for k, v in batch["teacher_cache"].items()}
            bench.synchronize()
            times[name].append((time.perf_counter() - start) / batches)
    return times


def measure_memory(world: str, info: dict[str, Any], scale: Scale, device: torch.device, key: str,
                   num_workers: int) -> dict[str, float]:
    """Peak memory of one route in this process (run in a process of its own): set-up, then steps."""
    bench = Bench(world, info, scale, device, num_workers)
    step = bench.step_fn(ROUTE_BY_KEY[key])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = current_rss()
    for _ in range(scale.memory_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss()
    return {"peak_mib": peak / 2**20, "before_steps_mib": before / 2**20}


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's peak RSS (VmHWM). Not `ru_maxrss`: Linux keeps that across execve, so a process
    started from a large one would report its parent's size."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def memory_in_subprocesses(args: argparse.Namespace, routes: list[RouteSpec]) -> dict[str, dict[str, float]]:
    results = {}
    for route in routes:
        cmd = [sys.executable, "-m", "bench.step_cost", "--memory-route", route.key, *forwarded_args(args)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"memory of route {route.key} failed:\n{proc.stderr[-3000:]}")
        results[route.key] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"memory {route.key}: peak {results[route.key]['peak_mib']:.0f} MiB")
    return results


def forwarded_args(args: argparse.Namespace) -> list[str]:
    """The options a memory subprocess needs to rebuild the same world and route."""
    out = ["--out", args.out, "--device", args.device, "--data-dir", args.data_dir, "--tokenizer", args.tokenizer,
           "--num-workers", str(args.num_workers)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.quick:
        out.append("--quick")
    if args.scale_json:
        out += ["--scale-json", args.scale_json]
    return out


# --- report ----------------------------------------------------------------------------------------------

def summarize(routes: list[RouteSpec], times: dict[str, list[float]], memory: dict[str, dict[str, float]],
              data: dict[str, list[float]], scale: Scale) -> dict[str, Any]:
    base_peak = memory["a"]["peak_mib"]
    rows = []
    for route in routes:
        median = statistics.median(times[route.key])
        # each round's time over (a)'s in the same round: the load of a shared machine drifts between rounds
        ratio = statistics.median(t / base for t, base in zip(times[route.key], times["a"]))
        mem = memory[route.key]
        rows.append({"key": route.key, "label": route.label(scale), "seconds": median, "time_ratio": ratio,
                     "peak_mib": mem["peak_mib"], "memory_ratio": mem["peak_mib"] / base_peak,
                     "step_increase_mib": mem["peak_mib"] - mem["before_steps_mib"], "times": times[route.key]})
    step_routes = {"topk": "b", "sample": "c", "full": "d"}
    data_rows = []
    for name, seconds in data.items():
        per_batch = statistics.median(seconds)
        step = statistics.median(times[step_routes[name]])
        data_rows.append({"cache": name, "data_blocks_per_s": scale.batch / per_batch,
                          "step_blocks_per_s": scale.batch / step, "data_share": per_batch / step})
    return {"routes": rows, "data": data_rows}


def tables(summary: dict[str, Any], device: torch.device, num_workers: int) -> str:
    mem_name = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS"
    lines = [f"| route | s / micro-batch | × plain CE | {mem_name}, MiB | × plain CE | the steps' rise, MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in summary["routes"]:
        lines.append(f"| ({r['key']}) {r['label']} | {r['seconds']:.3f} | {r['time_ratio']:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['memory_ratio']:.2f} | {r['step_increase_mib']:.0f} |")
    lines += ["", f"| cache | data only: blocks / s (DataLoader, num_workers={num_workers}) | "
              "training step: blocks / s | data time / step time |", "|---|---:|---:|---:|"]
    for r in summary["data"]:
        lines.append(f"| {r['cache']} | {r['data_blocks_per_s']:.1f} | {r['step_blocks_per_s']:.2f} | "
                     f"{r['data_share']:.1%} |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"CPU ({cpu_name()}), {threads} thread{'s' if threads > 1 else ''}, torch {torch.__version__}"


def write_docs(path: str, block: str) -> None:
    replace_section(path, block, BEGIN, END, "Stage two: step cost")


def plot(path: str, summary: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["routes"]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 2.0))
    labels = [f"({r['key']}) {r['label'].replace('`', '')}" for r in rows]
    ratios = [r["time_ratio"] for r in rows]
    bars = ax.barh(range(len(rows)), ratios, color=["#888888"] + ["#3b75af"] * (len(rows) - 1))
    for bar, ratio in zip(bars, ratios):
        ax.text(bar.get_width() + 0.02, bar.get_y() + bar.get_height() / 2, f"{ratio:.2f}×", va="center", fontsize=8)
    for x, style in ((1.05, ":"), (1.3, "--"), (2.0, "-.")):
        ax.axvline(x, color="#c0392b", linestyle=style, linewidth=0.8, label=f"{x}×")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlim(0, max(2.0, *ratios) * 1.15)
    ax.invert_yaxis()
    ax.set_xlabel("time per micro-batch (optimizer step each), × plain cross-entropy (a)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="targets", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------------------

def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (same shapes)")
    parser.add_argument("--scale-json", help=argparse.SUPPRESS)  # tests: Scale fields as JSON, smaller than --quick
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="bench/out/step_cost", help="models and caches, built once per setting")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with WikiText-2 raw's wiki.valid.raw")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer folder (default: Qwen2's)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader processes (stage two's default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--docs", default=os.path.join(REPO, "docs", "performance.md"),
                        help="markdown file whose step-cost section is rewritten")
    parser.add_argument("--plot", default=os.path.join(REPO, "docs", "step_cost.png"), help="PNG bar chart")
    parser.add_argument("--memory-route", help=argparse.SUPPRESS)  # internal: one route's memory, as JSON
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be positive, got {args.threads}")
    if args.quick and args.scale_json:
        raise UserError("--quick and --scale-json are exclusive")
    scale = Scale.quick() if args.quick else scale_from_json(Scale, args.scale_json) if args.scale_json else Scale()
    args.out, args.data_dir, args.tokenizer = map(os.path.abspath, (args.out, args.data_dir, args.tokenizer))
    if not os.path.isfile(os.path.join(args.data_dir, "wiki.valid.raw")):
        raise UserError(f"{args.data_dir} has no wiki.valid.raw; pass --data-dir with WikiText-2 raw's files")
    if not os.path.isdir(args.tokenizer):
        raise UserError(f"tokenizer folder not found: {args.tokenizer}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    world = os.path.join(args.out, "world-" + scale.world_key(args.tokenizer, args.data_dir, args.device))
    info = build_world(world, scale, args.tokenizer, args.data_dir, args.device)
    if args.memory_route:
        print(json.dumps(measure_memory(world, info, scale, device, args.memory_route, args.num_workers)))
        return 0

    load_before = os.getloadavg()
    log(f"timing {len(ROUTES)} routes, {scale.repeats} repeats after {scale.warmup} warm-up(s), on {machine(device)}")
    bench = Bench(world, info, scale, device, args.num_workers)
    times = time_routes(bench, ROUTES)
    data = time_data(bench)
    del bench
    memory = memory_in_subprocesses(args, ROUTES)
    load_after = os.getloadavg()
    summary = summarize(ROUTES, times, memory, data, scale)
    table = tables(summary, device, args.num_workers)
    print(table)

    command = "python -m bench.step_cost" + (" --quick" if args.quick else "") + \
        (f" --scale-json {shlex.quote(args.scale_json)}" if args.scale_json else "") + \
        ("" if args.device == "cpu" else f" --device {args.device}") + \
        ("" if args.num_workers == 0 else f" --num-workers {args.num_workers}") + \
        (f" --threads {args.threads}" if args.threads else "")
    s, t = info["student"], info["teacher"]
    memory_note = ("peak `torch.cuda.max_memory_allocated`" if device.type == "cuda" else "peak RSS (VmHWM)") + \
        f" of a process running only that route: set-up, then {scale.memory_steps} micro-batches"
    block = (f"<!-- generated by `{command}` -->\n\n"
             f"Measured with `{command}` on {machine(device)}, {time.strftime('%Y-%m-%d')}; load average "
             f"{load_before[0]:.1f} before, {load_after[0]:.1f} after.\n\n{table}\n\n"
             f"![time per micro-batch, × plain cross-entropy]({os.path.basename(args.plot)})\n\n"
             f"Each route: batch {scale.batch} × {scale.seq_len} tokens, an optimizer step (clipping at 1.0, AdamW, "
             f"zero_grad) every micro-batch, {scale.repeats} rounds after {scale.warmup} warm-up round(s), the routes "
             f"alternating in one process; s / micro-batch is the median over the rounds, × plain CE the median over "
             f"the rounds of the route's time over (a)'s in the same round; memory: {memory_note}; "
             f"\"the steps' rise\" is that peak minus the memory just before the first step. "
             f"Tokenizer {info['tokenizer_size']:,} tokens; student {s['params'] / 1e6:.1f} M parameters "
             f"({s['params_untied'] / 1e6:.1f} M counting its tied output matrix twice; "
             f"{s['num_hidden_layers']} layers × {s['hidden_size']}, padded vocabulary {s['vocab_size']:,}), "
             f"random init; teacher "
             f"{t['params'] / 1e6:.1f} M ({t['num_hidden_layers']} layers × {t['hidden_size']}, vocabulary "
             f"{t['vocab_size']:,}); caches of the first {scale.blocks} blocks of wiki.valid.raw: "
             + ", ".join(f"{name} {c['bytes_per_token']:,.1f} B/token" for name, c in info["caches"].items()) +
             f". Routes (b)–(d), (f), (g) run `stage2_student.distiller.build_distiller` and TextBrewer's "
             f"`train_on_batch` with the default settings but those named (loss `forward_kl`, top-k tail bucket, "
             f"`train.loss_chunk` 128); the data-only pass reads every cached block through the DataLoader and the "
             f"collate function stage two uses, and its time is part of each step (num_workers={args.num_workers}). "
             f"Targets: top-k and sample ≤ 1.05× plain CE in time and memory; full ≤ 1.3×; the live teacher ≥ 2× "
             f"expected.\n")
    write_docs(args.docs, block)
    plot(args.plot, summary, f"stage two, time per micro-batch: {machine(device)}")
    with open(os.path.join(args.out, "step_cost.json"), "w") as fh:
        json.dump({"command": command, "scale": asdict(scale), "world": info, **summary}, fh, indent=2)
    log(f"wrote {args.docs} (step cost section), {args.plot} and {os.path.join(args.out, 'step_cost.json')}")
    return 0


if __name__ == "__main__":
    run_main(main)
