"""Jeopardy question generation (SearchQA's Jeopardy split in the RAG paper): given an answer entity, generate the
clue that leads to it; scored by corpus BLEU-1 and Q-BLEU-1 (Nema & Khapra 2018; text_metrics.py), averaged over the
examples. The input is the answer and the target the clue (rag_jax/data/task_files.py reads SearchQA that way)."""

from __future__ import annotations

from typing import Any, Mapping

from rag_jax.tasks import base, registry, text_metrics


def _score(prediction: str, example: Mapping[str, Any]) -> dict[str, float]:
    return {"qbleu1": text_metrics.qbleu1(prediction, example["answers"]),
            **text_metrics.bleu1_statistics(prediction, example["answers"])}


def _aggregate(sums: Mapping[str, float]) -> dict[str, float]:
    return {"qbleu1": 100.0 * sums["qbleu1"] / sums["count"], "bleu1": text_metrics.bleu1_of_sums(sums)}


TASK = registry.register(base.Task(
    name="question_generation", statistics=("qbleu1", *text_metrics.BLEU_STATISTICS), score=_score,
    aggregate=_aggregate, headline=("qbleu1", "bleu1")))
