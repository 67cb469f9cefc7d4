"""bfloat16 compute (model.compute_dtype, rag.with_compute_dtype) against float32 on the parity fixtures' random
weights (issue 30; docs/bfloat16_agreement.md has the measurements): per-example NLLs within a measured tolerance,
greedy answers mostly identical and every difference a near-tie, and float32 where the mode keeps it (softmaxes,
log-likelihoods, the marginal over documents)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from rag_jax import rag
from rag_jax.models import hf
from rag_jax.readers import generation, rag_sequence, rag_token
from tests import hf_models

N_DOCS, BATCH = 3, 8
BF16 = jnp.bfloat16


def _load(reference, directory):
    """Our float32 and bfloat16 twins of a transformers RAG (same float32 parameters) and its config dict."""
    reference.save_pretrained(directory)
    loaded = hf.load_rag(str(directory))
    model = rag.Rag(loaded.question_encoder.config, loaded.generator.config, rag.RagConfig.from_hf(loaded.hf_config))
    params = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params}
    return dict(f32=model, bf16=rag.with_compute_dtype(model, BF16), params=params, hf_config=loaded.hf_config)


def _bart_loss_fixture(directory):
    """tests/test_rag_losses.py's model: odd sizes, std 1.0."""
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        hf_models.dpr_config(), hf_models.bart_config(), n_docs=N_DOCS)
    return hf_models.randomize(transformers.RagSequenceForGeneration(config), seed=11, std=1.0)


def _bart_decode_fixture(directory):
    """tests/test_decode.py's model (hf_models.decode_rag): std 0.5, layer norms near the identity, EOS and BOS
    raised."""
    return hf_models.decode_rag(N_DOCS)


def _t5_fixture(directory):
    """A T5 v1.1 generator (gated GELU, untied head) of tests/hf_models.py's odd sizes."""
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        hf_models.dpr_config(num_hidden_layers=1), hf_models.t5_config("v1.1", bos_token_id=None), n_docs=N_DOCS)
    reference = transformers.RagTokenForGeneration(config)
    hf_models.untie_t5_head(reference.rag.generator)
    return hf_models.randomize(reference, seed=3)


FIXTURES = {"bart_loss": _bart_loss_fixture, "bart_decode": _bart_decode_fixture, "t5_v1.1": _t5_fixture}


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def models(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return dict(_load(FIXTURES[request.param](directory), directory), name=request.param)


@pytest.fixture(scope="module")
def decode_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bart_decode")
    return _load(_bart_decode_fixture(directory), directory)


def _nll_inputs(hf_config, seed=0, target=6):
    """Contexts (B*K, S), doc scores (B, K) and decoder inputs (B, T) that start with the decoder start token."""
    rng = np.random.default_rng(seed)
    g = hf_config["generator"]
    pad, start, vocab = g["pad_token_id"], g["decoder_start_token_id"], g["vocab_size"]
    ids, mask = hf_models.padded_ids(rng, BATCH * N_DOCS, 12, vocab=vocab, pad=pad)
    labels, _ = hf_models.padded_ids(rng, BATCH, target, vocab=vocab, pad=pad, first=start)
    scores = (rng.normal(size=(BATCH, N_DOCS)) * 2).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(scores), jnp.asarray(labels), pad


READERS = {"rag_sequence": rag_sequence.nll, "rag_token": rag_token.nll}
# Largest relative per-example NLL difference measured on the inputs below (BART 1.7e-2 and 1.3e-2, T5 5.5e-4;
# docs/bfloat16_agreement.md), with a margin of about 1.5x. bfloat16 keeps 8 bits of mantissa (2^-9 = 0.2% relative
# rounding of each weight and activation); the BART fixtures' large random weights (std 1.0 and 0.5) amplify it.
NLL_TOLERANCE = {"bart_loss": 0.025, "bart_decode": 0.025, "t5_v1.1": 1e-3}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_per_example_nlls_agree_with_float32(models, reader):
    ids, mask, scores, labels, pad = _nll_inputs(models["hf_config"])
    nll = {}
    for dtype in ("f32", "bf16"):
        logits = models[dtype].generator_logits(models["params"], ids, mask, labels)
        assert logits.dtype == jnp.float32  # the logits and log-softmax over them stay float32
        nll[dtype] = np.asarray(READERS[reader](logits, scores, labels, pad_token_id=pad), np.float64)
    assert nll["f32"].shape == (BATCH,) and (nll["f32"] > 0).all()
    relative = np.abs(nll["bf16"] - nll["f32"]) / nll["f32"]
    print(f"{models['name']} {reader}: max relative NLL difference {relative.max():.2e}")
    assert relative.max() <= NLL_TOLERANCE[models["name"]], relative
    assert not np.array_equal(nll["bf16"], nll["f32"])  # it did compute in bfloat16


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (jit, custom_jvp, scan, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_bfloat16_matmuls_feed_float32_softmaxes_and_losses(decode_models):
    """In the bfloat16 model's RAG-Sequence and RAG-Token losses the matmuls take bfloat16 operands (but BART's
    tied LM head, an Embed.attend on the float32 embedding: bfloat16-rounded features, float32 product), and every
    exponential and logarithm (the attention and vocabulary softmaxes, log-likelihoods, logsumexp over documents)
    is float32."""
    ids, mask, scores, labels, pad = _nll_inputs(decode_models["hf_config"])
    model, params = decode_models["bf16"], decode_models["params"]
    for nll in READERS.values():
        loss = lambda p: nll(model.generator_logits(p, ids, mask, labels), scores, labels, pad_token_id=pad).sum()
        equations = list(_equations(jax.make_jaxpr(loss)(params).jaxpr))
        dots = [e for e in equations if e.primitive.name == "dot_general"]
        head = [e for e in dots if e.outvars[0].aval.shape[-1] == model.generator_config.vocab_size]
        assert len(head) == 1 and len(dots) > 10
        assert all(v.aval.dtype == BF16 for e in dots if e not in head for v in e.invars)
        transcendental = [e for e in equations if e.primitive.name in ("exp", "log", "log1p", "logistic")]
        assert transcendental and all(v.aval.dtype == jnp.float32 for e in transcendental for v in e.outvars)
        assert loss(params).dtype == jnp.float32


N_QUESTIONS, MAX_LENGTH = 100, 8
# Shares of the N_QUESTIONS greedy answers identical in bfloat16 and float32, measured on the decode fixture (0.90
# RAG-Token, 0.86 RAG-Sequence), less a few questions' margin: random weights leave near-tied tokens, which
# bfloat16's rounding flips (the issue's 98% holds for a trained model; docs/bfloat16_agreement.md).
AGREEMENT = {"rag_token": 0.85, "rag_sequence": 0.80}


def _questions(seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = hf_models.padded_ids(rng, N_QUESTIONS * N_DOCS, 12, vocab=101, pad=1)
    scores = (rng.normal(size=(N_QUESTIONS, N_DOCS)) * 2).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(scores)


def _greedy(models, reader, inputs):
    hf_config, params = models["hf_config"], models["params"]
    if reader == "rag_token":
        gen = generation.GenerationConfig.from_hf(hf_config, num_beams=1, max_length=MAX_LENGTH)
        return {d: np.asarray(rag_token.generate(models[d], params, *inputs, gen)) for d in ("f32", "bf16")}
    gen = generation.GenerationConfig.for_rag_sequence(hf_config, num_beams=1, max_length=MAX_LENGTH)
    return {d: np.asarray(rag_sequence.generate(models[d], params, *inputs, gen)) for d in ("f32", "bf16")}


def _token_margins(models, inputs, question: int, position: int, prefix):
    """RAG-Token's next-token log-probabilities after `prefix` for one question, float32 and bfloat16 (V,) each."""
    ids, mask, scores = inputs
    rows = slice(question * N_DOCS, (question + 1) * N_DOCS)
    out = {}
    for d in ("f32", "bf16"):
        logits = models[d].generator_logits(models["params"], ids[rows], mask[rows], jnp.asarray(prefix[None]))
        out[d] = np.asarray(rag_token.log_probs(logits, scores[question:question + 1])[0, position], np.float64)
    return out


@pytest.mark.slow  # 100 questions, four decoders compiled, one teacher-forced pass per difference: ~1-5 min loaded
@pytest.mark.parametrize("reader", sorted(AGREEMENT))
def test_greedy_answers_agree_with_float32_but_for_near_ties(decode_models, reader):
    """At least AGREEMENT[reader] of the answers are identical. For RAG-Token each differing answer's first
    differing token is a near-tie in float32: its margin over bfloat16's pick is within 2x the largest change
    bfloat16 makes to a next-token log-probability there, the most a difference of two can change."""
    inputs = _questions()
    answers = _greedy(decode_models, reader, inputs)
    same = (answers["f32"] == answers["bf16"]).all(axis=1)
    for q in np.flatnonzero(~same):
        print(f"{reader} question {q}: float32 {answers['f32'][q].tolist()} bfloat16 {answers['bf16'][q].tolist()}")
    print(f"{reader}: {same.mean():.2f} identical")
    assert same.mean() >= AGREEMENT[reader]
    if reader != "rag_token":
        return
    for q in np.flatnonzero(~same):
        t = int(np.argmax(answers["f32"][q] != answers["bf16"][q]))  # position of the first differing token
        lp = _token_margins(decode_models, inputs, q, t - 1, answers["f32"][q, :t])
        ours, theirs = answers["f32"][q, t], answers["bf16"][q, t]
        margin, error = lp["f32"][ours] - lp["f32"][theirs], np.abs(lp["bf16"] - lp["f32"]).max()
        print(f"  question {q} token {t}: float32 margin {margin:.3f}, bfloat16 error {error:.3f}")
        assert 0 <= margin <= 2 * error


def test_evaluation_flag_sets_every_network_dtype(decode_models):
    """experiments.evaluate --compute_dtype: bfloat16 for the question encoder and the generator (and a trained
    document encoder), the parameters untouched; no flag keeps the model as loaded."""
    from experiments import model_loading  # pylint: disable=g-import-not-at-top

    model = decode_models["f32"]
    assert model_loading.with_compute_dtype(model, None) is model
    bf16 = model_loading.with_compute_dtype(model, "bfloat16")
    assert bf16 == decode_models["bf16"]
    assert bf16.question_encoder_config.dtype == bf16.generator_config.dtype == BF16
    assert bf16.doc_encoder_config is None and model_loading.with_compute_dtype(bf16, "float32") == model
