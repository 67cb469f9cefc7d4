"""The knowledge task as each task family in KILT's format (rag_jax/data/knowledge_families.py): the records say what
the passages say, the swapped records follow the swapped corpus, and every file reads back as its task's examples."""

import collections
import os
import subprocess
import sys

import pytest

from rag_jax.data import knowledge_families as kf, knowledge_task as kt, task_files
from rag_jax.tasks import base, registry


@pytest.fixture(scope="module")
def task():
    return kt.make_task(30, 6, seed=5)


@pytest.fixture(scope="module")
def claims_task():
    return kf.make_task("fact_verification", 30, 6, seed=5)


def _passage(task, record, swapped=False):
    [output] = record["output"]
    [page] = output["provenance"]
    passages = task.swapped_passages if swapped else task.passages
    passage = passages[int(page["wikipedia_id"])]
    assert passage["title"] == page["title"]
    return passage["text"]


def test_claims_are_labelled_by_what_the_passages_say(claims_task):
    task = claims_task
    records = kf.family_records(task, "fact_verification")
    for split, swapped in (("dev", False), ("swapped_dev", True), ("train", False)):
        labels = {"SUPPORTS": 0, "REFUTES": 0, "NOT ENOUGH INFO": 0}
        for record in records[split]:
            label = record["output"][0]["answer"]
            labels[label] += 1
            entity, attribute = int(record["id"].split("-")[0]), record["id"].split("-")[1]
            passages = task.swapped_passages if swapped else task.passages
            sentence = record["input"].split(" ", 2)[2]  # the claim without the entity's two-word name
            if label == "NOT ENOUGH INFO":  # the fact its passage leaves out: no page
                assert not record["output"][0]["provenance"] and attribute == task.unstated[entity]
                assert record["input"].startswith(task.entities[entity] + " ")
                assert sentence not in passages[entity]["text"]
                continue
            assert (sentence in _passage(task, record, swapped)) == (label == "SUPPORTS"), record
        assert labels["SUPPORTS"] == labels["REFUTES"] == labels["NOT ENOUGH INFO"] > 0
    dev, swapped = records["dev"], records["swapped_dev"]
    assert [r["input"] for r in dev] == [r["input"] for r in swapped]  # the same claims, verdicts that changed
    flips = {(a["output"][0]["answer"], b["output"][0]["answer"]) for a, b in zip(dev, swapped)}
    assert flips == {("SUPPORTS", "REFUTES"), ("REFUTES", "SUPPORTS"), ("NOT ENOUGH INFO", "NOT ENOUGH INFO")}


def test_a_claim_alone_does_not_tell_its_verdict(claims_task):
    """What the generator memorised before: every claim's entity and attribute come supported as often as refuted,
    and the values of supported, refuted and unknown claims are drawn alike; each passage leaves one fact out."""
    records = kf.family_records(claims_task, "fact_verification")["train"]
    by_prefix = collections.defaultdict(collections.Counter)
    for record in records:
        entity, attribute = record["id"].split("-")[:2]
        by_prefix[entity, attribute][record["output"][0]["answer"]] += 1
    for counts in by_prefix.values():
        assert counts["SUPPORTS"] == counts["REFUTES"] and (not counts["NOT ENOUGH INFO"]) == bool(counts["SUPPORTS"])
    names = [a.name for a in claims_task.schema.attributes]
    for i, passage in enumerate(claims_task.passages):
        stated = [n for n in names if claims_task.facts[i][n] in passage["text"]]
        assert claims_task.unstated[i] not in stated and len(stated) == len(names) - 1, passage
    assert kt.make_task(30, 6, seed=5).facts == claims_task.facts  # the same people, one fact fewer in each passage
    with pytest.raises(ValueError, match="make_task.'fact_verification'"):
        kf.family_records(kt.make_task(30, 6, seed=5), "fact_verification")  # every fact stated: nothing unknown


def test_clues_and_sentences_carry_the_passage_facts(task):
    for family in ("question_generation", "abstractive_qa"):
        records = kf.family_records(task, family)
        for split, swapped in (("dev", False), ("swapped_dev", True)):
            for record in records[split]:
                text, answer = _passage(task, record, swapped), record["output"][0]["answer"]
                facts = task.swapped_facts if swapped else task.facts
                entity = task.entities.index(record["output"][0]["provenance"][0]["title"])
                stated = [value for value in facts[entity].values() if value in answer]
                assert stated and all(value in text for value in stated), (record, text)
    clues = kf.family_records(task, "question_generation")["dev"]
    assert [r["input"] for r in clues] == task.entities[-6:]  # a name in, its clue out


@pytest.mark.parametrize("family", kf.FAMILIES)
def test_every_family_reads_back_as_its_task(task, claims_task, family, tmp_path):
    task = claims_task if family == "fact_verification" else task
    paths = kf.write_family(task, family, str(tmp_path))
    source = base.ExampleSource(paths["dev"], registry.get(family))
    assert task_files.detect_format(paths["dev"]) == "kilt"
    assert len(source) == len(kf.family_records(task, family)["dev"])
    assert all(example["pages"] or example["answers"] == ["unknown"] for example in source)


def test_make_knowledge_task_writes_a_family_in_kilt_format_and_refuses_it_as_nq(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "experiments.make_knowledge_task", "--entities=12", "--heldout=3",
               "--schema=people", "--task=fact_verification"]
    refused = subprocess.run(command + [f"--output={tmp_path / 'a'}"], capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "add --format=kilt" in refused.stderr
    done = subprocess.run(command + [f"--output={tmp_path / 'b'}", "--format=kilt"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path / "b")) == ["dev.jsonl", "passages.tsv", "swapped_dev.jsonl",
                                                  "swapped_passages.tsv", "train.jsonl"]
    assert task_files.detect_format(str(tmp_path / "b" / "train.jsonl")) == "kilt"
    assert len(list(task_files.read_records(str(tmp_path / "b" / "dev.jsonl")))) == 3 * 9  # 9 claims a person
