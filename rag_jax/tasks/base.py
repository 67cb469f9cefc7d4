"""What a task is, and the evaluator every task shares.

A task (Task) turns a data record into the generator's input and targets (`example`) and scores a prediction
(`score`). Scores are summable statistics of one example (for a mean: the score; for corpus BLEU: matched and total
unigrams, lengths), so that they add up over batches and hosts, and `aggregate` turns their sums into the task's
metrics (percentages). Examples are dicts with "question" (the generator's input text, whatever the task calls it),
"answers" (the targets: the first is trained on, all count in scoring), and optionally "pages" (KILT provenance: a
list of gold page sets) and "gold_passage_id".

Where an example has pages and the retrieved pages are known, `example_statistics` adds KILT's R-Precision and the
KILT variants of the task's per-example scores (kilt.py). Both are averaged over the examples that have gold pages
("pages_count"): an example with none (a NOT ENOUGH INFO claim) has nothing to retrieve, so it neither lowers
R-Precision nor counts in KILT-*.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Mapping, Sequence

from rag_jax.tasks import kilt


class TaskDataError(ValueError):
    """A record the task cannot use; the message names where it is and what to do."""


def _default_example(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    """{"question", "answers"} of a record's "input" and its "outputs" strings (at least one)."""
    input_text, outputs = record.get("input"), record.get("outputs")
    if not isinstance(input_text, str) or not input_text.strip():
        raise TaskDataError(f"{where}: the input is empty or not a string; every record needs its input text")
    if not outputs or not all(isinstance(o, str) and o.strip() for o in outputs):
        raise TaskDataError(f"{where}: no answers (an empty list, or an empty string in it); give at least one "
                            "non-empty answer")
    return {"question": input_text.strip(), "answers": [o.strip() for o in outputs]}


@dataclasses.dataclass(frozen=True)
class Task:
    """One task. `statistics` lists, in order, the names `score` returns; `aggregate` receives their sums and
    "count" (examples) and returns metric name -> percentage; `kilt_scores` maps a per-example statistic in [0, 1]
    to the name of its KILT variant (e.g. "exact_match" -> "kilt_em")."""

    name: str
    statistics: tuple[str, ...]
    score: Callable[[str, Mapping[str, Any]], dict[str, float]]  # (prediction, example) -> statistics
    aggregate: Callable[[Mapping[str, float]], dict[str, float]]  # summed statistics -> metrics
    # (record {"input", "outputs", ...} from rag_jax/data/task_files.py, "file:line" for messages) -> example
    # {"question", "answers", ...}; raises TaskDataError
    example: Callable[[Mapping[str, Any], str], dict[str, Any]] = _default_example
    kilt_scores: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # (example, ranked passage texts) -> 0-based rank of the first passage that holds an answer, or None: answer
    # recall@k of retrieval, for tasks whose answers are short enough to be found in a passage (None: no such recall)
    answer_hit_rank: Callable[[Mapping[str, Any], Sequence[str]], int | None] | None = None
    labels: tuple[str, ...] = ()  # a closed set of target words (classification tasks); empty: free text
    headline: tuple[str, ...] = ()  # the metrics a one-line summary shows, in order


def to_example(task: Task, record: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The task's example of a data record, with the record's "id", "pages" and "gold_passage_id" carried over."""
    example = task.example(record, where)
    for key in ("id", "pages", "gold_passage_id"):
        if key in record and key not in example:
            example[key] = record[key]
    return example


def statistic_names(task: Task, with_pages: bool) -> list[str]:
    """Every statistic `example_statistics` returns for `task`, in a fixed order (hosts sum them as one vector)."""
    names = ["count", *task.statistics]
    if with_pages:
        names += ["pages_count", "r_precision", *task.kilt_scores.values()]
    return names


def example_statistics(task: Task, prediction: str, example: Mapping[str, Any],
                       retrieved_pages: Sequence[str] | None = None) -> dict[str, float]:
    """The statistics of one prediction: "count" 1, the task's, and with gold pages and `retrieved_pages` KILT's."""
    stats = {"count": 1.0, **task.score(prediction, example)}
    if example.get("pages") and retrieved_pages is not None:
        r_precision = kilt.r_precision(retrieved_pages, example["pages"])
        stats["pages_count"], stats["r_precision"] = 1.0, r_precision
        for source, kilt_name in task.kilt_scores.items():
            stats[kilt_name] = stats[source] if r_precision == 1.0 else 0.0
    return stats


def summarize(task: Task, sums: Mapping[str, float]) -> dict[str, float]:
    """The task's metrics of summed statistics, KILT's (as percentages of the examples with gold pages) where they
    were counted, and "num_questions"."""
    count = sums.get("count", 0.0)
    out = dict(task.aggregate(sums)) if count else {}
    if sums.get("pages_count"):
        for name in ("r_precision", *task.kilt_scores.values()):
            out[name] = 100.0 * sums[name] / sums["pages_count"]
    out["num_questions"] = float(count)
    return out


def evaluate(task: Task, predictions: Sequence[str], examples: Sequence[Mapping[str, Any]],
             retrieved_pages: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
    """The task's metrics of `predictions` against `examples` (and KILT's, given each example's retrieved pages)."""
    sums: collections.Counter = collections.Counter()
    for i, (prediction, example) in enumerate(zip(predictions, examples, strict=True)):
        sums.update(example_statistics(task, prediction, example, retrieved_pages[i] if retrieved_pages else None))
    return summarize(task, sums)


def mean_percent(*names: str) -> Callable[[Mapping[str, float]], dict[str, float]]:
    """An `aggregate` that reports each named statistic as a percentage of the examples."""
    return lambda sums: {name: 100.0 * sums[name] / sums["count"] for name in names}


def format_metrics(task: Task, summary: Mapping[str, float]) -> str:
    """One line: the task's headline metrics, then KILT's where present, e.g. 'exact_match 41.20  f1 48.91'."""
    names = [*(task.headline or task.statistics), "r_precision", *task.kilt_scores.values()]
    parts = [f"{name} {summary[name]:.2f}" for name in dict.fromkeys(names) if name in summary]
    return "  ".join(parts) + f"  ({int(summary.get('num_questions', 0))} questions)"


class ExampleSource:
    """A task's examples from a data file in any format rag_jax/data/task_files.py reads, held in memory: a pipeline
    source (len + indexing), as nq_jsonl.JsonlSource is for NQ-open JSONL. Raises TaskDataError / TaskFileError
    naming the file and line of a bad record."""

    def __init__(self, path: str, task: Task):
        from rag_jax.data import task_files  # pylint: disable=g-import-not-at-top (a light module; kept local)

        self.name = path
        self._examples = [to_example(task, record, f"{path}:{line}") for line, record in task_files.read_records(path)]
        if not self._examples:
            raise TaskDataError(f"{path}: no examples in the file")

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._examples[index]
