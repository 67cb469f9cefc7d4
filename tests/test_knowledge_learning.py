"""RAG learns to read: `experiments.knowledge_demo` end to end on a small version of the bundled knowledge task.

Held-out questions ask about entities the training never mentioned, so the only way to answer them is to retrieve the
entity's passage and copy the fact from it. The assertions are margins over controls the same run computes: exact
match far above the closed-book control (random passages), and the index hot-swap followed. A regression in
retrieval, the generator's training, the denoising warm-up or decoding drops exact match to the closed-book level.
To stay near 90 seconds on 2 cores (K=1), the generator uses a 1,200-entry BPE vocabulary trained on the task's text
(tests/train_task.small_bart_tokenizer) instead of bart-large's 50,265: the output layer is most of a small BART's work.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import process_env, train_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    train_task.skip_without_pretrained_retriever()
    root = tmp_path_factory.mktemp("knowledge")
    results, stdout = train_task.run_small_knowledge_demo(
        root, lambda p: f"{p['title']} / {p['text']}", lambda e: e["question"],
        ["--config.model.max_combined_length=64"], timeout=600)
    return results, stdout, root


def test_it_answers_held_out_questions_by_reading_the_retrieved_passage(demo):
    results, _, _ = demo
    assert results["num_heldout_questions"] == 30 * 4
    assert results["heldout_gold_recall"] >= 90  # all-MiniLM-L6-v2 finds the entity's passage
    assert results["closed_book_exact_match"] <= 15  # a random passage: only the answer type is guessable
    assert results["heldout_exact_match"] >= results["closed_book_exact_match"] + 40


def test_more_passages_do_not_mean_worse_answers(demo):
    """Trained with one passage a question, it answers as well with two and four: the retrieval scores are on the
    retriever's training scale (retrieval.score_scale "auto": 20 x the cosines), so the prior p(z|x) puts most of
    its mass on the entity's passage and the others cannot outvote it. With cosines alone (scale 1) the priors were
    nearly uniform: the same test measured exact match 45% at K=2 against ~78% at K=1."""
    results, stdout, _ = demo
    by_k = results["heldout_by_n_docs"]
    em = [by_k[k]["exact_match"] for k in ("1", "2", "4")]
    assert all(later >= earlier - 1.0 for earlier, later in zip(em, em[1:])), by_k  # within 1 point
    assert by_k["4"]["gold_prior_median"] >= 80, by_k
    assert "held-out exact match by K" in stdout


def test_after_the_index_hot_swap_its_answers_follow_the_changed_corpus(demo):
    results, stdout, _ = demo
    assert results["swapped_exact_match"] >= results["closed_book_exact_match"] + 40
    assert "after the index hot-swap" in stdout and "summary" in stdout


def test_the_gold_passage_gets_the_highest_posterior_for_the_answer(demo, tmp_path):
    """Provenance on the trained model, reading two retrieved passages (it was trained with one). The entity's own
    passage supported most answers, every right answer, and reading a right answer moved most of the probability
    that retrieval gave the other passage onto it: (posterior - prior) / (1 - prior) of the gold passage, 0 when the
    posterior is the prior (measured 0.98 on make run's model). A posterior that were the prior, or pointed anywhere
    else, fails here."""
    from rag_jax.inference import metrics  # pylint: disable=g-import-not-at-top

    _, _, root = demo
    output = tmp_path / "provenance.jsonl"
    command = [sys.executable, "-m", "experiments.eval_nq", f"--model={root / 'demo' / 'run'}", "--n_docs=2",
               f"--questions={root / 'task' / 'dev.jsonl'}", f"--output={output}", "--provenance"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=process_env.command_env())
    assert done.returncode == 0, done.stderr[-3000:]
    with open(root / "task" / "dev.jsonl") as f:
        gold = [str(json.loads(line)["gold_passage_id"]) for line in f]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == len(gold) == 120
    top, top_when_right, gain_when_right = [], [], []
    for record, gold_id in zip(records, gold):
        docs = {d["id"]: d for d in record["provenance"]["documents"]}
        top.append(max(docs.values(), key=lambda d: d["posterior"])["id"] == gold_id)
        if metrics.exact_match(record["prediction"], record["answers"]):
            top_when_right.append(top[-1])
            gain_when_right.append((docs[gold_id]["posterior"] - docs[gold_id]["prior"])
                                   / max(1.0 - docs[gold_id]["prior"], 1e-12) if gold_id in docs else -1.0)
    assert np.mean(top) > 0.55, np.mean(top)
    assert len(top_when_right) >= 30 and np.mean(top_when_right) >= 0.9, (len(top_when_right), np.mean(top_when_right))
    assert np.mean(gain_when_right) > 0.5, np.mean(gain_when_right)


@pytest.mark.slow  # two evaluations of 120 questions in their own processes: ~40 s each, loaded
def test_bfloat16_greedy_answers_agree_with_float32_on_the_trained_model(demo, tmp_path):
    """Issue 30's agreement on a trained model, where margins are real (on random weights near-ties flip:
    tests/test_bfloat16_agreement.py): RAG-Token greedy at K=4 gives the same answer in bfloat16 as in float32 for
    >= 98% of the held-out questions (measured 119 of 120; docs/bfloat16_agreement.md)."""
    _, _, root = demo
    predictions = {}
    for dtype in ("float32", "bfloat16"):
        output = tmp_path / f"{dtype}.jsonl"
        command = [sys.executable, "-m", "experiments.eval_nq", f"--model={root / 'demo' / 'run'}", "--n_docs=4",
                   "--reader=rag_token", "--num_beams=1", f"--compute_dtype={dtype}",
                   f"--questions={root / 'task' / 'dev.jsonl'}", f"--output={output}"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=process_env.command_env())
        assert done.returncode == 0, done.stderr[-3000:]
        predictions[dtype] = [json.loads(line)["prediction"] for line in output.read_text().splitlines()]
    pairs = list(zip(predictions["float32"], predictions["bfloat16"]))
    differing = [(i, a, b) for i, (a, b) in enumerate(pairs) if a != b]
    print("differing (question, float32, bfloat16):", differing)
    assert len(pairs) == 120 and len(differing) <= 0.02 * len(pairs), differing
