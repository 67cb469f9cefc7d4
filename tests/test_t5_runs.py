"""RAG with a T5 generator out of and back into transformers: export of an imported RAG-with-T5 checkpoint tensor
for tensor, and a tiny T5 run end to end (train_nq -> eval_nq -> export -> transformers loads it, no weight missing,
and answers and scores as the workdir does)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from rag_jax import rag
from rag_jax.data import tokenizers
from rag_jax.inference import export
from rag_jax.models import hf, t5
from rag_jax.readers import registry
from rag_jax.retrieval import corpus
from tests import hf_models, process_env, train_task

PREFIX = "answer: "


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("t5tok"))
    tokenizers.train_sentencepiece((p.title + " " + p.text for p in corpus.read_passages(train_task.MINI_PASSAGES)),
                                   directory)  # fmt: skip
    return directory


@pytest.mark.parametrize("version,model_type", [("v1.0", "sequence"), ("v1.1", "token")])
def test_hf_round_trip_of_rag_with_t5_is_exact(tmp_path, t5_tokenizer_dir, version, model_type):
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        hf_models.dpr_config(), hf_models.t5_config(version, prefix=PREFIX, bos_token_id=None), n_docs=3,
    )  # fmt: skip
    cls = getattr(transformers, registry.get(model_type).hf_architecture)
    original = cls(config)
    hf_models.untie_t5_head(original.rag.generator)
    hf_models.randomize(original, seed=5)
    original.save_pretrained(tmp_path / "original")

    loaded = hf.load_rag(str(tmp_path / "original"))
    assert isinstance(loaded.generator.config, t5.T5Config)
    model = rag.Rag(loaded.question_encoder.config, loaded.generator.config, rag.RagConfig.from_hf(loaded.hf_config))
    assert model.config.context.prefix == PREFIX
    params = {"question_encoder": loaded.question_encoder.params, "generator": loaded.generator.params}
    qtok, gtok = tokenizers.load_question_tokenizer(), tokenizers.load_generator_tokenizer(t5_tokenizer_dir)
    export.save_hf_rag(str(tmp_path / "exported"), model, params, model_type, qtok, gtok)

    reloaded, info = cls.from_pretrained(str(tmp_path / "exported"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.generator.prefix == PREFIX and reloaded.config.generator.model_type == "t5"
    expected = original.state_dict()
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert hf.load_rag(str(tmp_path / "exported")).generator.config == loaded.generator.config
    assert isinstance(tokenizers.load_rag_tokenizers(str(tmp_path / "exported")).generator, transformers.T5Tokenizer)


def _run(*args):
    env = process_env.command_env()
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _eval(model: str, model_type: str, index: str, questions: str, output: str) -> list[dict]:
    _run("experiments.eval_nq", f"--model={model}", f"--reader=rag_{model_type}", f"--index={index}",
         f"--questions={questions}", f"--output={output}", "--score", "--batch_size=4")
    with open(output) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_tiny_t5_run_trains_evaluates_and_exports(tmp_path, t5_tokenizer_dir):
    from rag_jax.runs import trained_model
    from rag_jax.training import loop

    task = train_task.write_bundled_task(str(tmp_path / "task"), num_questions=8, num_distractors=8)
    vocab = len(tokenizers.load_generator_tokenizer(t5_tokenizer_dir))
    config = train_task.tiny_config(task, **{
        "train.steps": 4, "train.checkpoint_every": 4, "train.async_checkpoints": False,
        "model.generator.architecture": "t5", "model.generator.vocab_size": vocab, "model.generator.d_kv": 16,
        "tokenizers.generator": t5_tokenizer_dir, "data.answer_prefix_space": False, "retrieval.mode": "host",
    })  # fmt: skip
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert losses and np.isfinite(losses).all()
    model = trained_model.load(workdir).model
    assert isinstance(model.generator_config, t5.T5Config) and model.generator_config.gated

    hf_dir = str(tmp_path / "hf")
    _run("experiments.export", f"--workdir={workdir}", "--format=hf", f"--output={hf_dir}")
    for cls in (transformers.RagSequenceForGeneration, transformers.RagTokenForGeneration):
        _, info = cls.from_pretrained(hf_dir, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info

    index = os.path.join(workdir, "index")
    for model_type in ("sequence", "token"):
        ours = _eval(workdir, model_type, index, task["questions"], str(tmp_path / f"workdir-{model_type}.jsonl"))
        exported = _eval(hf_dir, model_type, index, task["questions"], str(tmp_path / f"hf-{model_type}.jsonl"))
        assert [r["prediction"] for r in exported] == [r["prediction"] for r in ours], model_type
        assert [r["doc_ids"] for r in exported] == [r["doc_ids"] for r in ours], model_type
        for key in ("nll_sequence", "nll_token"):
            got, want = np.array([r[key] for r in exported]), np.array([r[key] for r in ours])
            assert np.isfinite(want).all()
            assert hf_models.relative_error(got, want) <= 1e-4, (model_type, key)


@pytest.mark.slow
def test_tiny_t5_device_retrieval_run_from_the_command_line_learns(tmp_path, t5_tokenizer_dir):
    """`python -m experiments.train_nq` with retrieval.mode=device (search and T5 context assembly inside the step,
    corpus split over 2 devices), then eval_nq on its workdir: the gold answers' RAG-Sequence NLL that eval_nq scores
    with the trained model is well below the first step's training loss (the untrained model's, on the same 8
    questions), and the answers come from the workdir's own index."""
    from rag_jax.runs import trained_model

    task = train_task.write_bundled_task(str(tmp_path / "task"), num_questions=8, num_distractors=8)
    vocab = len(tokenizers.load_generator_tokenizer(t5_tokenizer_dir))
    workdir = str(tmp_path / "run")
    overrides = train_task.cli_overrides(task, **{
        "train.steps": 12, "train.log_every": 1, "train.checkpoint_every": 12, "train.async_checkpoints": False,
        # 1e-2: measured to take the loss from 127 to ~60 in 12 steps (T5 v1.1's untied head starts far from uniform)
        "optim.learning_rate": 1e-2, "model.generator.architecture": "t5", "model.generator.vocab_size": vocab,
        "model.generator.d_kv": 16, "tokenizers.generator": t5_tokenizer_dir, "data.answer_prefix_space": False,
        "retrieval.mode": "device",
    })  # fmt: skip
    env = process_env.command_env(devices=2)
    done = subprocess.run([sys.executable, "-m", "experiments.train_nq", f"--workdir={workdir}", *overrides],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) == 12 and np.isfinite(losses).all()
    trained = trained_model.load(workdir)
    assert trained.config.retrieval.mode == "device" and isinstance(trained.model.generator_config, t5.T5Config)

    rows = _eval(workdir, "sequence", os.path.join(workdir, "index"), task["questions"], str(tmp_path / "eval.jsonl"))
    assert len(rows) == 8 and all(isinstance(r["prediction"], str) for r in rows)
    passage_ids = {p.id for p in corpus.read_passages(task["passages"])}
    assert all(len(r["doc_ids"]) == 2 and set(map(str, r["doc_ids"])) <= passage_ids for r in rows)
    trained_nll = float(np.mean([r["nll_sequence"] for r in rows]))
    assert np.isfinite(trained_nll) and trained_nll < 0.8 * losses[0], (trained_nll, losses)


def test_labels_and_denoising_batches_start_from_t5s_decoder_start(t5_tokenizer_dir):
    """T5 has no BOS: labels (= decoder inputs) are `<pad> answer </s>`, so that the first answer token is a target;
    the denoising warm-up masks spans with <extra_id_0> and reconstructs `<pad> passage </s>`."""
    from experiments.configs import nq
    from rag_jax.training import denoise

    tok = tokenizers.load_generator_tokenizer(t5_tokenizer_dir)
    labels = tokenizers.decoder_labels(tok, ["paris", "the blue whale"], max_length=6)
    answer = tok("paris")["input_ids"]
    assert labels.shape == (2, 6) and labels[0, : len(answer) + 1].tolist() == [tok.pad_token_id] + answer
    assert (labels[:, 0] == tok.pad_token_id).all()

    config = nq.get_config("tiny")
    texts = [p.title + " / " + p.text for p in list(corpus.read_passages(train_task.MINI_PASSAGES))[:20]]
    batch = next(denoise.batches(texts, tok, config))
    assert (batch["labels"][:, 0] == tok.pad_token_id).all() and (batch["ids"][:, 0] != tok.pad_token_id).all()
    assert (batch["ids"] == tok.convert_tokens_to_ids("<extra_id_0>")).any()
    decoded = tok.batch_decode(batch["labels"], skip_special_tokens=True)
    assert all(any(text.startswith(d[:20]) for text in texts) for d in decoded)
