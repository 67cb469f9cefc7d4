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
from rag_jax.inference import metrics, provenance
from rag_jax.readers import base, registry
from rag_jax.readers.generation import GenerationConfig
from rag_jax.retrieval import contexts
from rag_jax.retrieval.retriever import Retriever

QUESTION_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class AnswerSettings:
    n_docs: int = 5
    reader: str = "rag_sequence"  # rag_jax/readers/registry.py name ("sequence" / "token": the old names)
    decoding: str = "thorough"  # RAG-Sequence only: "thorough" (the reference) | "fast" (the paper's approximation)
    batch_size: int = 8
    max_question_length: int = 128
    score: bool = False  # also the reader's scores of the first gold answer (RAG: NLL under RAG-Sequence and -Token)
    answer_prefix_space: bool = False  # tokenise gold answers as " answer" (how rag_jax training labels are made)
    provenance: bool = False  # also the document posteriors of each answer, per answer and per token (provenance.py)
    # A closed set of answers (a task's label words): each is scored by the reader and the likeliest is the
    # prediction, instead of free decoding (decoding restricted to the label words).
    choices: tuple[str, ...] = ()
    pages: bool = False  # also the retrieved passages' titles, "doc_titles" (KILT's pages, for R-Precision)
    overlap: bool = True  # prepare batch n+1 on the host while batch n decodes (same outputs; data/prefetch.py)

    def __post_init__(self):
        registry.get(self.reader)  # a ValueError naming the known readers
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


def _prepare(model: rag.Rag, params, retriever: Retriever, settings: AnswerSettings, reader: base.Reader,
             batch) -> _Prepared:
    """Everything before decoding: tokenise and encode the questions, retrieve, form the generator inputs."""
    rows, k, n = settings.batch_size, settings.n_docs, len(batch)
    encoded = retriever.question_tokenizer([e["question"] for e in batch], truncation=True, padding=True,
                                           max_length=settings.max_question_length, return_tensors="np")  # fmt: skip
    length = _bucket(encoded["input_ids"].shape[1], QUESTION_BUCKET, settings.max_question_length)
    ids, mask = (_pad_to(encoded[key], rows, length) for key in ("input_ids", "attention_mask"))
    q = np.asarray(_encode(model, params, ids, mask))[:n]
    written = contexts.context_questions([e["question"] for e in batch], ids[:n], retriever.question_tokenizer,
                                         retriever.format)
    retrieved = retriever(q, ids[:n], k, written)
    # Device work runs on full-size batches (padding rows repeat row 0) so that it compiles once.
    q_pad = _pad_to(q, rows)
    embeds = _pad_to(retrieved.doc_embeds_BxKxD, rows)
    context_mask = retrieved.context_attention_mask_BKxS
    # The generator tokenizer pads every context to max_combined_length (300 by default), while a passage and its
    # question often take a third of it, and decoding's cost grows with the width: the reader says how much of it
    # it needs (base.Reader.context_width: the batch's longest, rounded up to a bucket; RAG-Sequence all of it).
    width = reader.context_width(context_mask)
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
    prediction, doc_ids, doc_scores, with `settings.score` the reader's scores (RAG: nll_sequence / nll_token), and
    with `settings.provenance` provenance (provenance.entry)."""
    # A fast tokenizer keeps its truncation/padding settings in shared state and may not be entered from two
    # threads at once, so this thread decodes and tokenises labels with its own copy.
    gtok = copy.deepcopy(retriever.generator_tokenizer) if settings.overlap else retriever.generator_tokenizer
    rows = settings.batch_size
    reader = registry.get(settings.reader)
    prepare = functools.partial(_prepare, model, params, retriever, settings, reader)
    # Batch n+1's host work (tokenising, encoding, searching, forming contexts) runs while batch n decodes.
    for batch, prepared in zip(_batches(examples, rows), prefetch.prefetch(_batches(examples, rows), prepare,
                                                                           enabled=settings.overlap)):  # fmt: skip
        n, retrieved, scores = len(batch), prepared.retrieved, prepared.scores_BxK
        context_ids, context_mask = prepared.context_ids, prepared.context_mask
        decoded = reader.generate(model, params, context_ids, context_mask, scores, generation,
                                  decoding=settings.decoding, provenance=settings.provenance)
        tokens = decoded.tokens_NxL
        if settings.provenance:
            per_token, per_answer = (np.asarray(x) for x in decoded[1:])
        predictions = gtok.batch_decode(np.asarray(tokens)[:n].tolist(), skip_special_tokens=True)
        if settings.choices:
            predictions = _likeliest_choices(model, params, reader, prepared, settings, gtok)[:n]
        if settings.score:
            labels = _gold_labels(gtok, [e["answers"][0] for e in batch], settings)
            scored = reader.score(model, params, context_ids, context_mask, prepared.q_pad, prepared.embeds,
                                  labels)  # fmt: skip
        for i, example in enumerate(batch):
            record = {
                "question": example["question"],
                "answers": list(example["answers"]),
                "prediction": predictions[i].strip(),
                "doc_ids": retrieved.doc_ids[i],
                "doc_scores": [float(s) for s in scores[i]],
            }
            if settings.pages:
                record["doc_titles"] = [p.title for p in retrieved.passages[i]]
            if settings.score:
                record.update({name: float(values[i]) for name, values in scored.items()})
            if settings.provenance:
                record["provenance"] = provenance.entry(
                    retrieved.passages[i], scores[i], per_answer[i], per_token[i], np.asarray(tokens)[i], gtok,
                    model.generator_config.pad_token_id,
                )  # fmt: skip
            yield record, [p.text for p in retrieved.passages[i]]
        if progress is not None:
            progress.update(len(batch))


def _gold_labels(gtok, texts: Sequence[str], settings: AnswerSettings) -> np.ndarray:
    """Decoder labels of `texts` (as training makes them), padded to a multiple of 8 columns and the batch's rows."""
    prefix = " " if settings.answer_prefix_space else ""
    labels = tokenizers.decoder_labels(gtok, [prefix + text for text in texts], padding=True)
    labels = np.pad(labels, [(0, 0), (0, -labels.shape[1] % 8)], constant_values=gtok.pad_token_id)
    return _pad_to(labels, settings.batch_size)


def _likeliest_choices(model: rag.Rag, params, reader: base.Reader, prepared: _Prepared, settings: AnswerSettings,
                       gtok) -> list[str]:
    """Per row, the choice whose NLL under the reader is lowest (its own nll_<kind> score, else the first it has)."""
    nlls = []
    for choice in settings.choices:
        labels = _gold_labels(gtok, [choice] * settings.batch_size, settings)
        scored = reader.score(model, params, prepared.context_ids, prepared.context_mask, prepared.q_pad,
                              prepared.embeds, labels)  # fmt: skip
        own = f"nll_{reader.name.removeprefix('rag_')}"
        nlls.append(np.asarray(scored[own] if own in scored else next(iter(scored.values()))))
    return [settings.choices[i] for i in np.argmin(np.stack(nlls, 1), axis=1)]


def summarize(answered: Sequence[tuple[dict[str, Any], list[str]]], ks: Sequence[int]) -> dict[str, float | int]:
    """EM / F1 of the predictions and recall@k of the retrieved passages."""
    scores = [
        metrics.score_question(record["answers"], prediction=record["prediction"], ranked_passages=texts)
        for record, texts in answered
    ]
    return metrics.summarize(scores, ks=ks)
