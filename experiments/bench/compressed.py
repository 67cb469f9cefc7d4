"""compressed: float32 / bfloat16 exact search against int8 and pq:M codes, with and without an exact re-rank.

For each kind of index: bytes per passage searched, seconds to build it from the float32 vectors (cast, or k-means +
encoding), questions/second (same process, the searches interleaved), recall@K of exact float32 search's top K and
the share of questions whose K ids equal it exactly; and the memory each kind needs for 21M x 768.

  python -m experiments.bench.compressed --corpus=nq_mini          # NQ-mini: 2,625 passages, 2,000 questions
  python -m experiments.bench.compressed --corpus=knowledge200k    # 200,000 generated passages (compressed_data.py)
  python -m experiments.bench --benchmarks=compressed --quick      # synthetic clustered vectors, seconds

The corpora's all-MiniLM-L6-v2 vectors are made (and cached under --cache) by compressed_data.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np

from experiments.bench.common import Options

K = 10
PAPER_ROWS, PAPER_DIM = 21_015_300, 768  # DPR's Wikipedia passages (psgs_w100) x BERT-base


def memory_rows(rows: int = PAPER_ROWS, dim: int = PAPER_DIM, pq_ms=(96, 192)) -> list[dict]:
    """Bytes of the searched arrays of each kind for rows x dim (what device mode spreads over the devices)."""
    from rag_jax.retrieval import codes  # pylint: disable=g-import-not-at-top

    kinds = [("float32", 4 * dim), ("bfloat16", 2 * dim), ("int8", codes.CodesSpec("int8").bytes_per_row(dim))]
    kinds += [(f"pq:{m}", codes.CodesSpec("pq", m).bytes_per_row(dim)) for m in pq_ms]
    return [{"index": name, "rows": rows, "dim": dim, "bytes_per_passage": b, "GB": round(rows * b / 1e9, 2),
             "compression": round(4 * dim / b, 1)} for name, b in kinds]


def _linked_copy(source: str, target: str) -> str:
    """The index in `source` under another name, its files hard links (codes are then written beside them)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, copy_function=os.link)
    return target


def _float_index(directory: str, passages: str, vectors: np.ndarray, dtype: str):
    from rag_jax.retrieval import index_io, index_writer  # pylint: disable=g-import-not-at-top

    target = os.path.join(directory, f"index_{dtype}")
    if index_io.read_metadata(target) is None:
        shutil.rmtree(target, ignore_errors=True)
        writer = index_writer.IndexWriter(target, "all-MiniLM-L6-v2", vectors.shape[1], None, 100_000, passages,
                                          dtype=dtype)
        writer.write(vectors)
        writer.finalize()
    return index_io.load_index(target)


def _searchers(directory: str, passages: str, vectors: np.ndarray, pq_ms, reranks, sample_size: int = 16_384
               ) -> list[tuple[dict, object]]:
    """(row, searcher) for every kind of index and re-rank width; each row says what was built and in how long."""
    from rag_jax.retrieval import code_search, codes, exact, index_codes  # pylint: disable=g-import-not-at-top

    dim = vectors.shape[1]
    float32 = _float_index(directory, passages, vectors, "float32")
    out = [({"index": "float32", "rerank": "-", "bytes_per_passage": 4 * dim, "build_s": 0.0},
            exact.ExactSearcher(float32, prescreen=False)),
           ({"index": "float32 prescreened", "rerank": "-", "bytes_per_passage": 6 * dim, "build_s": 0.0},
            exact.ExactSearcher(float32, prescreen=True))]
    start = time.perf_counter()
    bf16 = _float_index(directory, passages, vectors, "bfloat16")
    out.append(({"index": "bfloat16", "rerank": "-", "bytes_per_passage": 2 * dim,
                 "build_s": time.perf_counter() - start}, exact.ExactSearcher(bf16)))
    for spec in [codes.CodesSpec("int8")] + [codes.CodesSpec("pq", m) for m in pq_ms]:
        target = _linked_copy(float32.index_dir, os.path.join(directory, f"index_{str(spec).replace(':', '')}"))
        start = time.perf_counter()
        from rag_jax.retrieval import index_io  # pylint: disable=g-import-not-at-top

        index = index_codes.write_codes(index_io.load_index(target), spec, sample_size=sample_size, seed=0)
        built = time.perf_counter() - start
        for rerank in reranks:
            row = {"index": str(spec), "rerank": rerank, "bytes_per_passage": spec.bytes_per_row(dim),
                   "build_s": built}
            out.append((row, code_search.CodeSearcher(index, rerank_from_codes=rerank)))
    return out


def _search_all(searcher, q: np.ndarray, block: int = 512) -> np.ndarray:
    return np.concatenate([searcher.search(q[i:i + block], K)[0] for i in range(0, len(q), block)])


def measure(directory: str, passages: str, vectors: np.ndarray, questions: np.ndarray, *, pq_ms, reranks,
            timed_questions: int, repeats: int, sample_size: int = 16_384) -> list[dict]:
    """Rows of the table (module docstring) for one corpus; timings interleaved over `repeats` rounds."""
    searchers = _searchers(directory, passages, vectors, pq_ms, reranks, sample_size)
    exact_rows = _search_all(searchers[0][1], questions)
    rows = []
    for row, searcher in searchers:
        found = _search_all(searcher, questions)
        row["recall@10"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact_rows)]))
        row["same_ids"] = float(np.mean([set(a) == set(b) for a, b in zip(found, exact_rows)]))
        rows.append(row)
    timed = questions[:timed_questions]
    seconds = {i: [] for i in range(len(searchers))}
    for _, searcher in searchers:
        searcher.search(timed, K)  # warm-up: compiled for these shapes
    for _ in range(repeats):
        for i, (_, searcher) in enumerate(searchers):
            start = time.perf_counter()
            searcher.search(timed, K)
            seconds[i].append(time.perf_counter() - start)
    base = float(np.median(seconds[0]))
    for i, row in enumerate(rows):
        row["questions_per_s"] = len(timed) / float(np.median(seconds[i]))
        row["speedup_vs_float32"] = base / float(np.median(seconds[i]))
    return rows


def run(opts: Options) -> list[dict]:
    """`python -m experiments.bench --benchmarks=compressed`: synthetic clustered vectors (quick), else NQ-mini."""
    import tempfile  # pylint: disable=g-import-not-at-top

    if not opts.quick:
        return main_rows("nq_mini", "/work/cache/rag_jax_bench" if os.path.isdir("/work/cache") else
                         os.path.join(tempfile.gettempdir(), "rag_jax_bench"), repeats=opts.repeats)
    from experiments.bench import scann_recall  # pylint: disable=g-import-not-at-top

    data = scann_recall.clustered_vectors(5_128, 32, 50, 1.0, 0)
    directory = tempfile.mkdtemp(prefix="rag_jax_compressed_")
    passages = os.path.join(directory, "passages.jsonl")
    with open(passages, "w") as f:
        f.writelines(f'{{"id": "{i}", "title": "", "text": "p{i}"}}\n' for i in range(5_000))
    rows = measure(directory, passages, data[128:], data[:128], pq_ms=(8,), reranks=(0, 50), timed_questions=128,
                   repeats=1, sample_size=1_024)
    shutil.rmtree(directory, ignore_errors=True)
    return rows + memory_rows()


def main_rows(corpus: str, cache: str, repeats: int = 3, rows: int | None = None, pq_ms=(48, 96, 192),
              reranks=(0, 50, 100, 200)) -> list[dict]:
    from experiments.bench import compressed_data  # pylint: disable=g-import-not-at-top

    data = compressed_data.cached_vectors(corpus, cache, rows)
    os.makedirs(data["directory"], exist_ok=True)
    print(f"{corpus}: {data['passage_vectors'].shape} passages, {len(data['questions'])} questions, embedded in "
          f"{data['embed_seconds']:.0f}s (not in build_s)")
    rows = measure(data["directory"], data["passages"], data["passage_vectors"], data["question_vectors"],
                   pq_ms=pq_ms, reranks=reranks, timed_questions=512, repeats=repeats)
    return [{"corpus": corpus, **row} for row in rows] + memory_rows()


if __name__ == "__main__":
    from experiments.bench.common import report  # pylint: disable=g-import-not-at-top

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="nq_mini", choices=["nq_mini", "knowledge200k"])
    parser.add_argument("--cache", default="/work/cache/rag_jax_bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default="bench_results.jsonl")
    parser.add_argument("--rows", type=int, default=None, help="only the first ROWS passages (embedded so far)")
    parser.add_argument("--pq", default="48,96,192", help="pq:M variants (M values, comma-separated)")
    parser.add_argument("--reranks", default="0,50,100,200", help="re-rank widths L for the codes")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = main_rows(args.corpus, args.cache, args.repeats, args.rows, tuple(int(m) for m in args.pq.split(",")),
                     tuple(int(r) for r in args.reranks.split(",")))
    report("compressed", rows, args.results, False, seconds=time.perf_counter() - start)
