"""End-to-end RAG (model.doc_encoder.trainable): the loss and every parameter's gradient of question encoder, document
encoder and generator equal transformers' RAG in context-encoder training mode (`set_context_encoder_for_training`,
its retriever returning the passages' context-encoder tokens) on the same weights, passages and questions; the
step's re-embedded doc scores equal the index's while d(z) is unchanged; reranking keeps exactly the K best of L.

transformers' RagModel.forward, in that mode, embeds `tokenized_doc_ids` / `tokenized_doc_attention_mask` with the
context encoder and takes q(x)·d(z) with gradients to both. Its retriever is replaced here by a fixed answer (the
same passages for both implementations), so the comparison covers everything after the search. transformers passes
the context encoder no token type ids (all 0); rag_jax carries build_index's (1 on the text of the title/text pair),
so that a re-embedded passage gets the index's vector. The reference is fed zeros here, as transformers uses.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rag_jax import rag, sharding
from rag_jax.models import hf
from rag_jax.readers import rag_sequence, rag_token
from rag_jax.runs import build, encoder_training
from rag_jax.training import loop, optim, step
from tests import hf_models, train_task
from tests.test_rag_gradients import BATCH, N_DOCS, TOLERANCE, ZERO, _KEY_BIAS, _batch, checkpoint  # noqa: F401

CTX_PREFIX = "rag.ctx_encoder.ctx_encoder.bert_model."  # where set_context_encoder_for_training puts it
# The document encoder's last LayerNorm bias shifts all K passage vectors of a question by the same vector, which
# adds q·b to each of its K doc scores: the doc softmax does not change, so its exact gradient is 0 (like key biases).
_SHIFT_BIAS = re.compile(re.escape(CTX_PREFIX) + r"encoder\.layer\.1\.output\.LayerNorm\.bias$")
DOC_LENGTH = 11


@pytest.fixture(scope="module")
def ctx_encoder_dir(tmp_path_factory):
    """A random DPR context encoder with LayerNorm weights near 1 (as the RAG checkpoint's, test_rag_gradients)."""
    directory = tmp_path_factory.mktemp("ctx")
    model = hf_models.layer_norms_near_one(hf_models.dpr_context_encoder(seed=21), 22, r"LayerNorm\.weight$")
    model.save_pretrained(directory)
    return str(directory)


def _doc_tokens(seed=5):
    """The retrieved passages' context-encoder tokens (B*K, L): [CLS]-led, right-padded, varied lengths."""
    ids, mask = hf_models.padded_ids(np.random.default_rng(seed), BATCH * N_DOCS, DOC_LENGTH, vocab=97, pad=0,
                                     first=2)
    return ids, mask


class _FixedRetriever:
    """transformers' RagRetriever interface, answering with fixed passages (what RagRetriever returns after
    `set_ctx_encoder_tokenizer`)."""

    def __init__(self, ctx_ids, ctx_mask, doc_ids, doc_mask):
        self.out = dict(context_input_ids=ctx_ids, context_attention_mask=ctx_mask,
                        retrieved_doc_embeds=torch.zeros(BATCH, N_DOCS, 36), doc_ids=torch.zeros(BATCH, N_DOCS),
                        tokenized_doc_ids=doc_ids, tokenized_doc_attention_mask=doc_mask)

    def __call__(self, question_input_ids, question_hidden_states, prefix=None, n_docs=None, return_tensors=None):
        assert n_docs == N_DOCS and question_hidden_states.shape == (BATCH, 36)
        return transformers.BatchEncoding(self.out)


def _reference(directory, ctx_dir, loss, epsilon, batch, docs):
    """(loss, {name: gradient}) of transformers' RAG in context-encoder training mode."""
    config = transformers.RagConfig.from_pretrained(directory)
    config.label_smoothing = epsilon
    cls = transformers.RagSequenceForGeneration if loss == "sequence" else transformers.RagTokenForGeneration
    model = cls.from_pretrained(directory, config=config).eval()
    q_ids, q_mask, ctx_ids, ctx_mask, labels, _ = map(torch.as_tensor, batch)
    model.set_retriever(_FixedRetriever(ctx_ids, ctx_mask, *map(torch.as_tensor, docs)))
    model.set_context_encoder_for_training(transformers.DPRContextEncoder.from_pretrained(ctx_dir).eval())
    out = model(input_ids=q_ids, attention_mask=q_mask, labels=labels, n_docs=N_DOCS)
    out.loss.sum().backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
    return float(out.loss.sum().detach()), grads


def _ours(directory, ctx_dir, loss, epsilon, batch, docs):
    """(loss, {transformers name: gradient}) of rag_jax's end-to-end loss (the step's doc scores)."""
    q_ids, q_mask, ctx_ids, ctx_mask, labels, _ = batch
    loaded, ctx = hf.load_rag(directory), hf.load_encoder(ctx_dir)
    model = rag.Rag(loaded.question_encoder.config, loaded.generator.config, rag.RagConfig.from_hf(loaded.hf_config),
                    doc_encoder_config=ctx.config)
    params = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params,
              "doc_encoder": ctx.params}
    doc_ids, doc_mask = docs
    doc_tokens = {"doc_input_ids": doc_ids.reshape(BATCH, N_DOCS, -1),
                  "doc_attention_mask": doc_mask.reshape(BATCH, N_DOCS, -1),
                  "doc_token_type_ids": np.zeros((BATCH, N_DOCS, DOC_LENGTH), np.int64)}  # as transformers
    nll = rag_sequence.nll if loss == "sequence" else rag_token.nll

    def total(params):
        scores = model.trained_doc_scores(params, model.encode_questions(params, q_ids, q_mask), doc_tokens)
        logits = model.generator_logits(params, ctx_ids, ctx_mask, labels)
        return nll(logits, scores, labels, pad_token_id=1, epsilon=epsilon).sum()

    value, grads = jax.jit(jax.value_and_grad(total))(params)
    return float(value), {
        **hf.export_tensors(grads["question_encoder"], hf.bert_table(model.question_encoder_config),
                            hf.RAG_QUESTION_ENCODER_PREFIX + "bert_model."),
        **hf.export_tensors(grads["doc_encoder"], hf.bert_table(model.doc_encoder_config), CTX_PREFIX),
        **hf.export_tensors(grads["generator"], hf.bart_table(model.generator_config), hf.RAG_GENERATOR_PREFIX),
    }  # fmt: skip


def _group(name: str) -> str:
    return ("document encoder" if name.startswith(CTX_PREFIX) else
            "question encoder" if "question_encoder" in name else "generator")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("loss", ["sequence", "token"])
def test_end_to_end_gradients_match_transformers_context_encoder_training(checkpoint,  # noqa: F811 (the fixture)
                                                                          ctx_encoder_dir, loss, epsilon):
    batch, docs = _batch(), _doc_tokens()
    ref_loss, reference = _reference(checkpoint, ctx_encoder_dir, loss, epsilon, batch, docs)
    our_loss, ours = _ours(checkpoint, ctx_encoder_dir, loss, epsilon, batch, docs)
    assert abs(our_loss - ref_loss) <= TOLERANCE * abs(ref_loss), (our_loss, ref_loss)
    assert set(ours) - set(reference) == {hf.RAG_GENERATOR_PREFIX + "final_logits_bias"}  # a buffer there
    assert set(reference) <= set(ours)
    assert any(name.startswith(CTX_PREFIX) for name in reference)  # the document encoder is trained there too

    largest = max(np.linalg.norm(g) for g in reference.values())
    worst: dict[str, float] = {}
    failures = []
    for name, expected in reference.items():
        actual, expected = np.asarray(ours[name], np.float64), np.asarray(expected, np.float64)
        if _KEY_BIAS.search(name) or _SHIFT_BIAS.search(name):
            assert np.linalg.norm(actual) <= ZERO * largest, name
            assert np.linalg.norm(expected) <= ZERO * largest, name  # the exact gradient is 0
            continue
        error = np.linalg.norm(actual - expected) / np.linalg.norm(expected)
        worst[_group(name)] = max(worst.get(_group(name), 0.0), error)
        if error > TOLERANCE:
            failures.append(f"{name}: relative error {error:.2e} (|g| {np.linalg.norm(expected):.2e})")
    assert not failures, "\n".join(failures)
    print(f"\n{loss} loss, label smoothing {epsilon}: loss {our_loss:.6f} vs {ref_loss:.6f}; worst relative "
          "gradient error: " + ", ".join(f"{g} {e:.1e}" for g, e in sorted(worst.items())))


# ------------------------------------------------------------------------------------------------ in a run

L_CANDIDATES = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny end-to-end run reranking L=6 candidates down to K=3, on a 2x2 mesh; its first host batch."""
    task = train_task.write_bundled_task(str(tmp_path_factory.mktemp("task")), num_questions=16, num_distractors=32)
    config = train_task.tiny_config(task, **{"model.doc_encoder.trainable": True,
                                             "retrieval.rerank_candidates": L_CANDIDATES})
    mesh = sharding.make_mesh(2, 2, devices=jax.devices()[:4])
    run = loop.setup(config, str(tmp_path_factory.mktemp("run")), mesh)
    state = run.initial_state()
    with sharding.use(mesh):
        batch = run.batches(state.params, loop.make_pipeline(run).batch_at(0))
    return run, jax.device_get(state.params), jax.device_get(batch)


def _scores(model, params, batch):
    """q(x)·d(z) of every passage of the batch with the encoders of `params`, no dropout: numpy (B, L)."""
    q = model.encode_questions(params, batch["question_input_ids"], batch["question_attention_mask"])
    return np.asarray(jax.jit(model.trained_doc_scores)(params, q, batch))


def test_reembedded_passages_score_as_the_index_while_the_doc_encoder_is_unchanged(run):
    """The doc-encoder tokens that travel with the retrieved passages are build_index's: embedded again by the
    initial d(z) they give the index's vectors, hence its scores and its order."""
    run, params, batch = run
    assert batch["doc_input_ids"].shape[:2] == (run.config.train.global_batch_size, L_CANDIDATES)
    q = run.model.encode_questions(params, batch["question_input_ids"], batch["question_attention_mask"])
    index_scores = np.asarray(rag.doc_scores(q, batch["doc_embeds"]))
    np.testing.assert_allclose(_scores(run.model, params, batch), index_scores, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(index_scores, axis=1) <= 1e-5)  # the index's best first


def test_rerank_keeps_exactly_the_top_k_by_the_current_encoders(run):
    run, params, batch = run
    rng = np.random.default_rng(0)
    moved = jax.tree_util.tree_map(lambda x: x + 0.3 * np.std(x) * rng.standard_normal(x.shape).astype(x.dtype),
                                   params["doc_encoder"])  # a d(z) that has drifted from the index's
    params = {**params, "doc_encoder": moved}
    k = run.config.model.n_docs
    kept = jax.device_get(jax.jit(step.rerank, static_argnums=(0, 3))(run.model, params, batch, k))
    scores = _scores(run.model, params, batch)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(kept["doc_rows"], np.take_along_axis(batch["doc_rows"], best, axis=1))
    for key in step.RERANKED_KEYS:  # every per-passage array follows the same choice
        index = best.reshape(best.shape + (1,) * (batch[key].ndim - 2))
        np.testing.assert_array_equal(kept[key], np.take_along_axis(batch[key], index, axis=1), err_msg=key)
    np.testing.assert_allclose(_scores(run.model, params, kept), np.take_along_axis(scores, best, axis=1), rtol=1e-5)
    # Not the index's own top K: the drifted encoder brought candidates from below K up.
    assert np.any(best.max(axis=1) >= k)


@pytest.mark.parametrize("question_scale", [1.0, 0.0])  # 0: a frozen q(x) (its own optax branch)
def test_one_step_trains_the_doc_encoder_with_its_learning_rate_scale(question_scale):
    """Adam with model.doc_encoder.lr_scale s: the document encoder's update is s times the unscaled one, the other
    parts' are unchanged."""
    config = train_task.tiny_config({"questions": "q", "passages": "p"}, **{
        "model.doc_encoder.trainable": True, "optim.question_encoder_lr_scale": question_scale})
    params = {part: {"w": jnp.ones((3,)) * i} for i, part in enumerate(("question_encoder", "generator",
                                                                        "doc_encoder"), 1)}
    grads = jax.tree_util.tree_map(lambda x: x * 0.1 + 0.05, params)

    def update(scale):
        config.model.doc_encoder.lr_scale = scale
        tx = optim.make_optimizer(config)
        state = tx.init(params)
        for _ in range(2):  # past warm-up's 0 at step 0
            updates, state = tx.update(grads, state, params)
        return updates

    full, scaled = update(1.0), update(0.25)
    np.testing.assert_allclose(scaled["doc_encoder"]["w"], 0.25 * full["doc_encoder"]["w"], rtol=1e-6)
    assert np.abs(full["doc_encoder"]["w"]).min() > 0
    for part in ("question_encoder", "generator"):
        np.testing.assert_array_equal(scaled[part]["w"], full[part]["w"])


def test_the_paper_recipe_keeps_its_state_without_a_doc_encoder():
    """Default model.doc_encoder.trainable=False: the train state (and its checkpoints) hold q(x) and the generator
    only, as before the field existed; true adds params["doc_encoder"] with the document encoder's shapes."""
    config = train_task.tiny_config({"questions": "q", "passages": "p"})
    assert config.model.doc_encoder.trainable is False
    frozen = build.build_rag(config, load_weights=False).rag
    assert set(rag.abstract_params(frozen)) == {"question_encoder", "generator"}
    config.model.doc_encoder.trainable = True
    models = build.build_rag(config)
    trained = rag.abstract_params(models.rag)
    assert set(trained) == {"question_encoder", "generator", "doc_encoder"}
    _, doc_params = build.doc_encoder(config)
    assert jax.tree_util.tree_structure(trained["doc_encoder"]) == jax.tree_util.tree_structure(doc_params)
    assert jax.tree_util.tree_structure(models.pretrained["doc_encoder"]) == jax.tree_util.tree_structure(doc_params)


@pytest.mark.parametrize("overrides, expected", [
    ({"model.doc_encoder.trainable": "yes"}, r"config model\.doc_encoder\.trainable='yes': must be true or false"),
    ({"model.doc_encoder.trainable": True, "model.doc_encoder.lr_scale": 0.0},
     r"config model\.doc_encoder\.lr_scale=0\.0: must be a number > 0"),
    ({"retrieval.rerank_candidates": -1}, r"config retrieval\.rerank_candidates=-1: must be an integer >= 0"),
    ({"retrieval.rerank_candidates": 5}, r"rerank_candidates=5 .*trainable=False.*--config"),
    ({"model.doc_encoder.trainable": True, "model.n_docs": 3, "retrieval.rerank_candidates": 2},
     r"rerank_candidates=2 is below model\.n_docs=3"),
    # issue 32: a trained d(z) re-embeds the corpus, which a frozen q(x) cannot follow (random q(x): a scale of 1)
    ({"model.doc_encoder.trainable": True, "optim.question_encoder_lr_scale": 0.0, "index.refresh_every": "0-4:0,4-:2"},
     r"doc_encoder\.trainable=True with index\.refresh_every='0-4:0,4-:2' .*frozen q\(x\) \(optim\."
     r"question_encoder_lr_scale=0\).*--config\.optim\.question_encoder_lr_scale=1: a learning rate of 1e-03\), or "
     r"set --config\.index\.refresh_every=0 or --config\.model\.doc_encoder\.trainable=False$"),
])
def test_end_to_end_config_errors_name_the_field(tmp_path, overrides, expected):
    task = train_task.write_bundled_task(str(tmp_path), num_questions=4, num_distractors=4)
    config = train_task.tiny_config(task)
    with config.unlocked(), config.ignore_type():
        for key, value in overrides.items():
            node = config
            *path, last = key.split(".")
            for part in path:
                node = node[part]
            node[last] = value
    with pytest.raises(build.ConfigError, match=expected) as error:
        build.check_config(config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("fields", [
    {"model.doc_encoder.trainable": True, "optim.question_encoder_lr_scale": 0.0},  # no refresh: the first index
    {"optim.question_encoder_lr_scale": 0.0, "index.refresh_every": "2"},  # d(z) frozen: refreshes rebuild it
    {"model.doc_encoder.trainable": True, "index.refresh_every": "2"},  # q(x) trained (None: 1x, random init)
    {"model.doc_encoder.trainable": True, "optim.question_encoder_lr_scale": 0.0, "index.refresh_every": "0-:0"},
])  # (the last: a schedule that never refreshes)
def test_frozen_question_encoder_is_refused_only_beside_a_trained_refreshed_index(tmp_path, fields):
    task = train_task.write_bundled_task(str(tmp_path), num_questions=4, num_distractors=4)
    build.check_config(train_task.tiny_config(task, **fields))


@pytest.mark.parametrize("init, learning_rate, expected", [
    ("pretrained", 1e-3, 0.03), ("pretrained", 3e-5, 1.0), ("pretrained", 1e-5, 1.0), ("random", 1e-3, 1.0)])
def test_unset_learning_rate_scales_fine_tune_pretrained_encoders(init, learning_rate, expected):
    """None (the default) scales a pretrained encoder to encoder_training.FINE_TUNING_LEARNING_RATE (3e-5), never above
    optim.learning_rate; a random one trains at optim.learning_rate. An explicit scale is kept."""
    config = train_task.tiny_config({"questions": "q", "passages": "p"}, **{
        "model.doc_encoder.trainable": True, "optim.learning_rate": learning_rate})
    if init == "pretrained":
        config.model.doc_encoder.init = config.model.question_encoder.init = "/some/checkpoint"
    assert encoder_training.FINE_TUNING_LEARNING_RATE == 3e-5
    assert config.optim.question_encoder_lr_scale is None and config.model.doc_encoder.lr_scale is None
    assert optim.doc_encoder_lr_scale(config) == pytest.approx(expected)
    assert encoder_training.question_encoder_lr_scale(config) == pytest.approx(expected)
    config.model.question_encoder.init = "doc_encoder"  # a copy of d(z): pretrained when d(z) is
    assert encoder_training.question_encoder_lr_scale(config) == pytest.approx(expected)
    config.model.doc_encoder.lr_scale, config.optim.question_encoder_lr_scale = 0.5, 0.0
    assert optim.doc_encoder_lr_scale(config) == 0.5 and optim.freezes_question_encoder(config)


@pytest.mark.slow
def test_device_retrieval_equals_host_retrieval_end_to_end(tmp_path):
    """The document-encoder tokens kept on the devices beside the embeddings (device mode) give the steps that the
    tokens travelling with host retrieval give: the same losses and parameters, reranking L=4 to K=2 included."""
    from tests.test_train import EXACT, _assert_same_steps, _mesh, _steps

    task = train_task.write_bundled_task(str(tmp_path / "task"), num_questions=16, num_distractors=16)
    fields = {**EXACT, "model.doc_encoder.dropout": 0.0, "model.doc_encoder.trainable": True,
              "retrieval.rerank_candidates": 4}
    host = _steps(train_task.tiny_config(task, **fields), str(tmp_path / "host"), _mesh(2, 1))
    device = _steps(train_task.tiny_config(task, **fields, **{"retrieval.mode": "device"}), str(tmp_path / "device"),
                    _mesh(4, 2))
    _assert_same_steps(device, host)
    moved = jax.tree_util.tree_map(lambda x, y: np.abs(np.asarray(x) - y).max(), host[3]["doc_encoder"],
                                   host[1]["doc_encoder"])
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-5  # d(z) trained (Adam eps 1e-3 keeps its first steps small)
