"""The training step: sharded equals single-device, device retrieval equals host retrieval, gradient accumulation
equals one batch, on-device generator inputs equal the tokenizer's; start-up errors; NaN handling; configs."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import nq
from rag_jax import sharding
from rag_jax.data import tokenizers as tk
from rag_jax.retrieval import contexts, corpus
from rag_jax.runs import build, checkpoint, config_check
from rag_jax.training import loop, optim, trainer
from tests import train_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return train_task.write_bundled_task(str(tmp_path_factory.mktemp("task")), num_questions=32, num_distractors=32)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("run"))


def _mesh(data, model):
    return sharding.make_mesh(data, model, devices=jax.devices()[: data * model])


def _steps(config, workdir, mesh, steps=2):
    """(losses, final params, gold hits per step, initial params) of `steps` updates on `mesh`."""
    run = loop.setup(config, workdir, mesh)
    state = run.initial_state()
    initial = jax.device_get(state.params)
    pipeline = loop.make_pipeline(run)
    rng = jax.device_put(jax.random.PRNGKey(7), sharding.replicated(mesh))
    losses, hits = [], []
    for step in range(steps):
        with sharding.use(mesh):
            batch = run.batches(state.params, pipeline.batch_at(step))
            state, metrics = run.train_step(state, batch, rng, run.corpus)
        metrics = jax.device_get(metrics)
        losses.append(float(metrics["loss"]))
        hits.append(float(metrics["gold_hits"]))
    return np.array(losses), jax.device_get(state.params), hits, initial


# Dropout off: gradient accumulation draws other dropout masks than one big batch, so one reference serves all.
# Adam eps 1e-3: Adam's update moves by up to lr/eps times a change of the gradient, and the question encoder's gradient
# (posterior minus prior of saturated doc softmaxes: a difference of nearly equal numbers) carries relative rounding
# errors of ~1e-3 that any change of summation order produces. With eps 1e-8 that amplification (1e5) turns float32
# noise into percent-level update differences; with 1e-3 updates follow the gradients 1:1 and stay comparable.
EXACT = {"optim.warmup_steps": 0, "optim.eps": 1e-3, "model.question_encoder.dropout": 0.0,
         "model.generator.dropout": 0.0, "model.generator.attention_dropout": 0.0}
INIT_STD = 0.02  # parameters start at this scale; biases start at 0


def _assert_params_close(a, b, rtol=1e-5):
    """Equal within rtol of each array's scale (at least the initial weights' scale): float32 sums in another order."""
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        x, y = np.asarray(x), np.asarray(y)
        scale = max(np.abs(x).max(), INIT_STD)
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))


def _assert_same_steps(device, host):
    """Two _steps results agree: losses, gold hits per step, final parameters."""
    np.testing.assert_allclose(device[0], host[0], rtol=1e-5)
    assert device[2] == host[2]
    _assert_params_close(device[1], host[1])


@pytest.fixture(scope="module")
def reference(task, workdir):
    """Two updates on one device, host retrieval with contexts tokenised from strings as the reference does (what
    the sharded runs must reproduce; they glue theirs from the passage token table: retrieval.host_contexts)."""
    return _steps(train_task.tiny_config(task, **EXACT, **{"retrieval.host_contexts": "strings"}), workdir,
                  _mesh(1, 1))


def test_sharded_step_equals_single_device(task, workdir, reference, monkeypatch):
    """8 devices, host retrieval with the contexts glued from the passage token table (none tokenised as strings)."""
    monkeypatch.setattr(contexts, "generator_inputs", None)
    config = train_task.tiny_config(task, **EXACT, **{"retrieval.host_contexts": "table"})
    losses, params, hits, initial = _steps(config, workdir, _mesh(4, 2))
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    assert hits == reference[2]
    _assert_params_close(params, reference[1])
    _assert_params_close(initial, reference[3], rtol=0)
    # The updates really moved the parameters (a no-op step would pass the comparison trivially).
    moved = jax.tree_util.tree_map(lambda x, y: np.abs(np.asarray(x) - y).max(), initial, params)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4


def test_final_logits_bias_does_not_train(reference):
    """BART's final_logits_bias is a buffer in the reference (never updated), while the rest of BART trains."""
    _, params, _, initial = reference
    np.testing.assert_array_equal(params["generator"]["final_logits_bias"], initial["generator"]["final_logits_bias"])
    assert not np.array_equal(params["generator"]["shared"]["embedding"], initial["generator"]["shared"]["embedding"])


def test_device_retrieval_equals_host_retrieval(task, workdir, reference):
    """Exact MIPS inside the step over the corpus split on all 8 devices, generator inputs assembled on device."""
    config = train_task.tiny_config(task, **EXACT, **{"retrieval.mode": "device"})
    losses, params, hits, _ = _steps(config, workdir, _mesh(4, 2))
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    assert hits == reference[2]
    _assert_params_close(params, reference[1])


def test_gradient_accumulation_equals_one_batch(task, workdir, reference):
    config = train_task.tiny_config(task, **EXACT, **{"train.grad_accum_steps": 2})
    losses, params, _, _ = _steps(config, workdir, _mesh(2, 2))
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    _assert_params_close(params, reference[1])


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory):
    """A SentencePiece model trained on the bundled passages, saved as transformers' T5Tokenizer (no real T5
    tokenizer can be downloaded here)."""
    directory = str(tmp_path_factory.mktemp("t5tok"))
    tk.train_sentencepiece((p.title + " " + p.text for p in corpus.read_passages(train_task.MINI_PASSAGES)),
                           directory)  # fmt: skip
    return directory


@pytest.mark.slow
def test_t5_device_retrieval_equals_host_retrieval(task, tmp_path, t5_tokenizer_dir):
    """A tiny T5 run: two updates with retrieval and T5 context assembly inside the step, corpus split over 8
    devices, equal those of host retrieval on one device."""
    vocab = len(tk.load_generator_tokenizer(t5_tokenizer_dir))
    t5 = {**EXACT, "model.generator.architecture": "t5", "model.generator.vocab_size": vocab,
          "model.generator.d_kv": 16, "tokenizers.generator": t5_tokenizer_dir, "data.answer_prefix_space": False}
    host = _steps(train_task.tiny_config(task, **t5, **{"retrieval.host_contexts": "strings"}), str(tmp_path / "host"),
                  _mesh(1, 1))
    device = _steps(train_task.tiny_config(task, **t5, **{"retrieval.mode": "device"}), str(tmp_path / "device"),
                    _mesh(4, 2))
    _assert_same_steps(device, host)
    assert not np.allclose(host[1]["generator"]["shared"]["embedding"], host[3]["generator"]["shared"]["embedding"])


@pytest.mark.parametrize("generator, max_length, prefix", [
    ("bart", 300, ""), ("bart", 64, ""), ("t5", 300, "answer: "), ("t5", 64, ""),
])  # fmt: skip
def test_device_contexts_equal_tokenizer(generator, max_length, prefix, request):
    """On-device assembly of `[<s>] prefix title / text // question </s>` gives the generator tokenizer's ids (as
    host retrieval and transformers' RagRetriever make them) on every bundled passage: BART's `<s> ... </s>`, T5's
    `... </s>` with no BOS and pad 0; and so does the same assembly on the host from the passage token table."""
    toks = tk.load_rag_tokenizers()
    gtok = tk.load_generator_tokenizer(request.getfixturevalue("t5_tokenizer_dir")) if generator == "t5" else \
        toks.generator
    fmt = contexts.ContextFormat(max_combined_length=max_length, prefix=prefix)
    passages = list(corpus.read_passages(train_task.MINI_PASSAGES))
    width = contexts.table_width(fmt)
    rows_table = contexts.passage_table_rows(passages, gtok, fmt)
    lengths, table = rows_table[:, 0], rows_table[:, 1:]
    encoded = gtok([contexts.passage_part(p.title, p.text, fmt) for p in passages],
                   add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(lengths, [min(len(ids), width) for ids in encoded])
    examples = train_task.bundled_questions(8, start=100)
    q_ids = toks.question([e["question"] for e in examples], padding=True, return_tensors="np")["input_ids"]
    questions = contexts.decode_questions(q_ids, toks.question)
    rows = np.arange(len(passages) - len(passages) % 8).reshape(8, -1)  # every passage, once
    host_ids, host_mask = contexts.generator_inputs(questions, [[passages[r].title for r in rr] for rr in rows],
                                                   [[passages[r].text for r in rr] for rr in rows], gtok, fmt)
    q_tokens, q_lengths = contexts.question_tokens(questions, gtok, width)
    ids, mask = jax.jit(contexts.assemble_contexts, static_argnums=4, static_argnames=("bos", "eos", "pad"))(
        table[rows], lengths[rows], q_tokens, q_lengths, max_length, bos=gtok.bos_token_id, eos=gtok.eos_token_id,
        pad=gtok.pad_token_id)
    np.testing.assert_array_equal(np.asarray(ids).reshape(host_ids.shape), host_ids)
    np.testing.assert_array_equal(np.asarray(mask).reshape(host_mask.shape), host_mask)
    # The same gluing on the host (eval_nq's --contexts=table), BOS and EOS as the tokenizer wraps a text.
    glued_ids, glued_mask = contexts.table_generator_inputs(questions, rows, rows_table, gtok, fmt)
    np.testing.assert_array_equal(glued_ids, host_ids)
    np.testing.assert_array_equal(glued_mask, host_mask)
    content = max_length - 1 - (gtok.bos_token_id is not None)
    assert (lengths >= content).any() and (lengths < content).any()  # both truncated and whole passages covered
    assert (host_ids[:, 0] == gtok.bos_token_id).all() if generator == "bart" else (host_ids[:, 0] != 0).all()


def test_split_tokenization_check_passes_both_generators_and_names_a_joining_tokenizer(t5_tokenizer_dir):
    """The start-up check of device retrieval accepts BART's and T5's tokenizers on the bundled passages and the
    probe questions, and names the passage and question where a tokenizer merges across the join."""
    passages = list(corpus.read_passages(train_task.MINI_PASSAGES))[:64]
    titles, texts = [p.title for p in passages], [p.text for p in passages]
    fmt = contexts.ContextFormat(prefix="answer: ")
    for gtok in (tk.load_rag_tokenizers().generator, tk.load_generator_tokenizer(t5_tokenizer_dir)):
        contexts.check_split_tokenization(titles, texts, contexts.PROBE_QUESTIONS, gtok, fmt)

    class JoiningTokenizer:  # characters, with "/ " and " w" as one token each: merges across the space
        def __call__(self, strings, add_special_tokens=False):
            return {"input_ids": [[ord(c) for c in s.replace("/ w", "\x00w")] for s in strings]}

    with pytest.raises(contexts.SplitTokenizationError, match=f"passage {titles[0]!r} and question 'who"):
        contexts.check_split_tokenization(titles, texts, ["who is it"], JoiningTokenizer(), fmt)


# ---------------------------------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("flags, name, suggestion", [
    (["--config.train.stepz=3"], "stepz", "steps"),
    (["--config=experiments/configs/nq.py:tiny", "--config.modl.n_docs=3"], "modl", "model"),
])
def test_unknown_config_field_fails_naming_it(tmp_path, flags, name, suggestion):
    result = subprocess.run([sys.executable, "-m", "experiments.train_nq", *flags, f"--workdir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"unknown config field: {name}" in result.stderr and suggestion in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("overrides, expected", [
    ({"task.train_file": None, "data.data_dir": "/nonexistent/tfds"}, "data.data_dir"),
    ({"data.passages": "/nonexistent/passages.tsv"}, "data.passages"),
    ({"model.generator.vocab_size": 50000}, "tokenizers.generator"),
    ({"model.question_encoder.vocab_size": 30000}, "model.question_encoder.vocab_size"),
    ({"train.global_batch_size": 12}, "train.global_batch_size"),
    ({"model.loss": "tokens"}, "model.loss"),
])
def test_startup_errors_name_the_field(task, tmp_path, overrides, expected):
    config = train_task.tiny_config(task, **overrides)
    with pytest.raises(build.ConfigError, match=expected.replace(".", r"\.")) as error:
        loop.setup(config, str(tmp_path), _mesh(8, 1))
    if expected == "train.global_batch_size":
        assert "data axis" in str(error.value) and "mesh.data" in str(error.value)
    if "vocab" in expected or "tokenizers" in expected:
        assert "vocabulary size mismatch" in str(error.value)


def test_paper_config_needs_its_paths():
    config = nq.get_config("paper")
    config.data.passages = train_task.MINI_PASSAGES
    with pytest.raises(build.ConfigError, match=r"data\.manual_dir"):
        build.check_config(config)
    assert config.optim.learning_rate == 3e-5 and config.model.n_docs == 10
    assert config.train.global_batch_size == 64 and config.model.label_smoothing == 0.1


def _leaf_fields(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize("variant", nq.VARIANTS)
def test_every_config_field_has_a_rule_and_the_variants_pass_them(variant):
    """Each field of each variant is checked for type and range at start-up (config_check.RULES), and the presets
    themselves pass."""
    config = nq.get_config(variant)
    unchecked = {"variant", "eval.recall_ks"}  # informational; checked on its own (a tuple)
    missing = [f for f in _leaf_fields(config.to_dict()) if f not in config_check.RULES and f not in unchecked]
    assert not missing, f"add a rule for each to rag_jax/runs/config_check.py RULES: {missing}"
    config_check.check_fields(config)


@pytest.mark.parametrize("field, value, expected", [
    ("optim.learning_rate", -0.001, "must be a number > 0"),
    ("optim.eps", 0.0, "> 0"),
    ("optim.warmup_steps", -1, ">= 0"),
    ("train.steps", 2.5, "must be an integer, got float"),
    ("train.global_batch_size", True, "must be an integer, got bool"),
    ("model.generator.dropout", 1.0, "< 1.0"),
    ("model.question_encoder.pooling", "max", "choose one of"),
    ("data.answer_prefix_space", "yes", "true or false"),
    ("optim.max_grad_norm", float("nan"), "finite"),
    ("eval.max_length", 1, ">= 2"),
])
def test_impossible_config_values_name_the_field(task, field, value, expected):
    config = train_task.tiny_config(task)
    with config.unlocked(), config.ignore_type():
        node = config
        *path, last = field.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    with pytest.raises(build.ConfigError, match=f"config {field.replace('.', '[.]')}=") as error:
        build.check_config(config)
    assert expected in str(error.value) and f"--config.{field}=" in str(error.value)


def test_a_question_without_answers_is_refused_at_start_up(task, tmp_path):
    """Labels need a gold answer: found when the file is read, naming its line, not in the middle of training."""
    bad = train_task.write_questions(str(tmp_path / "train.jsonl"), [{"question": "q1", "answers": ["a"]},
                                                                     {"question": "q2", "answers": []}])
    config = train_task.tiny_config(task, **{"task.train_file": bad})
    with pytest.raises(build.ConfigError, match=r"config task\.train_file: .*train\.jsonl:2: .*non-empty list"):
        build.data_source(config, "train")


@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(task, tmp_path, monkeypatch):
    """Updates turn NaN from the third one on: the run stops at step 3 and checkpoint 2 stays the latest."""
    original = optim.make_optimizer

    def poisoned(config):
        base = original(config)

        def init(params):
            return base.init(params), jnp.zeros((), jnp.int32)

        def update(grads, state, params=None):
            inner, count = state
            updates, inner = base.update(grads, inner, params)
            factor = jnp.where(count >= 2, jnp.nan, 1.0)
            return jax.tree_util.tree_map(lambda u: u * factor, updates), (inner, count + 1)

        return optax.GradientTransformation(init, update)

    monkeypatch.setattr(optim, "make_optimizer", poisoned)
    config = train_task.tiny_config(task, **{"train.steps": 6, "train.checkpoint_every": 1, "train.log_every": 1})
    with pytest.raises(trainer.NonFiniteLossError, match="step 3") as error:
        loop.train_and_evaluate(config, str(tmp_path), mesh=_mesh(2, 1))
    assert "checkpoints/2" in str(error.value)
    assert checkpoint.Checkpointer(str(tmp_path), read_only=True).latest_step() == 2


@pytest.mark.slow
def test_pretrained_weights_start_sharded(task, tmp_path):
    """Hugging Face DPR encoders and BART as the starting point: the state holds exactly their weights, laid out by
    the rules (attention heads split over `model`; BART's 50,265-row vocabulary does not split 2 ways: replicated)."""
    from rag_jax.models import hf  # pylint: disable=g-import-not-at-top
    from tests import hf_models  # pylint: disable=g-import-not-at-top (torch)

    paths = {name: str(tmp_path / name) for name in ("question", "context", "bart")}
    hf_models.dpr_question_encoder(seed=1, vocab_size=30522).save_pretrained(paths["question"])
    hf_models.dpr_context_encoder(seed=2, vocab_size=30522).save_pretrained(paths["context"])
    hf_models.bart_model(seed=3, vocab_size=50265).save_pretrained(paths["bart"])
    config = train_task.tiny_config(task, **{"model.question_encoder.init": paths["question"],
                                             "model.doc_encoder.init": paths["context"],
                                             "model.generator.init": paths["bart"], "index.max_length": 40})
    mesh = _mesh(2, 2)
    run = loop.setup(config, str(tmp_path / "run"), mesh)
    state = run.initial_state()
    loaded = {"question_encoder": hf.load_encoder(paths["question"], pooling="cls").params,
              "generator": hf.load_bart(paths["bart"]).params}
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(x), y, err_msg=jax.tree_util.keystr(path))
    g = state.params["generator"]
    assert g["shared"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(None, None)
    heads = jax.sharding.PartitionSpec(None, "model", None)  # (embed, heads, kv): 4 heads over 2 devices
    assert g["encoder_layer_0"]["self_attn"]["query"]["kernel"].sharding.spec == heads
    with sharding.use(mesh):
        batch = run.batches(state.params, loop.make_pipeline(run).batch_at(0))
        _, metrics = run.train_step(state, batch, jax.device_put(jax.random.PRNGKey(0), sharding.replicated(mesh)),
                                    run.corpus)
    assert np.isfinite(float(metrics["loss"]))



def _sentence_transformers_dir(which: str, directory: str) -> str:
    from rag_jax.models import hf  # pylint: disable=g-import-not-at-top
    from tests import hf_models  # pylint: disable=g-import-not-at-top (torch)

    if which == "minilm":
        try:
            return hf.pretrained_retriever_dir()
        except hf.CheckpointError as e:
            pytest.skip(f"all-MiniLM-L6-v2 is not installed ({e})")
    hf_models.save_sentence_transformer(hf_models.bert_model(seed=9, vocab_size=30522, max_position_embeddings=64),
                                        directory, pooling="mean", normalize=True)  # fmt: skip
    tk.load_question_tokenizer().save_pretrained(directory)
    return directory



def test_sentence_transformers_encoders_from_the_config_index_unit_vectors(task, tmp_path):
    """A sentence-transformers directory as both encoders (pooling "auto" and normalize unset: mean pooling and L2
    normalisation from its modules.json) and as the question tokenizer; explicit config values win."""
    encoder = _sentence_transformers_dir("small", str(tmp_path / "encoder"))
    config = train_task.tiny_config(task, **{"model.question_encoder.init": encoder, "model.doc_encoder.init": encoder,
                                             "tokenizers.question": encoder, "index.max_length": 64})
    assert config.model.doc_encoder.pooling == "auto" and config.model.doc_encoder.normalize is None
    build.check_config(config)
    q_config = build.build_rag(config).rag.question_encoder_config
    d_config, d_params = build.doc_encoder(config)
    assert (q_config.pooling, q_config.normalize) == (d_config.pooling, d_config.normalize) == ("mean", True)
    question_tokenizer = build.load_tokenizers(config).question
    index = build.ensure_index(config, str(tmp_path / "run"), d_config, d_params, question_tokenizer, progress=False)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings(), axis=-1), 1.0, rtol=1e-5)

    config.model.doc_encoder.pooling, config.model.doc_encoder.normalize = "cls", False
    assert build.doc_encoder(config)[0].pooling == "cls" and not build.doc_encoder(config)[0].normalize
    config.model.question_encoder.init = "random"  # "auto" is [CLS] for random init
    assert build.build_rag(config).rag.question_encoder_config.pooling == "cls"
    config.model.question_encoder.pooling = "max"
    with pytest.raises(build.ConfigError, match=r"model\.question_encoder\.pooling='max'"):
        build.check_config(config)


@pytest.mark.slow
def test_minilm_encoders_from_the_config_index_and_train(task, tmp_path):
    """The real all-MiniLM-L6-v2 as both encoders and the question tokenizer: the run builds its index of unit
    vectors and takes training steps (its 6-layer step takes 30-60 s to compile on 2 CPU cores)."""
    encoder = _sentence_transformers_dir("minilm", str(tmp_path / "encoder"))
    config = train_task.tiny_config(task, **{"model.question_encoder.init": encoder, "model.doc_encoder.init": encoder,
                                             "tokenizers.question": encoder, "index.max_length": 64})
    run = loop.setup(config, str(tmp_path / "run"), _mesh(1, 1))
    q_config = run.model.question_encoder_config
    assert (q_config.pooling, q_config.normalize, q_config.hidden_size, q_config.num_layers) == ("mean", True, 384, 6)
    np.testing.assert_allclose(np.linalg.norm(run.index.embeddings(), axis=-1), 1.0, rtol=1e-5)
    state = run.initial_state()
    pipeline = loop.make_pipeline(run)
    rng = jax.device_put(jax.random.PRNGKey(0), sharding.replicated(run.mesh))
    losses = []
    for step in range(2):
        with sharding.use(run.mesh):
            state, metrics = run.train_step(state, run.batches(state.params, pipeline.batch_at(step)), rng, run.corpus)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and int(state.step) == 2


@pytest.mark.slow
def test_retrieval_loss_weight_adds_the_contrastive_loss_over_retrieved_passages(task, workdir):
    """train.retrieval_loss_weight w: the step's loss is the RAG NLL (the w=0 step's) plus w times the gold
    passage's NLL among the K retrieved ones."""
    from rag_jax import rag
    from rag_jax.training import contrastive

    mesh = _mesh(1, 1)
    rng = jax.device_put(jax.random.PRNGKey(7), sharding.replicated(mesh))
    losses = {}
    for weight in (0.0, 0.5):
        # K=16 of the 64 passages: with random encoders some gold passages are among them, so the term is not vacuous.
        config = train_task.tiny_config(task, **EXACT, **{"train.retrieval_loss_weight": weight, "model.n_docs": 16})
        run = loop.setup(config, workdir, mesh)
        state = run.initial_state()
        batch = run.batches(state.params, loop.make_pipeline(run).batch_at(0))
        q = run.model.encode_questions(state.params, batch["question_input_ids"], batch["question_attention_mask"])
        extra = float(contrastive.retrieved_nll(rag.doc_scores(q, batch["doc_embeds"]), batch["doc_rows"],
                                                batch["gold_row"]))
        _, metrics = run.train_step(state, batch, rng, run.corpus)
        losses[weight] = float(metrics["loss"])
    assert extra > 0.01, extra
    np.testing.assert_allclose(losses[0.5], losses[0.0] + 0.5 * extra, rtol=1e-5)
