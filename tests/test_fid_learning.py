"""The fid reader learns to read: `experiments.knowledge_demo --config.model.reader=fid` end to end on a small version
of the bundled knowledge task (tests/test_knowledge_learning.py is RAG-Sequence's). Held-out questions ask about
entities the training never mentioned, so exact match far above the closed-book control (random passages) and the
index hot-swap followed show that the decoder reads the retrieved passages through the fused encoder outputs; reading
the exact match at K=1, 2 and 4 is printed (see test_fid_reports_exact_match_by_k). A small BPE vocabulary trained on the task's
text keeps the output layer cheap (tests/train_task.small_bart_tokenizer)."""

import pytest

from tests import train_task



@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    train_task.skip_without_pretrained_retriever()
    root = tmp_path_factory.mktemp("fid_knowledge")
    results, stdout = train_task.run_small_knowledge_demo(
        root, lambda p: f"title: {p['title']} context: {p['text']}", lambda e: f"question: {e['question']}",
        ["--reader=fid", "--config.model.fid.passage_length=64"], timeout=900)
    return results, stdout, root


@pytest.mark.slow
def test_fid_answers_held_out_questions_by_reading_the_retrieved_passages(demo):
    results, stdout, _ = demo
    print(stdout[-1500:])
    assert results["num_heldout_questions"] == 30 * 4
    assert results["heldout_gold_recall"] >= 90
    assert results["closed_book_exact_match"] <= 15
    assert results["heldout_exact_match"] >= results["closed_book_exact_match"] + 40


@pytest.mark.slow
def test_fid_reports_exact_match_by_k(demo):
    """Trained with one passage a question, the decoder has not learnt to pick the entity's passage among several
    (measured: K=2 and 4 below K=1, also when trained at K=2 for 300 and 700 steps: 23 and 28% at K=2, the
    training loss near 0; a 2-layer BART from scratch learns the training entities' facts before it learns to
    match the question's entity to a passage title). The figures are printed for the record, and K=1's checked:
    the recipe that learns to pick in part (K=1, then K=2 on 1,000 entities, the question as written in the rows:
    100.0 / 84.2 / 65.8 / 45.8 at K=1 / 2 / 4 / 8, docs/fid.md) costs ~3x this fixture and still falls with K, so it
    is not what this test trains."""
    results, stdout, _ = demo
    by_k = results["heldout_by_n_docs"]
    assert by_k["1"]["exact_match"] == results["heldout_exact_match"]
    assert set(by_k) == {"1", "2", "4"} and "held-out exact match by K" in stdout
    print({k: row["exact_match"] for k, row in by_k.items()})


@pytest.mark.slow
def test_fid_answers_follow_the_index_hot_swap(demo):
    results, _, _ = demo
    assert results["swapped_exact_match"] >= results["closed_book_exact_match"] + 40
