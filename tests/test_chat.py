"""Conversations (data.rows=chat) on the tiny world: the assistant's positions, packing that never lets two
conversations see each other (teacher and student), a cache that stores the trained positions only, and the loss
as the mean over the trained positions of the global batch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cache.manifest import load_manifest
from cache.reader import CacheReader
from common.chat import ChatPacker, chat_template, encode_conversations
from common.cli import UserError
from common.config import load_config
from stage1_teacher.dump import main as dump_main
from stage2_student.batches import collate_cached
from stage2_student.train import DistillRecipe, main as train_main
from tests.chat_world import (
    CHATML,
    OTHER_TEMPLATE,
    chat_models,
    chat_overrides,
    conversations,
    with_template,
    write_jsonl,
)


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chat")
    models = chat_models(tiny, root / "models")
    rows = conversations(tiny, 64, seed=1)
    corpus = write_jsonl(root / "chat.jsonl", rows)
    cache = root / "cache"
    dump_main(chat_overrides(tiny, models, corpus, cache))
    return {"root": root, "models": models, "rows": rows, "corpus": corpus, "cache": cache}


def segments(positions: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each conversation (or padding) in a block, from its position ids."""
    starts = list(np.flatnonzero(positions == 0)) + [len(positions)]
    return list(zip(starts[:-1], starts[1:]))


def test_assistant_positions_are_those_before_the_assistant_tokens(tiny, world):
    tokenizer = AutoTokenizer.from_pretrained(world["models"][0])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "where is the inn"},
                {"role": "assistant", "content": "by the river"}, {"role": "user", "content": "and the church"},
                {"role": "assistant", "content": "on the hill"}]
    (ids, trained), = encode_conversations(tokenizer, [messages], chat_template(tokenizer, "t"), "assistant")
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    targets = tokenizer.decode(ids[1:][trained[:-1]])
    assert targets == "by the river<|im_end|>\non the hill<|im_end|>\n"  # the answers and their end of turn
    assert not trained[-1]
    (ids_all, trained_all), = encode_conversations(tokenizer, [messages], chat_template(tokenizer, "t"), "all")
    assert np.array_equal(ids_all, ids) and trained_all[:-1].all() and not trained_all[-1]


def test_packing_never_splits_a_conversation_unless_longer_than_a_block():
    packer = ChatPacker(seq_len=8, pad_id=99)
    conv = [np.arange(n, dtype=np.int32) + 10 * i for i, n in enumerate([3, 4, 2, 19, 5], start=1)]
    blocks = []
    for ids in conv:
        blocks += packer.add(ids, np.ones(len(ids), bool) & (np.arange(len(ids)) < len(ids) - 1))
    blocks += packer.finish()
    got = [(b.input_ids.tolist(), b.position_ids.tolist(), b.loss_mask.tolist()) for b in blocks]
    assert got[0] == ([10, 11, 12, 20, 21, 22, 23, 99], [0, 1, 2, 0, 1, 2, 3, 0], [1, 1, 0, 1, 1, 1, 0, 0])
    assert got[1] == ([30, 31, 99, 99, 99, 99, 99, 99], [0, 1, 0, 1, 2, 3, 4, 5], [1, 0, 0, 0, 0, 0, 0, 0])
    # 19 tokens: two whole blocks of their own (each piece's last position untrained), the remainder packs on
    assert got[2] == (list(range(40, 48)), list(range(8)), [1] * 7 + [0])
    assert got[3] == (list(range(48, 56)), list(range(8)), [1] * 7 + [0])
    assert got[4] == ([56, 57, 58, 50, 51, 52, 53, 54], [0, 1, 2, 0, 1, 2, 3, 4], [1, 1, 0, 1, 1, 1, 1, 0])
    assert len(got) == 5 and packer.split_conversations == 1


def test_a_tokenizer_without_chat_template_is_refused(tiny, world, tmp_path):
    teacher = with_template(tiny / "teacher", tmp_path / "plain", template=None)
    with pytest.raises(UserError, match="has no chat template") as err:
        dump_main(chat_overrides(tiny, (teacher, world["models"][1]), world["corpus"], tmp_path / "c"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()


def test_cache_holds_mask_positions_and_the_teacher_of_each_conversation_alone(tiny, world):
    reader = CacheReader(str(world["cache"]))
    manifest = reader.manifest
    assert manifest.dataset.rows == "chat" and manifest.dataset.train_on == "assistant"
    assert manifest.dataset.chat_template == CHATML and manifest.dataset.messages_column == "messages"
    teacher = AutoModelForCausalLM.from_pretrained(world["models"][0], dtype=torch.float32).eval()
    vocab = reader.vocab_size
    checked = 0
    for index in range(3):
        block = reader.block(index)
        assert set(block) == {"input_ids", "topk_ids", "topk_logprobs", "loss_mask", "position_ids"}
        ids, mask, positions = (torch.from_numpy(block[n]).long() for n in ("input_ids", "loss_mask", "position_ids"))
        with torch.no_grad():
            packed = teacher(input_ids=ids[None], position_ids=positions[None],
                             use_cache=False).logits[0, :, :vocab]
            for a, b in segments(block["position_ids"]):
                alone = teacher(input_ids=ids[None, a:b]).logits[0, :, :vocab]
                torch.testing.assert_close(packed[a:b], alone, rtol=1e-5, atol=1e-5)  # attends only to itself
                checked += 1
        logprobs = torch.log_softmax(packed.float(), -1)
        trained = mask.bool()
        cached_ids = torch.from_numpy(block["topk_ids"]).long()
        expected = logprobs.gather(1, cached_ids)[trained]
        torch.testing.assert_close(torch.from_numpy(block["topk_logprobs"]).float()[trained], expected,
                                   rtol=2e-3, atol=2e-3)
        assert torch.equal(torch.topk(logprobs[trained], 1).indices[:, 0], cached_ids[trained][:, 0])
        assert not block["topk_ids"][~block["loss_mask"].astype(bool)].any()  # placeholders: id 0, log-prob 0
        assert not block["topk_logprobs"][~block["loss_mask"].astype(bool)].any()
    assert checked > 3


def test_chat_cache_is_smaller_than_caching_every_position(tiny, world, tmp_path):
    """Questions as long as answers: the assistant-only cache against the same blocks with every position of the
    conversations kept (train_on=all). One shard each, of the default k: the HDF5 files' own overhead (some
    17 KB a shard) would otherwise hide the data's size."""
    sizes = {}
    for train_on in ("assistant", "all"):
        cache = tmp_path / train_on
        dump_main(chat_overrides(tiny, world["models"], world["corpus"], cache, **{
            "data.train_on": train_on, "cache.shard_blocks": 512, "cache.k": 64}))
        manifest = load_manifest(str(cache))
        sizes[train_on] = manifest.bytes_on_disk
    ratio = sizes["all"] / sizes["assistant"]
    print(f"chat cache: {sizes['assistant']} B assistant-only, {sizes['all']} B every position: {ratio:.2f}x")
    assert ratio >= 2.0


def _recipe(tiny, world, tmp: Path, **extra) -> DistillRecipe:
    cfg = load_config(None, chat_overrides(tiny, world["models"], world["corpus"], world["cache"], **{
        "train.output_dir": tmp / "out", "train.log_dir": tmp / "logs", **extra}))
    return DistillRecipe(cfg, str(world["cache"]))


def test_student_loss_on_a_packed_block_is_the_sum_of_each_conversation_alone(tiny, world, tmp_path):
    with _recipe(tiny, world, tmp_path, **{"train.hard_weight": 0.5}) as recipe:
        recipe.setup()
        block = next(b for b in map(recipe.reader.block, range(len(recipe.reader)))
                     if len(segments(b["position_ids"])) >= 3)  # conversations (and padding) packed
        adaptor = recipe.distiller.adaptor_S

        def loss(items: list[dict]) -> torch.Tensor:
            batch = collate_cached(items)
            adaptor.weights = batch["loss_mask"].float()  # a sum over the trained positions
            with torch.no_grad():
                total, _ = recipe.distiller.train_on_batch(batch, {})
            return total

        packed = loss([block])
        parts = [loss([{name: values[a:b] for name, values in block.items()}])
                 for a, b in segments(block["position_ids"])]
    assert len(parts) > 1
    torch.testing.assert_close(packed, sum(parts), rtol=1e-5, atol=1e-5)


def _metrics(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]


def test_the_loss_is_the_mean_over_the_global_batch_under_accumulation(tiny, world, tmp_path):
    """Two blocks per step as one micro-batch of two or two micro-batches of one: the same steps."""
    runs = {}
    for name, batch, accumulation in (("one", 2, 1), ("two", 1, 2)):
        out = tmp_path / name
        train_main(["--cache", str(world["cache"]), *chat_overrides(tiny, world["models"], world["corpus"],
                                                                    world["cache"], **{
            "train.output_dir": out / "out", "train.log_dir": out / "logs", "train.max_steps": 2,
            "train.batch_size": batch, "train.gradient_accumulation": accumulation, "train.hard_weight": 0.5})])
        runs[name] = _metrics(out)
    for one, two in zip(runs["one"], runs["two"]):
        assert one["trained_positions"] == two["trained_positions"] > 0
        for key in ("loss", "kd_loss", "hard_loss"):
            assert one[key] == pytest.approx(two[key], rel=1e-4)


def test_a_student_template_that_renders_differently_is_refused(tiny, world, tmp_path):
    other = with_template(tiny / "student", tmp_path / "other", template=OTHER_TEMPLATE)
    cfg = load_config(None, chat_overrides(tiny, (world["models"][0], other), world["corpus"], world["cache"], **{
        "train.output_dir": tmp_path / "out", "train.log_dir": tmp_path / "logs"}))
    with DistillRecipe(cfg, str(world["cache"])) as recipe, pytest.raises(UserError, match="renders conversations"):
        recipe.setup()


@pytest.mark.parametrize("row, message", [
    ({"messages": "hello"}, "has str in column 'messages', not a conversation"),
    ({"messages": [{"role": "user"}]}, "message 0 of column 'messages' is not {role: text, content: text}"),
    ({"text": "no conversation"}, "has null in column 'messages'"),
])
def test_rows_that_are_not_conversations_are_refused_in_one_line(tmp_path, row, message):
    from common.data import iter_rows

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + json.dumps(row) + "\n")
    cfg = load_config(None, [f"data.files={path}", "data.rows=chat"])
    with pytest.raises(UserError, match="row 1") as err:
        list(iter_rows(cfg.data, "train"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_manifest_ties_the_chat_datasets_to_chat_rows(world):
    from cache.manifest import Manifest

    data = json.loads((world["cache"] / "manifest.json").read_text())
    data["dataset"]["rows"] = "documents"
    with pytest.raises(UserError, match="loss_mask, position_ids are present exactly when dataset.rows is chat"):
        Manifest.from_json(json.dumps(data))
    data = json.loads((world["cache"] / "manifest.json").read_text())
    del data["dataset"]["chat_template"]
    with pytest.raises(UserError, match="a chat cache records train_on, chat_template"):
        Manifest.from_json(json.dumps(data))


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_same_global_batch(tiny, world, tmp_path):
    """torchrun, 2 CPU processes (gloo) of 1 block per micro-batch against 1 process of 2: the global batch's trained
    positions are counted across the processes, so every step's loss and the final weights are the same."""
    from tests.test_stage2_ddp import STEPS, assert_same_as_one_process, launch

    def args(out: Path, batch: int) -> list[str]:
        settings = {"train.output_dir": out, "train.log_dir": out.parent / "logs", "train.max_steps": STEPS,
                    "train.hard_weight": 0.5, "train.batch_size": batch}
        return ["--cache", str(world["cache"]),
                *chat_overrides(tiny, world["models"], world["corpus"], world["cache"], **settings)]

    one, two = tmp_path / "one" / "out", tmp_path / "two" / "out"
    train_main(args(one, 2))
    result = launch("torchrun", "stage2_student.train", *args(two, 1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_as_one_process(result, two, one)
    mine, theirs = (_metrics(out.parent) for out in (two, one))
    assert [r["trained_positions"] for r in mine] == [r["trained_positions"] for r in theirs]
    assert all(r["trained_positions"] > 0 for r in mine)


@pytest.mark.slow
def test_a_killed_chat_dump_resumes_to_the_same_cache(tiny, world, tmp_path, capsys):
    """Stage one killed on conversations once two shards are complete; the same command again finishes the cache
    byte for byte as the uninterrupted dump (every shard's sha256 and the manifest)."""
    from tests.test_stage1_durability import dump_cli, fingerprint, staging_of

    cache = tmp_path / "cache"
    args = chat_overrides(tiny, world["models"], world["corpus"], cache)
    shards = len(fingerprint(world["cache"])[1])
    assert shards > 3
    killed = dump_cli(*args, hook="exit@shard-1")
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not cache.exists() and len(list(staging_of(cache).glob("shard-*.h5"))) == 2
    dump_main(args)
    assert f"[stage1] resuming: 2 of {shards} shards complete" in capsys.readouterr().out
    assert fingerprint(cache) == fingerprint(world["cache"])
    assert not staging_of(cache).exists()
