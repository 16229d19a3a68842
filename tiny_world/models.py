"""Tokenizer and models of the tiny world, reused by `bench.quality` at its own scale.

Both tiny models share one byte-level BPE tokenizer (Qwen2's pre-tokenizer, 1000 tokens, trained on the train
split) but, as Qwen2-7B (152,064) and Qwen2-1.5B (151,936) versus their tokenizer (151,646), have padded
vocabularies that differ from each other and exceed the tokenizer's, so the pipeline's vocabulary handling
is exercised. Model shapes are `ModelShape`s; `TINY_TEACHER` and `TINY_STUDENT` are the tiny build's.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from tiny_world.corpus import SEED

if TYPE_CHECKING:
    from transformers import Qwen2Config, Qwen2Tokenizer

EOS = "<|endoftext|>"
VOCAB_SIZE = 1000  # BPE target, special token included
MAX_POSITIONS = 512
TEACHER_STEPS, TEACHER_BATCH, TEACHER_LR, WARMUP = 600, 16, 3e-3, 30


def train_tokenizer(text: str, vocab_size: int = VOCAB_SIZE) -> Qwen2Tokenizer:
    """Byte-level BPE trained on `text` with Qwen2's normalizer and pre-tokenizer, as a `Qwen2Tokenizer`.

    Qwen2's own class on purpose: `AutoTokenizer` loads a directory that holds a qwen2 config.json as
    `Qwen2Tokenizer`, which rebuilds the pipeline from vocab and merges; anything else would tokenize
    differently after the round trip.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    return Qwen2Tokenizer(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]], eos_token=EOS,
                          pad_token=EOS, model_max_length=MAX_POSITIONS)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_vocab_sizes(num_tokens: int) -> tuple[int, int]:
    """(teacher, student): both above the tokenizer's size and different, as for Qwen2-7B vs Qwen2-1.5B."""
    return _round_up(num_tokens, 64) + 64, _round_up(num_tokens, 32)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen2 model that differ between our models (its fields are `Qwen2Config` arguments)."""
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = MAX_POSITIONS
    num_attention_heads: int = 4
    num_key_value_heads: int = 2

    @classmethod
    def of_config(cls, path: str) -> "ModelShape":
        """The shape a Hugging Face config.json describes (the real Qwen2 shapes in configs/qwen2/)."""
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


TINY_TEACHER = ModelShape(hidden_size=128, num_hidden_layers=4, intermediate_size=384, tie_word_embeddings=False)
TINY_STUDENT = ModelShape(hidden_size=64, num_hidden_layers=2, intermediate_size=192, tie_word_embeddings=True)


def model_config(shape: ModelShape, vocab_size: int, eos_id: int) -> Qwen2Config:
    """A Qwen2 config of `shape` whose bos, eos and pad are all `eos_id`."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                       **asdict(shape))


def _batches(num_blocks: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """Block indices for every step: reshuffled epochs, so every block is seen before any repeats."""
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-steps * batch // num_blocks)
    order = torch.cat([torch.randperm(num_blocks, generator=gen) for _ in range(epochs)])
    return order[: steps * batch].view(steps, batch)


def train_teacher(model: torch.nn.Module, blocks: np.ndarray, steps: int = TEACHER_STEPS, seed: int = SEED) -> float:
    """AdamW with linear warm-up and cosine decay, plain fp32 on the CPU; returns the seconds it took."""
    data = torch.from_numpy(blocks.astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=TEACHER_LR, betas=(0.9, 0.95), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    start = time.time()
    for step, idx in enumerate(_batches(len(data), steps, TEACHER_BATCH, seed), 1):
        batch = data[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 50 == 0 or step == steps:
            print(f"teacher step {step}/{steps}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    return time.time() - start


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: np.ndarray, batch: int = 32) -> float:
    """exp of the mean next-token loss; all blocks have the same length, so batch means average exactly."""
    model.eval()
    data = torch.from_numpy(blocks.astype(np.int64))
    total = sum(model(input_ids=data[i:i + batch], labels=data[i:i + batch]).loss.item() * len(data[i:i + batch])
                for i in range(0, len(data), batch))
    return math.exp(total / len(data))
