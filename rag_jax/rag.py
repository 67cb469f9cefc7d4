"""The RAG model: question encoder q(x), doc scores q(x)·d(z), a generator (BART, T5 or another architecture of
rag_jax/models/registry.py) over the K retrieved documents, and the
RAG-Sequence / RAG-Token marginal negative log-likelihoods of Lewis et al. (2020).

Parameters are one tree {"question_encoder": ..., "generator": ...}. In the paper's recipe the document encoder is not
part of it: the retrieved documents' embeddings arrive precomputed, so the question encoder gets its gradient only
through the doc scores. End-to-end RAG (a `doc_encoder_config`; transformers' RAG after
`set_context_encoder_for_training`, REALM) adds params["doc_encoder"]: the retrieved passages are embedded again with
it (`trained_doc_scores`), so q(x)·d(z) carries gradients to both encoders.

The losses follow `transformers`' RagSequenceForGeneration.get_nll / RagTokenForGeneration.get_nll, quirks included
(each is marked "reference quirk").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rag_jax.models import bert, layers, registry
from rag_jax.models.layers import constrain
from rag_jax.retrieval.contexts import ContextFormat

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RagConfig:
    """The RAG-level settings of a checkpoint (Hugging Face's RagConfig fields of the same names)."""

    n_docs: int = 5
    label_smoothing: float = 0.0
    exclude_bos_score: bool = False
    reduce_loss: bool = False
    do_deduplication: bool = True
    context: ContextFormat = ContextFormat()

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "RagConfig":
        fields = dict(
            n_docs=hf.get("n_docs", 5),
            label_smoothing=hf.get("label_smoothing", 0.0),
            exclude_bos_score=hf.get("exclude_bos_score", False),
            reduce_loss=hf.get("reduce_loss", False),
            do_deduplication=hf.get("do_deduplication", True),
            context=ContextFormat(
                title_sep=hf.get("title_sep", " / "),
                doc_sep=hf.get("doc_sep", " // "),
                max_combined_length=hf.get("max_combined_length", 300),
                prefix=hf.get("generator", {}).get("prefix") or "",
            ),
        )
        fields.update(overrides)
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Rag:
    """The two trained networks of RAG and its settings; methods are pure functions of the parameters."""

    question_encoder_config: bert.BertConfig
    generator_config: Any  # the config class of a registered generator architecture (bart.BartConfig, t5.T5Config)
    config: RagConfig = RagConfig()
    doc_encoder_config: bert.BertConfig | None = None  # set: d(z) is trained, params["doc_encoder"]

    @property
    def trains_doc_encoder(self) -> bool:
        return self.doc_encoder_config is not None

    @property
    def doc_encoder(self) -> bert.BertEncoder:
        return bert.BertEncoder(self.doc_encoder_config)

    @property
    def question_encoder(self) -> bert.BertEncoder:
        return bert.BertEncoder(self.question_encoder_config)

    @property
    def generator(self) -> nn.Module:
        """The generator network its architecture's registry entry builds; every one has BART's methods (encode,
        decode, init_cache, decode_step, lm_head_arrays)."""
        return registry.for_config(self.generator_config).module_class(self.generator_config)

    def encode_questions(self, params: Params, input_ids_BxL, attention_mask_BxL, *, dropout_rng=None) -> jax.Array:
        """q(x): the pooled question vectors (B, D), float32."""
        _, q_BxD = self.question_encoder.apply(
            {"params": params["question_encoder"]},
            input_ids_BxL,
            attention_mask_BxL,
            deterministic=dropout_rng is None,
            rngs=_rngs(dropout_rng),
        )
        return q_BxD

    def encode_docs(self, params: Params, input_ids_NxL, attention_mask_NxL, token_type_ids_NxL, *,
                    dropout_rng=None) -> jax.Array:
        """d(z) with the trained document encoder: the pooled passage vectors (N, D), float32."""
        _, d_NxD = self.doc_encoder.apply(
            {"params": params["doc_encoder"]},
            input_ids_NxL,
            attention_mask_NxL,
            token_type_ids_NxL,
            deterministic=dropout_rng is None,
            rngs=_rngs(dropout_rng),
        )
        return layers.at_least_float32(d_NxD)

    def trained_doc_scores(self, params: Params, q_BxD: jax.Array, doc_tokens: dict[str, jax.Array], *,
                           dropout_rng=None) -> jax.Array:
        """q(x)·d(z) (B, K) with d(z) embedded now by params["doc_encoder"] from the retrieved passages' document-
        encoder tokens {"doc_input_ids", "doc_attention_mask", "doc_token_type_ids"} (each (B, K, L)); gradients
        reach both encoders (transformers' RagModel.forward when `context_encoder_training`)."""
        b, k, length = doc_tokens["doc_input_ids"].shape
        flat = [doc_tokens[key].reshape(b * k, length)
                for key in ("doc_input_ids", "doc_attention_mask", "doc_token_type_ids")]
        d_BxKxD = self.encode_docs(params, *flat, dropout_rng=dropout_rng).reshape(b, k, -1)
        d_BxKxD = constrain(d_BxKxD, ("batch", "docs", "embed"))
        return jnp.einsum("bd,bkd->bk", layers.at_least_float32(q_BxD), d_BxKxD)

    def generator_logits(
        self,
        params: Params,
        context_input_ids_BKxS,
        context_attention_mask_BKxS,
        decoder_input_ids_BxT,
        *,
        dropout_rng=None,
    ) -> jax.Array:
        """Logits (B, K, T, V) of the generator over each question's K contexts (float32)."""
        bk = context_input_ids_BKxS.shape[0]
        batch = decoder_input_ids_BxT.shape[0]
        n_docs = bk // batch
        decoder_ids = jnp.repeat(decoder_input_ids_BxT, n_docs, axis=0)  # the reference's repeat_interleave
        logits = self.generator.apply(
            {"params": params["generator"]},
            context_input_ids_BKxS,
            context_attention_mask_BKxS,
            decoder_ids,
            deterministic=dropout_rng is None,
            rngs=_rngs(dropout_rng),
        )
        logits = logits.reshape(batch, n_docs, *logits.shape[1:])
        return constrain(logits, ("batch", "docs", "length", "vocab"))


def init_params(model: Rag, rng: jax.Array) -> dict[str, Any]:
    """Random parameters, still boxed with their logical axis names (nn.LogicallyPartitioned)."""
    q_rng, g_rng = jax.random.split(rng)
    ids = jnp.ones((1, 8), jnp.int32)
    q_vars = model.question_encoder.init(q_rng, ids, ids)
    g_vars = model.generator.init(g_rng, ids, ids, ids[:, :4])
    params = {"question_encoder": q_vars["params"], "generator": g_vars["params"]}
    if model.trains_doc_encoder:  # its initial weights come from the run's document encoder (training.build)
        params["doc_encoder"] = model.doc_encoder.init(jax.random.fold_in(rng, 2), ids, ids)["params"]
    return params


def abstract_params(model: Rag) -> Any:
    """Shapes and dtypes of the parameters (unboxed ShapeDtypeStructs)."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(init_params, model), jax.random.PRNGKey(0)))


def _rngs(dropout_rng):
    return {} if dropout_rng is None else {"dropout": dropout_rng}


def doc_scores(q_BxD: jax.Array, doc_embeds_BxKxD: jax.Array) -> jax.Array:
    """q(x)·d(z) for the retrieved documents (B, K); gradients flow into q only (d is precomputed)."""
    q_BxD = layers.at_least_float32(q_BxD)
    doc_embeds_BxKxD = jax.lax.stop_gradient(doc_embeds_BxKxD.astype(q_BxD.dtype))
    return jnp.einsum("bd,bkd->bk", q_BxD, doc_embeds_BxKxD)


def shift_left(labels_BxT: jax.Array, pad_token_id: int) -> jax.Array:
    """The targets of decoder inputs `labels`: labels[:, 1:] followed by a pad (the reference's shift)."""
    return jnp.concatenate([labels_BxT[:, 1:], jnp.full_like(labels_BxT[:, :1], pad_token_id)], axis=1)


def _token_log_probs(logits_BxKxTxV: jax.Array, target_BxT: jax.Array, smoothing: bool = True):
    """log p(target) (B, K, T) and the vocabulary sum of log-probabilities (B, K, T) (None without `smoothing`),
    without materialising the (B, K, T, V) log-softmax a second time."""
    logits_BxKxTxV = layers.at_least_float32(logits_BxKxTxV)
    lse_BxKxT = jax.nn.logsumexp(logits_BxKxTxV, axis=-1)
    target_BxKxT = jnp.broadcast_to(target_BxT[:, None, :], lse_BxKxT.shape)
    picked = jnp.take_along_axis(logits_BxKxTxV, target_BxKxT[..., None], axis=-1)[..., 0]
    vocab = logits_BxKxTxV.shape[-1]
    return picked - lse_BxKxT, (logits_BxKxTxV.sum(-1) - vocab * lse_BxKxT) if smoothing else None


def _smoothing(epsilon) -> bool:
    """Whether the label-smoothing terms are needed. For a Python 0 they are skipped: computed and multiplied by 0
    they would still cost passes over the (B, K, T, V) logits (and their gradients), which XLA cannot drop since
    0 * x is not 0 for an infinite x."""
    return not (isinstance(epsilon, (int, float)) and epsilon == 0)


def _smoothed(nll_B, smooth_B, epsilon: float, vocab: int, reduce: bool):
    if reduce:
        nll_B = nll_B.sum()
        smooth_B = None if smooth_B is None else smooth_B.sum()
    if smooth_B is None:
        return nll_B
    return (1.0 - epsilon) * nll_B + (epsilon / vocab) * smooth_B


def rag_sequence_nll(
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
    target_BxT = shift_left(decoder_input_ids_BxT, pad_token_id)
    token_ll_BxKxT, vocab_sum_BxKxT = _token_log_probs(logits_BxKxTxV, target_BxT, _smoothing(epsilon))
    return rag_sequence_nll_from_terms(
        token_ll_BxKxT, vocab_sum_BxKxT, logits_BxKxTxV.shape[-1], doc_scores_BxK, decoder_input_ids_BxT,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, epsilon=epsilon, exclude_bos_score=exclude_bos_score,
        reduce=reduce, doc_prior_position=doc_prior_position, use_bos_B=use_bos_B,
    )  # fmt: skip


def rag_sequence_nll_from_terms(
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
    """rag_sequence_nll from the per-document target log-probabilities log p(y_t|x,z,y_<t) (B, K, T) and, for label
    smoothing (None without), their vocabulary sums (B, K, T) over a `vocab`-entry vocabulary: for callers that
    compute those terms without the (B, K, T, V) logits (layers.log_softmax_at)."""
    target_BxT = shift_left(decoder_input_ids_BxT, pad_token_id)
    smoothing = _smoothing(epsilon)
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
    return _smoothed(-ll_B, smooth_B, epsilon, vocab, reduce)


def rag_token_log_probs(logits_BxKxTxV: jax.Array, doc_scores_BxK: jax.Array) -> jax.Array:
    """log Σ_z p(z|x) p(y_t|x,z,y_<t) for every vocabulary entry: (B, T, V)."""
    doc_lp_BxK = jax.nn.log_softmax(layers.at_least_float32(doc_scores_BxK), axis=-1)
    seq_lp = jax.nn.log_softmax(layers.at_least_float32(logits_BxKxTxV), axis=-1)
    return jax.nn.logsumexp(seq_lp + doc_lp_BxK[:, :, None, None], axis=1)


def rag_token_nll(
    logits_BxKxTxV: jax.Array,
    doc_scores_BxK: jax.Array,
    labels_BxT: jax.Array,
    *,
    pad_token_id: int,
    epsilon: float = 0.0,
    reduce: bool = False,
) -> jax.Array:
    """-Σ_t log Σ_z p(z|x) p(y_t|x,z,y_<t), per example (B,) or summed when `reduce`."""
    target_BxT = shift_left(labels_BxT, pad_token_id)
    marginal_BxTxV = rag_token_log_probs(logits_BxKxTxV, doc_scores_BxK)
    ll_BxT = jnp.take_along_axis(marginal_BxTxV, target_BxT[..., None], axis=-1)[..., 0]
    keep_BxT = target_BxT != pad_token_id
    ll_B = jnp.where(keep_BxT, ll_BxT, 0.0).sum(-1)
    smooth_B = -jnp.where(keep_BxT, marginal_BxTxV.sum(-1), 0.0).sum(-1) if _smoothing(epsilon) else None
    return _smoothed(-ll_B, smooth_B, epsilon, logits_BxKxTxV.shape[-1], reduce)


# ------------------------------------------------------------------------------------------------- provenance


def target_log_likelihoods(logits_BxKxTxV: jax.Array, decoder_input_ids_BxT: jax.Array, *, pad_token_id: int):
    """log p(y_t | x, z, y_<t) of each target (the decoder inputs shifted left) under each document: (B, K, T),
    0 where the target is a pad. The per-document terms both losses are built from."""
    target_BxT = shift_left(decoder_input_ids_BxT, pad_token_id)
    token_ll_BxKxT, _ = _token_log_probs(logits_BxKxTxV, target_BxT, smoothing=False)
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
