"""RAG training: setup from the config, then input pipeline -> global batch -> retrieval -> step, index refreshes
between steps and the periodic dev evaluation (dev_eval.py), run by the trainer (trainer.py: resume, checkpoints,
SIGTERM, metrics, evaluation timing). The step itself is in step.py, the host side of a batch in inputs.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections
import optax

from rag_jax import rag, sharding
from rag_jax.data import pipeline as pipeline_lib
from rag_jax.readers import registry as readers
from rag_jax.retrieval.retriever import Retriever
from rag_jax.runs import build, checkpoint, config_check, streams, workdir as workdir_lib
from rag_jax.training import denoise, dev_eval, index_refresh, inputs, optim, refresh_watch, trainer
from rag_jax.training.lifecycle import log as _log
from rag_jax.training.step import TrainState, create_train_state, make_train_step, state_layout


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


# questions read to find a gold_passage_id where a loss needs them (a file with none has none in its first ones)
_GOLD_SAMPLE = 1000


def _check_gold_passages(config: ml_collections.ConfigDict, train_source) -> None:
    """The one training loss that needs gold passages (train.retrieval_loss_weight's contrastive term) refuses data
    without them, instead of adding nothing; RAG's marginal and Atlas's retriever losses learn from answers alone."""
    weight = float(config.train.get("retrieval_loss_weight", 0.0))
    if not weight:
        return
    sample = range(min(len(train_source), _GOLD_SAMPLE))
    if not any(int(train_source[i].get("gold_passage_id", -1)) >= 0 for i in sample):
        where = config_check.task_file(config, "train")[1] or f"the {config.data.source} training split"
        raise build.ConfigError(
            f"config train.retrieval_loss_weight={weight} trains the retriever towards each question's gold passage, "
            f"but {where} has no gold_passage_id (none in its first {len(sample)} questions): add them, set "
            "--config.train.retrieval_loss_weight=0, or learn from answers alone with --config.train.retriever_loss="
            "pdist (or emdr2, loop)")


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
    _check_gold_passages(config, train_source)
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
                          rerank_from_codes=int(config.retrieval.get("rerank_from_codes", 0)),
                          passage_table=inputs.host_context_table(config, index, tokenizers.generator,
                                                                  model.config.context))  # fmt: skip

    tx = optim.make_optimizer(config)
    abstract_state, state_shardings = state_layout(model, tx, mesh)
    corpus, corpus_shardings = {}, {}
    if config.retrieval.mode == "device":
        corpus, corpus_shardings = inputs.device_corpus(index, mesh, tokenizers.generator, model.config.context,
                                                        **doc_tokens, codes=inputs.device_codes_kind(config) is not None)
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


# ---------------------------------------------------------------------------------------------------- the job


class RagJob(trainer.Job):
    """RAG training as the trainer runs it: the run's pipeline and step, index refreshes between steps, and the dev
    evaluation (exact match, F1, recall@k of greedy RAG-Token answers)."""

    finite_metrics = ("loss", "grad_norm", "update_norm")

    def __init__(self, run: Run):
        self.run = run
        self.config, self.workdir, self.mesh = run.config, run.workdir, run.mesh
        self.pipeline = make_pipeline(run)
        self.refresher: index_refresh.IndexRefresher | None = None
        self.recall_watch = refresh_watch.RefreshRecallWatch(refresh_watch.window_steps(
            self.config.train.log_every, self.config.train.global_batch_size))

    def abstract_state(self) -> TrainState:
        return self.run.abstract_state

    def initial_state(self) -> TrainState:
        return self.run.initial_state()

    def begin(self, start: int, data_state: dict[str, Any] | None, checkpointer: checkpoint.Checkpointer) -> None:
        self.refresher = index_refresh.IndexRefresher(self.run, checkpointer)
        if data_state is not None:
            self.pipeline.set_state(data_state)
            self.refresher.resume(start)

    def describe(self, start: int) -> str:
        c, mesh = self.config, self.mesh
        return (f"training {int(c.train.steps)} steps from step {start}: mesh {dict(mesh.shape)} ({mesh.size} "
                f"devices), {jax.process_count()} processes, retrieval {c.retrieval.mode}, K={c.model.n_docs}, "
                f"reader {readers.from_config(c).name}, {self.run.index.num_passages} passages")

    def inputs(self, start: int) -> inputs.StepInputs:
        c = self.config
        return inputs.StepInputs(self.run.batches, self.pipeline, int(c.train.steps) - start,
                                 overlap=c.retrieval.prefetch, stale=c.retrieval.stale_prefetch)

    def context(self):
        return sharding.use(self.mesh)  # the models' logical constraints apply when the step is traced

    def train_step(self, state, batch, rng):
        return self.run.train_step(state, batch, rng, self.run.corpus)

    def after_step(self, done: int, state, step_inputs: inputs.StepInputs) -> None:
        # The next steps search the index of this step's document encoder; nothing searches while it moves.
        if self.refresher.maybe_refresh(done, state, before_swap=step_inputs.settle):
            self.recall_watch.refreshed(done)

    def summarize(self, done: int, interval: list[dict[str, float]], wall_seconds: float) -> trainer.Summary:
        logged = trainer.mean_of(interval, ("loss", "grad_norm"))
        logged["learning_rate"] = interval[-1]["learning_rate"]
        known = sum(m["gold_known"] for m in interval)
        if known:
            logged["gold_recall"] = sum(m["gold_hits"] for m in interval) / known
        for step, m in enumerate(interval, done - len(interval) + 1):
            self.recall_watch.record(step, m["gold_hits"], m["gold_known"])
        for drop in self.recall_watch.judge(done, final=done == int(self.config.train.steps)):
            _log(drop.message())
            logged["gold_recall_drop_after_refresh"] = drop.before - drop.after
        supported = sum(m.get("support_count", 0.0) for m in interval)
        if supported:  # the mean prior p(z|x) of the passage that supported the answer most (Atlas's losses)
            logged["support_prior"] = sum(m["support_prior"] for m in interval) / supported
        index_logged, index_perf = self.refresher.metrics(done, wall_seconds)
        logged.update(index_logged)
        gold = f" | gold@K {logged['gold_recall']:.2f}" if "gold_recall" in logged else ""
        gold += f" | support prior {logged['support_prior']:.2f}" if "support_prior" in logged else ""
        return trainer.Summary(logged, f"loss {logged['loss']:.4f}{gold} | lr {logged['learning_rate']:.2e}",
                               perf=index_perf, tail=self.refresher.progress(done, wall_seconds))

    def has_dev(self) -> bool:
        return bool(self.run.dev_examples)

    def evaluate(self, params) -> dict[str, float]:
        run = self.run
        return dev_eval.evaluate(run.model, params, run.retriever, run.dev_examples, self.config)

    def describe_eval(self, results: dict[str, float], seconds: float) -> str:
        return (" | ".join(f"{k[5:]} {v:.2f}" for k, v in results.items() if k != "eval/num_questions")
                + f" ({int(results['eval/num_questions'])} questions, {seconds:.0f}s)")

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"index_version": self.refresher.version}

    def saved(self, done: int) -> None:
        self.refresher.saved(done)

    def finish(self, state, last: dict[str, Any]) -> None:
        self.refresher.prune()  # the checkpoints that the last saves replaced are gone now


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> dict[str, Any]:
    """Trains (resuming from WORKDIR/checkpoints when there is one) and returns the last logged metrics and dev
    evaluation. Raises build.ConfigError for start-up problems and trainer.NonFiniteLossError when the loss
    diverges."""
    return trainer.Trainer(RagJob(setup(config, workdir, mesh))).run()
