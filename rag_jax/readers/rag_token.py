"""RAG-Token (Lewis et al. 2020): every target token marginalises the passages, p(y|x) = Π_t Σ_z p(z|x)
p(y_t | x, z, y_<t). Its loss (transformers' RagTokenForGeneration.get_nll), its decoding (greedy or beam search over
the passage-marginal next-token scores, RagTokenForGeneration.generate token for token) and its provenance
(marginal.MarginalReader: the passages' posteriors per generated token and per answer).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rag_jax import rag
from rag_jax.models import layers
from rag_jax.readers import decoding, marginal, registry, search
from rag_jax.readers.generation import GenerationConfig


def log_probs(logits_BxKxTxV: jax.Array, doc_scores_BxK: jax.Array) -> jax.Array:
    """log Σ_z p(z|x) p(y_t|x,z,y_<t) for every vocabulary entry: (B, T, V)."""
    doc_lp_BxK = jax.nn.log_softmax(layers.at_least_float32(doc_scores_BxK), axis=-1)
    seq_lp = jax.nn.log_softmax(layers.at_least_float32(logits_BxKxTxV), axis=-1)
    return jax.nn.logsumexp(seq_lp + doc_lp_BxK[:, :, None, None], axis=1)


def nll(
    logits_BxKxTxV: jax.Array,
    doc_scores_BxK: jax.Array,
    labels_BxT: jax.Array,
    *,
    pad_token_id: int,
    epsilon: float = 0.0,
    reduce: bool = False,
) -> jax.Array:
    """-Σ_t log Σ_z p(z|x) p(y_t|x,z,y_<t), per example (B,) or summed when `reduce`."""
    target_BxT = marginal.shift_left(labels_BxT, pad_token_id)
    marginal_BxTxV = log_probs(logits_BxKxTxV, doc_scores_BxK)
    ll_BxT = jnp.take_along_axis(marginal_BxTxV, target_BxT[..., None], axis=-1)[..., 0]
    keep_BxT = target_BxT != pad_token_id
    ll_B = jnp.where(keep_BxT, ll_BxT, 0.0).sum(-1)
    smoothing = marginal.smoothing_needed(epsilon)
    smooth_B = -jnp.where(keep_BxT, marginal_BxTxV.sum(-1), 0.0).sum(-1) if smoothing else None
    return marginal.smoothed(-ll_B, smooth_B, epsilon, logits_BxKxTxV.shape[-1], reduce)


# ---------------------------------------------------------------------------------------------------- decoding


def marginal_log_probs(logits_NxKxV: jax.Array, doc_lp_NxK: jax.Array) -> jax.Array:
    """RAG-Token's next-token log-probabilities log Σ_z p(z|x) softmax(logits_z) (N, V).

    The same function as logsumexp_z(doc_lp_z + log_softmax(logits_z)), with one exp per logit instead of two
    (the per-doc normaliser and the mixture share exp(logits_z - max_z)) and the mixture over docs as a matmul; the
    transcendental passes over the (N, K, V) logits cost more than the decoder step on CPU. Values agree to float32
    rounding, except that a token whose probability is below ~e^-87 under every document gets -inf (exp underflow)
    instead of a finite score that low.
    """
    logits_NxKxV = logits_NxKxV.astype(jnp.float32)
    exp_NxKxV = jnp.exp(logits_NxKxV - jnp.max(logits_NxKxV, axis=-1, keepdims=True))
    weights_NxK = jnp.exp(doc_lp_NxK - jnp.log(exp_NxKxV.sum(-1)))  # p(z|x) / per-doc normaliser
    # HIGHEST: TPUs would otherwise multiply float32 in one bf16 pass (a 1e-3 relative error in the mixture).
    mixture_NxV = jnp.einsum("nk,nkv->nv", weights_NxK, exp_NxKxV, precision=jax.lax.Precision.HIGHEST)
    return jnp.log(mixture_NxV)


@functools.partial(jax.jit, static_argnames=("model", "gen", "return_token_ll"))
def generate(
    model: rag.Rag,
    params,
    context_input_ids_BKxS: jax.Array,
    context_attention_mask_BKxS: jax.Array,
    doc_scores_BxK: jax.Array,
    gen: GenerationConfig,
    return_token_ll: bool = False,
):
    """RAG-Token decoding (RagTokenForGeneration.generate): greedy or beam search over the next-token scores
    logsumexp_z(log p(z|x) + log_softmax(logits_z)). The encoder runs once per context; its states are tiled over
    (example, beam, doc). Returns (B * num_return_sequences, max_length) int32, filled past the end, and with
    `return_token_ll` also each answer's per-document target log-likelihoods (B * num_return_sequences, K,
    max_length) for marginal.doc_posteriors."""
    batch, n_docs = decoding.check_shapes(context_input_ids_BKxS, doc_scores_BxK, None)
    nb = gen.num_beams
    encoder_out = decoding.encode(model, params, context_input_ids_BKxS, context_attention_mask_BKxS)
    cache = decoding.tiled_cache(model, params, encoder_out, context_attention_mask_BKxS, nb, n_docs, gen.max_length)
    doc_lp_NxK = jnp.repeat(jax.nn.log_softmax(doc_scores_BxK.astype(jnp.float32), axis=-1), nb, axis=0)

    def step(cache, tokens_N):
        logits, cache = decoding.decode_step(model, params, cache, jnp.repeat(tokens_N, n_docs))
        return marginal_log_probs(logits.reshape(batch * nb, n_docs, -1), doc_lp_NxK), cache

    reorder = functools.partial(decoding.reorder_self_kv, rows_per_beam=n_docs)
    out = search.search(step, reorder, cache, batch, gen)
    if not return_token_ll:
        return out
    return out, marginal.answer_token_ll(model, params, out, encoder_out, context_attention_mask_BKxS, n_docs)


class RagToken(marginal.MarginalReader):
    name = "rag_token"
    hf_architecture = "RagTokenForGeneration"
    marginalises_per_token = True

    def marginal_nll(self, logits_BxKxTxV, doc_scores_BxK, labels_BxT, generator_config, epsilon):
        return nll(logits_BxKxTxV, doc_scores_BxK, labels_BxT, pad_token_id=generator_config.pad_token_id,
                   epsilon=epsilon)

    def decode(self, model, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK, gen, mode,
               return_token_ll):
        del mode  # one kind
        return generate(model, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK, gen,
                        return_token_ll=return_token_ll)


READER = registry.register(RagToken())
