"""Fusion-in-Decoder (Izacard & Grave 2020), as facebookresearch/FiD builds it: each of a question's K passages is
formatted `question: {question} title: {title} context: {text}` (src/data.py; `context_format` below), tokenised and
truncated/padded to the passage length on its own, the generator's encoder runs over the B*K rows in one batched
pass, each question's K encoder outputs and masks are concatenated to K*S positions (FiDT5's EncoderWrapper), and
one decoder attends over all of them. The loss is the answer's token cross-entropy (the answer followed by the end
token) averaged over the batch's answer tokens, as FiD's T5ForConditionalGeneration loss (CrossEntropyLoss with
ignore_index, mean over the kept tokens) averages it. The doc scores take no part: the reader does not marginalise.

Decoding is greedy or beam search over one decoder per question, the encoder run once per question and the
cross-attention keys/values projected once (decoding.tiled_cache with one "passage" of K*S positions): transformers'
`generate` with the concatenated encoder output.

The decoder's cross-attention per passage is provenance's mass (cross_attention_mass) and Atlas's ADist target
(attention_distillation_scores, train.retriever_loss=adist).
"""

from __future__ import annotations

import dataclasses
import functools

from flax import traverse_util
import jax
import jax.numpy as jnp

from rag_jax import rag
from rag_jax.models import layers
from rag_jax.readers import base, decoding, marginal, registry, search
from rag_jax.retrieval.contexts import ContextFormat


def fused_encoder_out(model: rag.Rag, params, ids_BKxS: jax.Array, mask_BKxS: jax.Array, n_docs: int, *,
                      dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The encoder over the B*K passages, concatenated per question: states (B, K*S, E) and mask (B, K*S).

    Without dropout the encoder runs a few passages at a time (decoding.encode: the same values, faster on CPU);
    the cross-attention has no positions, so the concatenated padding in the middle is hidden by the mask alone."""
    rows, width = ids_BKxS.shape
    if dropout_rng is None:
        states = decoding.encode(model, params, ids_BKxS, mask_BKxS)
    elif model.config.remat_encoder:
        states = _rematerialised_encode(model, params, ids_BKxS, mask_BKxS, n_docs, dropout_rng)
    else:
        states = model.generator.apply({"params": params["generator"]}, ids_BKxS, mask_BKxS, deterministic=False,
                                       rngs={"dropout": dropout_rng}, method="encode")
    batch = rows // n_docs
    states = layers.constrain(states.reshape(batch, n_docs * width, -1), ("batch", "length", "embed"))
    return states, mask_BKxS.reshape(batch, n_docs * width)


def _rematerialised_encode(model: rag.Rag, params, ids_BKxS, mask_BKxS, n_docs: int, dropout_rng) -> jax.Array:
    """The encoder (B*K, S, E) one passage of each question at a time (a loop over K), each step under
    jax.checkpoint: the backward pass keeps each step's (B, S) inputs and its output, and recomputes the step's
    activations when it needs them (FiD's --use_checkpoint keeps each layer's inputs). The loop runs over passages,
    not rows, so every step keeps the batch's sharding."""
    rows, width = ids_BKxS.shape
    batch = rows // n_docs
    per_passage = lambda x: jnp.swapaxes(x.reshape(batch, n_docs, width), 0, 1)  # noqa: E731  (K, B, S)

    @jax.checkpoint
    def encode(generator_params, ids_BxS, mask_BxS, rng):
        return model.generator.apply({"params": generator_params}, ids_BxS, mask_BxS, deterministic=False,
                                     rngs={"dropout": rng}, method="encode")

    rngs_K = jax.random.split(dropout_rng, n_docs)
    states_KxBxSxE = jax.lax.map(lambda xs: encode(params["generator"], *xs),
                                 (per_passage(ids_BKxS), per_passage(mask_BKxS), rngs_K))
    return jnp.swapaxes(states_KxBxSxE, 0, 1).reshape(rows, width, -1)


def target_log_likelihoods(logits_BxTxV: jax.Array, labels_BxT: jax.Array, pad_token_id: int, smoothing: bool):
    """log p(y_t | x, y_<t) of each target (labels shifted left) (B, T), 0 at pad targets, and for label smoothing
    the vocabulary sums of the log-probabilities (B, T) (None without)."""
    target_BxT = marginal.shift_left(labels_BxT, pad_token_id)
    token_ll, vocab_sum = marginal.token_log_probs(logits_BxTxV[:, None], target_BxT, smoothing)
    keep_BxT = target_BxT != pad_token_id
    token_ll_BxT = jnp.where(keep_BxT, token_ll[:, 0], 0.0)
    vocab_sum_BxT = None if vocab_sum is None else jnp.where(keep_BxT, vocab_sum[:, 0], 0.0)
    return token_ll_BxT, vocab_sum_BxT


def fused_logits(model: rag.Rag, params, ids_BKxS, mask_BKxS, labels_BxT, *, dropout_rng=None) -> jax.Array:
    """The decoder's logits (B, T, V) for decoder inputs `labels` over each question's fused passages."""
    n_docs = ids_BKxS.shape[0] // labels_BxT.shape[0]
    e_rng, d_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    states, mask = fused_encoder_out(model, params, ids_BKxS, mask_BKxS, n_docs, dropout_rng=e_rng)
    rngs = {} if d_rng is None else {"dropout": d_rng}
    return model.generator.apply({"params": params["generator"]}, labels_BxT, states, mask,
                                 deterministic=d_rng is None, rngs=rngs, method="decode")


def nll_sums(model: rag.Rag, params, ids_BKxS, mask_BKxS, labels_BxT) -> jax.Array:
    """-log p(y | x, all K passages) per question (B,): the answer's token NLL summed, end token included."""
    logits = fused_logits(model, params, ids_BKxS, mask_BKxS, labels_BxT)
    token_ll_BxT, _ = target_log_likelihoods(logits, labels_BxT, model.generator_config.pad_token_id, False)
    return -token_ll_BxT.sum(-1)


# -------------------------------------------------------------------------------------------------- provenance


# Atlas's ADist score ("evalnormsum": src/fid.py, aggregate_value's "sum") divides each passage's summed score by
# 256 (a literal there, whatever the passage length) x decoder layers x answer tokens. Kept: it sets the scale that
# train.retriever_temperature (Atlas's temperature_gold, 0.01 in its scripts) divides.
ATLAS_SCORE_DIVISOR = 256


def decoder_cross_attention(model: rag.Rag, params, tokens_NxL, states_NxKSxE, mask_NxKS) -> list:
    """One decoder pass over `tokens_NxL` (no dropout, no LM head): per layer, its cross-attention weights
    (N, H, L, K*S) and the norms of its values (N, H, K*S)."""
    _, kept = model.generator.apply({"params": params["generator"]}, tokens_NxL, states_NxKSxE, mask_NxKS,
                                    head=False, method="decode", mutable=["intermediates"])
    flat = traverse_util.flatten_dict(kept["intermediates"])
    layers_ = [path[:-1] for path in flat if "cross_attn" in path and path[-1] == "attention_weights"]
    return [(flat[path + ("attention_weights",)][0], flat[path + ("value_norms",)][0]) for path in layers_]


def cross_attention_mass(model: rag.Rag, params, tokens_NxL, states_BxKSxE, mask_BxKS, n_docs: int):
    """How much of the decoder's cross-attention each passage got while reading answers `tokens_NxL` (start token
    first; N = B * copies): per token (N, L, K), row t the attention of decoder position t, which predicts token
    t + 1, and per answer (N, K), the mean over its tokens up to its end token; each sums to 1 over the passages.
    Averaged over layers and heads (FiD-KD's attention scores, Izacard & Grave 2021, take the same average)."""
    copies = tokens_NxL.shape[0] // states_BxKSxE.shape[0]
    states, mask = jnp.repeat(states_BxKSxE, copies, axis=0), jnp.repeat(mask_BxKS, copies, axis=0)
    cross = [weights for weights, _ in decoder_cross_attention(model, params, tokens_NxL, states, mask)]
    per_layer_NxL_xHxK = [w.reshape(*w.shape[:3], n_docs, -1).sum(-1).mean(1) for w in cross]
    per_token_NxLxK = jnp.mean(jnp.stack(per_layer_NxL_xHxK), axis=0)
    targets_NxL = tokens_NxL[:, 1:]
    eos = model.generator_config.eos_token_id
    ended_before = (jnp.cumsum(targets_NxL == eos, axis=1) - (targets_NxL == eos)) > 0
    reads_N_xL = jnp.concatenate([~ended_before, jnp.zeros_like(ended_before[:, :1])], axis=1).astype(jnp.float32)
    per_answer_NxK = (per_token_NxLxK * reads_N_xL[..., None]).sum(1) / jnp.maximum(reads_N_xL.sum(1), 1.0)[:, None]
    return per_token_NxLxK, per_answer_NxK


def attention_distillation_scores(model: rag.Rag, params, labels_BxT, states_BxKSxE, mask_BxKS, n_docs: int):
    """Atlas's ADist target before its softmax (B, K), from a teacher-forced decoder pass over `labels_BxT`: the
    cross-attention weight of each (answer token, passage token) times the norm of that passage token's value, the
    mean over heads, summed over layers, answer tokens (targets that are not padding) and the passage's tokens
    (not its padding), / (ATLAS_SCORE_DIVISOR x layers x answer tokens)."""
    cross = decoder_cross_attention(model, params, labels_BxT, states_BxKSxE, mask_BxKS)
    weighted_BxTxKS = sum(jnp.mean(w * norms[:, :, None, :], axis=1) for w, norms in cross)
    batch, length, _ = weighted_BxTxKS.shape
    pad = model.generator_config.pad_token_id
    answer_BxT = marginal.shift_left(labels_BxT, pad) != pad
    keep = answer_BxT[:, :, None, None] & (mask_BxKS.reshape(batch, 1, n_docs, -1) > 0)
    summed_BxK = jnp.where(keep, weighted_BxTxKS.reshape(batch, length, n_docs, -1), 0.0).sum((1, 3))
    answer_tokens_B = jnp.maximum(answer_BxT.sum(-1), 1)
    return summed_BxK / (ATLAS_SCORE_DIVISOR * len(cross) * answer_tokens_B[:, None])


# ---------------------------------------------------------------------------------------------------- decoding


@functools.partial(jax.jit, static_argnames=("model", "gen", "provenance"))
def generate(model: rag.Rag, params, context_input_ids_BKxS, context_attention_mask_BKxS, n_docs_like_B, gen,
             provenance: bool = False):
    """Greedy or beam search (gen.num_beams) over one decoder per question: (B * num_return_sequences, max_length)
    int32, filled past the end. `n_docs_like_B` is any (B, K) array (the doc scores): it gives B and K statically.
    With `provenance`, (tokens, cross_attention_mass per token, per answer)."""
    batch, n_docs = decoding.check_shapes(context_input_ids_BKxS, n_docs_like_B, None)
    states, mask = fused_encoder_out(model, params, context_input_ids_BKxS, context_attention_mask_BKxS, n_docs)
    cache = decoding.tiled_cache(model, params, states, mask, gen.num_beams, 1, gen.max_length)

    def step(cache, tokens_N):
        logits_NxV, cache = decoding.decode_step(model, params, cache, tokens_N)
        return jax.nn.log_softmax(logits_NxV.astype(jnp.float32), axis=-1), cache

    reorder = functools.partial(decoding.reorder_self_kv, rows_per_beam=1)
    tokens_NxL = search.search(step, reorder, cache, batch, gen)
    if not provenance:
        return tokens_NxL
    return tokens_NxL, *cross_attention_mass(model, params, tokens_NxL, states, mask, n_docs)


@functools.partial(jax.jit, static_argnums=0)
def _scores(model: rag.Rag, params, ids_BKxS, mask_BKxS, labels_BxT) -> dict[str, jax.Array]:
    return {"nll": nll_sums(model, params, ids_BKxS, mask_BKxS, labels_BxT)}


# ---------------------------------------------------------------------------------------------------- the reader


class FusionInDecoder(base.Reader):
    name = "fid"

    def context_format(self, fmt: ContextFormat, model_config=None) -> ContextFormat:
        """FiD's passage strings (src/data.py): `question: {q} title: {t} context: {c}`, each passage alone, cut or
        padded to model.fid.passage_length tokens (FiD's --text_maxlength; unset: model.max_combined_length)."""
        length = None if model_config is None else model_config.get("fid", {}).get("passage_length")
        return dataclasses.replace(fmt, layout="fid", max_combined_length=length or fmt.max_combined_length)

    def loss(self, model, params, batch, doc_scores_BxK, *, epsilon, dropout_rng):
        """Per-question NLL scaled so that its mean over the batch is the mean over the batch's answer tokens
        (FiD's loss: T5ForConditionalGeneration's cross-entropy, averaged over the non-ignored tokens)."""
        del doc_scores_BxK  # the reader does not weigh passages by the retriever
        b, k, s = batch["context_input_ids"].shape
        labels = batch["labels"]
        logits = fused_logits(model, params, batch["context_input_ids"].reshape(b * k, s),
                              batch["context_attention_mask"].reshape(b * k, s), labels, dropout_rng=dropout_rng)
        pad = model.generator_config.pad_token_id
        token_ll_BxT, vocab_sum_BxT = target_log_likelihoods(logits, labels, pad, marginal.smoothing_needed(epsilon))
        nll_B = -token_ll_BxT.sum(-1)
        smooth_B = None if vocab_sum_BxT is None else -vocab_sum_BxT.sum(-1)
        nll_B = marginal.smoothed(nll_B, smooth_B, epsilon, logits.shape[-1], False)
        tokens = jnp.maximum((marginal.shift_left(labels, pad) != pad).sum(), 1)
        return nll_B * (b / tokens)

    def passage_log_likelihoods(self, model, params, batch):
        """log p(y | x, passage k) with the decoder reading passage k alone (B, K)."""
        b, k, s = batch["context_input_ids"].shape
        logits = model.generator_logits(params, batch["context_input_ids"].reshape(b * k, s),
                                        batch["context_attention_mask"].reshape(b * k, s), batch["labels"])
        pad = model.generator_config.pad_token_id
        return marginal.target_log_likelihoods(logits, batch["labels"], pad_token_id=pad).sum(-1)

    def passage_attention_scores(self, model, params, batch):
        """Atlas's ADist target (attention_distillation_scores) from the fused passages, without dropout."""
        b, k, s = batch["context_input_ids"].shape
        states, mask = fused_encoder_out(model, params, batch["context_input_ids"].reshape(b * k, s),
                                         batch["context_attention_mask"].reshape(b * k, s), k)
        return attention_distillation_scores(model, params, batch["labels"], states, mask, k)

    def generate(self, model, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK, gen, *,
                 decoding=None, provenance=False):
        del decoding  # one kind (eval_nq's --decoding is RAG-Sequence's)
        """With `provenance`, the Decoded posteriors are the decoder's cross-attention mass per passage
        (cross_attention_mass), not posteriors p(z | x, y): FiD has no distribution over passages."""
        out = generate(model, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK, gen,
                       provenance)
        return base.Decoded(*out) if provenance else base.Decoded(out)

    def score(self, model, params, context_input_ids_BKxS, context_attention_mask_BKxS, q_BxD, doc_embeds_BxKxD,
              labels_BxT):
        """nll: the gold answer's NLL given all K passages, summed over its tokens, end token included."""
        del q_BxD, doc_embeds_BxKxD
        return _scores(model, params, context_input_ids_BKxS, context_attention_mask_BKxS, labels_BxT)


READER = registry.register(FusionInDecoder())
