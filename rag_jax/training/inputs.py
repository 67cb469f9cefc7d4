"""Host side of a training step: this host's pipeline batch -> the step's global arrays, retrieval included.

Host retrieval (config retrieval.mode="host") encodes the questions with a jitted q(x), searches on the host and forms
the generator inputs with rag_jax/retrieval/retriever.py; device retrieval only adds the question part of the generator input
and puts the index and the passage token table on the devices once (`device_corpus`). Arrays carry the logical axes
of BATCH_AXES / CORPUS_AXES, mapped to the mesh by rag_jax/sharding.py. StepInputs runs step s+1's host work while
step s computes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from rag_jax import rag, sharding
from rag_jax.data import pipeline as pipeline_lib
from rag_jax.data import prefetch
from rag_jax.retrieval import code_search, codes as codes_lib, contexts, embed, multihost
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
    # End-to-end training (model.doc_encoder.trainable): the retrieved passages' document-encoder tokens.
    "doc_input_ids": ("batch", "docs", "length"),
    "doc_attention_mask": ("batch", "docs", "length"),
    "doc_token_type_ids": ("batch", "docs", "length"),
}
# tokens: length, generator ids; doc_tokens (end-to-end training only): length, doc-encoder ids, token types
CORPUS_AXES = {"embeddings": ("corpus", "embed"), "tokens": ("corpus", "length"), "doc_tokens": ("corpus", "length"),
               # a compressed index (index.codes) in device mode: codes.CodeArrays' fields, and pq's codebooks
               "codes": ("corpus", "embed"), "code_scale": ("corpus",), "code_bias": ("corpus",),
               "codebooks": (None, None, None)}
HOST_KEYS = ("question_input_ids", "question_attention_mask", "labels", "gold_row", "context_input_ids",
             "context_attention_mask", "doc_embeds", "doc_rows")
DOC_TOKEN_KEYS = ("doc_input_ids", "doc_attention_mask", "doc_token_type_ids")
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


@dataclasses.dataclass
class Prepared:
    """A step's inputs as far as they go without the parameters: this host's arrays; in host mode also the questions
    decoded back to text and the question encoder's global input, in device mode the whole global batch."""

    arrays: dict[str, np.ndarray]
    question_texts: list[str] | None = None
    questions: dict[str, jax.Array] | None = None
    batch: dict[str, jax.Array] | None = None


class BatchBuilder:
    """Host side of a step: a pipeline batch (this host's rows) -> the step's global batch, retrieval included.

    In two parts, so that the first can run ahead of the parameters (StepInputs): `prepare` (no parameters), then
    `encode_questions` + `complete` (host retrieval with q(x) of the given parameters)."""

    def __init__(self, config, model: rag.Rag, mesh, retriever: Retriever, encode: Callable | None):
        self.config, self.model, self.mesh = config, model, mesh
        self.retriever, self.encode = retriever, encode
        self.device_mode = config.retrieval.mode == "device"
        self.keys = DEVICE_KEYS if self.device_mode else HOST_KEYS + (DOC_TOKEN_KEYS if model.trains_doc_encoder
                                                                      else ())

    def __call__(self, params, local: dict[str, Any]) -> dict[str, jax.Array]:
        prepared = self.prepare(local)
        return self.complete(prepared, self.encode_questions(params, prepared))

    def for_thread(self) -> BatchBuilder:
        """The same builder with its own tokenizers, for another thread (Retriever.with_own_tokenizers)."""
        return BatchBuilder(self.config, self.model, self.mesh, self.retriever.with_own_tokenizers(), self.encode)

    def prepare(self, local: dict[str, Any]) -> Prepared:
        """Everything of the step's inputs that does not need the parameters."""
        arrays = {
            "question_input_ids": local["question_input_ids"],
            "question_attention_mask": local["question_attention_mask"],
            "labels": local["labels"],
            "gold_row": gold_rows(self.retriever.index, local["gold_passage_id"]),
        }
        texts = contexts.context_questions(local.get("question"), local["question_input_ids"],
                                           self.retriever.question_tokenizer, self.retriever.format)
        if self.device_mode:
            width = contexts.table_width(self.model.config.context)
            arrays["question_gen_ids"], arrays["question_gen_length"] = contexts.question_tokens(
                texts, self.retriever.generator_tokenizer, width)
            return Prepared(arrays, batch=_global(arrays, self.mesh))
        questions = _global({k: arrays[k] for k in ("question_input_ids", "question_attention_mask")}, self.mesh)
        return Prepared(arrays, texts, questions)

    def encode_questions(self, params, prepared: Prepared) -> jax.Array | None:
        """q(x) (global, B x D) of a prepared host-mode batch under `params`, dispatched and not waited for (so the
        parameters are read before a following step donates them); None in device mode."""
        if prepared.batch is not None:
            return None
        return self.encode(params, prepared.questions["question_input_ids"],
                           prepared.questions["question_attention_mask"])

    def complete(self, prepared: Prepared, q_global: jax.Array | None) -> dict[str, jax.Array]:
        """The step's global batch: host retrieval with the question vectors `q_global` (device mode: as prepared)."""
        if prepared.batch is not None:
            return prepared.batch
        q_local = sharding.host_local_rows(q_global)
        n_docs = candidates(self.config)  # the step keeps the best n_docs of them when reranking
        found = self.retriever(q_local, prepared.arrays["question_input_ids"], n_docs, prepared.question_texts)
        batch, length = q_local.shape[0], found.context_input_ids_BKxS.shape[-1]
        arrays = dict(
            prepared.arrays,
            doc_rows=found.rows_BxK,
            doc_embeds=found.doc_embeds_BxKxD.astype(np.float32),
            context_input_ids=found.context_input_ids_BKxS.reshape(batch, n_docs, length),
            context_attention_mask=found.context_attention_mask_BKxS.reshape(batch, n_docs, length),
        )
        if self.model.trains_doc_encoder:
            arrays.update({key: x.reshape(batch, n_docs, -1) for key, x in found.doc_tokens.items()})
        out = _global({k: v for k, v in arrays.items() if k not in prepared.questions}, self.mesh)
        return {**prepared.questions, **out}


class StepInputs:
    """The global batches of `count` steps from the pipeline's position, the host work of step s+1 overlapped with
    the device work of step s.

    overlap: step s+1's parameter-independent host work (reading and tokenising its questions, decoding them back to
      text, gold rows, putting the question arrays on the devices; in device mode all of it) runs in a background
      thread (rag_jax/data/prefetch.py) while step s computes. The batches are the same as without it.
    stale (host mode): step s+1's question encoding, search and context assembly also run during step s, with the
      parameters step s starts from: retrieval one step stale (config retrieval.stale_prefetch). The first step
      after a start or a resume retrieves with its own parameters.
    Each batch comes with the pipeline position after it, the data state to save with that step's checkpoint
    (the pipeline itself is not moved: the background thread reads ahead of the step that is saved).
    """

    def __init__(self, builder: BatchBuilder, pipeline: pipeline_lib.TrainPipeline, count: int, *,
                 overlap: bool = True, stale: bool = False):
        first = pipeline.get_state()["step"]
        ahead = overlap or stale
        prep_builder = builder.for_thread() if ahead else builder  # each thread its own tokenizers
        prep_pipeline = pipeline.with_tokenizers(prep_builder.retriever.question_tokenizer,
                                                 prep_builder.retriever.generator_tokenizer) if ahead else pipeline

        def prepare(step: int) -> tuple[Prepared, dict[str, int]]:
            return prep_builder.prepare(prep_pipeline.batch_at(step)), pipeline.state_at(step + 1)

        self._builder = builder
        self._prepared = prefetch.prefetch(range(first, first + count), prepare, enabled=ahead)
        self._stale_builder = builder.for_thread() if stale else None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stale") if stale else None
        self._left = count
        self._next: concurrent.futures.Future | None = None  # stale: the following step's batch, under way

    def next(self, params) -> tuple[dict[str, jax.Array], dict[str, int]]:
        """(the next step's global batch, the pipeline position after it); `params` are those the step starts from
        (call under sharding.use(mesh))."""
        self._left -= 1
        if self._pool is None:
            prepared, data_state = next(self._prepared)
            return self._builder.complete(prepared, self._builder.encode_questions(params, prepared)), data_state
        current = self._next if self._next is not None else self._retrieve_ahead(params)
        self._next = self._retrieve_ahead(params) if self._left > 0 else None
        return current.result()

    def _retrieve_ahead(self, params) -> concurrent.futures.Future:
        prepared, data_state = next(self._prepared)
        q_global = self._builder.encode_questions(params, prepared)  # here: before the step donates `params`
        return self._pool.submit(lambda: (self._stale_builder.complete(prepared, q_global), data_state))

    def settle(self) -> None:
        """Waits for the retrieval under way (stale mode), so that nothing searches while an index refresh moves the
        searcher: the step after a refresh then keeps the batch retrieved from the previous version, one step
        stale as every stale batch is."""
        if self._next is not None:
            concurrent.futures.wait([self._next])

    def close(self) -> None:
        """Waits for the background work under way and ends its threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._prepared.close()


def candidates(config) -> int:
    """Passages retrieved per question for a step: retrieval.rerank_candidates L when reranking, else model.n_docs."""
    return int(config.retrieval.get("rerank_candidates", 0)) or int(config.model.n_docs)


def device_codes_kind(config) -> str | None:
    """'int8' or 'pq' when device mode holds the index's codes (config index.codes set), else None."""
    spec = config.index.get("codes", "")  # (absent from configs saved before it)
    return codes_lib.parse_spec(spec).kind if spec and config.retrieval.mode == "device" else None


def device_code_corpus(index, mesh) -> dict[str, jax.Array]:
    """The index's codes split over the corpus axes, padded to codes.capacity rows (so that an update or refresh
    within it reuses the compiled step; padding and removed rows get bias -inf), and pq's codebooks replicated."""
    capacity = codes_lib.capacity(index.num_passages, sharding.corpus_size(mesh))
    table = code_search.index_codes.CodeTable(index)
    host = code_search.padded_arrays(table, index.removed_rows, capacity)
    put = lambda key, x: code_search.put_rows(np.asarray(x), sharding.named_sharding(mesh, CORPUS_AXES[key]), capacity)
    arrays = {"codes": put("codes", host.codes), "code_scale": put("code_scale", host.scale_N),
              "code_bias": put("code_bias", host.bias_N)}
    if table.codebooks is not None:
        arrays["codebooks"] = jax.device_put(table.codebooks, sharding.named_sharding(mesh, CORPUS_AXES["codebooks"]))
    return arrays


def device_corpus(index, mesh, generator_tokenizer, fmt, *, doc_tokenizer=None,
                  doc_max_length: int | None = None, codes: bool = False
                  ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """The index embeddings and the passage token table (length + tokens), rows split over all devices and padded
    to a multiple of them; every host reads only its devices' rows. With a `doc_tokenizer` (end-to-end training)
    also every passage's document-encoder tokens (embed.doc_token_table). Refuses (SplitTokenizationError) a
    generator tokenizer for which on-device assembly would not give the host's ids on the first passages."""
    contexts.check_split_on_first_passages(index, generator_tokenizer, fmt)
    table = on_main_first(lambda: contexts.passage_token_table(index, generator_tokenizer, fmt),
                           "passage_token_table")
    shards = sharding.corpus_size(mesh)
    n_padded = -(-index.num_passages // shards) * shards
    if codes:  # codes instead of the embeddings; every corpus array padded to the codes' capacity
        n_padded = codes_lib.capacity(index.num_passages, shards)
        arrays = {**device_code_corpus(index, mesh),
                  "tokens": multihost.device_put_rows(table, sharding.named_sharding(mesh, CORPUS_AXES["tokens"]),
                                                      n_padded)}
    else:
        arrays = {"embeddings": multihost.device_put_rows(index, sharding.named_sharding(mesh, CORPUS_AXES[
            "embeddings"]), n_padded), "tokens": multihost.device_put_rows(
                table, sharding.named_sharding(mesh, CORPUS_AXES["tokens"]), n_padded)}
    keys = tuple(arrays) + (("doc_tokens",) if doc_tokenizer is not None else ())
    shardings = {key: sharding.named_sharding(mesh, CORPUS_AXES[key]) for key in keys}
    if doc_tokenizer is not None:
        # Tokenised in memory on every host (not cached in the index directory like the generator table).
        doc_table = embed.doc_token_table(doc_tokenizer, index.passages.get(np.arange(index.num_passages)),
                                          doc_max_length)
        arrays["doc_tokens"] = multihost.device_put_rows(doc_table, shardings["doc_tokens"], n_padded)
    return arrays, shardings


def host_context_table(config, index, generator_tokenizer, fmt) -> np.ndarray | None:
    """retrieval.host_contexts: the passage token table host retrieval glues generator inputs from
    (contexts.table_generator_inputs), or None to tokenise strings. "auto" builds the table unless it would tokenise
    more passages than the run forms contexts, or the tokenizer joins tokens at the passage/question boundary."""
    mode = config.retrieval.get("host_contexts", "strings")  # (absent from configs saved before it)
    contexts_to_form = config.train.steps * config.train.global_batch_size * candidates(config)
    return on_main_first(lambda: contexts.host_context_table(
        index, generator_tokenizer, fmt, mode, contexts_to_form, remedy="set --config.retrieval.host_contexts=strings"
    ), "host_context_table")


def on_main_first(fn: Callable[[], Any], name: str) -> Any:
    """Runs `fn` on process 0 first (it may write shared files), then on the others."""
    if jax.process_count() == 1:
        return fn()
    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"rag_jax:{name}")
    return result if jax.process_index() == 0 else fn()
