"""The bundled knowledge task and the generator's denoising warm-up: what the held-out questions can and cannot be
answered from, and BART's text infilling."""

import json
import re

import numpy as np
import pytest

from rag_jax.data import knowledge_task as kt
from rag_jax.data import tokenizers
from rag_jax.retrieval import corpus
from rag_jax.retrieval.contexts import ContextFormat
from rag_jax.training import denoise


@pytest.fixture(scope="module", params=[kt.PEOPLE, kt.COMPANIES], ids=lambda schema: schema.name)
def task(request):
    return kt.make_task(60, 12, seed=3, schema=request.param)


def _by_id(passages):
    return {int(p["id"]): p for p in passages}


def test_the_task_is_a_function_of_its_seed(task):
    schema = kt.PEOPLE if "born" in task.passages[0]["text"] else kt.COMPANIES
    assert kt.make_task(60, 12, seed=3, schema=schema) == task
    assert kt.make_task(60, 12, seed=4, schema=schema).passages != task.passages


def test_every_answer_is_written_in_its_gold_passage_only(task):
    passages = _by_id(task.passages)
    for example in task.train + task.dev:
        gold = passages[example["gold_passage_id"]]
        assert gold["title"] in example["question"]
        # The answer is in the gold passage, and the entity is named in no other passage.
        assert re.search(rf"\b{re.escape(example['answers'][0])}\b", gold["text"])
        assert sum(gold["title"] in p["text"] or gold["title"] == p["title"] for p in task.passages) == 1


def test_dev_asks_only_about_held_out_entities(task):
    train_ids = {e["gold_passage_id"] for e in task.train}
    dev_ids = {e["gold_passage_id"] for e in task.dev}
    assert not train_ids & dev_ids
    assert len(dev_ids) == 12 and len(task.dev) == 12 * 4  # 4 attributes an entity
    assert len(task.train) == 48 * 4


def test_the_swapped_corpus_changes_every_held_out_fact_and_nothing_else(task):
    before, after = _by_id(task.passages), _by_id(task.swapped_passages)
    dev_ids = {e["gold_passage_id"] for e in task.dev}
    for pid in before:
        assert (before[pid] != after[pid]) == (pid in dev_ids)
        assert before[pid]["title"] == after[pid]["title"]
    for old, new in zip(task.dev, task.swapped_dev):
        assert old["question"] == new["question"] and old["answers"] != new["answers"]
        assert new["answers"][0] in after[new["gold_passage_id"]]["text"]


def test_written_files_read_back_as_passages_and_questions(task, tmp_path):
    paths = kt.write_task(task, str(tmp_path))
    assert [p.title for p in corpus.read_passages(paths["passages"])] == [p["title"] for p in task.passages]
    with open(paths["swapped_dev"]) as f:
        assert [json.loads(line) for line in f] == task.swapped_dev


def test_infilling_masks_spans_and_keeps_the_ends():
    rng = np.random.default_rng(0)
    ids = np.arange(100, 160, dtype=np.int32)
    ids[0], ids[-1] = 0, 2
    masked = [denoise.infill(ids, rng, mask_id=7, mask_ratio=0.3, mean_span=3.0) for _ in range(200)]
    assert all(m[0] == 0 and m[-1] == 2 for m in masked)
    # Kept tokens stay in order; each <mask> stands for a span of at least one token; ~30% of tokens are masked.
    for m in masked[:20]:
        kept = [t for t in m[1:-1] if t != 7]
        assert kept == sorted(kept) and set(kept) <= set(ids[1:-1])
        assert len(kept) + int((m == 7).sum()) <= len(ids) - 2
    fraction = np.mean([1 - sum(t != 7 for t in m[1:-1]) / (len(ids) - 2) for m in masked])
    assert 0.2 < fraction < 0.4


def test_warm_up_batches_reconstruct_the_passage_text(task, tmp_path):
    from experiments.configs import nq

    config = nq.get_config("tiny")
    config.data.passages = kt.write_task(task, str(tmp_path))["passages"]
    generator = tokenizers.load_generator_tokenizer()
    texts = denoise.passage_texts(config.data.passages, ContextFormat())
    assert texts[0] == f"{task.passages[0]['title']} / {task.passages[0]['text']}"
    batch = next(denoise.batches(texts, generator, config))
    labels = generator.batch_decode(batch["labels"], skip_special_tokens=True)
    assert all(label in texts for label in labels)
    assert (batch["ids"] == generator.mask_token_id).any() and (batch["mask"] == (batch["ids"] != 1)).all()
