"""Learning to retrieve from answers alone: Atlas's retriever losses side by side on the bundled knowledge task.

  python -m experiments.retriever_loss_table --workdir=W [--losses=marginal,pdist,emdr2,loop] [--steps=100] \\
      [--entities=100 --heldout=25] [--weaken=0.5] [--reader_weaken=0 --reader_n_docs=1] \\
      [--config.optim.question_encoder_lr_scale=...]

1. writes a knowledge task (rag_jax/data/knowledge_task.py) and a copy of its training questions with the gold
   passage ids removed (W/task/train_no_gold.jsonl): the training sees question/answer pairs only;
2. builds the index with the frozen pretrained document encoder (all-MiniLM-L6-v2) and trains the reader once,
   q(x) frozen (denoising warm-up, then --reader_steps on the questions at K=--reader_n_docs, q(x) all-MiniLM-L6-v2
   with Gaussian noise of `--reader_weaken` x each weight matrix's standard deviation added: by default none, so
   the reader sees the passage that holds the answer and learns to read); then makes the retriever weak (noise of
   `--weaken`): the same start for every loss;
3. for each loss in --losses trains the same steps from the same start and seed (config train.retriever_loss), and
   measures dev gold recall@K and exact match (held-out entities, their gold ids known) before and after.
It prints the start -> end table and writes W/retriever_loss_table.json.
"""

import copy
import json
import os

import jax
import numpy as np

from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from rag_jax import files as whole_files
from rag_jax import sharding
from rag_jax.data import knowledge_task, nq_open
from rag_jax.training import dev_eval, loop
from rag_jax.training.step import create_train_state

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "nq.py") + ":knowledge",
    "Training config (default: the knowledge variant of experiments/configs/nq.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", os.path.join("workdir", "retriever_losses"), "Where everything is written.")
_LOSSES = flags.DEFINE_list("losses", ["marginal", "pdist", "emdr2", "loop"], "train.retriever_loss values to compare.")
_STEPS = flags.DEFINE_integer("steps", 100, "Training steps per loss.")
_ENTITIES = flags.DEFINE_integer("entities", 100, "Task entities (one passage each).")
_HELDOUT = flags.DEFINE_integer("heldout", 25, "Held-out entities (4 dev questions each).")
_READER_STEPS = flags.DEFINE_integer("reader_steps", 200, "Shared first steps that train the reader alone.")
_WEAKEN = flags.DEFINE_float("weaken", 0.5, "Noise added to q(x)'s weights, in units of each matrix's std.")
_READER_WEAKEN = flags.DEFINE_float(
    "reader_weaken", 0.0, "The noise on q(x) while the reader trains (negative: --weaken's). A strong q(x) there puts "
    "the gold passage among those the reader sees, so it learns to read; --weaken then applies to the comparison.")
_READER_N_DOCS = flags.DEFINE_integer(
    "reader_n_docs", 1, "K while the reader trains (0: model.n_docs); 1 is the cheapest reader phase.")


def write_task(directory: str, entities: int, heldout: int, seed: int) -> dict[str, str]:
    """The task's files, plus train_no_gold.jsonl: the training questions without gold_passage_id."""
    paths = knowledge_task.write_task(knowledge_task.make_task(entities, heldout, seed=seed), directory)
    with open(paths["train"]) as f:
        records = [json.loads(line) for line in f]
    paths["train_no_gold"] = os.path.join(directory, "train_no_gold.jsonl")
    with open(paths["train_no_gold"], "w") as f:
        for record in records:
            f.write(json.dumps({k: v for k, v in record.items() if k != "gold_passage_id"}) + "\n")
    return paths


def weaken(params, scale: float, seed: int):
    """q(x)'s parameters with N(0, (scale x std)^2) noise added to every matrix (biases and norms kept)."""
    leaves, treedef = jax.tree_util.tree_flatten(jax.device_get(params))
    rng = np.random.default_rng(seed)
    noisy = [x + scale * x.std() * rng.standard_normal(x.shape).astype(x.dtype) if x.ndim >= 2 else x
             for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def _recall(metrics: dict[str, float], k: int) -> float:
    return metrics[f"eval/gold_recall@{k}"]


def train(run, state, steps: int, first_batch: int = 0):
    """`steps` updates on the run's batches from `first_batch` on: (state, support priors per step)."""
    pipeline = loop.make_pipeline(run)
    rng = jax.device_put(jax.random.PRNGKey(run.config.seed), sharding.replicated(run.mesh))
    priors = []
    for step in range(steps):
        with sharding.use(run.mesh):
            batch = run.batches(state.params, pipeline.batch_at(first_batch + step))
            state, metrics = run.train_step(state, batch, rng, run.corpus)
        metrics = jax.device_get(metrics)
        if "support_prior" in metrics:
            priors.append(float(metrics["support_prior"] / metrics["support_count"]))
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}: loss {float(metrics['loss']):.3f}"
                  + (f" | support prior {priors[-1]:.2f}" if priors else ""), flush=True)
    return state, priors


def _setup(config, workdir: str, params):
    run = loop.setup(config, workdir, sharding.mesh_from_config(config.mesh))
    return run, create_train_state(run.model, run.tx, run.mesh, jax.random.PRNGKey(config.seed), params)


def train_one(config, workdir: str, params, steps: int, first_batch: int, dev: list[dict]) -> dict[str, float]:
    """Dev gold recall@K and exact match on `dev` before and after `steps` updates from `params` (numpy)."""
    run, state = _setup(config, workdir, params)
    k = int(config.eval.n_docs)
    before = dev_eval.evaluate(run.model, state.params, run.retriever, dev, config)
    print(f"  start: recall@{k} {_recall(before, k):.1f} | exact match {before['eval/exact_match']:.1f}", flush=True)
    state, priors = train(run, state, steps, first_batch)
    after = dev_eval.evaluate(run.model, state.params, run.retriever, dev, config)
    return {"recall_start": float(_recall(before, k)), "recall_end": float(_recall(after, k)),
            "em_start": float(before["eval/exact_match"]), "em_end": float(after["eval/exact_match"]),
            "support_prior_last": float(np.mean(priors[-10:])) if priors else None}


def start_params(config, workdir: str, scale: float, reader_steps: int, reader_scale: float | None = None,
                 reader_n_docs: int | None = None) -> dict:
    """The shared start (numpy trees): q(x) weakened by `scale`, and a generator warmed up by denoising and then
    trained `reader_steps` to read with q(x) frozen (train.retriever_loss none), weakened by `reader_scale` (None or
    negative: `scale`) and retrieving `reader_n_docs` (None or 0: model.n_docs). Distillation needs a reader whose
    likelihoods say which passage is right: from a reader that cannot read yet, pdist's targets are near uniform and
    flatten the retriever (Atlas starts from a pretrained reader), and a reader trained on a weak q(x) rarely sees
    the passage that holds the answer, so it never learns to read (docs/retriever_losses.md, table w4)."""
    config = copy.deepcopy(config)
    config.train.retriever_loss = "none"
    config.train.steps = reader_steps or config.train.steps  # the reader phase decays its rate over its own steps
    if reader_n_docs:
        config.model.n_docs = reader_n_docs
    run = loop.setup(config, workdir, sharding.mesh_from_config(config.mesh))
    params = jax.device_get(run.initial_state().params)
    pretrained = params["question_encoder"]
    reader_scale = scale if reader_scale is None or reader_scale < 0 else reader_scale
    params["question_encoder"] = weaken(pretrained, reader_scale, config.seed)
    if reader_steps:
        print(f"reader warm-up: {reader_steps} steps, q(x) frozen", flush=True)
        state = create_train_state(run.model, run.tx, run.mesh, jax.random.PRNGKey(config.seed), params)
        params = jax.device_get(train(run, state, reader_steps)[0].params)
    params["question_encoder"] = weaken(pretrained, scale, config.seed)
    return params


def run_table():
    workdir = _WORKDIR.value
    config = _CONFIG.value
    paths = write_task(os.path.join(workdir, "task"), _ENTITIES.value, _HELDOUT.value, config.seed)
    config.data.passages, config.task.train_file, config.task.dev_file = (
        paths["passages"], paths["train_no_gold"], paths["dev"])
    config.train.steps = _STEPS.value
    config.eval.num_examples = 0  # every held-out question
    dev = [example for _, example in nq_open.read_nq_jsonl(paths["dev"])]
    start = start_params(config, os.path.join(workdir, "run"), _WEAKEN.value, _READER_STEPS.value,
                         _READER_WEAKEN.value, _READER_N_DOCS.value)
    table = {}
    for loss in _LOSSES.value:
        c = copy.deepcopy(config)
        c.train.retriever_loss = loss
        print(f"{loss}:", flush=True)
        table[loss] = train_one(c, os.path.join(workdir, "run"), start, _STEPS.value, _READER_STEPS.value, dev)
        print(f"{loss}: {table[loss]}", flush=True)
    k = int(config.eval.n_docs)
    print(f"\ndev gold recall@{k} and exact match, start -> end ({_STEPS.value} steps after {_READER_STEPS.value} "
          f"reader steps, K={config.model.n_docs}, same start and seed)")
    print(f"{'loss':<10} {'recall@' + str(k):>18} {'exact match':>18} {'support prior':>14}")
    for loss, r in table.items():
        prior = "" if r["support_prior_last"] is None else f"{r['support_prior_last']:.2f}"
        print(f"{loss:<10} {r['recall_start']:7.1f} -> {r['recall_end']:5.1f}  "
              f"{r['em_start']:7.1f} -> {r['em_end']:5.1f}  {prior:>14}")
    whole_files.write_json(os.path.join(workdir, "retriever_loss_table.json"),
                           {"steps": _STEPS.value, "reader_steps": _READER_STEPS.value, "k": k,
                            "weaken": _WEAKEN.value, "reader_weaken": _READER_WEAKEN.value,
                            "reader_n_docs": _READER_N_DOCS.value, "table": table})


if __name__ == "__main__":
    app.run(cli.main_running(run_table), flags_parser=cli.parse_flags)
