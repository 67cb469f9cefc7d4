"""The one trainer: the lifecycle every training job of rag_jax shares, written once around the job's own step.

  resume       from the newest checkpoint that restores; newer ones that do not (damaged files) are reported and
               moved to WORKDIR/checkpoints_skipped/, and a checkpoint of another model or optimiser (other array
               shapes) stops the run naming the config fields that differ. Without one: the job's step 0.
  steps        the job's batches and jitted step, with host<->device copies disallowed inside the step; a step's
               metrics are read once the next step is under way, so the host does not wait for the device; a NaN/inf
               in the job's `finite_metrics` stops the run naming the step, keeping the last good checkpoint.
  metrics      every train.log_every steps and at the end: the interval's metrics to metrics.jsonl and TensorBoard,
               and a progress line, on process 0 (metric_writer.py).
  evaluation   every train.eval_every steps, at the end, and before the first step of a fresh run. With
               train.eval_every=0: none, or for a job whose evaluation is its result (`evaluates_ends`, the
               retriever's) only before the first step and after the last.
  checkpoints  every train.checkpoint_every steps, at the end, and on SIGTERM (after which the run returns): orbax,
               with the data position and the config (runs/checkpoint.py), saved after the evaluation of its step, so
               that a run killed before the save completes redoes both.
  closing      the inputs' threads, the checkpointer (waiting for its last save), the metric files, the SIGTERM
               handler; then the job's `finish`.

A job (loop.RagJob, retriever_loop.RetrieverJob) supplies its state, batches, step, evaluation and what its lines
say, and may work between steps through Job's hooks (the RAG job refreshes its index there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from rag_jax import sharding
from rag_jax.runs import checkpoint, config_check, streams
from rag_jax.runs.config_check import ConfigError
from rag_jax.training.lifecycle import Preemption, duration, log
from rag_jax.training.metric_writer import MetricWriter


class NonFiniteLossError(RuntimeError):
    """A training value (the loss, a gradient norm) became NaN/inf; the run stopped without saving that state."""


class Inputs(Protocol):
    """A job's batches, from the step the run starts at."""

    def next(self, params) -> tuple[Any, dict[str, Any]]:
        """(the next step's batch, the data position after it, which that step's checkpoint saves)."""

    def close(self) -> None:
        """Ends any background work."""


@dataclasses.dataclass
class Summary:
    """What a job logs for an interval of steps: `metrics` go to metrics.jsonl and TensorBoard, `perf` (timings,
    not reproducible) to TensorBoard only; the progress line reads `step d/n | <line> | <rate> | ETA ..<tail>`."""

    metrics: dict[str, float]
    line: str
    perf: dict[str, float] = dataclasses.field(default_factory=dict)
    tail: str = ""


class Job:
    """What one kind of training supplies to the Trainer. Methods raising NotImplementedError are required; the
    others are hooks that do nothing unless the job needs them."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    finite_metrics: tuple[str, ...] = ("loss",)  # step metrics that stop the run when NaN/inf
    rate_unit: tuple[str, str] = ("ex/s", "examples_per_sec")  # the interval's global batches/s: line, TensorBoard
    evaluates_ends = False  # with train.eval_every=0, evaluate before the first and after the last step anyway

    def abstract_state(self) -> Any:
        """The train state as ShapeDtypeStructs with shardings: what a checkpoint restores into."""
        raise NotImplementedError

    def initial_state(self) -> Any:
        """The state at step 0 (called only when no checkpoint restores)."""
        raise NotImplementedError

    def begin(self, start: int, data_state: dict[str, Any] | None, checkpointer: checkpoint.Checkpointer) -> None:
        """The run starts at `start`: from a checkpoint saved with `data_state`, or fresh (None)."""

    def describe(self, start: int) -> str:
        """The run's first line."""
        raise NotImplementedError

    def inputs(self, start: int) -> Inputs:
        raise NotImplementedError

    def context(self) -> contextlib.AbstractContextManager:
        """Entered around each batch and step (the RAG job: the models' logical sharding rules)."""
        return contextlib.nullcontext()

    def train_step(self, state, batch, rng) -> tuple[Any, dict[str, jax.Array]]:
        raise NotImplementedError

    def after_step(self, done: int, state, inputs: Inputs) -> None:
        """Work between steps (`done` steps done, more to come), before the step's metrics are logged."""

    def summarize(self, done: int, interval: list[dict[str, float]], wall_seconds: float) -> Summary:
        """What to log for the steps of `interval` (their metrics, read back), the last of them `done`."""
        raise NotImplementedError

    def has_dev(self) -> bool:
        """Whether there is anything to evaluate on."""
        raise NotImplementedError

    def evaluate(self, params) -> dict[str, float]:
        """Evaluation metrics, named "eval/..."."""
        raise NotImplementedError

    def describe_eval(self, results: dict[str, float], seconds: float) -> str:
        raise NotImplementedError

    def checkpoint_extras(self) -> dict[str, Any]:
        """Keyword arguments for Checkpointer.save beside the state (the RAG job: the index version it searches)."""
        return {}

    def saved(self, done: int) -> None:
        """Checkpoint `done` has been started."""

    def finish(self, state, last: dict[str, Any]) -> None:
        """After the run closed (steps done or preempted): `last` holds what train_and_evaluate returns."""


def mean_of(interval: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in interval])) for k in keys}


# What a resumed run must share with its checkpoints to restore them, named when they do not fit.
_STATE_FIELDS = ("model", "optim", "tokenizers", "seed")


def resume(job: Job, checkpointer: checkpoint.Checkpointer) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, data position) of the newest checkpoint that restores, or None for a fresh run. Newer ones
    that do not restore (damaged files) are reported and moved aside; a checkpoint of another model or optimizer
    (other array shapes) stops the run naming the config fields that differ."""
    if checkpointer.latest_step() is None:
        return None
    abstract = job.abstract_state()

    def restore(step: int):
        mismatch = checkpointer.shape_mismatch(step, abstract)
        if mismatch:
            try:
                changed = config_check.differences(checkpointer.restore_config(step).to_dict(), job.config,
                                                   _STATE_FIELDS)
            except Exception:  # pylint: disable=broad-except (a damaged config item: the shapes say enough)
                changed = []
            raise ConfigError(
                f"{checkpointer.step_dir(step)} does not fit this run's model ({mismatch}); the run was trained with "
                f"{'; '.join(changed) if changed else 'another config'}. Resume with the run's own config, or train "
                "into a new --workdir")
        return checkpointer.restore(step, abstract)

    step, (state, data_state), skipped = checkpointer.restore_newest(restore, fatal=(ConfigError,))
    for bad, cause in skipped:
        moved = checkpointer.set_aside(bad) if jax.process_index() == 0 else None
        log(f"skipped checkpoint {checkpointer.step_dir(bad)}, which does not restore ({cause}); moved it to {moved}")
    if skipped:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("rag_jax: damaged checkpoints moved aside")
        checkpointer.reload()
    return step, state, data_state


class Trainer:
    """Runs a Job from its workdir's newest checkpoint (or step 0) to config.train.steps."""

    def __init__(self, job: Job):
        self.job = job
        self.steps = int(job.config.train.steps)
        self.last: dict[str, Any] = {}  # the last logged metrics and evaluation: what `run` returns
        self.interval: list[dict[str, float]] = []  # the metrics of the steps since the last progress line

    def run(self) -> dict[str, Any]:
        """Trains and returns the last logged metrics and evaluation, with "step" (and "preempted" on SIGTERM)."""
        job, train = self.job, self.job.config.train
        self.checkpointer = checkpoint.Checkpointer(job.workdir, keep=train.keep_checkpoints,
                                                    async_save=train.async_checkpoints)
        self.inputs = self.writer = self.preemption = None
        stopped = True  # by an error, unless the steps end: then a failed last save is the error to report
        try:
            state = self._start()
            self.inputs = job.inputs(self.start)
            state = self._steps(state)
            stopped = False
        finally:
            for part in (self.inputs, self.writer, self.preemption):
                if part is not None:
                    part.close()
            self.checkpointer.close(quiet=stopped)
        self.last["step"] = int(jax.device_get(state.step))
        job.finish(state, self.last)
        log(f"done: step {self.last['step']}, {duration(time.time() - self.t_start)}, workdir {job.workdir}")
        return self.last

    def _start(self):
        """The state to start from (resumed, or the job's step 0), with the baseline evaluation of a fresh run."""
        job = self.job
        resumed = resume(job, self.checkpointer)
        start, state, data_state = resumed if resumed is not None else (0, None, None)
        if resumed is not None:
            log(f"resumed from {self.checkpointer.directory}/{start}")
        job.begin(start, data_state, self.checkpointer)
        if resumed is None:
            state = job.initial_state()
        self.writer = MetricWriter(job.workdir, start, jax.process_index() == 0)
        self.preemption = Preemption()
        self.start, self.last = start, {"step": start}
        log(job.describe(start))
        if start == 0 and self._evaluates(at_ends=True):  # the baseline: what the job does before training
            self._evaluate(0, state.params)
        # Rates, ETAs and the run's duration count the steps from here (not the set-up or the baseline).
        self.t_start = self.clock = time.time()
        self.clock_step = start
        return state

    def _steps(self, state):
        job = self.job
        rng = jax.device_put(streams.key(job.config.seed, streams.DROPOUT), sharding.replicated(job.mesh))
        pending = None  # (step, metrics) of a step whose metrics are still on the devices
        for step in range(self.start, self.steps):
            with job.context():
                batch, data_state = self.inputs.next(state.params)  # data_state: the position after this batch
                with jax.transfer_guard("disallow"):  # every host<->device copy of the step is explicit
                    state, metrics = job.train_step(state, batch, rng)
            if pending is not None:
                self._settle(*pending)
            if jax.process_count() == 1:  # several processes learn of a failed save at the next (orbax's barrier)
                self.checkpointer.check()  # a background save that failed (disk full) stops the run now
            done = step + 1
            pending = (done, metrics)
            if done < self.steps:
                job.after_step(done, state, self.inputs)
            stop = self.preemption.reached(done)
            log_due, evaluate, save = self._due(done, stop)
            if not (log_due or evaluate or save):
                continue
            self._settle(*pending)
            pending = None
            if log_due and self.interval:
                self._log(done)
            if evaluate:
                self._evaluate(done, state.params)
            if save:  # after the evaluation: a run killed before this save completes redoes both
                self.checkpointer.save(done, state, data_state, job.config, **job.checkpoint_extras())
                job.saved(done)
            if stop:
                log(f"preempted (SIGTERM): saved step {done}; rerun the same command to resume")
                self.last["preempted"] = True
                break
        return state

    def _due(self, done: int, stop: bool) -> tuple[bool, bool, bool]:
        """(log, evaluate, save) after step `done`."""
        train = self.job.config.train
        end = done == self.steps
        log_due = done % train.log_every == 0 or end
        evaluate = self._evaluates(at_ends=end) and (not train.eval_every or done % train.eval_every == 0 or end)
        save = done % train.checkpoint_every == 0 or end or stop
        return log_due, evaluate, save

    def _evaluates(self, *, at_ends: bool) -> bool:
        """Whether evaluation runs at all: train.eval_every > 0, or at the run's ends for a job that evaluates there
        anyway; and there is a dev set to evaluate on."""
        return bool(self.job.config.train.eval_every or (at_ends and self.job.evaluates_ends)) and self.job.has_dev()

    def _settle(self, step: int, metrics) -> None:
        """Reads a step's metrics back; NaN/inf in the job's finite_metrics stops the run."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        checked = self.job.finite_metrics
        if not all(math.isfinite(values[k]) for k in checked):
            try:
                self.checkpointer.wait()
            except checkpoint.CheckpointSaveError:
                pass  # the divergence is what stopped the run; latest_step leaves the failed save out
            kept = self.checkpointer.latest_step()
            found = ", ".join(f"{k} {values[k]}" for k in checked)
            last_good = f"{self.checkpointer.directory}/{kept}" if kept is not None else "none (none saved)"
            raise NonFiniteLossError(
                f"non-finite training values at step {step} ({found}); stopped without saving that state. The last "
                f"good checkpoint is {last_good}; lower optim.learning_rate or check the data, then rerun to resume "
                "from it")
        self.interval.append(values)

    def _log(self, done: int) -> None:
        now = time.time()
        summary = self.job.summarize(done, self.interval, now - self.t_start)
        rate = (done - self.clock_step) * self.job.config.train.global_batch_size / max(now - self.clock, 1e-9)
        eta = (self.steps - done) * (now - self.t_start) / max(done - self.start, 1)
        line_unit, perf_name = self.job.rate_unit
        self.writer.write(done, summary.metrics, perf={perf_name: rate, **summary.perf})
        log(f"step {done}/{self.steps} | {summary.line} | {rate:.1f} {line_unit} | ETA {duration(eta)}{summary.tail}")
        self.last.update(step=done, **summary.metrics)
        self.interval, self.clock, self.clock_step = [], now, done

    def _evaluate(self, done: int, params) -> None:
        t0 = time.time()
        results = self.job.evaluate(params)
        self.writer.write(done, results)
        log(f"eval at step {done}: {self.job.describe_eval(results, time.time() - t0)}")
        self.last.update(results)
