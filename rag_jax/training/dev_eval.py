"""The periodic dev evaluation of training: greedy answers of the run's reader (or the cheaper stand-in it names:
RAG-Sequence's is RAG-Token), exact match / F1, retrieval recall@k."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from rag_jax import rag
from rag_jax.inference import answering, metrics
from rag_jax.readers import registry as readers
from rag_jax.retrieval.retriever import Retriever
from rag_jax.runs import trained_model


def evaluate(model: rag.Rag, params, retriever: Retriever, examples, config,
             records: list | None = None) -> dict[str, float]:
    """Dev metrics: exact match / F1 of greedy answers (the reader's `dev_reader`, else its own), answer recall@k of
    retrieval, and recall@k of the gold passage (where known). Every process answers its share of the questions;
    counts are summed over them. `records`, when given, receives this process's answer records
    (answering.answer_questions')."""
    ks = [k for k in config.eval.recall_ks if k <= config.eval.n_docs]
    mine = list(examples)[jax.process_index()::jax.process_count()]
    if jax.process_count() > 1:  # each host decodes its share with a full copy of the parameters
        params = multihost_utils.process_allgather(params, tiled=True)
    reader = readers.from_config(config)
    settings = answering.AnswerSettings(n_docs=config.eval.n_docs, reader=reader.dev_reader or reader.name,
                                        batch_size=config.eval.batch_size // jax.process_count(),
                                        max_question_length=config.data.max_question_length,
                                        answer_prefix_space=config.data.answer_prefix_space)
    generation = trained_model.generation_config(model, config)
    counts = np.zeros(3 + 3 * len(ks), np.float64)
    if mine:
        answered = list(answering.answer_questions(model, params, retriever, mine, settings, generation))
        if records is not None:
            records.extend(record for record, _ in answered)
        for (record, texts), example in zip(answered, mine):
            score = metrics.score_question(record["answers"], prediction=record["prediction"],
                                              ranked_passages=texts)
            gold = str(example.get("gold_passage_id", -1))
            known = example.get("gold_passage_id", -1) >= 0
            counts[:3] += (1, score.exact_match, score.f1)
            for i, k in enumerate(ks):
                counts[3 + i] += score.first_hit_rank is not None and score.first_hit_rank < k
                counts[3 + len(ks) + i] += known and gold in record["doc_ids"][:k]
                counts[3 + 2 * len(ks) + i] += known
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
    total = max(counts[0], 1.0)
    out = {"eval/exact_match": 100 * counts[1] / total, "eval/f1": 100 * counts[2] / total,
           "eval/num_questions": float(counts[0])}
    for i, k in enumerate(ks):
        out[f"eval/recall@{k}"] = 100 * counts[3 + i] / total
        if counts[3 + 2 * len(ks) + i]:
            out[f"eval/gold_recall@{k}"] = 100 * counts[3 + len(ks) + i] / counts[3 + 2 * len(ks) + i]
    return out
