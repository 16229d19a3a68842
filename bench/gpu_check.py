"""The GPU check: the real Qwen2-7B → Qwen2-1.5B shapes, randomly initialised, on this machine's GPUs.

    bash bench/gpu_check.sh [--quick]      # sets up .venv, then python -m bench.gpu_check

Nothing can be downloaded on a GPU machine, so the models are random-initialised at the shapes of the
configs this repository ships (`configs/qwen2/Qwen2-7B`, `configs/qwen2/Qwen2-1.5B-Instruct`), and the
tokenizer and text come from `--tokenizer` and `--data-dir` (defaults: `bench/out/gpu_inputs/` when it
exists, else `../shared/data/`; `bash bench/gpu_check.sh --stage-inputs` copies them into the former, an
ignored folder a remote runner can carry).

1. **Stage two, step cost** (`python -m bench.step_cost --device cuda` at these shapes, batch 2 ×
   `--seq-len`): it dumps a top-64, a sample and a full cache with the 7B-shaped teacher in bf16 through
   stage one, then times, alternating, plain cross-entropy, each cache route, `kd_weight=0`, the live
   teacher through the original recipe's TextBrewer route and `--live-teacher`, and measures each route's
   peak GPU memory in a process of its own.
2. **Stage one, throughput**: `python -m stage1_teacher.dump` of `--blocks` blocks, top-64, bf16: tokens/s
   as stage one prints them (teacher loading excluded, reading, writing and the top-k included), its peak
   GPU memory, and the model FLOPs utilisation: tokens/s × FLOPs per token ÷ the GPU's dense bf16 peak,
   FLOPs per token = 2 × (parameters − input embedding) + 4 × layers × seq_len × hidden (attention,
   counted as PaLM's MFU counts it).
3. **Two GPUs** (when there are): the same dump with `torchrun --nproc_per_node 2`, and stage two for
   `--steps` steps with one process, with `accelerate launch --num_processes 2` (DDP) and the same with
   `train.fsdp=true` (FSDP's smoke test: accelerate runs FSDP on GPUs only), tokens/s of each and whether
   the final model was saved.

The tables go into the "GPU check" section of `--docs` (docs/performance.md), all figures into
`<out>/gpu_check.json`. `--quick` does fewer repeats and blocks; `--smoke` shrinks the models (a test of
this script on the CPU, `--device cpu`; its figures mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any, Sequence

import torch

from bench.report import DATA, REPO, SHARED, replace_section
from bench.step_cost import BEGIN as STEP_BEGIN, END as STEP_END, Scale, machine
from common.cli import UserError, run_main
from tiny_world.models import ModelShape

CONFIGS = os.path.join(REPO, "configs", "qwen2")
TEACHER_CONFIG = os.path.join(CONFIGS, "Qwen2-7B", "config.json")
STUDENT_CONFIG = os.path.join(CONFIGS, "Qwen2-1.5B-Instruct", "config.json")
STAGED = os.path.join(REPO, "bench", "out", "gpu_inputs")  # git-ignored
BEGIN, END = "<!-- BEGIN gpu check -->", "<!-- END gpu check -->"
# dense bf16 tensor-core peaks (vendor data sheets, SXM parts), TFLOP/s; others: pass --peak-tflops
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
                    "L4": 121.0}
SMOKE_SHAPE = {"hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def default_input(name: str) -> str:
    staged = os.path.join(STAGED, name)
    return staged if os.path.isdir(staged) else os.path.join(SHARED, name)


def shapes(smoke: bool) -> tuple[ModelShape, ModelShape]:
    """(teacher, student) from the shipped configs; `smoke` keeps their kind (tied or not) at a toy size."""
    teacher, student = ModelShape.of_config(TEACHER_CONFIG), ModelShape.of_config(STUDENT_CONFIG)
    if smoke:
        teacher, student = (ModelShape(**{**asdict(shape), **SMOKE_SHAPE}) for shape in (teacher, student))
    return teacher, student


def forward_flops_per_token(shape: ModelShape, vocab_size: int, seq_len: int) -> float:
    """2 × the matmul parameters (every parameter but the input embedding) + PaLM's attention term."""
    from transformers import Qwen2ForCausalLM

    from tiny_world.models import model_config

    with torch.device("meta"):  # counts only: no memory
        model = Qwen2ForCausalLM(model_config(shape, vocab_size, 0))
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    matmul = params - embedding + (embedding if shape.tie_word_embeddings else 0)  # a tied head still multiplies
    return 2 * matmul + 4 * shape.num_hidden_layers * seq_len * shape.hidden_size


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def run_logged(cmd: list[str], log_path: str, env: dict[str, str] | None = None) -> str:
    """`cmd` from the repository, its output to `log_path` and returned; fails loudly."""
    log(" ".join(shlex.quote(c) for c in cmd))
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    with open(log_path, "w") as fh:
        fh.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[2] if len(cmd) > 2 else cmd[0]} failed with status {proc.returncode}; see {log_path}:"
                         f"\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


STAGE1_LINE = re.compile(r"\[stage1\] .*? (?P<tokens>\d+) tokens, .*?, (?P<seconds>[\d.]+) s \((?P<tok_s>\d+) tok/s"
                         r"(?: on (?P<procs>\d+) processes)?(?:, peak GPU memory (?P<gib>[\d.]+) GiB)?")


def parse_stage1(output: str) -> dict[str, Any]:
    match = STAGE1_LINE.search(output)
    if match is None:
        raise SystemExit(f"stage one printed no summary line:\n{output[-2000:]}")
    return {"tokens": int(match["tokens"]), "seconds": float(match["seconds"]), "tokens_per_s": int(match["tok_s"]),
            "processes": int(match["procs"] or 1), "peak_gib": float(match["gib"]) if match["gib"] else None}


def dump_args(world: str, info: dict[str, Any], args: argparse.Namespace, cache_dir: str) -> list[str]:
    return [f"teacher.model={os.path.join(world, 'teacher')}", f"teacher.device={args.device}",
            f"teacher.batch_size={args.dump_batch}", f"data.local_dir={args.data_dir}",
            *(f"{k}={v}" for k, v in DATA.items()), f"data.seq_len={args.seq_len}", f"data.max_blocks={args.blocks}",
            f"cache.dir={cache_dir}", "cache.overwrite=true", "cache.mode=topk", "cache.k=64", "cache.tail_draws=0"]


def stage_two_tokens_per_s(out_dir: str) -> float:
    """Tokens/s between the first and the last logged step (the first step's warm-up left out)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    first, last = records[0], records[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and blocks")
    parser.add_argument("--smoke", action="store_true", help="toy model sizes (a test of this script)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: only with --smoke")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per block (default 1024)")
    parser.add_argument("--blocks", type=int, default=None, help="blocks dumped for stage one's throughput "
                        "(default 256; 64 quick)")
    parser.add_argument("--dump-batch", type=int, default=8, help="teacher.batch_size of that dump (default 8)")
    parser.add_argument("--steps", type=int, default=8, help="stage two steps of the two-GPU comparison")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for the "
                        "MFU of a GPU not in the built-in table")
    parser.add_argument("--tokenizer", default=default_input("qwen2-tokenizer"), help="tokenizer folder")
    parser.add_argument("--data-dir", default=default_input("wikitext-2-raw-v1"), help="WikiText-2 raw folder")
    parser.add_argument("--out", default="bench/out/gpu_check", help="models, caches and logs")
    parser.add_argument("--docs", default=os.path.join(REPO, "docs", "performance.md"),
                        help="markdown file whose 'GPU check' section is rewritten")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        raise UserError("--device cpu is for --smoke only: the real shapes need a GPU")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device is available: the GPU check needs one (--smoke --device cpu tests the script)")
    for path, what in ((args.tokenizer, "--tokenizer"), (args.data_dir, "--data-dir")):
        if not os.path.isdir(path):
            raise UserError(f"{what} {path}: no such folder (bash bench/gpu_check.sh --stage-inputs copies them "
                            f"from ../shared/data into {STAGED})")
    args.out, args.data_dir, args.tokenizer = map(os.path.abspath, (args.out, args.data_dir, args.tokenizer))
    blocks = args.blocks or (64 if args.quick or args.smoke else 256)
    args.blocks = blocks
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    teacher, student = shapes(args.smoke)
    results: dict[str, Any] = {"machine": machine(device), "gpus": torch.cuda.device_count(),
                               "teacher": asdict(teacher), "student": asdict(student), "seq_len": args.seq_len}

    # 1. stage two's routes (this also builds the models and dumps the three caches)
    scale = Scale(seq_len=args.seq_len, batch=2, blocks=16 if not args.smoke else 4, teacher=teacher, student=student,
                  student_vocab=None if args.smoke else 151_936, teacher_vocab=None if args.smoke else 152_064,
                  warmup=1 if args.quick or args.smoke else 2, repeats=3 if args.quick or args.smoke else 5,
                  memory_steps=2, data_repeats=1 if args.quick or args.smoke else 2)
    step_docs = os.path.join(args.out, "step_cost.md")
    scale_json = json.dumps(asdict(scale))
    run_logged([sys.executable, "-m", "bench.step_cost", "--device", args.device, "--scale-json", scale_json,
                "--out", os.path.join(args.out, "step_cost"), "--data-dir", args.data_dir,
                "--tokenizer", args.tokenizer, "--docs", step_docs, "--plot", os.path.join(args.out, "step_cost.png")],
               os.path.join(args.out, "step_cost.log"))
    with open(os.path.join(args.out, "step_cost", "step_cost.json")) as fh:
        step = json.load(fh)
    results["stage2_routes"] = step["routes"]
    info = step["world"]
    world = os.path.dirname(os.path.dirname(info["caches"]["topk"]["dir"]))  # <world>/cache/topk

    # 2. stage one's throughput, one process
    flops = forward_flops_per_token(teacher, info["teacher"]["vocab_size"], args.seq_len)
    peak = peak_tflops(device, args.peak_tflops)
    dump = parse_stage1(run_logged([sys.executable, "-m", "stage1_teacher.dump",
                                    *dump_args(world, info, args, os.path.join(args.out, "cache-1"))],
                                   os.path.join(args.out, "dump-1.log")))
    dump["mfu"] = dump["tokens_per_s"] * flops / (peak * 1e12) if peak else None
    results["stage1"] = [dump]
    results["flops_per_token"], results["peak_tflops"] = flops, peak

    # 3. two GPUs
    if args.device == "cuda" and torch.cuda.device_count() >= 2:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
        dump2 = parse_stage1(run_logged([*torchrun, "stage1_teacher.dump",
                                         *dump_args(world, info, args, os.path.join(args.out, "cache-2"))],
                                        os.path.join(args.out, "dump-2.log")))
        dump2["mfu"] = dump2["tokens_per_s"] * flops / (2 * peak * 1e12) if peak else None
        results["stage1"].append(dump2)
        train = ["--cache", os.path.join(args.out, "cache-1"), f"student.model={os.path.join(world, 'student')}",
                 f"data.local_dir={args.data_dir}", *(f"{k}={v}" for k, v in DATA.items()),
                 f"data.seq_len={args.seq_len}", f"data.max_blocks={blocks}", "train.batch_size=2",
                 "train.gradient_accumulation=1", f"train.max_steps={args.steps}", "train.verify_cache=false"]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu", "-m"]
        results["stage2_processes"] = []
        # FSDP runs on GPUs only (accelerate refuses it on a CPU): its smoke test is here, with a full model saved
        for name, procs, cmd, extra in (("DDP", 1, [sys.executable, "-m"], []), ("DDP", 2, launch, []),
                                        ("FSDP", 2, launch, ["train.fsdp=true"])):
            out = os.path.join(args.out, f"train-{name.lower()}-{procs}")
            shutil.rmtree(out, ignore_errors=True)
            run_logged([*cmd, "stage2_student.train", *train, *extra, f"train.output_dir={out}",
                        f"train.log_dir={out}/logs"], os.path.join(args.out, f"train-{name.lower()}-{procs}.log"))
            saved = os.path.isfile(os.path.join(out, "config.json"))  # the save_pretrained model at the end
            results["stage2_processes"].append({"engine": name if procs > 1 else "one process", "processes": procs,
                                                "tokens_per_s": stage_two_tokens_per_s(out), "model_saved": saved})

    command = "bash bench/gpu_check.sh" + (" --quick" if args.quick else "") + (" --smoke" if args.smoke else "")
    block = report(results, command, step_docs)
    replace_section(args.docs, block, BEGIN, END, "GPU check")
    with open(os.path.join(args.out, "gpu_check.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    print(block)
    log(f"wrote {args.docs} (GPU check section) and {os.path.join(args.out, 'gpu_check.json')}")
    return 0


def report(results: dict[str, Any], command: str, step_docs: str) -> str:
    t, s = results["teacher"], results["student"]
    lines = [f"<!-- generated by `{command}` -->", "",
             f"Measured with `{command}` on {results['machine']} ({results['gpus']} GPU(s)), "
             f"{time.strftime('%Y-%m-%d')}: random-initialised models at the shipped Qwen2 shapes (teacher "
             f"{t['num_hidden_layers']} layers × {t['hidden_size']}, student {s['num_hidden_layers']} layers × "
             f"{s['hidden_size']}), WikiText-2 valid, blocks of {results['seq_len']} tokens.", "",
             "| stage one (top-64, teacher.dtype=auto) | processes | tokens | s | tokens / s | MFU "
             "| peak GPU memory, GiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for d in results["stage1"]:
        mfu = f"{d['mfu']:.1%}" if d["mfu"] is not None else "n/a"
        gib = f"{d['peak_gib']:.1f}" if d["peak_gib"] is not None else "n/a"
        lines.append(f"| `python -m stage1_teacher.dump` | {d['processes']} | {d['tokens']:,} | {d['seconds']:.1f} | "
                     f"{d['tokens_per_s']:,} | {mfu} | {gib} |")
    peak = results["peak_tflops"]
    lines += ["", f"MFU: tokens/s × {results['flops_per_token'] / 1e9:.2f} GFLOP per token ÷ "
                  f"({'the processes × ' if len(results['stage1']) > 1 else ''}"
                  f"{f'{peak:.0f} TFLOP/s dense bf16' if peak else 'an unknown peak: pass --peak-tflops'}).", ""]
    with open(step_docs, encoding="utf-8") as fh:
        text = fh.read()
    step_block = text[text.index(STEP_BEGIN) + len(STEP_BEGIN): text.index(STEP_END)].strip()
    step_block = "\n".join(line for line in step_block.splitlines()
                           if not line.startswith(("<!--", "![")))  # its own command line and plot stay in --out
    lines += ["Stage two, one GPU (`bench.step_cost` at these shapes):", "", step_block.strip(), ""]
    if "stage2_processes" in results:
        lines += ["| stage two, top-64 cache | processes | tokens / s (after the first step) | model saved |",
                  "|---|---:|---:|---|"]
        lines += [f"| `stage2_student.train`, {r['engine']} | {r['processes']} | {r['tokens_per_s']:,.0f} | "
                  f"{'yes' if r['model_saved'] else '**no**'} |" for r in results["stage2_processes"]]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
