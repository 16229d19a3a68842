"""`python -m stage2_student.evaluate --model DIR [--model DIR …] [--name LABEL …] [--teacher DIR] [key=value …]`

Perplexity (and next-token calibration error) of any causal LM — teacher, student before, student
after — on a WikiText-2 split, with the standard sliding-window method: windows of data.seq_len tokens
every eval.stride tokens (default seq_len/2), each token scored once, with as much left context as the
window gives. Bits per byte are the scored tokens' NLL in bits over their text's UTF-8 bytes.
With `--teacher`, also the fidelity to that teacher on the same windows: the mean KL(teacher ‖ model) per
scored token and the share of tokens whose most likely next token is the teacher's (same tokenizer needed).
Probabilities are taken over the real vocabulary (len(tokenizer)), not the padded embedding rows.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch loads (seconds): a Ctrl-C or SIGTERM meanwhile ends in one line too
    from common.cli import stop_quietly_while_loading

    stop_quietly_while_loading()

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from cache.manifest import Manifest, load_manifest
from common.alignment import vocab_logprobs
from common.cli import UserError, run_main
from common.config import DataConfig, PipelineConfig, config_arg_parser, parse_args
from common.data import load_rows, row_kind, tokenize_stream
from common.models import DTYPES, load_causal_lm, load_tokenizer, resolve_device, tokenizer_hash
from stage2_student.checkpoint import check_finished_model

ECE_BINS = 15


@dataclass
class Window:
    begin: int
    end: int
    scored: int  # the last `scored` tokens of the window are new (scored here)


def sliding_windows(num_tokens: int, length: int, stride: int) -> list[Window]:
    if stride < 1 or stride > length:
        raise UserError(f"eval.stride must be in [1, data.seq_len={length}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + length, num_tokens)
        windows.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@dataclass
class Score:
    model: str
    perplexity: float
    nll: float
    ece: float
    accuracy: float
    tokens: int
    windows: int
    bits_per_byte: float
    kl_to_teacher: float | None = None  # with --teacher: mean KL(teacher ‖ model) per scored token, nats
    top1_agreement: float | None = None  # with --teacher: share of scored tokens with the teacher's argmax


class Scorer:
    """Accumulates NLL and calibration statistics over scored tokens."""

    def __init__(self) -> None:
        self.nll, self.count = 0.0, 0
        self.kl, self.agree = 0.0, 0
        self.bin_conf = np.zeros(ECE_BINS)
        self.bin_correct = np.zeros(ECE_BINS)
        self.bin_count = np.zeros(ECE_BINS)

    def add(self, logprobs: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None) -> None:
        """logprobs [N, V] fp32 for the next token, labels [N]; `teacher`: its logprobs [N, V] there."""
        if teacher is not None:
            self.kl += (teacher.exp() * (teacher - logprobs)).sum().item()
            self.agree += int((teacher.argmax(-1) == logprobs.argmax(-1)).sum())
        self.nll -= logprobs.gather(-1, labels[:, None]).sum().item()
        self.count += labels.numel()
        conf, pred = logprobs.max(-1)
        conf = conf.exp().cpu().numpy()
        correct = (pred == labels).cpu().numpy()
        bins = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
        np.add.at(self.bin_conf, bins, conf)
        np.add.at(self.bin_correct, bins, correct)
        np.add.at(self.bin_count, bins, 1)

    def result(self, model: str, windows: int, text_bytes: int, with_teacher: bool) -> Score:
        nll = self.nll / self.count
        ece = float(np.abs(self.bin_correct - self.bin_conf).sum() / self.count)
        fidelity = (self.kl / self.count, self.agree / self.count) if with_teacher else (None, None)
        return Score(model, math.exp(nll), nll, ece, float(self.bin_correct.sum() / self.count), self.count, windows,
                     self.nll / math.log(2) / max(text_bytes, 1), *fidelity)


@dataclass
class Teacher:
    """The model others are compared with (`--teacher`), and its tokenizer's hash."""
    model: torch.nn.Module
    tokenizer_hash: str


def load_model(model_dir: str, cfg: PipelineConfig, device: torch.device) -> torch.nn.Module:
    dtype = "auto" if cfg.eval.dtype == "auto" else DTYPES[cfg.eval.dtype]  # auto: as the model was saved
    return load_causal_lm(model_dir, "model", device, dtype).eval()


@torch.inference_mode()
def evaluate_model(model_dir: str, rows: list[str], cfg: PipelineConfig, device: torch.device,
                   teacher: Teacher | None = None) -> Score:
    """Each model is scored on the rows as its own tokenizer splits them, in its own dtype (eval.dtype)."""
    tokenizer = load_tokenizer(model_dir, "tokenizer")
    if teacher is not None and tokenizer_hash(tokenizer) != teacher.tokenizer_hash:
        raise UserError(f"{model_dir} has another tokenizer than --teacher: KL and agreement need the same tokens")
    model = load_model(model_dir, cfg, device)
    stream = tokenize_stream(tokenizer, rows, row_kind(cfg.data))
    length = cfg.data.seq_len
    windows = sliding_windows(len(stream), length, eval_stride(cfg))
    if cfg.eval.max_windows:
        windows = windows[: cfg.eval.max_windows]
    vocab, scorer, scored = len(tokenizer), Scorer(), []
    # windows of equal length are batched; the last one may be shorter
    for i in range(0, len(windows), cfg.eval.batch_size):
        for same in _by_length(windows[i:i + cfg.eval.batch_size]):
            ids = torch.from_numpy(np.stack([stream[w.begin:w.end] for w in same])).to(device, torch.long)
            logprobs = vocab_logprobs(model(input_ids=ids, use_cache=False).logits[:, :-1], vocab)
            reference = None if teacher is None else \
                vocab_logprobs(teacher.model(input_ids=ids, use_cache=False).logits[:, :-1], vocab)
            for row, window in enumerate(same):
                first = max(ids.size(1) - 1 - window.scored, 0)  # the first token has no prediction
                scorer.add(logprobs[row, first:], ids[row, first + 1:],
                           None if reference is None else reference[row, first:])
                scored.append(ids[row, first + 1:].cpu())
    # the scored tokens follow each other in the stream: their text is one decode
    text_bytes = len(tokenizer.decode(torch.cat(scored).tolist()).encode("utf-8"))
    return scorer.result(model_dir, len(windows), text_bytes, teacher is not None)


def data_config_of(manifest: Manifest, data: DataConfig) -> DataConfig:
    """The data settings a cache was made from: the same text source, tokenization and block length."""
    source = manifest.dataset
    return dataclasses.replace(data, dataset=source.name, subset=source.subset, local_dir=source.local_dir,
                               files=source.files, text_column=source.text_column, rows=source.rows,
                               seq_len=manifest.seq_len)


def eval_stride(cfg: PipelineConfig) -> int:
    """eval.stride, by default half a window: every token gets at least seq_len/2 tokens of context."""
    return cfg.eval.stride or max(cfg.data.seq_len // 2, 1)


def _by_length(windows: list[Window]) -> list[list[Window]]:
    groups: dict[int, list[Window]] = {}
    for window in windows:
        groups.setdefault(window.end - window.begin, []).append(window)
    return list(groups.values())


def print_table(scores: list[Score], names: list[str]) -> None:
    fidelity = scores and scores[0].kl_to_teacher is not None
    extra = f" {'KL to teacher':>13} | {'agreement':>9} |" if fidelity else ""
    print(f"| {'model':<32} | {'perplexity':>10} | {'bits/byte':>9} | {'ECE':>6} | {'top-1 acc':>9} | "
          f"{'tokens':>8} |{extra}")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 11}|{'-' * 8}|{'-' * 11}|{'-' * 10}|" + ("-" * 15 + "|" + "-" * 11 + "|")
          * bool(fidelity))
    for name, s in zip(names, scores):
        extra = f" {s.kl_to_teacher:>13.4f} | {s.top1_agreement:>9.4f} |" if fidelity else ""
        print(f"| {name:<32} | {s.perplexity:>10.3f} | {s.bits_per_byte:>9.4f} | {s.ece:>6.4f} | {s.accuracy:>9.4f} | "
              f"{s.tokens:>8} |{extra}")


def main(argv: Sequence[str]) -> int:
    parser = config_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="DIR",
                        help="model directory or hub id; repeat for several")
    parser.add_argument("--name", action="append", default=None, help="label per --model, in order")
    parser.add_argument("--teacher", default=None, metavar="DIR",
                        help="also report each model's KL(teacher ‖ model) and top-1 agreement with this model")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="evaluate on the dataset and block length this stage-one cache was made from "
                             "(its manifest's data settings replace data.*)")
    args, cfg = parse_args(parser, argv)
    names = args.name or args.model
    if len(names) != len(args.model):
        raise UserError(f"got {len(names)} --name for {len(args.model)} --model")
    for model in args.model + ([args.teacher] if args.teacher else []):  # before any model or data is loaded
        check_finished_model(model)
    if args.cache is not None:
        cfg.data = data_config_of(load_manifest(args.cache), cfg.data)
    device = resolve_device(cfg.train.device)
    rows = load_rows(cfg.data, cfg.eval.split)
    teacher = None
    if args.teacher is not None:
        teacher_tokenizer = load_tokenizer(args.teacher, "teacher tokenizer")
        teacher = Teacher(load_model(args.teacher, cfg, device), tokenizer_hash(teacher_tokenizer))
    scores = [evaluate_model(model, rows, cfg, device, teacher) for model in args.model]
    print(f"[eval] split {cfg.eval.split}, window {cfg.data.seq_len}, stride {eval_stride(cfg)}")
    print_table(scores, names)
    output = cfg.eval.output or os.path.join(cfg.train.log_dir, f"eval_{cfg.eval.split}.json")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as fh:
        json.dump({"split": cfg.eval.split, "seq_len": cfg.data.seq_len,
                   "stride": eval_stride(cfg), "teacher": args.teacher,
                   "results": [{"name": n, **asdict(s)} for n, s in zip(names, scores)]}, fh, indent=2)
    print(f"[eval] wrote {output}")
    return 0


if __name__ == "__main__":
    run_main(main)
