"""The tiny build: corpus files, tokenizer, trained teacher and untrained student under one directory.

`python -m tiny_world [--out tiny] [--force]`; `build()` is the same from Python. The build is written to
a sibling temporary directory and published whole, READY.json last, so a crashed build is never taken for
a finished one. READY.json records the build key (`build_key`: the build's source, settings and library
versions); a build whose key differs from the current one is made again, so a checkout never reuses a build
of other code (a stale `tiny/` was why a fresh clone once printed another tiny table than the README).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from common.cli import UserError
from common.config import DataConfig
from common.data import hub_rows, load_rows, pack_blocks, tokenize_stream
from common.fsutil import publish_directory
from tiny_world.corpus import PRETRAIN, SEED, SPLIT_FILES, build_corpus
from tiny_world.models import (
    EOS,
    TEACHER_STEPS,
    TINY_STUDENT,
    TINY_TEACHER,
    model_config,
    padded_vocab_sizes,
    perplexity,
    train_teacher,
    train_tokenizer,
)

SEQ_LEN = 128
READY = "READY.json"
LAYOUT = {"data", "teacher", "student", READY}  # what a build of ours leaves in <out>
REPO = Path(__file__).resolve().parent.parent


def _project_file(module: str) -> Path | None:
    """The file of `module` if it is part of this repository (not a library), else None."""
    path = REPO.joinpath(*module.split("."))
    return next((f for f in (path.with_suffix(".py"), path / "__init__.py") if f.is_file()), None)


def build_sources(package: str = "tiny_world") -> list[Path]:
    """The files of `package` and every project file they import, transitively (imports inside functions
    too, read from the source: a build may run code that was not imported yet when the key is computed)."""
    todo, seen = sorted((REPO / package).glob("*.py")), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative imports are not followed here"
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                for depth in range(1, len(parts) + 1):  # importing a.b runs a/__init__.py first
                    if (found := _project_file(".".join(parts[:depth]))) is not None:
                        todo.append(found)
    return sorted(seen)


def build_key(seed: int, teacher_steps: int) -> str:
    """Changes whenever the build could: its source, its settings or the libraries that compute it."""
    import numpy
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    for path in build_sources():
        digest.update(f"{path.relative_to(REPO).as_posix()}\0".encode() + path.read_bytes() + b"\0")
    settings = {"seed": seed, "teacher_steps": teacher_steps, "torch": torch.__version__,
                "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                "numpy": numpy.__version__}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def is_ready(out_dir: str, key: str | None = None) -> bool:
    """A finished build in `out_dir` (of this `key`, when given)."""
    try:
        with open(os.path.join(out_dir, READY)) as fh:
            info = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return False
    return key is None or (isinstance(info, dict) and info.get("key") == key)


def _check_ours(out_dir: str) -> None:
    """Only a directory holding nothing but our layout may be replaced; anything else is the user's."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise UserError(f"{out_dir} exists and is not a directory built by tiny_world; choose another --out")
    foreign = sorted(set(os.listdir(out_dir)) - LAYOUT)
    if foreign:
        raise UserError(f"{out_dir} holds files tiny_world did not make ({', '.join(foreign[:3])}); "
                        "move them or choose another --out")


def _build_into(tmp: str, seed: int, teacher_steps: int) -> dict[str, Any]:
    from transformers import Qwen2ForCausalLM

    start = time.time()
    data_dir = os.path.join(tmp, "data")
    os.makedirs(data_dir)
    corpus = build_corpus(seed)
    for split, text in corpus.items():
        if split == PRETRAIN:
            continue
        with open(os.path.join(data_dir, SPLIT_FILES[split]), "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
    tokenizer = train_tokenizer(corpus["train"])
    streams = {split: tokenize_stream(tokenizer, load_rows(DataConfig(local_dir=data_dir, max_blocks=None), split))
               for split in SPLIT_FILES}
    num_tokens, eos_id = len(tokenizer), tokenizer.convert_tokens_to_ids(EOS)
    vocab = dict(zip(("teacher", "student"), padded_vocab_sizes(num_tokens)))
    for role, shape in (("student", TINY_STUDENT), ("teacher", TINY_TEACHER)):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(model_config(shape, vocab[role], eos_id))
        if role == "teacher":
            pretrain = tokenize_stream(tokenizer, hub_rows(corpus[PRETRAIN].splitlines(keepends=True)))
            train_seconds = train_teacher(model, pack_blocks(pretrain, SEQ_LEN, None), teacher_steps, seed)
            ppl = perplexity(model, pack_blocks(streams["valid"], SEQ_LEN, None))
        model.save_pretrained(os.path.join(tmp, role))
        tokenizer.save_pretrained(os.path.join(tmp, role))
    return {"seed": seed, "tokenizer_size": num_tokens, "teacher_vocab_size": vocab["teacher"],
            "student_vocab_size": vocab["student"], "tokens": {s: len(v) for s, v in streams.items()},
            "seq_len": SEQ_LEN, "teacher_steps": teacher_steps, "teacher_train_seconds": round(train_seconds, 1),
            "teacher_valid_ppl": round(ppl, 3), "build_seconds": round(time.time() - start, 1)}


def build(out_dir: str, force: bool = False, seed: int = SEED,
          teacher_steps: int = TEACHER_STEPS) -> dict[str, Any]:
    """Build `out_dir` unless it is ready (or rebuild with `force`); returns the READY.json contents.
    Fewer `teacher_steps` give a quick, weaker build (for tests)."""
    out_dir = os.path.abspath(out_dir)  # so the temporary build is a true sibling, on the same file system
    key = build_key(seed, teacher_steps)
    if is_ready(out_dir, key) and not force:
        with open(os.path.join(out_dir, READY)) as fh:
            return json.load(fh)
    _check_ours(out_dir)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # only a crashed build of ours with a reused pid can be here
    try:
        info = {"key": key, **_build_into(tmp, seed, teacher_steps)}
        with open(os.path.join(tmp, READY), "w") as fh:  # last, and the rename publishes everything at once
            json.dump(info, fh, indent=2)
        publish_directory(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiny_world",
                                     description="Build the tiny offline corpus, tokenizer, teacher and student.")
    parser.add_argument("--out", default="tiny", help="output directory (default: tiny)")
    parser.add_argument("--force", action="store_true", help="rebuild even if <out> holds a build of this code")
    args = parser.parse_args(argv)
    if is_ready(args.out, build_key(SEED, TEACHER_STEPS)) and not args.force:
        print(f"{args.out} is ready (a build of this code and settings); pass --force to rebuild")
        return 0
    if is_ready(args.out):
        print(f"{args.out} holds a build of other code or settings: building it again")
    import datasets
    import transformers

    datasets.disable_progress_bars()  # the per-split and per-shard bars would bury the training log
    transformers.utils.logging.disable_progress_bar()
    info = build(args.out, force=args.force)
    out, tokens = args.out, info["tokens"]
    print(f"built {out} in {info['build_seconds']:.0f}s (teacher training {info['teacher_train_seconds']:.0f}s)\n"
          f"  data       {out}/data/wiki.{{train,valid,test}}.raw  tokens: train {tokens['train']}, "
          f"valid {tokens['valid']}, test {tokens['test']}\n"
          f"  tokenizer  {info['tokenizer_size']} tokens (eos = pad = {EOS}), saved with both models\n"
          f"  teacher    {out}/teacher  vocab_size {info['teacher_vocab_size']}, "
          f"valid perplexity {info['teacher_valid_ppl']:.2f}\n"
          f"  student    {out}/student  vocab_size {info['student_vocab_size']}, untrained")
    return 0
