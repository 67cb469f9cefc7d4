"""Flax BERT/DPR encoders and BART against the Hugging Face PyTorch reference on the same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rag_jax.models import hf
from tests import hf_models
from tests.hf_models import relative_error

TOLERANCE = 1e-5


def _torch(x):
    return torch.as_tensor(np.asarray(x))


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("bert", {}),  # BertModel: pooled output = dense + tanh pooler
        ("question", {}),  # DPR: pooled = [CLS]
        ("question", {"projection_dim": 11}),  # DPR with encode_proj
        ("context", {"hidden_act": "gelu_new"}),
    ],
)
def test_encoder_parity(tmp_path, kind, overrides):
    builders = {"bert": hf_models.bert_model, "question": hf_models.dpr_question_encoder,
                "context": hf_models.dpr_context_encoder}  # fmt: skip
    reference = builders[kind](seed=1, **overrides)
    reference.save_pretrained(tmp_path)
    loaded = hf.load_encoder(str(tmp_path))
    assert loaded.config.pooling == ("pooler" if kind == "bert" else "cls")

    rng = np.random.default_rng(0)
    ids, mask = hf_models.padded_ids(rng, batch=4, length=13, vocab=97, pad=0, first=2)
    token_types = np.where(np.arange(13)[None] >= 6, 1, 0) * mask
    hidden, pooled = loaded.module().apply({"params": loaded.params}, ids, mask, token_types)
    with torch.no_grad():
        if kind == "bert":
            out = reference(_torch(ids), attention_mask=_torch(mask), token_type_ids=_torch(token_types))
            ref_hidden, ref_pooled = out.last_hidden_state, out.pooler_output
        else:
            out = reference(_torch(ids), attention_mask=_torch(mask), token_type_ids=_torch(token_types),
                            output_hidden_states=True)  # fmt: skip
            ref_hidden, ref_pooled = out.hidden_states[-1], out.pooler_output
    assert pooled.shape == tuple(ref_pooled.shape)
    assert relative_error(pooled, ref_pooled) <= TOLERANCE
    valid = mask.astype(bool)  # padded positions are not compared: nothing reads them
    assert relative_error(np.asarray(hidden)[valid], ref_hidden.numpy()[valid]) <= TOLERANCE


def test_mean_pooling_masks_padding(tmp_path):
    hf_models.bert_model(seed=2).save_pretrained(tmp_path)
    loaded = hf.load_encoder(str(tmp_path), pooling="mean")
    ids, mask = hf_models.padded_ids(np.random.default_rng(1), batch=3, length=9, vocab=97, pad=0)
    hidden, pooled = loaded.module().apply({"params": loaded.params}, ids, mask)
    m = mask[..., None]
    expected = (np.asarray(hidden) * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)


def _bart_inputs(seed=0, batch=4, source=11, target=7):
    rng = np.random.default_rng(seed)
    ids, mask = hf_models.padded_ids(rng, batch, source, vocab=101, pad=1)
    decoder_ids, _ = hf_models.padded_ids(rng, batch, target, vocab=101, pad=1, first=2)
    return ids, mask, decoder_ids


@pytest.mark.parametrize("scale_embedding", [False, True])
def test_bart_parity(tmp_path, scale_embedding):
    reference = hf_models.bart_model(seed=3, scale_embedding=scale_embedding)
    reference.save_pretrained(tmp_path)
    loaded = hf.load_bart(str(tmp_path))
    assert loaded.config.scale_embedding == scale_embedding
    model, variables = loaded.module(), {"params": loaded.params}
    ids, mask, decoder_ids = _bart_inputs()
    decoder_mask = (decoder_ids != 1).astype(np.int64)

    encoder_out = model.apply(variables, ids, mask, method=model.encode)
    logits = model.apply(variables, ids, mask, decoder_ids, decoder_mask)
    with torch.no_grad():
        out = reference(input_ids=_torch(ids), attention_mask=_torch(mask), decoder_input_ids=_torch(decoder_ids),
                        decoder_attention_mask=_torch(decoder_mask))  # fmt: skip
    valid = mask.astype(bool)
    assert relative_error(np.asarray(encoder_out)[valid], out.encoder_last_hidden_state.numpy()[valid]) <= TOLERANCE
    dvalid = decoder_mask.astype(bool)
    assert relative_error(np.asarray(logits)[dvalid], out.logits.numpy()[dvalid]) <= TOLERANCE


def test_bart_cached_decoding_equals_full_forward(tmp_path):
    hf_models.bart_model(seed=4).save_pretrained(tmp_path)
    loaded = hf.load_bart(str(tmp_path))
    model, variables = loaded.module(), {"params": loaded.params}
    ids, mask, decoder_ids = _bart_inputs(seed=5, target=9)
    decoder_ids[:] = np.where(decoder_ids == 1, 7, decoder_ids)  # no decoder padding: plain causal decoding

    full = model.apply(variables, ids, mask, decoder_ids)
    encoder_out = model.apply(variables, ids, mask, method=model.encode)
    cache = model.apply(variables, encoder_out, mask, 12, method=model.init_cache)
    step = jax.jit(lambda c, t: model.apply(variables, t, c, method=model.decode_step))
    stepped = []
    # One token, then a chunk of three, then one at a time: the cache index must handle both.
    for start, stop in [(0, 1), (1, 4)] + [(t, t + 1) for t in range(4, 9)]:
        logits, cache = step(cache, jnp.asarray(decoder_ids[:, start:stop]))
        stepped.append(logits)
    assert relative_error(jnp.concatenate(stepped, axis=1), full) <= TOLERANCE


def test_bart_bfloat16_compute_runs_close_to_float32(tmp_path):
    hf_models.bart_model(seed=6).save_pretrained(tmp_path)
    f32 = hf.load_bart(str(tmp_path))
    bf16 = hf.load_bart(str(tmp_path), dtype=jnp.bfloat16)
    ids, mask, decoder_ids = _bart_inputs(seed=7)
    ref = f32.module().apply({"params": f32.params}, ids, mask, decoder_ids)
    out = bf16.module().apply({"params": bf16.params}, ids, mask, decoder_ids)
    assert out.dtype == jnp.float32  # logits are returned in float32 for the losses
    assert bool(jnp.all(jnp.isfinite(out)))
    assert relative_error(out, ref) < 0.1  # bf16 has ~3 significant digits


def test_rag_checkpoint_loads_both_networks(tmp_path):
    import transformers

    qcfg = hf_models.dpr_config(projection_dim=0)
    config = transformers.RagConfig.from_question_encoder_generator_configs(qcfg, hf_models.bart_config(), n_docs=3)
    reference = hf_models.randomize(transformers.RagSequenceForGeneration(config), seed=8)
    reference.save_pretrained(tmp_path)
    loaded = hf.load_rag(str(tmp_path))
    assert loaded.hf_config["n_docs"] == 3

    ids, mask = hf_models.padded_ids(np.random.default_rng(2), batch=3, length=10, vocab=97, pad=0, first=2)
    _, pooled = loaded.question_encoder.module().apply({"params": loaded.question_encoder.params}, ids, mask)
    with torch.no_grad():
        ref_pooled = reference.question_encoder(_torch(ids), attention_mask=_torch(mask)).pooler_output
    assert relative_error(pooled, ref_pooled) <= TOLERANCE

    ids, mask, decoder_ids = _bart_inputs(seed=9)
    logits = loaded.generator.module().apply({"params": loaded.generator.params}, ids, mask, decoder_ids)
    with torch.no_grad():
        ref_logits = reference.generator(input_ids=_torch(ids), attention_mask=_torch(mask),
                                         decoder_input_ids=_torch(decoder_ids)).logits  # fmt: skip
    assert relative_error(logits, ref_logits) <= TOLERANCE
    assert hf.load(str(tmp_path)).generator.config == loaded.generator.config
