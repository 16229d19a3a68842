"""Conversations (`data.rows=chat`) → token blocks with the positions to train and per-conversation positions.

Each row is a conversation, a list of `{role, content}` (`data.messages_column`), rendered with the tokenizer's
chat template (`apply_chat_template`) and tokenized in one call. Which positions are trained
(`data.train_on`):
- `assistant`: the positions whose next token is in an assistant turn. An assistant turn's text is what the
  conversation up to it, rendered with the generation prompt (`<|im_start|>assistant\\n` in ChatML), lacks of
  the conversation up to and including it: its content and the template's end of turn (`<|im_end|>\\n`). A
  token belongs to the turn when it starts inside that text. A template that does not render the start of a
  conversation as a prefix of the whole (so the turns cannot be located this way) is refused in one line.
- `all`: every position whose next token is in the same conversation.
The last position of a conversation is never trained: its next token is another conversation's.

Packing (`ChatPacker`): conversations fill blocks of `data.seq_len` tokens in order and are never split
across blocks: one that does not fit in what is left of a block starts the next one, and the rest of the block
is padding (the tokenizer's pad token, else EOS; not trained; positions of its own). A conversation longer than
a block is cut into pieces of `data.seq_len` tokens, each a block of its own that sees only itself (its
positions restart, and its last position is not trained: the token it would predict is in the next piece);
the remainder packs like a conversation. `position_ids` restart at 0 with each conversation; models given
them (transformers' packed-sequence route: a block-diagonal causal mask with sdpa/eager, varlen with flash
attention) let each conversation attend only to itself, in stage one and stage two alike. The last block is
kept, padded.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from common.cli import UserError
from common.config import DataConfig, TrainOn
from common.data import Fingerprint, TextSource

CHAT_BATCH = 256  # conversations rendered and tokenized per call
# Stage two renders these with the cache's template and the student's: they must give the same text.
PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi. How can I help?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 2"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3 + 3"},
     {"role": "assistant", "content": "6"}],
)


def check_conversation(value: Any, where: str, column: str, max_chars: int) -> None:
    """A conversation is a list of {role: str, content: str} (other keys allowed), at most `max_chars`
    characters of content; anything else is one line naming the row."""
    if not isinstance(value, list):
        kind = "null" if value is None else type(value).__name__
        raise UserError(f"{where} has {kind} in column {column!r}, not a conversation (a list of {{role, content}})")
    size = 0
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: message {i} of column {column!r} is not {{role: text, content: text}}: "
                            f"{str(message)[:80]}")
        size += len(message["content"])
    if size > max_chars:
        raise UserError(f"{where} (chat) is longer than {max_chars} characters, the limit per row that keeps memory "
                        "bounded; split it")


def chat_template(tokenizer, name: str) -> str:
    """The tokenizer's chat template; a tokenizer without one (or with several named ones and no default) is
    refused in one line."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise UserError(f"data.rows=chat: the tokenizer of {name} has no chat template to render the conversations "
                        "with; use a tokenizer that has one (its tokenizer_config.json's chat_template, or "
                        "chat_template.jinja)")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"data.rows=chat: the tokenizer of {name} is not a fast tokenizer, which locating the "
                        "assistant's tokens needs (offsets)")
    return template


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def render(tokenizer, messages: list[dict], template: str, generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)
    if not isinstance(text, str):  # some releases return a list for one conversation
        text = text[0]
    return text


def check_same_rendering(tokenizer, template: str, cache_template: str, name: str) -> None:
    """Stage two: the student's chat template renders conversations as the cache's (the teacher's) did."""
    if template == cache_template:
        return
    for probe in PROBE_CONVERSATIONS:
        if render(tokenizer, probe, template) != render(tokenizer, probe, cache_template):
            raise UserError(f"the chat template of {name} renders conversations differently from the teacher's that "
                            f"the cache was made with (sha256 {template_sha256(cache_template)[:12]}); give the "
                            "student the teacher's template")


def assistant_spans(tokenizer, messages: list[dict], template: str, text: str) -> list[tuple[int, int]]:
    """The character ranges of `text` (the whole conversation rendered) that are the assistant's turns."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], template, generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], template)
        if not (through.startswith(before) and text.startswith(through)):
            raise UserError("data.train_on=assistant: the chat template does not render the start of a conversation "
                            "as a prefix of the whole, so the assistant's turns cannot be located; use "
                            "data.train_on=all or another template")
        spans.append((len(before), len(through)))
    return spans


def encode_conversations(tokenizer, conversations: list[list[dict]], template: str,
                         train_on: TrainOn) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each conversation's (tokens [n] int32, trained [n] bool): position t is trained when token t+1 is a
    target (an assistant token, or any with train_on=all); the last position never is."""
    texts = [render(tokenizer, messages, template) for messages in conversations]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    out = []
    for messages, text, ids, offsets in zip(conversations, texts, encoded["input_ids"], encoded["offset_mapping"]):
        ids = np.asarray(ids, dtype=np.int32)
        if train_on == "all":
            target = np.ones(len(ids), dtype=bool)
        else:
            starts = np.asarray([start for start, _ in offsets], dtype=np.int64)
            target = np.zeros(len(ids), dtype=bool)
            for a, b in assistant_spans(tokenizer, messages, template, text):
                target |= (starts >= a) & (starts < b)
        trained = np.zeros(len(ids), dtype=bool)
        trained[:-1] = target[1:]
        out.append((ids, trained))
    return out


@dataclass
class ChatBlock:
    input_ids: np.ndarray  # [L] int32
    loss_mask: np.ndarray  # [L] uint8
    position_ids: np.ndarray  # [L] int32

    def arrays(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "loss_mask": self.loss_mask, "position_ids": self.position_ids}


class ChatPacker:
    """Conversations → blocks of `seq_len` (see the module's docstring); `add` and `finish` return the blocks
    completed."""

    def __init__(self, seq_len: int, pad_id: int) -> None:
        self.seq_len, self.pad_id = seq_len, pad_id
        self._ids: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self.filled = 0
        self.split_conversations = 0
        self.padding = 0

    def add(self, ids: np.ndarray, trained: np.ndarray) -> list[ChatBlock]:
        L, out = self.seq_len, []
        if len(ids) == 0:
            return out
        if len(ids) > L:
            self.split_conversations += 1
            out += self.finish()
            trained = trained.copy()
            trained[L - 1::L] = False  # a piece's last position: its next token is in the next piece
            whole = len(ids) // L * L
            for start in range(0, whole, L):
                out.append(ChatBlock(ids[start:start + L], trained[start:start + L].astype(np.uint8),
                                     np.arange(L, dtype=np.int32)))
            ids, trained = ids[whole:], trained[whole:]
            if len(ids) == 0:
                return out
        if self.filled + len(ids) > L:
            out += self.finish()
        self._ids.append(ids)
        self._mask.append(trained.astype(np.uint8))
        self._positions.append(np.arange(len(ids), dtype=np.int32))
        self.filled += len(ids)
        return out

    def finish(self) -> list[ChatBlock]:
        """The block being filled, padded (none if empty)."""
        if self.filled == 0:
            return []
        pad = self.seq_len - self.filled
        self.padding += pad
        block = ChatBlock(np.concatenate(self._ids + [np.full(pad, self.pad_id, np.int32)]),
                          np.concatenate(self._mask + [np.zeros(pad, np.uint8)]),
                          np.concatenate(self._positions + [np.arange(pad, dtype=np.int32)]))
        self._ids, self._mask, self._positions, self.filled = [], [], [], 0
        return [block]


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return 0


class ChatBlockStream:
    """The blocks of a split of conversations, read lazily, as `common.data.BlockStream` (the same attributes
    once iterated) but each block a dict of `input_ids`, `loss_mask` and `position_ids`. `trained` counts the
    trained positions, `conversations` the conversations read, `split_conversations` those longer than a block."""

    def __init__(self, data: DataConfig, tokenizer, tokenizer_hash: str, split: str | None = None,
                 template_owner: str = "the teacher") -> None:
        self.data, self.tokenizer, self.split = data, tokenizer, split or data.split
        self.template = chat_template(tokenizer, template_owner)
        self.source = TextSource(data, self.split)
        self._fingerprint = Fingerprint(tokenizer_hash, data.seq_len)
        self.num_blocks = self.stream_tokens = self.trained = self.conversations = self.split_conversations = 0
        self.fingerprint: str | None = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        packer = ChatPacker(self.data.seq_len, pad_id(self.tokenizer))
        cap = self.data.max_blocks
        pending: list[list[dict]] = []

        def emit(blocks: list[ChatBlock]) -> Iterator[dict[str, np.ndarray]]:
            for block in blocks:
                if cap is not None and self.num_blocks >= cap:
                    return
                self._fingerprint.update(block.input_ids)
                self.num_blocks += 1
                self.trained += int(block.loss_mask.sum())
                yield block.arrays()

        def flush() -> Iterator[dict[str, np.ndarray]]:
            for ids, trained in encode_conversations(self.tokenizer, pending, self.template, self.data.train_on):
                self.stream_tokens += len(ids)
                self.conversations += 1
                yield from emit(packer.add(ids, trained))
                if cap is not None and self.num_blocks >= cap:
                    return
            pending.clear()

        for conversation in self.source:
            pending.append(conversation)
            if len(pending) == CHAT_BATCH:
                yield from flush()
                if cap is not None and self.num_blocks >= cap:
                    break
        else:
            yield from flush()
            yield from emit(packer.finish())
        self.split_conversations = packer.split_conversations
        if self.num_blocks == 0:
            raise UserError(f"{self.source.description} has no tokens to make a block of")
        self.fingerprint = self._fingerprint.hexdigest()


def block_stream(data: DataConfig, tokenizer, tokenizer_hash: str, split: str | None = None):
    """The blocks of `split`: `ChatBlockStream` for data.rows=chat, else `common.data.BlockStream`."""
    from common.data import BlockStream, row_kind

    if row_kind(data) == "chat":
        return ChatBlockStream(data, tokenizer, tokenizer_hash, split)
    return BlockStream(data, tokenizer, tokenizer_hash, split)
