"""How the retriever learns from the reader (config train.retriever_loss), after Atlas (Izacard et al. 2022,
facebookresearch/atlas src/atlas.py), without gold passages.

  none      the retriever gets no gradient: the reader's marginal uses the doc scores as constants.
  marginal  RAG's own: the gradient of the reader's marginal NLL through p(z|x) (Lewis et al. 2020). The default.
  pdist     perplexity distillation: KL(target || p_retr) with target = softmax_k(s_k / temperature), s_k the
            reader's mean per-token log-likelihood of the answer given passage k alone (Atlas's "ppmean"/"pdist").
  emdr2     EMDR²: maximise log Σ_k p_reader(a|q,d_k) p_retr(d_k|q), the reader's terms held fixed. As Atlas's
            code does it, the marginal is taken per answer token (log Σ_k p_retr(d_k) p(a_t|q,d_k,a_<t)), the
            reader's token log-probabilities computed from logits / temperature, averaged over the batch's tokens.
  loop      leave-one-out perplexity distillation: KL(target || p_retr) with target = softmax_k(l_k / temperature),
            l_k the reader's mean per-token loss with passage k left out (a passage whose absence hurts most is the
            one to retrieve).
  adist     attention distillation (FiD reader only): KL(target || p_retr) with target = softmax_k(a_k / temperature),
            a_k the decoder's cross-attention to passage k while reading the answer (teacher-forced, no dropout):
            attention weight x the norm of the attended value, the mean over heads, summed over layers, answer tokens
            and the passage's tokens, / (256 x layers x answer tokens) (Atlas's "evalnormsum", its paper's ADist;
            readers/fid.py attention_distillation_scores).

In all four the reader's terms carry no gradient into the retriever loss (Atlas computes them under
torch.no_grad with the reader in eval mode: here a separate pass without dropout, under stop_gradient), and the
reader's own marginal NLL sees the doc scores as constants, so the retriever learns from the retriever loss alone.
The retriever's distribution is softmax(doc scores / score_temperature) over the K retrieved passages: the scores
the reader marginalises over (retrieval.score_scale applied), where Atlas divides by sqrt(d) and its
temperature_score. Atlas's KL is torch's KLDivLoss with its default 'mean' reduction, which divides by B*K, not B
(reference quirk kept: the per-question KL here is divided by K, so the batch mean is Atlas's value).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rag_jax.models import layers

RETRIEVER_LOSSES = ("none", "marginal", "pdist", "emdr2", "loop", "adist")
# the losses that need the reader's per-passage answer log-likelihoods (a pass of the reader without dropout)
DISTILLED = ("pdist", "emdr2", "loop")
# the losses under which the reader's marginal NLL carries the gradient to the retriever
THROUGH_MARGINAL = ("marginal",)


def _retriever_log_probs(doc_scores_BxK: jax.Array, score_temperature: float) -> jax.Array:
    return jax.nn.log_softmax(layers.at_least_float32(doc_scores_BxK) / score_temperature, axis=-1)


def kl_to_target(doc_scores_BxK: jax.Array, target_BxK: jax.Array, score_temperature: float = 1.0) -> jax.Array:
    """Σ_k t_k (log t_k - log p_retr(k)) / K per question (B,): torch's KLDivLoss()(log p, t), whose default 'mean'
    reduction divides the batch's sum by B*K (the batch mean of this is Atlas's value). 0 log 0 = 0, as torch's."""
    target_BxK = jax.lax.stop_gradient(target_BxK)
    log_target_BxK = jnp.where(target_BxK > 0, jnp.log(jnp.where(target_BxK > 0, target_BxK, 1.0)), 0.0)
    log_p_BxK = _retriever_log_probs(doc_scores_BxK, score_temperature)
    return jnp.sum(target_BxK * (log_target_BxK - log_p_BxK), axis=-1) / doc_scores_BxK.shape[-1]


def mean_token_log_likelihoods(token_ll_BxKxT: jax.Array, target_mask_BxT: jax.Array) -> jax.Array:
    """The reader's mean per-token log-likelihood of the answer under each passage (B, K): Atlas's
    perplexity_score (-Σ_t cross-entropy / answer tokens)."""
    mask_BxT = target_mask_BxT.astype(token_ll_BxKxT.dtype)
    return jnp.sum(token_ll_BxKxT * mask_BxT[:, None], axis=-1) / jnp.maximum(mask_BxT.sum(-1), 1.0)[:, None]


def pdist(doc_scores_BxK: jax.Array, token_ll_BxKxT: jax.Array, target_mask_BxT: jax.Array, *,
          temperature: float = 1.0, score_temperature: float = 1.0) -> jax.Array:
    """Perplexity distillation per question (B,). token_ll_BxKxT: log p(a_t | q, d_k, a_<t) of the answer's
    tokens under each passage alone (0 at pads); target_mask_BxT: which targets are answer tokens."""
    gold_BxK = jax.lax.stop_gradient(mean_token_log_likelihoods(token_ll_BxKxT, target_mask_BxT))
    return kl_to_target(doc_scores_BxK, jax.nn.softmax(gold_BxK / temperature, axis=-1), score_temperature)


def emdr2(doc_scores_BxK: jax.Array, token_ll_BxKxT: jax.Array, target_mask_BxT: jax.Array, *,
          score_temperature: float = 1.0) -> jax.Array:
    """EMDR² per question (B,), scaled so that its batch mean is Atlas's value: -Σ_t log Σ_k p_retr(d_k|q)
    p(a_t|q,d_k,a_<t) over the question's answer tokens, x B / (the batch's answer tokens). token_ll_BxKxT: the
    reader's token log-probabilities (Atlas: log_softmax(logits / temperature_gold)), held fixed."""
    token_ll_BxKxT = jax.lax.stop_gradient(layers.at_least_float32(token_ll_BxKxT))
    log_p_BxK = _retriever_log_probs(doc_scores_BxK, score_temperature)
    marginal_BxT = jax.nn.logsumexp(token_ll_BxKxT + log_p_BxK[:, :, None], axis=1)
    mask_BxT = target_mask_BxT.astype(marginal_BxT.dtype)
    batch = doc_scores_BxK.shape[0]
    return -jnp.sum(marginal_BxT * mask_BxT, axis=-1) * batch / jnp.maximum(mask_BxT.sum(), 1.0)


def loop(doc_scores_BxK: jax.Array, left_out_loss_BxK: jax.Array, *, temperature: float = 1.0,
         score_temperature: float = 1.0) -> jax.Array:
    """Leave-one-out perplexity distillation per question (B,). left_out_loss_BxK: the reader's mean per-token
    loss of the answer with passage k left out (Reader.leave_one_out_losses), held fixed."""
    gold_BxK = jax.lax.stop_gradient(left_out_loss_BxK)
    return kl_to_target(doc_scores_BxK, jax.nn.softmax(gold_BxK / temperature, axis=-1), score_temperature)


def adist(doc_scores_BxK: jax.Array, attention_scores_BxK: jax.Array, *, temperature: float = 1.0,
          score_temperature: float = 1.0) -> jax.Array:
    """Attention distillation per question (B,). attention_scores_BxK: the FiD decoder's cross-attention scores
    per passage (Reader.passage_attention_scores), held fixed."""
    gold_BxK = jax.lax.stop_gradient(layers.at_least_float32(attention_scores_BxK))
    return kl_to_target(doc_scores_BxK, jax.nn.softmax(gold_BxK / temperature, axis=-1), score_temperature)


def support_prior(doc_scores_BxK: jax.Array, token_ll_BxKxT: jax.Array) -> jax.Array:
    """The prior p(z|x) of the passage that supported the answer most, argmax_z p(z|x) Π_t p(a_t|x,z,a_<t) (B,):
    a retriever that learns from the reader moves its mass there, gold passages known or not."""
    log_prior_BxK = jax.nn.log_softmax(layers.at_least_float32(doc_scores_BxK), axis=-1)
    return _prior_of(log_prior_BxK, jnp.argmax(log_prior_BxK + token_ll_BxKxT.sum(-1), axis=-1))


def attended_prior(doc_scores_BxK: jax.Array, attention_scores_BxK: jax.Array) -> jax.Array:
    """ADist's support_prior (B,): the prior p(z|x) of the passage the FiD decoder attended to most (the reader
    computes no per-passage likelihood, and its attention mass is what ADist distils)."""
    log_prior_BxK = jax.nn.log_softmax(layers.at_least_float32(doc_scores_BxK), axis=-1)
    return _prior_of(log_prior_BxK, jnp.argmax(attention_scores_BxK, axis=-1))


def _prior_of(log_prior_BxK: jax.Array, chosen_B: jax.Array) -> jax.Array:
    return jnp.exp(jnp.take_along_axis(log_prior_BxK, chosen_B[:, None], axis=-1)[:, 0])
