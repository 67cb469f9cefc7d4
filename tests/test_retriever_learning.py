"""train_retriever learns, measured on the bundled mini NQ task (2,600 passages; dev: its last 200 questions, each
with a gold passage): ICT from a random small BERT lifts dev gold recall@5 far above chance (5/2,600 = 0.2%);
supervised training on the train questions' gold passages, starting from the ICT encoder, lifts it further. Each
test prints its before/after figures. (Fine-tuning the pretrained all-MiniLM-L6-v2 on mini NQ has not yet been seen to
raise dev gold recall@1: 94.0% -> 94.0% at lr 2e-5, 94.0% -> 92.0% at 1e-4, in-batch and random negatives being too
easy for it; issue 12 stays open for it.)"""

import json
import os

import jax
import pytest

from experiments.configs import retriever as retriever_config
from rag_jax import sharding
from rag_jax.training import retriever_loop


def _config(variant, **fields):
    config = retriever_config.get_config(variant)
    for key, value in fields.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def _one_device():
    """Learning is measured on one CPU device: 8 simulated ones would each repeat the replicated optimizer update."""
    return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


def _before_after(workdir, metric):
    evals = [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if metric in r]
    return evals[0][metric], evals[-1][metric]


# A 32-wide one-layer BERT from random weights, shared by both sides, mean pooling (a [CLS] vector of a random
# network barely learns in a few hundred steps: measured, gold recall@5 0.5% after 300 ICT steps).
SMALL = {"model.shared_encoder": True, "model.question_encoder.pooling": "mean", "train.global_batch_size": 64,
         "train.log_every": 50, "train.checkpoint_every": 1000, "eval.num_examples": 200, "eval.recall_ks": (1, 5, 20),
         "data.max_passage_length": 128, "index.max_length": 128, "data.max_question_length": 32,
         "model.question_encoder.max_position_embeddings": 128, "optim.warmup_steps": 20}


@pytest.fixture(scope="module")
def ict_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ict"))
    config = _config("tiny", **SMALL, **{"data.kind": "ict", "train.steps": 300, "optim.learning_rate": 2e-3})
    result = retriever_loop.train_and_evaluate(config, workdir, mesh=_one_device())
    return workdir, result


@pytest.mark.slow
def test_ict_from_random_weights_lifts_gold_recall_far_above_chance(ict_run):
    workdir, _ = ict_run
    before, after = _before_after(workdir, "eval/gold_recall@5")
    print(f"ICT, random 32-wide BERT, 300 steps: dev gold recall@5 {before:.1f}% -> {after:.1f}% (chance 0.2%)")
    assert before <= 2.0 and after >= 12.0


@pytest.mark.slow
def test_gold_pairs_after_ict_lift_gold_recall_further(ict_run, tmp_path):
    ict_workdir, ict = ict_run
    config = _config("tiny", **SMALL, **{"data.kind": "gold", "train.steps": 200, "optim.learning_rate": 1e-3,
                                         "model.question_encoder.init": ict["export"]["question_encoder"]})
    retriever_loop.train_and_evaluate(config, str(tmp_path), mesh=_one_device())
    before, after = _before_after(str(tmp_path), "eval/gold_recall@5")
    ict_after = _before_after(ict_workdir, "eval/gold_recall@5")[1]
    print(f"gold pairs from the ICT encoder, 200 steps: dev gold recall@5 {before:.1f}% -> {after:.1f}% (ICT alone: "
          f"{ict_after:.1f}%)")
    assert before == pytest.approx(ict_after, abs=1e-6)  # it really started from the ICT export
    assert after >= ict_after + 4.0
