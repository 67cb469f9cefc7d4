"""The small pieces of a training run's lifecycle (trainer.py) that index refreshes use too: progress lines on
process 0, durations, and noticing preemption (SIGTERM)."""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Preemption:
    """SIGTERM (TPU VM preemption, `kill`) -> save at the next step and return. Multi-process jobs use JAX's
    preemption sync point so that every host stops at the same step."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handler)
            except ValueError:  # not the main thread: no handler, no preemption saves
                self._previous = None

    def _handler(self, signum, frame):
        del signum, frame
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled
                return False
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
