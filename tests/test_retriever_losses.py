"""Atlas's retriever losses (rag_jax/training/retriever_losses.py) against PyTorch implementations written here from
facebookresearch/atlas src/atlas.py (perplexity_score, emdr_score + logprob, loop_score, kldivloss), on the same
retriever scores and reader logits: each loss's value and its gradient with respect to the retriever scores, in
float32 (<= 1e-4 relative) and in float64 (<= 1e-9: a changed term, reduction or temperature moves them far more).

Atlas's LOOP leaves a passage out of its FiD reader; for RAG-Sequence and RAG-Token readers, leaving passage k out
means the reader's marginal over the other passages with their prior renormalised, which the PyTorch side computes
by building that K-1 passage marginal explicitly for each k (marginal.leave_one_out_losses does it for all k at once).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rag_jax.readers import marginal
from rag_jax.training import retriever_losses
from tests.hf_models import relative_error

BATCH, N_DOCS, LENGTH, VOCAB, PAD = 4, 3, 6, 11, 1
TOLERANCE_FLOAT32 = 1e-4
TOLERANCE_FLOAT64 = 1e-9
IGNORE_INDEX = -100  # Atlas's label padding
# torch warns that KLDivLoss's default "mean" reduction divides by B*K: Atlas's behaviour, kept on purpose
pytestmark = pytest.mark.filterwarnings("ignore:reduction:UserWarning")


def _inputs(seed=0):
    """Retriever scores (B, K), reader logits (B, K, T, V) and the answers: Atlas's labels (targets, IGNORE_INDEX at
    padding) and ours (decoder inputs: a start token, then the targets shifted right)."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(BATCH, N_DOCS)) * 3.0
    logits = rng.normal(size=(BATCH, N_DOCS, LENGTH, VOCAB)) * 2.0
    lengths = np.array([5, 2, 3, 1])  # answer tokens per question; the last target is always padding
    targets = rng.integers(2, VOCAB, size=(BATCH, LENGTH))
    targets[np.arange(LENGTH)[None] >= lengths[:, None]] = PAD
    decoder_inputs = np.concatenate([np.zeros((BATCH, 1), np.int64), targets[:, :-1]], axis=1)
    atlas_labels = np.where(targets == PAD, IGNORE_INDEX, targets)
    return scores, logits, decoder_inputs, atlas_labels


# ------------------------------------------------------------------------ PyTorch, written from Atlas's src/atlas.py


def _torch_kldivloss(score, gold_score, temperature_gold, temperature_score):
    gold = torch.softmax(gold_score / temperature_gold, dim=-1)
    log_score = torch.nn.functional.log_softmax(score / temperature_score, dim=-1)
    return torch.nn.KLDivLoss()(log_score, gold)


def _torch_token_loss(logits_BxKxTxV, labels_BxT):
    """Cross-entropy of each (passage, target token), 0 at IGNORE_INDEX: (B, K, T)."""
    b, k, t, v = logits_BxKxTxV.shape
    repeated = torch.repeat_interleave(labels_BxT, k, dim=0)
    loss = torch.nn.functional.cross_entropy(logits_BxKxTxV.reshape(-1, v), repeated.flatten(), reduction="none")
    return loss.view(b, k, t)


def _torch_pdist(score, logits, labels, temperature_gold, temperature_score):
    with torch.no_grad():  # Atlas's perplexity_score
        z = (labels > -1).sum(-1)
        gold_score = -_torch_token_loss(logits, labels).sum(-1) / z[:, None]
    return _torch_kldivloss(score, gold_score, temperature_gold, temperature_score)


def _torch_emdr2(score, logits, labels, temperature_gold, temperature_score):
    b, k, t, v = logits.shape
    with torch.no_grad():  # Atlas's logprob, its gold_score the reader's logits per passage (emdr_score)
        repeated_labels = torch.repeat_interleave(labels, k, dim=0)
        repeated_labels[repeated_labels == IGNORE_INDEX] = 0
        mask_labels = labels >= 0
        gold_log_prob = torch.nn.functional.log_softmax(logits.reshape(b * k, t, v) / temperature_gold, dim=-1)
        gold_log_probs = torch.gather(gold_log_prob, dim=-1, index=repeated_labels[..., None]).view(b, k, t)
    log_score = torch.nn.functional.log_softmax(score / temperature_score, dim=-1)
    logsumprobs = torch.logsumexp(gold_log_probs + log_score[..., None], dim=1)
    return -torch.sum(logsumprobs * mask_labels) / torch.sum(mask_labels)


def _torch_leave_one_out(score, logits, labels, per_token):
    """Atlas's loop_score for a marginal reader: for each left-out passage, the reader's mean token loss over the
    others (prior renormalised over them), stacked (B, K)."""
    with torch.no_grad():
        token_ll = -_torch_token_loss(logits, labels)
        mask = labels > -1
        losses = []
        for loo_index in range(score.shape[1]):
            kept = [j for j in range(score.shape[1]) if j != loo_index]
            log_prior = torch.log_softmax(score[:, kept], dim=-1)
            if per_token:
                ll = (torch.logsumexp(log_prior[..., None] + token_ll[:, kept], dim=1) * mask).sum(-1)
            else:
                ll = torch.logsumexp(log_prior + (token_ll[:, kept] * mask[:, None]).sum(-1), dim=1)
            losses.append(-ll / mask.sum(-1))
        return torch.stack(losses, dim=1)


def _torch_loop(score, logits, labels, temperature_gold, temperature_score, per_token):
    gold_score = _torch_leave_one_out(score.detach(), logits, labels, per_token)
    return _torch_kldivloss(score, gold_score, temperature_gold, temperature_score)


def _torch_value_and_grad(loss_fn, scores, logits, labels, dtype, **kwargs):
    score = torch.tensor(scores, dtype=dtype, requires_grad=True)
    loss = loss_fn(score, torch.tensor(logits, dtype=dtype), torch.tensor(labels), **kwargs)
    loss.backward()
    return loss.detach().numpy(), score.grad.numpy()


# ------------------------------------------------------------------------------------------------------ rag_jax


def _jax_loss(kind, scores, logits, decoder_inputs, temperature_gold, temperature_score, per_token=False):
    logits = jnp.asarray(logits)
    target_mask = marginal.shift_left(jnp.asarray(decoder_inputs), PAD) != PAD
    token_ll = marginal.target_log_likelihoods(logits, decoder_inputs, pad_token_id=PAD)

    def loss(scores_BxK):
        if kind == "pdist":
            per_question = retriever_losses.pdist(scores_BxK, token_ll, target_mask, temperature=temperature_gold,
                                                  score_temperature=temperature_score)
        elif kind == "emdr2":
            tempered = marginal.target_log_likelihoods(logits / temperature_gold, decoder_inputs, pad_token_id=PAD)
            per_question = retriever_losses.emdr2(scores_BxK, tempered, target_mask,
                                                  score_temperature=temperature_score)
        else:
            left_out = marginal.leave_one_out_losses(token_ll, jax.lax.stop_gradient(scores_BxK), target_mask,
                                                     per_token=per_token)
            per_question = retriever_losses.loop(scores_BxK, left_out, temperature=temperature_gold,
                                                 score_temperature=temperature_score)
        return per_question.mean()  # the step's mean over questions

    value, grad = jax.value_and_grad(loss)(jnp.asarray(scores))
    return np.asarray(value), np.asarray(grad)


CASES = [("pdist", _torch_pdist, {}), ("emdr2", _torch_emdr2, {}),
         ("loop", _torch_loop, {"per_token": False}), ("loop", _torch_loop, {"per_token": True})]
CASE_IDS = ["pdist", "emdr2", "loop_sequence", "loop_token"]


def _compare(kind, torch_fn, extra, temperatures, float64):
    scores, logits, decoder_inputs, atlas_labels = _inputs(seed=3)
    dtype = torch.float64 if float64 else torch.float32
    np_dtype = np.float64 if float64 else np.float32
    ref_value, ref_grad = _torch_value_and_grad(torch_fn, scores.astype(np_dtype), logits.astype(np_dtype),
                                                atlas_labels, dtype, temperature_gold=temperatures[0],
                                                temperature_score=temperatures[1], **extra)
    value, grad = _jax_loss(kind, scores.astype(np_dtype), logits.astype(np_dtype), decoder_inputs, *temperatures,
                            **extra)
    assert np.abs(ref_grad).max() > 1e-3  # a gradient worth comparing
    return relative_error(value, ref_value), relative_error(grad, ref_grad)


@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (0.5, 2.0)], ids=["t1", "t0.5_s2"])
@pytest.mark.parametrize("kind,torch_fn,extra", CASES, ids=CASE_IDS)
def test_loss_and_score_gradient_match_atlas_float32(kind, torch_fn, extra, temperatures):
    value_error, grad_error = _compare(kind, torch_fn, extra, temperatures, float64=False)
    assert value_error <= TOLERANCE_FLOAT32 and grad_error <= TOLERANCE_FLOAT32, (value_error, grad_error)


@pytest.mark.parametrize("kind,torch_fn,extra", CASES, ids=CASE_IDS)
def test_loss_and_score_gradient_match_atlas_float64(kind, torch_fn, extra):
    with jax.enable_x64(True):
        value_error, grad_error = _compare(kind, torch_fn, extra, (0.5, 2.0), float64=True)
    assert value_error <= TOLERANCE_FLOAT64 and grad_error <= TOLERANCE_FLOAT64, (value_error, grad_error)


def test_the_reader_terms_carry_no_gradient():
    """Atlas computes the reader's scores under no_grad: the losses' gradient w.r.t. the reader's log-likelihoods
    is zero, so the retriever loss never trains the reader."""
    scores, logits, decoder_inputs, _ = _inputs()
    mask = marginal.shift_left(jnp.asarray(decoder_inputs), PAD) != PAD
    token_ll = marginal.target_log_likelihoods(jnp.asarray(logits, jnp.float32), decoder_inputs, pad_token_id=PAD)
    for loss in (lambda t: retriever_losses.pdist(scores, t, mask).sum(),
                 lambda t: retriever_losses.emdr2(scores, t, mask).sum(),
                 lambda t: retriever_losses.loop(scores, t.sum(-1)).sum()):
        assert float(jnp.abs(jax.grad(loss)(token_ll)).max()) == 0.0


def test_pdist_is_zero_when_the_retriever_already_matches_the_reader():
    """The KL vanishes (value and gradient) when softmax(scores) is the target: the retriever has nothing to learn."""
    _, logits, decoder_inputs, _ = _inputs()
    mask = marginal.shift_left(jnp.asarray(decoder_inputs), PAD) != PAD
    token_ll = marginal.target_log_likelihoods(jnp.asarray(logits, jnp.float32), decoder_inputs, pad_token_id=PAD)
    matched = retriever_losses.mean_token_log_likelihoods(token_ll, mask)
    value, grad = jax.value_and_grad(lambda s: retriever_losses.pdist(s, token_ll, mask).mean())(matched)
    assert abs(float(value)) < 1e-6 and float(jnp.abs(grad).max()) < 1e-6


def test_support_prior_is_the_prior_of_the_passage_that_explains_the_answer():
    scores = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]]))
    token_ll = jnp.array([[[-5.0], [-0.1], [-5.0]], [[-0.1], [-5.0], [-5.0]]])  # row 0: passage 1; row 1: passage 0
    np.testing.assert_allclose(retriever_losses.support_prior(scores, token_ll), [0.2, 0.7], rtol=1e-6)


def test_attended_prior_is_the_prior_of_the_most_attended_passage():
    """ADist's support_prior: the passage the decoder attended to most, whatever its prior."""
    scores = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]]))
    attention = jnp.array([[0.01, 0.002, 0.03], [0.02, 0.01, 0.0]])  # row 0: passage 2; row 1: passage 0
    np.testing.assert_allclose(retriever_losses.attended_prior(scores, attention), [0.1, 0.7], rtol=1e-6)
