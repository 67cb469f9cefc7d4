"""Open-domain QA (NQ-open, TriviaQA, WebQuestions, CuratedTrec): short answers, scored by exact match and token F1
(SQuAD normalisation, maximum over the gold answers: rag_jax/inference/metrics.py), as the RAG paper reports them.

CuratedTrec's answers are regular expressions (DPR's curatedtrec files): an example with "answers_are_regex" scores
exact match 1 when some pattern matches the prediction from its start, case-insensitively (DrQA's
regex_match_score: re.match with IGNORECASE | UNICODE | MULTILINE); F1 is not defined for a pattern, so such examples
count in exact match only ("f1_count", the examples with plain answers, is F1's denominator).
The KILT variants: KILT-EM and KILT-F1.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from rag_jax.inference import metrics
from rag_jax.tasks import base, registry

REGEX_FLAGS = re.IGNORECASE | re.UNICODE | re.MULTILINE


def compile_patterns(patterns: Sequence[str], where: str) -> list[re.Pattern]:
    """The compiled answer patterns; a TaskDataError naming `where` and the pattern for one that does not compile."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern, REGEX_FLAGS))
        except re.error as e:
            raise base.TaskDataError(f"{where}: answer pattern {pattern!r} is not a regular expression ({e}); fix "
                                     "or drop it") from None
    return compiled


def _example(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    example = base._default_example(record, where)  # pylint: disable=protected-access (the shared checks)
    if record.get("answers_are_regex"):
        compile_patterns(example["answers"], where)
        example["answers_are_regex"] = True
    return example


def _score(prediction: str, example: Mapping[str, Any]) -> dict[str, float]:
    answers = example["answers"]
    if example.get("answers_are_regex"):
        hit = any(p.match(prediction) is not None for p in compile_patterns(answers, "answer pattern"))
        return {"exact_match": float(hit), "f1": 0.0, "f1_count": 0.0}
    return {"exact_match": metrics.exact_match(prediction, answers), "f1": metrics.f1(prediction, answers),
            "f1_count": 1.0}


def first_hit_rank(example: Mapping[str, Any], passages: Sequence[str]) -> int | None:
    """Rank of the first passage holding an answer: DPR's has_answer (metrics.first_hit_rank), or for regex answers
    DPR's regex_match (a pattern found anywhere in the passage: re.search with the same flags)."""
    if not example.get("answers_are_regex"):
        return metrics.first_hit_rank(example["answers"], passages)
    patterns = compile_patterns(example["answers"], "answer pattern")
    return next((rank for rank, text in enumerate(passages) if any(p.search(text) for p in patterns)), None)


def _aggregate(sums: Mapping[str, float]) -> dict[str, float]:
    out = {"exact_match": 100.0 * sums["exact_match"] / sums["count"]}
    if sums["f1_count"]:  # F1 over the examples with plain answers
        out["f1"] = 100.0 * sums["f1"] / sums["f1_count"]
    return out


TASK = registry.register(base.Task(
    name="qa", statistics=("exact_match", "f1", "f1_count"), score=_score, aggregate=_aggregate, example=_example,
    kilt_scores={"exact_match": "kilt_em", "f1": "kilt_f1"}, answer_hit_rank=first_hit_rank, headline=("exact_match", "f1")))
