"""The knowledge task (knowledge_task.py) as each of the RAG paper's task families, written in KILT's JSON-lines
format, so that every family can be seen learning on a laptop. The facts, the passages, the held-out entities and
the swapped corpus are the knowledge task's; what changes is what is asked and what is answered:

  qa                   question -> the value ("where was X born?" -> "Lisbon"), the knowledge task's own questions
  abstractive_qa       question -> the fact as a sentence ("X was born in Lisbon.")
  question_generation  an entity's name -> a Jeopardy-style clue made of its facts ("Born in Lisbon in 1790, this
                       baker played the harp.")
  fact_verification    a claim -> SUPPORTS (the passage states it), REFUTES (the passage states another value) or
                       NOT ENOUGH INFO (a fact of the entity's that its passage leaves out: the task is made by
                       make_task("fact_verification", ...), whose passages state three of the four facts); per
                       entity a supported and a refuted claim of each stated fact, three claims of the unstated one

Every record's provenance is the entity's page (its passage's title; wikipedia_id = the passage id), except NOT
ENOUGH INFO claims, which have none (as in KILT's FEVER). swapped_dev asks the dev records again against the swapped
corpus: answers, sentences and clues follow the changed facts, and a claim's verdict flips where its fact changed.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from rag_jax.data import knowledge_task

FAMILIES = ("qa", "abstractive_qa", "question_generation", "fact_verification")
SPLITS = ("train", "dev", "swapped_dev")


def _record(rid: str, input_text: str, answer: str, page: tuple[int, str] | None) -> dict:
    provenance = [{"wikipedia_id": str(page[0]), "title": page[1]}] if page is not None else []
    return {"id": rid, "input": input_text, "output": [{"answer": answer, "provenance": provenance}]}


def _sentence(attribute: knowledge_task.Attribute, subject: str, value: str) -> str:
    return attribute.sentence.format(subject=subject, value=value, a="an" if value[0].lower() in "aeiou" else "a")


def _qa(task, rng, entities: Sequence[int], facts, sentences: bool) -> list[dict]:
    out = []
    for i in entities:
        for attribute in task.schema.attributes:
            wording = attribute.questions[int(rng.integers(len(attribute.questions)))]
            value = facts[i][attribute.name]
            answer = _sentence(attribute, task.entities[i], value) if sentences else value
            out.append(_record(f"{i}-{attribute.name}", wording.format(entity=task.entities[i]), answer,
                               (i, task.entities[i])))
    return out


def _clues(task, entities: Sequence[int], facts) -> list[dict]:
    if not task.schema.clue:
        raise ValueError(f"schema {task.schema.name!r} has no clue template (knowledge_task.Schema.clue)")
    return [_record(str(i), task.entities[i], task.schema.clue.format(**facts[i]), (i, task.entities[i]))
            for i in entities]


def _claims(task, rng, entities: Sequence[int], facts) -> list[dict]:
    """Per entity, for each attribute its passage states a claim of its value and one of another value (a held-out
    entity's swapped value, so that every stated verdict flips in the swapped corpus), and three claims of different
    values of the attribute its passage leaves out; labelled against `facts` (the swapped ones for swapped_dev).
    Supported and refuted claims share the entity and the attribute, and every value is as likely in either: only
    the passage tells them apart (claims from which the verdict could be guessed are what a generator learns first,
    and it then memorises the training verdicts instead of reading: docs/tasks.md)."""
    if not task.unstated:
        raise ValueError("fact_verification claims need a task whose passages leave a fact unstated: make it with "
                         "knowledge_families.make_task('fact_verification', ...)")
    heldout = len(task.entities) - task.num_heldout
    out = []
    for i in entities:
        for attribute in task.schema.attributes:
            value = task.facts[i][attribute.name]
            if attribute.name == task.unstated[i]:
                picked = rng.permutation(len(attribute.values))[:3]
                claims = [(f"n{n}", attribute.values[j], "NOT ENOUGH INFO") for n, j in enumerate(picked)]
            else:
                # pylint: disable-next=protected-access (the knowledge task's own way of drawing another value)
                other = task.swapped_facts[i][attribute.name] if i >= heldout else knowledge_task._other(
                    rng, attribute.values, value)
                claims = [(kind, claimed, "SUPPORTS" if facts[i][attribute.name] == claimed else "REFUTES")
                          for kind, claimed in (("s", value), ("r", other))]
            page = (i, task.entities[i])
            for kind, claimed, label in claims:
                out.append(_record(f"{i}-{attribute.name}-{kind}", _sentence(attribute, task.entities[i], claimed),
                                   label, None if label == "NOT ENOUGH INFO" else page))
    return out


def make_task(family: str, num_entities: int, num_heldout: int, *, seed: int = 0,
              schema: knowledge_task.Schema = knowledge_task.PEOPLE) -> knowledge_task.Task:
    """The knowledge task `family`'s records are made from (knowledge_task.make_task): for fact_verification each
    passage leaves one fact unstated, which its NOT ENOUGH INFO claims are about."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; one of {', '.join(FAMILIES)}")
    return knowledge_task.make_task(num_entities, num_heldout, seed=seed, schema=schema,
                                    unstated_facts=family == "fact_verification")


def family_records(task: knowledge_task.Task, family: str, seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "dev", "swapped_dev"}: the KILT records of `family` (FAMILIES) over `task`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; one of {', '.join(FAMILIES)}")
    count = len(task.entities)
    train, heldout = range(count - task.num_heldout), range(count - task.num_heldout, count)
    out = {}
    for split, entities, facts in (("train", train, task.facts), ("dev", heldout, task.facts),
                                   ("swapped_dev", heldout, task.swapped_facts)):
        rng = np.random.default_rng([seed, SPLITS.index(split) if split == "train" else 1])  # dev = swapped wordings
        if family in ("qa", "abstractive_qa"):
            out[split] = _qa(task, rng, entities, facts, sentences=family == "abstractive_qa")
        elif family == "question_generation":
            out[split] = _clues(task, entities, facts)
        else:
            out[split] = _claims(task, rng, entities, facts)
    if family != "question_generation":  # training sees the records in a random order
        order = np.random.default_rng([seed, 3]).permutation(len(out["train"]))
        out["train"] = [out["train"][i] for i in order]
    return out


def write_family(task: knowledge_task.Task, family: str, directory: str, seed: int = 0) -> dict[str, str]:
    """Writes train.jsonl, dev.jsonl and swapped_dev.jsonl of `family` in KILT's format into `directory`."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for split, records in family_records(task, family, seed).items():
        paths[split] = os.path.join(directory, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
    return paths
