"""The tiny world and its corpus: fixed entities, a template grammar, WikiText-style articles.

The corpus describes a fixed world (regions, rivers, towns, people, species with fixed attributes) through a
small template grammar, so facts recur across articles and phrasings and a small model can learn them; some
random filler keeps it from being fully predictable. Pure Python: the same seed gives the same text.
"""
from __future__ import annotations

import random
from string import Formatter
from typing import Any, Sequence

SEED = 1234
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
