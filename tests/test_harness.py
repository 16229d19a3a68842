"""`eval.protocol=lm-eval` (stage2_student/harness.py) against hand-made cases, and against lm-evaluation-harness
itself: its rolling windows, its wikitext detokenizer and `process_results`, its metric aggregations and its
`HFLM` model class, on the tiny model and on real WikiText-2 with the Qwen2 tokenizer. The harness tests skip
when `lm_eval` is not installed (`pip install "lm_eval[hf]==0.4.13"`; `.ci/run` installs it)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from stage2_student.evaluate import main as evaluate_main
from stage2_student.harness import (
    byte_count,
    context_length,
    rolling_windows,
    wikitext_detokenizer,
    wikitext_pages,
    word_count,
)
from tests.conftest import REPO, tiny_overrides

try:
    import lm_eval
except ImportError:
    lm_eval = None
needs_harness = pytest.mark.skipif(lm_eval is None, reason="lm_eval is not installed: the comparison with "
                                   "lm-evaluation-harness needs `pip install \"lm_eval[hf]==0.4.13\"` (CI installs it)")
REAL_WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-v1"
QWEN2_TOKENIZER = REPO.parent / "shared" / "data" / "qwen2-tokenizer"
RELATIVE = 1e-4  # the acceptance bound: our numbers equal the harness's within this


def test_pages_are_cut_at_level_one_titles():
    """A blank start is no page; `= = S = =` is a section, not an article; the last page keeps the final newline."""
    text = " \n = A = \n \n a b \n \n = = S = = \n \n c \n = B = \n d \n"
    assert wikitext_pages(text) == [" = A = \n \n a b \n \n = = S = = \n \n c ", " = B = \n d \n"]
    assert wikitext_pages("no title at all\n") == ["no title at all\n"]


def test_words_and_bytes_of_the_original_page():
    assert word_count(" = B = \n d \n") == 6  # ['', '=', 'B', '=', 'd', '']: the harness counts the empty ends
    assert byte_count("café") == 5
    assert wikitext_detokenizer(" = B = \n 1 @,@ 000 people , it 's \n") == " = B =\n1,000 people, it's\n"


@pytest.mark.parametrize("num_tokens, length", [(0, 8), (1, 8), (8, 8), (9, 8), (17, 8), (300, 64), (5, 1)])
def test_rolling_windows_predict_every_token_once(num_tokens, length):
    scored = [0] * num_tokens
    windows = rolling_windows(num_tokens, length)
    for w in windows:
        assert 0 <= w.begin < w.end <= num_tokens and w.end - w.begin <= length and 1 <= w.scored <= w.end - w.begin
        for position in range(w.end - w.scored, w.end):  # input position i predicts token i (after the prefix)
            scored[position] += 1
    assert scored == [1] * num_tokens
    assert all(w.end - w.begin == length for w in windows[1:])  # later windows take a full context


# --- the harness's own functions ------------------------------------------------------------------------------

def harness_wikitext():
    """The harness's `preprocess_wikitext` module (its task folder is not a package)."""
    path = Path(lm_eval.__file__).parent / "tasks" / "wikitext" / "preprocess_wikitext.py"
    spec = importlib.util.spec_from_file_location("preprocess_wikitext", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def document_level_pages(path: Path) -> list[str]:
    """`EleutherAI/wikitext_document_level`'s `_generate_examples`, as published with the harness (v0.3's
    lm_eval/datasets/wikitext/wikitext.py), written out here independently of stage2_student/harness.py."""
    with open(path, encoding="utf-8") as fh:
        data = fh.read().split("\n")
    pages, current = [], []
    for line in data:
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.strip().endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


@needs_harness
def test_rolling_windows_are_the_harness_windows():
    """get_rolling_token_windows(context_len=1) → make_disjoint_window → HFLM's input (ctx + cont)[-(L+1):][:-1]."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    prefix = 7
    for num_tokens in (0, 1, 5, 63, 64, 65, 127, 128, 129, 300):
        for length in (1, 2, 7, 64):
            tokens = list(range(100, 100 + num_tokens))
            harness = []
            for context, continuation in map(make_disjoint_window,
                                             get_rolling_token_windows(tokens, prefix, length, 1)):
                harness.append(((context + continuation)[-(length + 1):][:-1], continuation))
            sequence = [prefix] + tokens
            ours = [(sequence[w.begin:w.end], sequence[w.begin + 1:w.end + 1][-w.scored:])
                    for w in rolling_windows(num_tokens, length)]
            assert ours == harness, (num_tokens, length)


@needs_harness
def test_detokenizer_and_counts_are_the_harness_ones(tiny):
    module = harness_wikitext()
    files = [tiny / "data" / "wiki.test.raw"] + ([REAL_WIKITEXT / "wiki.test.raw"] if REAL_WIKITEXT.is_dir() else [])
    for path in files:
        pages = document_level_pages(path)
        assert wikitext_pages(path.read_text(encoding="utf-8")) == pages
        for page in pages:
            doc = {"page": page}
            assert wikitext_detokenizer(page) == module.wikitext_detokenizer(doc)
            counts = module.process_results(doc, [-1.0])
            assert counts["word_perplexity"] == (-1.0, word_count(page))
            assert counts["bits_per_byte"] == (-1.0, byte_count(page))


def harness_scores(model_dir: Path, pages: list[str], max_length: int | None, batch_size: int = 4) -> dict:
    """The harness's numbers: HFLM's rolling log-likelihood of each detokenized page, the task's
    process_results, the metrics' aggregations."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.models.huggingface import HFLM

    module = harness_wikitext()
    options = {} if max_length is None else {"max_length": max_length}
    lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=batch_size, **options)
    docs = [{"page": page} for page in pages]
    requests = [Instance("loglikelihood_rolling", doc, (module.wikitext_detokenizer(doc),), i)
                for i, doc in enumerate(docs)]
    results = [module.process_results(doc, [ll])
               for doc, ll in zip(docs, lm.loglikelihood_rolling(requests, disable_tqdm=True))]
    return {"word_perplexity": weighted_perplexity([r["word_perplexity"] for r in results]),
            "byte_perplexity": weighted_perplexity([r["byte_perplexity"] for r in results]),
            "bits_per_byte": bits_per_byte([r["bits_per_byte"] for r in results]),
            "max_length": lm.max_length}


def assert_same_as_harness(ours: dict, harness: dict, what: str) -> None:
    differences = {key: abs(ours[key] - harness[key]) / harness[key]
                   for key in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    print(f"{what}: relative differences to lm_eval {differences}")
    assert ours["max_length"] == harness["max_length"]
    assert all(d < RELATIVE for d in differences.values()), (ours, harness)


@needs_harness
@pytest.mark.parametrize("max_length", [64, None])  # None: the model's context (512)
def test_evaluate_equals_the_harness_on_the_tiny_model(tiny, tmp_path, max_length):
    """Twelve articles of the tiny test split; windows of 64 tokens make several per article. The tiny teacher
    pads its vocabulary (1088 logits for 1000 tokens): the harness normalizes over all of them, and so do we."""
    output = tmp_path / "eval.json"
    evaluate_main(["--model", str(tiny / "teacher"),
                   *tiny_overrides(tiny, tmp_path / "unused", **{"eval.split": "test", "eval.max_windows": 12,
                                                                  "eval.max_length": max_length,
                                                                  "eval.batch_size": 4, "eval.output": output})])
    ours = json.loads(output.read_text())["results"][0]
    assert ours["documents"] == 12 and (max_length is None or ours["windows"] > 12)
    pages = document_level_pages(tiny / "data" / "wiki.test.raw")[:12]
    assert_same_as_harness(ours, harness_scores(tiny / "teacher", pages, max_length), f"tiny, max_length {max_length}")


@needs_harness
@pytest.mark.skipif(not (REAL_WIKITEXT.is_dir() and QWEN2_TOKENIZER.is_dir()),
                    reason="needs shared/data/wikitext-2-raw-v1 and shared/data/qwen2-tokenizer next to the repository")
def test_evaluate_equals_the_harness_on_real_wikitext_with_qwen2s_tokenizer(tmp_path):
    """The first two articles of WikiText-2's test split, a small randomly initialized Qwen2 with the real Qwen2
    tokenizer (no BOS: documents start from EOS) and Qwen2's padded vocabulary (151,936 logits for 151,646
    tokens), its context of 256 tokens the default max_length on both sides."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)
    config = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    model_dir = tmp_path / "qwen2-small"
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lines = (REAL_WIKITEXT / "wiki.test.raw").read_text(encoding="utf-8").split("\n")
    titles = [i for i, line in enumerate(lines) if re.fullmatch(r" = [^=].* = ", line)]
    data = tmp_path / "wikitext"
    data.mkdir()
    (data / "wiki.test.raw").write_text("\n".join(lines[: titles[2]]) + "\n", encoding="utf-8")
    output = tmp_path / "eval.json"
    evaluate_main(["--model", str(model_dir), "data.local_dir=" + str(data), "eval.split=test", "eval.batch_size=4",
                   f"eval.output={output}"])
    ours = json.loads(output.read_text())["results"][0]
    assert ours["documents"] == 2 and ours["max_length"] == context_length(config, tokenizer) == 256
    pages = document_level_pages(data / "wiki.test.raw")
    assert_same_as_harness(ours, harness_scores(model_dir, pages, None), "WikiText-2 test, 2 articles, Qwen2")
