"""The index across hosts: per-host building, sharded loading that fails on every host together, ScaNN merged
over hosts, and hot-swapping an index without recompiling.

In-process tests use the 8 simulated devices; the multi-process ones start real 2-process JAX jobs on CPU
(tests/multihost_worker.py, 2 devices a process, gloo collectives) under a timeout, so a hang fails the test.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.monitoring
import numpy as np
import pytest

from rag_jax.retrieval import corpus, exact, index_io, merge
from rag_jax.retrieval.index_io import IndexFormatError, load_index
from rag_jax.retrieval.index_writer import IndexWriter
from tests import local_processes, multihost_worker, process_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 120  # Far above the few seconds a job takes: only a hang gets there.
WORDS = "river stone city music light garden winter paper engine market island forest story bridge".split()


def _passages_tsv(path, n, seed=0):
    rng = np.random.default_rng(seed)
    corpus.write_passages_tsv(path, [corpus.Passage(str(i), f"T{i}", " ".join(rng.choice(WORDS, 6)))
                                     for i in range(n)])
    return str(path)


def _numpy_scores(q_QxD, emb_NxD):
    return q_QxD.astype(np.float64) @ emb_NxD.astype(np.float64).T


def _numpy_topk(q_QxD, emb_NxD, k):
    return np.argsort(-_numpy_scores(q_QxD, emb_NxD), axis=1, kind="stable")[:, :k]


def _assert_exact_topk_up_to_near_ties(rows_QxK, q_QxD, emb_NxD):
    """`rows_QxK` are the exact top-k, best first, except that rows whose float64 scores differ by float32 rounding
    may change places (which ones do depends on the CPU's matmul kernels): their exact scores are the k best, in
    order, to 1e-5 of the largest score. A missing or misplaced row with a clearly different score fails."""
    scores_QxN = _numpy_scores(q_QxD, emb_NxD)
    k = rows_QxK.shape[1]
    best_QxK = -np.sort(-scores_QxN, axis=1)[:, :k]
    assert all(len(set(row)) == k for row in rows_QxK.tolist())
    np.testing.assert_allclose(np.take_along_axis(scores_QxN, rows_QxK, axis=1), best_QxK, rtol=0,
                               atol=1e-5 * np.abs(scores_QxN).max())


def _write_parts(out, emb_NxD, passages, num_hosts, devices_per_host, shard_size, dtype="float32"):
    """Writes every host's part in turn from this one process (what one machine building all shards does)."""
    written = []
    for host in range(num_hosts):
        w = IndexWriter(out, "enc", emb_NxD.shape[1], None, shard_size, passages, dtype, host_index=host,
                        num_hosts=num_hosts, devices_per_host=devices_per_host)
        w.write(emb_NxD[w.rows_done:w.stop_row])
        w.finalize()
        written.append(w.index_written)
    return written


def _need_8_devices():
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


# ----------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("num_passages", [1, 7, 53, 1000])
@pytest.mark.parametrize("num_hosts, devices_per_host", [(1, 1), (1, 8), (2, 4), (3, 2), (4, 1)])
def test_host_rows_are_the_rows_of_each_hosts_devices(num_passages, num_hosts, devices_per_host):
    num_devices = num_hosts * devices_per_host
    per_device = -(-num_passages // num_devices)  # The even, end-padded split a corpus axis gives.
    for host in range(num_hosts):
        devices = range(host * devices_per_host, (host + 1) * devices_per_host)
        want = (min(num_passages, devices[0] * per_device), min(num_passages, (devices[-1] + 1) * per_device))
        assert index_io.host_rows(num_passages, num_hosts, host, devices_per_host) == want
    layout = index_io.shard_layout(num_passages, 10, num_hosts, devices_per_host)
    assert [s["file"] for s in layout] == [index_io.shard_file(i) for i in range(len(layout))]
    assert [s["start"] for s in layout] == list(np.cumsum([0] + [s["rows"] for s in layout])[:-1])
    assert sum(s["rows"] for s in layout) == num_passages and all(0 < s["rows"] <= 10 for s in layout)
    for s in layout:  # No file straddles two hosts' rows.
        start, stop = index_io.host_rows(num_passages, num_hosts, s["host"], devices_per_host)
        assert start <= s["start"] and s["start"] + s["rows"] <= stop


def test_parts_written_in_turn_equal_a_single_host_build(tmp_path):
    passages = _passages_tsv(tmp_path / "p.tsv", 53)
    emb = np.random.default_rng(0).normal(size=(53, 8)).astype(np.float32)
    single = IndexWriter(tmp_path / "single", "enc", 8, None, 10, passages)
    single.write(emb)
    single.finalize()
    assert _write_parts(tmp_path / "parts", emb, passages, 3, 2, 10) == [False, False, True]
    parts = load_index(tmp_path / "parts")
    np.testing.assert_array_equal(parts.embeddings(), load_index(tmp_path / "single").embeddings())
    # Host ranges [0, 18), [18, 36), [36, 53): every host's last file is short.
    assert [s["rows"] for s in parts.metadata["shards"]] == [10, 8, 10, 8, 10, 7]
    assert parts.metadata["num_hosts"] == 3 and parts.passages[52].id == "52"
    rows = np.array([[52, 0], [17, 18]])
    np.testing.assert_array_equal(parts.gather_rows(rows), emb[rows])
    np.testing.assert_array_equal(parts.read_rows(9, 37), emb[9:37])
    # The remedy for a lost shard: delete it and rerun its host, which re-embeds from there on.
    os.remove(tmp_path / "parts" / "embeddings-00003.npy")  # Rows [28, 36) of host 1.
    w = IndexWriter(tmp_path / "parts", "enc", 8, None, 10, passages, host_index=1, num_hosts=3, devices_per_host=2)
    assert w.rows_done == 28 and not w.all_hosts_complete()
    w.write(emb[28:36])
    w.finalize()
    assert w.index_written
    np.testing.assert_array_equal(load_index(tmp_path / "parts").embeddings(), emb)


def test_a_host_resumes_its_own_part_and_leaves_the_others_alone(tmp_path):
    passages = _passages_tsv(tmp_path / "p.tsv", 53)
    emb = np.random.default_rng(1).normal(size=(53, 8)).astype(np.float32)
    out = tmp_path / "i"
    host0 = IndexWriter(out, "enc", 8, None, 10, passages, host_index=0, num_hosts=2)
    (out / "embeddings-00000.npy.a1b2.tmp").write_bytes(b"host 0 is writing this right now")
    w = IndexWriter(out, "enc", 8, None, 10, passages, host_index=1, num_hosts=2)
    assert (w.start_row, w.stop_row, w.rows_done) == (27, 53, 27)
    w.write(emb[27:45])
    del w  # Killed with 8 rows only in memory.
    w = IndexWriter(out, "enc", 8, None, 10, passages, host_index=1, num_hosts=2)
    assert w.rows_done == 37
    with pytest.raises(IndexFormatError, match=r"past row 53, the end of host 1's rows \[27, 53\)"):
        w.write(np.zeros((17, 8), np.float32))
    w.write(emb[37:53])
    w.finalize()
    assert not w.index_written  # Host 0 has not finished.
    assert (out / "embeddings-00000.npy.a1b2.tmp").exists()  # Host 1 never touches host 0's files.
    with pytest.raises(IndexFormatError, match="multi-host build in progress.*rerun build_index on every host"):
        load_index(out)
    host0.write(emb[:27])
    host0.finalize()
    assert host0.index_written
    rerun = IndexWriter(out, "enc", 8, None, 10, passages, host_index=0, num_hosts=2)
    assert rerun.rows_done == rerun.stop_row == 27  # Nothing left to do; its own leftovers are cleaned up.
    assert not (out / "embeddings-00000.npy.a1b2.tmp").exists()
    np.testing.assert_array_equal(load_index(out).embeddings(), emb)
    with pytest.raises(IndexFormatError, match="num_hosts=2.*num_hosts=1.*fresh output directory"):
        IndexWriter(out, "enc", 8, None, 10, passages)


def test_build_index_host_parts_equal_single_host(tmp_path):
    passages = _passages_tsv(tmp_path / "p.tsv", 21)
    single = multihost_worker.build_tiny(passages, str(tmp_path / "single"))
    assert multihost_worker.build_tiny(passages, str(tmp_path / "parts"), host_index=1, num_hosts=2) is None
    parts = multihost_worker.build_tiny(passages, str(tmp_path / "parts"), host_index=0, num_hosts=2)
    assert parts.metadata["num_hosts"] == 2 and parts.num_passages == 21
    np.testing.assert_allclose(parts.embeddings(), single.embeddings(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- sharded loading


@pytest.fixture
def two_host_index(tmp_path):
    """A float16 index of 61 rows written as 2 host parts for 4 devices each, with uneven shard files."""
    passages = _passages_tsv(tmp_path / "p.tsv", 61)
    emb = np.random.default_rng(2).normal(size=(61, 12)).astype(np.float32)
    _write_parts(tmp_path / "index", emb, passages, 2, 4, 7, dtype="float16")
    return tmp_path / "index", emb.astype(np.float16)


def test_sharded_search_of_a_two_host_index_equals_single_device(two_host_index):
    _need_8_devices()
    out, emb = two_host_index
    index = load_index(out, check_shards=False)
    q_QxD = np.random.default_rng(3).normal(size=(5, 12)).astype(np.float32)
    for mesh, axes in [(jax.make_mesh((8,), ("corpus",)), "corpus"),
                       (jax.make_mesh((2, 4), ("data", "model")), ("data", "model"))]:
        sharded = exact.ShardedExactSearcher(index, mesh, corpus_axes=axes)
        single = exact.ExactSearcher(emb)
        for k in (1, 10, 61):
            rows, scores = sharded.search(q_QxD, k)
            ref_rows, ref_scores = single.search(q_QxD, k)
            np.testing.assert_array_equal(np.sort(rows, axis=1), np.sort(ref_rows, axis=1))
            np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(sharded.search(q_QxD, 10)[0], _numpy_topk(q_QxD, emb, 10))


@pytest.mark.parametrize("breakage", ["missing", "wrong_dim"])
def test_broken_shard_names_the_host_the_file_and_the_remedy(two_host_index, breakage):
    _need_8_devices()
    out, _ = two_host_index
    victim = out / "embeddings-00004.npy"  # Rows 28..31, on host 0's second half.
    if breakage == "missing":
        victim.unlink()
        what = "embeddings-00004.npy is missing"
    else:
        np.save(victim, np.zeros((4, 13), np.float16))
        what = r"embeddings-00004.npy has shape \(4, 13\).*expected \(4, 12\)"
    index = load_index(out, check_shards=False)  # Lazy: a pod host only opens its own files.
    with pytest.raises(IndexFormatError, match=f"host 0 of 1 .*needs rows \\[0, 61\\).*{what}.*build_index"):
        exact.ShardedExactSearcher(index, jax.make_mesh((8,), ("corpus",)))
    with pytest.raises(IndexFormatError, match=what):
        load_index(out)


# ----------------------------------------------------------------------------------------------- hot-swap


class _CompileCounter:
    """Counts XLA compilations while active: jax's backend-compile monitoring event, or its persistent-cache
    retrieval (the suite's processes share a compilation cache, tests/process_env.py: a program another test
    compiled is read back, not compiled)."""

    _EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")

    def __init__(self):
        self.names: list[str] = []

    def _listener(self, event, duration, **kwargs):
        del duration
        if event in self._EVENTS:
            self.names.append(kwargs.get("fun_name", event))

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def test_hot_swap_replaces_the_index_without_recompiling(tmp_path):
    _need_8_devices()
    passages = _passages_tsv(tmp_path / "p.tsv", 40)
    rng = np.random.default_rng(4)
    emb_2016, emb_2018 = rng.normal(size=(2, 40, 16)).astype(np.float32)
    for name, emb in [("2016", emb_2016), ("2018", emb_2018)]:
        _write_parts(tmp_path / name, emb, passages, 2, 4, 8)
    q_QxD = rng.normal(size=(3, 16)).astype(np.float32)
    mesh = jax.make_mesh((8,), ("corpus",))

    searcher = exact.ShardedExactSearcher(load_index(tmp_path / "2016"), mesh)
    np.testing.assert_array_equal(searcher.search(q_QxD, 5)[0], _numpy_topk(q_QxD, emb_2016, 5))
    one_device = exact.ExactSearcher(emb_2016)
    one_device.search(q_QxD, 5)
    fn = searcher.search_fn(5)
    with _CompileCounter() as compiles:
        searcher.swap_index(load_index(tmp_path / "2018"))
        rows, _ = searcher.search(q_QxD, 5)
        one_device.swap_index(emb_2018)
        one_rows, _ = one_device.search(q_QxD, 5)
    assert compiles.names == []
    assert searcher.search_fn(5) is fn and fn._cache_size() == 1
    with _CompileCounter() as compiles:  # The counter does see compilations: a new k compiles a new search.
        searcher.search(q_QxD, 6)
    assert compiles.names
    np.testing.assert_array_equal(rows, _numpy_topk(q_QxD, emb_2018, 5))
    np.testing.assert_array_equal(one_rows, rows)
    assert searcher.index.index_dir == str(tmp_path / "2018")

    _write_parts(tmp_path / "wider", rng.normal(size=(40, 24)).astype(np.float32), passages, 2, 4, 8)
    _write_parts(tmp_path / "half", emb_2016.astype(np.float16), passages, 2, 4, 8, dtype="float16")
    for name, what in [("wider", "40 x 24 float32"), ("half", "40 x 16 float16")]:
        with pytest.raises(merge.SearchError, match=f"swap_index: .*{name} holds {what}.*compiled for 40 x 16 float32"):
            searcher.swap_index(load_index(tmp_path / name))
    with pytest.raises(merge.SearchError, match="holds 39 x 16 float32.*build a new searcher"):
        one_device.swap_index(emb_2016[:39])
    # A searcher that casts on the way in accepts a float16 index of the same shape, still without compiling.
    cast = exact.ShardedExactSearcher(emb_2016, mesh, dtype=np.float32)
    cast.search(q_QxD, 5)
    with _CompileCounter() as compiles:
        cast.swap_index(load_index(tmp_path / "half"))
        cast.search(q_QxD, 5)
    assert compiles.names == []


# ----------------------------------------------------------------------------------------------- 2 processes


def _run_job(mode: str, workdir) -> list[tuple[int, str]]:
    """Runs the 2-process job; returns each process's (exit code, output). Fails the test if it hangs."""
    port = local_processes.free_port()
    env = process_env.command_env(devices=2)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", mode, str(workdir), str(port), str(i)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    deadline, results = time.monotonic() + JOB_TIMEOUT_S, []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the 2-process {mode!r} job did not finish within {JOB_TIMEOUT_S}s (hang)")
    return results


@pytest.mark.multiprocess
def test_two_hosts_build_load_and_search(tmp_path):
    rng = np.random.default_rng(5)
    small = _passages_tsv(tmp_path / "small.tsv", 37)
    # Hosts that do not share a disk: each copy of an index holds only the shards its host built.
    local_emb = rng.normal(size=(37, 8)).astype(np.float32)
    _write_parts(tmp_path / "local-0", local_emb, small, 2, 2, 5)
    shutil.copytree(tmp_path / "local-0", tmp_path / "local-1")
    for shard in load_index(tmp_path / "local-0").metadata["shards"]:
        os.remove(tmp_path / f"local-{1 - shard['host']}" / shard["file"])
    centers = rng.normal(size=(50, 32))
    big_emb = (centers[rng.integers(0, 50, 10_000)] + rng.normal(size=(10_000, 32))).astype(np.float32)
    big_q = (centers[rng.integers(0, 50, 100)] + rng.normal(size=(100, 32))).astype(np.float32)
    _passages_tsv(tmp_path / "big.tsv", 10_000)
    small_q = rng.normal(size=(6, multihost_worker.TINY_BERT["hidden_size"])).astype(np.float32)
    local_q = rng.normal(size=(4, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", small_q=small_q, local_q=local_q, big_emb=big_emb, big_q=big_q)

    for code, out in _run_job("good", tmp_path):
        assert code == 0, out
    r0, r1 = (dict(np.load(tmp_path / f"result-{i}.npz")) for i in (0, 1))
    for key in r0:
        if key != "scann_local":
            np.testing.assert_array_equal(r0[key], r1[key], err_msg=key)  # Every host gets the same answer.

    # (a) The directory both hosts wrote loads and equals a single-host build of the same passages.
    built = load_index(tmp_path / "built", expected_encoder="tiny")
    assert built.metadata["num_hosts"] == 2 and {s["host"] for s in built.metadata["shards"]} == {0, 1}
    single = multihost_worker.build_tiny(small, str(tmp_path / "single"))
    np.testing.assert_allclose(built.embeddings(), single.embeddings(), rtol=1e-5, atol=1e-6)
    assert [p.id for p in built.passages.get(range(37))] == [p.id for p in single.passages.get(range(37))]
    # (b) Exact search sharded over the 4 devices of 2 hosts equals one-device exact search.
    ref_rows, ref_scores = exact.ExactSearcher(single).search(small_q, 5)
    np.testing.assert_array_equal(r0["built_rows"], ref_rows)
    np.testing.assert_allclose(r0["built_scores"], ref_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(r0["local_rows"], _numpy_topk(local_q, local_emb, 3))
    # Up to float32 near-ties (the bfloat16 pre-selection's rescoring sums in another order than a plain float32
    # matmul; measured: rows 6 and 7 of one of the 100 queries change places on an AVX2 CPU, none on an AVX-512 one).
    _assert_exact_topk_up_to_near_ties(r0["sharded_big_rows"], big_q, big_emb)
    exact_big = _numpy_topk(big_q, big_emb, 10)
    # (d) ScaNN per host (5,000 rows each, a real tree), merged over the 2 hosts.
    assert r0["scann_local"].tolist() == [0, 5_000] and r1["scann_local"].tolist() == [5_000, 5_000]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r0["scann_rows"], exact_big)])
    assert recall >= 0.95, recall
    np.testing.assert_allclose(r0["scann_scores"], np.einsum("qd,qkd->qk", big_q, big_emb[r0["scann_rows"]]),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.multiprocess
@pytest.mark.parametrize("breakage, host", [("missing", 1), ("wrong_dim", 0)])
def test_a_host_with_a_broken_shard_stops_both_hosts(tmp_path, breakage, host):
    passages = _passages_tsv(tmp_path / "p.tsv", 40)
    emb = np.random.default_rng(6).normal(size=(40, 8)).astype(np.float32)
    _write_parts(tmp_path / "index", emb, passages, 2, 2, 5)
    victim = next(s["file"] for s in load_index(tmp_path / "index").metadata["shards"] if s["host"] == host)
    if breakage == "missing":
        os.remove(tmp_path / "index" / victim)
    else:
        np.save(tmp_path / "index" / victim, np.zeros((5, 9), np.float32))
    results = _run_job("load", tmp_path)
    for code, out in results:
        assert code != 0, out
        assert f"host {host} of 2" in out and victim in out and "build_index" in out, out
        assert f"host {1 - host} of 2" not in out and "loaded and searched" not in out, out
