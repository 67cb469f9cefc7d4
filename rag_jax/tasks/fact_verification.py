"""Fact verification (FEVER): a claim in, its verdict out, generated as one word as the RAG paper does ("we map
each FEVER class label to single output tokens"). Scored by label accuracy three-way (supports / refutes /
not enough info) and two-way (supports / refutes only: the examples whose gold label is "not enough info" are left
out, as the paper's two-way setting drops that class). KILT's variant: KILT-AC.

A prediction is compared after lower-casing and stripping; a prediction that is not one of the label words is
wrong (the generator is not yet restricted to the label words while decoding: docs/tasks.md).
"""

from __future__ import annotations

from typing import Any, Mapping

from rag_jax.tasks import base, registry

# dataset label (FEVER's, KILT's) -> the word the generator is trained to write
LABEL_WORDS = {"SUPPORTS": "supports", "REFUTES": "refutes", "NOT ENOUGH INFO": "unknown"}
NOT_ENOUGH_INFO = LABEL_WORDS["NOT ENOUGH INFO"]


def label_word(label: str, where: str) -> str:
    """The label word of a dataset label (either spelling); a TaskDataError naming the labels for another."""
    if isinstance(label, str) and label.strip().upper() in LABEL_WORDS:
        return LABEL_WORDS[label.strip().upper()]
    if isinstance(label, str) and label.strip().lower() in LABEL_WORDS.values():
        return label.strip().lower()
    raise base.TaskDataError(f"{where}: label {label!r} is not one of {', '.join(LABEL_WORDS)} (or their words "
                             f"{', '.join(LABEL_WORDS.values())})")


def _example(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    example = base._default_example(record, where)  # pylint: disable=protected-access (the shared checks)
    words = {label_word(label, where) for label in example["answers"]}
    if len(words) != 1:
        raise base.TaskDataError(f"{where}: the outputs give different labels {sorted(words)}; a claim has one")
    example["answers"] = [words.pop()]
    return example


def _score(prediction: str, example: Mapping[str, Any]) -> dict[str, float]:
    gold = example["answers"][0]
    correct = float(prediction.strip().lower() == gold)
    two_way = gold != NOT_ENOUGH_INFO
    return {"accuracy": correct, "accuracy_2way": correct if two_way else 0.0, "count_2way": float(two_way)}


def _aggregate(sums: Mapping[str, float]) -> dict[str, float]:
    out = {"accuracy": 100.0 * sums["accuracy"] / sums["count"]}
    if sums["count_2way"]:
        out["accuracy_2way"] = 100.0 * sums["accuracy_2way"] / sums["count_2way"]
    return out


TASK = registry.register(base.Task(
    name="fact_verification", statistics=("accuracy", "accuracy_2way", "count_2way"), score=_score,
    aggregate=_aggregate, example=_example, kilt_scores={"accuracy": "kilt_ac"},
    labels=tuple(LABEL_WORDS.values()), headline=("accuracy", "accuracy_2way")))
