"""Tests for rag_jax/inference/metrics.py: SQuAD answer metrics, DPR has_answer, recall@k and the summary."""

import csv
import json
import pathlib
import sys

import pytest

from rag_jax.inference import metrics as ev

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "rag_jax" / "assets" / "nq_open_mini"


# --- normalize_answer / exact match / F1 -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("The Beatles", "beatles"),
        ("a  tale of   AN apple", "tale of apple"),
        ("U.S.A.", "usa"),
        ("rock 'n' roll!", "rock n roll"),
        ("theatre", "theatre"),  # articles only as whole words
        ("the-end", "theend"),  # punctuation is removed before articles, as in SQuAD
        ("  \tMay 18,\n2018 ", "may 18 2018"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalized):
    assert ev.normalize_answer(raw) == normalized


def test_exact_match_ignores_case_articles_punctuation():
    assert ev.exact_match("the Eiffel Tower.", ["Eiffel tower"]) == 1.0
    assert ev.exact_match("Eiffel", ["Eiffel tower"]) == 0.0


def test_exact_match_and_f1_take_max_over_golds():
    golds = ["Wilhelm Conrad Röntgen", "Röntgen"]
    assert ev.exact_match("röntgen", golds) == 1.0
    assert ev.f1("röntgen", golds) == 1.0
    # Only the first gold matches partially: 1 shared token of 2 predicted and 3 gold -> P=1/2, R=1/3, F1=0.4.
    assert ev.f1("conrad smith", ["Wilhelm Conrad Röntgen", "Marie Curie"]) == pytest.approx(0.4)


def test_accents_are_not_stripped_by_squad_normalisation():
    # SQuAD normalisation keeps non-ASCII letters: an unaccented prediction is not an exact match.
    assert ev.exact_match("Rontgen", ["Röntgen"]) == 0.0


def test_f1_counts_repeated_tokens_as_a_bag():
    # pred "new new york" vs gold "new york": common = {new: 1, york: 1} -> P=2/3, R=1, F1=0.8.
    assert ev.f1("new new york", ["New York"]) == pytest.approx(0.8)


def test_numbers():
    assert ev.exact_match("1,000", ["1000"]) == 1.0  # the comma is punctuation
    assert ev.exact_match("1901", ["1900"]) == 0.0
    assert ev.f1("in 1901", ["1901"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_empty_prediction_scores_zero():
    assert ev.exact_match("", ["Paris"]) == 0.0
    assert ev.f1("", ["Paris"]) == 0.0
    # A prediction that normalises to nothing is also empty.
    assert ev.f1("the .", ["Paris"]) == 0.0


def test_answers_must_be_a_nonempty_list():
    with pytest.raises(TypeError, match="list"):
        ev.exact_match("Paris", "Paris")
    with pytest.raises(ValueError, match="empty"):
        ev.f1("Paris", [])


# --- has_answer -------------------------------------------------------------------------------------------


def test_simple_tokenize_splits_symbols_and_keeps_marks_in_words():
    assert ev.simple_tokenize("Hello, World! 7,731,004 SEK") == [
        "hello", ",", "world", "!", "7", ",", "731", ",", "004", "sek"
    ]
    # After NFD, ö is "o" + U+0308; the combining mark stays inside the word.
    assert ev.simple_tokenize("Ro\u0308ntgen\tx") == ["ro\u0308ntgen", "x"]


def test_has_answer_token_subsequence():
    passage = "The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen, of Germany."
    assert ev.has_answer(["Wilhelm Conrad Röntgen"], passage)
    assert ev.has_answer(["wilhelm conrad röntgen"], passage)  # uncased
    assert ev.has_answer(["1901"], passage)
    assert not ev.has_answer(["190"], passage)  # whole tokens only, no substring match
    assert not ev.has_answer(["Conrad Wilhelm"], passage)  # order matters
    assert not ev.has_answer(["Rontgen"], passage)  # accents are kept (NFD, not stripped)
    assert ev.has_answer(["Marie Curie", "Germany"], passage)  # any of the golds


def test_has_answer_unicode_composed_vs_decomposed():
    composed, decomposed = "R\u00f6ntgen", "Ro\u0308ntgen"
    assert ev.has_answer([composed], f"prize to {decomposed}.")
    assert ev.has_answer([decomposed], f"prize to {composed}.")


def test_has_answer_punctuation_in_answer_and_numbers():
    passage = "released in the United States on May 18, 2018. A sequel is planned."
    assert ev.has_answer(["May 18, 2018"], passage)
    assert not ev.has_answer(["May 18 2018"], passage)  # the comma is a token of its own in DPR's match
    assert ev.has_answer(["U.S."], "The U.S. economy")


def test_has_answer_ignores_empty_answers():
    # DPR's loop would accept an empty token sequence everywhere; it must not count as a hit.
    assert not ev.has_answer(["", "  ", "zebra"], "nothing here")
    with pytest.raises(TypeError, match="list"):
        ev.has_answer("zebra", "a zebra")


def test_simple_tokenize_matches_dpr_regex():
    """Our unicodedata tokenizer equals DPR's SimpleTokenizer pattern on every real passage."""
    regex = pytest.importorskip("regex")
    pattern = regex.compile(
        r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
    )
    texts = [ev._nfd(text) for text, _ in _load_passages().values()]
    texts += ["Röntgen — 5½ x² ٣٤ 東京 café\u00a0naïve\u200b!"]
    for text in texts:
        expected = [m.group().lower() for m in pattern.finditer(text)]
        assert ev.simple_tokenize(text) == expected


# --- recall@k and summary ---------------------------------------------------------------------------------


def test_first_hit_rank_and_recall_at_k():
    examples = [
        (["Paris"], ["Lyon is big.", "Paris is the capital.", "Paris again."]),  # rank 1
        (["Berlin"], ["Berlin it is.", "no"]),  # rank 0
        (["Rome"], ["Milan", "Turin"]),  # miss
        (["Oslo"], []),  # nothing retrieved
    ]
    assert [ev.first_hit_rank(a, p) for a, p in examples] == [1, 0, None, None]
    assert ev.retrieval_recall_at_k(examples, 1) == 0.25
    assert ev.retrieval_recall_at_k(examples, 2) == 0.5
    assert ev.retrieval_recall_at_k(examples, 100) == 0.5
    with pytest.raises(ValueError, match="k >= 1"):
        ev.retrieval_recall_at_k(examples, 0)


def test_summarize_percentages_and_counts():
    scores = [
        ev.score_question(["Paris"], prediction="paris", ranked_passages=["x", "Paris!"]),
        ev.score_question(["Berlin"], prediction="Bonn", ranked_passages=["Berlin"]),
        ev.score_question(["Rome"], prediction="the city of Rome", ranked_passages=["Milan"]),
        ev.score_question(["Oslo"], prediction="Oslo"),  # no retrieval for this one
    ]
    s = ev.summarize(scores, ks=(1, 2))
    assert s["num_questions"] == 4 and s["num_answered"] == 4 and s["num_retrieved"] == 3
    assert s["exact_match"] == pytest.approx(50.0) and s["exact_match_hits"] == 2
    # F1 per question: 1, 0, 2*(1/3)*1/(4/3)=0.5, 1 -> mean 0.625.
    assert s["f1"] == pytest.approx(62.5)
    assert s["recall@1"] == pytest.approx(100 / 3) and s["recall@1_hits"] == 1
    assert s["recall@2"] == pytest.approx(200 / 3) and s["recall@2_hits"] == 2
    line = ev.format_summary(s)
    assert "EM 50.00 (2/4)" in line and "R@2 66.67 (2/3)" in line


def test_summarize_retrieval_only_has_no_answer_metrics():
    s = ev.summarize([ev.score_question(["a b"], ranked_passages=["a b c"])], ks=(1,))
    assert "exact_match" not in s and s["recall@1"] == 100.0


# --- real data: the bundled NQ-open mini task -------------------------------------------------------------


def _load_passages():
    csv.field_size_limit(sys.maxsize)
    with open(ASSETS / "passages.tsv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        assert next(reader) == ["id", "text", "title"]
        return {int(row[0]): (row[1], row[2]) for row in reader}


def _load_questions():
    with open(ASSETS / "questions.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_real_first_question_gold_passage():
    passages, questions = _load_passages(), _load_questions()
    q = questions[0]
    assert q["answers"] == ["Wilhelm Conrad Röntgen"]
    assert ev.has_answer(q["answers"], passages[q["gold_passage_id"]][0])


def test_gold_passages_contain_answers_on_real_nq_open_mini():
    """Over all 2,000 questions the gold passage has an answer (measured: 2000/2000 = 100%)."""
    passages, questions = _load_passages(), _load_questions()
    assert len(questions) == 2000
    gold = [(q["answers"], [passages[q["gold_passage_id"]][0]]) for q in questions]
    recall = ev.retrieval_recall_at_k(gold, 1)
    assert recall >= 0.98, f"gold-passage answer rate {recall:.4f}"
    # The property is specific: a passage shifted by one (some other question's gold) rarely has the answer.
    ids = sorted(passages)
    shifted = [(q["answers"], [passages[ids[(ids.index(q["gold_passage_id"]) + 1) % len(ids)]][0]]) for q in questions]
    assert ev.retrieval_recall_at_k(shifted, 1) < 0.2
