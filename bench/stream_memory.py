"""Peak memory and time of stage one and of the data path alone against corpus size, side by side.

`python -m bench.stream_memory` generates local text files of about 2 M and 20 M tokens (`--tokens`) from
the tiny world's generator (a fresh seed per piece: new entities, phrasings and filler, WikiText layout),
then runs, each in a fresh process, alternating, `--repeats` times:
- `dump`: `python -m stage1_teacher.dump --config configs/tiny.yaml data.files=CORPUS data.max_blocks=null`
  with the tiny teacher on the CPU (`cache.k` 1 by default, so the writer stays small; the cache is deleted
  after each run);
- `tokenize`: `common.data.BlockStream` alone over the same file (the data path's own memory),
and reports the median peak RSS (`os.wait4`'s `ru_maxrss` of that process) and wall time of each, and the
large/small ratios. It also checks, with a real tokenizer (`--check-tokenizer`, default the Qwen2 one in
`../shared/data`) on WikiText-2 (`--check-data`), that tokenizing in chunks gives exactly the tokens of one
call on the whole text, for the hub rows (`data.local_dir`) and for the raw files read as `.txt`. The
table and the command go into `--doc` between the "streaming memory" markers. On an idle 2-core CPU the
default run takes about half an hour (the 20 M-token dump dominates).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from bench.report import cpu_name, replace_section
from common.cli import UserError, run_main

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- BEGIN streaming memory -->", "<!-- END streaming memory -->"
ROUTES = ("dump", "tokenize")
SEQ_LEN = 128  # configs/tiny.yaml
ROUTE_DOC = {"dump": f"`dump` is stage one with the tiny teacher (`cache.k={{k}}`, `data.seq_len={SEQ_LEN}`, "
                     "`data.max_blocks=null`).",
             "tokenize": "`tokenize` is `common.data.BlockStream` alone over the same file (imports and tokenizer "
                         "included)."}


def label(tokens: int) -> str:
    return f"{tokens / 1e6:g} M"


def write_corpus(path: Path, tokens: int, tokenizer) -> None:
    """About `tokens` tokens of WikiText-style text: the tiny world's generator with a fresh seed per piece."""
    from tiny_world.corpus import PRETRAIN, build_corpus

    done, seed = 0, 0
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        while done < tokens:
            seed += 1
            corpus = build_corpus(seed)
            for text in (corpus["train"], corpus[PRETRAIN]):
                count = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
                if done + count > tokens:  # the share of lines that is still needed
                    lines = text.splitlines(keepends=True)
                    text = "".join(lines[: round(len(lines) * (tokens - done) / count)])
                    count = tokens - done
                fh.write(text)
                done += count
                if done >= tokens:
                    break


# Linux keeps a process's peak RSS across exec, and a child starts as a copy of its parent: a child of this
# process would report at least this process's peak. A fresh, small interpreter starts each measured command.
LAUNCHER = ("import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, s, u = os.wait4(p.pid, 0); "
            "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(s), u.ru_maxrss]))")


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of `cmd` run in a fresh process; its output goes to `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    usage = log.with_suffix(".rusage.json")
    with open(log, "w") as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", LAUNCHER, str(usage), *cmd], cwd=REPO, env=env, stdout=out,
                       stderr=subprocess.STDOUT, check=True)
        seconds = time.perf_counter() - start
    status, maxrss_kib = json.loads(usage.read_text())
    if status != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"{cmd[2]} exited with status {status}: {tail[0]} (log: {log})")
    return maxrss_kib / 1024, seconds


def dump_command(tiny: Path, corpus: Path, cache: Path, k: int) -> list[str]:
    overrides = {"teacher.model": tiny / "teacher", "student.model": tiny / "student", "teacher.device": "cpu",
                 "data.local_dir": "null", "data.files": corpus, "data.dataset": "stream-bench",
                 "data.subset": corpus.stem, "data.max_blocks": "null", "data.seq_len": SEQ_LEN,
                 "cache.dir": cache, "cache.k": k, "cache.overwrite": "true"}
    return [sys.executable, "-m", "stage1_teacher.dump", "--config", str(REPO / "configs" / "tiny.yaml"),
            *(f"{key}={value}" for key, value in overrides.items())]


def tokenize_only(corpus: str, tokenizer_dir: str) -> dict:
    """The data path alone: BlockStream over `corpus` with stage one's settings; blocks are dropped as made."""
    from common.config import DataConfig
    from common.data import BlockStream
    from common.models import load_tokenizer, tokenizer_hash

    tokenizer = load_tokenizer(tokenizer_dir, "tokenizer")
    stream = BlockStream(DataConfig(files=[corpus], seq_len=SEQ_LEN, max_blocks=None), tokenizer,
                         tokenizer_hash(tokenizer))
    for _ in stream:
        pass
    return {"tokens": stream.stream_tokens, "blocks": stream.num_blocks, "fingerprint": stream.fingerprint}


def measure(tiny: Path, out: Path, sizes: list[int], routes: list[str], repeats: int, k: int) -> dict:
    """Every (size, route), `repeats` times, alternating; each run's peak RSS, seconds and tokens."""
    from cache.manifest import load_manifest

    runs: dict[tuple[int, str], list[dict]] = {}
    for repeat in range(repeats):
        for size in sizes:
            corpus = out / f"corpus-{size}.txt"
            for route in routes:
                log = out / f"{route}-{size}-{repeat}.log"
                if route == "dump":
                    cache = out / "stream-cache"
                    rss, seconds = run_measured(dump_command(tiny, corpus, cache, k), log)
                    data = load_manifest(str(cache)).dataset
                    result = {"tokens": data.stream_tokens, "fingerprint": data.fingerprint}
                    shutil.rmtree(cache)
                else:
                    result_path = out / f"tokenize-{size}.json"
                    rss, seconds = run_measured([sys.executable, "-m", "bench.stream_memory", "--tokenize-only",
                                                 str(corpus), str(tiny / "teacher"), str(result_path)], log)
                    result = json.loads(result_path.read_text())
                runs.setdefault((size, route), []).append({"rss": rss, "seconds": seconds, **result})
                print(f"[stream_memory] {label(size)} {route} #{repeat + 1}: {rss:.0f} MiB, {seconds:.1f} s, "
                      f"{result['tokens']} tokens", flush=True)
    return runs


def check_chunking(tokenizer_dir: str, data_dir: str, chunk_sizes: Sequence[int], out: Path) -> list[str]:
    """Rows of: split, route, chunk size, chunks, tokens, whether chunked == one call on the whole text. The
    raw files are read as hub rows and, linked as `.txt` in `out`, as file text."""
    import numpy as np

    from common.config import DataConfig
    from common.data import TextSource, iter_token_chunks, local_split_path
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, "tokenizer")
    rows = []
    for split in ("train", "valid", "test"):
        try:
            path = local_split_path(data_dir, split)
        except UserError:
            continue  # WikiText-2's train split is not in ../shared/data
        as_txt = out / f"{Path(path).stem}.txt"
        as_txt.unlink(missing_ok=True)
        as_txt.symlink_to(os.path.abspath(path))
        routes = {"hub rows (data.local_dir)": DataConfig(local_dir=data_dir),
                  "file text (.txt)": DataConfig(files=[str(as_txt)], split=split)}
        for route, data in routes.items():
            text = "".join(TextSource(data, split))
            whole = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            for chunk_chars in chunk_sizes:
                chunks = list(iter_token_chunks(tokenizer, TextSource(data, split), "lines", chunk_chars))
                same = np.concatenate(chunks).tolist() == whole
                rows.append(f"| {os.path.basename(path)} | {route} | {chunk_chars} | {len(chunks)} | {len(whole)} | "
                            f"{'yes' if same else '**NO**'} |")
    if not rows:
        raise UserError(f"{data_dir} has no wiki.{{train,valid,test}}.raw")
    return rows


def table(runs: dict, sizes: list[int], routes: list[str]) -> list[str]:
    lines = ["| corpus | route | tokens | peak RSS, MiB | wall, s | tokens/s |", "|---|---|---|---|---|---|"]
    med = {key: (statistics.median(r["rss"] for r in rs), statistics.median(r["seconds"] for r in rs))
           for key, rs in runs.items()}
    for size in sizes:
        for route in routes:
            rss, seconds = med[size, route]
            tokens = runs[size, route][0]["tokens"]
            lines.append(f"| {label(size)} | {route} | {tokens:,} | {rss:.0f} | {seconds:.1f} | "
                         f"{tokens / seconds:,.0f} |")
    small, large = sizes[0], sizes[-1]
    for route in routes:
        (rss_s, sec_s), (rss_l, sec_l) = med[small, route], med[large, route]
        lines.append(f"| {label(large)} / {label(small)} | {route} | "
                     f"{runs[large, route][0]['tokens'] / runs[small, route][0]['tokens']:.1f}× | "
                     f"{rss_l / rss_s:.2f}× | {sec_l / sec_s:.2f}× | |")
    return lines


def write_doc(doc: Path, section: str) -> None:
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise UserError(f"{doc} has no {BEGIN} … {END} section to rewrite")
    replace_section(str(doc), section + "\n", BEGIN, END, "Streaming: peak memory against corpus size")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "stream_memory",
                        help="working folder: corpora, logs, the tiny build unless --tiny (default: %(default)s)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2_000_000, 20_000_000],
                        help="corpus sizes in tokens, smallest first (default: 2 M and 20 M)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES),
                        help="what to measure (default: both)")
    parser.add_argument("--k", type=int, default=1, help="cache.k of the dumps (default: 1)")
    parser.add_argument("--tiny", type=Path, default=None, help="a tiny build to use (default: build one in --out)")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--check-tokenizer", default=str(REPO.parent / "shared" / "data" / "qwen2-tokenizer"))
    parser.add_argument("--check-data", default=str(REPO.parent / "shared" / "data" / "wikitext-2-raw-v1"))
    parser.add_argument("--check-chunks", type=int, nargs="+", default=[1 << 20, 1 << 16, 1 << 12],
                        help="chunk sizes (characters) of the chunked-tokenization check")
    parser.add_argument("--tokenize-only", nargs=3, metavar=("CORPUS", "TOKENIZER", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokenize_only:
        corpus, tokenizer_dir, result = args.tokenize_only
        Path(result).write_text(json.dumps(tokenize_only(corpus, tokenizer_dir)))
        return 0
    if sorted(args.tokens) != args.tokens or len(args.tokens) < 2 or args.tokens[0] < 1 or args.repeats < 1:
        raise UserError("--tokens needs two or more increasing positive sizes and --repeats a positive count")
    if not args.doc.is_file():
        raise UserError(f"--doc {args.doc} not found")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.stream_memory " + shlex.join(argv)

    from common.models import load_tokenizer
    from tiny_world.build import build

    tiny = args.tiny or args.out / "tiny"
    if args.tiny is None:
        build(str(tiny))
    elif not (tiny / "READY.json").is_file():
        raise UserError(f"--tiny {tiny} is not a finished tiny build")
    tokenizer = load_tokenizer(str(tiny / "teacher"), "tiny tokenizer")
    for size in args.tokens:
        write_corpus(args.out / f"corpus-{size}.txt", size, tokenizer)
    check = check_chunking(args.check_tokenizer, args.check_data, args.check_chunks, args.out)
    runs = measure(tiny, args.out, args.tokens, args.routes, args.repeats, args.k)
    for size in args.tokens:  # every route and run read the same tokens
        fingerprints = {r["fingerprint"] for route in args.routes for r in runs[size, route]}
        if len(fingerprints) != 1:
            raise UserError(f"{label(size)}: the dump and the tokenizer-only run read different tokens")

    import torch
    import transformers

    section = "\n".join([
        f"`{command}` — {cpu_name()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{time.strftime('%Y-%m-%d')}. Median of {args.repeats} runs per row, each in a fresh process, the rows "
        "alternating; peak RSS is the process's `ru_maxrss`, wall time includes start-up. "
        + " ".join(ROUTE_DOC[route].format(k=args.k) for route in args.routes)
        + " Every run of a corpus read the same tokens (equal fingerprints).",
        "", *table(runs, args.tokens, args.routes), "",
        f"Chunked tokenization against one call on the whole text, tokenizer `{args.check_tokenizer}`, "
        f"data `{args.check_data}`:", "",
        "| file | rows | chunk, characters | chunks | tokens | identical |", "|---|---|---|---|---|---|", *check])
    write_doc(args.doc, section)
    print(section)
    return 0


if __name__ == "__main__":
    run_main(main)
