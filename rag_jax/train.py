"""Training RAG: the sharded train state, the jitted step, and the loop (the only training loop of rag_jax).

One step, `train_step(state, batch, rng, corpus) -> (state, metrics)`, jitted with explicit shardings and the state
donated: question encoding q(x), doc scores q(x)·d(z) against the retrieved documents' precomputed embeddings, BART
over the K documents, the RAG-Sequence or RAG-Token marginal NLL, and the optax update. The document encoder is frozen:
it is not in the state, its embeddings are the index. Retrieval (config retrieval.mode):
  host    the loop encodes the batch's questions with a separate jitted call, searches on the host (exact or
          ScaNN, rag_jax/retriever.py), forms the generator inputs there exactly as the reference does, and the step
          receives them with the retrieved embeddings; `corpus` is empty.
  device  `corpus` holds the index embeddings and every passage's generator tokens, split over all devices; the
          step searches (exact MIPS, make_sharded_topk) and assembles the generator inputs itself
          (rag_jax/retrieval/device_contexts.py). The query is q(x) without dropout in both modes.
The loop: input pipeline -> global batch -> retrieval -> step; progress lines, metrics.jsonl and TensorBoard on
process 0; periodic dev evaluation; orbax checkpoints (async, resume from the latest, save on SIGTERM); a NaN/inf
loss stops the run naming the step, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from rag_jax import checkpoint, decode, evaluation, experiment, inference, rag, sharding
from rag_jax.data import pipeline as pipeline_lib
from rag_jax.retrieval import device_contexts, exact, multihost
from rag_jax.retriever import Retriever

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


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the run stopped without saving that state."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # {"question_encoder": ..., "generator": ...}
    opt_state: Any


# ---------------------------------------------------------------------------------------------------- state


def init_params(model: rag.Rag, rng: jax.Array) -> dict[str, Any]:
    """Random parameters, still boxed with their logical axis names (nn.LogicallyPartitioned)."""
    q_rng, g_rng = jax.random.split(rng)
    ids = jnp.ones((1, 8), jnp.int32)
    q_vars = model.question_encoder.init(q_rng, ids, ids)
    g_vars = model.generator.init(g_rng, ids, ids, ids[:, :4])
    return {"question_encoder": q_vars["params"], "generator": g_vars["params"]}


def abstract_params(model: rag.Rag) -> Any:
    """Shapes and dtypes of the parameters (unboxed ShapeDtypeStructs)."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(init_params, model), jax.random.PRNGKey(0)))


def _boxed_state(model: rag.Rag, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = init_params(model, rng)
    # The optimizer state mirrors the boxed params, so Adam's moments inherit their logical axes.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_layout(model: rag.Rag, tx: optax.GradientTransformation, mesh) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings, state shardings): eval_shape -> logical specs -> NamedShardings."""
    boxed = jax.eval_shape(functools.partial(_boxed_state, model, tx), jax.random.PRNGKey(0))
    unboxed = nn.meta.unbox(boxed)
    shardings = sharding.tree_shardings(mesh, nn.get_partition_spec(boxed), unboxed)
    abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      unboxed, shardings)
    return abstract, shardings


def create_train_state(model: rag.Rag, tx: optax.GradientTransformation, mesh, rng: jax.Array,
                       pretrained: dict[str, Any] | None = None) -> TrainState:
    """The initial state, created already sharded; `pretrained` parts (numpy trees) replace the random ones."""
    _, shardings = state_layout(model, tx, mesh)
    pretrained = pretrained or {}
    # Traced outside `sharding.use`: Flax's DenseGeneral reshapes a boxed kernel at init, and a current mesh would
    # apply the kernel's 3-axis constraint to the flat 2-d array. out_shardings places everything anyway.
    params = jax.jit(lambda r: nn.meta.unbox(init_params(model, r)), out_shardings=shardings.params)(rng)
    for part, tree in pretrained.items():
        expected = jax.tree_util.tree_structure(params[part])
        if jax.tree_util.tree_structure(tree) != expected:
            raise experiment.ConfigError(f"pretrained {part} parameters do not match the model's structure")
        params[part] = jax.tree_util.tree_map(
            lambda x, ref, s: jax.device_put(np.asarray(x, ref.dtype), s), tree, params[part],
            shardings.params[part])
    init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), out_shardings=shardings)
    return init(params)


# ---------------------------------------------------------------------------------------------------- step


def _split_microbatches(batch: dict[str, jax.Array], count: int, mesh) -> dict[str, jax.Array]:
    """(B, ...) -> (count, B/count, ...) with microbatch i = rows i, i+count, ...: each device keeps its rows."""

    def split(key, x):
        x = x.reshape((x.shape[0] // count, count) + x.shape[1:]).swapaxes(0, 1)
        spec = sharding.named_sharding(mesh, (None,) + BATCH_AXES[key])
        return jax.lax.with_sharding_constraint(x, spec)

    return {key: split(key, x) for key, x in batch.items()}


def make_train_step(model: rag.Rag, tx: optax.GradientTransformation, config: ml_collections.ConfigDict, mesh,
                    state_shardings: TrainState, batch_keys, corpus_shardings: dict | None = None,
                    num_passages: int | None = None) -> Callable:
    """The jitted `train_step(state, batch, rng, corpus) -> (state, metrics)` (state donated).

    batch: global arrays with `batch_keys` (BATCH_AXES layout). rng: the run's base key; the step uses
    fold_in(rng, step). corpus: {} for host retrieval, else the CORPUS_AXES arrays (`device_corpus`).
    metrics: replicated float32 scalars loss, grad_norm, update_norm, learning_rate, gold_hits, gold_known.
    """
    gcfg = model.generator_config
    pad, bos, eos = gcfg.pad_token_id, gcfg.bos_token_id, gcfg.eos_token_id
    epsilon = float(config.model.label_smoothing)
    accum = int(config.train.grad_accum_steps)
    n_docs = int(config.model.n_docs)
    schedule = experiment.learning_rate_schedule(config)
    device_mode = config.retrieval.mode == "device"
    if device_mode:
        topk = exact.make_sharded_topk(mesh, n_docs, num_passages, corpus_axes=sharding.corpus_axes())
        gather = device_contexts.make_sharded_gather(mesh, sharding.corpus_axes())
    max_len = model.config.context.max_combined_length

    def constrain(key, x):
        return jax.lax.with_sharding_constraint(x, sharding.named_sharding(mesh, BATCH_AXES[key]))

    def retrieve(params, batch, corpus):
        q_BxD = model.encode_questions(params, batch["question_input_ids"], batch["question_attention_mask"])
        rows_BxK, _ = topk(jax.lax.stop_gradient(q_BxD), corpus["embeddings"])
        embeds, table = gather(rows_BxK, corpus["embeddings"], corpus["tokens"])
        ids, mask = device_contexts.assemble_contexts(table[..., 1:], table[..., 0], batch["question_gen_ids"],
                                                      batch["question_gen_length"], max_len, bos=bos, eos=eos,
                                                      pad=pad)
        found = {"doc_rows": rows_BxK, "doc_embeds": embeds.astype(jnp.float32), "context_input_ids": ids,
                 "context_attention_mask": mask}
        return {**batch, **{key: constrain(key, x) for key, x in found.items()}}

    def loss_fn(params, batch, rng):
        q_rng, g_rng = jax.random.split(rng)
        q_BxD = model.encode_questions(params, batch["question_input_ids"], batch["question_attention_mask"],
                                       dropout_rng=q_rng)
        scores_BxK = rag.doc_scores(q_BxD, batch["doc_embeds"])
        b, k, s = batch["context_input_ids"].shape
        logits = model.generator_logits(params, batch["context_input_ids"].reshape(b * k, s),
                                        batch["context_attention_mask"].reshape(b * k, s), batch["labels"],
                                        dropout_rng=g_rng)
        if config.model.loss == "sequence":
            nll_B = rag.rag_sequence_nll(logits, scores_BxK, batch["labels"], pad_token_id=pad, bos_token_id=bos,
                                         epsilon=epsilon)
        else:
            nll_B = rag.rag_token_nll(logits, scores_BxK, batch["labels"], pad_token_id=pad, epsilon=epsilon)
        return nll_B.mean()

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, batch, rng, corpus):
        rng = jax.random.fold_in(rng, state.step)
        if device_mode:
            batch = retrieve(state.params, batch, corpus)
        model_batch = {key: batch[key] for key in ("question_input_ids", "question_attention_mask", "labels",
                                                   "context_input_ids", "context_attention_mask", "doc_embeds")}
        if accum == 1:
            loss, grads = grad_fn(state.params, model_batch, rng)
        else:
            micro = _split_microbatches(model_batch, accum, mesh)

            def body(carry, xs):
                mb, i = xs
                loss_i, grads_i = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree_util.tree_map(jnp.add, carry, (loss_i, grads_i)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
            loss, grads = jax.tree_util.tree_map(lambda x: x / accum, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        gold = batch["gold_row"]
        hits = jnp.any(batch["doc_rows"] == gold[:, None], axis=1) & (gold >= 0)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),  # inf/NaN here means the new parameters are bad
            "learning_rate": schedule(state.step),
            "gold_hits": hits.sum().astype(jnp.float32),
            "gold_known": (gold >= 0).sum().astype(jnp.float32),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    batch_shardings = {key: sharding.named_sharding(mesh, BATCH_AXES[key]) for key in batch_keys}
    corpus_shardings = corpus_shardings or {}
    replicated = sharding.replicated(mesh)
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, replicated, corpus_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_encode(model: rag.Rag, mesh, param_shardings) -> Callable:
    """Jitted q(x) without dropout for host retrieval: (params, ids, mask) -> q (B, D), batch-sharded."""
    return jax.jit(lambda params, ids, mask: model.encode_questions(params, ids, mask),
                   in_shardings=(param_shardings, sharding.named_sharding(mesh, BATCH_AXES["question_input_ids"]),
                                 sharding.named_sharding(mesh, BATCH_AXES["question_input_ids"])),
                   out_shardings=sharding.named_sharding(mesh, ("batch", "embed")))


# ---------------------------------------------------------------------------------------------------- inputs


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
            from rag_jax import context  # pylint: disable=g-import-not-at-top

            questions = context.decode_questions(local["question_input_ids"], self.retriever.question_tokenizer)
            width = self.model.config.context.max_combined_length - 2
            arrays["question_gen_ids"], arrays["question_gen_length"] = device_contexts.question_tokens(
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
    to a multiple of them; every host reads only its devices' rows."""
    table = _on_main_first(lambda: device_contexts.passage_token_table(index, generator_tokenizer, fmt),
                           "passage_token_table")
    shards = sharding.corpus_size(mesh)
    n_padded = -(-index.num_passages // shards) * shards
    shardings = {key: sharding.named_sharding(mesh, axes) for key, axes in CORPUS_AXES.items()}
    arrays = {"embeddings": multihost.device_put_rows(index, shardings["embeddings"], n_padded),
              "tokens": multihost.device_put_rows(table, shardings["tokens"], n_padded)}
    return arrays, shardings


def _on_main_first(fn: Callable[[], Any], name: str) -> Any:
    """Runs `fn` on process 0 first (it may write shared files), then on the others."""
    if jax.process_count() == 1:
        return fn()
    result = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(f"rag_jax:{name}")
    return result if jax.process_index() == 0 else fn()


# ---------------------------------------------------------------------------------------------------- evaluation


def dev_generation_config(model: rag.Rag, config) -> decode.GenerationConfig:
    """Greedy decoding that starts like the training labels: from <s> (bos) at position 0.

    Training feeds `<s> answer </s>` as decoder inputs (the reference's fine-tuning data), so a model trained here
    has learnt p(answer | <s> at position 0). The reference generates from </s> (decoder_start_token_id 2), which
    works for a pretrained BART (it learnt </s> -> <s> in pre-training) but not for one trained from scratch.
    """
    g = model.generator_config
    return decode.GenerationConfig(max_length=config.eval.max_length, num_beams=1, decoder_start_token_id=g.bos_token_id,
                                   bos_token_id=g.bos_token_id, eos_token_id=g.eos_token_id,
                                   pad_token_id=g.pad_token_id)


def evaluate(model: rag.Rag, params, retriever: Retriever, examples, config) -> dict[str, float]:
    """Dev metrics: exact match / F1 of greedy RAG-Token answers, answer recall@k of retrieval, and recall@k of the
    gold passage (where known). Every process answers its share of the questions; counts are summed over them."""
    ks = [k for k in config.eval.recall_ks if k <= config.eval.n_docs]
    mine = list(examples)[jax.process_index()::jax.process_count()]
    if jax.process_count() > 1:  # each host decodes its share with a full copy of the parameters
        params = multihost_utils.process_allgather(params, tiled=True)
    gcfg = model.generator_config
    settings = inference.AnswerSettings(n_docs=config.eval.n_docs, model_type="token",
                                        batch_size=config.eval.batch_size // jax.process_count(),
                                        max_question_length=config.data.max_question_length,
                                        answer_prefix_space=config.data.answer_prefix_space)
    generation = dev_generation_config(model, config)
    counts = np.zeros(3 + 3 * len(ks), np.float64)
    if mine:
        answered = list(inference.answer_questions(model, params, retriever, mine, settings, generation))
        for (record, texts), example in zip(answered, mine):
            score = evaluation.score_question(record["answers"], prediction=record["prediction"],
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


# ---------------------------------------------------------------------------------------------------- logging


class MetricWriter:
    """metrics.jsonl and TensorBoard events in the workdir, written by process 0 only.

    On a restart from step s, lines after s are dropped from metrics.jsonl (and TensorBoard purges its events after
    s), so a resumed run's records are those of an uninterrupted one.
    """

    def __init__(self, workdir: str, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step or None)

    def write(self, step: int, metrics: dict[str, float], *, perf: dict[str, float] | None = None) -> None:
        """`metrics` go to both files; `perf` (timings, not reproducible) to TensorBoard only."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        for key, value in {**metrics, **(perf or {})}.items():
            self._tb.add_scalar(key, float(value), step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _Preemption:
    """SIGTERM (TPU VM preemption, `kill`) -> save at the next step and return. Multi-process jobs use JAX's
    preemption sync point so that every host stops at the same step."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handler)
            except ValueError:  # not the main thread: no handler, no preemption saves
                self._previous = None

    def _handler(self, signum, frame):
        del signum, frame
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled
                return False
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------------------------------- the loop


def _setup_workdir(workdir: str, tokenizers) -> None:
    """Keeps the run's tokenizers beside its checkpoints (RagTokenizer layout) for evaluation."""
    from rag_jax import tokenizers as tk  # pylint: disable=g-import-not-at-top

    os.makedirs(workdir, exist_ok=True)
    for sub, tok in ((tk.RAG_QUESTION_SUBDIR, tokenizers.question), (tk.RAG_GENERATOR_SUBDIR, tokenizers.generator)):
        if not os.path.isdir(os.path.join(workdir, sub)):
            tok.save_pretrained(os.path.join(workdir, sub))


@dataclasses.dataclass
class Run:
    """Everything a training run builds from its config before the first step (see `setup`)."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    tokenizers: Any
    model: rag.Rag
    pretrained: dict[str, Any]  # numpy params of the parts that start from a checkpoint
    train_source: Any
    dev_examples: list[dict[str, Any]]
    index: Any
    retriever: Retriever
    tx: optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs with shardings
    state_shardings: TrainState
    batches: BatchBuilder
    train_step: Callable  # train_step(state, batch, rng, corpus) -> (state, metrics)
    corpus: dict[str, jax.Array]  # device retrieval: the index on the devices; else {}

    def initial_state(self) -> TrainState:
        return create_train_state(self.model, self.tx, self.mesh, jax.random.PRNGKey(self.config.seed),
                                  self.pretrained)


def setup(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> Run:
    """Checks the config and builds the run's pieces: tokenizers, models, data, WORKDIR/index, the jitted step.

    Raises experiment.ConfigError naming the field for start-up problems. `mesh` defaults to config.mesh.
    """
    experiment.check_config(config)
    workdir = os.path.abspath(workdir)
    mesh = mesh if mesh is not None else sharding.mesh_from_config(config.mesh)
    experiment.check_batch(config, sharding.data_size(mesh), jax.process_count())
    tokenizers = experiment.load_tokenizers(config)
    models = experiment.build_rag(config)
    model = models.rag
    doc_config, doc_params = experiment.doc_encoder(config)
    experiment.check_vocab(models, doc_config, tokenizers, config)
    train_source = _on_main_first(lambda: experiment.data_source(config, "train"), "train_data")
    dev_examples = []
    if config.train.eval_every:
        dev_source = _on_main_first(lambda: experiment.data_source(config, "dev"), "dev_data")
        count = len(dev_source) if not config.eval.num_examples else min(config.eval.num_examples, len(dev_source))
        dev_examples = [dev_source[i] for i in range(count)]
    if jax.process_index() == 0:
        _setup_workdir(workdir, tokenizers)
    index = _on_main_first(lambda: experiment.ensure_index(config, workdir, doc_config, doc_params,
                                                           tokenizers.question, progress=jax.process_index() == 0),
                           "index")
    if index.dim != model.question_encoder_config.output_dim:
        raise experiment.ConfigError(
            f"{index.index_dir}: {index.dim}-d document embeddings but the question encoder gives "
            f"{model.question_encoder_config.output_dim}-d vectors (model.question_encoder vs model.doc_encoder)")
    if max(config.model.n_docs, config.eval.n_docs) > index.num_passages:
        raise experiment.ConfigError(f"config model.n_docs / eval.n_docs exceed the {index.num_passages} passages "
                                     f"of {config.data.passages}")
    retriever = Retriever(index, tokenizers.question, tokenizers.generator, model.config.context,
                          config.retrieval.host_searcher)

    tx = experiment.make_optimizer(config)
    abstract_state, state_shardings = state_layout(model, tx, mesh)
    corpus, corpus_shardings = {}, {}
    if config.retrieval.mode == "device":
        corpus, corpus_shardings = device_corpus(index, mesh, tokenizers.generator, model.config.context)
    batches = BatchBuilder(config, model, mesh, retriever,
                           make_encode(model, mesh, state_shardings.params) if config.retrieval.mode == "host"
                           else None)
    train_step = make_train_step(model, tx, config, mesh, state_shardings, batches.keys, corpus_shardings,
                                 index.num_passages)
    return Run(config, workdir, mesh, tokenizers, model, models.pretrained, train_source, dev_examples, index,
               retriever, tx, abstract_state, state_shardings, batches, train_step, corpus)


def make_pipeline(run: Run) -> pipeline_lib.TrainPipeline:
    """This host's slice of the run's deterministic training batches (position 0; set_state to move it)."""
    c = run.config
    return pipeline_lib.TrainPipeline(
        run.train_source, run.tokenizers.question, run.tokenizers.generator,
        global_batch_size=c.train.global_batch_size, seed=c.seed, max_question_length=c.data.max_question_length,
        max_target_length=c.data.max_target_length, answer_choice=c.data.answer_choice,
        answer_prefix_space=c.data.answer_prefix_space)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> dict[str, Any]:
    """Trains (resuming from WORKDIR/checkpoints when there is one) and returns the last logged metrics.

    Raises experiment.ConfigError for start-up problems and NonFiniteLossError when the loss diverges.
    """
    run = setup(config, workdir, mesh)
    workdir, mesh, model, retriever = run.workdir, run.mesh, run.model, run.retriever
    tokenizers, index, dev_examples, batches = run.tokenizers, run.index, run.dev_examples, run.batches
    train_step, corpus = run.train_step, run.corpus
    checkpointer = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                           async_save=config.train.async_checkpoints)
    pipeline = make_pipeline(run)
    start = checkpointer.latest_step()
    if start is not None:
        state, data_state = checkpointer.restore(start, run.abstract_state)
        pipeline.set_state(data_state)
        _log(f"resumed from {checkpointer.directory}/{start}")
    else:
        start = 0
        state = run.initial_state()
    dropout_rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2), sharding.replicated(mesh))
    writer = MetricWriter(workdir, start, jax.process_index() == 0)
    preemption = _Preemption()
    steps = int(config.train.steps)
    _log(f"training {steps} steps from step {start}: mesh {dict(mesh.shape)} ({mesh.size} devices), "
         f"{jax.process_count()} processes, retrieval {config.retrieval.mode}, K={config.model.n_docs}, "
         f"RAG-{config.model.loss}, {index.num_passages} passages")
    last: dict[str, Any] = {"step": start}
    interval: list[dict[str, float]] = []
    pending = None
    clock, clock_step, t_start = time.time(), start, time.time()

    def settle(step, metrics):
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        checked = ("loss", "grad_norm", "update_norm")
        if not all(math.isfinite(values[k]) for k in checked):
            checkpointer.wait()
            kept = checkpointer.latest_step()
            found = ", ".join(f"{k} {values[k]}" for k in checked)
            raise NonFiniteLossError(
                f"non-finite training values at step {step} ({found}); stopped without saving that state. The last "
                f"good checkpoint is {f'{checkpointer.directory}/{kept}' if kept is not None else 'none (none saved)'}"
                "; lower optim.learning_rate or check the data, then rerun to resume from it")
        interval.append(values)

    try:
        for step in range(start, steps):
            local = next(pipeline)
            with sharding.use(mesh):  # the models' logical constraints apply when the step is traced
                batch = batches(state.params, local)
                with jax.transfer_guard("disallow"):  # every host<->device copy of the step is explicit
                    state, metrics = train_step(state, batch, dropout_rng, corpus)
            if pending is not None:
                settle(*pending)
            done = step + 1
            pending = (done, metrics)
            stop = preemption.reached(done)
            boundary = done % config.train.log_every == 0 or done == steps
            save = done % config.train.checkpoint_every == 0 or done == steps or stop
            run_eval = bool(config.train.eval_every) and (done % config.train.eval_every == 0 or done == steps)
            if not (boundary or save or run_eval):
                continue
            settle(*pending)
            pending = None
            if boundary and interval:
                now = time.time()
                rate = (done - clock_step) * config.train.global_batch_size / max(now - clock, 1e-9)
                eta = (steps - done) * (now - t_start) / max(done - start, 1)
                logged = {k: float(np.mean([m[k] for m in interval])) for k in ("loss", "grad_norm")}
                logged["learning_rate"] = interval[-1]["learning_rate"]
                known = sum(m["gold_known"] for m in interval)
                if known:
                    logged["gold_recall"] = sum(m["gold_hits"] for m in interval) / known
                writer.write(done, logged, perf={"examples_per_sec": rate})
                gold = f" | gold@K {logged['gold_recall']:.2f}" if "gold_recall" in logged else ""
                _log(f"step {done}/{steps} | loss {logged['loss']:.4f}{gold} | lr {logged['learning_rate']:.2e}"
                     f" | {rate:.1f} ex/s | ETA {_duration(eta)}")
                last = {"step": done, **logged}
                interval, clock, clock_step = [], now, done
            if run_eval and dev_examples:
                t0 = time.time()
                results = evaluate(model, state.params, retriever, dev_examples, config)
                writer.write(done, results)
                _log(f"eval at step {done}: " + " | ".join(
                    f"{k[5:]} {v:.2f}" for k, v in results.items() if k != "eval/num_questions")
                     + f" ({int(results['eval/num_questions'])} questions, {time.time() - t0:.0f}s)")
                last.update(results)
            # After the evaluation: a run killed before this save completes redoes both from the previous one.
            if save:
                checkpointer.save(done, state, pipeline.get_state(), config)
            if stop:
                _log(f"preempted (SIGTERM): saved step {done}; rerun the same command to resume")
                last["preempted"] = True
                break
    finally:
        checkpointer.close()
        writer.close()
        preemption.close()
    last["step"] = int(jax.device_get(state.step))
    _log(f"done: step {last['step']}, {_duration(time.time() - t_start)}, workdir {workdir}")
    return last
