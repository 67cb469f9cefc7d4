"""Benchmark: ScaNN recall@k against exact MIPS, and queries/s of exact (jax) vs ScaNN search.

Data are clustered synthetic vectors (Gaussian clusters, like dense passage embeddings), with held-out
queries from the same distribution.

  python -m experiments.bench.scann_recall            # 200k x 128, 1,000 queries (about a minute on 2 cores)
  python -m experiments.bench.scann_recall --quick    # 20k x 64, 200 queries (seconds)
"""

import argparse
import time

import jax
import numpy as np

from rag_jax.retrieval import exact, scann_backend


def clustered_vectors(n: int, dim: int, num_clusters: int, spread: float, seed: int) -> np.ndarray:
    """n x dim float32 points around `num_clusters` Gaussian centres (centre scale 1, noise scale `spread`)."""
    rng = np.random.default_rng(seed)
    centers_CxD = rng.normal(size=(num_clusters, dim))
    return (centers_CxD[rng.integers(0, num_clusters, n)] + spread * rng.normal(size=(n, dim))).astype(np.float32)


def _timed(fn, repeats: int):
    fn()  # Warm-up: jit compilation, ScaNN thread pool.
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run: 20k x 64, 200 queries")
    parser.add_argument("--num", type=int, default=200_000, help="corpus rows")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=1000, help="number of queries")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--clusters", type=int, default=1000, help="Gaussian clusters in the data")
    parser.add_argument("--spread", type=float, default=1.0, help="within-cluster noise scale")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each search")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.num, args.dim, args.queries, args.clusters = 20_000, 64, 200, 100

    data = clustered_vectors(args.num + args.queries, args.dim, args.clusters, args.spread, args.seed)
    q_QxD, emb_NxD = data[:args.queries], data[args.queries:]
    print(f"corpus {args.num} x {args.dim}, {args.queries} queries, k={args.k}, jax backend "
          f"{jax.default_backend()} ({len(jax.devices())} device(s))")

    start = time.perf_counter()
    exact_searcher = exact.ExactSearcher(emb_NxD)
    print(f"exact: load to device {time.perf_counter() - start:.2f}s")
    (exact_rows, _), exact_s = _timed(lambda: exact_searcher.search(q_QxD, args.k), args.repeats)

    config = scann_backend.scann_config_for(args.num)
    start = time.perf_counter()
    scann_searcher = scann_backend.ScannSearcher.build(emb_NxD, config)
    print(f"scann: build {time.perf_counter() - start:.2f}s with {config}")
    (scann_rows, _), scann_s = _timed(lambda: scann_searcher.search(q_QxD, args.k), args.repeats)

    recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(scann_rows, exact_rows)])
    print(f"scann recall@{args.k} vs exact: {recall:.4f}")
    print(f"exact (jax matmul + top_k): {args.queries / exact_s:10.0f} queries/s ({exact_s * 1e3:.1f} ms per batch)")
    print(f"scann (tree + AH + reorder): {args.queries / scann_s:10.0f} queries/s ({scann_s * 1e3:.1f} ms per batch)")


if __name__ == "__main__":
    main()
