"""The tiny offline default: a synthetic WikiText-style corpus, a tokenizer, a trained teacher, a student.

`python -m common.tiny [--out tiny] [--force]` builds, deterministically (byte-identical files) and in about
a minute on two idle CPU cores, everything the pipeline needs to run end to end with no GPU and no hub:

    <out>/data/wiki.{train,valid,test}.raw   a made-up encyclopedia in the WikiText-2 raw layout
    <out>/teacher                            Qwen2ForCausalLM, 4 layers, briefly trained on the train split
    <out>/student                            Qwen2ForCausalLM, 2 layers, random init (stage two trains it)
    <out>/READY.json                         written last: the build is complete

The corpus describes a fixed world (regions, rivers, towns, people, species with fixed attributes) through a
small template grammar, so facts recur across articles and phrasings and a small model can learn them; some
random filler keeps it from being fully predictable. Both models share one byte-level BPE tokenizer (Qwen2's
pre-tokenizer, 1000 tokens, trained on the train split) but, as Qwen2-7B (152,064) and Qwen2-1.5B (151,936)
versus their tokenizer (151,646), have padded vocabularies that differ from each other and exceed the
tokenizer's, so the pipeline's vocabulary handling is exercised.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from string import Formatter
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from common.cli import UserError, run_main
from common.config import DataConfig
from common.data import hub_rows, load_rows, pack_blocks, tokenize_stream

if TYPE_CHECKING:
    from transformers import Qwen2Config, Qwen2Tokenizer

SEED = 1234
EOS = "<|endoftext|>"
VOCAB_SIZE = 1000  # BPE target, special token included
SEQ_LEN = 128
MAX_POSITIONS = 512
TEACHER_STEPS, TEACHER_BATCH, TEACHER_LR, WARMUP = 600, 16, 3e-3, 30
READY = "READY.json"
LAYOUT = {"data", "teacher", "student", READY}  # what a build of ours leaves in <out>
SPLIT_FILES = {"train": "wiki.train.raw", "valid": "wiki.valid.raw", "test": "wiki.test.raw"}
PRETRAIN = "pretrain"  # the teacher's training text: same world, its own draw of phrasings and filler

# --- the world: fixed entities and facts -------------------------------------------------------------------

ONSETS = "b br c d dr f g gl h k l m n p r s st t th v w".split()
VOWELS = "a e i o u ae ai ou".split()
CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk"]
TOWN_SUFFIXES = "ford bury wick ton holm by stead mouth".split()
PROFESSIONS = "painter poet engineer merchant botanist architect composer physician sailor mapmaker".split()
INDUSTRIES = "wool salt pottery timber fishing glass copper cheese rope paper wine iron".split()
COLOURS = "red blue green white black yellow purple grey".split()
CLIMATES, TERRAINS = "dry wet cold mild windy".split(), "hills plains marshes forests mountains".split()
KINDS = {"bird": "heron finch owl swift plover", "fish": "carp pike trout eel", "frog": "frog toad newt",
         "tree": "oak willow alder pine", "flower": "lily orchid rush"}
MODIFIERS = "silver spotted marsh lesser greater crested golden hill striped dwarf northern pale".split()
DIETS = "insects seeds snails worms berries".split() + ["small fish"]
MONTHS = "March April May June July August September".split()
WORKS = ("Silent Quiet Last Northern Winter Broken Golden".split(),
         "Harbour Garden Bridge Voyage Tower Map Song".split())


def _name(rng: random.Random, used: set[str], syllables: int, suffixes: Sequence[str] = ("",)) -> str:
    """A made-up name no other entity has."""
    while True:
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
        name = (name + rng.choice(suffixes)).capitalize()
        if name not in used:
            used.add(name)
            return name


def _person(rng: random.Random, used: set[str], born: int, home: str) -> dict[str, Any]:
    return {"name": f"{_name(rng, used, 2)} {_name(rng, used, 2)}", "he": rng.choice(["he", "she"]),
            "prof": rng.choice(PROFESSIONS), "born": born, "died": born + rng.randrange(40, 88), "home": home,
            "title": f"The {rng.choice(WORKS[0])} {rng.choice(WORKS[1])}"}


def build_world(seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """Every entity and its fixed attributes; articles only ever render these."""
    rng, used = random.Random(seed), set()
    regions = [{"name": _name(rng, used, 2), "climate": rng.choice(CLIMATES), "terrain": rng.choice(TERRAINS)}
               for _ in range(12)]
    seas = [f"the {_name(rng, used, 2)} Sea" for _ in range(3)]
    rivers: list[dict[str, Any]] = []
    for _ in range(48):  # a river flows into a sea or into an earlier river of its region
        region = rng.choice(regions)
        earlier = [r for r in rivers if r["region"] is region]
        rivers.append({"name": _name(rng, used, 2), "region": region, "length": rng.randrange(40, 900, 5),
                       "into": rng.choice(earlier + [None] * 2), "sea": rng.choice(seas)})
    towns, people = [], []
    for _ in range(170):
        river, year = rng.choice(rivers), rng.randrange(700, 1700)
        founder = _person(rng, used, year - rng.randrange(25, 40), river["region"]["name"])
        towns.append({"name": _name(rng, used, 1, TOWN_SUFFIXES), "river": river, "year": year,
                      "founder": founder, "industry": rng.choice(INDUSTRIES), "colour": rng.choice(COLOURS),
                      "bank": rng.choice(["north", "south", "east", "west"]), "pop": rng.randrange(300, 60000),
                      "hall": year + rng.randrange(10, 300)})
        people.append(dict(founder, founded=towns[-1]))
    for _ in range(80):  # notable natives of the towns, some taught by an older person of their profession
        town = rng.choice(towns)
        person = _person(rng, used, town["year"] + rng.randrange(20, 300), town["name"])
        teachers = [p for p in people if p["prof"] == person["prof"] and 15 < person["born"] - p["born"] < 60]
        people.append(dict(person, work=rng.choice(towns)["name"], mentor=teachers[0]["name"] if teachers else None))
    kinds = [(kind, noun) for kind, nouns in KINDS.items() for noun in nouns.split()]
    species = [{"name": f"{m} {noun}", "kind": kind, "river": rng.choice(rivers), "size": rng.randrange(5, 90),
                "colour": rng.choice(COLOURS), "month": rng.choice(MONTHS), "diet": rng.choice(DIETS)}
               for m, kind, noun in rng.sample([(m, k, n) for m in MODIFIERS for k, n in kinds], 80)]
    return {"region": regions, "river": rivers, "town": towns, "person": people, "species": species}


def _wiki_number(n: int) -> str:
    return f"{n:,}".replace(",", " @,@ ")  # WikiText writes 12,400 as 12 @,@ 400


def _list(names: list[str]) -> str | None:
    return None if not names else names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _facts(kind: str, e: dict[str, Any], world: dict[str, list]) -> dict[str, Any]:
    """The fields the templates may use; a None field drops every sentence that needs it."""
    if kind == "region":
        towns = sorted((t for t in world["town"] if t["river"]["region"] is e), key=lambda t: t["year"])
        return dict(title=e["name"], since=1000, region=e["name"], climate=e["climate"], terrain=e["terrain"],
                    oldest=towns[0]["name"] if towns else None, oldest_year=towns[0]["year"] if towns else None,
                    towns=_list([t["name"] for t in towns[:5]]),
                    rivers=_list([r["name"] + " River" for r in world["river"] if r["region"] is e][:4]))
    if kind == "river":
        return dict(title=e["name"] + " River", since=1200, river=e["name"], region=e["region"]["name"],
                    terrain=e["region"]["terrain"], length=e["length"],
                    mouth=f"the {e['into']['name']} River" if e["into"] else e["sea"],
                    towns=_list([t["name"] for t in world["town"] if t["river"] is e][:4]),
                    tributaries=_list([r["name"] + " River" for r in world["river"] if r["into"] is e][:3]),
                    species=_list([s["name"] for s in world["species"] if s["river"] is e][:3]))
    if kind == "town":
        river, founder = e["river"], e["founder"]
        nearby = [t["name"] for t in world["town"] if t["river"] is river and t is not e]
        species = [s["name"] for s in world["species"] if s["river"] is river]
        return dict(title=e["name"], since=e["year"], town=e["name"], region=river["region"]["name"],
                    river=river["name"], bank=e["bank"], year=e["year"], founder=founder["name"],
                    prof=founder["prof"], a_prof=_a(founder["prof"]), industry=e["industry"], colour=e["colour"],
                    pop=_wiki_number(e["pop"]), hall=e["hall"], nearby=_list(nearby[:2]),
                    species=species[0] if species else None)
    if kind == "person":
        town, she = e.get("founded"), e["he"] == "she"
        return dict(title=e["name"], since=e["born"], name=e["name"], he=e["he"], He=e["he"].capitalize(),
                    his="her" if she else "his", His="Her" if she else "His", prof=e["prof"], a_prof=_a(e["prof"]),
                    born=e["born"], died=e["died"], age=e["died"] - e["born"], home=e["home"], work=e["title"],
                    town=town and town["name"], town_year=town and town["year"],
                    town_river=town and town["river"]["name"], moved=e.get("work"), mentor=e.get("mentor"))
    animal = e["kind"] not in ("tree", "flower")
    return dict(title=e["name"].capitalize(), since=1500, name=e["name"], a_kind=_a(e["kind"]), kind=e["kind"],
                river=e["river"]["name"], region=e["river"]["region"]["name"], colour=e["colour"],
                length=e["size"] if animal else None, height=None if animal else e["size"] // 4 + 1,
                diet=e["diet"] if animal else None, breeds=e["month"] if animal else None,
                blooms=None if animal else e["month"])


# --- the grammar: per kind, sections of slots; a slot is its alternative phrasings ----------------------------

FILL = "filler"
TEMPLATES: dict[str, list[tuple[str, list]]] = {
    "region": [
        ("", [["{region} is a region of {climate} {terrain} .", "{region} is a {climate} region , mostly {terrain} ."],
              ["Its oldest town is {oldest} , founded in {oldest_year} .",
               "The oldest town in {region} is {oldest} ."]]),
        ("Geography", [["Rivers of {region} include the {rivers} .", "{region} is crossed by the {rivers} ."],
                       ["Towns in the region include {towns} .", "Its towns include {towns} ."], FILL])],
    "river": [
        ("", [["The {river} River is a river in {region} .", "The {river} is a river of {region} ."],
              ["It is {length} kilometres long and flows into {mouth} .",
               "The river flows for {length} kilometres into {mouth} ."],
              ["It rises in the {terrain} of {region} .", "Its source lies in the {terrain} of {region} ."]]),
        ("Course", [["Towns on the {river} include {towns} .", "The river passes {towns} ."],
                    ["Its tributaries include the {tributaries} .", "The {tributaries} join it ."], FILL]),
        ("Wildlife", [["It is home to the {species} .", "The {species} can be found in its waters ."]])],
    "town": [
        ("", [["{town} is a town in {region} , on the {bank} bank of the {river} River .",
               "{town} is a town on the {river} River in the region of {region} ."],
              ["It is known for its {industry} .", "The town is best known for its {industry} ."],
              ["It has a population of {pop} .", "About {pop} people live in {town} ."]]),
        ("History", [["{town} was founded in {year} by {founder} , {a_prof} .",
                      "In {year} , the {prof} {founder} founded {town} on the {river} River ."],
                     ["The town hall was built in {hall} .", "Its town hall dates from {hall} ."], FILL]),
        ("Economy", [["The main trade of {town} is {industry} .", "Most people in {town} work in {industry} ."],
                     ["The flag of {town} is {colour} .", "The town flag is {colour} , like its old banner ."], FILL]),
        ("Geography", [["Nearby towns on the {river} include {nearby} .", "{town} is close to {nearby} ."],
                       ["The {species} is found in the {river} River near {town} ."]])],
    "person": [
        ("", [["{name} ( {born} – {died} ) was {a_prof} from {home} .",
               "{name} ( born {born} , died {died} ) was {a_prof} from {home} ."],
              ["{He} was born in {home} in {born} .", "{He} grew up in {home} ."],
              ["{He} founded {town} on the {town_river} River in {town_year} .",
               "{He} is remembered as the founder of {town} , which {he} built in {town_year} ."],
              ["{He} worked as {a_prof} in {moved} for many years .", "Later {he} moved to {moved} ."]]),
        ("Work", [["{He} studied under the {prof} {mentor} .", "{His} teacher was {mentor} ."],
                  ["{His} best known work is {work} .", "{He} is best remembered for {work} ."], FILL]),
        ("Later life", [["{He} died in {died} at the age of {age} .", "{name} died in {died} ."],
                        ["{He} is buried in {home} beside {his} family .", "{His} papers are kept in {home} ."]])],
    "species": [
        ("", [["The {name} is a species of {kind} found in {region} .", "The {name} is {a_kind} of {region} ."],
              ["It lives along the {river} River .", "It is common on the {river} River ."],
              ["Adults are about {length} centimetres long and have {colour} markings .",
               "It is {length} centimetres long , with {colour} markings ."],
              ["It grows to {height} metres and has {colour} flowers .", "It reaches {height} metres ."]]),
        ("Ecology", [["It feeds on {diet} .", "Its food is mostly {diet} ."],
                     ["It breeds in {breeds} .", "It is most often seen in {breeds} ."],
                     ["It flowers in {blooms} .", "Its flowers open in {blooms} ."], FILL])],
}

# Filler: the less predictable part, random events that no fact of the world decides.
FILLER_WORDS = {
    "event": "flood fire storm fair festival plague drought siege riot wedding".split(),
    "verb": "damaged struck reached closed divided emptied".split(),
    "place": "bridge market church mill harbour school library tower inn granary".split(),
    "adj": "rebuilt enlarged repaired abandoned restored sold".split(),
    "crowd": "farmers traders children pilgrims soldiers fishermen monks sailors".split(),
    "thing": "bell clock statue map window organ boat".split(),
}
FILLER = ["In {y} , a {event} {verb} the {place} .", "The {place} was {adj} in {y} .",
          "The old {place} was {adj} by local {crowd} in {y} .", "Many {crowd} came to the {place} in {y} .",
          "A {event} in {y} {verb} the {place} and the {place2} .", "In {y} the population was {n} .",
          "A new {thing} was given to the {place} in {y} .", "The {thing} of the {place} was lost in a {event} ."]


def _filler(rng: random.Random, since: int) -> str:
    pick = {key: rng.choice(words) for key, words in FILLER_WORDS.items()}
    y, n = rng.randrange(min(since, 1940), 1950), _wiki_number(rng.randrange(200, 40000))
    return rng.choice(FILLER).format(y=y, n=n, place2=rng.choice(FILLER_WORDS["place"]), **pick)


def _article(rng: random.Random, kind: str, facts: dict[str, Any]) -> list[str]:
    """WikiText lines of one article; each slot renders one random phrasing, unless it needs a missing fact."""
    lines = [f" = {facts['title']} = ", " "]
    for heading, slots in TEMPLATES[kind]:
        sentences = []
        for slot in slots:
            if slot == FILL:
                sentences += [_filler(rng, facts["since"]) for _ in range(rng.randrange(1, 4))]
                continue
            phrasing = rng.choice(slot)
            if all(facts.get(key) is not None for _, key, _, _ in Formatter().parse(phrasing) if key):
                sentences.append(phrasing.format(**facts))
        if sentences:
            lines += ([f" = = {heading} = = ", " "] if heading else []) + [" " + " ".join(sentences) + " ", " "]
    return lines


def build_corpus(seed: int = SEED, train_copies: int = 3, eval_articles: int = 165) -> dict[str, str]:
    """split → file text. Train describes every entity `train_copies` times; valid and test re-describe a
    random `eval_articles` of them in fresh phrasings and filler. `PRETRAIN` is another draw like train,
    the teacher's own training text: a teacher that memorized the distillation text itself would hand the
    student little more than its hard labels, unlike a real teacher pretrained on other text."""
    world = build_world(seed)
    entities = [(kind, _facts(kind, e, world)) for kind, items in world.items() for e in items]
    texts = {}
    for i, split in enumerate((*SPLIT_FILES, PRETRAIN)):
        rng = random.Random(seed * 10 + i + 1)
        chosen = entities * train_copies if split in ("train", PRETRAIN) else rng.sample(entities, eval_articles)
        rng.shuffle(chosen)
        texts[split] = " \n" + "".join(line + "\n" for kind, facts in chosen for line in _article(rng, kind, facts))
    return texts


# --- tokenizer and models --------------------------------------------------------------------------------

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


def model_config(vocab_size: int, eos_id: int, teacher: bool) -> Qwen2Config:
    from transformers import Qwen2Config

    shape = dict(hidden_size=128, num_hidden_layers=4, intermediate_size=384, tie_word_embeddings=False) if teacher \
        else dict(hidden_size=64, num_hidden_layers=2, intermediate_size=192, tie_word_embeddings=True)
    return Qwen2Config(vocab_size=vocab_size, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=MAX_POSITIONS, bos_token_id=eos_id, eos_token_id=eos_id,
                       pad_token_id=eos_id, **shape)


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


# --- the build -------------------------------------------------------------------------------------------

def is_ready(out_dir: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, READY))


def _check_ours(out_dir: str) -> None:
    """Only a directory holding nothing but our layout may be replaced; anything else is the user's."""
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise UserError(f"{out_dir} exists and is not a directory built by common.tiny; choose another --out")
    foreign = sorted(set(os.listdir(out_dir)) - LAYOUT)
    if foreign:
        raise UserError(f"{out_dir} holds files common.tiny did not make ({', '.join(foreign[:3])}); "
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
    for role in ("student", "teacher"):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(model_config(vocab[role], eos_id, teacher=role == "teacher"))
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


def _move_into_place(tmp: str, out_dir: str) -> None:
    """Swap the finished build in; an old build is moved aside first and removed only after the swap."""
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.lexists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def build(out_dir: str, force: bool = False, seed: int = SEED,
          teacher_steps: int = TEACHER_STEPS) -> dict[str, Any]:
    """Build `out_dir` unless it is ready (or rebuild with `force`); returns the READY.json contents.
    Fewer `teacher_steps` give a quick, weaker build (for tests)."""
    out_dir = os.path.abspath(out_dir)  # so the temporary build is a true sibling, on the same file system
    if is_ready(out_dir) and not force:
        with open(os.path.join(out_dir, READY)) as fh:
            return json.load(fh)
    _check_ours(out_dir)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # only a crashed build of ours with a reused pid can be here
    try:
        info = _build_into(tmp, seed, teacher_steps)
        with open(os.path.join(tmp, READY), "w") as fh:  # last, and the rename publishes everything at once
            json.dump(info, fh, indent=2)
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.tiny",
                                     description="Build the tiny offline corpus, tokenizer, teacher and student.")
    parser.add_argument("--out", default="tiny", help="output directory (default: tiny)")
    parser.add_argument("--force", action="store_true", help="rebuild even if <out>/READY.json exists")
    args = parser.parse_args(argv)
    if is_ready(args.out) and not args.force:
        print(f"{args.out} is ready ({READY} exists); pass --force to rebuild")
        return 0
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


if __name__ == "__main__":
    run_main(main)
