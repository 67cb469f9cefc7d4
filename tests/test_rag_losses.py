"""RAG-Sequence / RAG-Token losses and their gradients against transformers' RagSequenceForGeneration and
RagTokenForGeneration on identical random weights, plus the properties the marginal likelihoods must have."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rag_jax import rag
from rag_jax.models import hf
from rag_jax.readers import marginal, rag_sequence, rag_token
from tests import hf_models
from tests.hf_models import relative_error

N_DOCS, BATCH = 3, 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random RAG checkpoint (odd sizes) saved with save_pretrained, and its PyTorch twin."""
    directory = tmp_path_factory.mktemp("rag")
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        hf_models.dpr_config(), hf_models.bart_config(), n_docs=N_DOCS
    )
    # std 1.0: with small weights every context gives nearly the same likelihood, and the doc-score gradient
    # (posterior - prior) would be float32 cancellation noise instead of a signal.
    reference = hf_models.randomize(transformers.RagSequenceForGeneration(config), seed=11, std=1.0)
    reference.save_pretrained(directory)
    return str(directory)


def _inputs(seed=0, target=6):
    rng = np.random.default_rng(seed)
    q_ids, q_mask = hf_models.padded_ids(rng, BATCH, 9, vocab=97, pad=0, first=2)
    ctx_ids, ctx_mask = hf_models.padded_ids(rng, BATCH * N_DOCS, 12, vocab=101, pad=1)
    labels, _ = hf_models.padded_ids(rng, BATCH, target, vocab=101, pad=1, first=0)  # <s> answer ... pads
    doc_embeds = (rng.normal(size=(BATCH, N_DOCS, 36)) * 0.05).astype(np.float32)
    return q_ids, q_mask, ctx_ids, ctx_mask, labels, doc_embeds


def _reference_loss(reference_cls, directory, inputs, *, float64=False, **kwargs):
    """The reference's loss and its gradient w.r.t. the question encoder's word embeddings (float64 with `float64`:
    the same weights and inputs, every operation in double precision)."""
    q_ids, q_mask, ctx_ids, ctx_mask, labels, doc_embeds = map(torch.as_tensor, inputs)
    model = reference_cls.from_pretrained(directory).eval()
    if float64:
        model, doc_embeds = model.double(), doc_embeds.double()
    q = model.question_encoder(q_ids, attention_mask=q_mask).pooler_output
    scores = torch.bmm(q.unsqueeze(1), doc_embeds.transpose(1, 2)).squeeze(1)
    out = model(context_input_ids=ctx_ids, context_attention_mask=ctx_mask, doc_scores=scores, labels=labels, **kwargs)
    out.loss.sum().backward()
    grad = model.question_encoder.question_encoder.bert_model.embeddings.word_embeddings.weight.grad
    return out.loss.detach().numpy(), grad.numpy()


def _our_loss(directory, inputs, loss_fn, *, float64=False):
    """rag_jax's loss and gradient; with `float64` parameters, compute and inputs in float64 (call inside
    jax.enable_x64)."""
    q_ids, q_mask, ctx_ids, ctx_mask, labels, doc_embeds = inputs
    loaded = hf.load_rag(directory)
    dtype = jnp.float64 if float64 else jnp.float32
    configs = [dataclasses.replace(c, dtype=dtype, param_dtype=dtype)
               for c in (loaded.question_encoder.config, loaded.generator.config)]
    model = rag.Rag(*configs, rag.RagConfig.from_hf(loaded.hf_config))
    params = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params}
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    doc_embeds = jnp.asarray(doc_embeds, dtype)

    def loss(params):
        q = model.encode_questions(params, q_ids, q_mask)
        scores = rag.doc_scores(q, doc_embeds)
        logits = model.generator_logits(params, ctx_ids, ctx_mask, labels)
        per_example = loss_fn(logits, scores, labels)
        return per_example.sum(), per_example

    (_, per_example), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return np.asarray(per_example), np.asarray(grads["question_encoder"]["word"]["embedding"])


# float32 tolerances, from the float64 comparison below (tests/test_rag_losses.py::*_float64 checks both sides agree
# to <=1e-13 in float64, so every float32 difference is rounding). Each side's float32 error against the float64
# truth, on these inputs (transformers 5.25, torch 2.13, jax 0.10.2): losses <= 2.8e-7 (ours) / 8.7e-8 (reference);
# question-encoder gradients <= 1.47e-4 (ours) / 3.2e-5 (reference), the largest with exclude_bos_score, where the
# posterior minus prior (the doc-score gradient) is small and amplifies the generator logits' rounding (~1e-6
# relative, ~20 in magnitude, summed over the target tokens). Two float32 results can differ by the sum of their
# errors against the truth: 1.8e-4 for gradients, hence 2.5e-4; the loss bound 1e-5 keeps a 25x margin.
LOSS_TOLERANCE_FLOAT32 = 1e-5
GRADIENT_TOLERANCE_FLOAT32 = 2.5e-4
# float64: both sides agree to ~1e-13 (loss) and ~1e-13 (gradient); a real difference (a changed default, a wrong
# term) moves them by far more than 1e-9.
TOLERANCE_FLOAT64 = 1e-9


def _sequence_inputs(exclude_bos_score):
    inputs = _inputs(seed=1)
    if exclude_bos_score:  # generate-style labels [</s>, <s>, ...]: the case where the BOS score is dropped
        inputs[4][:, :2] = [2, 0]
    return inputs


def _sequence_loss(epsilon, exclude_bos_score):
    return lambda logits, scores, labels: rag_sequence.nll(
        logits, scores, labels, pad_token_id=1, epsilon=epsilon, exclude_bos_score=exclude_bos_score
    )


def _token_loss(epsilon):
    return lambda logits, scores, labels: rag_token.nll(logits, scores, labels, pad_token_id=1, epsilon=epsilon)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("exclude_bos_score", [False, True])
def test_rag_sequence_loss_and_gradient_match_reference(checkpoint, epsilon, exclude_bos_score):
    inputs = _sequence_inputs(exclude_bos_score)
    ref_loss, ref_grad = _reference_loss_with_smoothing(
        transformers.RagSequenceForGeneration, checkpoint, inputs, epsilon, exclude_bos_score=exclude_bos_score
    )
    loss, grad = _our_loss(checkpoint, inputs, _sequence_loss(epsilon, exclude_bos_score))
    assert relative_error(loss, ref_loss) <= LOSS_TOLERANCE_FLOAT32
    assert relative_error(grad, ref_grad) <= GRADIENT_TOLERANCE_FLOAT32


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_rag_token_loss_and_gradient_match_reference(checkpoint, epsilon):
    inputs = _inputs(seed=2)
    ref_loss, ref_grad = _reference_loss_with_smoothing(transformers.RagTokenForGeneration, checkpoint, inputs, epsilon)
    loss, grad = _our_loss(checkpoint, inputs, _token_loss(epsilon))
    assert relative_error(loss, ref_loss) <= LOSS_TOLERANCE_FLOAT32
    assert relative_error(grad, ref_grad) <= GRADIENT_TOLERANCE_FLOAT32


@pytest.mark.parametrize(
    "reader, epsilon, exclude_bos_score",
    [("sequence", 0.0, False), ("sequence", 0.0, True), ("sequence", 0.1, True), ("token", 0.0, False),
     ("token", 0.1, False)],
)  # fmt: skip
def test_losses_and_gradients_match_reference_in_float64(checkpoint, reader, epsilon, exclude_bos_score):
    """Both sides in float64: what the float32 tests cannot tell from rounding (a changed default in the reference,
    a wrong term here) shows up far above 1e-9."""
    if reader == "sequence":
        cls, inputs, loss_fn = (transformers.RagSequenceForGeneration, _sequence_inputs(exclude_bos_score),
                                _sequence_loss(epsilon, exclude_bos_score))  # fmt: skip
        kwargs = {"exclude_bos_score": exclude_bos_score}
    else:
        cls, inputs, loss_fn, kwargs = transformers.RagTokenForGeneration, _inputs(seed=2), _token_loss(epsilon), {}
    ref_loss, ref_grad = _reference_loss_with_smoothing(cls, checkpoint, inputs, epsilon, float64=True, **kwargs)
    with jax.enable_x64(True):
        loss, grad = _our_loss(checkpoint, inputs, loss_fn, float64=True)
    assert loss.dtype == grad.dtype == np.float64
    assert relative_error(loss, ref_loss) <= TOLERANCE_FLOAT64
    assert relative_error(grad, ref_grad) <= TOLERANCE_FLOAT64


def _reference_loss_with_smoothing(cls, directory, inputs, epsilon, **kwargs):
    """The reference reads label smoothing from its config only: save a copy with `epsilon` set."""
    original = transformers.RagConfig.from_pretrained(directory)
    original.label_smoothing = epsilon
    scratch = directory + f"-eps{epsilon}"
    cls.from_pretrained(directory, config=original).save_pretrained(scratch)
    return _reference_loss(cls, scratch, inputs, **kwargs)


def _random_logits(seed, batch=3, docs=4, length=5, vocab=11):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(batch, docs, length, vocab)) * 3, jnp.float32)
    scores = jnp.asarray(rng.normal(size=(batch, docs)) * 2, jnp.float32)
    labels = jnp.asarray(rng.integers(3, vocab, size=(batch, length)))
    return logits, scores, labels


def _plain_seq2seq_nll(logits_BxTxV, labels_BxT, pad):
    target = marginal.shift_left(labels_BxT, pad)
    lp = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    ll = jnp.take_along_axis(lp, target[..., None], axis=-1)[..., 0]
    return -jnp.where(target != pad, ll, 0.0).sum(-1)


def test_one_document_losses_equal_plain_seq2seq_loss():
    logits, scores, labels = _random_logits(3, docs=1)
    labels = labels.at[1, 3:].set(1)  # padding present
    expected = _plain_seq2seq_nll(logits[:, 0], labels, pad=1)
    np.testing.assert_allclose(rag_sequence.nll(logits, scores, labels, pad_token_id=1), expected, rtol=1e-6)
    np.testing.assert_allclose(rag_token.nll(logits, scores, labels, pad_token_id=1), expected, rtol=1e-6)


def test_sequence_and_token_agree_on_one_token_targets():
    logits, scores, labels = _random_logits(4, length=2)
    labels = labels.at[:, 1].set(7)  # decoder inputs [x, 7] -> target [7, pad]: one scored token
    doc_lp = jax.nn.log_softmax(scores, axis=-1)
    token_lp = jax.nn.log_softmax(logits[:, :, 0], axis=-1)[..., 7]
    marginal = -jax.nn.logsumexp(doc_lp + token_lp, axis=1)
    tok = rag_token.nll(logits, scores, labels, pad_token_id=1)
    paper = rag_sequence.nll(logits, scores, labels, pad_token_id=1, doc_prior_position=0)
    np.testing.assert_allclose(tok, marginal, rtol=1e-6)
    np.testing.assert_allclose(paper, marginal, rtol=1e-6)
    # The reference's default puts the prior at target position 1, a pad here, so it drops out.
    quirk = rag_sequence.nll(logits, scores, labels, pad_token_id=1)
    np.testing.assert_allclose(quirk, -jax.nn.logsumexp(token_lp, axis=1), rtol=1e-6)


def test_prior_position_is_irrelevant_when_both_positions_are_scored():
    logits, scores, labels = _random_logits(5, length=5)
    reference = rag_sequence.nll(logits, scores, labels, pad_token_id=1)
    paper = rag_sequence.nll(logits, scores, labels, pad_token_id=1, doc_prior_position=0)
    np.testing.assert_allclose(reference, paper, rtol=1e-6)
