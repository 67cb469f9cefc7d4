"""The periodic dev evaluation of training: greedy answers of the run's reader (or the cheaper stand-in it names:
RAG-Sequence's is RAG-Token), scored by the run's task (config task.name: rag_jax/tasks/; "qa": exact match / F1),
KILT's R-Precision and KILT-* scores where the dev examples name their pages, answer recall@k (tasks with short
answers) and gold-passage recall@k."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from rag_jax import rag
from rag_jax.inference import answering
from rag_jax.readers import registry as readers
from rag_jax.retrieval.retriever import Retriever
from rag_jax.runs import trained_model
from rag_jax.tasks import base, registry as tasks


def _retrieval_counts(task: base.Task, record, texts, example, ks) -> np.ndarray:
    """[answer hit@k..., gold hit@k..., gold known...] of one example, for each k."""
    gold = str(example.get("gold_passage_id", -1))
    known = example.get("gold_passage_id", -1) >= 0
    rank = task.answer_hit_rank(example, texts) if task.answer_hit_rank else None
    return np.array([rank is not None and rank < k for k in ks] + [known and gold in record["doc_ids"][:k] for k in ks]
                    + [known] * len(ks), np.float64)


def evaluate(model: rag.Rag, params, retriever: Retriever, examples, config,
             records: list | None = None) -> dict[str, float]:
    """Dev metrics: the task's metrics of greedy answers (the reader's `dev_reader`, else its own), KILT's where the
    examples have pages, answer recall@k of retrieval (tasks with `answer_hit_rank`), and recall@k of the gold passage
    (where known). Every process answers its share of the questions; statistics are summed over them. `records`,
    when given, receives this process's answer records (answering.answer_questions')."""
    ks = [k for k in config.eval.recall_ks if k <= config.eval.n_docs]
    examples = list(examples)
    task = tasks.from_config(config)
    with_pages = any(example.get("pages") for example in examples)
    names = base.statistic_names(task, with_pages)
    mine = examples[jax.process_index()::jax.process_count()]
    if jax.process_count() > 1:  # each host decodes its share with a full copy of the parameters
        params = multihost_utils.process_allgather(params, tiled=True)
    reader = readers.from_config(config)
    settings = answering.AnswerSettings(n_docs=config.eval.n_docs, reader=reader.dev_reader or reader.name,
                                        batch_size=config.eval.batch_size // jax.process_count(),
                                        max_question_length=config.data.max_question_length,
                                        answer_prefix_space=config.data.answer_prefix_space, pages=with_pages,
                                        choices=task.labels)
    generation = trained_model.generation_config(model, config)
    counts = np.zeros(len(names) + 3 * len(ks), np.float64)
    if mine:
        answered = list(answering.answer_questions(model, params, retriever, mine, settings, generation))
        if records is not None:
            records.extend(record for record, _ in answered)
        for (record, texts), example in zip(answered, mine):
            stats = base.example_statistics(task, record["prediction"], example, record.get("doc_titles"))
            counts[:len(names)] += [stats.get(name, 0.0) for name in names]
            counts[len(names):] += _retrieval_counts(task, record, texts, example, ks)
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
    summary = base.summarize(task, dict(zip(names, counts[:len(names)])))
    total = max(summary.pop("num_questions"), 1.0)
    out = {f"eval/{name}": value for name, value in summary.items()}
    out["eval/num_questions"] = float(counts[0])
    retrieval = counts[len(names):].reshape(3, len(ks))
    for i, k in enumerate(ks):
        if task.answer_hit_rank:
            out[f"eval/recall@{k}"] = 100 * retrieval[0, i] / total
        if retrieval[2, i]:
            out[f"eval/gold_recall@{k}"] = 100 * retrieval[1, i] / retrieval[2, i]
    return out
