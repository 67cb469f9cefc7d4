"""The `local` config's training step with a frozen and with a trained document encoder (issue 32): seconds per step,
timed alternately so that every case sees the same background load, against the step's model FLOPs
(rag_jax/training/flops.py). Random weights at all-MiniLM-L6-v2's shapes (the checkpoint must be installed for its
config), host retrieval with random batches (experiments.bench.common), one device.

    PYTHONPATH=. python experiments/bench/end2end_local_step.py [REPEATS] [--dropout]

--dropout adds the trained d(z) with dropout 0.1 (the flag's old default, before `local` turned it off).
"""

from __future__ import annotations

import sys
import time

import numpy as np

FROZEN = "d(z) and q(x) frozen (local)"


def make_case(trainable: bool, doc_length: int = 256, question_scale: float | None = None, doc_dropout: float = 0.0):
    """(a stepping JaxTrainer, the step's model GFLOP) for `local` with these changes."""
    from experiments.bench.common import jax_model, train_batch
    from experiments.bench.train_step import JaxTrainer, end2end_batch
    from experiments.configs import nq
    from rag_jax.training import flops

    c = nq.get_config("local")
    c.model.doc_encoder.trainable = trainable
    c.optim.question_encoder_lr_scale = question_scale
    c.index.max_length = doc_length
    c.model.doc_encoder.dropout = doc_dropout
    c.retrieval.mode = "host"  # the bench's batches come retrieved
    pair = jax_model(c)
    trainer = JaxTrainer(pair, (end2end_batch if trainable else train_batch)(c, pair.model))
    trainer.step()  # compiles
    b, k = c.train.global_batch_size, c.model.n_docs
    gflop = flops.rag_train_step_flops(pair.model, b, k, c.data.max_question_length, c.model.max_combined_length,
                                       c.data.max_target_length)
    if trainable:
        gflop += flops.trained_doc_encoder_flops(pair.model.doc_encoder_config, b, k, doc_length)
    return trainer, gflop / 1e9


def main(argv: list[str]) -> None:
    repeats = int(next((a for a in argv if a.isdigit()), 3))
    cases = {FROZEN: make_case(False, question_scale=0.0),
             "d(z) trained at 256 tokens, q(x) trained": make_case(True),
             "d(z) trained at 128 tokens, q(x) trained": make_case(True, 128)}
    if "--dropout" in argv:
        cases["d(z) trained at 256 tokens, dropout 0.1"] = make_case(True, doc_dropout=0.1)
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (trainer, _) in cases.items():
            start = time.perf_counter()
            trainer.step()
            seconds[name].append(time.perf_counter() - start)
    frozen_s, frozen_gflop = np.median(seconds[FROZEN]), cases[FROZEN][1]
    for name, (_, gflop) in cases.items():
        s = np.median(seconds[name])
        print(f"{name:42s} {s:6.2f} s/step  {s / frozen_s:5.1f}x measured  {gflop:7.1f} GFLOP  "
              f"{gflop / frozen_gflop:5.1f}x FLOPs")


if __name__ == "__main__":
    main(sys.argv[1:])
