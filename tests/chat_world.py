"""A small chat world for the tests: the tiny models with a ChatML template, and generated conversations
whose prompts are about as long as their answers (the tiny tokenizer has no chat template, and knows ChatML's
markers only as text, which is fine: they are tokenized as any text)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from transformers import AutoTokenizer

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# renders differently (another end-of-turn marker)
OTHER_TEMPLATE = CHATML.replace("<|im_end|>", "<|end|>")


def with_template(model_dir: Path, out: Path, template: str | None = CHATML) -> Path:
    """A copy of a tiny model whose tokenizer has `template` (None: none)."""
    shutil.copytree(model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = template
    for stale in out.glob("chat_template.*"):
        stale.unlink()
    tokenizer.save_pretrained(out)
    return out


def chat_models(tiny: Path, root: Path) -> tuple[Path, Path]:
    """(teacher, student) copies of the tiny models with the ChatML template."""
    return with_template(tiny / "teacher", root / "teacher"), with_template(tiny / "student", root / "student")


def conversations(tiny: Path, count: int, seed: int = 0, words: tuple[int, int] = (3, 12),
                  exchanges: tuple[int, int] = (1, 2)) -> list[list[dict]]:
    """`count` conversations of words from the tiny corpus: a system prompt sometimes, a few exchanges, each
    question about as long as its answer."""
    vocabulary = (tiny / "data" / "wiki.train.raw").read_text(encoding="utf-8").split()[:20000]
    rng = random.Random(seed)

    def text() -> str:
        start = rng.randrange(len(vocabulary) - 60)
        return " ".join(vocabulary[start:start + rng.randint(*words)])

    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(*exchanges)):
            messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        out.append(messages)
    return out


def write_jsonl(path: Path, rows: list[list[dict]], column: str = "messages") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({column: messages}) + "\n" for messages in rows), encoding="utf-8")
    return path


def chat_overrides(tiny: Path, models: tuple[Path, Path], corpus: Path, cache_dir: Path, **extra) -> list[str]:
    """Config overrides for a chat run on the tiny world (as tests.conftest.tiny_overrides)."""
    values = {"teacher.model": models[0], "student.model": models[1], "data.dataset": "tiny-chat",
              "data.subset": "generated", "data.files": corpus, "data.rows": "chat", "data.seq_len": 128,
              "data.max_blocks": None, "teacher.batch_size": 4, "cache.dir": cache_dir, "cache.shard_blocks": 5,
              "cache.k": 16, "cache.tail_draws": 0, "train.batch_size": 2, "train.gradient_accumulation": 2,
              "train.lr": 1e-3,
              "train.loss_chunk": 96}
    values.update(extra)
    return [f"{key}={'null' if value is None else value}" for key, value in values.items()]
