"""mips: exact top-k queries/second, rag_jax vs faiss IndexFlatIP; ScaNN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import Options, median_seconds


def _clustered(rng: np.random.Generator, centers_CxD: np.ndarray, rows: int, chunk: int = 65_536) -> np.ndarray:
    """rows float32 vectors around random centers (ScaNN's partitioning needs structure; uniform noise has none),
    generated in chunks so that a 1M x 768 corpus needs no float64 temporaries."""
    out = np.empty((rows, centers_CxD.shape[1]), np.float32)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        out[start : start + n] = centers_CxD[rng.integers(0, len(centers_CxD), n)]
        out[start : start + n] += 0.5 * rng.standard_normal((n, centers_CxD.shape[1]), dtype=np.float32)
    return out


def _recall(rows_QxK: np.ndarray, exact_QxK: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(rows_QxK, exact_QxK)]))


def run(opts: Options) -> list[dict]:
    """Exact top-k queries/second: rag_jax on device vs faiss IndexFlatIP; ScaNN at recall >= 0.95. One index in
    memory at a time (a 1M x 768 float32 corpus is 3 GB; each index keeps its own copy)."""
    import gc

    import faiss

    from rag_jax.retrieval import exact, prescreen, scann_backend

    n, dim, n_queries, k = (50_000, 128, 256, 10) if opts.quick else (1_000_000, 768, 1024, 10)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((256, dim), dtype=np.float32)
    corpus_NxD = _clustered(rng, centers, n)
    queries = _clustered(rng, centers, n_queries)

    searcher = exact.ExactSearcher(corpus_NxD, prescreen=False)
    t_plain = median_seconds(lambda s=searcher: s.search(queries, k), opts.repeats)
    exact_rows, _ = searcher.search(queries, k)
    del searcher
    gc.collect()

    searcher = exact.ExactSearcher(corpus_NxD, prescreen=True)
    t_ours = median_seconds(lambda s=searcher: s.search(queries, k), opts.repeats)
    prescreened_rows, _ = searcher.search(queries, k)
    emb_NxD = searcher.embeddings_NxD
    del searcher
    gc.collect()
    certified = np.asarray(jax.jit(prescreen.prescreened_topk, static_argnames="k")(
        jnp.asarray(queries), emb_NxD, prescreen.tables(emb_NxD), k=k)[2])  # queries the search had to redo  # fmt: skip
    del emb_NxD
    gc.collect()

    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus_NxD)
    t_faiss = median_seconds(lambda f=flat: f.search(queries, k), opts.repeats)
    faiss_rows = flat.search(queries, k)[1]
    del flat
    gc.collect()
    agreement = _recall(faiss_rows, exact_rows)

    scann = scann_backend.ScannSearcher.build(corpus_NxD)
    t_scann = median_seconds(lambda: scann.search(queries, k), opts.repeats)
    scann_rows, _ = scann.search(queries, k)
    recall = _recall(scann_rows, exact_rows)
    base = dict(corpus=n, dim=dim, queries=n_queries, k=k)
    return [
        dict(**base, method="rag_jax exact, float32 matmul + top_k", qps=n_queries / t_plain, recall_vs_exact=1.0,
             speedup_vs_faiss=t_faiss / t_plain),
        dict(**base, method="rag_jax exact, certified bfloat16 pre-selection", qps=n_queries / t_ours,
             recall_vs_exact=_recall(prescreened_rows, exact_rows), speedup_vs_faiss=t_faiss / t_ours,
             certified=float(np.mean(certified))),
        dict(**base, method="faiss IndexFlatIP", qps=n_queries / t_faiss, recall_vs_exact=agreement,
             speedup_vs_faiss=1.0),
        dict(**base, method="ScaNN (tree + AH + reorder)", qps=n_queries / t_scann, recall_vs_exact=recall,
             speedup_vs_faiss=t_faiss / t_scann),
    ]  # fmt: skip
