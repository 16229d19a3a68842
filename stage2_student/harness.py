"""lm-evaluation-harness's `wikitext` task (lm_eval 0.4.13), re-implemented: the same documents, the same
windows, the same arithmetic, without the harness's dependencies (scikit-learn, sacrebleu, peft, …).
`tests/test_harness.py` checks every piece against the harness's own functions and its `HFLM` model.

- Documents: `EleutherAI/wikitext_document_level` cuts `wiki.{split}.raw` into articles: the file's lines
  (split at "\\n"), a new page at each level-one title line `= Title =` (after "= = =" → "===" and "= =" →
  "==", so section titles are not level one); a page holding only whitespace is dropped, except the last.
- What is scored: `wikitext_detokenizer(page)` (the task's `doc_to_target`), tokenized as the harness's
  `HFLM.tok_encode` does (the tokenizer's own special tokens, none if the text starts with the prefix token's
  text), each document on its own.
- How: `get_rolling_token_windows(tokens, prefix_token, max_seq_len, context_len=1)` made disjoint, as
  `HFLM.loglikelihood_rolling`: windows of at most max_seq_len tokens, the first predicted from the prefix
  token (BOS, else EOS), each later one predicting the next max_seq_len tokens from the tokens before them
  (the last window takes as much earlier context as fits). Log-probabilities are a log_softmax over every
  logit the model computes, as the harness's (padding rows of the embedding included).
- Metrics (`process_results` and the `weighted_perplexity` / `bits_per_byte` aggregations): the words of a
  page are `re.split(r"\\s+", page)` and its bytes its UTF-8, both of the original page, not the
  detokenized text; word perplexity = exp(−Σ log-likelihood / Σ words), byte perplexity = exp(−Σ ll / Σ
  bytes), bits per byte = −Σ ll / Σ bytes / ln 2, summed over documents.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from common.cli import UserError
from common.config import DataConfig
from common.data import TextSource

DEFAULT_MAX_LENGTH = 2048  # the harness's default context, and this project's cap on eval.max_length
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length
CONTEXT_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx")  # the harness's order


def wikitext_pages(text: str) -> list[str]:
    """The articles of a `wiki.*.raw` text, as `EleutherAI/wikitext_document_level` builds its `page` column."""
    pages, lines = [], []
    for line in text.split("\n"):
        title = line.replace("= = =", "===").replace("= =", "==").strip()
        if title.startswith("= ") and title.strip().endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))  # the last page, unconditionally, as the dataset script does
    return pages


def wikitext_detokenizer(string: str) -> str:
    """The harness's `preprocess_wikitext.wikitext_detokenizer`, on the page's text."""
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def word_count(page: str) -> int:
    """`process_results`' words: `re.split(r"\\s+", page)`, empty ends included."""
    return len(re.split(r"\s+", page))


def byte_count(page: str) -> int:
    return len(page.encode("utf-8"))


@dataclass(frozen=True)
class Document:
    """One scored document: `text` is what the model reads, `page` what words and bytes are counted on."""
    page: str
    text: str

    @property
    def words(self) -> int:
        return word_count(self.page)

    @property
    def bytes(self) -> int:
        return byte_count(self.page)


def wikitext_documents(text: str) -> list[Document]:
    return [Document(page, wikitext_detokenizer(page)) for page in wikitext_pages(text)]


def is_wikitext(data: DataConfig) -> bool:
    """WikiText's own files: data.local_dir (the upstream layout) or the hub's wikitext dataset."""
    return data.files is None and (data.local_dir is not None or data.dataset.split("/")[-1].lower() == "wikitext")


def load_documents(data: DataConfig, split: str, limit: int | None = None) -> tuple[list[Document], str]:
    """The documents of a split and how they were cut, in words. `documents` rows (`.jsonl`, `.parquet`):
    each row that is not blank, as it is. `lines`: the text cut into articles at WikiText's level-one titles
    (a text without any is one document), detokenized for WikiText itself (data.local_dir, the hub's
    wikitext), as they are otherwise (`.txt` files)."""
    source = TextSource(data, split)
    if source.rows == "documents":
        documents = [Document(row, row) for row in source if row.strip()]
        how = f"{len(documents)} documents, the rows of {source.description}"
    else:
        if data.files is None and data.local_dir is not None:  # the file as the dataset script reads it
            with open(source.files[0].path, encoding="utf-8") as fh:
                text = fh.read()
        else:  # the hub's wikitext has each blank line (" ") as ""; .txt rows are the lines as they are
            wikitext = is_wikitext(data)
            text = "".join(row if row or not wikitext else " \n" for row in source)
        if is_wikitext(data):
            documents = wikitext_documents(text)
            how = f"{len(documents)} WikiText articles of {source.description}, detokenized"
        else:
            documents = [Document(page, page) for page in wikitext_pages(text)]
            how = f"{len(documents)} documents (cut at `= Title =` lines) of {source.description}"
    if limit is not None:
        documents = documents[:limit]
        how += f", the first {len(documents)} scored"
    if not any(doc.text for doc in documents):
        raise UserError(f"{source.description} has no document to score"
                        + (f" in its first {limit} (eval.max_windows)" if limit is not None else ""))
    return documents, how


# --- tokens and windows -----------------------------------------------------------------------------------

def prefix_token_id(tokenizer) -> int:
    """What the first token of a document is predicted from: BOS, else EOS (`HFLM.prefix_token_id`)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a BOS nor an EOS token, "
                        "which eval.protocol=lm-eval predicts each document's first token from")
    return token


def encode(tokenizer, text: str, prefix: int) -> list[int]:
    """`HFLM.tok_encode(text)`: the tokenizer's default special tokens, none if `text` starts with the prefix
    token's text."""
    special = {"add_special_tokens": False} if text.startswith(tokenizer.decode(prefix)) else {}
    return tokenizer.encode(text, **special)


@dataclass(frozen=True)
class RollingWindow:
    """Model input `sequence[begin:end]` of the document's tokens with the prefix token in front
    (`sequence = [prefix] + tokens`); it predicts `sequence[begin+1:end+1]`, of which the last `scored`
    are new (counted here)."""
    begin: int
    end: int
    scored: int


def rolling_windows(num_tokens: int, max_length: int) -> list[RollingWindow]:
    """`get_rolling_token_windows(tokens, prefix, max_length, context_len=1)` through `make_disjoint_window`
    and `HFLM`'s left truncation to max_length + 1 tokens: each token predicted once."""
    if num_tokens == 0:
        return []
    first = min(max_length, num_tokens)
    windows, predicted = [RollingWindow(0, first, first)], first
    while predicted < num_tokens:
        scored = min(num_tokens - predicted, max_length)
        end = predicted + scored
        windows.append(RollingWindow(end - max_length, end, scored))
        predicted = end
    return windows


def context_length(config, tokenizer) -> int:
    """The model's context as the harness's `resolve_max_length` finds it (config attributes, the text
    config first, then the tokenizer's model_max_length, else 2048)."""
    cfg = getattr(config, "text_config", None) or config
    for name in CONTEXT_ATTRIBUTES:
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != TOKENIZER_INFINITY:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def max_length_for(config, tokenizer, configured: int | None, model: str) -> int:
    """eval.max_length, or the model's context capped at 2048; never past the model's context."""
    context = context_length(config, tokenizer)
    if configured is None:
        return min(context, DEFAULT_MAX_LENGTH)
    if configured > context:
        raise UserError(f"eval.max_length={configured} is longer than the context of {model} ({context} tokens)")
    return configured


# --- the metrics -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HarnessMetrics:
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float


def harness_metrics(loglikelihood: float, words: int, num_bytes: int) -> HarnessMetrics:
    """The aggregations over all documents: Σ log-likelihood (nats, ≤ 0), Σ words, Σ bytes."""
    return HarnessMetrics(math.exp(-loglikelihood / words), math.exp(-loglikelihood / num_bytes),
                          -loglikelihood / num_bytes / math.log(2))
