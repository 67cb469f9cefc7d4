"""The random streams of a training run, each derived from `config.seed` under its own name.

Parameters start from the seed's own key; every other stream folds a fixed number into it, so adding a stream
never changes the others (nor a run's results). The data order is numpy's, seeded with `config.seed` by the input
pipeline (rag_jax/data/pipeline.py). Inside the step, randomness is `fold_in(stream key, step)`.
"""

from __future__ import annotations

import jax

DOC_ENCODER = 1  # a randomly initialised (frozen) document encoder d(z)
DROPOUT = 2  # dropout in the training step
DENOISE = 3  # the generator's denoising warm-up: passages drawn and spans masked (training/denoise.py)


def params_key(seed: int) -> jax.Array:
    """The key of the trained parameters' random initialisation."""
    return jax.random.PRNGKey(seed)


def key(seed: int, stream: int) -> jax.Array:
    """The key of one named stream (DOC_ENCODER, DROPOUT, DENOISE)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), stream)
