"""host_train: host-mode training steps per second on the `local` config with retrieval.mode="host" (q(x) on the
devices, exact search, passages read, contexts formed and tokenised on the host), the three ways
rag_jax/training/inputs.py StepInputs can feed the step:

  sequential     retrieval.prefetch=false: all host work of a step between the device steps (the reference's way)
  overlap        the default: step s+1's parameter-independent host work (reading, tokenising, decoding the
                 questions, gold rows, question arrays to the devices) runs while step s computes; same parameters
  stale_prefetch retrieval.stale_prefetch=true: step s+1's encoding, search and context assembly too, with the
                 parameters step s starts from (one step stale; identical results here, where local freezes q(x))

One process, one model and index: chunks of steps of the three variants alternate (sequential, overlap, stale,
sequential, ...) so that all see the same background load, after one untimed chunk each (compilation). The loop
around the step is the training loop's: the next batch, the step, the previous step's metrics fetched. A fourth
timing, the batches alone (the sequential variant's host work, q(x) and search, without the steps), gives their
share of a sequential step and so the most any overlap can gain: (inputs + rest) / max(inputs, rest).
--quick runs the `tiny` config for a few steps (no figures) in a fresh temporary workdir. The `local` workdir (with
its index, built on the first run: minutes on a CPU) is kept under the temporary directory for the next run, and
rebuilt when this code's encoder or config no longer matches it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

VARIANTS = (("sequential", False, False), ("overlap", True, False), ("stale_prefetch", True, True))


def run(opts) -> list[dict]:
    from experiments.configs import nq
    from rag_jax.runs import config_check
    from rag_jax.training import loop

    config = nq.get_config("tiny" if opts.quick else "local")
    config.retrieval.mode = "host"
    config.denoise.steps = 0  # timing only: no warm-up of the generator
    if opts.quick:
        with tempfile.TemporaryDirectory(prefix="rag_jax_bench_host_train_") as workdir:
            return _timed_rows(opts, config, loop.setup(config, workdir))
    workdir = os.path.join(tempfile.gettempdir(), "rag_jax_bench_host_train", "local")
    try:
        run_ = loop.setup(config, workdir)
    except config_check.ConfigError as error:  # a workdir of older code: rebuild it
        print(f"host_train: rebuilding {workdir}: {error}")
        shutil.rmtree(workdir)
        run_ = loop.setup(config, workdir)
    return _timed_rows(opts, config, run_)


def _timed_rows(opts, config, run_) -> list[dict]:
    import jax

    from rag_jax import sharding
    from rag_jax.runs import streams
    from rag_jax.training import inputs, loop

    steps = 2 if opts.quick else 10  # per timed chunk
    state = run_.initial_state()
    pipeline = loop.make_pipeline(run_)
    rng = jax.device_put(streams.key(config.seed, streams.DROPOUT), sharding.replicated(run_.mesh))

    def chunk(overlap: bool, stale: bool) -> float:
        nonlocal state
        start = time.perf_counter()
        step_inputs = inputs.StepInputs(run_.batches, pipeline, steps, overlap=overlap, stale=stale)
        pending = None
        try:
            for _ in range(steps):
                with sharding.use(run_.mesh):
                    batch, data_state = step_inputs.next(state.params)
                    with jax.transfer_guard("disallow"):
                        state, metrics = run_.train_step(state, batch, rng, run_.corpus)
                if pending is not None:
                    jax.device_get(pending)
                pending = metrics
            jax.device_get(pending)
        finally:
            step_inputs.close()
        pipeline.set_state(data_state)
        return time.perf_counter() - start

    def host_alone() -> float:
        start = time.perf_counter()
        step_inputs = inputs.StepInputs(run_.batches, pipeline, steps, overlap=False)
        try:
            for _ in range(steps):
                with sharding.use(run_.mesh):
                    batch, data_state = step_inputs.next(state.params)
                jax.block_until_ready(batch)
        finally:
            step_inputs.close()
        pipeline.set_state(data_state)
        return time.perf_counter() - start

    for _, overlap, stale in VARIANTS:  # compilation, warm caches
        chunk(overlap, stale)
    host_alone()
    times: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    host_times = []  # the batches alone
    for _ in range(opts.repeats):
        for name, overlap, stale in VARIANTS:
            times[name].append(chunk(overlap, stale))
        host_times.append(host_alone())

    sequential, host = statistics.median(times["sequential"]), statistics.median(host_times)
    bound = sequential / max(host, sequential - host)
    rows = []
    for name, _, _ in VARIANTS:
        seconds = statistics.median(times[name])
        rows.append(dict(variant=name, config="tiny" if opts.quick else "local", retrieval="host",
                         global_batch=config.train.global_batch_size, n_docs=config.model.n_docs,
                         steps_per_s=steps / seconds, examples_per_s=steps * config.train.global_batch_size / seconds,
                         speedup=sequential / seconds, inputs_ms_per_step=host / steps * 1e3,
                         inputs_share=host / sequential, speedup_bound=bound))
    return rows
