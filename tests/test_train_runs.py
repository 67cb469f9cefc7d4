"""Whole training runs: exact resume after SIGKILL and SIGTERM, two processes equal one, and learning for real
(a tiny model overfits to exact match >= 0.9; the gradient through the doc scores teaches retrieval)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rag_jax import sharding
from rag_jax.runs import trained_model
from rag_jax.training import dev_eval, loop
from rag_jax.retrieval import corpus
from tests import local_processes, process_env, train_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int, cache_dir: str) -> dict[str, str]:
    # The restarted runs load the step compiled by the first one (the same program, so the same numbers).
    return process_env.command_env(devices=devices, JAX_COMPILATION_CACHE_DIR=cache_dir)


def _train_cli(task, workdir, overrides, *, devices, extra=()):
    command = [sys.executable, "-m", "experiments.train_nq", f"--workdir={workdir}",
               *train_task.cli_overrides(task, **overrides), *extra]
    cache_dir = os.path.join(os.path.dirname(workdir), "jax_cache")
    return subprocess.Popen(command, cwd=ROOT, env=_env(devices, cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _metrics(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _wait_until(process, condition, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{process.stdout.read()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _params(workdir):
    params = trained_model.load(workdir).params
    return jax.device_get(params)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return train_task.write_bundled_task(str(tmp_path_factory.mktemp("task")), num_questions=32, num_distractors=32)


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_is_exact(task, tmp_path):
    """Uninterrupted run vs. the same run SIGKILLed after a checkpoint, restarted, stopped by SIGTERM (which saves),
    and restarted again: identical final parameters and metrics.jsonl."""
    overrides = {"train.steps": 24, "train.checkpoint_every": 4, "train.log_every": 1}
    reference = str(tmp_path / "reference")
    # Every run in its own 1-device process: the same compiled program, so equal means bit-for-bit equal.
    output, _ = _train_cli(task, reference, overrides, devices=1).communicate(timeout=300)
    assert "done: step 24" in output, output

    workdir = str(tmp_path / "interrupted")
    kill_after = int(np.random.default_rng().integers(6, 12))  # some step after the checkpoint at step 4
    ckpts = os.path.join(workdir, "checkpoints")
    process = _train_cli(task, workdir, overrides, devices=1)
    _wait_until(process, lambda: os.path.isdir(os.path.join(ckpts, "4")) and any(
        m["step"] >= kill_after for m in _metrics(workdir)), f"step {kill_after}")
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(m["step"] for m in _metrics(workdir))
    assert killed_at < 24, "the run finished before it was killed; nothing was tested"

    process = _train_cli(task, workdir, overrides, devices=1)
    _wait_until(process, lambda: any(m["step"] >= 17 for m in _metrics(workdir)), "step 17")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 75, output  # EX_TEMPFAIL: preempted, its checkpoint saved (docs/pods.md)
    assert f"resumed from {ckpts}" in output and "preempted (SIGTERM): saved step" in output, output
    preempted_at = int(output.split("preempted (SIGTERM): saved step ")[1].split(";")[0])
    assert preempted_at < 24 and preempted_at % 4, f"SIGTERM save at {preempted_at} is not a regular checkpoint"

    process = _train_cli(task, workdir, overrides, devices=1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert f"resumed from {ckpts}/{preempted_at}" in output, output

    assert _metrics(workdir) == _metrics(reference)
    for x, y in zip(jax.tree_util.tree_leaves(_params(workdir)), jax.tree_util.tree_leaves(_params(reference))):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_equal_one(task, tmp_path):
    """2 processes x 2 CPU devices (jax.distributed on 127.0.0.1, gloo) vs 1 process x 4 devices, mesh 2 x 2."""
    overrides = {"train.steps": 3, "train.checkpoint_every": 3, "train.log_every": 1, "mesh.model": 2,
                 "train.eval_every": 3, "eval.num_examples": 12}  # each host answers 6 of the 12 dev questions
    workdir = str(tmp_path / "two")
    port = local_processes.free_port()
    processes = [
        _train_cli(task, workdir, overrides, devices=2,
                   extra=(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"))
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output
    assert "2 processes" in outputs[0]

    single = str(tmp_path / "one")
    config = train_task.tiny_config(task, **overrides)
    loop.train_and_evaluate(config, single, mesh=sharding.make_mesh(2, 2, devices=jax.devices()[:4]))

    two, one = _metrics(workdir), _metrics(single)
    assert [m["step"] for m in two] == [m["step"] for m in one] == [0, 1, 2, 3, 3]  # first and last lines: the evaluations
    np.testing.assert_allclose([m["loss"] for m in two[1:4]], [m["loss"] for m in one[1:4]], rtol=1e-5)
    for a, b in ((two[0], one[0]), (two[4], one[4])):  # the step-0 baseline and the final evaluation
        assert a["eval/num_questions"] == 12
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], atol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(_params(workdir)), jax.tree_util.tree_leaves(_params(single))):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * (np.abs(y).max() + 1e-12) + 1e-7)


@pytest.mark.slow
def test_tiny_model_overfits_to_exact_match(tmp_path):
    """From scratch, 8 questions whose contexts hold the question: greedy RAG-Token answers reach EM >= 0.9."""
    task = train_task.write_bundled_task(str(tmp_path / "task"), num_questions=8, num_distractors=8, max_words=12)
    overrides = {"train.steps": 120, "train.eval_every": 120, "train.checkpoint_every": 120, "train.log_every": 40,
                 "optim.learning_rate": 5e-3, "optim.warmup_steps": 10, "eval.num_examples": 8}
    result = loop.train_and_evaluate(train_task.tiny_config(task, **overrides), str(tmp_path / "run"),
                                      mesh=sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
    assert result["eval/exact_match"] >= 90.0, result


# Single tokens for both tokenizers (BERT WordPiece and BART BPE with a leading space).
CODENAMES = ("grasp", "consume", "cyber", "chained", "crucial", "baffled", "prowess", "hello", "likely", "module",
             "filter", "jeans", "drummer", "malaria", "jumper", "blacks")
SECRETS = ("console", "mounts", "errors", "butcher", "booked", "banned", "hooked", "forming", "holds", "kinetic",
           "serve", "tennis", "steer", "gently", "thank", "whole")


def _retrieval_task(directory):
    """Answers unrelated to the question text, each in one gold passage. The passage also names the question's code
    word (as an NQ passage names the question's entity), so that a retriever can find it; its answer tokens come
    first and fill the generator input, so the question is truncated out of every context and only a retrieved
    gold passage can supply the answer."""
    os.makedirs(directory, exist_ok=True)
    passages = [corpus.Passage(str(i + 1), f"card {i}", " ".join([s] * 12 + [c] * 8))
                for i, (c, s) in enumerate(zip(CODENAMES, SECRETS))]
    corpus.write_passages_tsv(os.path.join(directory, "passages.tsv"), passages)
    questions = [{"question": " ".join([c] * 4), "answers": [s], "gold_passage_id": i + 1}
                 for i, (c, s) in enumerate(zip(CODENAMES, SECRETS))]
    return {"questions": train_task.write_questions(os.path.join(directory, "questions.jsonl"), questions),
            "passages": os.path.join(directory, "passages.tsv")}


@pytest.mark.slow
def test_doc_score_gradient_teaches_retrieval(tmp_path):
    """The question encoder gets gradient only through the doc scores; recall@1 of the gold passage must rise.

    Retrieval starts better than chance (twin encoders: q(x) starts as a copy of the frozen d(z), mean pooling, so
    shared words score) but far from perfect; the question encoder learns at 0.1x the rate so that it does not drift
    on the random generator's likelihoods before the generator has learnt to read passages.
    """
    task = _retrieval_task(str(tmp_path / "task"))
    overrides = {
        "train.steps": 200, "train.log_every": 20, "train.checkpoint_every": 200, "train.eval_every": 200,
        "optim.learning_rate": 3e-3, "optim.warmup_steps": 10, "optim.question_encoder_lr_scale": 0.1,
        "model.question_encoder.init": "doc_encoder", "model.question_encoder.pooling": "mean",
        "model.doc_encoder.pooling": "mean", "model.doc_encoder.initializer_range": 0.02,
        "model.generator.d_model": 64, "model.generator.encoder_layers": 2, "model.generator.decoder_layers": 2,
        "model.generator.heads": 4, "model.generator.ffn_dim": 128,
        "model.n_docs": 4, "eval.n_docs": 4, "eval.recall_ks": (1, 4), "model.max_combined_length": 24,
        "eval.num_examples": 16, "data.max_target_length": 4}
    config = train_task.tiny_config(task, **overrides)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    workdir = str(tmp_path / "run")
    run = loop.setup(config, workdir, mesh)
    before = dev_eval.evaluate(run.model, run.initial_state().params, run.retriever, run.dev_examples, config)
    after = loop.train_and_evaluate(config, workdir, mesh=mesh)
    assert before["eval/gold_recall@1"] <= 50.0, before  # 7 of 16 at the start (chance: 1 of 16)
    assert after["eval/gold_recall@1"] >= before["eval/gold_recall@1"] + 25.0, (before, after)
    recalls = [m["gold_recall"] for m in _metrics(workdir) if "gold_recall" in m]  # top-4 on the training batches
    assert recalls[-1] >= 0.9 and recalls[-1] > min(recalls), recalls
