"""Every parameter's gradient of the RAG-Sequence and RAG-Token losses equals transformers' on the same weights and
batch: question encoder, generator encoder and decoder, the shared embedding, every layer norm (BART's
final_logits_bias is a buffer there and a constant here). Names go through rag_jax's own import/export tables
(hf.bert_table, hf.bart_table), so a gradient that reached the wrong parameter would show.

The weights are random with LayerNorm weights near 1, as in trained networks. With hf_models.randomize alone
(LayerNorm weights of mean 0) some attention gradients are 1e-7 of the largest and the doc-score gradient
(posterior minus prior) nearly cancels; measured against transformers run in float64, both implementations then
carry float32 rounding of up to 1e-2 relative on those tensors (transformers' own float32 gradients more than
ours), which hides a defect instead of exposing one. Here every tensor is resolved to ~1e-6.

Key-projection biases get no gradient at all: softmax is invariant to adding q·b_k to every logit of a row. Their
exact gradient is 0 (1e-16 in float64), so they are checked to be zero up to rounding, not relatively.
"""

import re

import jax
import numpy as np
import pytest
import torch
import transformers

from rag_jax import rag
from rag_jax.models import hf
from rag_jax.readers import rag_sequence, rag_token
from tests import hf_models

N_DOCS, BATCH = 3, 4
TOLERANCE = 1e-4  # per tensor: ||g_ours - g_ref|| / ||g_ref||
ZERO = 1e-6  # key-bias gradient norms, relative to the largest gradient norm of the model
_KEY_BIAS = re.compile(r"(k_proj|attention\.self\.key)\.bias$")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rag")
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        hf_models.dpr_config(), hf_models.bart_config(), n_docs=N_DOCS
    )
    model = hf_models.randomize(transformers.RagSequenceForGeneration(config), seed=12, std=0.2)
    hf_models.layer_norms_near_one(model, 13, r"(LayerNorm|layer_norm|layernorm_embedding)\.weight$")
    model.save_pretrained(directory)
    return str(directory)


def _batch(seed=3):
    """Questions, contexts and labels all with padding (the first row of each unpadded)."""
    rng = np.random.default_rng(seed)
    q_ids, q_mask = hf_models.padded_ids(rng, BATCH, 9, vocab=97, pad=0, first=2)
    ctx_ids, ctx_mask = hf_models.padded_ids(rng, BATCH * N_DOCS, 12, vocab=101, pad=1)
    labels, _ = hf_models.padded_ids(rng, BATCH, 6, vocab=101, pad=1, first=0)  # <s> answer ... pads
    doc_embeds = (rng.normal(size=(BATCH, N_DOCS, 36)) * 0.05).astype(np.float32)
    return q_ids, q_mask, ctx_ids, ctx_mask, labels, doc_embeds


def _reference_gradients(directory, loss, epsilon, batch):
    """{name: gradient} of every parameter of transformers' model (label smoothing is read from its config)."""
    config = transformers.RagConfig.from_pretrained(directory)
    config.label_smoothing = epsilon
    cls = transformers.RagSequenceForGeneration if loss == "sequence" else transformers.RagTokenForGeneration
    model = cls.from_pretrained(directory, config=config).eval()
    q_ids, q_mask, ctx_ids, ctx_mask, labels, doc_embeds = map(torch.as_tensor, batch)
    q = model.question_encoder(q_ids, attention_mask=q_mask).pooler_output
    scores = torch.bmm(q.unsqueeze(1), doc_embeds.transpose(1, 2)).squeeze(1)
    out = model(context_input_ids=ctx_ids, context_attention_mask=ctx_mask, doc_scores=scores, labels=labels)
    out.loss.sum().backward()
    return {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}


def _our_gradients(directory, loss, epsilon, batch):
    """{transformers name: gradient} of every rag_jax parameter, mapped by the export tables."""
    q_ids, q_mask, ctx_ids, ctx_mask, labels, doc_embeds = batch
    loaded = hf.load_rag(directory)
    model = rag.Rag(loaded.question_encoder.config, loaded.generator.config, rag.RagConfig.from_hf(loaded.hf_config))
    params = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params}
    nll = rag_sequence.nll if loss == "sequence" else rag_token.nll

    def total(params):
        scores = rag.doc_scores(model.encode_questions(params, q_ids, q_mask), doc_embeds)
        logits = model.generator_logits(params, ctx_ids, ctx_mask, labels)
        return nll(logits, scores, labels, pad_token_id=1, epsilon=epsilon).sum()

    grads = jax.jit(jax.grad(total))(params)
    return {
        **hf.export_tensors(grads["question_encoder"], hf.bert_table(model.question_encoder_config),
                            hf.RAG_QUESTION_ENCODER_PREFIX + "bert_model."),
        **hf.export_tensors(grads["generator"], hf.bart_table(model.generator_config), hf.RAG_GENERATOR_PREFIX),
    }  # fmt: skip


def parameter_group(name: str) -> str:
    """The part of RAG a transformers parameter name belongs to, for the report."""
    if ".shared." in name:
        return "shared embedding"
    part = ("question encoder" if "question_encoder" in name else
            "generator encoder" if ".encoder." in name else "generator decoder")  # fmt: skip
    if re.search(r"(LayerNorm|layer_norm|layernorm_embedding)\.", name):
        return f"{part} layer norms"
    return f"{part} {'embeddings' if 'embed' in name else 'layers'}"


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("loss", ["sequence", "token"])
def test_every_parameter_gradient_matches_transformers(checkpoint, loss, epsilon):
    batch = _batch()
    reference = _reference_gradients(checkpoint, loss, epsilon, batch)
    ours = _our_gradients(checkpoint, loss, epsilon, batch)
    assert set(ours) - set(reference) == {hf.RAG_GENERATOR_PREFIX + "final_logits_bias"}  # a buffer there
    assert set(reference) <= set(ours)  # every trained parameter of transformers has its rag_jax counterpart

    largest = max(np.linalg.norm(g) for g in reference.values())
    worst: dict[str, float] = {}
    for name, expected in reference.items():
        actual, expected = np.asarray(ours[name], np.float64), np.asarray(expected, np.float64)
        if _KEY_BIAS.search(name):
            assert np.linalg.norm(actual) <= ZERO * largest, name
            assert np.linalg.norm(expected) <= ZERO * largest, name  # the exact gradient is 0
            continue
        error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
        group = parameter_group(name)
        worst[group] = max(worst.get(group, 0.0), error)
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e} (|g| {np.linalg.norm(expected):.2e})"
    print(f"\n{loss} loss, label smoothing {epsilon}: worst relative gradient error per parameter group")
    for group, error in sorted(worst.items()):
        print(f"  {group:36s} {error:.1e}")
