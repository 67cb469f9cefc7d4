"""Training the retriever alone (experiments.train_retriever): DPR's bi-encoder with global in-batch negatives
(contrastive.py), on gold pairs, DPR's training JSON or the Inverse Cloze Task (rag_jax/data/training_data.py).

Run by the same trainer as RAG training (trainer.py: progress lines, metrics.jsonl and TensorBoard, orbax checkpoints
with the data position and the config, resume from the newest that restores, save on SIGTERM): parameters replicated
and the global batch split over the mesh's data axis, one jitted step (state donated, `fold_in(rng, step)` dropout).
Evaluation
re-embeds the corpus with the current document encoder and reports DPR's top-k retrieval accuracy (an answer string
in the top k) and gold-passage recall@k. At the end both encoders are written as Hugging Face directories
(WORKDIR/export/question_encoder, WORKDIR/export/ctx_encoder) that build_index and train_nq accept as encoders.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rag_jax import sharding
from rag_jax.data import nq_open
from rag_jax.data import tokenizers as tk
from rag_jax.inference import export, metrics as answer_metrics
from rag_jax.models import bert
from rag_jax.retrieval import embed, exact, training_data
from rag_jax.runs import build, config_check, streams, workdir as workdir_lib
from rag_jax.training import contrastive, optim, trainer
from rag_jax.training.lifecycle import log
from rag_jax.training.step import TrainState


@dataclasses.dataclass
class Run:
    """Everything a retriever run builds from its config before the first step."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    tokenizer: Any
    encoders: dict[str, bert.BertConfig]  # {"question": ..., "document": ...}
    pretrained: dict[str, Any]  # numpy params, keyed like the state's params
    passages: training_data.Corpus
    batches: training_data.Batches
    dev: list[dict[str, Any]]  # {"question", "answers", "gold_row"}
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    step: Callable  # step(state, batch, rng) -> (state, metrics)
    batch_sharding: Any
    # model.train_doc_encoder=False: the corpus embedded once by the frozen document encoder (rows as in passages);
    # the steps read their passages' vectors from it and the evaluations search it. None: both encoders train.
    frozen_vectors: np.ndarray | None = None

    def trained(self) -> dict[str, Any]:
        """The parameters the optimiser updates (the state's params)."""
        return {"question": self.pretrained["question"]} if self.frozen_vectors is not None else self.pretrained

    def initial_state(self) -> TrainState:
        replicated = sharding.replicated(self.mesh)
        params = jax.device_put(self.trained(), replicated)
        init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, self.tx.init(p)), out_shardings=replicated)
        return init(params)

    def document_params(self, params: dict[str, Any]) -> Any:
        if self.config.model.shared_encoder:
            return params["question"]
        return self.pretrained["document"] if self.frozen_vectors is not None else params["document"]


def _dev_examples(config: ml_collections.ConfigDict, passages: training_data.Corpus) -> list[dict[str, Any]]:
    path = config.data.dev_file or nq_open.MINI_QUESTIONS
    records = [(i, r) for i, r in _read_questions(path)]
    if config.data.dev_file is None:
        records = records[-nq_open.MINI_DEV_SIZE:]
    if config.eval.num_examples:
        records = records[: config.eval.num_examples]
    return [{"question": r["question"], "answers": r["answers"],
             "gold_row": -1 if r["gold_passage_id"] == nq_open.UNKNOWN_PASSAGE_ID
             else passages.row(r["gold_passage_id"], f"{path}:{i + 1}")} for i, r in records]


def _read_questions(path: str):
    try:
        yield from nq_open.read_nq_jsonl(path)
    except ValueError as e:
        if isinstance(e, training_data.DataError):
            raise
        raise training_data.DataError(str(e)) from None


def _train_batches(config: ml_collections.ConfigDict, passages: training_data.Corpus) -> training_data.Batches:
    d, t = config.data, config.train
    common = dict(passages=passages, batch_size=t.global_batch_size, hard_negatives=d.hard_negatives_per_question,
                  seed=config.seed, keep_sentence=d.ict_keep_sentence)
    if d.kind == "dpr":
        return training_data.Batches("dpr", dpr_file=d.train_file, **common)
    if d.kind == "ict":
        return training_data.Batches("ict", **common)
    path = d.train_file or nq_open.MINI_QUESTIONS
    examples = training_data.gold_pairs(path, passages)
    if d.train_file is None:  # the bundled task: its dev questions are the last MINI_DEV_SIZE lines
        train_lines = sum(1 for _ in _read_questions(path)) - nq_open.MINI_DEV_SIZE
        examples = [e for e in examples if int(e["where"].rsplit(":", 1)[1]) <= train_lines]
    if d.hard_negatives is not None:
        training_data.attach_negatives(examples, training_data.read_mined_negatives(d.hard_negatives, passages))
    return training_data.Batches("gold", examples=examples, **common)


def make_step(encoders: dict[str, bert.BertConfig], tx, schedule, shared: bool, scale: float = 1.0):
    """The jitted step (state donated): (state, batch, rng) -> (state, {"loss", "grad_norm", "accuracy",
    "learning_rate"})."""
    q_module = bert.BertEncoder(encoders["question"])
    d_module = bert.BertEncoder(encoders["document"])
    update = contrastive.make_update(q_module, d_module, tx, shared_encoder=shared, scale=scale)

    def step(state: TrainState, batch, rng):
        params, opt_state, metrics = update(state.params, state.opt_state, batch, jax.random.fold_in(rng, state.step))
        metrics["learning_rate"] = schedule(state.step)
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(step, donate_argnums=0)


def setup(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> Run:
    """Checks the config and builds the run's pieces. Raises ConfigError / DataError naming the field or file."""
    config_check.check_retriever_config(config)
    config_check.check_workdir(workdir)
    workdir = os.path.abspath(workdir)
    mesh = mesh if mesh is not None else sharding.mesh_from_config(config.mesh)
    ways = sharding.data_size(mesh)
    if config.train.global_batch_size % ways:
        raise config_check.ConfigError(f"config train.global_batch_size={config.train.global_batch_size} is not "
                                       f"divisible by the {ways}-way data axis of the mesh (mesh.data)")
    tokenizer = tk.load_question_tokenizer(config.tokenizers.question)
    m = config.model
    q_cfg, q_params = build.trained_encoder(m.question_encoder, streams.params_key(config.seed))
    encoders, pretrained = {"question": q_cfg}, {"question": q_params}
    if m.shared_encoder:
        encoders["document"] = q_cfg
    else:
        encoders["document"], pretrained["document"] = build.trained_encoder(
            m.doc_encoder, streams.key(config.seed, streams.DOC_ENCODER))
    if encoders["question"].output_dim != encoders["document"].output_dim:
        raise config_check.ConfigError(f"config model.question_encoder gives {q_cfg.output_dim}-d vectors, "
                                       f"model.doc_encoder {encoders['document'].output_dim}-d; they must agree")
    passages = training_data.Corpus(config.data.passages)
    batches = _train_batches(config, passages)
    dev = _dev_examples(config, passages)
    tx = optim.make_optimizer(config)
    schedule = optim.learning_rate_schedule(config)
    step = make_step(encoders, tx, schedule, m.shared_encoder, m.score_scale)
    batch_sharding = sharding.named_sharding(mesh, ("batch", None))
    run = Run(config, workdir, mesh, tokenizer, encoders, pretrained, passages, batches, dev, tx, schedule, step,
              batch_sharding)
    if not m.train_doc_encoder:
        t0 = time.time()
        run.frozen_vectors = _embed_corpus(run, pretrained["document"])
        log(f"document encoder frozen: embedded the {len(passages)} passages once ({time.time() - t0:.0f}s)")
    return run


def _embed_corpus(run: Run, doc_params: Any) -> np.ndarray:
    c = run.config
    return embed.embed_passages(embed.make_encode_fn(run.encoders["document"]), doc_params, run.tokenizer,
                                run.passages.passages, c.index.batch_size, c.index.max_length)


def global_batch(run: Run, step: int) -> dict[str, jax.Array]:
    """The step's tokenised global batch as jax arrays split over the data axis (every process builds the same one
    and places its own devices' rows)."""
    c = run.config
    examples = run.batches.at(step)
    frozen = run.frozen_vectors is not None
    arrays = training_data.tokenize(run.tokenizer, examples, c.data.max_question_length, c.data.max_passage_length,
                                    with_passages=not frozen)
    if frozen:
        arrays["passage_vectors"] = run.frozen_vectors[training_data.passage_rows(run.passages, examples)]
    return {k: jax.make_array_from_callback(v.shape, run.batch_sharding, lambda index, v=v: v[index])
            for k, v in arrays.items()}


# ---------------------------------------------------------------------------------------------------- evaluation


def evaluate(run: Run, params: dict[str, Any]) -> dict[str, float]:
    """Top-k retrieval accuracy (an answer string in the top k, DPR's measure) and gold recall@k (where the dev
    questions name their gold passage) over the corpus embedded with the current document encoder."""
    c = run.config
    params = jax.device_get(params)
    vectors = run.frozen_vectors
    if vectors is None:
        vectors = _embed_corpus(run, run.document_params(params))
    questions = embed.embed_questions(run.encoders["question"], params["question"], run.tokenizer,
                                       [e["question"] for e in run.dev], c.eval.batch_size, c.data.max_question_length)
    ks = sorted(k for k in c.eval.recall_ks if k <= len(run.passages))
    rows, _ = exact.ExactSearcher(vectors).search(questions, max(ks))
    out: dict[str, float] = {"eval/num_questions": float(len(run.dev))}
    known = [i for i, e in enumerate(run.dev) if e["gold_row"] >= 0]
    first_hits = [answer_metrics.first_hit_rank(e["answers"], [run.passages.passages[r].text for r in rows[i]])
                  for i, e in enumerate(run.dev)]
    for k in ks:
        if any(e["answers"] for e in run.dev):
            out[f"eval/top{k}_accuracy"] = 100 * float(np.mean([h is not None and h < k for h in first_hits]))
        if known:
            out[f"eval/gold_recall@{k}"] = 100 * float(np.mean([run.dev[i]["gold_row"] in rows[i, :k] for i in known]))
    return out


# ---------------------------------------------------------------------------------------------------- the loop


def export_encoders(run: Run, params: dict[str, Any], directory: str) -> dict[str, str]:
    """WORKDIR/export/{question_encoder,ctx_encoder}: Hugging Face directories (export.save_hf_encoder)."""
    params = jax.device_get(params)
    out = {}
    for role, name, key in (("question", "question_encoder", "question"), ("ctx", "ctx_encoder", "document")):
        cfg = run.encoders[key]
        cfg = dataclasses.replace(cfg, hidden_dropout=0.1, attention_dropout=0.1)  # BERT's defaults in the export
        out[name] = export.save_hf_encoder(os.path.join(directory, name), cfg,
                                           run.document_params(params) if key == "document" else params[key], role,
                                           run.tokenizer, overwrite=True)
    return out


class _StepBatches:
    """The global batch of each step from `start` on, with the data position after it (batches are a function of
    the step: training_data.Batches.at)."""

    def __init__(self, run: Run, start: int):
        self.run, self.step = run, start

    def next(self, params) -> tuple[dict[str, jax.Array], dict[str, int]]:
        del params
        batch = global_batch(self.run, self.step)
        self.step += 1
        return batch, {"step": self.step}

    def close(self) -> None:
        pass


class RetrieverJob(trainer.Job):
    """Retriever training as the trainer runs it: contrastive steps on the run's batches, retrieval evaluation
    (re-embedding the corpus), and the encoders exported at the end."""

    rate_unit = ("q/s", "questions_per_sec")
    evaluates_ends = True  # its retrieval accuracy before and after training is what a run reports

    def __init__(self, run: Run):
        self.run = run
        self.config, self.workdir, self.mesh = run.config, run.workdir, run.mesh

    def abstract_state(self) -> TrainState:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      self.run.initial_state())

    def initial_state(self) -> TrainState:
        return self.run.initial_state()

    def describe(self, start: int) -> str:
        c, run = self.config, self.run
        return (f"training the retriever {int(c.train.steps)} steps from step {start}: {c.data.kind} data, mesh "
                f"{dict(run.mesh.shape)}, batch {c.train.global_batch_size} x (1 + "
                f"{c.data.hard_negatives_per_question}) passages, {len(run.passages)} passages, {len(run.dev)} dev "
                "questions")

    def inputs(self, start: int) -> _StepBatches:
        return _StepBatches(self.run, start)

    def train_step(self, state, batch, rng):
        return self.run.step(state, batch, rng)

    def summarize(self, done: int, interval: list[dict[str, float]], wall_seconds: float) -> trainer.Summary:
        logged = trainer.mean_of(interval, ("loss", "grad_norm", "accuracy"))
        logged["learning_rate"] = interval[-1]["learning_rate"]
        return trainer.Summary(logged, f"loss {logged['loss']:.4f} | in-batch acc {logged['accuracy']:.2f} | "
                                       f"lr {logged['learning_rate']:.2e}")

    def has_dev(self) -> bool:
        return bool(self.run.dev)

    def evaluate(self, params) -> dict[str, float]:
        return evaluate(self.run, params)

    def describe_eval(self, results: dict[str, float], seconds: float) -> str:
        return (" | ".join(f"{k[5:]} {v:.1f}" for k, v in results.items() if k != "eval/num_questions")
                + f" ({seconds:.0f}s)")

    def finish(self, state, last: dict[str, Any]) -> None:
        if last["step"] == int(self.config.train.steps) and jax.process_index() == 0:
            last["export"] = export_encoders(self.run, state.params, workdir_lib.export_dir(self.workdir))
            log(f"encoders: {last['export']['question_encoder']} and {last['export']['ctx_encoder']}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> dict[str, Any]:
    """Trains (resuming from WORKDIR/checkpoints), evaluates, exports; returns the last logged metrics and
    evaluation (and "export": the encoders' directories, once the last step is done)."""
    run = setup(config, workdir, mesh)
    os.makedirs(run.workdir, exist_ok=True)
    return trainer.Trainer(RetrieverJob(run)).run()
