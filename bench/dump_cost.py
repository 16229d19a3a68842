"""Stage one's cost against the bare teacher forward, side by side, per cache mode.

    python -m bench.dump_cost [--quick] [--repeats 3] [--blocks 48] [--full-blocks 32] [--batch-size 4]
                              [--tokenizer ../shared/data/qwen2-tokenizer] [--data-dir ../shared/data/wikitext-2-raw-v1]
                              [--out bench/out/dump_cost] [--doc docs/performance.md]

A randomly initialised Qwen2 teacher of 179 M parameters (8 layers × 512, `tiny_world.models.model_config`)
with the real Qwen2 tokenizer (151,646 tokens; the teacher pads to 151,744 logits) runs, fp32 on the CPU, over
the first blocks of WikiText-2's `wiki.valid.raw`, twice per repeat, alternating: (a) the real dump
(`stage1_teacher.dump.TeacherDump`, as `python -m stage1_teacher.dump` runs it: reading and tokenizing the
data, the teacher, the targets, the writer thread, the manifest and the swap into place), (b) the bare teacher
forward (`model(input_ids).logits`) over the same blocks in the same batches. It prints, per mode, the median
tokens/s of each and their ratio, and the writer thread's busy seconds against the dump's wall time; top-k
(k = 64) and sample (50 draws) on `--blocks` blocks, full on `--full-blocks` (each full block is 78 MB on
disk; 32 by default, since the writer's last batch and the shard's hash come after the teacher's last batch,
and a dump of few blocks is mostly that tail). The table and the command go into `--doc`'s "dump cost" section
(not with --quick, unless --doc is given). `--quick`: a small teacher and few blocks, to smoke-test the script.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import time
from dataclasses import asdict
from typing import Any, Sequence

import torch

from bench.report import DEFAULT_DATA_DIR, DEFAULT_TOKENIZER, REPO, cpu_name, replace_section
from cache.reader import CacheReader
from common.cli import UserError, run_main
from common.config import load_config
from common.data import BlockStream
from common.models import load_tokenizer, tokenizer_hash
from stage1_teacher.dump import TeacherDump
from stage1_teacher.processes import Processes
from tiny_world.models import ModelShape, model_config, padded_vocab_sizes

TEACHER = ModelShape(hidden_size=512, num_hidden_layers=8, intermediate_size=1408, tie_word_embeddings=False)
QUICK_TEACHER = ModelShape(hidden_size=64, num_hidden_layers=2, intermediate_size=128, tie_word_embeddings=False)
MODES = {"topk": {"cache.mode": "topk", "cache.k": 64, "cache.tail_draws": 0},
         "sample": {"cache.mode": "sample", "cache.draws": 50}, "full": {"cache.mode": "full"}}
TARGETS = {"topk": 0.95, "sample": 0.95, "full": 0.8}  # dump tokens/s ÷ bare forward tokens/s, at least
SEQ_LEN = 256
CHARS_PER_TOKEN = 8  # twice WikiText's ~4 characters per Qwen2 token
BEGIN, END = "<!-- BEGIN dump cost -->", "<!-- END dump cost -->"


def log(msg: str) -> None:
    print(f"[dump_cost {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_teacher(out: str, tokenizer_dir: str, shape: ModelShape) -> dict[str, Any]:
    """A randomly initialised Qwen2 teacher with the tokenizer, saved once under `out` (kept while its
    settings hold)."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    teacher = os.path.join(out, "teacher")
    settings = {"tokenizer": os.path.abspath(tokenizer_dir), "shape": asdict(shape), "seed": 0}
    marker = os.path.join(teacher, "bench.json")
    if os.path.isfile(marker) and json.load(open(marker)) == settings:
        tokenizer = AutoTokenizer.from_pretrained(teacher)
    else:
        shutil.rmtree(teacher, ignore_errors=True)
        tokenizer = load_tokenizer(tokenizer_dir, "--tokenizer")
        eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        torch.manual_seed(0)
        config = model_config(shape, padded_vocab_sizes(len(tokenizer))[0], eos if eos is not None else 0)
        Qwen2ForCausalLM(config).save_pretrained(teacher)
        tokenizer.save_pretrained(teacher)
        with open(marker, "w") as fh:
            json.dump(settings, fh)
    with open(os.path.join(teacher, "config.json")) as fh:
        padded = json.load(fh)["vocab_size"]
    return {"dir": teacher, "vocab": len(tokenizer), "padded_vocab": padded}


def data_prefix(out: str, data_dir: str, tokens: int) -> str:
    """A copy of the first lines of `wiki.valid.raw`, about twice what `tokens` tokens need: the dump then
    reads and tokenizes about as much text as it uses, as a dump of the whole corpus does (the data is read in
    chunks of a million characters; from the whole file, a short benchmark would tokenize 20x the text it
    uses)."""
    folder = os.path.join(out, "data")
    os.makedirs(folder, exist_ok=True)
    lines, chars = [], 0
    with open(os.path.join(data_dir, "wiki.valid.raw"), encoding="utf-8") as fh:
        for line in fh:
            lines.append(line)
            chars += len(line)
            if chars >= tokens * CHARS_PER_TOKEN:
                break
    with open(os.path.join(folder, "wiki.valid.raw"), "w", encoding="utf-8") as fh:
        fh.write("".join(lines))
    return folder


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def run_dump(args: list[str], cache_dir: str, model: torch.nn.Module) -> dict[str, float]:
    """The real dump, in this process, with the forward's (warm) model; its own clock: from reading the data to
    the published cache."""
    for path in (cache_dir, cache_dir + ".partial"):  # our own output: a fresh dump, never a resumed one
        shutil.rmtree(path, ignore_errors=True)
    dump = TeacherDump(load_config(None, args), Processes(), model=model)
    dump.execute()
    return {"seconds": dump.seconds, "tokens": dump.computed_blocks * SEQ_LEN, "writer_busy": dump.writer_busy}


@torch.inference_mode()
def run_forward(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> dict[str, float]:
    """The bare teacher forward over the same blocks in the same batches."""
    start = time.perf_counter()
    for first in range(0, len(blocks), batch_size):
        model(input_ids=blocks[first:first + batch_size], use_cache=False).logits
    return {"seconds": time.perf_counter() - start, "tokens": blocks.numel()}


def tokenize_seconds(args: list[str]) -> float:
    """Reading and tokenizing the blocks alone (part of the dump's time)."""
    cfg = load_config(None, args)
    tokenizer = load_tokenizer(cfg.teacher.model)
    start = time.perf_counter()
    for _ in BlockStream(cfg.data, tokenizer, tokenizer_hash(tokenizer)):
        pass
    return time.perf_counter() - start


def measure(mode: str, common: dict[str, Any], blocks: int, repeats: int, out: str, model: torch.nn.Module,
            batch_size: int) -> dict[str, Any]:
    cache_dir = os.path.join(out, "cache", mode)
    args = overrides({**common, **MODES[mode], "data.max_blocks": blocks, "cache.dir": cache_dir})
    dumps, forwards = [], []
    for repeat in range(repeats):
        dumps.append(run_dump(args, cache_dir, model))
        if repeat == 0:
            reader = CacheReader(cache_dir)
            ids = torch.from_numpy(reader.read_all("input_ids")).long()
            reader.close()
        forwards.append(run_forward(model, ids, batch_size))
        log(f"{mode} repeat {repeat + 1}/{repeats}: dump {dumps[-1]['tokens'] / dumps[-1]['seconds']:.0f} tok/s, "
            f"forward {forwards[-1]['tokens'] / forwards[-1]['seconds']:.0f} tok/s")
    dump_rate = statistics.median(d["tokens"] / d["seconds"] for d in dumps)
    forward_rate = statistics.median(f["tokens"] / f["seconds"] for f in forwards)
    return {"mode": mode, "blocks": blocks, "tokens": int(ids.numel()), "dump_tok_s": dump_rate,
            "forward_tok_s": forward_rate, "ratio": dump_rate / forward_rate, "target": TARGETS[mode],
            "dump_seconds": statistics.median(d["seconds"] for d in dumps),
            "writer_busy": statistics.median(d["writer_busy"] for d in dumps),
            "tokenize_seconds": tokenize_seconds(args), "repeats": repeats}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | tokens | bare forward tok/s | dump tok/s | dump ÷ forward | target | writer busy / dump wall "
             "| of which reading + tokenizing |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        verdict = "met" if r["ratio"] >= r["target"] else "**missed**"
        blocks = f"{r['blocks']} block" + "s" * (r["blocks"] != 1)
        lines.append(f"| {r['mode']} | {r['tokens']:,} ({blocks}) | {r['forward_tok_s']:.1f} | "
                     f"{r['dump_tok_s']:.1f} | **{r['ratio']:.3f}** | ≥ {r['target']} ({verdict}) | "
                     f"{r['writer_busy']:.1f} s / {r['dump_seconds']:.1f} s | {r['tokenize_seconds']:.2f} s |")
    return "\n".join(lines)


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads"


def write_doc(path: str, command: str, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """Rewrite the section between the markers of `path` (created if missing)."""
    block = (f"<!-- generated by `{command}` -->\n\n{table(rows)}\n\n"
             f"Teacher: randomly initialised Qwen2, {info['shape']}, {info['params'] / 1e6:.1f} M parameters, "
             f"tokenizer `{info['tokenizer']}` ({info['vocab']:,} tokens; {info['padded_vocab']:,} logits), fp32 "
             f"on the CPU; blocks of {SEQ_LEN} tokens from the first lines of `wiki.valid.raw`, teacher batches of "
             f"{info['batch_size']} blocks; medians of {info['repeats']} alternating repeats. Measured on "
             f"{info['machine']} ({info['date']}). Both routes use one model object, warm. The dump's time runs "
             "from reading the data to the published cache, in the dump's own clock; the forward's is the bare "
             "`model(input_ids).logits` loop over the same blocks.\n")
    replace_section(path, block, BEGIN, END, "Stage one: dump cost")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dump_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small teacher and few blocks: a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="alternating repeats per mode (default 3; 1 quick)")
    parser.add_argument("--blocks", type=int, default=None, help="blocks for top-k and sample (default 48; 4 quick)")
    parser.add_argument("--full-blocks", type=int, default=None, help="blocks for full (default 32; 2 quick)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per teacher batch (default 4)")
    parser.add_argument("--modes", default="topk,sample,full", help="comma-separated (default: all three)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer directory (default: "
                        "../shared/data/qwen2-tokenizer next to the repository)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder with WikiText-2 raw's wiki.valid.raw "
                        "(default: ../shared/data/wikitext-2-raw-v1 next to the repository)")
    parser.add_argument("--out", default="bench/out/dump_cost", help="scratch directory")
    parser.add_argument("--doc", default=None, help="markdown file whose 'dump cost' section is rewritten "
                        "(default: docs/performance.md; none with --quick)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    blocks = args.blocks or (4 if args.quick else 48)
    full_blocks = args.full_blocks or (2 if args.quick else 32)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        raise UserError(f"--modes: unknown mode {unknown[0]!r} (known: {', '.join(MODES)})")
    if not os.path.isfile(os.path.join(args.data_dir, "wiki.valid.raw")):
        raise UserError(f"{args.data_dir} has no wiki.valid.raw; pass --data-dir with the WikiText-2 raw files")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    from transformers import AutoModelForCausalLM

    datasets.disable_progress_bars()
    out = os.path.abspath(args.out)
    shape = QUICK_TEACHER if args.quick else TEACHER
    teacher = build_teacher(out, args.tokenizer, shape)
    model = AutoModelForCausalLM.from_pretrained(teacher["dir"], dtype=torch.float32).eval()
    teacher["params"] = sum(p.numel() for p in model.parameters())
    log(f"teacher {teacher['params'] / 1e6:.1f} M parameters, vocabulary {teacher['vocab']:,} "
        f"({teacher['padded_vocab']:,} logits); {machine()}")
    common = {"teacher.model": teacher["dir"], "teacher.batch_size": args.batch_size, "teacher.device": "cpu",
              "teacher.dtype": "float32", "data.local_dir": data_prefix(out, args.data_dir, blocks * SEQ_LEN),
              "data.dataset": "wikitext",
              "data.subset": "wikitext-2-raw-v1", "data.split": "validation", "data.seq_len": SEQ_LEN,
              "cache.overwrite": "false"}
    rows = [measure(mode, common, full_blocks if mode == "full" else blocks, repeats, out, model, args.batch_size)
            for mode in modes]
    if short := [r for r in rows if r["tokens"] < r["blocks"] * SEQ_LEN]:
        raise UserError(f"{args.data_dir}/wiki.valid.raw gave only {short[0]['tokens'] // SEQ_LEN} blocks")
    flags = (("--repeats", args.repeats, None), ("--blocks", args.blocks, None),
             ("--full-blocks", args.full_blocks, None), ("--batch-size", args.batch_size, 4),
             ("--modes", args.modes, "topk,sample,full"), ("--tokenizer", args.tokenizer, DEFAULT_TOKENIZER),
             ("--data-dir", args.data_dir, DEFAULT_DATA_DIR))
    command = "python -m bench.dump_cost" + " --quick" * args.quick + "".join(
        f" {flag} {shlex.quote(str(value))}" for flag, value, default in flags if value != default)
    info = {"shape": f"{shape.num_hidden_layers} layers × {shape.hidden_size} (MLP {shape.intermediate_size})",
            "params": teacher["params"], "vocab": teacher["vocab"], "padded_vocab": teacher["padded_vocab"],
            "tokenizer": os.path.relpath(os.path.abspath(args.tokenizer), REPO), "batch_size": args.batch_size,
            "repeats": repeats, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    print(table(rows), flush=True)
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump({"command": command, "info": info, "rows": rows}, fh, indent=2)
    doc = args.doc or (None if args.quick else os.path.join(REPO, "docs", "performance.md"))
    if doc is not None:
        write_doc(doc, command, rows, info)
        log(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    run_main(main)
