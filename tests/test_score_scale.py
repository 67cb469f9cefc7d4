"""Retrieval scores on a stated scale (retrieval.score_scale): q(x)·d(z) times the scale before every softmax over
documents, fixed or learnt, "auto" = 20 for L2-normalised question encoders and 1 for DPR-style ones."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import nq
from rag_jax.models import bert
from rag_jax.runs import build, config_check

SMALL = dict(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24, initializer_range=0.5,
             hidden_dropout=0.0, attention_dropout=0.0, pooling="mean", normalize=True)  # fmt: skip


def _ids(seed, rows=5, length=7):
    return jax.random.randint(jax.random.PRNGKey(seed), (rows, length), 1, 50)


def test_the_scale_multiplies_the_question_vector_and_keeps_rankings():
    plain = bert.BertConfig(**SMALL)
    scaled = bert.BertConfig(**SMALL, score_scale=20.0)
    params = nn.meta.unbox(bert.BertEncoder(plain).init(jax.random.PRNGKey(0), _ids(0))["params"])
    _, q_plain = bert.BertEncoder(plain).apply({"params": params}, _ids(1))
    _, q_scaled = bert.BertEncoder(scaled).apply({"params": params}, _ids(1))
    np.testing.assert_allclose(np.linalg.norm(q_plain, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(q_scaled, 20.0 * q_plain, rtol=1e-6)
    _, d = bert.BertEncoder(plain).apply({"params": params}, _ids(2, rows=9))
    np.testing.assert_array_equal(np.argsort(-(q_plain @ d.T), axis=1), np.argsort(-(q_scaled @ d.T), axis=1))
    # The prior over documents sharpens: cosines alone give a nearly uniform softmax.
    assert jax.nn.softmax(q_scaled @ d.T).max() > jax.nn.softmax(q_plain @ d.T).max() + 0.1


def test_a_learnt_scale_is_a_log_parameter_that_sharpens_a_right_ranking():
    cfg = bert.BertConfig(**SMALL, score_scale=20.0, learn_score_scale=True)
    model = bert.BertEncoder(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), _ids(0))["params"])
    assert float(params[bert.LOG_SCORE_SCALE]) == pytest.approx(math.log(20.0))
    _, d = bert.BertEncoder(bert.BertConfig(**SMALL)).apply({"params": params}, _ids(2, rows=9))
    _, q0 = model.apply({"params": params}, _ids(1))
    positives = jnp.argmax(q0 @ d.T, axis=1)  # the ranking is already right: only a sharper softmax lowers the loss

    def loss(log_scale):
        _, q = model.apply({"params": {**params, bert.LOG_SCORE_SCALE: log_scale}}, _ids(1))
        return -jnp.take_along_axis(jax.nn.log_softmax(q @ d.T), positives[:, None], 1).mean()

    tx = optax.adam(0.1)
    log_scale = params[bert.LOG_SCORE_SCALE]
    state = tx.init(log_scale)
    before = loss(log_scale)
    for _ in range(20):
        updates, state = tx.update(jax.grad(loss)(log_scale), state)
        log_scale = optax.apply_updates(log_scale, updates)
    assert float(log_scale) > math.log(20.0) + 0.5 and loss(log_scale) < before


def test_checkpoint_params_gain_the_learnt_scale_at_its_start():
    cfg = bert.BertConfig(**SMALL, score_scale=20.0, learn_score_scale=True)
    params = {"word": {"embedding": np.zeros((2, 2), np.float32)}}
    with_scale = bert.with_score_scale(params, cfg)
    assert float(with_scale[bert.LOG_SCORE_SCALE]) == pytest.approx(math.log(20.0))
    assert bert.with_score_scale(params, bert.BertConfig(**SMALL, score_scale=20.0)) is params  # fixed: no parameter


@pytest.mark.parametrize("normalize, value, expected", [
    (True, "auto", build.NORMALIZED_SCORE_SCALE), (False, "auto", 1.0), (True, "5", 5.0), (False, 2.5, 2.5),
])  # fmt: skip
def test_auto_is_twenty_for_normalised_encoders_and_one_for_dpr(normalize, value, expected):
    config = ml_collections.ConfigDict({"retrieval": {"score_scale": value}})
    assert build.score_scale(config, bert.BertConfig(**{**SMALL, "normalize": normalize})) == expected


def test_a_run_saved_before_the_field_scores_as_it_did():
    config = ml_collections.ConfigDict({"retrieval": {"mode": "host"}})
    assert build.score_scale(config, bert.BertConfig(**SMALL)) == 1.0


def test_the_local_configs_score_minilm_on_its_training_scale():
    """The local and knowledge runs retrieve with all-MiniLM-L6-v2 (normalised): their priors use the scale 20."""
    for variant in ("local", "knowledge"):
        config = nq.get_config(variant)
        assert config.retrieval.score_scale == "auto"
    assert nq.get_config("paper").retrieval.score_scale == "auto"  # DPR: 1, transformers' RAG unchanged


@pytest.mark.parametrize("value", ["zero", "-1", 0.0, "nan", True])
def test_impossible_scales_name_the_field(value):
    config = nq.get_config("tiny")
    with config.unlocked(), config.ignore_type():
        config.retrieval.score_scale = value
    with pytest.raises(config_check.ConfigError, match=r"config retrieval\.score_scale="):
        config_check.check_fields(config)


def test_a_learnt_scale_needs_a_trained_question_encoder():
    config = nq.get_config("knowledge")
    config.retrieval.learn_score_scale = True
    config.optim.question_encoder_lr_scale = 0.0
    with pytest.raises(config_check.ConfigError, match=r"retrieval\.learn_score_scale=True .*question_encoder_lr_scale"):
        config_check.check_config(config)
