"""The reader seam (rag_jax/readers/): a reader registered from this file alone, RAG-Sequence with a length-normalised
score (`rag_sequence_per_token`: its loss is the RAG-Sequence NLL per target token, its decoding picks the hypothesis
with the best rescoring score per generated token), trains with experiments.train_nq and answers with
experiments.eval_nq, each a separate process that finds it from the run config's name
`tests.test_reader_seam:rag_sequence_per_token`; and what every reader gives (per-passage log-likelihoods, the old
names model.loss / --model_type)."""

import json
import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rag_jax import rag
from rag_jax.models import bart, bert
from rag_jax.readers import base, marginal, rag_sequence, rag_token, registry
from tests import process_env, train_task

NAME = f"{__name__}:rag_sequence_per_token"


def _target_counts(ids___xT, pad: int):
    """Non-pad targets (the decoder inputs shifted left) per sequence, at least 1."""
    return jnp.maximum((ids___xT[..., 1:] != pad).sum(-1), 1)


class PerTokenSequence(rag_sequence.RagSequence):
    """RAG-Sequence scored per token: the loss is its NLL over the answer's target count, and decoding keeps the
    hypothesis whose thorough rescoring score per generated token is best (not the best total)."""

    name = "rag_sequence_per_token"
    hf_architecture = None  # transformers has no such class
    dev_reader = None  # dev evaluation decodes with this reader too

    def loss(self, model, params, batch, doc_scores_BxK, *, epsilon, dropout_rng):
        nll_B = super().loss(model, params, batch, doc_scores_BxK, epsilon=epsilon, dropout_rng=dropout_rng)
        return nll_B / _target_counts(batch["labels"], model.generator_config.pad_token_id)

    def generate(self, model, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK, gen, *,
                 decoding=None, provenance=False):
        _, candidates = rag_sequence.generate(model, params, context_input_ids_BKxS, context_attention_mask_BKxS,
                                              doc_scores_BxK, gen, mode=decoding or "thorough", return_candidates=True)
        ids_BxCxL = candidates.ids_BxCxL
        per_token_BxC = candidates.scores_BxC / _target_counts(ids_BxCxL, model.generator_config.pad_token_id)
        tokens_BxL = jnp.take_along_axis(ids_BxCxL, jnp.argmax(per_token_BxC, axis=1)[:, None, None], axis=1)[:, 0]
        if not provenance:
            return base.Decoded(tokens_BxL)
        return base.Decoded(tokens_BxL, *self.answer_posteriors(model, params, context_input_ids_BKxS,
                                                                context_attention_mask_BKxS, doc_scores_BxK,
                                                                tokens_BxL))  # fmt: skip

    def score(self, model, params, context_input_ids_BKxS, context_attention_mask_BKxS, q_BxD, doc_embeds_BxKxD,
              labels_BxT):
        scores = super().score(model, params, context_input_ids_BKxS, context_attention_mask_BKxS, q_BxD,
                               doc_embeds_BxKxD, labels_BxT)
        counts = _target_counts(jnp.asarray(labels_BxT), model.generator_config.pad_token_id)
        return {**scores, "nll_per_token": scores["nll_sequence"] / counts}


TOY = registry.register(PerTokenSequence())


# ----------------------------------------------------------------------------------------------- a tiny model

B, K, S, T = 2, 3, 6, 5


@pytest.fixture(scope="module")
def tiny():
    q_cfg = bert.BertConfig(vocab_size=60, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                            max_position_embeddings=16)
    g_cfg = bart.BartConfig(vocab_size=60, d_model=8, encoder_layers=1, decoder_layers=1, encoder_heads=2,
                            decoder_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16)
    model = rag.Rag(q_cfg, g_cfg, rag.RagConfig(n_docs=K))
    params = nn.meta.unbox(rag.init_params(model, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    labels = rng.integers(4, 60, (B, T)).astype(np.int32)
    labels[:, 0], labels[0, 3:], labels[1, 4:] = 0, 1, 1  # <s> answer ... pad
    labels[0, 2], labels[1, 3] = 2, 2  # </s>
    batch = {"context_input_ids": jnp.asarray(rng.integers(4, 60, (B, K, S)), jnp.int32),
             "context_attention_mask": jnp.ones((B, K, S), jnp.int32), "labels": jnp.asarray(labels)}
    return model, params, batch, jnp.asarray(rng.normal(size=(B, K)), jnp.float32)


def test_passage_log_likelihoods_marginalise_to_the_rag_sequence_likelihood(tiny):
    """log Σ_k p(z_k|x) p(y|x,z_k) of the per-passage log-likelihoods is RAG-Sequence's log-likelihood (the paper's
    prior position; the answers' first targets are not pads), for both readers (the same generator passes)."""
    model, params, batch, scores = tiny
    for reader in (registry.get("rag_sequence"), registry.get("rag_token")):
        ll_BxK = reader.passage_log_likelihoods(model, params, batch)
        assert ll_BxK.shape == (B, K)
        logits = model.generator_logits(params, batch["context_input_ids"].reshape(B * K, S),
                                        batch["context_attention_mask"].reshape(B * K, S), batch["labels"])
        want = -rag_sequence.nll(logits, scores, batch["labels"], pad_token_id=1, doc_prior_position=0)
        got = jax.nn.logsumexp(jax.nn.log_softmax(scores, axis=-1) + ll_BxK, axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_each_reader_owns_its_loss(tiny):
    """reader.loss is the training step's loss: RAG-Sequence's and RAG-Token's marginal NLL, and the registered
    toy's RAG-Sequence NLL per target token."""
    model, params, batch, scores = tiny
    logits = model.generator_logits(params, batch["context_input_ids"].reshape(B * K, S),
                                    batch["context_attention_mask"].reshape(B * K, S), batch["labels"])
    loss = {name: registry.get(name).loss(model, params, batch, scores, epsilon=0.0, dropout_rng=None)
            for name in ("rag_sequence", "rag_token", NAME)}
    sequence = rag_sequence.nll(logits, scores, batch["labels"], pad_token_id=1, bos_token_id=0)
    np.testing.assert_allclose(loss["rag_sequence"], sequence, rtol=1e-6)
    np.testing.assert_allclose(loss["rag_token"], rag_token.nll(logits, scores, batch["labels"], pad_token_id=1),
                               rtol=1e-6)
    np.testing.assert_allclose(loss[NAME], sequence / np.array([2, 3]), rtol=1e-6)  # targets up to </s>


def test_with_one_passage_the_readers_give_the_scores_no_gradient(tiny):
    """At K=1 the prior is a softmax over one passage (exactly 1), so RAG's marginal gives the retrieval scores, and
    through them q(x), a gradient of exactly 0: the training step skips q(x)'s backward pass then (step.py
    question_gradient_is_zero). With two passages the gradient is not 0, so this test can tell."""
    model, params, batch, scores = tiny
    for name in ("rag_sequence", "rag_token"):
        for k in (1, 2):
            one = {key: value[:, :k] if value.ndim == 3 else value for key, value in batch.items()}
            grad = jax.grad(lambda s: registry.get(name).loss(model, params, one, s, epsilon=0.1,
                                                               dropout_rng=None).sum())(scores[:, :k] * 3.0)
            assert (np.abs(np.asarray(grad)).max() == 0.0) == (k == 1), (name, k, grad)


def test_names_aliases_and_unknown_readers():
    assert registry.get("sequence") is registry.get("rag_sequence") and registry.get("token").name == "rag_token"
    assert registry.get(NAME) is TOY and registry.known(NAME) and registry.known("token")
    assert not registry.known("nope") and not registry.known("tests.no_such_module:x")
    with pytest.raises(ValueError, match="rag_sequence, rag_sequence_per_token, rag_token"):
        registry.get("nope")
    assert registry.for_hf_architecture("RagTokenForGeneration").name == "rag_token"
    assert registry.for_hf_architecture(None).name == "rag_sequence"


def test_the_old_names_select_the_reader_with_one_note(monkeypatch, capsys):
    """model.loss and --model_type still select a reader; each says once that it is the old name."""
    from experiments import cli, model_loading

    monkeypatch.setattr(registry, "_NOTED", set())
    model = ml_collections.ConfigDict({"reader": "rag_sequence", "loss": None})
    assert registry.configured_name(model) == "rag_sequence"
    model.loss = "token"
    assert [registry.configured_name(model) for _ in range(2)] == ["rag_token"] * 2
    saved = ml_collections.ConfigDict({"loss": "sequence"})  # a checkpoint's config from before model.reader
    assert registry.configured_name(saved) == "rag_sequence"
    flag = lambda value: types.SimpleNamespace(value=value)  # noqa: E731
    assert model_loading.reader_from_flags(flag(None), flag("token")) == "rag_token"
    assert model_loading.reader_from_flags(flag(NAME), flag(None)) == NAME
    assert model_loading.reader_from_flags(flag(None), flag(None)) is None
    notes = capsys.readouterr().err.splitlines()
    assert notes == ["note: config model.loss='token' is deprecated; use model.reader='rag_token'",
                     "note: --model_type=token is deprecated; use --reader=rag_token"]
    with pytest.raises(cli.UsageError, match="--model_type=token is the old name of --reader"):
        model_loading.reader_from_flags(flag("rag_token"), flag("token"))
    with pytest.raises(cli.UsageError, match="--reader=nope: choose one of"):
        model_loading.reader_from_flags(flag("nope"), flag(None))


# ------------------------------------------------------------------------------------------- end to end


def _run(*args):
    env = process_env.command_env()
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_a_reader_registered_in_a_test_trains_and_evaluates(tmp_path):
    """train_nq (dev evaluation included) and eval_nq, each in its own process, run the toy reader: its loss is per
    token (RAG-Sequence's here sums ~5 tokens of ~ln V = 10.8 each), and eval_nq writes its own score and its
    answers' provenance."""
    task = train_task.write_bundled_task(str(tmp_path / "task"), num_questions=8, num_distractors=8)
    workdir = str(tmp_path / "run")
    trained = _run("experiments.train_nq", f"--workdir={workdir}", *train_task.cli_overrides(task, **{
        "train.steps": 2, "train.checkpoint_every": 2, "train.async_checkpoints": False, "train.eval_every": 2,
        "model.reader": NAME}))  # fmt: skip
    assert "reader rag_sequence_per_token" in trained.stdout
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(0 < loss < 15 for loss in losses), losses
    assert any("eval/exact_match" in m for m in metrics)

    output = str(tmp_path / "answers.jsonl")
    _run("experiments.eval_nq", f"--model={workdir}", f"--questions={task['questions']}", f"--output={output}",
         "--score", "--provenance", "--batch_size=4")
    with open(output) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 8
    for record in records:
        assert 0 < record["nll_per_token"] < record["nll_sequence"]
        assert np.isclose(sum(d["posterior"] for d in record["provenance"]["documents"]), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["rag_sequence", "rag_token"])
def test_leaving_a_passage_out_is_the_readers_loss_over_the_others(tiny, name):
    """reader.leave_one_out_losses (Atlas's LOOP target) for passage k is the reader's own NLL of the answer from
    the other K-1 passages, per answer token (RAG-Sequence at the paper's prior position)."""
    model, params, batch, scores = tiny
    reader = registry.get(name)
    token_ll = reader.passage_token_log_likelihoods(model, params, batch)
    targets = marginal.shift_left(batch["labels"], 1)
    left_out = reader.leave_one_out_losses(token_ll, scores, targets != 1)
    logits = model.generator_logits(params, batch["context_input_ids"].reshape(B * K, S),
                                    batch["context_attention_mask"].reshape(B * K, S), batch["labels"])  # (B,K,T,V)
    for k in range(K):
        kept = np.array([j for j in range(K) if j != k])
        if name == "rag_sequence":
            nll = rag_sequence.nll(logits[:, kept], scores[:, kept], batch["labels"], pad_token_id=1,
                                   doc_prior_position=0)
        else:
            nll = rag_token.nll(logits[:, kept], scores[:, kept], batch["labels"], pad_token_id=1)
        np.testing.assert_allclose(left_out[:, k], nll / (targets != 1).sum(-1), rtol=1e-5)
