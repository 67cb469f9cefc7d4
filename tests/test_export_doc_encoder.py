"""The Hugging Face export of a run's document encoder (experiments.export, export.CTX_ENCODER_SUBDIR): transformers'
DPRContextEncoder, loaded from <export>/ctx_encoder with its tokenizer, embeds the passages into the index that
build_index (or a refresh) makes with the checkpoint's document encoder; eval_nq on an end-to-end workdir searches
its latest index version, and on the export accepts an index rebuilt with the exported encoder."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from experiments import model_loading
from rag_jax import rag, sharding
from rag_jax.data import tokenizers
from rag_jax.inference import export, model_dir
from rag_jax.models import bert, hf
from rag_jax.retrieval import corpus, embed, index_io
from rag_jax.runs import trained_model, workdir as workdir_lib
from tests import hf_models, process_env, train_task

REFRESH_STEP = 2  # the run refreshes its index after step 2 and ends at step 3: its last version is older than d(z)


def _export(workdir: str, output: str) -> subprocess.CompletedProcess:
    env = process_env.command_env()
    done = subprocess.run([sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--output={output}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    """A tiny end-to-end run (model.doc_encoder.trainable) of 3 steps with a refresh after step 2, exported."""
    from rag_jax.training import loop

    tmp = tmp_path_factory.mktemp("e2e_export")
    task = train_task.write_bundled_task(str(tmp / "task"), num_questions=8, num_distractors=8)
    config = train_task.tiny_config(task, **{
        "model.doc_encoder.trainable": True, "index.refresh_every": str(REFRESH_STEP), "train.steps": 3,
        "train.checkpoint_every": 3, "train.async_checkpoints": False, "optim.learning_rate": 1e-2,
        "optim.warmup_steps": 0})  # a large step, so that d(z) moves clearly from its initial weights
    workdir = str(tmp / "run")
    # One device: the export, not the sharding, is under test, and one device's step compiles fastest.
    loop.train_and_evaluate(config, workdir, mesh=sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
    done = _export(workdir, str(tmp / "hf"))
    return {"workdir": workdir, "hf": str(tmp / "hf"), "task": task, "config": config, "stdout": done.stdout}


def transformers_embeddings(ctx_dir: str, passages_path: str, max_length: int) -> np.ndarray:
    """pooler_output of DPRContextEncoder over (title, text) pairs tokenised as build_index does."""
    encoder = transformers.DPRContextEncoder.from_pretrained(ctx_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ctx_dir)
    passages = list(corpus.read_passages(passages_path))
    batch = tokenizer([p.title for p in passages], [p.text for p in passages], truncation="longest_first",
                      max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        return encoder(**batch).pooler_output.numpy()


@pytest.mark.slow
def test_trained_doc_encoder_exports_as_a_dpr_context_encoder_that_rebuilds_the_index(e2e_run, tmp_path):
    workdir, out, config = e2e_run["workdir"], e2e_run["hf"], e2e_run["config"]
    ctx_dir = os.path.join(out, export.CTX_ENCODER_SUBDIR)
    assert f"document encoder in {export.CTX_ENCODER_SUBDIR}/" in e2e_run["stdout"]
    with open(os.path.join(ctx_dir, "config.json")) as f:
        assert json.load(f)["architectures"] == ["DPRContextEncoder"]

    trained = trained_model.load(workdir)
    doc_config, doc_params = trained_model.doc_encoder(trained)
    question_tokenizer = tokenizers.load_question_tokenizer(workdir_lib.tokenizer_dirs(workdir)["question"])
    rebuilt = embed.build_index(doc_config, doc_params, question_tokenizer, config.data.passages,
                                str(tmp_path / "rebuilt"), batch_size=config.index.batch_size,
                                max_length=config.index.max_length, progress=False)
    want = rebuilt.embeddings(np.float32)
    got = transformers_embeddings(ctx_dir, config.data.passages, config.index.max_length)
    assert hf_models.relative_error(got, want) <= 1e-5
    initial = index_io.load_index(workdir_lib.index_dir(workdir)).embeddings(np.float32)
    assert hf_models.relative_error(initial, want) > 1e-3, "d(z) did not move in training: nothing is tested"

    # build_index --encoder=<export>/ctx_encoder records the encoder_id the export names as its own index's.
    loaded = hf.load_encoder(ctx_dir)
    assert embed.encoder_fingerprint(loaded.config, loaded.params) == rebuilt.encoder_id
    with open(os.path.join(out, "config.json")) as f:
        run = json.load(f)[export.RUN_KEY]
    assert run["ctx_encoder_index_identity"] == rebuilt.identity

    # The RAG directory around it still loads into transformers with every weight.
    _, info = transformers.RagSequenceForGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.slow
def test_eval_of_an_end_to_end_run_searches_its_latest_index_and_accepts_the_exported_encoder_s(e2e_run, tmp_path):
    """eval_nq on the workdir: the version of the last refresh, with the checkpoint's encoders; on the workdir or its
    export, --index may be that version or one rebuilt with ctx_encoder/, not the run's first index (an older d(z))."""
    workdir, out, config = e2e_run["workdir"], e2e_run["hf"], e2e_run["config"]
    latest = workdir_lib.index_version_dir(workdir, REFRESH_STEP)
    model, params, defaults = model_loading.load_model(workdir)
    assert model_loading.load_index(None, model, defaults, "--model")[0] == latest
    checkpoint_params = trained_model.load(workdir).params
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(checkpoint_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    ctx = hf.load_encoder(os.path.join(out, export.CTX_ENCODER_SUBDIR))
    rebuilt = str(tmp_path / "rebuilt")
    embed.build_index(ctx.config, ctx.params, transformers.AutoTokenizer.from_pretrained(
        os.path.join(out, export.CTX_ENCODER_SUBDIR)), config.data.passages, rebuilt,
        max_length=config.index.max_length, progress=False)
    assert index_io.read_metadata(rebuilt)["encoder_id"] != index_io.read_metadata(latest)["encoder_id"], \
        "d(z) did not move after the refresh: the export's own index is not tested"
    for model, _, defaults in (model_dir.load_hf_rag(out), model_loading.load_model(workdir)):
        for index_dir in (latest, rebuilt):
            assert model_loading.load_index(index_dir, model, defaults, "--model")[0] == index_dir
        with pytest.raises(index_io.IndexFormatError, match="encoder_id="):
            model_loading.load_index(workdir_lib.index_dir(workdir), model, defaults, "--model")


# ------------------------------------------------------------------------------------------------ pooling


def _rag_model():
    config = transformers.RagConfig.from_question_encoder_generator_configs(hf_models.dpr_config(),
                                                                            hf_models.bart_config(), n_docs=2)
    model = rag.Rag(hf.bert_config_from_hf(config.question_encoder.to_dict()),
                    hf.bart_config_from_hf(config.generator.to_dict()), rag.RagConfig.from_hf(config.to_dict()))
    return model, rag.abstract_params(model)


def test_a_mean_pooled_doc_encoder_exports_in_the_sentence_transformers_layout(tmp_path):
    """DPR has [CLS] pooling only: a mean-pooled, L2-normalised d(z) (e.g. all-MiniLM-L6-v2) goes to ctx_encoder/ as
    a sentence-transformers directory that computes the same vectors."""
    reference = hf_models.bert_model(seed=3)
    reference.save_pretrained(tmp_path / "bert")
    ours = hf.load_encoder(str(tmp_path / "bert"), pooling="mean", normalize=True)
    model, abstract = _rag_model()
    params = jax.tree_util.tree_map(lambda x: np.full(x.shape, 0.01, x.dtype), abstract)
    qtok, gtok = tokenizers.load_question_tokenizer(), tokenizers.load_generator_tokenizer()
    export.save_hf_rag(str(tmp_path / "out"), model, params, "sequence", qtok, gtok,
                       doc_encoder=(ours.config, ours.params))
    ctx_dir = str(tmp_path / "out" / export.CTX_ENCODER_SUBDIR)
    assert os.path.exists(os.path.join(ctx_dir, "modules.json"))
    loaded = hf.load_encoder(ctx_dir)
    assert (loaded.config.pooling, loaded.config.normalize) == ("mean", True)
    ids, mask = hf_models.padded_ids(np.random.default_rng(0), 3, 9, vocab=97, pad=0, first=2)
    _, got = bert.BertEncoder(loaded.config).apply({"params": loaded.params}, ids, mask)
    want = hf_models.sentence_transformer_reference(transformers.BertModel.from_pretrained(ctx_dir), ids, mask)
    assert hf_models.relative_error(np.asarray(got), want) <= 1e-5


def test_a_pooling_no_hugging_face_layout_keeps_is_left_out_with_a_one_line_note(tmp_path, capsys):
    """BERT-pooler pooling (dense + tanh over [CLS]): neither DPR nor sentence-transformers computes it. The library
    refuses it before writing anything; the export command leaves ctx_encoder/ out and says why on one line."""
    from experiments import export as export_command

    cfg = bert.BertConfig(vocab_size=97, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=9,
                          pooling="pooler")
    model, abstract = _rag_model()
    params = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    with pytest.raises(hf.CheckpointError, match=r"'pooler' pooling has no Hugging Face layout.*--format=orbax"):
        export.save_hf_rag(str(tmp_path / "out"), model, params, "sequence", None, None, doc_encoder=(cfg, {}))
    assert not os.path.exists(tmp_path / "out")

    trained = trained_model.TrainedModel(rag.Rag(model.question_encoder_config, model.generator_config,
                                                 doc_encoder_config=cfg), {"doc_encoder": {}}, None, None)
    assert export_command._doc_encoder(trained) is None
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "not exporting the document encoder (ctx_encoder/)" in note and "'pooler'" in note


def test_a_frozen_doc_encoder_that_is_gone_or_not_the_index_s_is_refused_naming_the_field(tmp_path):
    """The paper's recipe: d(z) is rebuilt from model.doc_encoder.init (or the seed); an init checkpoint that moved,
    or one that no longer embeds like the run's index, is named with the remedy, not exported."""
    config = train_task.tiny_config({"questions": "q", "passages": "p"})
    model, _ = _rag_model()
    defaults = model_dir.ModelDefaults("sequence", {}, True, index="WORKDIR/index",
                                       index_identity={"encoder_id": "0123456789abcdef"})
    trained = trained_model.TrainedModel(model, {}, config, defaults)
    with pytest.raises(hf.CheckpointError, match=r"model\.doc_encoder\.init='random' is not the encoder that "
                                                 r"embedded the run's index WORKDIR/index \(encoder_id 0123"):
        trained_model.doc_encoder(trained)
    config.model.doc_encoder.init = str(tmp_path / "moved")
    with pytest.raises(hf.CheckpointError, match=r"model\.doc_encoder\.init=.*moved'.*does not load.*restore it"):
        trained_model.doc_encoder(trained)
    config.model.doc_encoder.init = "random"
    unrecorded = trained._replace(defaults=model_dir.ModelDefaults("sequence", {}, True))  # no identity to check
    cfg, params = trained_model.doc_encoder(unrecorded)
    assert cfg.hidden_size == config.model.doc_encoder.hidden_size and params
