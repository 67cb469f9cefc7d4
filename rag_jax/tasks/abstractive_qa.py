"""Abstractive QA (MS-MARCO NLG in the RAG paper, ELI5 in KILT): answers written as sentences, scored by corpus
BLEU-1 and ROUGE-L (text_metrics.py says their settings). KILT's variant: KILT-RL (ROUGE-L counted only where the
retrieved pages are right)."""

from __future__ import annotations

from typing import Any, Mapping

from rag_jax.tasks import base, registry, text_metrics


def _score(prediction: str, example: Mapping[str, Any]) -> dict[str, float]:
    return {"rouge_l": text_metrics.rouge_l(prediction, example["answers"]),
            **text_metrics.bleu1_statistics(prediction, example["answers"])}


def _aggregate(sums: Mapping[str, float]) -> dict[str, float]:
    return {"rouge_l": 100.0 * sums["rouge_l"] / sums["count"], "bleu1": text_metrics.bleu1_of_sums(sums)}


TASK = registry.register(base.Task(
    name="abstractive_qa", statistics=("rouge_l", *text_metrics.BLEU_STATISTICS), score=_score, aggregate=_aggregate,
    kilt_scores={"rouge_l": "kilt_rl"}, headline=("rouge_l", "bleu1")))
