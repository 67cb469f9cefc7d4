"""The fid reader against a PyTorch Fusion-in-Decoder built as facebookresearch/FiD builds it: FiD's passage strings
(src/data.py), tokenised per passage to a fixed length (encode_passages), transformers' T5ForConditionalGeneration
(and BartForConditionalGeneration) with the encoder applied to the B*K passages and its outputs concatenated per
question (FiDT5's EncoderWrapper), the loss from `labels` (cross-entropy averaged over the kept tokens), `generate`
with that encoder output. Random odd-sized weights, real tokenizers, real passages."""

import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_outputs import BaseModelOutput

from rag_jax import rag
from rag_jax.data import tokenizers
from rag_jax.models import bert, hf
from rag_jax.readers import fid, generation, registry
from rag_jax.retrieval import contexts, corpus
from rag_jax.training import retriever_losses
from tests import hf_models

ASSETS = "rag_jax/assets/nq_open_mini"
B, K, S, T = 3, 3, 29, 9  # odd: questions, passages each, passage length, target length
T5_EOS_SCALE, BART_EOS_BIAS = 8.0, 4.4  # EOS wins at some steps: some answers end early


def fid_strings(question: str, titles, texts) -> list[str]:
    """facebookresearch/FiD's src/data.py, rewritten: Dataset.__getitem__ and Collator.append_question."""
    question = "question:" + " " + question
    passages = [("title:" + " {} " + "context:" + " {}").format(title, text) for title, text in zip(titles, texts)]
    return [question + " " + passage for passage in passages]


def _real_data():
    passages = list(itertools.islice(corpus.read_passages(f"{ASSETS}/passages.tsv"), 400))
    with open(f"{ASSETS}/questions.jsonl") as f:
        rows = [json.loads(line) for line in itertools.islice(f, B)]
    chosen = [passages[7 * i: 7 * i + K] for i in range(B)]  # (B, K), different per question
    return passages, rows, chosen


def _torch_generator(arch: str, vocab: int, tmp):
    """The reference generator, random; EOS made likely enough that some answers end before max_length."""
    if arch == "t5":
        # equal depths: transformers 5's generate sizes T5's decoder cache by num_layers (the encoder's);
        # tests/test_t5.py checks unequal depths against T5ForConditionalGeneration alone
        model = hf_models.t5_model("v1.0", seed=3, vocab_size=vocab, num_decoder_layers=2)
    else:
        model = hf_models.bart_model(seed=3, vocab_size=vocab, max_position_embeddings=64)
    hf_models.layer_norms_near_one(model, 4, "norm")
    eos = model.config.eos_token_id
    with torch.no_grad():
        if arch == "t5":
            model.lm_head.weight[eos] *= T5_EOS_SCALE
        else:  # random biases make one of BART's 50,265 tokens win whatever the input; EOS by its bias
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
            model.final_logits_bias.zero_()
            model.final_logits_bias[0, eos] = BART_EOS_BIAS
    model.save_pretrained(tmp / arch)
    return model.eval()


@pytest.fixture(scope="module", params=["t5", "bart"])
def setup(request, tmp_path_factory):
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"fid_{arch}")
    passages, rows, chosen = _real_data()
    if arch == "t5":
        tok = tokenizers.train_sentencepiece((p.title + " " + p.text for p in passages), str(tmp / "tok"))
    else:
        tok = tokenizers.load_generator_tokenizer()
    reference = _torch_generator(arch, len(tok), tmp)
    loaded = hf.load_generator(str(tmp / arch))
    model = rag.Rag(bert.BertConfig(), loaded.config)
    params = {"generator": loaded.params}
    questions = [row["question"] for row in rows]
    fmt = registry.get("fid").context_format(contexts.ContextFormat(max_combined_length=S))
    ids, mask = contexts.generator_inputs(questions, [[p.title for p in c] for c in chosen],
                                          [[p.text for p in c] for c in chosen], tok, fmt)
    labels = tokenizers.decoder_labels(tok, [row["answers"][0] for row in rows], max_length=T)
    return dict(arch=arch, tok=tok, reference=reference, model=model, params=params, questions=questions,
                chosen=chosen, ids=ids, mask=mask, labels=labels)


def _torch_encoder_out(reference, ids_BKxS, mask_BKxS):
    """FiDT5's EncoderWrapper: the encoder over the B*K passages, outputs (B, K*S, E) and mask (B, K*S)."""
    ids, mask = torch.tensor(ids_BKxS, dtype=torch.long), torch.tensor(mask_BKxS, dtype=torch.long)
    with torch.no_grad():
        states = reference.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    return states.reshape(B, K * S, -1), mask.reshape(B, K * S)


def _targets(labels, pad):
    return np.concatenate([labels[:, 1:], np.full((B, 1), pad)], axis=1)


def test_contexts_are_fids_strings(setup):
    tok, chosen = setup["tok"], setup["chosen"]
    expected = [s for q, c in zip(setup["questions"], chosen)
                for s in fid_strings(q, [p.title for p in c], [p.text for p in c])]
    # FiD's encode_passages: each question's passages through batch_encode_plus, truncated and padded to S
    encoded = tok(expected, max_length=S, padding="max_length", truncation=True)
    np.testing.assert_array_equal(setup["ids"], encoded["input_ids"])
    np.testing.assert_array_equal(setup["mask"], encoded["attention_mask"])
    assert expected[0].startswith("question: ") and " title: " in expected[0] and " context: " in expected[0]


def test_nll_and_loss_equal_pytorch_fid(setup):
    reference, model, params, labels = setup["reference"], setup["model"], setup["params"], setup["labels"]
    pad = model.generator_config.pad_token_id
    states, mask = _torch_encoder_out(reference, setup["ids"], setup["mask"])
    targets = _targets(labels, pad)
    torch_labels = torch.tensor(np.where(targets == pad, -100, targets), dtype=torch.long)
    with torch.no_grad():  # FiD's train loop: model(input_ids, attention_mask, labels)[0]
        out = reference(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask,
                        decoder_input_ids=torch.tensor(labels, dtype=torch.long), labels=torch_labels)
    logp = torch.log_softmax(out.logits.double(), -1)
    picked = logp.gather(-1, torch.tensor(targets, dtype=torch.long)[..., None])[..., 0]
    expected_nll = -(picked * torch.tensor(targets != pad)).sum(-1).numpy()

    scores = registry.get("fid").score(model, params, jnp.asarray(setup["ids"]), jnp.asarray(setup["mask"]), None,
                                       None, jnp.asarray(labels))
    assert hf_models.relative_error(scores["nll"], expected_nll) <= 1e-4
    for b in range(B):
        assert abs(float(scores["nll"][b]) - expected_nll[b]) <= 1e-4 * abs(expected_nll[b])

    batch = {"context_input_ids": jnp.asarray(setup["ids"]).reshape(B, K, S),
             "context_attention_mask": jnp.asarray(setup["mask"]).reshape(B, K, S), "labels": jnp.asarray(labels)}
    loss_B = registry.get("fid").loss(model, params, batch, jnp.zeros((B, K)), epsilon=0.0, dropout_rng=None)
    assert abs(float(loss_B.mean()) - float(out.loss)) <= 1e-4 * float(out.loss)


def test_t5_decoder_inputs_are_t5s_shifted_labels(setup):
    """FiD passes only `labels`: T5 makes the decoder inputs by shifting them right, which are our labels."""
    if setup["arch"] != "t5":
        pytest.skip("FiD's own generator is T5")
    pad = setup["model"].generator_config.pad_token_id
    targets = _targets(setup["labels"], pad)
    shifted = setup["reference"]._shift_right(torch.tensor(np.where(targets == pad, -100, targets)))
    np.testing.assert_array_equal(shifted.numpy(), setup["labels"])


def test_scores_do_not_depend_on_the_passage_order_padding_alone(setup):
    """A passage's padding in the middle of the fused sequence is masked: widening S changes nothing."""
    model, params, labels = setup["model"], setup["params"], setup["labels"]
    pad = model.generator_config.pad_token_id
    wide = lambda x, fill: np.pad(x, ((0, 0), (0, 6)), constant_values=fill)  # noqa: E731
    narrow = fid.nll_sums(model, params, setup["ids"], setup["mask"], labels)
    widened = fid.nll_sums(model, params, wide(setup["ids"], pad), wide(setup["mask"], 0), labels)
    np.testing.assert_allclose(widened, narrow, rtol=1e-5)


def test_scores_do_not_depend_on_the_passage_order(setup):
    """Each passage is encoded from position 0 and the cross-attention has no positions: the decoder cannot tell
    the first-ranked passage from the others, so training with shuffled passages changes nothing (docs/fid.md)."""
    model, params, labels = setup["model"], setup["params"], setup["labels"]
    reverse = lambda x: x.reshape(B, K, -1)[:, ::-1].reshape(B * K, -1)  # noqa: E731
    in_order = fid.nll_sums(model, params, setup["ids"], setup["mask"], labels)
    reversed_ = fid.nll_sums(model, params, reverse(setup["ids"]), reverse(setup["mask"]), labels)
    np.testing.assert_allclose(reversed_, in_order, rtol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_answers_equal_pytorch_fid_generate(setup, num_beams):
    reference, model, params = setup["reference"], setup["model"], setup["params"]
    cfg = reference.config
    states, mask = _torch_encoder_out(reference, setup["ids"], setup["mask"])
    max_length = 12
    with torch.no_grad():
        expected = reference.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask,
                                      max_length=max_length, num_beams=num_beams, do_sample=False, min_length=0,
                                      length_penalty=1.0, early_stopping=False, no_repeat_ngram_size=0,
                                      forced_bos_token_id=None, forced_eos_token_id=None).numpy()
    gen = generation.GenerationConfig(
        max_length=max_length, num_beams=num_beams, decoder_start_token_id=cfg.decoder_start_token_id,
        bos_token_id=getattr(cfg, "bos_token_id", None), eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    doc_scores = jnp.zeros((B, K))
    got = np.asarray(registry.get("fid").generate(model, params, jnp.asarray(setup["ids"]), jnp.asarray(setup["mask"]),
                                                  doc_scores, gen).tokens_NxL)
    np.testing.assert_array_equal(got[:, :expected.shape[1]], expected)
    fill = gen.beam_fill_token_id if num_beams > 1 else cfg.pad_token_id  # past the reference's cut
    assert (got[:, expected.shape[1]:] == fill).all()
    lengths = (expected != cfg.pad_token_id).sum(1)
    if num_beams == 1:  # some answers end early (beam search keeps finished hypotheses either way)
        assert len(set(lengths.tolist())) > 1 or lengths.max() < max_length, expected


def test_fid_is_a_registered_reader():
    assert registry.get("fid").name == "fid"
    assert registry.for_hf_architecture(None).name == "rag_sequence"
    with pytest.raises(ValueError, match="puts the question first"):
        contexts.passage_part("t", "x", contexts.ContextFormat(layout="fid"))


def test_fid_contexts_carry_the_question_as_written():
    """FiD formats the question as written; RAG's contexts carry the question-encoder ids decoded back (the
    reference's), which an uncased tokenizer lower-cases: "Faidigr Nutrainuk" would no longer match the title."""
    qtok = tokenizers.load_question_tokenizer()
    written = ["in which city was Faidigr Nutrainuk born?", "what did Ana Lo play?"]
    ids = qtok(written, padding=True, return_tensors="np")["input_ids"]
    fid_format = registry.get("fid").context_format(contexts.ContextFormat())
    assert contexts.context_questions(written, ids, qtok, fid_format) == written
    decoded = contexts.context_questions(written, ids, qtok, contexts.ContextFormat())
    assert decoded == contexts.decode_questions(ids, qtok) == [q.lower() for q in written]
    assert contexts.context_questions(None, ids, qtok, fid_format) == decoded  # no text given: decoded


@pytest.mark.slow  # two gradient compilations per generator: ~45-65 s under load
def test_remat_gives_the_same_loss_and_gradients(setup):
    """model.fid.remat recomputes the encoder in the backward pass: the same values (dropout is 0 here)."""
    model, params, labels = setup["model"], setup["params"], setup["labels"]
    batch = {"context_input_ids": jnp.asarray(setup["ids"]).reshape(B, K, S),
             "context_attention_mask": jnp.asarray(setup["mask"]).reshape(B, K, S), "labels": jnp.asarray(labels)}
    reader = registry.get("fid")

    def loss(model, params):
        return reader.loss(model, params, batch, jnp.zeros((B, K)), epsilon=0.0,
                           dropout_rng=jax.random.PRNGKey(0)).mean()

    plain = jax.value_and_grad(functools.partial(loss, model))(params)
    remat_model = dataclasses.replace(model, config=dataclasses.replace(model.config, remat_encoder=True))
    remat = jax.value_and_grad(functools.partial(loss, remat_model))(params)
    np.testing.assert_allclose(remat[0], plain[0], rtol=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain[1]))  # some leaves' gradients are ~0
    for got, expected in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
        assert float(jnp.abs(got - expected).max()) <= 1e-4 * scale
    assert "remat" in str(jax.make_jaxpr(functools.partial(loss, remat_model))(params))  # the remat path ran
    assert "remat" not in str(jax.make_jaxpr(functools.partial(loss, model))(params))


def test_provenance_is_the_decoders_cross_attention_mass_per_passage(setup):
    """Against transformers' cross_attentions of the same decoder pass (output_attentions=True), summed over each
    passage's tokens, averaged over heads and layers; per answer, averaged over its tokens up to its end token."""
    reference, model, params = setup["reference"], setup["model"], setup["params"]
    cfg = reference.config
    gen = generation.GenerationConfig(max_length=10, decoder_start_token_id=cfg.decoder_start_token_id,
                                      bos_token_id=getattr(cfg, "bos_token_id", None), eos_token_id=cfg.eos_token_id,
                                      pad_token_id=cfg.pad_token_id)
    decoded = registry.get("fid").generate(model, params, jnp.asarray(setup["ids"]), jnp.asarray(setup["mask"]),
                                           jnp.zeros((B, K)), gen, provenance=True)
    tokens = np.asarray(decoded.tokens_NxL)
    states, mask = _torch_encoder_out(reference, setup["ids"], setup["mask"])
    reference.set_attn_implementation("eager")  # sdpa returns no attention weights (the same function otherwise)
    with torch.no_grad():
        out = reference(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask,
                        decoder_input_ids=torch.tensor(tokens, dtype=torch.long), output_attentions=True)
    per_layer = [a.double().reshape(*a.shape[:3], K, S).sum(-1).mean(1) for a in out.cross_attentions]
    expected_per_token = torch.stack(per_layer).mean(0).numpy()  # (N, L, K)
    np.testing.assert_allclose(decoded.token_posteriors_NxLxK, expected_per_token, atol=1e-5)
    np.testing.assert_allclose(np.asarray(decoded.answer_posteriors_NxK).sum(-1), 1.0, atol=1e-5)
    for n in range(B):
        targets = list(tokens[n, 1:])
        length = targets.index(cfg.eos_token_id) + 1 if cfg.eos_token_id in targets else len(targets)
        np.testing.assert_allclose(decoded.answer_posteriors_NxK[n], expected_per_token[n, :length].mean(0),
                                   atol=1e-5)


def test_run_configs_for_fid():
    """model.reader=fid needs host retrieval (its contexts start with the question, which on-device assembly cannot
    glue), and its contexts are FiD's strings of model.fid.passage_length tokens; paper_fid is FiD's recipe."""
    from experiments.configs import nq  # pylint: disable=g-import-not-at-top
    from rag_jax.runs import config_check  # pylint: disable=g-import-not-at-top

    config = nq.get_config("knowledge")
    config.model.reader = "fid"
    with pytest.raises(config_check.ConfigError, match="retrieval.mode=host"):
        config_check.check_config(config)
    config.model.fid.passage_length = 0
    with pytest.raises(config_check.ConfigError, match="model.fid.passage_length"):
        config_check.check_fields(config)
    config.model.fid.passage_length = 72
    fmt = registry.get("fid").context_format(contexts.ContextFormat(max_combined_length=80), config.model)
    assert (fmt.layout, fmt.max_combined_length) == ("fid", 72)
    assert registry.get("rag_sequence").context_format(fmt, config.model) == fmt
    paper = nq.get_config("paper_fid")
    assert (paper.model.reader, paper.model.n_docs, paper.model.fid.passage_length, paper.model.fid.remat) == (
        "fid", 100, 250, True)
    assert (paper.optim.learning_rate, paper.optim.warmup_steps, paper.train.steps, paper.optim.weight_decay,
            paper.optim.max_grad_norm, paper.train.global_batch_size) == (5e-5, 1000, 15_000, 0.01, 1.0, 64)
    assert paper.model.generator.architecture == "t5" and paper.retrieval.mode == "host"
    config_check.check_fields(paper)


# ------------------------------------------------------------------------------------- ADist (train.retriever_loss)


def _torch_cross_attention_values(reference, arch: str, states):
    """Each decoder layer's cross-attention values, split into heads (B, H, K*S, D), as the layer projects them."""
    if arch == "t5":
        modules = [block.layer[1].EncDecAttention for block in reference.decoder.block]
        projections = [(m.v, m.n_heads, m.key_value_proj_dim) for m in modules]
    else:
        modules = [layer.encoder_attn for layer in reference.model.decoder.layers]
        projections = [(m.v_proj, reference.config.decoder_attention_heads, m.head_dim) for m in modules]
    return [v(states).view(states.shape[0], -1, heads, dim).transpose(1, 2) for v, heads, dim in projections]


def _torch_atlas_adist_scores(reference, arch, states, mask_BxKS, decoder_input_ids, atlas_labels):
    """facebookresearch/atlas src/fid.py, rewritten: cross_attention_forward's normalized_score_storage (the value
    norms times the attention weights, mean over heads) per layer, then get_crossattention_scores' aggregate_value
    and its "sum" (gold_score_mode "evalnormsum", the paper's ADist), from one decoder pass (eval_score)."""
    out = reference(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask_BxKS,
                    decoder_input_ids=decoder_input_ids, output_attentions=True, use_cache=False)
    values = _torch_cross_attention_values(reference, arch, states)
    # Atlas takes the norm of value_states.float(): an upcast from its float16 (float64 here stays float64)
    norms = torch.stack([(torch.norm(v, dim=-1)[:, :, None] * a).mean(dim=1)
                         for v, a in zip(values, out.cross_attentions)])
    n_layers, bsz, n_tokens, _ = norms.size()
    scores = norms.view(n_layers, bsz, n_tokens, K, -1)
    mask = mask_BxKS.bool().view(bsz, K, -1)
    scores = scores.masked_fill(~mask[None, :, None], 0.0)
    ntokens_sum = 256 * n_layers * (~(atlas_labels == -100)).sum(dim=[1])[:, None]
    scores = scores.sum(dim=[0])
    scores = scores.masked_fill((atlas_labels == -100)[:, :, None, None], 0.0)
    return scores.sum(dim=[1, 3]) / ntokens_sum


def _torch_atlas_kldivloss(score, gold_score, temperature_gold, temperature_score):
    """src/atlas.py's kldivloss."""
    gold_score = torch.softmax(gold_score / temperature_gold, dim=-1)
    score = torch.nn.functional.log_softmax(score / temperature_score, dim=-1)
    return torch.nn.KLDivLoss()(score, gold_score)


ADIST_TEMPERATURE = 0.002  # Atlas's temperature_gold is 0.01 at its scale; these random decoders attend more evenly


def _adist_against_atlas(setup, float64: bool):
    """(relative errors of the scores, of the loss and of its gradient w.r.t. the doc scores; the scores)."""
    reference, model, params, labels = setup["reference"], setup["model"], setup["params"], setup["labels"]
    pad = model.generator_config.pad_token_id
    t_dtype, j_dtype = (torch.float64, jnp.float64) if float64 else (torch.float32, jnp.float32)
    reference = reference.to(t_dtype)
    reference.set_attn_implementation("eager")  # sdpa returns no attention weights (the same function otherwise)
    targets = _targets(labels, pad)
    atlas_labels = torch.tensor(np.where(targets == pad, -100, targets), dtype=torch.long)
    doc_scores = np.random.default_rng(5).normal(size=(B, K)) * 2.0
    with torch.no_grad():
        states, mask = _torch_encoder_out(reference, setup["ids"], setup["mask"])
        expected = _torch_atlas_adist_scores(reference, setup["arch"], states, mask,
                                             torch.tensor(labels, dtype=torch.long), atlas_labels)
    score = torch.tensor(doc_scores, dtype=t_dtype, requires_grad=True)
    expected_loss = _torch_atlas_kldivloss(score, expected, ADIST_TEMPERATURE, 1.0)
    expected_loss.backward()
    reference.to(torch.float32)

    generator = dataclasses.replace(model.generator_config, dtype=j_dtype, param_dtype=j_dtype)
    model = dataclasses.replace(model, generator_config=generator)
    params = jax.tree.map(lambda a: jnp.asarray(a, j_dtype), params)
    batch = {"context_input_ids": jnp.asarray(setup["ids"]).reshape(B, K, S),
             "context_attention_mask": jnp.asarray(setup["mask"]).reshape(B, K, S), "labels": jnp.asarray(labels)}
    got = jax.jit(functools.partial(registry.get("fid").passage_attention_scores, model))(params, batch)
    loss, grad = jax.value_and_grad(lambda s: retriever_losses.adist(s, got, temperature=ADIST_TEMPERATURE).mean())(
        jnp.asarray(doc_scores, j_dtype))
    assert got.dtype == j_dtype and float(jnp.abs(grad).max()) > 1e-3  # a gradient worth comparing
    errors = (hf_models.relative_error(got, expected.numpy()), hf_models.relative_error(loss, expected_loss.item()),
              hf_models.relative_error(grad, score.grad.numpy()))
    return errors, np.asarray(got)


# torch warns that KLDivLoss's default "mean" reduction divides by B*K: Atlas's behaviour, kept on purpose
@pytest.mark.filterwarnings("ignore:reduction:UserWarning")
def test_adist_scores_loss_and_gradient_equal_atlas_float32(setup):
    errors, scores = _adist_against_atlas(setup, float64=False)
    print(setup["arch"], "float32 relative errors (scores, loss, grad):", errors)
    assert max(errors) <= 1e-4, errors
    target = np.asarray(jax.nn.softmax(scores / ADIST_TEMPERATURE, axis=-1))
    assert (target.max(-1) - target.min(-1)).max() > 0.1  # a target that prefers some passage


@pytest.mark.filterwarnings("ignore:reduction:UserWarning")
def test_adist_scores_loss_and_gradient_equal_atlas_float64(setup):
    """BART: transformers runs it in float64 throughout (measured 1e-15). Its T5 softmaxes the attention and
    normalises the RMS in float32 whatever the dtype, which stops float64 agreement at ~2e-7 (measured): T5's
    cross-attention values, the one part of the path that differs, are checked in float32."""
    if setup["arch"] == "t5":
        pytest.skip("transformers' T5 computes its attention softmax and RMS norm in float32 (see the docstring)")
    with jax.enable_x64(True):
        errors, _ = _adist_against_atlas(setup, float64=True)
    print(setup["arch"], "float64 relative errors (scores, loss, grad):", errors)
    assert max(errors) <= 1e-9, errors
