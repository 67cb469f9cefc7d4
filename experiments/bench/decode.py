"""decode: RAG-Token greedy / beam 4 and RAG-Sequence thorough beam 4 decoding vs the reference's `generate`, with a
BART and with a T5 generator. A case the reference cannot run (an exception in its `generate`) gets rag_jax's time
and the reference's error instead of a ratio. `--dtypes` with bfloat16 adds rows of rag_jax in bfloat16 against
the reference in float32 and under torch.autocast(bfloat16), with the share of answers identical to rag_jax's
float32 ones (--quick: one, tiny BART greedy)."""

from __future__ import annotations

import itertools
from typing import Any

import jax.numpy as jnp
import numpy as np

from experiments.bench.common import (Options, Twins, contexts, interleaved_median_seconds, median_seconds,
                                      paired_median_seconds, reference_autocast, same_answers, twins,
                                      with_compute_dtype)  # fmt: skip


def _decode_cases(pair: Twins, max_length: int) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, rag_jax GenerationConfig, the reference's generate kwargs). min_length = max_length bans EOS until
    the end, so every row generates max_length - 1 new tokens on both sides (fixed work, not the random weights'
    EOS timing)."""
    from rag_jax.readers.generation import GenerationConfig

    length = dict(max_length=max_length, min_length=max_length)
    token = lambda beams: GenerationConfig.from_hf(pair.hf_config, num_beams=beams, **length)
    sequence = GenerationConfig.for_rag_sequence(pair.hf_config, num_beams=4, **length)
    return [
        ("rag_token greedy", token(1), dict(num_beams=1, **length)),
        ("rag_token beam 4", token(4), dict(num_beams=4, **length)),
        ("rag_sequence thorough beam 4", sequence, dict(num_beams=4, do_deduplication=True, **length)),
    ]


def run(opts: Options) -> list[dict]:
    """Seconds per decoding call over a batch of questions with their K contexts, rag_jax (jitted, compiled
    during warm-up) vs RagTokenForGeneration / RagSequenceForGeneration `generate` on the same weights."""
    import torch
    import transformers

    batch, new_tokens = (4, 3) if opts.quick else (16, 20)
    rows = []
    for size, generator in itertools.product(["tiny"] if opts.quick else opts.sizes, opts.generators):
        pair = twins(size, generator)
        params = pair.state.params
        references = {"token": transformers.RagTokenForGeneration.from_pretrained(pair.hf_dir).eval(),
                      "sequence": transformers.RagSequenceForGeneration.from_pretrained(pair.hf_dir).eval()}
        k, s = pair.config.model.n_docs, pair.config.model.max_combined_length
        rng = np.random.default_rng(1)
        ids, mask = contexts(rng, pair.model, batch * k, s)
        scores = rng.normal(size=(batch, k)).astype(np.float32)
        jax_inputs = tuple(map(jnp.asarray, (ids, mask, scores)))
        torch_inputs = dict(context_input_ids=torch.as_tensor(ids, dtype=torch.long),
                            context_attention_mask=torch.as_tensor(mask, dtype=torch.long),
                            doc_scores=torch.as_tensor(scores), n_docs=k)  # fmt: skip
        for name, gen, kwargs in _decode_cases(pair, new_tokens + 1):
            run_ours = _ours(pair.model, params, jax_inputs, name, gen)
            reference = references["token" if name.startswith("rag_token") else "sequence"]

            def run_reference(dtype="float32"):
                with torch.no_grad(), reference_autocast(dtype):
                    return reference.generate(**torch_inputs, **kwargs).numpy()

            row = dict(size=size, generator=generator, decoding=name, batch=batch, n_docs=k, new_tokens=new_tokens)
            out_ours = np.asarray(run_ours())  # also the warm-up (compilation)
            try:
                out_ref = run_reference()
            except Exception as e:  # pylint: disable=broad-except (recorded in the row, not hidden)
                t_ours = median_seconds(lambda: run_ours().block_until_ready(), opts.repeats, warmup=0)
                rows.append(dict(row, dtype="float32", ours_s=t_ours,
                                 reference=f"fails: {type(e).__name__}: {str(e)[:80]}"))  # fmt: skip
                continue
            agree = same_answers(out_ours, out_ref)
            t_ours, t_ref = paired_median_seconds(lambda: run_ours().block_until_ready(), run_reference, opts.repeats,
                                                  warmup=0)  # fmt: skip
            rows.append(dict(row, dtype="float32", ours_s=t_ours, reference_s=t_ref, speedup=t_ref / t_ours,
                             same_output=agree))  # fmt: skip
            for dtype in _low_dtypes(opts, size, generator, name):
                low = _ours(with_compute_dtype(pair, dtype).model, params, jax_inputs, name, gen)
                same = same_answers(np.asarray(low()), out_ours)  # also the warm-up (compilation)
                times = interleaved_median_seconds((lambda: low().block_until_ready(), run_reference,
                                                    lambda: run_reference(dtype)), opts.repeats, warmup=0)
                rows.append(dict(row, dtype=dtype, ours_s=times[0], reference_s=times[1],
                                 reference_autocast_s=times[2], speedup_vs_reference_float32=times[1] / times[0],
                                 speedup_vs_reference_autocast=times[2] / times[0],
                                 same_output_as_ours_float32=same))  # fmt: skip
    return rows


def _ours(model, params, jax_inputs, name: str, gen):
    """rag_jax's decoding `name` as a function of nothing (jitted inside the readers)."""
    from rag_jax.readers import rag_sequence, rag_token

    if name.startswith("rag_token"):
        return lambda: rag_token.generate(model, params, *jax_inputs, gen)
    return lambda: rag_sequence.generate(model, params, *jax_inputs, gen, mode="thorough", do_deduplication=True)


def _low_dtypes(opts: Options, size: str, generator: str, name: str) -> list[str]:
    """The lower-precision dtypes to time a case in; --quick: bfloat16 on the first (tiny BART greedy) only."""
    low = [d for d in opts.dtypes if d != "float32"]
    if opts.quick:
        return ["bfloat16"] if (size, generator, name) == ("tiny", "bart", "rag_token greedy") else []
    return low

