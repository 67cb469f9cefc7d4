"""Benchmarks against the references, each measured in the same process on the same machine.

  python -m experiments.bench --benchmarks=train_step,decode,embed,mips,eval,host,host_train,retriever_step,mfu,compressed,fid
      [--quick] [--sizes=tiny,small] [--generators=bart,t5] [--dtypes=float32,bfloat16] [--results=bench_results.jsonl]

Sub-benchmarks:
  train_step  one RAG-Sequence training step (forward, backward, clipped AdamW), rag_jax's real jitted step vs
              transformers' RagSequenceForGeneration + torch.optim.AdamW on the same weights and batch; and the
              end-to-end step (trained document encoder) vs transformers' context-encoder training mode
  decode      RAG-Token greedy / beam 4 and RAG-Sequence thorough beam 4 decoding vs the reference's `generate`
  embed       document encoder passages/second vs DPRContextEncoder
  mips        exact top-k vs faiss IndexFlatIP; ScaNN
  eval        eval_nq as a whole process vs transformers' evaluation loop (eval_rag.py's), same weights, index
              contents and questions: RAG-Token greedy, RAG-Sequence thorough beam 2
  host        the host side of host-mode retrieval alone at the paper config's per-host shapes, next to the v4-32
              device step time compile_nq implies at 50% utilisation
  host_train  host-mode training steps/s on the local config: step s+1's host work overlapped with step s (and
              also retrieved one step stale, retrieval.stale_prefetch) vs the same loop without overlap
  retriever_step  one DPR bi-encoder training step (train_retriever's) vs transformers' DPR encoders + torch AdamW
  mfu         accelerators only: the `paper` (and `paper_t5`) config step in bf16 as a fraction of the device's
              peak FLOP/s (model FLOPs from rag_jax/training/flops.py), and exact MIPS bytes/second as a fraction of
              HBM bandwidth

  compressed  float32 / bfloat16 exact search vs int8 and pq:M codes with and without an exact re-rank: bytes per
              passage, build seconds, questions/s, recall@10 and identical top-10 share against exact float32 (NQ-mini
              passages; `python -m experiments.bench.compressed --corpus=knowledge200k` for 200k); memory for 21M x 768
  fid         Fusion-in-Decoder's train step (model.reader=fid) and greedy / beam 4 decoding vs a PyTorch FiD built as
              facebookresearch/FiD builds it (transformers' T5 / BART, the encoder over the B*K passages, outputs
              concatenated per question; AdamW; generate with that encoder output)

Every sub-benchmark prints a table and appends one JSON line per row to --results. Figures are steady-state
(after warm-up, so compilation is excluded) medians of repeats; ratios are reference time / rag_jax time, so > 1
means rag_jax is faster. torch flushes denormals to zero, as XLA:CPU does (common.reference_floats_like_xla).
--quick runs everything at tiny sizes, to check that it still runs (not for figures).

One module per sub-benchmark (experiments/bench/<name>.py, each with `run(options) -> rows`); what they share is
in common.py. experiments/bench/scann_recall.py is the separate ScaNN leaves-fraction study.
"""

from __future__ import annotations

import time

from absl import app, flags

from experiments.bench import BENCHMARKS
from experiments.bench import compressed, decode, embed, eval as eval_bench, host, host_train, mfu, mips, retriever_step
from experiments.bench import fid, train_step
from experiments.bench.common import GENERATORS, Options, reference_floats_like_xla, report
from rag_jax.runs.config_fields import COMPUTE_DTYPES

# Plain imports, not importlib, so that the import contracts (.importlinter) see what the benchmarks import.
_MODULES = {"train_step": train_step, "decode": decode, "embed": embed, "mips": mips, "eval": eval_bench, "host": host,
            "host_train": host_train, "retriever_step": retriever_step, "mfu": mfu, "compressed": compressed,
            "fid": fid}
assert tuple(_MODULES) == BENCHMARKS, "experiments/bench/__init__.py BENCHMARKS and _MODULES list the same modules"

_BENCHMARKS = flags.DEFINE_list("benchmarks", list(BENCHMARKS), f"Which sub-benchmarks to run, of {list(BENCHMARKS)}.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes: checks that every benchmark still runs.")
_RESULTS = flags.DEFINE_string("results", "bench_results.jsonl", "JSON lines file to append results to.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement (median reported).")
_SIZES = flags.DEFINE_list("sizes", ["tiny", "small"], "Model sizes for train_step and decode (tiny, small).")
_GENERATORS = flags.DEFINE_list("generators", list(GENERATORS),
                                "Generator architectures for train_step, decode, eval, host and mfu (bart, t5).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "model.compute_dtype rows of train_step, decode and embed "
                            "(float32, bfloat16): bfloat16 rows time rag_jax in bfloat16 against the reference in "
                            "float32 and under torch.autocast(bfloat16). --quick adds one tiny bfloat16 row.")
_MFU_BATCH = flags.DEFINE_integer("mfu_batch_per_device", 8, "mfu: questions per device in the paper-config step.")
_EVAL_SCALE = flags.DEFINE_float("eval_questions_scale", 1.0, "eval: fraction of the 2,620 / 655 questions to answer.")
_MFU_MIPS_ROWS = flags.DEFINE_integer("mfu_mips_rows", 4_000_000, "mfu: corpus rows (x 768 float32) on the device.")


def main(argv):
    del argv
    unknown = [b for b in _BENCHMARKS.value if b not in BENCHMARKS]
    unknown += [f"size {s}" for s in _SIZES.value if s not in ("tiny", "small")]
    unknown += [f"generator {g}" for g in _GENERATORS.value if g not in GENERATORS]
    unknown += [f"dtype {d}" for d in _DTYPES.value if d not in COMPUTE_DTYPES]
    if unknown:
        raise app.UsageError(f"unknown {unknown}; benchmarks are {list(BENCHMARKS)}, sizes tiny and small, "
                             f"generators {list(GENERATORS)}, dtypes {list(COMPUTE_DTYPES)}")
    opts = Options(quick=_QUICK.value, repeats=1 if _QUICK.value else _REPEATS.value, sizes=tuple(_SIZES.value),
                   generators=tuple(_GENERATORS.value), dtypes=tuple(_DTYPES.value),
                   mfu_batch_per_device=_MFU_BATCH.value, mfu_mips_rows=_MFU_MIPS_ROWS.value,
                   eval_questions_scale=_EVAL_SCALE.value)
    reference_floats_like_xla()
    for name in _BENCHMARKS.value:
        start = time.perf_counter()
        rows = _MODULES[name].run(opts)
        report(name, rows, _RESULTS.value, opts.quick, seconds=time.perf_counter() - start)


if __name__ == "__main__":
    app.run(main)
