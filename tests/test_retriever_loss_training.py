"""train.retriever_loss in the training step: Atlas's losses are added to the reader's loss (whose marginal then
gives the retriever no gradient), "none" leaves the question encoder untouched, the support prior is logged, and
the config refuses what cannot work (ADist without a FiD reader, LOOP with one passage). ADist runs with the fid
reader."""

import json

import jax
import numpy as np
import pytest

from rag_jax import rag, sharding
from rag_jax.readers import marginal, registry as readers
from rag_jax.runs import config_check
from rag_jax.training import loop, retriever_losses, step
from tests import train_task

# No dropout: the step's reader pass and the expected value below then see the same generator.
EXACT = {"optim.warmup_steps": 0, "model.question_encoder.dropout": 0.0, "model.generator.dropout": 0.0,
         "model.generator.attention_dropout": 0.0, "model.n_docs": 4}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return train_task.write_bundled_task(str(tmp_path_factory.mktemp("task")), num_questions=16, num_distractors=16)


@pytest.fixture(scope="module")
def run(task, tmp_path_factory):
    """One run's pieces (model, index, batches); each case below compiles its own step from them."""
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    return loop.setup(train_task.tiny_config(task, **EXACT), str(tmp_path_factory.mktemp("run")), mesh)


def _one_step(run, task, expected_terms=None, **overrides):
    """(metrics of one step from the run's initial state, `expected_terms` (default: Atlas's likelihood-based losses)
    computed outside the step on its batch, initial params, params after the step) with the config changed by
    `overrides`."""
    config = train_task.tiny_config(task, **EXACT, **overrides)
    train_step = step.make_train_step(run.model, run.tx, config, run.mesh, run.state_shardings, run.batches.keys,
                                      {}, run.index.num_passages)
    state = run.initial_state()
    initial = jax.device_get(state.params)
    batch = run.batches(state.params, loop.make_pipeline(run).batch_at(0))
    model, reader = run.model, readers.from_config(config)
    q = model.encode_questions(state.params, batch["question_input_ids"], batch["question_attention_mask"])
    scores = rag.doc_scores(q, batch["doc_embeds"])
    reader_batch = {key: batch[key] for key in ("context_input_ids", "context_attention_mask", "labels")}
    expected = (expected_terms or _likelihood_terms)(model, reader, state.params, reader_batch, scores)
    rng = jax.device_put(jax.random.PRNGKey(7), sharding.replicated(run.mesh))
    with sharding.use(run.mesh):
        state, metrics = train_step(state, batch, rng, run.corpus)
    return jax.device_get(metrics), expected, initial, jax.device_get(state.params)


def _likelihood_terms(model, reader, params, reader_batch, scores) -> dict[str, float]:
    token_ll = reader.passage_token_log_likelihoods(model, params, reader_batch)
    pad = model.generator_config.pad_token_id
    mask = marginal.shift_left(reader_batch["labels"], pad) != pad
    return {"pdist": float(retriever_losses.pdist(scores, token_ll, mask).mean()),
            "emdr2": float(retriever_losses.emdr2(scores, token_ll, mask).mean()),
            "loop": float(retriever_losses.loop(scores, reader.leave_one_out_losses(token_ll, scores, mask)).mean()),
            "support_prior": float(retriever_losses.support_prior(scores, token_ll).sum())}


def _attention_terms(model, reader, params, reader_batch, scores) -> dict[str, float]:
    """ADist's KL from the fid reader's passage_attention_scores, and the fid reader's own loss."""
    attention = reader.passage_attention_scores(model, params, reader_batch)
    return {"adist": float(retriever_losses.adist(scores, attention, temperature=0.01).mean()),
            "support_prior": float(retriever_losses.attended_prior(scores, attention).sum()),
            "reader_loss": float(reader.loss(model, params, reader_batch, scores, epsilon=0.0,
                                             dropout_rng=None).mean())}


def _frozen(before, after) -> bool:
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, before, after)))


# Each case compiles a step per loss (~30 s each on 2 loaded cores). "none" is the baseline: the reader's loss has
# the marginal's value, without its gradient to the retriever. RAG-Token: pdist (under gradient accumulation: two
# microbatches' means average to the batch's) and emdr2; RAG-Sequence: loop, the one loss whose target depends on
# how the reader marginalises (marginal.leave_one_out_losses for RAG-Token: tests/test_reader_seam.py).
@pytest.mark.slow
@pytest.mark.parametrize("reader,losses", [("rag_token", ("pdist", "emdr2")), ("rag_sequence", ("loop",))])
def test_the_step_adds_atlas_retriever_losses_to_the_readers_loss(run, task, reader, losses):
    baseline, expected, initial, after = _one_step(run, task, **{"model.reader": reader,
                                                                 "train.retriever_loss": "none"})
    assert "support_prior" not in baseline
    assert _frozen(initial["question_encoder"], after["question_encoder"])  # none: no gradient to q(x)
    assert not _frozen(initial["generator"], after["generator"])
    for loss in losses:
        accum = 2 if loss == "pdist" else 1
        metrics, _, initial, after = _one_step(run, task, **{"model.reader": reader, "train.retriever_loss": loss,
                                                             "train.grad_accum_steps": accum})
        np.testing.assert_allclose(metrics["loss"], baseline["loss"] + expected[loss], rtol=1e-5)
        np.testing.assert_allclose(metrics["support_prior"], expected["support_prior"], rtol=1e-5)
        assert metrics["support_count"] == 8  # the batch's questions
        assert not _frozen(initial["question_encoder"], after["question_encoder"])


FID_ADIST = {"model.reader": "fid", "train.retriever_loss": "adist", "train.retriever_temperature": 0.01}


@pytest.fixture(scope="module")
def fid_run(task, tmp_path_factory):
    """A run whose contexts are FiD's strings (the fid reader's own format), for the ADist step below."""
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    return loop.setup(train_task.tiny_config(task, **EXACT, **FID_ADIST), str(tmp_path_factory.mktemp("fid")), mesh)


@pytest.mark.slow  # the fid step's compilation: ~40-65 s under load (the reader calls around it take ~2 s)
def test_adist_with_the_fid_reader_adds_its_loss_and_trains_the_question_encoder(fid_run, task):
    """One step: the loss is the fid reader's plus ADist's KL (computed here from the reader's
    passage_attention_scores on the same batch), its support_prior the prior of the most attended passage, and q(x),
    which only ADist trains, moves."""
    metrics, expected, initial, after = _one_step(fid_run, task, _attention_terms, **FID_ADIST)
    adist, reader_loss = expected["adist"], expected["reader_loss"]
    assert adist > 1e-4 * reader_loss  # a term the sum below would miss
    np.testing.assert_allclose(metrics["loss"], reader_loss + adist, rtol=1e-5)
    np.testing.assert_allclose(metrics["support_prior"], expected["support_prior"], rtol=1e-5)
    assert metrics["support_count"] == 8  # the batch's questions
    assert not _frozen(initial["question_encoder"], after["question_encoder"])
    assert not _frozen(initial["generator"], after["generator"])


@pytest.mark.parametrize("overrides,expected", [
    ({"train.retriever_loss": "adist"}, "set --config.model.reader=fid"),
    ({"train.retriever_loss": "loop", "model.n_docs": 1}, "model.n_docs >= 2"),
    ({"train.retriever_loss": "attention"}, "train.retriever_loss"),
    ({"train.retriever_temperature": 0.0}, "train.retriever_temperature"),
    # ADist's scores are ~1e-2: the default temperature 1.0 (or 0.1) makes its target near uniform
    ({**FID_ADIST, "train.retriever_temperature": 1.0}, "set --config.train.retriever_temperature=0.01"),
    ({**FID_ADIST, "train.retriever_temperature": 0.1}, "train.retriever_temperature=0.1 with"),
])
def test_impossible_retriever_losses_are_refused_naming_the_field(task, overrides, expected):
    config = train_task.tiny_config(task, **overrides)
    with pytest.raises(config_check.ConfigError, match=expected.replace(".", r"\.")):
        config_check.check_config(config)


def test_training_without_gold_passages_is_refused_only_where_a_loss_needs_them(task, tmp_path):
    """retrieval_loss_weight's contrastive term needs gold passages and says so; the question file without them is
    otherwise fine (RAG's marginal and Atlas's losses learn from answers alone: the learning test trains on one)."""
    with open(task["questions"]) as f:
        records = [json.loads(line) for line in f]
    no_gold = tmp_path / "no_gold.jsonl"
    no_gold.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "gold_passage_id"}) + "\n"
                               for r in records))
    config = train_task.tiny_config(task, **{"train.retrieval_loss_weight": 0.5})
    config.task.train_file = str(no_gold)
    with pytest.raises(config_check.ConfigError, match=r"train\.retrieval_loss_weight=0\.5 .* no gold_passage_id"):
        loop.setup(config, str(tmp_path / "run"), sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
