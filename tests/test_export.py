"""Export to the Hugging Face layout: transformers loads what rag_jax writes, tensor for tensor, and an export of a
training run answers and scores exactly as the run's workdir."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from rag_jax import rag
from rag_jax.data import tokenizers
from rag_jax.inference import export
from rag_jax.models import hf
from rag_jax.readers import rag_sequence, rag_token, registry
from tests import hf_models, process_env


@pytest.mark.parametrize("model_type,projection_dim", [("sequence", 0), ("token", 7)])
def test_hf_round_trip_is_exact(tmp_path, model_type, projection_dim):
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        hf_models.dpr_config(projection_dim=projection_dim), hf_models.bart_config(), n_docs=3, label_smoothing=0.1
    )
    cls = registry.get(model_type).hf_architecture
    original = hf_models.randomize(getattr(transformers, cls)(config), seed=5)
    original.save_pretrained(tmp_path / "original")

    loaded = hf.load_rag(str(tmp_path / "original"))
    model = rag.Rag(loaded.question_encoder.config, loaded.generator.config, rag.RagConfig.from_hf(loaded.hf_config))
    params = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params}
    qtok, gtok = tokenizers.load_question_tokenizer(), tokenizers.load_generator_tokenizer()
    export.save_hf_rag(str(tmp_path / "exported"), model, params, model_type, qtok, gtok)

    reloaded = getattr(transformers, cls).from_pretrained(str(tmp_path / "exported"))
    assert type(reloaded).__name__ == cls
    assert reloaded.config.n_docs == 3 and reloaded.config.label_smoothing == 0.1
    expected = original.state_dict()
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert tokenizers.load_rag_tokenizers(str(tmp_path / "exported")).generator("Hello world")["input_ids"] == [
        0, 31414, 232, 2
    ]  # fmt: skip


def test_export_refuses_to_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export.refuse_to_overwrite(str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_an_export_directory_appears_only_when_complete(tmp_path):
    """Written beside its destination and renamed at the end: an interrupted export leaves the old directory as it
    was (and nothing else); with overwrite, a complete one replaces it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        with export.new_directory(str(out), overwrite=True) as partial:
            (pathlib.Path(partial) / "half.bin").write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["keep.txt"]
    with export.new_directory(str(out), overwrite=True) as partial:
        (pathlib.Path(partial) / "new.bin").write_bytes(b"new")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["new.bin"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        with export.new_directory(str(out)):
            pass
    (tmp_path / "file").write_text("a file")
    with pytest.raises(FileExistsError, match="is a file"):
        with export.new_directory(str(tmp_path / "file"), overwrite=True):
            pass


def test_a_dpr_style_question_encoder_keeps_the_rag_layout():
    """[CLS] pooling without normalisation is DPR's: transformers' RAG classes compute it, so the run exports as one
    RAG checkpoint; mean pooling or normalisation go to the pieces layout (test_export_pieces.py)."""
    from rag_jax.inference import export_pieces
    from rag_jax.models import bart, bert

    def fits(**encoder):
        return export_pieces.rag_layout_fits(rag.Rag(bert.BertConfig(**encoder), bart.BartConfig()))

    assert fits() and fits(projection_dim=8)
    assert not fits(pooling="mean") and not fits(normalize=True) and not fits(pooling="mean", normalize=True)


def test_only_dpr_pooling_exports():
    from rag_jax.models import bert

    with pytest.raises(hf.CheckpointError, match="only 'cls' pooling"):
        hf.dpr_config_dict(bert.BertConfig(pooling="mean"))
    assert np.isfinite(hf.dpr_config_dict(bert.BertConfig())["layer_norm_eps"])


def _run(*args, expect=0):
    env = process_env.command_env()
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny rag_jax training run on bundled questions, and its Hugging Face export (experiments.export)."""
    from rag_jax.training import loop
    from tests import train_task

    tmp = tmp_path_factory.mktemp("export")
    task = train_task.write_bundled_task(str(tmp / "task"), num_questions=8, num_distractors=8)
    config = train_task.tiny_config(task, **{"train.steps": 2, "train.checkpoint_every": 2,
                                            "train.async_checkpoints": False})  # fmt: skip
    workdir = str(tmp / "run")
    loop.train_and_evaluate(config, workdir)
    _run("experiments.export", f"--workdir={workdir}", "--format=hf", f"--output={tmp / 'hf'}")
    return {"workdir": workdir, "hf": str(tmp / "hf"), "task": task}


@pytest.mark.slow
def test_trained_workdir_exports_to_transformers_with_the_same_losses(trained_run, tmp_path):
    """A rag_jax run's checkpoint, exported with experiments.export, gives transformers the losses rag_jax computes."""
    import jax

    from rag_jax.runs import trained_model

    workdir, hf_dir = trained_run["workdir"], trained_run["hf"]
    _run("experiments.export", f"--workdir={workdir}", "--format=orbax", f"--output={tmp_path / 'orbax'}")
    again = _run("experiments.export", f"--workdir={workdir}", f"--output={hf_dir}", expect=1)
    assert "not empty" in again.stderr

    model, params, _, _ = trained_model.load(workdir)
    orbax_params = export.load_params_orbax(str(tmp_path / "orbax"))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(orbax_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.load(open(tmp_path / "orbax" / "config.json"))["model"]["reader"] == "rag_sequence"

    rng = np.random.default_rng(0)
    b, k, s = 2, model.config.n_docs, 24
    q_ids = np.concatenate([np.full((b, 1), 101), rng.integers(1000, 2000, (b, 9))], axis=1)
    q_mask = np.ones_like(q_ids)
    ctx = rng.integers(3, 50000, (b * k, s))
    ctx_mask = np.ones_like(ctx)
    labels = np.concatenate([np.zeros((b, 1), int), rng.integers(3, 50000, (b, 4)), np.full((b, 1), 2)], axis=1)
    doc_embeds = rng.normal(size=(b, k, model.question_encoder_config.output_dim)).astype(np.float32)
    scores = rag.doc_scores(model.encode_questions(params, q_ids, q_mask), doc_embeds)
    logits = model.generator_logits(params, ctx, ctx_mask, labels)
    ours = {"sequence": rag_sequence.nll(logits, scores, labels, pad_token_id=1),
            "token": rag_token.nll(logits, scores, labels, pad_token_id=1)}  # fmt: skip
    for model_type, cls in (("sequence", transformers.RagSequenceForGeneration),
                            ("token", transformers.RagTokenForGeneration)):  # fmt: skip
        reference = cls.from_pretrained(hf_dir).eval()
        with torch.no_grad():
            q = reference.question_encoder(torch.as_tensor(q_ids), attention_mask=torch.as_tensor(q_mask)).pooler_output
            ref_scores = torch.bmm(q.unsqueeze(1), torch.as_tensor(doc_embeds).transpose(1, 2)).squeeze(1)
            loss = reference(context_input_ids=torch.as_tensor(ctx), context_attention_mask=torch.as_tensor(ctx_mask),
                             doc_scores=ref_scores, labels=torch.as_tensor(labels)).loss  # fmt: skip
        assert hf_models.relative_error(ours[model_type], loss.numpy()) <= 1e-4, model_type


@pytest.mark.slow
def test_a_frozen_run_exports_the_doc_encoder_that_embedded_its_index(trained_run):
    """The paper's recipe (model.doc_encoder.trainable=False): ctx_encoder/ holds the frozen document encoder, and
    transformers' DPRContextEncoder with its tokenizer embeds the passages into the workdir's index."""
    from rag_jax.retrieval import index_io
    from tests.test_export_doc_encoder import transformers_embeddings

    index = index_io.load_index(os.path.join(trained_run["workdir"], "index"))
    got = transformers_embeddings(os.path.join(trained_run["hf"], export.CTX_ENCODER_SUBDIR),
                                  trained_run["task"]["passages"], index.metadata["max_length"])
    assert hf_models.relative_error(got, index.embeddings(np.float32)) <= 1e-5


def _eval(model: str, model_type: str, index: str, questions: str, output: str) -> list[dict]:
    _run("experiments.eval_nq", f"--model={model}", f"--reader=rag_{model_type}", f"--index={index}",
         f"--questions={questions}", f"--output={output}", "--score", "--batch_size=4")
    with open(output) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_export_answers_and_scores_like_its_workdir(trained_run, tmp_path):
    """eval_nq on the HF export = eval_nq on the workdir (the very output lines: predictions, documents, gold-answer
    NLLs), for both model types; and transformers' own greedy RagTokenForGeneration.generate on the export gives the
    workdir's RAG-Token answers."""
    from rag_jax.retrieval import index_io, retriever

    workdir, hf_dir, questions = trained_run["workdir"], trained_run["hf"], trained_run["task"]["questions"]
    index = os.path.join(workdir, "index")
    results = {}
    for model_type in ("sequence", "token"):
        for name, model in (("workdir", workdir), ("export", hf_dir)):
            out = str(tmp_path / f"{name}-{model_type}.jsonl")
            results[name, model_type] = _eval(model, model_type, index, questions, out)
        ours, exported = results["workdir", model_type], results["export", model_type]
        assert [r["prediction"] for r in exported] == [r["prediction"] for r in ours], model_type
        assert [r["doc_ids"] for r in exported] == [r["doc_ids"] for r in ours], model_type
        for key in ("nll_sequence", "nll_token"):
            got, want = np.array([r[key] for r in exported]), np.array([r[key] for r in ours])
            assert hf_models.relative_error(got, want) <= 1e-4, (model_type, key)
        assert ((tmp_path / f"export-{model_type}.jsonl").read_text()
                == (tmp_path / f"workdir-{model_type}.jsonl").read_text()), model_type

    reference = transformers.RagTokenForGeneration.from_pretrained(hf_dir).eval()
    pair = tokenizers.load_rag_tokenizers(hf_dir)
    records = results["workdir", "token"]
    texts = [r["question"] for r in records]
    encoded = pair.question(texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
    with torch.no_grad():
        q = reference.question_encoder(encoded["input_ids"], attention_mask=encoded["attention_mask"]).pooler_output
    fmt = rag.RagConfig.from_hf(reference.config.to_dict()).context
    found = retriever.Retriever(index_io.load_index(index), pair.question, pair.generator, fmt)(
        q.numpy(), encoded["input_ids"].numpy(), reference.config.n_docs)
    assert found.doc_ids == [r["doc_ids"] for r in records]
    embeds = torch.as_tensor(found.doc_embeds_BxKxD)
    with torch.no_grad():
        scores = torch.bmm(q.unsqueeze(1), embeds.transpose(1, 2)).squeeze(1)
        tokens = reference.generate(context_input_ids=torch.as_tensor(found.context_input_ids_BKxS, dtype=torch.long),
                                    context_attention_mask=torch.as_tensor(found.context_attention_mask_BKxS,
                                                                           dtype=torch.long),
                                    doc_scores=scores)  # fmt: skip
    answers = [a.strip() for a in pair.generator.batch_decode(tokens, skip_special_tokens=True)]
    assert answers == [r["prediction"] for r in records]
