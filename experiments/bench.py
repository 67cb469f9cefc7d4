"""Benchmarks against the references, each measured in the same process on the same machine.

  python -m experiments.bench --benchmarks=embed,mips [--quick] [--results=bench_results.jsonl]

Every sub-benchmark prints a table and appends one JSON line per row to --results. Figures are steady-state
(after warm-up) medians of repeats; ratios are reference time / rag_jax time, so > 1 means rag_jax is faster.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Callable

import jax
import numpy as np
from absl import app, flags

_BENCHMARKS = flags.DEFINE_list("benchmarks", ["embed", "mips"], "Which sub-benchmarks to run.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes: checks that every benchmark still runs.")
_RESULTS = flags.DEFINE_string("results", "bench_results.jsonl", "JSON lines file to append results to.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement (median reported).")


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() after `warmup` untimed calls; fn must block until its work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {jax.device_count()}x {jax.devices()[0].device_kind}"


def report(name: str, rows: list[dict]) -> None:
    """Prints rows as a table and appends them to the results file."""
    keys = list(rows[0])
    widths = [max(len(k), *(len(_fmt(r[k])) for r in rows)) for k in keys]
    print(f"\n== {name} ({machine()})")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for row in rows:
        print("  ".join(_fmt(row[k]).ljust(w) for k, w in zip(keys, widths)))
    with open(_RESULTS.value, "a") as f:
        for row in rows:
            f.write(json.dumps({"benchmark": name, "machine": machine(), "quick": _QUICK.value, **row}) + "\n")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------- embed


def bench_embed(quick: bool, repeats: int) -> list[dict]:
    """Passages/second of the document encoder over the bundled corpus, rag_jax vs DPRContextEncoder (torch)."""
    import itertools

    import torch
    import transformers

    from rag_jax import tokenizers
    from rag_jax.models import hf
    from rag_jax.retrieval import corpus, embed

    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if quick else dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)  # fmt: skip
    batch, n_batches = (16, 2) if quick else (64, 4)
    reference = transformers.DPRContextEncoder(transformers.DPRConfig(vocab_size=30522, **sizes)).eval()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        loaded = hf.load_encoder(tmp)
    tokenizer = tokenizers.load_question_tokenizer()
    passages = list(itertools.islice(corpus.read_passages("rag_jax/assets/nq_open_mini/passages.tsv"), batch * n_batches))
    batches = [embed.tokenize_passages(tokenizer, passages[i : i + batch], batch, 256) for i in range(0, len(passages), batch)]
    encode = embed.make_encode_fn(loaded.config)
    params = jax.device_put(loaded.params)

    def ours():
        for b in batches:
            out = encode(params, b)
        out.block_until_ready()

    torch_batches = [{k: torch.as_tensor(v, dtype=torch.long) for k, v in b.items()} for b in batches]

    def theirs():
        with torch.no_grad():
            for b in torch_batches:
                reference(**b)

    t_ours, t_ref = median_seconds(ours, repeats), median_seconds(theirs, repeats)
    n = len(passages)
    return [dict(model=f"{sizes['num_hidden_layers']}L-{sizes['hidden_size']}", passages=n, batch=batch,
                 ours_psg_per_s=n / t_ours, reference_psg_per_s=n / t_ref, speedup=t_ref / t_ours)]  # fmt: skip


# ----------------------------------------------------------------------------------------------- mips


def bench_mips(quick: bool, repeats: int) -> list[dict]:
    """Exact top-k queries/second: rag_jax on device vs faiss IndexFlatIP; ScaNN at recall >= 0.95."""
    import faiss

    from rag_jax.retrieval import exact, scann_backend

    n, dim, n_queries, k = (50_000, 128, 256, 10) if quick else (1_000_000, 768, 1024, 10)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(256, dim)).astype(np.float32)
    corpus_NxD = (centers[rng.integers(0, 256, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)
    queries = (centers[rng.integers(0, 256, n_queries)] + 0.5 * rng.normal(size=(n_queries, dim))).astype(np.float32)

    searcher = exact.ExactSearcher(corpus_NxD)
    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus_NxD)
    t_ours = median_seconds(lambda: searcher.search(queries, k), repeats)
    t_faiss = median_seconds(lambda: flat.search(queries, k), repeats)
    exact_rows, _ = searcher.search(queries, k)
    faiss_rows = flat.search(queries, k)[1]
    agreement = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact_rows, faiss_rows)]))

    scann = scann_backend.ScannSearcher.build(corpus_NxD)
    t_scann = median_seconds(lambda: scann.search(queries, k), repeats)
    scann_rows, _ = scann.search(queries, k)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(scann_rows, exact_rows)]))
    base = dict(corpus=n, dim=dim, queries=n_queries, k=k)
    return [
        dict(**base, method="rag_jax exact (jnp matmul + top_k)", qps=n_queries / t_ours, recall_vs_exact=1.0,
             speedup_vs_faiss=t_faiss / t_ours),
        dict(**base, method="faiss IndexFlatIP", qps=n_queries / t_faiss, recall_vs_exact=agreement,
             speedup_vs_faiss=1.0),
        dict(**base, method="ScaNN (tree + AH + reorder)", qps=n_queries / t_scann, recall_vs_exact=recall,
             speedup_vs_faiss=t_faiss / t_scann),
    ]  # fmt: skip


BENCHMARKS = {"embed": bench_embed, "mips": bench_mips}


def main(argv):
    del argv
    unknown = [b for b in _BENCHMARKS.value if b not in BENCHMARKS]
    if unknown:
        raise app.UsageError(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    repeats = 2 if _QUICK.value else _REPEATS.value
    for name in _BENCHMARKS.value:
        report(name, BENCHMARKS[name](_QUICK.value, repeats))


if __name__ == "__main__":
    app.run(main)
