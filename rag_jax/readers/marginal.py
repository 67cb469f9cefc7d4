"""What RAG-Sequence and RAG-Token share: both marginalise one generator pass per retrieved passage z over p(z|x)
(Lewis et al. 2020), so both are built from the per-passage target log-likelihoods log p(y_t | x, z, y_<t), take
label smoothing the reference's way, and report provenance as posteriors over the passages. `MarginalReader` is
their common base: the generator logits per passage, the loss and scores from them, provenance from decoding.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rag_jax import rag
from rag_jax.models import layers
from rag_jax.readers import base, decoding, registry


def shift_left(labels_BxT: jax.Array, pad_token_id: int) -> jax.Array:
    """The targets of decoder inputs `labels`: labels[:, 1:] followed by a pad (the reference's shift)."""
    return jnp.concatenate([labels_BxT[:, 1:], jnp.full_like(labels_BxT[:, :1], pad_token_id)], axis=1)


def token_log_probs(logits_BxKxTxV: jax.Array, target_BxT: jax.Array, smoothing: bool = True):
    """log p(target) (B, K, T) and the vocabulary sum of log-probabilities (B, K, T) (None without `smoothing`),
    without materialising the (B, K, T, V) log-softmax a second time."""
    logits_BxKxTxV = layers.at_least_float32(logits_BxKxTxV)
    lse_BxKxT = jax.nn.logsumexp(logits_BxKxTxV, axis=-1)
    target_BxKxT = jnp.broadcast_to(target_BxT[:, None, :], lse_BxKxT.shape)
    picked = jnp.take_along_axis(logits_BxKxTxV, target_BxKxT[..., None], axis=-1)[..., 0]
    vocab = logits_BxKxTxV.shape[-1]
    return picked - lse_BxKxT, (logits_BxKxTxV.sum(-1) - vocab * lse_BxKxT) if smoothing else None


def smoothing_needed(epsilon) -> bool:
    """Whether the label-smoothing terms are needed. For a Python 0 they are skipped: computed and multiplied by 0
    they would still cost passes over the (B, K, T, V) logits (and their gradients), which XLA cannot drop since
    0 * x is not 0 for an infinite x."""
    return not (isinstance(epsilon, (int, float)) and epsilon == 0)


def smoothed(nll_B, smooth_B, epsilon: float, vocab: int, reduce: bool):
    if reduce:
        nll_B = nll_B.sum()
        smooth_B = None if smooth_B is None else smooth_B.sum()
    if smooth_B is None:
        return nll_B
    return (1.0 - epsilon) * nll_B + (epsilon / vocab) * smooth_B



# ------------------------------------------------------------------------------------------------- provenance


def target_log_likelihoods(logits_BxKxTxV: jax.Array, decoder_input_ids_BxT: jax.Array, *, pad_token_id: int):
    """log p(y_t | x, z, y_<t) of each target (the decoder inputs shifted left) under each document: (B, K, T),
    0 where the target is a pad. The per-document terms both losses are built from."""
    target_BxT = shift_left(decoder_input_ids_BxT, pad_token_id)
    token_ll_BxKxT, _ = token_log_probs(logits_BxKxTxV, target_BxT, smoothing=False)
    return zero_at_pad_targets(token_ll_BxKxT, target_BxT, pad_token_id)


def zero_at_pad_targets(token_ll_BxKxT: jax.Array, target_BxT: jax.Array, pad_token_id: int) -> jax.Array:
    """The per-document target log-likelihoods with 0 where the target is a pad (`target_log_likelihoods`' terms,
    for callers that compute log p(y_t|x,z,y_<t) without the logits)."""
    return jnp.where((target_BxT != pad_token_id)[:, None], token_ll_BxKxT, 0.0)


def doc_posteriors(doc_scores_BxK: jax.Array, token_ll_BxKxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Which retrieved document supported an answer y, from its per-document target log-likelihoods
    (`target_log_likelihoods`): (per token (B, T, K), per answer (B, K)), each summing to one over the documents.

    Per token, Figure 2 of the paper: p(z | x, y_t, y_<t) ∝ p(z|x) p(y_t | x, z, y_<t) (the terms RAG-Token's
    marginal sums; at a pad target it is the prior). Per answer: p(z | x, y) ∝ p(z|x) Π_t p(y_t | x, z, y_<t) (the
    terms RAG-Sequence's marginal sums, with the prior always counted: the paper's formula, not the reference's
    position-1 quirk, which would drop it for a one-token answer).
    """
    doc_lp_BxK = jax.nn.log_softmax(layers.at_least_float32(doc_scores_BxK), axis=-1)
    per_token_BxKxT = jax.nn.softmax(doc_lp_BxK[:, :, None] + token_ll_BxKxT, axis=1)
    per_answer_BxK = jax.nn.softmax(doc_lp_BxK + token_ll_BxKxT.sum(-1), axis=1)
    return jnp.swapaxes(per_token_BxKxT, 1, 2), per_answer_BxK


def answer_token_ll(model: rag.Rag, params, ids_NxL, encoder_out_BKxSxE, mask_BKxS, n_docs: int):
    """log p(y_t | x, z, y_<t) (N, K, L) of N = B * copies finished answers under each of their example's K docs,
    from one decoder pass over the encoder states the search already has (provenance, doc_posteriors). The
    search itself keeps only the document-marginal scores, which cannot be split back into documents."""
    batch = mask_BKxS.shape[0] // n_docs
    copies = ids_NxL.shape[0] // batch

    def tile(x):  # (B*K, ...) -> (B*copies*K, ...), rows (example, copy, doc)
        x = x.reshape(batch, 1, n_docs, *x.shape[1:])
        return jnp.broadcast_to(x, (batch, copies, *x.shape[2:])).reshape(-1, *x.shape[3:])

    logits = model.generator.apply(
        {"params": params["generator"]}, jnp.repeat(ids_NxL, n_docs, axis=0), tile(encoder_out_BKxSxE),
        tile(mask_BKxS), method="decode",
    )  # fmt: skip
    logits = logits.reshape(ids_NxL.shape[0], n_docs, *logits.shape[1:])
    return target_log_likelihoods(logits, ids_NxL, pad_token_id=model.generator_config.pad_token_id)


# ---------------------------------------------------------------------------------------------------- the reader


@jax.jit
def _posteriors(doc_scores_BxK, token_ll_BxKxL):
    return doc_posteriors(doc_scores_BxK, token_ll_BxKxL)


def leave_one_out_losses(token_ll_BxKxT: jax.Array, doc_scores_BxK: jax.Array, target_mask_BxT: jax.Array, *,
                         per_token: bool) -> jax.Array:
    """The marginal NLL of the answer with passage k left out, per answer token (B, K): the prior renormalised over
    the other K-1 passages, marginalised per answer (RAG-Sequence) or per token (`per_token`, RAG-Token), with the
    paper's prior (not RAG-Sequence's position-1 quirk). Each passage's terms are computed alone, so leaving one out
    needs no new generator pass (a FiD reader masks the passage and decodes again)."""
    n_docs = doc_scores_BxK.shape[-1]
    kept_KxJ = ~jnp.eye(n_docs, dtype=bool)  # row k: the passages kept when k is left out
    log_prior_BxK = jax.nn.log_softmax(layers.at_least_float32(doc_scores_BxK), axis=-1)
    log_prior_BxKxJ = jnp.where(kept_KxJ, log_prior_BxK[:, None, :], -jnp.inf)
    log_prior_BxKxJ = log_prior_BxKxJ - jax.nn.logsumexp(log_prior_BxKxJ, axis=-1, keepdims=True)
    mask_BxT = target_mask_BxT.astype(log_prior_BxK.dtype)
    if per_token:
        terms_BxKxJxT = log_prior_BxKxJ[..., None] + token_ll_BxKxT[:, None]
        ll_BxK = jnp.sum(jax.nn.logsumexp(terms_BxKxJxT, axis=2) * mask_BxT[:, None], axis=-1)
    else:
        ll_BxK = jax.nn.logsumexp(log_prior_BxKxJ + token_ll_BxKxT.sum(-1)[:, None, :], axis=-1)
    return -ll_BxK / jnp.maximum(mask_BxT.sum(-1), 1.0)[:, None]


class MarginalReader(base.Reader):
    """A reader whose answer probability is a marginal over the passages of per-passage generator passes: its loss
    and scores come from the (B, K, T, V) logits of the generator over each (question, passage) pair; a subclass
    gives `marginal_nll` and `decode`."""

    marginalises_per_token = False  # RAG-Token's marginal is per target token, RAG-Sequence's per answer

    def marginal_nll(self, logits_BxKxTxV: jax.Array, doc_scores_BxK: jax.Array, labels_BxT: jax.Array,
                     generator_config: Any, epsilon: float) -> jax.Array:
        """The reader's negative log-likelihood (B,) of `labels` from the per-passage logits."""
        raise NotImplementedError

    def decode(self, model: rag.Rag, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK,
               gen, mode: str | None, return_token_ll: bool):
        """tokens (N, L), and with `return_token_ll` (tokens, per-passage target log-likelihoods (N, K, L))."""
        raise NotImplementedError

    def loss(self, model, params, batch, doc_scores_BxK, *, epsilon, dropout_rng):
        b, k, s = batch["context_input_ids"].shape
        logits = model.generator_logits(params, batch["context_input_ids"].reshape(b * k, s),
                                        batch["context_attention_mask"].reshape(b * k, s), batch["labels"],
                                        dropout_rng=dropout_rng)
        return self.marginal_nll(logits, doc_scores_BxK, batch["labels"], model.generator_config, epsilon)

    def passage_log_likelihoods(self, model, params, batch):
        return self.passage_token_log_likelihoods(model, params, batch).sum(-1)

    def passage_token_log_likelihoods(self, model, params, batch, temperature=1.0):
        b, k, s = batch["context_input_ids"].shape
        logits = model.generator_logits(params, batch["context_input_ids"].reshape(b * k, s),
                                        batch["context_attention_mask"].reshape(b * k, s), batch["labels"])
        if temperature != 1.0:
            logits = layers.at_least_float32(logits) / temperature
        pad = model.generator_config.pad_token_id
        return target_log_likelihoods(logits, batch["labels"], pad_token_id=pad)

    def leave_one_out_losses(self, token_ll_BxKxT, doc_scores_BxK, target_mask_BxT):
        return leave_one_out_losses(token_ll_BxKxT, doc_scores_BxK, target_mask_BxT,
                                    per_token=self.marginalises_per_token)

    def generate(self, model, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK, gen, *,
                 decoding=None, provenance=False):
        decoded = self.decode(model, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK, gen,
                              decoding, provenance)
        if not provenance:
            return base.Decoded(decoded)
        tokens, token_ll = decoded
        return base.Decoded(tokens, *_posteriors(doc_scores_BxK, token_ll))

    def answer_posteriors(self, model, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK,
                          tokens_NxL) -> tuple[jax.Array, jax.Array]:
        """(per token (N, L, K), per answer (N, K)) posteriors over the passages of given answers (N = B * copies),
        from one decoder pass: for a reader that chooses its answers by other scores than its search's."""
        return _posteriors(doc_scores_BxK, _answer_token_ll(model, params, tokens_NxL, context_input_ids_BKxS,
                                                            context_attention_mask_BKxS, doc_scores_BxK.shape[1]))

    def score(self, model, params, context_input_ids_BKxS, context_attention_mask_BKxS, q_BxD, doc_embeds_BxKxD,
              labels_BxT):
        """nll_sequence and nll_token: the gold answer's NLL under RAG-Sequence and RAG-Token (the same logits serve
        both), whichever of the two answered."""
        return _both_nlls(model, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_embeds_BxKxD, q_BxD,
                          labels_BxT)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _answer_token_ll(model: rag.Rag, params, tokens_NxL, context_ids, context_mask, n_docs: int) -> jax.Array:
    encoder_out = decoding.encode(model, params, context_ids, context_mask)
    return answer_token_ll(model, params, tokens_NxL, encoder_out, context_mask, n_docs)


@functools.partial(jax.jit, static_argnums=0)
def _both_nlls(model: rag.Rag, params, context_ids, context_mask, doc_embeds, q, labels) -> dict[str, jax.Array]:
    scores = rag.doc_scores(q, doc_embeds)
    logits = model.generator_logits(params, context_ids, context_mask, labels)
    g = model.generator_config
    return {f"nll_{kind}": registry.get(f"rag_{kind}").marginal_nll(logits, scores, labels, g, 0)
            for kind in ("sequence", "token")}
