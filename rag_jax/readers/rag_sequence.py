"""RAG-Sequence (Lewis et al. 2020): one passage z generates the whole answer, p(y|x) = Σ_z p(z|x) Π_t p(y_t | x, z,
y_<t). Its loss (transformers' RagSequenceForGeneration.get_nll, quirks included, each marked "reference quirk"), its
decoding ("thorough", RagSequenceForGeneration.generate: every passage's hypotheses rescored against all K passages;
"fast", the paper's approximation) and its provenance (marginal.MarginalReader).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rag_jax import rag
from rag_jax.models import layers
from rag_jax.readers import decoding, marginal, registry, search, sequence_hypotheses
from rag_jax.readers.generation import GenerationConfig


def nll(
    logits_BxKxTxV: jax.Array,
    doc_scores_BxK: jax.Array,
    decoder_input_ids_BxT: jax.Array,
    *,
    pad_token_id: int,
    bos_token_id: int | None = 0,
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
    reduce: bool = False,
    doc_prior_position: int = 1,
    use_bos_B: jax.Array | None = None,
) -> jax.Array:
    """-log Σ_z p(z|x) Π_t p(y_t|x,z,y_<t), per example (B,) or summed when `reduce`.

    Reference quirks kept: the doc log-prior is added at target position `doc_prior_position` = 1 (not 0), so it
    is lost when that position is a pad (a one-token answer then gets -log Σ_z p(y|z), no prior); pass 0 for the
    paper's formula, which is the same wherever the first target is not a pad. Also: `exclude_bos_score` drops
    position 0 only when every row's first target is BOS (`use_bos_B`, when given, decides per row instead: for
    rows packed from several of the reference's batches); label smoothing uses -logsumexp over docs of the
    vocabulary-summed log-probabilities, which count the prior V times.
    """
    target_BxT = marginal.shift_left(decoder_input_ids_BxT, pad_token_id)
    token_ll_BxKxT, vocab_sum_BxKxT = marginal.token_log_probs(logits_BxKxTxV, target_BxT,
                                                               marginal.smoothing_needed(epsilon))
    return nll_from_terms(
        token_ll_BxKxT, vocab_sum_BxKxT, logits_BxKxTxV.shape[-1], doc_scores_BxK, decoder_input_ids_BxT,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, epsilon=epsilon, exclude_bos_score=exclude_bos_score,
        reduce=reduce, doc_prior_position=doc_prior_position, use_bos_B=use_bos_B,
    )  # fmt: skip


def nll_from_terms(
    token_ll_BxKxT: jax.Array,
    vocab_sum_BxKxT: jax.Array | None,
    vocab: int,
    doc_scores_BxK: jax.Array,
    decoder_input_ids_BxT: jax.Array,
    *,
    pad_token_id: int,
    bos_token_id: int | None = 0,
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
    reduce: bool = False,
    doc_prior_position: int = 1,
    use_bos_B: jax.Array | None = None,
) -> jax.Array:
    """`nll` from the per-document target log-probabilities log p(y_t|x,z,y_<t) (B, K, T) and, for label
    smoothing (None without), their vocabulary sums (B, K, T) over a `vocab`-entry vocabulary: for callers that
    compute those terms without the (B, K, T, V) logits (layers.log_softmax_at)."""
    target_BxT = marginal.shift_left(decoder_input_ids_BxT, pad_token_id)
    smoothing = marginal.smoothing_needed(epsilon)
    doc_lp_BxK = jax.nn.log_softmax(layers.at_least_float32(doc_scores_BxK), axis=-1)
    at_prior = (jnp.arange(target_BxT.shape[1]) == doc_prior_position)[None, None, :]
    token_ll_BxKxT = token_ll_BxKxT + jnp.where(at_prior, doc_lp_BxK[..., None], 0.0)
    keep_BxT = target_BxT != pad_token_id
    token_ll_BxKxT = jnp.where(keep_BxT[:, None], token_ll_BxKxT, 0.0)
    if exclude_bos_score and bos_token_id is not None:
        if use_bos_B is None:
            use_bos_B = jnp.all(target_BxT[:, 0] == bos_token_id)[None]  # reference quirk: all rows or none
        token_ll_BxKxT = token_ll_BxKxT.at[:, :, 0].multiply(jnp.where(use_bos_B, 0.0, 1.0)[:, None])
    ll_B = jax.nn.logsumexp(token_ll_BxKxT.sum(-1), axis=1)
    smooth_B = None
    if smoothing:
        vocab_sum_BxKxT = vocab_sum_BxKxT + jnp.where(at_prior, vocab * doc_lp_BxK[..., None], 0.0)
        vocab_sum_BxKxT = jnp.where(keep_BxT[:, None], vocab_sum_BxKxT, 0.0)
        smooth_B = -jax.nn.logsumexp(vocab_sum_BxKxT.sum(-1), axis=1)
    return marginal.smoothed(-ll_B, smooth_B, epsilon, vocab, reduce)


# ---------------------------------------------------------------------------------------------------- decoding


# Rows (hypothesis x doc) per rescoring pass: enough to keep the matmuls wide, few enough that the pass's
# (rows, length, vocabulary) logits stay small.
_RESCORE_ROWS = 64


def thorough_scores(model, params, ids_BxCxL, needed_BxC, encoder_out, mask_BKxS, doc_scores_BxK, pad,
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
    use_bos_B = sequence_hypotheses.first_token_is_bos(ids_BxCxL, model.generator_config.bos_token_id)
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
        target_NxL = marginal.shift_left(ids_NxL, pad)
        token_ll, vocab_sum = layers.log_softmax_at(
            features.reshape(-1, features.shape[-1]), head_VxE, bias_V,
            jnp.repeat(target_NxL, n_docs, axis=0).reshape(-1), with_vocab_sum=smoothing,
        )  # fmt: skip
        token_ll_NxKxL = token_ll.reshape(chunk, n_docs, length)
        nll_N = nll_from_terms(
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
            token_ll_NxKxL = marginal.zero_at_pad_targets(token_ll_NxKxL, target_NxL, pad)
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


def fast_scores(model, params, ids_BxCxL, same_BxCxC, encoder_out, mask_BKxS, doc_scores_BxK, pad, nb):
    """log Σ_{z: y in doc z's beams} p(z|x) p(y|x,z): each hypothesis scored only against the doc(s) whose beam
    search produced it (the paper's approximation p(y|x,z) = 0 elsewhere), one forward pass per doc-beam.
    log p(y|x,z) sums the non-pad target tokens, dropping the first one under the same rule as thorough decoding."""
    batch, n_docs = doc_scores_BxK.shape
    ids_BxKxNxL = ids_BxCxL.reshape(batch, n_docs, nb, -1)
    use_bos_B = sequence_hypotheses.first_token_is_bos(ids_BxCxL, model.generator_config.bos_token_id)

    def one_beam(ids_BxKxT):
        decoder_ids = ids_BxKxT.reshape(batch * n_docs, -1)
        logits = model.generator.apply(
            {"params": params["generator"]}, decoder_ids, encoder_out, mask_BKxS, method="decode"
        )
        target = marginal.shift_left(decoder_ids, pad)
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


def generate(
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
    `return_candidates` the `sequence_hypotheses.SequenceCandidates`, then with `return_token_ll` each returned
    answer's per-document target log-likelihoods (B * num_return_sequences, K, max_length) for
    marginal.doc_posteriors: thorough decoding keeps them from its rescoring pass; fast decoding, whose scores leave
    most documents out, runs one decoder pass.

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
      real mask, over the contexts cut past their last unmasked column (decoding.masked_width: same values, less
      work). False reproduces that; True masks the padding during the search as well.
    """
    if mode not in ("thorough", "fast"):
        raise ValueError(f"rag_sequence.generate: mode={mode!r}; use 'thorough' or 'fast'")
    _, docs = decoding.check_shapes(context_input_ids_BKxS, doc_scores_BxK, n_docs)
    if gen.num_return_sequences > docs * gen.num_beams:
        raise ValueError(
            f"rag_sequence.generate: num_return_sequences={gen.num_return_sequences} exceeds the K * num_beams = "
            f"{docs * gen.num_beams} hypotheses per example"
        )
    dedup = model.config.do_deduplication if do_deduplication is None else bool(do_deduplication)
    ids_BxCxL = sequence_hypotheses.hypotheses(model, params, context_input_ids_BKxS, context_attention_mask_BKxS,
                                               gen, docs, bool(mask_beams))  # fmt: skip
    out, candidates, token_ll = _choose(
        model, params, ids_BxCxL, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK, gen, mode,
        dedup, bool(return_token_ll), decoding.masked_width(context_attention_mask_BKxS),
    )  # fmt: skip
    extras = ((candidates,) if return_candidates else ()) + ((token_ll,) if return_token_ll else ())
    return (out, *extras) if extras else out


@functools.partial(jax.jit, static_argnames=("model", "gen", "mode", "dedup", "keep_token_ll", "width"))
def _choose(model, params, ids_BxCxL, ids_BKxS, mask_BKxS, doc_scores_BxK, gen, mode, dedup, keep_token_ll, width):
    """Rescoring and selection over the contexts cut to `width` (decoding.masked_width)."""
    docs = doc_scores_BxK.shape[1]
    pad = model.generator_config.pad_token_id
    nb = gen.num_beams
    ids_BKxS, mask_BKxS = ids_BKxS[:, :width], mask_BKxS[:, :width]
    same_BxCxC, is_first_BxC = sequence_hypotheses.first_occurrences(ids_BxCxL)
    encoder_out = decoding.encode(model, params, ids_BKxS, mask_BKxS)
    if mode == "thorough":
        needed_BxC = is_first_BxC if dedup else jnp.ones_like(is_first_BxC)
        scores, token_ll = thorough_scores(
            model, params, ids_BxCxL, needed_BxC, encoder_out, mask_BKxS, doc_scores_BxK, pad, keep_token_ll
        )
    else:
        scores = fast_scores(
            model, params, ids_BxCxL, same_BxCxC, encoder_out, mask_BKxS, doc_scores_BxK, pad, nb
        )
    if dedup:
        scores = jnp.where(is_first_BxC, scores, -jnp.inf)
    _, best_BxR = jax.lax.top_k(scores, gen.num_return_sequences)
    out = search.gather_rows(ids_BxCxL, best_BxR).reshape(-1, gen.max_length)
    if not keep_token_ll:
        token_ll = None
    elif mode == "thorough":  # the rescoring's own terms for the chosen hypotheses (dedup picks first occurrences)
        token_ll = search.gather_rows(token_ll, best_BxR).reshape(-1, docs, gen.max_length)
    else:
        token_ll = marginal.answer_token_ll(model, params, out, encoder_out, mask_BKxS, docs)
    return out, sequence_hypotheses.SequenceCandidates(ids_BxCxL, is_first_BxC, scores), token_ll


class RagSequence(marginal.MarginalReader):
    name = "rag_sequence"
    hf_architecture = "RagSequenceForGeneration"
    decodings = ("thorough", "fast")
    # Thorough decoding runs K beam searches and rescores their hypotheses against all K passages; the periodic dev
    # evaluation answers with RAG-Token's greedy decoding of the same generator instead (one search).
    dev_reader = "rag_token"

    def marginal_nll(self, logits_BxKxTxV, doc_scores_BxK, labels_BxT, generator_config, epsilon):
        return nll(logits_BxKxTxV, doc_scores_BxK, labels_BxT, pad_token_id=generator_config.pad_token_id,
                   bos_token_id=generator_config.bos_token_id, epsilon=epsilon)

    def decode(self, model, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK, gen, mode,
               return_token_ll):
        return generate(model, params, context_input_ids_BKxS, context_attention_mask_BKxS, doc_scores_BxK, gen,
                        mode=mode or "thorough", return_token_ll=return_token_ll)

    def context_width(self, context_attention_mask_BKxS):
        """The contexts' full width: the per-passage beam search attends to their padding, as the reference's does
        (it passes attention_mask=None: `generate`'s mask_beams), so its answers depend on the padded length (T5's
        visibly, found by experiments/bench/eval.py); the rescoring, which masks the padding, drops it
        (decoding.masked_width)."""
        return context_attention_mask_BKxS.shape[1]

    def hf_generation_config(self, hf_config, generation_file):
        """RagSequenceForGeneration decodes with the generator's own `generate` (GenerationConfig.for_rag_sequence)."""
        del generation_file
        return GenerationConfig.for_rag_sequence(hf_config)


READER = registry.register(RagSequence())
