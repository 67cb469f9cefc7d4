"""The RAG model: question encoder q(x), doc scores q(x)·d(z), and a generator (BART, T5 or another architecture of
rag_jax/models/registry.py) over the K retrieved documents. How the generator's passes over the documents become an
answer, a loss and provenance is a reader's (rag_jax/readers/: RAG-Sequence and RAG-Token of Lewis et al. 2020).

Parameters are one tree {"question_encoder": ..., "generator": ...}. In the paper's recipe the document encoder is not
part of it: the retrieved documents' embeddings arrive precomputed, so the question encoder gets its gradient only
through the doc scores. End-to-end RAG (a `doc_encoder_config`; transformers' RAG after
`set_context_encoder_for_training`, REALM) adds params["doc_encoder"]: the retrieved passages are embedded again with
it (`trained_doc_scores`), so q(x)·d(z) carries gradients to both encoders.
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
    # Fusion-in-Decoder's model.fid.remat (its --use_checkpoint): the generator's encoder is recomputed in the
    # backward pass instead of keeping the activations of its B*K passages (rag_jax/readers/fid.py).
    remat_encoder: bool = False

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


def with_compute_dtype(model: Rag, dtype: Any) -> Rag:
    """The same model computing in `dtype` (jnp.float32 or jnp.bfloat16): activations and matmuls of every network in
    it, the question and trained document encoders as well as the generator; its parameters are unchanged (float32),
    and softmaxes, norms, logits and the readers' sums stay in float32 (models/layers.accumulation_dtype)."""

    def replace(config):
        return None if config is None else dataclasses.replace(config, dtype=dtype)

    return dataclasses.replace(model, question_encoder_config=replace(model.question_encoder_config),
                               generator_config=replace(model.generator_config),
                               doc_encoder_config=replace(model.doc_encoder_config))


def init_params(model: Rag, rng: jax.Array) -> dict[str, Any]:
    """Random parameters, still boxed with their logical axis names (nn.LogicallyPartitioned)."""
    q_rng, g_rng = jax.random.split(rng)
    ids = jnp.ones((1, 8), jnp.int32)
    q_vars = model.question_encoder.init(q_rng, ids, ids)
    g_vars = model.generator.init(g_rng, ids, ids, ids[:, :4])
    params = {"question_encoder": q_vars["params"], "generator": g_vars["params"]}
    if model.trains_doc_encoder:  # its initial weights come from the run's document encoder (runs.build)
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
