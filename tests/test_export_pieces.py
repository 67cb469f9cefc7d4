"""Export in pieces (rag_jax/inference/export_pieces.py) of a run whose question encoder is a sentence-transformers
model (mean pooling, L2 normalisation: what transformers' RAG classes cannot express): transformers loads each
piece and computes what rag_jax does, and eval_nq answers from the export exactly as from the workdir. Slow: the
module's run (training, index, export) is shared by its tests."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from rag_jax.inference import export, export_pieces, model_dir
from rag_jax.retrieval import corpus, index_io
from tests import hf_models, process_env


def _run(*args, expect=0):
    env = process_env.command_env()
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def pieces_run(tmp_path_factory):
    """A tiny run with a small random sentence-transformers encoder (mean pooling, normalised) as question and
    frozen document encoder, as the local config has all-MiniLM-L6-v2, and its export (experiments.export)."""
    from rag_jax.training import loop
    from tests import train_task

    tmp = tmp_path_factory.mktemp("pieces")
    encoder = str(tmp / "encoder")
    hf_models.save_sentence_transformer(hf_models.bert_model(seed=4, vocab_size=30522, max_position_embeddings=128),
                                        encoder, pooling="mean", normalize=True)
    task = train_task.write_bundled_task(str(tmp / "task"), num_questions=8, num_distractors=8)
    config = train_task.tiny_config(task, **{"model.question_encoder.init": encoder, "model.doc_encoder.init": encoder,
                                            "train.steps": 2, "train.checkpoint_every": 2,
                                            "train.async_checkpoints": False})  # fmt: skip
    workdir = str(tmp / "run")
    loop.train_and_evaluate(config, workdir)
    done = _run("experiments.export", f"--workdir={workdir}", "--format=hf", f"--output={tmp / 'hf'}")
    assert "in pieces" in done.stdout, done.stdout
    return {"workdir": workdir, "out": str(tmp / "hf"), "task": task, "config": config}


@pytest.mark.slow
def test_the_pieces_are_what_transformers_loads(pieces_run):
    out = pieces_run["out"]
    spec = export_pieces.read_spec(out)
    assert spec["reader"] == "rag_sequence" and spec["rag"]["n_docs"] == pieces_run["config"].model.n_docs
    assert spec[export.RUN_KEY]["answer_prefix_space"] is True and spec[export.RUN_KEY]["index_identity"]
    with open(os.path.join(out, "generator", "config.json")) as f:
        assert json.load(f)["architectures"] == ["BartForConditionalGeneration"]
    for piece in ("question_encoder", "ctx_encoder"):
        with open(os.path.join(out, piece, "modules.json")) as f:
            assert [m["path"] for m in json.load(f)] == ["", "1_Pooling", "2_Normalize"], piece
        with open(os.path.join(out, piece, "1_Pooling", "config.json")) as f:
            assert json.load(f)["pooling_mode_mean_tokens"] is True
    with open(os.path.join(out, "index", index_io.METADATA_FILE)) as f:
        assert json.load(f)["passages_path"] == "passages.tsv"


def _bert(directory: str) -> transformers.BertModel:
    model, info = transformers.BertModel.from_pretrained(directory, add_pooling_layer=False, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


def _mean_normalised(model: transformers.BertModel, batch) -> np.ndarray:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


@pytest.mark.slow
def test_transformers_computes_what_the_run_does_from_each_piece(pieces_run, tmp_path):
    """The generator's logits and q(x) from transformers' classes equal rag_jax's on the checkpoint; the document
    encoder with its tokenizer embeds the passages into the exported index; and the export still loads once moved."""
    from rag_jax.runs import trained_model

    out = pieces_run["out"]
    model, params, _, _ = trained_model.load(pieces_run["workdir"])
    rng = np.random.default_rng(0)
    b, k, s = 2, model.config.n_docs, 12
    ctx = rng.integers(3, 50000, (b * k, s))
    labels = np.concatenate([np.zeros((b, 1), int), rng.integers(3, 50000, (b, 4))], axis=1)
    generator, info = transformers.BartForConditionalGeneration.from_pretrained(os.path.join(out, "generator"),
                                                                                output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    generator.eval()
    with torch.no_grad():
        theirs = generator(input_ids=torch.as_tensor(ctx), attention_mask=torch.ones(b * k, s, dtype=torch.long),
                           decoder_input_ids=torch.as_tensor(np.repeat(labels, k, axis=0))).logits.numpy()
    ours = np.asarray(model.generator_logits(params, ctx, np.ones_like(ctx), labels))
    assert hf_models.relative_error(ours.reshape(theirs.shape), theirs) <= 1e-5

    question_dir = os.path.join(out, "question_encoder")
    tokenizer = transformers.AutoTokenizer.from_pretrained(question_dir)
    batch = tokenizer(["who wrote hamlet", "capital of france?"], padding=True, return_tensors="pt")
    theirs = _mean_normalised(_bert(question_dir), batch)
    ours = np.asarray(model.encode_questions(params, batch["input_ids"].numpy(), batch["attention_mask"].numpy()))
    # The run scores with scale x q(x)·d(z) (retrieval.score_scale "auto": 20 for a normalised q(x)); the export
    # records the scale beside the sentence-transformers files, which have no place for it.
    scale = export_pieces.read_spec(out)[export_pieces.SCORE_SCALE_KEY]
    assert scale == 20.0
    assert hf_models.relative_error(ours, scale * theirs) <= 1e-5

    index = index_io.load_index(os.path.join(out, "index"))
    passages = list(corpus.read_passages(pieces_run["task"]["passages"]))
    ctx_dir = os.path.join(out, export.CTX_ENCODER_SUBDIR)
    batch = transformers.AutoTokenizer.from_pretrained(ctx_dir)(
        [p.title for p in passages], [p.text for p in passages], truncation="longest_first",
        max_length=index.metadata["max_length"], padding=True, return_tensors="pt")
    theirs = _mean_normalised(_bert(ctx_dir), batch)
    assert hf_models.relative_error(theirs, index.embeddings(np.float32)) <= 1e-5

    moved = str(tmp_path / "moved")
    shutil.copytree(out, moved)
    _, moved_params, defaults = model_dir.load(moved)
    assert defaults.index == os.path.join(moved, "index") and defaults.reader == "rag_sequence"
    assert index_io.load_index(defaults.index).passages.path == os.path.join(moved, "index", "passages.tsv")
    np.testing.assert_array_equal(moved_params["question_encoder"]["word"]["embedding"],
                                  np.asarray(params["question_encoder"]["word"]["embedding"]))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["sequence", "token"])
def test_eval_nq_answers_from_the_export_exactly_as_from_the_workdir(pieces_run, tmp_path, model_type):
    """eval_nq --model=EXPORT (its own index, no --index) writes the very lines eval_nq --model=WORKDIR does."""
    lines = {}
    for name in ("workdir", "out"):
        output = tmp_path / f"{name}.jsonl"
        _run("experiments.eval_nq", f"--model={pieces_run[name]}", f"--model_type={model_type}",
             f"--questions={pieces_run['task']['questions']}", f"--output={output}", "--score", "--batch_size=4")
        lines[name] = output.read_text().splitlines()
    assert len(lines["workdir"]) == 8 and lines["out"] == lines["workdir"]
