"""A knowledge task made by the package itself, deterministic from a seed: invented entities whose facts are
written only in their own passages, so that a held-out question can be answered by retrieving and reading, never by
remembering.

Every entity (an invented name) gets one value for each attribute of a `Schema` (people: birthplace, birth year,
occupation, instrument), written as one passage with the sentences in a random order. Training questions ask about
the first entities; dev questions ask about held-out entities, whose passages the training never reads for an
answer. The swapped corpus is the same corpus with every held-out entity's facts changed to other values (the
paper's index hot-swap: a model that reads follows the new index without retraining); swapped_dev.jsonl asks the dev
questions again with the new answers.

Files (`write_task`): passages.jsonl and swapped_passages.jsonl ({"id", "title", "text"} a line, ids 0..N-1, a
passages format build_index and training read like DPR's TSV), train.jsonl, dev.jsonl and swapped_dev.jsonl
(NQ-open JSONL with "gold_passage_id").
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np



@dataclasses.dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]
    sentence: str  # "{subject} ... {value}.": the entity's name in a passage's first sentence, a pronoun later ({a}: a/an)
    questions: tuple[str, ...]  # question wordings, each with "{entity}"


@dataclasses.dataclass(frozen=True)
class Schema:
    """What the entities of a task are and which facts they have."""

    name: str
    attributes: tuple[Attribute, ...]
    name_parts: tuple[tuple[str, ...], tuple[str, ...]]  # syllables: entity names are onset+vowel+coda words
    pronouns: tuple[str, ...]  # the subject of a passage's later sentences
    clue: str = ""  # a Jeopardy-style clue made of an entity's facts ("{attribute name}" for each value)


_CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Kyoto", "Dublin", "Quito", "Tunis", "Hanoi", "Zagreb", "Perth",
           "Accra", "Bergen", "Cusco", "Dakar", "Graz", "Havana", "Izmir", "Jaipur", "Kazan", "Leeds", "Malaga",
           "Nantes", "Odessa", "Porto", "Riga", "Seville", "Tallinn", "Utrecht", "Valencia", "Warsaw", "Yerevan")
_JOBS = ("architect", "baker", "carpenter", "dentist", "engineer", "farmer", "geologist", "historian", "journalist",
         "lawyer", "mechanic", "nurse", "painter", "pilot", "sailor", "teacher", "translator", "veterinarian",
         "weaver", "chemist", "librarian", "surgeon", "photographer", "astronomer")
_INSTRUMENTS = ("violin", "cello", "flute", "harp", "trumpet", "piano", "clarinet", "oboe", "guitar", "drums",
                "banjo", "accordion", "saxophone", "trombone", "mandolin", "bassoon")
_YEARS = tuple(str(y) for y in range(1701, 1991))

PEOPLE = Schema(
    name="people",
    attributes=(
        Attribute("birthplace", _CITIES, "{subject} was born in {value}.",
                  ("where was {entity} born?", "in which city was {entity} born?", "what is the birthplace of {entity}?")),
        Attribute("birth_year", _YEARS, "{subject} was born in the year {value}.",
                  ("when was {entity} born?", "in what year was {entity} born?", "what year was {entity} born in?")),
        Attribute("occupation", _JOBS, "{subject} worked as {a} {value}.",
                  ("what did {entity} do for a living?", "what was the occupation of {entity}?",
                   "what was {entity}'s job?")),
        Attribute("instrument", _INSTRUMENTS, "{subject} played the {value}.",
                  ("which instrument did {entity} play?", "what instrument did {entity} play?")),
    ),
    name_parts=(("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "gr", "st", "tr"),
                ("a", "e", "i", "o", "u", "ai", "ou")),
    pronouns=("He", "She"),
    clue="Born in {birthplace} in {birth_year}, this {occupation} played the {instrument}.",
)


_PRODUCTS = ("bicycles", "umbrellas", "lanterns", "kettles", "telescopes", "skateboards", "typewriters",
             "compasses", "helmets", "tractors", "backpacks", "microscopes", "chairs", "clocks", "ladders", "sails")
_SECTORS = ("shipping", "banking", "mining", "farming", "publishing", "insurance", "textiles", "aviation", "tourism",
            "forestry", "fishing", "catering")

# Another task of the same kind (other entities, attributes and wordings): to check that what works on PEOPLE is
# no accident of its templates.
COMPANIES = Schema(
    name="companies",
    attributes=(
        Attribute("founded", _YEARS, "{subject} was founded in {value}.",
                  ("when was {entity} founded?", "in which year was {entity} established?")),
        Attribute("headquarters", _CITIES, "{subject} has its headquarters in {value}.",
                  ("where is {entity} based?", "which city is {entity} headquartered in?")),
        Attribute("product", _PRODUCTS, "{subject} is best known for its {value}.",
                  ("what does {entity} make?", "what product is {entity} known for?")),
        Attribute("sector", _SECTORS, "{subject} also works in {value}.",
                  ("what other business is {entity} in?", "which other sector does {entity} work in?")),
    ),
    name_parts=(("c", "h", "j", "k", "m", "n", "q", "v", "w", "x", "y", "z", "ch", "sh", "pl", "kr"),
                ("a", "e", "o", "ia", "eo", "y")),
    pronouns=("It",),
    clue="Founded in {founded} and based in {headquarters}, this maker of {product} also works in {sector}.",
)


@dataclasses.dataclass
class Task:
    """The passages and questions of a knowledge task (see the module docstring)."""

    passages: list[dict]  # {"id", "title", "text"}
    swapped_passages: list[dict]
    train: list[dict]
    dev: list[dict]
    swapped_dev: list[dict]
    # What the files were written from (the other task families of knowledge_families.py ask about the same facts):
    entities: list[str] = dataclasses.field(default_factory=list)  # passage i is entities[i]'s
    facts: list[dict[str, str]] = dataclasses.field(default_factory=list)  # attribute name -> value, per entity
    swapped_facts: list[dict[str, str]] = dataclasses.field(default_factory=list)
    num_heldout: int = 0  # the last entities are held out
    schema: Schema | None = None
    # make_task(unstated_facts=True): per entity, the attribute its passages leave out (its value exists, no passage
    # says it); empty otherwise
    unstated: list[str] = dataclasses.field(default_factory=list)


def invented_names(rng: np.random.Generator, count: int, parts) -> list[str]:
    onsets, vowels = parts

    def word(syllables: int) -> str:
        return "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)) + rng.choice(onsets)

    names: list[str] = []
    seen = set()
    while len(names) < count:
        name = f"{word(2).capitalize()} {word(int(rng.integers(2, 4))).capitalize()}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _passage(pid: int, entity: str, pronoun: str, facts: dict[str, str], schema: Schema, order: np.ndarray) -> dict:
    """The entity's facts in the given sentence order; the name once (short passages leave the generator's input
    room for the question)."""
    sentences = []
    for n, i in enumerate(order):
        value = facts[schema.attributes[i].name]
        sentences.append(schema.attributes[i].sentence.format(subject=entity if n == 0 else pronoun, value=value,
                                                              a="an" if value[0].lower() in "aeiou" else "a"))
    return {"id": str(pid), "title": entity, "text": " ".join(sentences)}


def _questions(rng, entities, facts, pids, schema: Schema) -> list[dict]:
    out = []
    for entity, entity_facts, pid in zip(entities, facts, pids):
        for attribute in schema.attributes:
            wording = attribute.questions[int(rng.integers(len(attribute.questions)))]
            out.append({"question": wording.format(entity=entity), "answers": [entity_facts[attribute.name]],
                        "gold_passage_id": pid})
    return out


def make_task(num_entities: int = 400, num_heldout: int = 100, *, seed: int = 0, schema: Schema = PEOPLE,
              unstated_facts: bool = False) -> Task:
    """A task of `num_entities` passages; dev questions ask about the last `num_heldout` entities. With
    `unstated_facts` every passage leaves one of its entity's facts out (Task.unstated: what fact verification calls
    NOT ENOUGH INFO); its questions then include ones no passage answers."""
    if not 0 < num_heldout < num_entities:
        raise ValueError(f"num_heldout={num_heldout} must lie in (0, num_entities={num_entities})")
    rng = np.random.default_rng(seed)
    entities = invented_names(rng, num_entities, schema.name_parts)
    facts = [{a.name: a.values[int(rng.integers(len(a.values)))] for a in schema.attributes} for _ in entities]
    orders = [rng.permutation(len(schema.attributes)) for _ in entities]
    pronouns = [schema.pronouns[int(rng.integers(len(schema.pronouns)))] for _ in entities]
    unstated = _unstated(seed, schema, num_entities) if unstated_facts else []
    names = [a.name for a in schema.attributes]
    orders = [order[order != names.index(unstated[i])] if unstated else order for i, order in enumerate(orders)]
    pids = list(range(num_entities))
    passages = [_passage(*args, schema, o) for *args, o in zip(pids, entities, pronouns, facts, orders)]
    heldout = slice(num_entities - num_heldout, num_entities)
    swapped_facts = list(facts)
    for i in range(heldout.start, heldout.stop):  # every fact of a held-out entity changes to another value
        swapped_facts[i] = {a.name: _other(rng, a.values, facts[i][a.name]) for a in schema.attributes}
    swapped = [_passage(*args, schema, o) for *args, o in zip(pids, entities, pronouns, swapped_facts, orders)]
    train = _questions(rng, entities[:heldout.start], facts[:heldout.start], pids[:heldout.start], schema)
    order = rng.permutation(len(train))
    dev_rng = np.random.default_rng(seed + 1)  # the same wordings for dev and swapped dev
    dev = _questions(dev_rng, entities[heldout], facts[heldout], pids[heldout], schema)
    dev_rng = np.random.default_rng(seed + 1)
    swapped_dev = _questions(dev_rng, entities[heldout], swapped_facts[heldout], pids[heldout], schema)
    return Task(passages, swapped, [train[i] for i in order], dev, swapped_dev, entities, facts, swapped_facts,
                num_heldout, schema, unstated)


def _unstated(seed: int, schema: Schema, count: int) -> list[str]:
    """The attribute each entity's passages leave out, uniformly; drawn from a stream of its own, so that the
    task's names, facts and questions are those of the same seed without unstated facts."""
    rng = np.random.default_rng([seed, 5])
    return [schema.attributes[int(rng.integers(len(schema.attributes)))].name for _ in range(count)]


def _other(rng: np.random.Generator, values: Sequence[str], current: str) -> str:
    while True:
        value = values[int(rng.integers(len(values)))]
        if value != current:
            return value


def _write_jsonl(path: str, records: Sequence[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def write_task(task: Task, directory: str) -> dict[str, str]:
    """Writes the task's five files into `directory`; returns their paths by name."""
    os.makedirs(directory, exist_ok=True)
    return {name: _write_jsonl(os.path.join(directory, f"{name}.jsonl"), getattr(task, name))
            for name in ("passages", "swapped_passages", "train", "dev", "swapped_dev")}
