"""`python -m stage2_student.evaluate --model DIR [--model DIR …] [--name LABEL …] [--teacher DIR | --cache DIR] …`

Perplexity (and next-token calibration error) of any causal LM — teacher, student before, student
after — on a split (eval.split), by one of two protocols (eval.protocol):

- `lm-eval` (default): lm-evaluation-harness's `wikitext` task (stage2_student/harness.py): each document
  (a WikiText article, detokenized; a row of `.jsonl`/`.parquet` files) scored on its own with the
  harness's rolling windows of eval.max_length tokens; word perplexity, byte perplexity and bits per byte
  as the harness computes them, numbers that compare across tokenizers and with published ones, and the
  token perplexity beside them.
- `strided`: one token stream, windows of data.seq_len tokens every eval.stride tokens (default
  seq_len/2), each token scored once, with as much left context as the window gives. Bits per byte are
  the scored tokens' NLL in bits over their text's UTF-8 bytes. Probabilities over the real vocabulary.

Conversations (`data.rows=chat`) take neither protocol: the split's conversations are rendered with each model's
chat template, packed into blocks of data.seq_len and masked as stage one does (common/chat.py; each
conversation attends only to itself), and scored on the trained positions (data.train_on) only: the mean NLL
there (`assistant_loss`, nats per token), its exp (`assistant_perplexity`) and the positions scored.

Teacher fidelity (stage2_student/fidelity.py): with `--teacher`, on the scored positions, exactly; with
`--cache` of the evaluated split, on the cache's positions against the distributions it holds (exact for a
full cache, estimated for sparse ones): mean KL(teacher ‖ model) per position, top-1 agreement and the
share of the teacher's top-k mass the model puts on the same ids. Same tokenizer needed.
"""
from __future__ import annotations

if __name__ == "__main__":  # before torch loads (seconds): a Ctrl-C or SIGTERM meanwhile ends in one line too
    from common.cli import stop_quietly_while_loading

    stop_quietly_while_loading()

import dataclasses
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from cache.manifest import Manifest, load_manifest
from cache.reader import CacheReader
from common.alignment import vocab_logprobs
from common.chat import ChatBlockStream
from common.cli import UserError, run_main
from common.config import DataConfig, PipelineConfig, config_arg_parser, parse_args
from common.data import load_rows, row_kind, tokenize_stream
from common.models import DTYPES, load_causal_lm, load_tokenizer, resolve_device, tokenizer_hash
from stage2_student.checkpoint import check_finished_model
from stage2_student.fidelity import Fidelity, FullTeacher, cache_estimator, cache_fidelity, cache_temperature
from stage2_student.harness import (
    Document,
    context_length,
    encode,
    harness_metrics,
    load_documents,
    max_length_for,
    prefix_token_id,
    rolling_windows,
)

ECE_BINS = 15


@dataclass
class Window:
    begin: int
    end: int
    scored: int  # the last `scored` tokens of the window are new (scored here)


def sliding_windows(num_tokens: int, length: int, stride: int) -> list[Window]:
    if stride > length:  # (stride ≥ 1 is the schema's range)
        raise UserError(f"eval.stride must be at most data.seq_len={length}, got {stride}")
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
    perplexity: float  # per token of the model's tokenizer
    nll: float  # nats per token
    ece: float
    accuracy: float
    tokens: int
    windows: int
    bits_per_byte: float | None  # lm-eval: the harness's (Σ NLL over the documents' UTF-8 bytes); strided: see the
    # docstring; chat: none
    word_perplexity: float | None = None  # lm-eval only
    byte_perplexity: float | None = None  # lm-eval only
    documents: int | None = None  # lm-eval only
    words: int | None = None  # lm-eval only: the documents' words (re.split(r"\s+", page))
    bytes: int | None = None  # the scored text's UTF-8 bytes
    max_length: int | None = None  # lm-eval only: tokens per rolling window
    assistant_loss: float | None = None  # chat only: mean NLL over the trained positions, nats per token
    assistant_perplexity: float | None = None  # chat only: exp(assistant_loss)
    conversations: int | None = None  # chat only: the conversations read (`tokens`: the positions scored)
    kl_to_teacher: float | None = None  # with --teacher or --cache: mean KL(teacher ‖ model) per position, nats
    top1_agreement: float | None = None  # share of positions with the teacher's most likely token
    topk_mass_share: float | None = None  # the model's mass on the teacher's top-k ids over the teacher's
    kl_lower_bound: float | None = None  # top-k caches: the k+1-bucket KL, a lower bound (stage2_student/fidelity.py)
    fidelity_positions: int | None = None


class Scorer:
    """Accumulates NLL and calibration statistics over scored tokens."""

    def __init__(self) -> None:
        self.nll, self.count = 0.0, 0
        self.bin_conf = np.zeros(ECE_BINS)
        self.bin_correct = np.zeros(ECE_BINS)
        self.bin_count = np.zeros(ECE_BINS)

    def add(self, logprobs: torch.Tensor, labels: torch.Tensor) -> float:
        """logprobs [N, V] fp32 for the next token, labels [N]; returns their log-likelihood (nats, ≤ 0)."""
        loglikelihood = logprobs.gather(-1, labels[:, None]).sum(dtype=torch.float64).item()
        self.nll -= loglikelihood
        self.count += labels.numel()
        conf, pred = logprobs.max(-1)
        conf = conf.exp().cpu().numpy()
        correct = (pred == labels).cpu().numpy()
        bins = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
        np.add.at(self.bin_conf, bins, conf)
        np.add.at(self.bin_correct, bins, correct)
        np.add.at(self.bin_count, bins, 1)
        return loglikelihood

    def result(self, model: str, windows: int, text_bytes: int) -> Score:
        nll = self.nll / self.count
        ece = float(np.abs(self.bin_correct - self.bin_conf).sum() / self.count)
        return Score(model, math.exp(nll), nll, ece, float(self.bin_correct.sum() / self.count), self.count, windows,
                     self.nll / math.log(2) / max(text_bytes, 1), bytes=text_bytes)


@dataclass
class Teacher:
    """The model others are compared with (`--teacher`), its tokenizer's hash and its context length."""
    model: torch.nn.Module
    tokenizer_hash: str
    context: int


def load_model(model_dir: str, cfg: PipelineConfig, device: torch.device) -> torch.nn.Module:
    dtype = "auto" if cfg.eval.dtype == "auto" else DTYPES[cfg.eval.dtype]  # auto: as the model was saved
    return load_causal_lm(model_dir, "model", device, dtype).eval()


def _forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@dataclass
class Scored:
    """A model scored in a pass, and what accumulates over it."""
    dir: str
    model: torch.nn.Module
    scorer: Scorer = field(default_factory=Scorer)
    fidelity: Fidelity | None = None

    def add(self, logprobs: torch.Tensor, labels: torch.Tensor, teacher: FullTeacher | None) -> float:
        if self.fidelity is not None:
            self.fidelity.add_full(logprobs, teacher)
        return self.scorer.add(logprobs, labels)


def evaluate_models(model_dirs: list[str], text: list[str] | list[Document] | None, cfg: PipelineConfig,
                    device: torch.device, teacher: Teacher | None = None,
                    cache: CacheReader | None = None) -> list[Score]:
    """Each model is scored on the text (strided: rows; lm-eval: documents) as its own tokenizer splits it, in
    its own dtype (eval.dtype); with `teacher` or `cache`, its fidelity to that teacher too. With `teacher`, up to
    eval.models_per_pass models that see the same tokens are held at once and share each batch's teacher forward."""
    tokenizers = [load_tokenizer(model_dir, "tokenizer") for model_dir in model_dirs]
    for model_dir, tokenizer in zip(model_dirs, tokenizers):
        if teacher is not None and tokenizer_hash(tokenizer) != teacher.tokenizer_hash:
            raise UserError(f"{model_dir} has another tokenizer than --teacher: KL and agreement need the same "
                            "tokens")
        if cache is not None and tokenizer_hash(tokenizer) != cache.manifest.tokenizer.hash:
            raise UserError(f"{model_dir} has another tokenizer than the cache {cache.dir}: KL and agreement need "
                            "the same tokens")
    chat = row_kind(cfg.data) == "chat"
    # models share a pass only to share the teacher's forward, so they must see the same tokens: one tokenizer
    # (checked above) and, for conversations, one chat template; without a teacher each model is a pass alone
    groups: dict[object, list[int]] = {}
    for i, tokenizer in enumerate(tokenizers):
        key = i if teacher is None else str(getattr(tokenizer, "chat_template", None)) if chat else None
        groups.setdefault(key, []).append(i)
    scores: dict[int, Score] = {}
    for members in groups.values():
        for start in range(0, len(members), cfg.eval.models_per_pass):
            chunk = members[start:start + cfg.eval.models_per_pass]
            models = [Scored(model_dirs[i], load_model(model_dirs[i], cfg, device),
                             fidelity=Fidelity() if teacher is not None else None) for i in chunk]
            tokenizer = tokenizers[chunk[0]]
            if chat:
                results = _chat(models, tokenizer, cfg, device, teacher)
            elif cfg.eval.protocol == "strided":
                results = _strided(models, tokenizer, text, cfg, device, teacher)
            else:
                results = _rolling(models, tokenizer, text, cfg, device, teacher)
            for i, scored, score in zip(chunk, models, results):
                if scored.fidelity is not None:
                    score = dataclasses.replace(score, **asdict(scored.fidelity.result()),
                                                fidelity_positions=scored.fidelity.positions)
                if cache is not None:
                    result, positions = cache_fidelity(scored.model, cache, device, cfg.eval.batch_size, cfg.cache.k)
                    score = dataclasses.replace(score, **asdict(result), fidelity_positions=positions)
                scores[i] = score
            del models  # before the next pass loads its own
    return [scores[i] for i in range(len(model_dirs))]


@torch.inference_mode()
def _strided(models: list[Scored], tokenizer, rows: list[str], cfg: PipelineConfig, device: torch.device,
             teacher: Teacher | None) -> list[Score]:
    stream = tokenize_stream(tokenizer, rows, row_kind(cfg.data))
    length = cfg.data.seq_len
    windows = sliding_windows(len(stream), length, eval_stride(cfg))
    if cfg.eval.max_windows:
        windows = windows[: cfg.eval.max_windows]
    vocab, scored = len(tokenizer), []
    # windows of equal length are batched; the last one may be shorter
    for i in range(0, len(windows), cfg.eval.batch_size):
        for same in _by_length(windows[i:i + cfg.eval.batch_size]):
            ids = torch.from_numpy(np.stack([stream[w.begin:w.end] for w in same])).to(device, torch.long)
            firsts = [max(ids.size(1) - 1 - w.scored, 0) for w in same]  # the first token has no prediction
            labels = torch.cat([ids[row, first + 1:] for row, first in enumerate(firsts)])
            scored.append(labels.cpu())
            reference = None if teacher is None else \
                FullTeacher.of(_new_positions(_forward(teacher.model, ids), firsts, vocab), cfg.cache.k)
            for m in models:
                m.add(_new_positions(_forward(m.model, ids), firsts, vocab), labels, reference)
    # the scored tokens follow each other in the stream: their text is one decode
    text_bytes = len(tokenizer.decode(torch.cat(scored).tolist()).encode("utf-8"))
    return [m.scorer.result(m.dir, len(windows), text_bytes) for m in models]


def _new_positions(logits: torch.Tensor, firsts: list[int], vocab: int) -> torch.Tensor:
    """The next-token log-probs [N, vocab] of each window's new positions (from `firsts[row]` on), in one tensor."""
    return vocab_logprobs(torch.cat([logits[row, first:-1] for row, first in enumerate(firsts)]), vocab)


def _rolling(models: list[Scored], tokenizer, documents: list[Document], cfg: PipelineConfig, device: torch.device,
             teacher: Teacher | None) -> list[Score]:
    """lm-evaluation-harness's rolling log-likelihood of each document (stage2_student/harness.py); models whose
    windows differ in length (their context lengths differ) are scored one window length after the other."""
    lengths = [max_length_for(m.model.config, tokenizer, cfg.eval.max_length, m.dir) for m in models]
    scores: dict[int, Score] = {}
    for length in dict.fromkeys(lengths):
        same = [i for i, each in enumerate(lengths) if each == length]
        scores.update(zip(same, _rolling_windows([models[i] for i in same], tokenizer, documents, cfg, device,
                                                 teacher, length)))
    return [scores[i] for i in range(len(models))]


@torch.inference_mode()
def _rolling_windows(models: list[Scored], tokenizer, documents: list[Document], cfg: PipelineConfig,
                     device: torch.device, teacher: Teacher | None, max_length: int) -> list[Score]:
    if teacher is not None and teacher.context < max_length:
        raise UserError(f"--teacher's context ({teacher.context} tokens) is shorter than the windows of "
                        f"{models[0].dir} ({max_length}): set eval.max_length")
    prefix = prefix_token_id(tokenizer)
    sequences = [torch.tensor([prefix] + encode(tokenizer, doc.text, prefix)) for doc in documents]
    windows = [(d, w) for d, seq in enumerate(sequences) for w in rolling_windows(len(seq) - 1, max_length)]
    windows.sort(key=lambda item: item[1].begin - item[1].end)  # longest first, as the harness batches them
    vocab = len(tokenizer)
    loglikelihood = [[0.0] * len(documents) for _ in models]
    for i in range(0, len(windows), cfg.eval.batch_size):
        batch = windows[i:i + cfg.eval.batch_size]
        width = max(w.end - w.begin for _, w in batch)
        ids = torch.full((len(batch), width), prefix, dtype=torch.long)  # padded on the right: causal, unseen
        for row, (d, w) in enumerate(batch):
            ids[row, : w.end - w.begin] = sequences[d][w.begin:w.end]
        ids = ids.to(device)
        spans = [(w.end - w.begin - w.scored, w.end - w.begin) for _, w in batch]
        labels = [sequences[d][w.begin + 1 + first: w.end + 1].to(device) for (d, w), (first, _) in zip(batch, spans)]
        references = [None] * len(batch)
        if teacher is not None:
            logits = _forward(teacher.model, ids)
            references = [FullTeacher.of(vocab_logprobs(logits[row, first:last], vocab), cfg.cache.k)
                          for row, (first, last) in enumerate(spans)]
        for m, likelihoods in zip(models, loglikelihood):
            logits = _forward(m.model, ids)
            for row, ((d, _), (first, last)) in enumerate(zip(batch, spans)):
                # over every logit the model computes, as the harness
                likelihoods[d] += m.scorer.add(torch.log_softmax(logits[row, first:last].float(), dim=-1),
                                               labels[row])
                if m.fidelity is not None:
                    m.fidelity.add_full(vocab_logprobs(logits[row, first:last], vocab), references[row])
    words, text_bytes = sum(doc.words for doc in documents), sum(doc.bytes for doc in documents)
    scores = []
    for m, likelihoods in zip(models, loglikelihood):
        metrics = harness_metrics(sum(likelihoods), words, text_bytes)
        scores.append(dataclasses.replace(
            m.scorer.result(m.dir, len(windows), text_bytes), bits_per_byte=metrics.bits_per_byte,
            word_perplexity=metrics.word_perplexity, byte_perplexity=metrics.byte_perplexity,
            documents=len(documents), words=words, max_length=max_length))
    return scores


@torch.inference_mode()
def _chat(models: list[Scored], tokenizer, cfg: PipelineConfig, device: torch.device,
          teacher: Teacher | None) -> list[Score]:
    """Conversations: the split's blocks as stage one makes them (common/chat.py, with these models' tokenizer and
    chat template; eval.max_windows: the first blocks), each conversation attending only to itself (position
    ids), scored at the trained positions only."""
    data = dataclasses.replace(cfg.data, max_blocks=cfg.eval.max_windows)
    stream = ChatBlockStream(data, tokenizer, tokenizer_hash(tokenizer), cfg.eval.split, template_owner=models[0].dir)
    vocab, blocks = len(tokenizer), iter(stream)
    while batch := list(itertools.islice(blocks, cfg.eval.batch_size)):
        ids, positions, mask = (torch.from_numpy(np.stack([block[name] for block in batch])).to(device)
                                for name in ("input_ids", "position_ids", "loss_mask"))
        ids, positions, trained = ids.long(), positions.long(), mask[:, :-1].bool()  # the last one never is
        inputs = {"input_ids": ids, "position_ids": positions, "use_cache": False}
        reference = None if teacher is None else \
            FullTeacher.of(vocab_logprobs(teacher.model(**inputs).logits[:, :-1], vocab)[trained], cfg.cache.k)
        for m in models:
            m.add(vocab_logprobs(m.model(**inputs).logits[:, :-1], vocab)[trained], ids[:, 1:][trained], reference)
    if models[0].scorer.count == 0:
        raise UserError(f"{stream.source.description} has no trained positions (data.train_on={cfg.data.train_on}) "
                        "to score")
    scores = []
    for m in models:
        score = m.scorer.result(m.dir, stream.num_blocks, 0)
        scores.append(dataclasses.replace(score, bits_per_byte=None, bytes=None, assistant_loss=score.nll,
                                          assistant_perplexity=score.perplexity,
                                          conversations=stream.conversations))
    return scores


def data_config_of(manifest: Manifest, data: DataConfig) -> DataConfig:
    """The data settings a cache was made from: the same text source, tokenization and block length."""
    source = manifest.dataset
    chat = {"messages_column": source.messages_column or data.messages_column, "train_on": source.train_on} \
        if source.rows == "chat" else {}  # conversations: their column and the positions trained
    return dataclasses.replace(data, dataset=source.name, subset=source.subset, local_dir=source.local_dir,
                               files=source.files, text_column=source.text_column, rows=source.rows,
                               seq_len=manifest.seq_len, **chat)


def eval_stride(cfg: PipelineConfig) -> int:
    """eval.stride, by default half a window: every token gets at least seq_len/2 tokens of context."""
    return cfg.eval.stride or max(cfg.data.seq_len // 2, 1)


def _by_length(windows: list[Window]) -> list[list[Window]]:
    groups: dict[int, list[Window]] = {}
    for window in windows:
        groups.setdefault(window.end - window.begin, []).append(window)
    return list(groups.values())


def _columns(scores: list[Score]) -> list[tuple[str, str, str]]:
    """(header, Score field, format) of the table's columns: the protocol's, then the fidelity's if measured."""
    if scores[0].assistant_loss is not None:  # conversations
        columns = [("assistant loss", "assistant_loss", ".4f"), ("assistant ppl", "assistant_perplexity", ".3f"),
                   ("ECE", "ece", ".4f"), ("top-1 acc", "accuracy", ".4f"), ("positions", "tokens", "d")]
    else:
        columns = [("word ppl", "word_perplexity", ".3f"), ("byte ppl", "byte_perplexity", ".4f")] \
            if scores[0].word_perplexity is not None else []
        columns += [("bits/byte", "bits_per_byte", ".4f"), ("token ppl", "perplexity", ".3f"),
                    ("ECE", "ece", ".4f"), ("top-1 acc", "accuracy", ".4f"), ("tokens", "tokens", "d")]
    if scores[0].kl_to_teacher is not None:
        columns += [("KL to teacher", "kl_to_teacher", ".4f"), ("agreement", "top1_agreement", ".4f")]
        if scores[0].topk_mass_share is not None:
            columns.append(("top-k mass", "topk_mass_share", ".4f"))
    return columns


def print_table(scores: list[Score], names: list[str]) -> None:
    """One Markdown table, a row per model."""
    columns = _columns(scores)
    cells = [[format(getattr(score, key), spec) for _, key, spec in columns] for score in scores]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, (header, _, _) in enumerate(columns)]
    name_width = max([32] + [len(name) for name in names])
    print(f"| {'model':<{name_width}} | " + " | ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths)) + " |")
    print(f"|{'-' * (name_width + 2)}|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for name, row in zip(names, cells):
        print(f"| {name:<{name_width}} | " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")


def fidelity_cache(path: str, manifest: Manifest, cfg: PipelineConfig) -> CacheReader | None:
    """The `--cache` whose teacher distributions the models are compared with: a cache of the evaluated split
    (a held-out split's cache); a cache of another split only gives the data settings."""
    if manifest.dataset.split != cfg.eval.split:
        print(f"[eval] the cache holds split {manifest.dataset.split}, not eval.split={cfg.eval.split}: its data "
              f"settings are used, no teacher fidelity (dump a cache of split {cfg.eval.split} for it)")
        return None
    return CacheReader(path)


def main(argv: Sequence[str]) -> int:
    parser = config_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="DIR",
                        help="model directory or hub id; repeat for several")
    parser.add_argument("--name", action="append", default=None, help="label per --model, in order")
    parser.add_argument("--teacher", default=None, metavar="DIR",
                        help="also report each model's fidelity to this live teacher on the scored positions: "
                             "KL(teacher ‖ model), top-1 agreement, top-k mass share")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="evaluate on the dataset this stage-one cache was made from (its manifest's data "
                             "settings replace data.*); if it is a cache of eval.split, also report each model's "
                             "fidelity to the teacher distributions it holds, on its positions")
    args, cfg = parse_args(parser, argv)
    names = args.name or args.model
    if len(names) != len(args.model):
        raise UserError(f"got {len(names)} --name for {len(args.model)} --model")
    if args.teacher is not None and args.cache is not None:
        raise UserError("--teacher and --cache both give a teacher to compare with; give one (set data.* for the "
                        "data settings of a cache)")
    for model in args.model + ([args.teacher] if args.teacher else []):  # before any model or data is loaded
        check_finished_model(model)
    cache = None
    if args.cache is not None:
        manifest = load_manifest(args.cache)
        cfg.data = data_config_of(manifest, cfg.data)
        cache = fidelity_cache(args.cache, manifest, cfg)
    device = resolve_device(cfg.train.device)
    protocol = "chat" if row_kind(cfg.data) == "chat" else cfg.eval.protocol
    if protocol == "chat":  # eval.protocol does not apply
        text, settings = None, {"seq_len": cfg.data.seq_len, "train_on": cfg.data.train_on}
        print(f"[eval] split {cfg.eval.split}, conversations (data.rows=chat): blocks of {cfg.data.seq_len} tokens, "
              f"the loss on the {cfg.data.train_on} positions")
    elif cfg.eval.protocol == "strided":
        text, described = load_rows(cfg.data, cfg.eval.split), None
        settings = {"seq_len": cfg.data.seq_len, "stride": eval_stride(cfg)}
        print(f"[eval] split {cfg.eval.split}, strided: window {cfg.data.seq_len}, stride {eval_stride(cfg)}")
    else:
        text, described = load_documents(cfg.data, cfg.eval.split, cfg.eval.max_windows)
        settings = {"documents": described}
        print(f"[eval] split {cfg.eval.split}, lm-eval: {described}; rolling windows of "
              f"{cfg.eval.max_length or 'each model’s context (at most 2048)'} tokens")
    teacher, fidelity = None, None
    if args.teacher is not None:
        teacher_tokenizer = load_tokenizer(args.teacher, "teacher tokenizer")
        teacher_model = load_model(args.teacher, cfg, device)
        teacher = Teacher(teacher_model, tokenizer_hash(teacher_tokenizer),
                          context_length(teacher_model.config, teacher_tokenizer))
        fidelity = {"source": "teacher", "teacher": args.teacher, "estimator": "exact", "k": cfg.cache.k,
                    "positions": "the scored tokens"}
    elif cache is not None:
        m = cache.manifest
        fidelity = {"source": "cache", "cache": args.cache, "mode": m.mode, "split": m.dataset.split,
                    "k": m.k if m.mode == "topk" else (cfg.cache.k if m.mode == "full" else None),
                    "temperature": cache_temperature(m), "estimator": cache_estimator(m),
                    "positions": "the trained positions of the cache's blocks" if m.dataset.rows == "chat" else
                    "every position of the cache's blocks"}
    if fidelity is not None:
        print(f"[eval] teacher fidelity from {fidelity.get('teacher') or fidelity['cache']}: "
              f"KL {fidelity['estimator']}")
    scores = evaluate_models(args.model, text, cfg, device, teacher, cache)
    print_table(scores, names)
    output = cfg.eval.output or os.path.join(cfg.train.log_dir, f"eval_{cfg.eval.split}.json")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as fh:
        json.dump({"split": cfg.eval.split, "protocol": protocol, **settings, "teacher": args.teacher,
                   "fidelity": fidelity, "results": [{"name": n, **asdict(s)} for n, s in zip(names, scores)]},
                  fh, indent=2)
    print(f"[eval] wrote {output}")
    return 0


if __name__ == "__main__":
    run_main(main)
