"""Answering questions with a RAG model: encode, retrieve, decode, and optionally score the gold answer.

Shared by `experiments.eval_nq` and the periodic dev evaluation of training. Batches keep a fixed number of rows
(the last one padded) and question lengths rounded up to a bucket, so every jitted function compiles once.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np

from rag_jax import rag
from rag_jax.data import prefetch
from rag_jax.data import tokenizers
from rag_jax.inference import metrics, provenance, rag_decoding
from rag_jax.inference.generation import GenerationConfig
from rag_jax.retrieval.retriever import Retriever

QUESTION_BUCKET = 16
# The generator tokenizer pads every context to max_combined_length (300 by default), while a passage and its
# question often take a third of it; decoding's cost grows with the context length, so contexts are cut to the
# batch's longest, rounded up to this bucket (few shapes to compile; only padding is dropped, masked out anyway);
# RAG-Token only (see _prepare; RAG-Sequence's rescoring cuts its contexts itself, rag_decoding.masked_width).
CONTEXT_BUCKET = rag_decoding.CONTEXT_BUCKET


@dataclasses.dataclass(frozen=True)
class AnswerSettings:
    n_docs: int = 5
    model_type: str = "sequence"  # "sequence" | "token"
    decoding: str = "thorough"  # RAG-Sequence only: "thorough" (the reference) | "fast" (the paper's approximation)
    batch_size: int = 8
    max_question_length: int = 128
    score: bool = False  # also the NLL of the first gold answer under RAG-Sequence and RAG-Token
    answer_prefix_space: bool = False  # tokenise gold answers as " answer" (how rag_jax training labels are made)
    provenance: bool = False  # also the document posteriors of each answer, per answer and per token (provenance.py)
    overlap: bool = True  # prepare batch n+1 on the host while batch n decodes (same outputs; data/prefetch.py)

    def __post_init__(self):
        if self.model_type not in ("sequence", "token"):
            raise ValueError(f"model_type must be 'sequence' or 'token', got {self.model_type!r}")
        if self.decoding not in ("thorough", "fast"):
            raise ValueError(f"decoding must be 'thorough' or 'fast', got {self.decoding!r}")


def _bucket(length: int, bucket: int, cap: int) -> int:
    return min(cap, -(-length // bucket) * bucket)


def _pad_to(array: np.ndarray, rows: int, length: int | None = None) -> np.ndarray:
    """`array` with rows repeated from row 0 up to `rows`, and its second axis zero-padded to `length`."""
    array = np.asarray(array)
    if length is not None:
        array = np.pad(array, [(0, 0), (0, length - array.shape[1])])
    filler = np.repeat(array[:1], rows - array.shape[0], axis=0)
    return np.concatenate([array, filler]).astype(array.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _encode(model: rag.Rag, params, ids, mask):
    return model.encode_questions(params, ids, mask)


@functools.partial(jax.jit, static_argnums=0)
def _nlls(model: rag.Rag, params, context_ids, context_mask, doc_embeds, q, labels):
    scores = rag.doc_scores(q, doc_embeds)
    logits = model.generator_logits(params, context_ids, context_mask, labels)
    pad = model.generator_config.pad_token_id
    return (
        rag.rag_sequence_nll(logits, scores, labels, pad_token_id=pad),
        rag.rag_token_nll(logits, scores, labels, pad_token_id=pad),
    )


@jax.jit
def _posteriors(doc_scores_BxK, token_ll_BxKxL):
    return rag.doc_posteriors(doc_scores_BxK, token_ll_BxKxL)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclasses.dataclass
class _Prepared:
    """One batch's inputs to decoding, padded to the full batch size."""

    retrieved: Any  # retriever.Retrieved of the real rows
    q_pad: np.ndarray
    embeds: np.ndarray
    context_ids: np.ndarray
    context_mask: np.ndarray
    scores_BxK: np.ndarray


def _prepare(model: rag.Rag, params, retriever: Retriever, settings: AnswerSettings, batch) -> _Prepared:
    """Everything before decoding: tokenise and encode the questions, retrieve, form the generator inputs."""
    rows, k, n = settings.batch_size, settings.n_docs, len(batch)
    encoded = retriever.question_tokenizer([e["question"] for e in batch], truncation=True, padding=True,
                                           max_length=settings.max_question_length, return_tensors="np")  # fmt: skip
    length = _bucket(encoded["input_ids"].shape[1], QUESTION_BUCKET, settings.max_question_length)
    ids, mask = (_pad_to(encoded[key], rows, length) for key in ("input_ids", "attention_mask"))
    q = np.asarray(_encode(model, params, ids, mask))[:n]
    retrieved = retriever(q, ids[:n], k)
    # Device work runs on full-size batches (padding rows repeat row 0) so that it compiles once.
    q_pad = _pad_to(q, rows)
    embeds = _pad_to(retrieved.doc_embeds_BxKxD, rows)
    context_mask = retrieved.context_attention_mask_BKxS
    width = _bucket(int(context_mask.sum(1).max()), CONTEXT_BUCKET, context_mask.shape[1])
    if settings.model_type == "sequence":
        # RAG-Sequence's per-document beam search attends to the contexts' padding, as the reference's does (it
        # passes attention_mask=None: rag_decoding.rag_sequence_generate's mask_beams), so its answers depend on
        # the padded length (T5's visibly, found by experiments/bench/eval.py): its contexts keep their full length
        # (its rescoring, which masks the padding, drops it: rag_decoding.masked_width).
        width = context_mask.shape[1]
    return _Prepared(
        retrieved=retrieved, q_pad=q_pad, embeds=embeds,
        context_ids=_pad_to(retrieved.context_input_ids_BKxS[:, :width], rows * k),
        context_mask=_pad_to(context_mask[:, :width], rows * k),
        scores_BxK=np.asarray(rag.doc_scores(q_pad, embeds)),
    )  # fmt: skip


def answer_questions(
    model: rag.Rag,
    params,
    retriever: Retriever,
    examples: Sequence[dict[str, Any]],
    settings: AnswerSettings,
    generation: GenerationConfig,
    progress: Iterable | None = None,
) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """Yields per example (record, texts of its retrieved passages); the record holds question, answers,
    prediction, doc_ids, doc_scores, with `settings.score` nll_sequence / nll_token, and with `settings.provenance`
    provenance (provenance.entry)."""
    # A fast tokenizer keeps its truncation/padding settings in shared state and may not be entered from two
    # threads at once, so this thread decodes and tokenises labels with its own copy.
    gtok = copy.deepcopy(retriever.generator_tokenizer) if settings.overlap else retriever.generator_tokenizer
    rows = settings.batch_size
    prepare = functools.partial(_prepare, model, params, retriever, settings)
    # Batch n+1's host work (tokenising, encoding, searching, forming contexts) runs while batch n decodes.
    for batch, prepared in zip(_batches(examples, rows), prefetch.prefetch(_batches(examples, rows), prepare,
                                                                           enabled=settings.overlap)):  # fmt: skip
        n, retrieved, scores = len(batch), prepared.retrieved, prepared.scores_BxK
        context_ids, context_mask = prepared.context_ids, prepared.context_mask
        if settings.model_type == "token":
            decoded = rag_decoding.rag_token_generate(
                model, params, context_ids, context_mask, scores, generation, return_token_ll=settings.provenance
            )
        else:
            decoded = rag_decoding.rag_sequence_generate(
                model, params, context_ids, context_mask, scores, generation, mode=settings.decoding,
                return_token_ll=settings.provenance,
            )  # fmt: skip
        tokens = decoded[0] if settings.provenance else decoded
        if settings.provenance:
            per_token, per_answer = (np.asarray(x) for x in _posteriors(scores, decoded[1]))
        predictions = gtok.batch_decode(np.asarray(tokens)[:n].tolist(), skip_special_tokens=True)
        if settings.score:
            prefix = " " if settings.answer_prefix_space else ""
            labels = tokenizers.decoder_labels(gtok, [prefix + e["answers"][0] for e in batch], padding=True)
            labels = np.pad(labels, [(0, 0), (0, -labels.shape[1] % 8)], constant_values=gtok.pad_token_id)
            nll_seq, nll_tok = _nlls(model, params, context_ids, context_mask, prepared.embeds, prepared.q_pad,
                                     _pad_to(labels, rows))  # fmt: skip
        for i, example in enumerate(batch):
            record = {
                "question": example["question"],
                "answers": list(example["answers"]),
                "prediction": predictions[i].strip(),
                "doc_ids": retrieved.doc_ids[i],
                "doc_scores": [float(s) for s in scores[i]],
            }
            if settings.score:
                record["nll_sequence"] = float(nll_seq[i])
                record["nll_token"] = float(nll_tok[i])
            if settings.provenance:
                record["provenance"] = provenance.entry(
                    retrieved.passages[i], scores[i], per_answer[i], per_token[i], np.asarray(tokens)[i], gtok,
                    model.generator_config.pad_token_id,
                )  # fmt: skip
            yield record, [p.text for p in retrieved.passages[i]]
        if progress is not None:
            progress.update(len(batch))


def summarize(answered: Sequence[tuple[dict[str, Any], list[str]]], ks: Sequence[int]) -> dict[str, float | int]:
    """EM / F1 of the predictions and recall@k of the retrieved passages."""
    scores = [
        metrics.score_question(record["answers"], prediction=record["prediction"], ranked_passages=texts)
        for record, texts in answered
    ]
    return metrics.summarize(scores, ks=ks)
