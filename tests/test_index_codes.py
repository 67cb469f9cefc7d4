"""Compressed codes (int8, pq:M): their arithmetic, their files in an index, and search on them with an exact
re-rank, on one device and sharded over the corpus axis."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from rag_jax.retrieval import code_search, codes, exact, index_codes, index_io, index_writer

N, D = 3000, 32


def clustered(rng, n, d=D, clusters=40):
    centers = rng.standard_normal((clusters, d))
    return (centers[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


def write_index(directory, vectors, shard_size=1000, first_id=0):
    os.makedirs(directory, exist_ok=True)
    passages = os.path.join(directory, "..", os.path.basename(directory) + ".jsonl")
    with open(passages, "w") as f:
        for i in range(len(vectors)):
            f.write(json.dumps({"id": str(first_id + i), "title": f"t{i}", "text": f"passage {first_id + i}"}) + "\n")
    writer = index_writer.IndexWriter(directory, "enc", vectors.shape[1], None, shard_size, passages)
    writer.write(vectors)
    writer.finalize()
    return index_io.load_index(directory)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    rng = np.random.default_rng(0)
    vectors = clustered(rng, N)
    tmp = tmp_path_factory.mktemp("codes")
    write_index(str(tmp / "plain"), vectors)
    built = {}
    for spec in ("int8", "pq:8"):
        directory = tmp / spec.replace(":", "")
        shutil.copytree(tmp / "plain", directory)
        built[spec] = index_codes.write_codes(index_io.load_index(str(directory)), codes.parse_spec(spec),
                                              sample_size=2000, seed=3)
    queries = rng.standard_normal((24, D)).astype(np.float32)
    return {"vectors": vectors, "queries": queries, "tmp": tmp, **built}


def test_specs_parse_and_bad_ones_say_what_is_expected():
    assert codes.parse_spec("int8") == codes.CodesSpec("int8")
    assert codes.parse_spec("pq:48") == codes.CodesSpec("pq", 48)
    for bad in ("pq", "pq:0", "pq:x", "int4", ""):
        with pytest.raises(codes.CodesError, match="pq:M"):
            codes.parse_spec(bad)
    with pytest.raises(codes.CodesError, match="does not divide"):
        codes.CodesSpec("pq", 7).check_dim(32)


def test_int8_error_is_at_most_half_a_step_and_scores_match_the_decoded_rows():
    x = np.random.default_rng(1).standard_normal((64, D)).astype(np.float32)
    c, scale = codes.int8_encode(x)
    assert np.all(np.abs(np.asarray(codes.int8_decode(c, scale)) - x) <= scale[:, None] / 2 + 1e-7)
    q = np.random.default_rng(2).standard_normal((5, D)).astype(np.float32)
    decoded = np.asarray(codes.int8_decode(c, scale))
    # the question is rounded to bfloat16 (relative error <= 2^-9 a component): |error| <= 2^-9 |q| |e|
    bound = 2.0**-9 * np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(decoded, axis=1)[None, :] + 1e-5
    assert np.all(np.abs(np.asarray(codes.int8_scores(q, c, scale)) - q @ decoded.T) <= bound)


def test_pq_asymmetric_scores_are_the_dot_products_with_the_reconstruction_and_kmeans_learns():
    rng = np.random.default_rng(3)
    x = clustered(rng, 1024)
    books = codes.train_pq(x, 4, seed=0)
    untrained = codes.train_pq(x, 4, seed=0, iterations=0)  # the initial centroids: sample rows
    error = lambda b: np.mean((np.asarray(codes.pq_decode(codes.pq_encode(x, b), b)) - x) ** 2)
    assert error(books) < 0.8 * error(untrained)
    q = rng.standard_normal((6, D)).astype(np.float32)
    c = codes.pq_encode(x, books)
    want = q @ np.asarray(codes.pq_decode(c, books)).T
    np.testing.assert_allclose(np.asarray(codes.pq_scores(codes.pq_tables(q, books), c)), want, rtol=1e-4, atol=1e-4)
    rows_2x3 = np.arange(6).reshape(2, 3)  # device mode decodes the retrieved B x K rows
    np.testing.assert_array_equal(np.asarray(codes.decode_rows("pq", c[rows_2x3], None, books)),
                                  np.asarray(codes.pq_decode(c, books))[rows_2x3])


@pytest.mark.parametrize("spec", ["int8", "pq:8"])
def test_rerank_returns_the_exact_top_k_among_the_candidates(base, spec):
    index, q = base[spec], base["queries"]
    exact_rows, exact_scores = exact.ExactSearcher(base["vectors"], prescreen=False).search(q, 5)
    every = code_search.CodeSearcher(index, rerank_from_codes=N)  # every row re-ranked: exact search
    rows, scores = every.search(q, 5)
    np.testing.assert_array_equal(np.sort(rows, 1), np.sort(exact_rows, 1))
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5)
    some = code_search.CodeSearcher(index, rerank_from_codes=40)
    cand_rows, _ = some.candidates(q, 40)
    rows, scores = some.search(q, 5)
    for i in range(len(q)):  # the exact top 5 of these 40 candidates
        cand_scores = base["vectors"][cand_rows[i]] @ q[i]
        np.testing.assert_array_equal(rows[i], cand_rows[i][np.argsort(-cand_scores, kind="stable")[:5]])
    plain, _ = code_search.CodeSearcher(index).search(q, 5)  # no re-rank: the codes' own top 5
    np.testing.assert_array_equal(plain, cand_rows[:, :5])


def test_code_files_resume_and_the_identity_records_the_codebooks(base):
    directory = str(base["tmp"] / "pq8")
    recorded = index_io.load_index(directory).identity["codes"]
    assert recorded["spec"] == "pq:8" and recorded["sample_size"] == 2000 and recorded["seed"] == 3
    before = np.load(os.path.join(directory, "codes-00001.npy"))
    os.remove(os.path.join(directory, "codes-00001.npy"))  # as a killed run leaves it
    index_codes.write_codes(index_io.load_index(directory), codes.parse_spec("pq:8"), sample_size=2000, seed=3)
    np.testing.assert_array_equal(np.load(os.path.join(directory, "codes-00001.npy")), before)
    with pytest.raises(index_io.IndexFormatError, match="seed"):
        index_codes.write_codes(index_io.load_index(directory), codes.parse_spec("pq:8"), sample_size=2000, seed=4)


@pytest.mark.parametrize("spec", ["int8", "pq:8"])
def test_sharded_code_search_equals_the_single_device_one(base, spec):
    index = base[spec]
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("corpus",))
    arrays, books = code_search.sharded_code_arrays(index, mesh)
    fn = jax.jit(code_search.make_sharded_code_topk(mesh, codes.parse_spec(spec).kind, 7))
    rows, _ = fn(base["queries"], arrays, books)
    want, _ = code_search.CodeSearcher(index).candidates(base["queries"], 7)
    np.testing.assert_array_equal(np.sort(np.asarray(rows), 1), np.sort(want, 1))


def test_capacity_leaves_room_in_steps():
    assert codes.capacity(1) == 1024 and codes.capacity(1025) == 2048
    for n in (5000, 200_000, 21_000_000):
        assert n <= codes.capacity(n, 8) <= 1.13 * n + 8 and codes.capacity(n, 8) % 8 == 0
