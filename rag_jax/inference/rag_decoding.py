"""RAG decoding: RAG-Token greedy / beam search over the document-marginal next-token scores, RAG-Sequence
"thorough" (the reference's) and "fast" (the paper's approximation) decoding.

Matches Hugging Face's `generate` of RagTokenForGeneration / RagSequenceForGeneration (transformers 5) token for
token on the same weights (see generation.py for the search itself). The generator's (BART's or T5's) decode cache is tiled over
(example, beam, document) rows; the encoder runs once per context.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax import rag
from rag_jax.inference import generation
from rag_jax.inference.generation import GenerationConfig
from rag_jax.models import layers
from rag_jax.models.layers import DecodeCache


# ----------------------------------------------------------------------------------------- generator plumbing


# Tokens per slice of contexts the encoder runs on at a time (_encode), and the size of one head's attention scores
# over all contexts (float32) above which it slices.
_ENCODE_TOKENS = 640
_ENCODE_SLICE_ABOVE = 6 << 20


def _encode(model: rag.Rag, params, ids_BKxS, mask_BKxS):
    """The generator's encoder over the contexts, a few at a time: each context's states depend on it alone, and
    with every context in one call the (contexts, heads, S, S) attention scores (46 MB at 32 x 4 x 300 x 300) leave
    the CPU's caches; slices of ~_ENCODE_TOKENS tokens ran the attention ~4x faster, with the same values. Narrower
    contexts run in one call: for 32 of them the slices took 189 -> 61 ms at width 300, 62 -> 43 at 256, but the
    same at 192 and 128, and longer at 64 (6.8 -> 8.6 ms)."""
    rows, width = ids_BKxS.shape
    per_slice = max(d for d in range(1, rows + 1) if rows % d == 0 and d * width <= max(_ENCODE_TOKENS, width))
    encode = functools.partial(model.generator.apply, {"params": params["generator"]}, method="encode")
    if per_slice == rows or rows * width * width * 4 <= _ENCODE_SLICE_ABOVE:
        return encode(ids_BKxS, mask_BKxS)
    slices = lambda x: x.reshape(rows // per_slice, per_slice, width)  # noqa: E731
    out = jax.lax.map(lambda args: encode(*args), (slices(ids_BKxS), slices(mask_BKxS)))
    return out.reshape(rows, width, -1)


def _tiled_cache(model: rag.Rag, params, encoder_out, mask, copies: int, n_docs: int, max_length: int):
    """A decode cache for rows (example, copy, doc) from encoder rows (example, doc): the reference's
    extend_enc_output / repeat_interleave. The cross-attention keys/values are projected once, then tiled."""
    cache = model.generator.apply(
        {"params": params["generator"]}, encoder_out, mask, max_length - 1, method="init_cache"
    )

    def tile(x):
        x = x.reshape(-1, 1, n_docs, *x.shape[1:])
        return jnp.broadcast_to(x, (x.shape[0], copies, *x.shape[2:])).reshape(-1, *x.shape[3:])

    return cache._replace(
        self_kv=jax.tree.map(tile, cache.self_kv),
        cross_kv=jax.tree.map(tile, cache.cross_kv),
        encoder_mask_BxS=tile(cache.encoder_mask_BxS),
    )


def _decode_step(model: rag.Rag, params, cache: DecodeCache, tokens_R: jax.Array):
    logits, cache = model.generator.apply(
        {"params": params["generator"]}, tokens_R[:, None], cache, method="decode_step"
    )
    return logits[:, 0], cache


def _reorder_self_kv(cache: DecodeCache, idx_N: jax.Array, rows_per_beam: int) -> DecodeCache:
    """Follows the beams in the self-attention cache (rows_per_beam consecutive rows per beam). Only the
    self-attention keys/values differ between beams of one example; cross-attention and masks are identical copies,
    so they are left in place."""

    def take(x):
        x = x.reshape(-1, rows_per_beam, *x.shape[1:])
        return jnp.take(x, idx_N, axis=0).reshape(-1, *x.shape[2:])

    return cache._replace(self_kv=jax.tree.map(take, cache.self_kv))


def _answer_token_ll(model: rag.Rag, params, ids_NxL, encoder_out_BKxSxE, mask_BKxS, n_docs: int):
    """log p(y_t | x, z, y_<t) (N, K, L) of N = B * copies finished answers under each of their example's K docs,
    from one decoder pass over the encoder states the search already has (provenance, rag.doc_posteriors). The
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
    return rag.target_log_likelihoods(logits, ids_NxL, pad_token_id=model.generator_config.pad_token_id)


def _check_shapes(context_input_ids, doc_scores, n_docs):
    batch, docs = doc_scores.shape
    if n_docs is not None and n_docs != docs:
        raise ValueError(f"decode: n_docs={n_docs} but doc_scores has {docs} columns; pass doc_scores (B, n_docs)")
    if context_input_ids.shape[0] != batch * docs:
        raise ValueError(
            f"decode: context_input_ids has {context_input_ids.shape[0]} rows, expected B*K = {batch}*{docs}"
        )
    return batch, docs


# --------------------------------------------------------------------------------------------------- RAG-Token


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
def rag_token_generate(
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
    max_length) for rag.doc_posteriors."""
    batch, n_docs = _check_shapes(context_input_ids_BKxS, doc_scores_BxK, None)
    nb = gen.num_beams
    encoder_out = _encode(model, params, context_input_ids_BKxS, context_attention_mask_BKxS)
    cache = _tiled_cache(model, params, encoder_out, context_attention_mask_BKxS, nb, n_docs, gen.max_length)
    doc_lp_NxK = jnp.repeat(jax.nn.log_softmax(doc_scores_BxK.astype(jnp.float32), axis=-1), nb, axis=0)

    def step(cache, tokens_N):
        logits, cache = _decode_step(model, params, cache, jnp.repeat(tokens_N, n_docs))
        return marginal_log_probs(logits.reshape(batch * nb, n_docs, -1), doc_lp_NxK), cache

    reorder = functools.partial(_reorder_self_kv, rows_per_beam=n_docs)
    out = generation.search(step, reorder, cache, batch, gen)
    if not return_token_ll:
        return out
    return out, _answer_token_ll(model, params, out, encoder_out, context_attention_mask_BKxS, n_docs)


# ------------------------------------------------------------------------------------------------ RAG-Sequence


class SequenceCandidates(NamedTuple):
    """The hypotheses RAG-Sequence decoding chooses from, C = K * num_beams per example, doc-major (doc z's beams
    at z*num_beams ...), as the reference lists them.

    ids_BxCxL: the hypotheses (start token first, filled past the end).
    is_first_BxC: False where a hypothesis repeats an earlier one (the reference's deduplication keeps the first).
    scores_BxC: the selection score (thorough: -loss of the reference; fast: log Σ_z p(z|x) p(y|x,z) over the docs
      whose beams hold y); -inf for repeats when deduplicating.
    """

    ids_BxCxL: jax.Array
    is_first_BxC: jax.Array
    scores_BxC: jax.Array


def _per_doc_hypotheses(model, params, ids_BKxS, mask_BKxS, batch, n_docs, gen_doc: GenerationConfig):
    """The generator's own `generate` over each of the B*K contexts with num_return_sequences = num_beams:
    (B, K * num_beams, L)."""
    nb = gen_doc.num_beams
    encoder_out = _encode(model, params, ids_BKxS, mask_BKxS)
    cache = _tiled_cache(model, params, encoder_out, mask_BKxS, nb, 1, gen_doc.max_length)
    step = functools.partial(_decode_step, model, params)
    reorder = functools.partial(_reorder_self_kv, rows_per_beam=1)
    ids = generation.search(step, reorder, cache, batch * n_docs, gen_doc)
    return ids.reshape(batch, n_docs * nb, gen_doc.max_length)


def _to_generate_width(ids_BxCxL: jax.Array, eos: int | None, pad: int) -> jax.Array:
    """Pad past the end of each example's longest hypothesis, as the reference's tensors are: its per-example
    `generate` returns the K * num_beams hypotheses padded (by the search, with `pad or eos`) only up to the longest
    of them, and its outputs are then padded to a common width with pad. The two fills differ when pad is 0 (T5:
    beams write EOS): the reference rescores the EOS fill inside that width as targets and returns it, pad beyond."""
    if eos is None:
        return ids_BxCxL
    length = ids_BxCxL.shape[-1]
    ends_BxCxL = jnp.concatenate([jnp.zeros_like(ids_BxCxL[..., :1], bool), ids_BxCxL[..., 1:] == eos], axis=-1)
    lengths_BxC = jnp.where(ends_BxCxL.any(-1), jnp.argmax(ends_BxCxL, axis=-1) + 1, length)
    width_B = lengths_BxC.max(axis=1)
    return jnp.where(jnp.arange(length)[None, None, :] < width_B[:, None, None], ids_BxCxL, pad)


def _first_occurrences(ids_BxCxL: jax.Array):
    """(B, C, C) equality of hypotheses and (B, C) flags of those not seen at a lower index."""
    same_BxCxC = jnp.all(ids_BxCxL[:, :, None, :] == ids_BxCxL[:, None, :, :], axis=-1)
    earlier = jnp.tril(jnp.ones(same_BxCxC.shape[1:], bool), k=-1)
    return same_BxCxC, ~jnp.any(same_BxCxC & earlier[None], axis=-1)


def _first_token_is_bos(ids_BxCxL: jax.Array, bos_token_id: int | None):
    """Per example, whether every hypothesis starts (after the start token) with BOS: the reference's use_bos,
    decided over the candidate batch of ONE example (repeats do not change it: they copy kept hypotheses)."""
    if bos_token_id is None:
        return None
    return jnp.all(ids_BxCxL[:, :, 1] == bos_token_id, axis=1)


# masked_width rounds the contexts' width up to this.
CONTEXT_BUCKET = 64
# Rows (hypothesis x doc) per rescoring pass: enough to keep the matmuls wide, few enough that the pass's
# (rows, length, vocabulary) logits stay small.
_RESCORE_ROWS = 64


def _thorough_scores(model, params, ids_BxCxL, needed_BxC, encoder_out, mask_BKxS, doc_scores_BxK, pad,
                     keep_token_ll: bool = False):
    """-loss of every needed hypothesis against all K docs: the reference's rescoring forward pass (labels = the
    hypotheses, exclude_bos_score=True, label smoothing from the RagConfig); -inf where not needed. With
    `keep_token_ll`, also the per-document target log-likelihoods (B, C, K, L) that pass computes (provenance; zero
    where not needed), else None.

    The reference rescores only the unique hypotheses of each example. Here the needed (example, hypothesis) pairs
    of the whole batch are packed to the front and scored in passes of _RESCORE_ROWS rows until none is left, so
    the work follows the number of unique hypotheses while every shape stays static. exclude_bos_score's all-rows
    test stays per example, as in the reference's one-example loss (repeats copy kept hypotheses: no change)."""
    batch, n_docs = doc_scores_BxK.shape
    num_candidates, length = ids_BxCxL.shape[1:]
    pairs = batch * num_candidates
    chunk = min(pairs, max(1, _RESCORE_ROWS // n_docs))
    num_chunks = -(-pairs // chunk)
    needed_P = needed_BxC.reshape(pairs)
    num_needed = needed_P.sum()
    # Needed pairs first, each group in order; the tail past `pairs` (a partial last chunk) writes nowhere.
    order_P = jnp.argsort(~needed_P, stable=True).astype(jnp.int32)
    order_P = jnp.concatenate([order_P, jnp.full((num_chunks * chunk - pairs,), pairs, jnp.int32)])
    ids_PxL = ids_BxCxL.reshape(pairs, length)
    encoder_out_BxKxSxE = encoder_out.reshape(batch, n_docs, *encoder_out.shape[1:])
    mask_BxKxS = mask_BKxS.reshape(batch, n_docs, -1)
    use_bos_B = _first_token_is_bos(ids_BxCxL, model.generator_config.bos_token_id)
    generator = functools.partial(model.generator.apply, {"params": params["generator"]})
    # The LM head's log-softmax is taken at the targets a vocabulary slice at a time (layers.log_softmax_at).
    head_VxE, bias_V = generator(method="lm_head_arrays")
    smoothing = bool(model.config.label_smoothing)

    def rescore(i, scores_P, token_ll_PxKxL):
        pair_N = jax.lax.dynamic_slice(order_P, (i * chunk,), (chunk,))
        safe_N = jnp.minimum(pair_N, pairs - 1)
        example_N = safe_N // num_candidates
        ids_NxL = ids_PxL[safe_N]
        # rows (hypothesis, doc): the reference's generator_input_ids.repeat(num_candidates, 1)
        features = generator(
            jnp.repeat(ids_NxL, n_docs, axis=0),
            encoder_out_BxKxSxE[example_N].reshape(chunk * n_docs, *encoder_out.shape[1:]),
            mask_BxKxS[example_N].reshape(chunk * n_docs, -1),
            method="decode", head=False,
        )  # fmt: skip
        target_NxL = rag.shift_left(ids_NxL, pad)
        token_ll, vocab_sum = layers.log_softmax_at(
            features.reshape(-1, features.shape[-1]), head_VxE, bias_V,
            jnp.repeat(target_NxL, n_docs, axis=0).reshape(-1), with_vocab_sum=smoothing,
        )  # fmt: skip
        token_ll_NxKxL = token_ll.reshape(chunk, n_docs, length)
        nll_N = rag.rag_sequence_nll_from_terms(
            token_ll_NxKxL,
            None if vocab_sum is None else vocab_sum.reshape(chunk, n_docs, length),
            head_VxE.shape[0],
            doc_scores_BxK[example_N],
            ids_NxL,
            pad_token_id=pad,
            bos_token_id=model.generator_config.bos_token_id,
            epsilon=model.config.label_smoothing,
            exclude_bos_score=True,
            use_bos_B=None if use_bos_B is None else use_bos_B[example_N],
        )
        scores_P = scores_P.at[pair_N].set(-nll_N, mode="drop")
        if keep_token_ll:
            token_ll_NxKxL = rag.zero_at_pad_targets(token_ll_NxKxL, target_NxL, pad)
            token_ll_PxKxL = token_ll_PxKxL.at[pair_N].set(token_ll_NxKxL, mode="drop")
        return scores_P, token_ll_PxKxL

    token_ll = jnp.zeros((pairs, n_docs, length) if keep_token_ll else (0,), jnp.float32)
    _, scores_P, token_ll = jax.lax.while_loop(
        lambda carry: carry[0] * chunk < num_needed,
        lambda carry: (carry[0] + 1, *rescore(*carry)),
        (0, jnp.full((pairs,), -jnp.inf, jnp.float32), token_ll),
    )
    token_ll = token_ll.reshape(batch, num_candidates, n_docs, length) if keep_token_ll else None
    return scores_P.reshape(batch, num_candidates), token_ll


def _fast_scores(model, params, ids_BxCxL, same_BxCxC, encoder_out, mask_BKxS, doc_scores_BxK, pad, nb):
    """log Σ_{z: y in doc z's beams} p(z|x) p(y|x,z): each hypothesis scored only against the doc(s) whose beam
    search produced it (the paper's approximation p(y|x,z) = 0 elsewhere), one forward pass per doc-beam.
    log p(y|x,z) sums the non-pad target tokens, dropping the first one under the same rule as thorough decoding."""
    batch, n_docs = doc_scores_BxK.shape
    ids_BxKxNxL = ids_BxCxL.reshape(batch, n_docs, nb, -1)
    use_bos_B = _first_token_is_bos(ids_BxCxL, model.generator_config.bos_token_id)

    def one_beam(ids_BxKxT):
        decoder_ids = ids_BxKxT.reshape(batch * n_docs, -1)
        logits = model.generator.apply(
            {"params": params["generator"]}, decoder_ids, encoder_out, mask_BKxS, method="decode"
        )
        target = rag.shift_left(decoder_ids, pad)
        token_lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target[..., None], axis=-1)[..., 0]
        token_lp = jnp.where(target != pad, token_lp, 0.0).reshape(batch, n_docs, -1)
        if use_bos_B is not None:
            token_lp = token_lp.at[:, :, 0].multiply(jnp.where(use_bos_B, 0.0, 1.0)[:, None])
        return token_lp.sum(-1)

    ll_BxKxN = jnp.moveaxis(jax.lax.map(one_beam, jnp.moveaxis(ids_BxKxNxL, 2, 0)), 0, 2)
    doc_lp_BxK = jax.nn.log_softmax(doc_scores_BxK.astype(jnp.float32), axis=-1)
    joint_BxC = (doc_lp_BxK[:, :, None] + ll_BxKxN).reshape(batch, -1)  # per produced row
    # For hypothesis j and doc z: the row of doc z's beams equal to j (at most one), else -inf.
    same_BxCxKxN = same_BxCxC.reshape(batch, -1, n_docs, nb)
    per_doc = jnp.max(jnp.where(same_BxCxKxN, joint_BxC.reshape(batch, 1, n_docs, nb), -jnp.inf), axis=-1)
    return jax.nn.logsumexp(per_doc, axis=-1)


def rag_sequence_generate(
    model: rag.Rag,
    params,
    context_input_ids_BKxS: jax.Array,
    context_attention_mask_BKxS: jax.Array,
    doc_scores_BxK: jax.Array,
    gen: GenerationConfig,
    *,
    mode: str = "thorough",
    do_deduplication: bool | None = None,
    n_docs: int | None = None,
    mask_beams: bool = False,
    return_candidates: bool = False,
    return_token_ll: bool = False,
):
    """RAG-Sequence decoding. Returns (B * num_return_sequences, max_length) int32, filled past the end, then with
    `return_candidates` the `SequenceCandidates`, then with `return_token_ll` each returned answer's per-document
    target log-likelihoods (B * num_return_sequences, K, max_length) for rag.doc_posteriors: thorough decoding
    keeps them from its rescoring pass; fast decoding, whose scores leave most documents out, runs one decoder pass.

    `gen` is the setting of the per-document beam search (`GenerationConfig.for_rag_sequence`): its num_beams is
    also the number of hypotheses kept per document, its num_return_sequences the number returned per example.
    mode="thorough" (RagSequenceForGeneration.generate): each document's hypotheses are rescored against all K
      docs by the reference's loss and the best by -loss are returned. Vectorised over the batch.
    mode="fast" (the paper's approximation; not in the reference): a hypothesis gets p(y|x,z) = 0 for the docs whose
      beams do not hold it, so no extra forward passes over other docs; label smoothing plays no part.
    do_deduplication (None: the model's RagConfig): repeats of a hypothesis are masked out (-inf) instead of removed.
    n_docs: K, checked against doc_scores (B, K), from which it is taken when None.
    mask_beams: the reference passes attention_mask=None to the generator's generate, which transformers 5 turns
      into an all-ones mask (pad tokens of the contexts are attended to while searching); the rescoring uses the
      real mask, over the contexts cut past their last unmasked column (masked_width: same values, less work).
      False reproduces that; True masks the padding during the search as well.
    """
    if mode not in ("thorough", "fast"):
        raise ValueError(f"rag_sequence_generate: mode={mode!r}; use 'thorough' or 'fast'")
    _, docs = _check_shapes(context_input_ids_BKxS, doc_scores_BxK, n_docs)
    if gen.num_return_sequences > docs * gen.num_beams:
        raise ValueError(
            f"rag_sequence_generate: num_return_sequences={gen.num_return_sequences} exceeds the K * num_beams = "
            f"{docs * gen.num_beams} hypotheses per example"
        )
    dedup = model.config.do_deduplication if do_deduplication is None else bool(do_deduplication)
    ids_BxCxL = _sequence_hypotheses(model, params, context_input_ids_BKxS, context_attention_mask_BKxS, gen, docs,
                                     bool(mask_beams))  # fmt: skip
    out, candidates, token_ll = _sequence_choose(
        model, params, ids_BxCxL, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK, gen, mode,
        dedup, bool(return_token_ll), masked_width(context_attention_mask_BKxS),
    )  # fmt: skip
    extras = ((candidates,) if return_candidates else ()) + ((token_ll,) if return_token_ll else ())
    return (out, *extras) if extras else out


def masked_width(mask_BKxS) -> int:
    """The width the rescoring passes need: up to the last column any context's mask keeps, rounded up to
    CONTEXT_BUCKET (few shapes to compile). Everything past it is padding the mask hides, so cutting it changes no
    value (masked keys get exactly zero weight) and saves attention over it; the contexts' full width inside jit."""
    width = mask_BKxS.shape[1]
    if isinstance(mask_BKxS, jax.core.Tracer):
        return width
    kept_S = np.flatnonzero(np.asarray(mask_BKxS).any(axis=0))
    return min(width, -(-(int(kept_S[-1]) + 1 if kept_S.size else 1) // CONTEXT_BUCKET) * CONTEXT_BUCKET)


@functools.partial(jax.jit, static_argnames=("model", "gen", "n_docs", "mask_beams"))
def _sequence_hypotheses(model, params, ids_BKxS, mask_BKxS, gen, n_docs, mask_beams):
    """The per-document beam searches' K * num_beams hypotheses per example (B, C, L), at the contexts' full
    width: the reference's search attends to the padding (mask_beams=False), so its answers depend on it."""
    gen_doc = dataclasses.replace(gen, num_return_sequences=gen.num_beams)
    search_mask = mask_BKxS if mask_beams else jnp.ones_like(mask_BKxS)
    ids_BxCxL = _per_doc_hypotheses(model, params, ids_BKxS, search_mask, ids_BKxS.shape[0] // n_docs, n_docs,
                                    gen_doc)  # fmt: skip
    return _to_generate_width(ids_BxCxL, gen.eos_token_id, model.generator_config.pad_token_id)


@functools.partial(jax.jit, static_argnames=("model", "gen", "mode", "dedup", "keep_token_ll", "width"))
def _sequence_choose(model, params, ids_BxCxL, ids_BKxS, mask_BKxS, doc_scores_BxK, gen, mode, dedup,
                     keep_token_ll, width):
    """Rescoring and selection over the contexts cut to `width` (masked_width)."""
    docs = doc_scores_BxK.shape[1]
    pad = model.generator_config.pad_token_id
    nb = gen.num_beams
    ids_BKxS, mask_BKxS = ids_BKxS[:, :width], mask_BKxS[:, :width]
    same_BxCxC, is_first_BxC = _first_occurrences(ids_BxCxL)
    encoder_out = _encode(model, params, ids_BKxS, mask_BKxS)
    if mode == "thorough":
        needed_BxC = is_first_BxC if dedup else jnp.ones_like(is_first_BxC)
        scores, token_ll = _thorough_scores(
            model, params, ids_BxCxL, needed_BxC, encoder_out, mask_BKxS, doc_scores_BxK, pad, keep_token_ll
        )
    else:
        scores = _fast_scores(
            model, params, ids_BxCxL, same_BxCxC, encoder_out, mask_BKxS, doc_scores_BxK, pad, nb
        )
    if dedup:
        scores = jnp.where(is_first_BxC, scores, -jnp.inf)
    _, best_BxR = jax.lax.top_k(scores, gen.num_return_sequences)
    out = generation.gather_rows(ids_BxCxL, best_BxR).reshape(-1, gen.max_length)
    if not keep_token_ll:
        token_ll = None
    elif mode == "thorough":  # the rescoring's own terms for the chosen hypotheses (dedup picks first occurrences)
        token_ll = generation.gather_rows(token_ll, best_BxR).reshape(-1, docs, gen.max_length)
    else:
        token_ll = _answer_token_ll(model, params, out, encoder_out, mask_BKxS, docs)
    return out, SequenceCandidates(ids_BxCxL, is_first_BxC, scores), token_ll
