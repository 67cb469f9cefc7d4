"""Host side of a training step: this host's pipeline batch -> the step's global arrays, retrieval included.

Host retrieval (config retrieval.mode="host") encodes the questions with a jitted q(x), searches on the host and forms
the generator inputs with rag_jax/retrieval/retriever.py; device retrieval only adds the question part of the generator input
and puts the index and the passage token table on the devices once (`device_corpus`). Arrays carry the logical axes
of BATCH_AXES / CORPUS_AXES, mapped to the mesh by rag_jax/sharding.py.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from rag_jax import rag, sharding
from rag_jax.data import pipeline as pipeline_lib
from rag_jax.retrieval import contexts, multihost
from rag_jax.retrieval.retriever import Retriever

# Logical axes of every array a step can receive (host retrieval fills the context/doc entries, device retrieval the
# question_gen ones).
BATCH_AXES = {
    "question_input_ids": ("batch", "length"),
    "question_attention_mask": ("batch", "length"),
    "labels": ("batch", "length"),
    "gold_row": ("batch",),
    "context_input_ids": ("batch", "docs", "length"),
    "context_attention_mask": ("batch", "docs", "length"),
    "doc_embeds": ("batch", "docs", "embed"),
    "doc_rows": ("batch", "docs"),
    "question_gen_ids": ("batch", "length"),
    "question_gen_length": ("batch",),
}
CORPUS_AXES = {"embeddings": ("corpus", "embed"), "tokens": ("corpus", "length")}  # tokens: length, ids
HOST_KEYS = ("question_input_ids", "question_attention_mask", "labels", "gold_row", "context_input_ids",
             "context_attention_mask", "doc_embeds", "doc_rows")
DEVICE_KEYS = ("question_input_ids", "question_attention_mask", "labels", "gold_row", "question_gen_ids",
               "question_gen_length")


def make_encode(model: rag.Rag, mesh, param_shardings) -> Callable:
    """Jitted q(x) without dropout for host retrieval: (params, ids, mask) -> q (B, D), batch-sharded."""
    return jax.jit(lambda params, ids, mask: model.encode_questions(params, ids, mask),
                   in_shardings=(param_shardings, sharding.named_sharding(mesh, BATCH_AXES["question_input_ids"]),
                                 sharding.named_sharding(mesh, BATCH_AXES["question_input_ids"])),
                   out_shardings=sharding.named_sharding(mesh, ("batch", "embed")))


def _global(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    specs = {key: sharding.logical_to_spec(BATCH_AXES[key]) for key in local}
    return pipeline_lib.make_global_batch(local, mesh, specs)


def gold_rows(index, gold_passage_ids: np.ndarray) -> np.ndarray:
    """Index rows of gold passage ids (-1 where unknown or not in the corpus)."""
    rows = np.full(gold_passage_ids.shape, -1, np.int32)
    for i, pid in enumerate(gold_passage_ids):
        if pid >= 0:
            try:
                rows[i] = index.passages.row_for_id(int(pid))
            except KeyError:
                pass
    return rows


class BatchBuilder:
    """Host side of a step: a pipeline batch (this host's rows) -> the step's global batch, retrieval included."""

    def __init__(self, config, model: rag.Rag, mesh, retriever: Retriever, encode: Callable | None):
        self.config, self.model, self.mesh = config, model, mesh
        self.retriever, self.encode = retriever, encode
        self.device_mode = config.retrieval.mode == "device"
        self.keys = DEVICE_KEYS if self.device_mode else HOST_KEYS

    def __call__(self, params, local: dict[str, Any]) -> dict[str, jax.Array]:
        arrays = {
            "question_input_ids": local["question_input_ids"],
            "question_attention_mask": local["question_attention_mask"],
            "labels": local["labels"],
            "gold_row": gold_rows(self.retriever.index, local["gold_passage_id"]),
        }
        if self.device_mode:
            questions = contexts.decode_questions(local["question_input_ids"], self.retriever.question_tokenizer)
            width = contexts.table_width(self.model.config.context)
            arrays["question_gen_ids"], arrays["question_gen_length"] = contexts.question_tokens(
                questions, self.retriever.generator_tokenizer, width)
            return _global(arrays, self.mesh)
        questions = _global({k: arrays[k] for k in ("question_input_ids", "question_attention_mask")}, self.mesh)
        q_global = self.encode(params, questions["question_input_ids"], questions["question_attention_mask"])
        q_local = sharding.host_local_rows(q_global)
        n_docs = self.config.model.n_docs
        found = self.retriever(q_local, local["question_input_ids"], n_docs)
        batch, length = q_local.shape[0], found.context_input_ids_BKxS.shape[-1]
        arrays.update(
            doc_rows=found.rows_BxK,
            doc_embeds=found.doc_embeds_BxKxD.astype(np.float32),
            context_input_ids=found.context_input_ids_BKxS.reshape(batch, n_docs, length),
            context_attention_mask=found.context_attention_mask_BKxS.reshape(batch, n_docs, length),
        )
        out = _global({k: v for k, v in arrays.items() if k not in questions}, self.mesh)
        return {**questions, **out}


def device_corpus(index, mesh, generator_tokenizer, fmt) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """The index embeddings and the passage token table (length + tokens), rows split over all devices and padded
    to a multiple of them; every host reads only its devices' rows. Refuses (SplitTokenizationError) a generator
    tokenizer for which on-device assembly would not give the host's ids on the first passages."""
    first = list(itertools.islice(index.passages.iter_passages(), 64))
    contexts.check_split_tokenization([p.title for p in first], [p.text for p in first], contexts.PROBE_QUESTIONS,
                                      generator_tokenizer, fmt)
    table = on_main_first(lambda: contexts.passage_token_table(index, generator_tokenizer, fmt),
                           "passage_token_table")
    shards = sharding.corpus_size(mesh)
    n_padded = -(-index.num_passages // shards) * shards
    shardings = {key: sharding.named_sharding(mesh, axes) for key, axes in CORPUS_AXES.items()}
    arrays = {"embeddings": multihost.device_put_rows(index, shardings["embeddings"], n_padded),
              "tokens": multihost.device_put_rows(table, shardings["tokens"], n_padded)}
    return arrays, shardings


def on_main_first(fn: Callable[[], Any], name: str) -> Any:
    """Runs `fn` on process 0 first (it may write shared files), then on the others."""
    if jax.process_count() == 1:
        return fn()
    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"rag_jax:{name}")
    return result if jax.process_index() == 0 else fn()
