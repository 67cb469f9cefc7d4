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

from rag_jax import checkpoint, experiment, rag, sharding, train_eval, train_inputs
from rag_jax.data import pipeline as pipeline_lib
from rag_jax.metric_writer import MetricWriter
from rag_jax.retrieval import device_contexts, exact
from rag_jax.retriever import Retriever
from rag_jax.train_inputs import BATCH_AXES


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
    fold_in(rng, step). corpus: {} for host retrieval, else train_inputs.device_corpus's arrays.
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


# ---------------------------------------------------------------------------------------------------- logging


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
    batches: train_inputs.BatchBuilder
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
    train_source = train_inputs.on_main_first(lambda: experiment.data_source(config, "train"), "train_data")
    dev_examples = []
    if config.train.eval_every:
        dev_source = train_inputs.on_main_first(lambda: experiment.data_source(config, "dev"), "dev_data")
        count = len(dev_source) if not config.eval.num_examples else min(config.eval.num_examples, len(dev_source))
        dev_examples = [dev_source[i] for i in range(count)]
    if jax.process_index() == 0:
        _setup_workdir(workdir, tokenizers)
    index = train_inputs.on_main_first(lambda: experiment.ensure_index(config, workdir, doc_config, doc_params,
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
        corpus, corpus_shardings = train_inputs.device_corpus(index, mesh, tokenizers.generator, model.config.context)
    encode = train_inputs.make_encode(model, mesh, state_shardings.params) if config.retrieval.mode == "host" else None
    batches = train_inputs.BatchBuilder(config, model, mesh, retriever, encode)
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
    index, dev_examples, batches = run.index, run.dev_examples, run.batches
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
                results = train_eval.evaluate(model, state.params, retriever, dev_examples, config)
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
