"""The trainer's lifecycle on a toy job (no models, seconds): exact resume, evaluation cadence, SIGTERM saves,
NaN stops, and the fall-back past a damaged checkpoint. The RAG and retriever runs check the same through their
jobs (test_train*.py, test_cli_hostile.py)."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rag_jax import sharding
from rag_jax.runs import checkpoint
from rag_jax.training import trainer
from rag_jax.training.step import TrainState


def _config(**train) -> ml_collections.ConfigDict:
    fields = dict(steps=6, log_every=2, checkpoint_every=2, keep_checkpoints=5, async_checkpoints=False,
                  eval_every=0, global_batch_size=4)
    fields.update(train)
    return ml_collections.ConfigDict({"seed": 0, "train": fields, "model": {}, "optim": {}, "tokenizers": {}})


class _Batches:
    def __init__(self, start):
        self.step = start

    def next(self, params):
        del params
        self.step += 1
        return jnp.float32(self.step), {"step": self.step}

    def close(self):
        pass


class ToyJob(trainer.Job):
    """w <- 0.9 w + batch (the batch is the step's number): a state whose value depends on every step, in order."""

    def __init__(self, workdir, config, *, evaluates_ends=False, poison_at=None, sigterm_at=None):
        self.workdir, self.config, self.evaluates_ends = workdir, config, evaluates_ends
        self.mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
        self.sigterm_at, self.begun, self.steps_run = sigterm_at, None, 0

        def step(state, batch):
            w = 0.9 * state.params["w"] + batch
            if poison_at is not None:
                w = jnp.where(state.step + 1 >= poison_at, jnp.nan, w)
            return state.replace(step=state.step + 1, params={"w": w}), {"loss": w.sum()}

        self._step = jax.jit(step)

    def initial_state(self):
        replicated = sharding.replicated(self.mesh)
        return jax.device_put(TrainState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(2)}, {"m": jnp.ones(2)}),
                              replicated)

    def abstract_state(self):
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      self.initial_state())

    def begin(self, start, data_state, checkpointer):
        self.begun = (start, data_state)

    def describe(self, start):
        return f"toy from {start}"

    def inputs(self, start):
        return _Batches(start)

    def train_step(self, state, batch, rng):
        del rng
        self.steps_run += 1
        if self.sigterm_at is not None and self.begun[0] + self.steps_run == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a preempted TPU VM gets it, during the step
        return self._step(state, batch)

    def summarize(self, done, interval, wall_seconds):
        return trainer.Summary(trainer.mean_of(interval, ("loss",)), "toy")

    def has_dev(self):
        return True

    def evaluate(self, params):
        return {"eval/w": float(jax.device_get(params["w"]).sum())}

    def describe_eval(self, results, seconds):
        return str(results)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _run(workdir, config, **job):
    job = ToyJob(str(workdir), config, **job)
    return trainer.Trainer(job).run(), job


def test_a_resumed_run_ends_exactly_as_an_uninterrupted_one(tmp_path):
    straight, _ = _run(tmp_path / "straight", _config(eval_every=2))
    first, _ = _run(tmp_path / "resumed", _config(eval_every=2, steps=4))
    resumed, job = _run(tmp_path / "resumed", _config(eval_every=2))
    assert first["step"] == 4 and job.begun == (4, {"step": 4})
    assert resumed == straight and resumed["step"] == 6
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "straight")
    w = sum(0.9 ** (6 - s) * s for s in range(1, 7))
    assert straight["eval/w"] == pytest.approx(2 * w, rel=1e-6)


@pytest.mark.parametrize("eval_every,evaluates_ends,steps_evaluated", [
    (0, False, []), (0, True, [0, 6]), (4, False, [0, 4, 6]), (4, True, [0, 4, 6])])
def test_evaluation_cadence(tmp_path, eval_every, evaluates_ends, steps_evaluated):
    """train.eval_every: every that many steps, at the end and before the first step; 0: never, or for a job whose
    evaluation is its result (the retriever's) before the first step and after the last."""
    _run(tmp_path, _config(eval_every=eval_every), evaluates_ends=evaluates_ends)
    records = _metrics(tmp_path)
    assert [r["step"] for r in records if "eval/w" in r] == steps_evaluated
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]


def test_sigterm_saves_the_step_and_returns(tmp_path):
    last, _ = _run(tmp_path, _config(checkpoint_every=100), sigterm_at=3)
    assert last["preempted"] and last["step"] == 3
    assert checkpoint.Checkpointer(str(tmp_path), read_only=True).all_steps() == [3]
    resumed, job = _run(tmp_path, _config(checkpoint_every=100))
    straight, _ = _run(tmp_path / "straight", _config(checkpoint_every=100))
    assert job.begun == (3, {"step": 3}) and resumed["step"] == 6 and "preempted" not in resumed
    np.testing.assert_allclose(_final_w(tmp_path), _final_w(tmp_path / "straight"), rtol=0)


def _final_w(workdir):
    checkpointer = checkpoint.Checkpointer(str(workdir), read_only=True)
    job = ToyJob(str(workdir), _config())
    state, _ = checkpointer.restore(checkpointer.latest_step(), job.abstract_state())
    checkpointer.close()
    return np.asarray(state.params["w"])


def test_a_non_finite_loss_stops_the_run_keeping_the_last_good_checkpoint(tmp_path):
    with pytest.raises(trainer.NonFiniteLossError, match=r"at step 3 \(loss nan\).*checkpoints/2"):
        _run(tmp_path, _config(), poison_at=3)
    assert checkpoint.Checkpointer(str(tmp_path), read_only=True).latest_step() == 2


def test_a_damaged_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(tmp_path, capsys):
    _run(tmp_path, _config(steps=4))
    params = tmp_path / "checkpoints" / "4" / "params"
    shutil.rmtree(params)
    params.mkdir()  # the directory is there, its arrays are not
    last, job = _run(tmp_path, _config(steps=4))
    out = capsys.readouterr().out
    assert f"skipped checkpoint {tmp_path}/checkpoints/4" in out and job.begun == (2, {"step": 2})
    assert (tmp_path / "checkpoints_skipped" / "4").is_dir() and last["step"] == 4
    straight, _ = _run(tmp_path / "straight", _config(steps=4))
    np.testing.assert_allclose(_final_w(tmp_path), _final_w(tmp_path / "straight"), rtol=0)
