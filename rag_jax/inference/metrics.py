"""Open-domain QA metrics as RAG and DPR report them on NQ-open.

Two families, kept apart because they normalise text differently on purpose:
- Answer metrics (exact match, token F1) use the SQuAD normalisation: lower case, drop ASCII punctuation,
  drop the articles a/an/the, collapse whitespace. A prediction scores the maximum over the gold answers.
- Retrieval recall@k uses DPR/DrQA's `has_answer`: NFD unicode normalisation, a unicode-aware tokenizer
  (runs of letters/numbers/marks, or single other non-space symbols), uncased, and a match means some gold
  answer's token sequence occurs contiguously in a passage's token sequence.

Pure Python (no jax, no numpy), so that evaluation scripts and tests can use it anywhere.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
import unicodedata
from typing import Iterable, Mapping, Sequence

# ---------------------------------------------------------------------------------------------------------
# Answer metrics (SQuAD v1.1 evaluation script semantics).

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces.

    The order matters and is SQuAD's: punctuation goes before articles, so "the-end" becomes "theend" (kept)
    while "the end" becomes "end".
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def _exact_match_single(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1_single(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # SQuAD v1.1 returns 0 here; v2.0 counts empty-vs-empty as a match. NQ-open golds are never empty,
        # so this only decides the degenerate case, where agreeing is the sensible answer.
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _max_over_golds(metric, prediction: str, answers: Sequence[str]) -> float:
    if isinstance(answers, str):
        raise TypeError(
            "rag_jax/inference/metrics.py: `answers` must be a list of gold answer strings, got a single str "
            f"{answers!r}; wrap it in a list."
        )
    if not answers:
        raise ValueError("rag_jax/inference/metrics.py: `answers` is empty; every question needs at least one gold answer.")
    return max(metric(prediction, gold) for gold in answers)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    return _max_over_golds(_exact_match_single, prediction, answers)


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 (bag of normalised tokens) of the prediction, maximised over the gold answers; in [0, 1]."""
    return _max_over_golds(_f1_single, prediction, answers)


# ---------------------------------------------------------------------------------------------------------
# Retrieval: DPR's has_answer (dpr/utils/tokenizers.py SimpleTokenizer + dpr/data/qa_validation.py).


def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def simple_tokenize(text: str) -> list[str]:
    """Uncased tokens as DPR's SimpleTokenizer makes them: runs of [\\p{L}\\p{N}\\p{M}] or one other symbol.

    Separators are the unicode categories Z* (spaces) and C* (controls, e.g. tab and newline). Written with
    `unicodedata` instead of the `regex` package so that the module needs nothing outside the standard library.
    Call it on NFD-normalised text (as `has_answer` does) so that accents become marks inside a word.
    """
    tokens: list[str] = []
    word: list[str] = []
    for ch in text:
        major = unicodedata.category(ch)[0]
        if major in "LNM":
            word.append(ch)
            continue
        if word:
            tokens.append("".join(word))
            word = []
        if major not in "ZC":
            tokens.append(ch)
    if word:
        tokens.append("".join(word))
    return [t.lower() for t in tokens]


def _answer_token_lists(answers: Iterable[str]) -> list[list[str]]:
    # An answer with no tokens would "match" every passage (DPR's loop accepts the empty sequence at
    # position 0), so it is dropped rather than allowed to inflate recall.
    token_lists = [simple_tokenize(_nfd(a)) for a in answers]
    return [t for t in token_lists if t]


def _contains_sequence(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and list(haystack[i : i + n]) == list(needle):
            return True
    return False


def has_answer(answers: Sequence[str], passage_text: str) -> bool:
    """True if some gold answer occurs as a contiguous token subsequence of the passage (DPR string match)."""
    if isinstance(answers, str):
        raise TypeError(
            f"rag_jax/inference/metrics.py: has_answer takes a list of answers, got the str {answers!r}; wrap it in a list."
        )
    passage_tokens = simple_tokenize(_nfd(passage_text))
    return any(_contains_sequence(passage_tokens, a) for a in _answer_token_lists(answers))


def first_hit_rank(answers: Sequence[str], ranked_passages: Sequence[str]) -> int | None:
    """0-based rank of the first retrieved passage that has an answer, or None if none does.

    One number per question answers recall@k for every k at once: hit@k <=> rank is not None and rank < k.
    """
    answer_tokens = _answer_token_lists(answers)
    if not answer_tokens:
        return None
    for rank, passage in enumerate(ranked_passages):
        passage_tokens = simple_tokenize(_nfd(passage))
        if any(_contains_sequence(passage_tokens, a) for a in answer_tokens):
            return rank
    return None


def retrieval_recall_at_k(examples: Sequence[tuple[Sequence[str], Sequence[str]]], k: int) -> float:
    """Fraction (in [0, 1]) of questions with an answer in their top-k passages.

    Args:
      examples: one `(answers, ranked_passage_texts)` pair per question, passages best first.
      k: how many of the top passages count; questions with fewer than k passages use what they have.
    """
    if k < 1:
        raise ValueError(f"rag_jax/inference/metrics.py: retrieval_recall_at_k needs k >= 1, got k={k}.")
    if not examples:
        raise ValueError("rag_jax/inference/metrics.py: retrieval_recall_at_k got no examples.")
    hits = sum(first_hit_rank(answers, list(passages)[:k]) is not None for answers, passages in examples)
    return hits / len(examples)


# ---------------------------------------------------------------------------------------------------------
# Per-question results and their summary.


@dataclasses.dataclass(frozen=True)
class QuestionScore:
    """Scores of one question. Fields are None when that part (generation or retrieval) was not evaluated."""

    exact_match: float | None = None
    f1: float | None = None
    retrieved: bool = False  # whether retrieval was evaluated, so that first_hit_rank=None means "missed"
    first_hit_rank: int | None = None


def score_question(
    answers: Sequence[str],
    prediction: str | None = None,
    ranked_passages: Sequence[str] | None = None,
) -> QuestionScore:
    """Scores one question's generated answer and/or its ranked retrieved passages against the gold answers."""
    score = QuestionScore()
    if prediction is not None:
        score = dataclasses.replace(score, exact_match=exact_match(prediction, answers), f1=f1(prediction, answers))
    if ranked_passages is not None:
        score = dataclasses.replace(score, retrieved=True, first_hit_rank=first_hit_rank(answers, ranked_passages))
    return score


def summarize(scores: Sequence[QuestionScore], ks: Sequence[int] = (1, 5, 20, 100)) -> dict[str, float | int]:
    """Turns per-question scores into percentages (0-100) with the counts behind them.

    Returns keys `exact_match`, `f1` (over questions with a prediction; `num_answered` of them) and, for each k
    in `ks`, `recall@k` with `recall@k_hits` (over questions with retrieval; `num_retrieved` of them), plus
    `exact_match_hits` and `num_questions`. Metrics with no question to average over are left out.
    """
    answered = [s for s in scores if s.exact_match is not None]
    retrieved = [s for s in scores if s.retrieved]
    out: dict[str, float | int] = {
        "num_questions": len(scores),
        "num_answered": len(answered),
        "num_retrieved": len(retrieved),
    }
    if answered:
        em_hits = sum(s.exact_match for s in answered)
        out["exact_match"] = 100.0 * em_hits / len(answered)
        out["exact_match_hits"] = int(em_hits)
        out["f1"] = 100.0 * sum(s.f1 for s in answered) / len(answered)
    if retrieved:
        for k in ks:
            if k < 1:
                raise ValueError(f"rag_jax/inference/metrics.py: summarize got k={k} in ks; every k must be >= 1.")
            hits = sum(s.first_hit_rank is not None and s.first_hit_rank < k for s in retrieved)
            out[f"recall@{k}"] = 100.0 * hits / len(retrieved)
            out[f"recall@{k}_hits"] = hits
    return out


def format_summary(summary: Mapping[str, float | int]) -> str:
    """One human-readable line, e.g. 'EM 41.20 (824/2000)  F1 48.91  R@1 40.15 (803/2000)'."""
    parts = []
    if "exact_match" in summary:
        parts.append(f"EM {summary['exact_match']:.2f} ({summary['exact_match_hits']}/{summary['num_answered']})")
        parts.append(f"F1 {summary['f1']:.2f}")
    for key, value in summary.items():
        if key.startswith("recall@") and not key.endswith("_hits"):
            k = key[len("recall@") :]
            parts.append(f"R@{k} {value:.2f} ({summary[key + '_hits']}/{summary['num_retrieved']})")
    return "  ".join(parts) if parts else f"no scores ({summary.get('num_questions', 0)} questions)"
