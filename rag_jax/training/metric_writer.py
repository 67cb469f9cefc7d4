"""metrics.jsonl and TensorBoard event files of a training run."""

from __future__ import annotations

import json
import os

from rag_jax.runs import workdir as workdir_lib


class MetricWriter:
    """metrics.jsonl and TensorBoard events in the workdir, written by process 0 only.

    On a restart from step s, lines after s are dropped from metrics.jsonl (and TensorBoard purges its events after
    s), so a resumed run's records are those of an uninterrupted one.
    """

    def __init__(self, workdir: str, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = workdir_lib.metrics_file(workdir)
        self._tb = None
        if not enabled:
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        self._tb = SummaryWriter(workdir_lib.tensorboard_dir(workdir), purge_step=start_step or None)

    def write(self, step: int, metrics: dict[str, float], *, perf: dict[str, float] | None = None) -> None:
        """`metrics` go to both files; `perf` (timings, not reproducible) to TensorBoard only."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        for key, value in {**metrics, **(perf or {})}.items():
            self._tb.add_scalar(key, float(value), step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
