"""Host-mode training with step s+1's host work overlapped with step s (rag_jax/training/inputs.py StepInputs):
the same parameters and checkpointed data positions as without the overlap, exact resume; the one-step-stale
retrieval option (retrieval.stale_prefetch) really retrieves with the previous parameters, equals the exact path
while the question encoder is frozen, and trains."""

import json
import os
import shutil
import threading

import jax
import numpy as np
import pytest

from rag_jax import sharding
from rag_jax.runs import build, checkpoint, trained_model
from rag_jax.training import inputs, loop
from tests import train_task

# Host retrieval on one device; dropout on (its keys are per step, so a batch off by one shows in the parameters too).
BASE = {"retrieval.mode": "host", "train.steps": 6, "train.checkpoint_every": 4, "train.log_every": 1}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return train_task.write_bundled_task(str(tmp_path_factory.mktemp("task")), num_questions=32, num_distractors=32)


def _mesh():
    return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


def _train(task, workdir, **overrides):
    loop.train_and_evaluate(train_task.tiny_config(task, **{**BASE, **overrides}), str(workdir), mesh=_mesh())
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    return jax.device_get(trained_model.load(str(workdir)).params), losses


def _assert_same_params(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _data_steps(task, workdir):
    """{checkpoint step: the data position saved with it}."""
    run = loop.setup(train_task.tiny_config(task, **BASE), str(workdir), _mesh())
    checkpointer = checkpoint.Checkpointer(str(workdir), keep=None, async_save=False, read_only=True)
    try:
        return {step: checkpointer.restore(step, run.abstract_state)[1]["step"] for step in checkpointer.all_steps()}
    finally:
        checkpointer.close()


@pytest.mark.slow
def test_overlap_gives_the_same_parameters_positions_and_resume(task, tmp_path):
    """With and without the overlap: bit-identical parameters and losses; each checkpoint holds the position after
    its own step (not after the batch read ahead); a run stopped at the step-4 checkpoint and resumed ends equal."""
    exact, exact_losses = _train(task, tmp_path / "sequential", **{"retrieval.prefetch": False})
    overlapped, overlapped_losses = _train(task, tmp_path / "overlapped")
    _assert_same_params(overlapped, exact)
    assert overlapped_losses == exact_losses and len(exact_losses) == 6

    assert _data_steps(task, tmp_path / "overlapped") == {4: 4, 6: 6}

    # The run as if stopped right after its step-4 checkpoint (the same config: the learning rate schedule depends on
    # train.steps), then resumed.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "overlapped", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "6")
    resumed, _ = _train(task, resumed_dir)
    _assert_same_params(resumed, exact)


def _stale_step_inputs(task, tmp_path, stale):
    """The StepInputs of a host-mode run whose q(x) calls record which parameters they were given."""
    config = train_task.tiny_config(task, **BASE)
    run = loop.setup(config, str(tmp_path), _mesh())
    used = []
    encode = run.batches.encode

    def recording_encode(params, ids, mask):
        used.append(params["tag"])
        return encode(params["real"], ids, mask)

    run.batches.encode = recording_encode
    pipeline = loop.make_pipeline(run)
    return run, inputs.StepInputs(run.batches, pipeline, 3, stale=stale), used


@pytest.mark.parametrize("stale", [False, True])
def test_stale_prefetch_retrieves_each_step_with_the_previous_steps_parameters(task, tmp_path, stale):
    run, step_inputs, used = _stale_step_inputs(task, tmp_path, stale)
    real = run.initial_state().params
    try:
        with sharding.use(run.mesh):
            for step in range(3):  # the parameters step s starts from are tagged s
                step_inputs.next({"tag": step, "real": real})
    finally:
        step_inputs.close()
    # Exact: step s retrieves with its own parameters. Stale: the first step with its own, step s+1 with step s's
    # (encoded while step s is dispatched), the last step's look-ahead is not started.
    assert used == ([0, 0, 1] if stale else [0, 1, 2])


def test_settle_waits_for_the_stale_retrieval_under_way(task, tmp_path):
    """An index refresh calls settle before moving the searcher: it must return only once the look-ahead search of
    the next step (in its background thread) is done."""
    run, step_inputs, _ = _stale_step_inputs(task, tmp_path, stale=True)
    release, calls = threading.Event(), []
    search = run.retriever.searcher.search

    def held_search(*args, **kwargs):  # the second search (the look-ahead of step 1) waits for `release`
        calls.append(1)
        if len(calls) == 2:
            release.wait(30)
        return search(*args, **kwargs)

    run.retriever.searcher.search = held_search
    real = run.initial_state().params
    try:
        with sharding.use(run.mesh):
            step_inputs.next({"tag": 0, "real": real})
        settling = threading.Thread(target=step_inputs.settle)
        settling.start()
        settling.join(0.5)
        assert settling.is_alive()  # still waiting on the held search
        release.set()
        settling.join(30)
        assert not settling.is_alive() and len(calls) == 2
    finally:
        release.set()
        step_inputs.close()


def test_a_retrievers_thread_copy_moves_with_it_to_a_new_index(task, tmp_path):
    """The stale look-ahead searches with the retriever's thread copy: an index refresh moves the run's retriever
    (its index, and for ScaNN a new searcher), and the copy must follow, never search or read a pruned version."""
    run = loop.setup(train_task.tiny_config(task, **BASE), str(tmp_path), _mesh())
    copy = run.retriever.with_own_tokenizers()
    new_index, new_searcher = object(), object()
    run.retriever.index, run.retriever.searcher = new_index, new_searcher
    assert copy.index is new_index and copy.searcher is new_searcher
    assert copy.question_tokenizer is not run.retriever.question_tokenizer


@pytest.mark.slow
def test_stale_prefetch_with_a_frozen_question_encoder_equals_the_exact_path(task, tmp_path):
    frozen = {"optim.question_encoder_lr_scale": 0.0, "train.steps": 4}
    exact, _ = _train(task, tmp_path / "exact", **frozen)
    stale, _ = _train(task, tmp_path / "stale", **frozen, **{"retrieval.stale_prefetch": True})
    _assert_same_params(stale, exact)


@pytest.mark.slow
def test_stale_prefetch_trains(tmp_path):
    """Question encoder trained, retrieval one step stale, every step the same 8 questions: the loss falls to well
    below half its start."""
    task = train_task.write_bundled_task(str(tmp_path / "task"), num_questions=8, num_distractors=8, max_words=12)
    _, losses = _train(task, tmp_path / "stale", **{"retrieval.stale_prefetch": True, "train.steps": 40,
                                                    "train.checkpoint_every": 40, "optim.learning_rate": 5e-3,
                                                    "optim.warmup_steps": 10})
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.5 * first, losses


def test_stale_prefetch_needs_host_retrieval(task):
    config = train_task.tiny_config(task, **{"retrieval.mode": "device", "retrieval.stale_prefetch": True})
    with pytest.raises(build.ConfigError, match=r"retrieval.stale_prefetch=True needs retrieval.mode='host'"):
        build.check_config(config)


def test_device_mode_overlapped_batches_equal_the_builders(task, tmp_path):
    """Device retrieval: the whole batch is prepared in the background thread; it is the batch the builder makes."""
    run = loop.setup(train_task.tiny_config(task, **{**BASE, "retrieval.mode": "device"}), str(tmp_path), _mesh())
    pipeline = loop.make_pipeline(run)
    step_inputs = inputs.StepInputs(run.batches, pipeline, 3)
    try:
        with sharding.use(run.mesh):
            got = [step_inputs.next(None) for _ in range(3)]
    finally:
        step_inputs.close()
    for step, (batch, data_state) in enumerate(got):
        expected = run.batches(None, pipeline.batch_at(step))
        assert data_state["step"] == step + 1 and set(batch) == set(expected) == set(inputs.DEVICE_KEYS)
        for key in expected:
            np.testing.assert_array_equal(np.asarray(batch[key]), np.asarray(expected[key]), err_msg=key)
