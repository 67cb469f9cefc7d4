"""The training loop (the only one of rag_jax): setup from the config, then input pipeline -> global batch ->
retrieval -> step; progress lines, metrics.jsonl and TensorBoard on process 0; periodic dev evaluation; orbax
checkpoints (async, resume from the latest, save on SIGTERM); a NaN/inf loss stops the run naming the step, keeping
the last good checkpoint. The step itself is in step.py, the host side of a batch in inputs.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from rag_jax import rag, sharding
from rag_jax.data import pipeline as pipeline_lib
from rag_jax.readers import registry as readers
from rag_jax.retrieval.retriever import Retriever
from rag_jax.training import (build, checkpoint, config_check, denoise, dev_eval, index_refresh, inputs, optim,
                              streams, workdir as workdir_lib)
from rag_jax.training.lifecycle import Preemption as _Preemption, duration as _duration, log as _log
from rag_jax.training.metric_writer import MetricWriter
from rag_jax.training.step import TrainState, create_train_state, make_train_step, state_layout


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the run stopped without saving that state."""



# ---------------------------------------------------------------------------------------------------- the loop


def _setup_workdir(workdir: str, tokenizers) -> None:
    """Keeps the run's tokenizers beside its checkpoints (RagTokenizer layout) for evaluation."""
    os.makedirs(workdir, exist_ok=True)
    for name, path in workdir_lib.tokenizer_dirs(workdir).items():
        if not os.path.isdir(path):
            getattr(tokenizers, name).save_pretrained(path)


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
    batches: inputs.BatchBuilder
    train_step: Callable  # train_step(state, batch, rng, corpus) -> (state, metrics)
    corpus: dict[str, jax.Array]  # device retrieval: the index on the devices; else {}

    def initial_state(self) -> TrainState:
        """Step 0: random or pretrained parameters; a random generator warmed up by denoising when configured."""
        state = create_train_state(self.model, self.tx, self.mesh, streams.params_key(self.config.seed),
                                   self.pretrained)
        if not denoise.applies(self.config):
            return state
        generator = denoise.warm_up(self.model, state.params["generator"], self.config, self.tokenizers.generator,
                                    self.mesh, self.state_shardings.params["generator"], log=_log)
        return state.replace(params={**state.params, "generator": generator})


def setup(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> Run:
    """Checks the config and builds the run's pieces: tokenizers, models, data, WORKDIR/index, the jitted step.

    Raises build.ConfigError naming the field for start-up problems. `mesh` defaults to config.mesh.
    """
    build.check_config(config)
    config_check.check_workdir(workdir)
    workdir = os.path.abspath(workdir)
    mesh = mesh if mesh is not None else sharding.mesh_from_config(config.mesh)
    build.check_batch(config, sharding.data_size(mesh), jax.process_count())
    tokenizers = build.load_tokenizers(config)
    models = build.build_rag(config)
    model = models.rag
    doc_config, doc_params = build.doc_encoder(config)
    build.check_vocab(models, doc_config, tokenizers, config)
    train_source = inputs.on_main_first(lambda: build.data_source(config, "train"), "train_data")
    dev_examples = []
    if config.train.eval_every:
        dev_source = inputs.on_main_first(lambda: build.data_source(config, "dev"), "dev_data")
        count = len(dev_source) if not config.eval.num_examples else min(config.eval.num_examples, len(dev_source))
        dev_examples = [dev_source[i] for i in range(count)]
    if jax.process_index() == 0:
        _setup_workdir(workdir, tokenizers)
    index = inputs.on_main_first(lambda: build.ensure_index(config, workdir, doc_config, doc_params,
                                                           tokenizers.question, progress=jax.process_index() == 0),
                           "index")
    if index.dim != model.question_encoder_config.output_dim:
        raise build.ConfigError(
            f"{index.index_dir}: {index.dim}-d document embeddings but the question encoder gives "
            f"{model.question_encoder_config.output_dim}-d vectors (model.question_encoder vs model.doc_encoder)")
    if max(inputs.candidates(config), config.eval.n_docs) > index.num_passages:
        raise build.ConfigError(f"config model.n_docs / retrieval.rerank_candidates / eval.n_docs exceed the "
                                f"{index.num_passages} passages of {config.data.passages}")
    # End to end, the passages' document-encoder tokens travel with them (the doc encoder reads the question
    # tokenizer's vocabulary, as build_index does).
    doc_tokens = dict(doc_tokenizer=tokenizers.question, doc_max_length=config.index.max_length
                      ) if model.trains_doc_encoder else {}
    retriever = Retriever(index, tokenizers.question, tokenizers.generator, model.config.context,
                          config.retrieval.host_searcher, **doc_tokens,
                          passage_table=inputs.host_context_table(config, index, tokenizers.generator,
                                                                  model.config.context))  # fmt: skip

    tx = optim.make_optimizer(config)
    abstract_state, state_shardings = state_layout(model, tx, mesh)
    corpus, corpus_shardings = {}, {}
    if config.retrieval.mode == "device":
        corpus, corpus_shardings = inputs.device_corpus(index, mesh, tokenizers.generator, model.config.context,
                                                        **doc_tokens)
    encode = inputs.make_encode(model, mesh, state_shardings.params) if config.retrieval.mode == "host" else None
    batches = inputs.BatchBuilder(config, model, mesh, retriever, encode)
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


# What a resumed run must share with its checkpoints to restore them, named when they do not fit.
_STATE_FIELDS = ("model", "optim", "tokenizers", "seed")


def _resume(run: Run, checkpointer: checkpoint.Checkpointer) -> tuple[int, TrainState, dict[str, Any]] | None:
    """(step, state, data position) of the newest checkpoint that restores, or None for a fresh run. Newer ones
    that do not restore (damaged files) are reported and moved aside; a checkpoint of another model or optimizer
    (other array shapes) stops the run naming the config fields that differ."""

    def restore(step: int):
        mismatch = checkpointer.shape_mismatch(step, run.abstract_state)
        if mismatch:
            try:
                changed = config_check.differences(checkpointer.restore_config(step).to_dict(), run.config,
                                                   _STATE_FIELDS)
            except Exception:  # pylint: disable=broad-except (a damaged config item: the shapes say enough)
                changed = []
            raise build.ConfigError(
                f"{checkpointer.step_dir(step)} does not fit this run's model ({mismatch}); the run was trained with "
                f"{'; '.join(changed) if changed else 'another config'}. Resume with the run's own config, or train "
                "into a new --workdir")
        return checkpointer.restore(step, run.abstract_state)

    if checkpointer.latest_step() is None:
        return None
    step, (state, data_state), skipped = checkpointer.restore_newest(restore, fatal=(build.ConfigError,))
    for bad, cause in skipped:
        moved = checkpointer.set_aside(bad) if jax.process_index() == 0 else None
        _log(f"skipped checkpoint {checkpointer.step_dir(bad)}, which does not restore ({cause}); moved it to {moved}")
    if skipped:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("rag_jax: damaged checkpoints moved aside")
        checkpointer.reload()
    return step, state, data_state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> dict[str, Any]:
    """Trains (resuming from WORKDIR/checkpoints when there is one) and returns the last logged metrics.

    Raises build.ConfigError for start-up problems and NonFiniteLossError when the loss diverges.
    """
    run = setup(config, workdir, mesh)
    workdir, mesh, model, retriever = run.workdir, run.mesh, run.model, run.retriever
    index, dev_examples, batches = run.index, run.dev_examples, run.batches
    train_step, corpus = run.train_step, run.corpus
    checkpointer = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                           async_save=config.train.async_checkpoints)
    pipeline = make_pipeline(run)
    resumed = _resume(run, checkpointer)
    refresher = index_refresh.IndexRefresher(run, checkpointer)
    if resumed is not None:
        start, state, data_state = resumed
        pipeline.set_state(data_state)
        _log(f"resumed from {checkpointer.directory}/{start}")
        refresher.resume(start)
    else:
        start = 0
        state = run.initial_state()
    dropout_rng = jax.device_put(streams.key(config.seed, streams.DROPOUT), sharding.replicated(mesh))
    writer = MetricWriter(workdir, start, jax.process_index() == 0)
    preemption = _Preemption()
    steps = int(config.train.steps)
    _log(f"training {steps} steps from step {start}: mesh {dict(mesh.shape)} ({mesh.size} devices), "
         f"{jax.process_count()} processes, retrieval {config.retrieval.mode}, K={config.model.n_docs}, "
         f"reader {readers.from_config(config).name}, {index.num_passages} passages")
    last: dict[str, Any] = {"step": start}

    def evaluate(done, params):
        t0 = time.time()
        results = dev_eval.evaluate(model, params, retriever, dev_examples, config)
        writer.write(done, results)
        _log(f"eval at step {done}: " + " | ".join(
            f"{k[5:]} {v:.2f}" for k, v in results.items() if k != "eval/num_questions")
             + f" ({int(results['eval/num_questions'])} questions, {time.time() - t0:.0f}s)")
        return results

    if start == 0 and config.train.eval_every and dev_examples:  # the baseline: what retrieval finds before training
        evaluate(0, state.params)
    interval: list[dict[str, float]] = []
    pending = None
    clock, clock_step, t_start = time.time(), start, time.time()

    def settle(step, metrics):
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        checked = ("loss", "grad_norm", "update_norm")
        if not all(math.isfinite(values[k]) for k in checked):
            try:
                checkpointer.wait()
            except checkpoint.CheckpointSaveError:
                pass  # the divergence is what stopped the run; latest_step leaves the failed save out
            kept = checkpointer.latest_step()
            found = ", ".join(f"{k} {values[k]}" for k in checked)
            raise NonFiniteLossError(
                f"non-finite training values at step {step} ({found}); stopped without saving that state. The last "
                f"good checkpoint is {f'{checkpointer.directory}/{kept}' if kept is not None else 'none (none saved)'}"
                "; lower optim.learning_rate or check the data, then rerun to resume from it")
        interval.append(values)

    step_inputs = inputs.StepInputs(batches, pipeline, steps - start, overlap=config.retrieval.prefetch,
                                    stale=config.retrieval.stale_prefetch)
    stopped = True  # by an error, unless the loop ends: then a failed last save is the error to report
    try:
        for step in range(start, steps):
            with sharding.use(mesh):  # the models' logical constraints apply when the step is traced
                batch, data_state = step_inputs.next(state.params)  # data_state: the position after this batch
                with jax.transfer_guard("disallow"):  # every host<->device copy of the step is explicit
                    state, metrics = train_step(state, batch, dropout_rng, corpus)
            if pending is not None:
                settle(*pending)
            if jax.process_count() == 1:  # several processes learn of a failed save at the next one (orbax's barrier)
                checkpointer.check()  # a background save that failed (disk full) stops the run now
            done = step + 1
            pending = (done, metrics)
            if done < steps:  # the next steps search the index of this step's document encoder
                refresher.maybe_refresh(done, state, before_swap=step_inputs.settle)  # no search while it moves
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
                index_logged, index_perf = refresher.metrics(done, now - t_start)
                logged.update(index_logged)
                writer.write(done, logged, perf={"examples_per_sec": rate, **index_perf})
                gold = f" | gold@K {logged['gold_recall']:.2f}" if "gold_recall" in logged else ""
                _log(f"step {done}/{steps} | loss {logged['loss']:.4f}{gold} | lr {logged['learning_rate']:.2e}"
                     f" | {rate:.1f} ex/s | ETA {_duration(eta)}{refresher.progress(done, now - t_start)}")
                last = {"step": done, **logged}
                interval, clock, clock_step = [], now, done
            if run_eval and dev_examples:
                last.update(evaluate(done, state.params))
            # After the evaluation: a run killed before this save completes redoes both from the previous one.
            if save:
                checkpointer.save(done, state, data_state, config, index_version=refresher.version)
                refresher.saved(done)
            if stop:
                _log(f"preempted (SIGTERM): saved step {done}; rerun the same command to resume")
                last["preempted"] = True
                break
        stopped = False
    finally:
        step_inputs.close()
        checkpointer.close(quiet=stopped)
        writer.close()
        preemption.close()
    refresher.prune()  # the checkpoints that the last saves replaced are gone now
    last["step"] = int(jax.device_get(state.step))
    _log(f"done: step {last['step']}, {_duration(time.time() - t_start)}, workdir {workdir}")
    return last
