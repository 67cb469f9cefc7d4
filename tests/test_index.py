"""Index directory (resumable writer, checked loading) and search backends (exact, sharded exact, ScaNN, merge)."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rag_jax.retrieval import corpus, exact, index_io, merge, passage_store, prescreen
from rag_jax.retrieval.index_io import IndexFormatError, load_index
from rag_jax.retrieval.index_writer import IndexWriter

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "rag_jax/assets/nq_open_mini"
BUNDLED = ASSETS / "passages.tsv"


def _numpy_topk(q_QxD, emb_NxD, k):
    scores_QxN = q_QxD.astype(np.float64) @ emb_NxD.astype(np.float64).T
    rows_QxK = np.argsort(-scores_QxN, axis=1, kind="stable")[:, :k]
    return rows_QxK, np.take_along_axis(scores_QxN, rows_QxK, axis=1)


def _clustered(n, d, num_clusters, rng, spread=1.0):
    centers_CxD = rng.normal(size=(num_clusters, d))
    return (centers_CxD[rng.integers(0, num_clusters, n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


def _recall(rows_QxK, ref_QxK):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(rows_QxK, ref_QxK)])


@pytest.fixture(scope="module")
def small_passages(tmp_path_factory):
    """A 53-passage TSV (prime count, so shards never divide it evenly)."""
    path = tmp_path_factory.mktemp("corpus") / "p.tsv"
    corpus.write_passages_tsv(path, [corpus.Passage(str(i + 1), f"T{i}", f"text {i}\nline") for i in range(53)])
    return path


# ----------------------------------------------------------------------------------------------- exact search


@pytest.mark.parametrize("k", [1, 7, 300])
def test_exact_equals_numpy_argsort(k):
    rng = np.random.default_rng(0)
    emb_NxD, q_QxD = rng.normal(size=(300, 24)).astype(np.float32), rng.normal(size=(9, 24)).astype(np.float32)
    rows, scores = exact.ExactSearcher(emb_NxD).search(q_QxD, k)
    ref_rows, ref_scores = _numpy_topk(q_QxD, emb_NxD, k)
    assert rows.dtype == np.int32 and scores.dtype == np.float32 and rows.shape == (9, k)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, k", [(64 * 40, 10), (64 * 40 + 37, 10), (64 * 40 + 37, 39), (500, 13), (130, 3)])
def test_grouped_top_k_preselection_equals_lax_top_k(n, k):
    """The group-max pre-selection (whole groups, a ragged tail, k close to the number of groups, scores crowded
    into a few groups, -inf padding) returns lax.top_k's values and columns."""
    rng = np.random.default_rng(n + k)
    scores = rng.normal(size=(6, n)).astype(np.float32)
    scores[0, :k] += 10.0  # row 0: the k best in the first groups; row 1: in the ragged tail
    scores[1, -k:] += 10.0
    scores[2, n // 2 :] = -np.inf  # padding rows of a sharded index
    values, cols = jax.jit(exact.grouped_top_k, static_argnums=1)(jnp.asarray(scores), k)
    ref_values, ref_cols = jax.lax.top_k(jnp.asarray(scores), k)
    np.testing.assert_array_equal(values, ref_values)
    np.testing.assert_array_equal(cols, ref_cols)


def _varied_rows(rng, n, d):
    """Clustered rows whose norms span six orders of magnitude, plus some exact zeros and subnormals."""
    rows = _clustered(n, d, 16, rng) * (10.0 ** rng.uniform(-3, 3, size=(n, 1))).astype(np.float32)
    rows[rng.random(rows.shape) < 0.02] = 0.0
    rows[:5, :3] = np.float32(1e-40)
    return rows


def _signs_of_rounding_error(x):
    """+-1 (exact in bfloat16) along each row's bfloat16 rounding error: the vector its error is largest against."""
    residual = x - np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
    return np.where(residual >= 0, 1.0, -1.0).astype(np.float32)


def test_prescreen_error_bounds_hold():
    """bfloat16 score +- its bound brackets the float64 score of every (query, row), whatever the magnitudes, and
    also where a rounding error lines up with the other vector (query signs along a row's rounding error, rows
    along a query's): the cases that need each term of the bound."""
    rng = np.random.default_rng(3)
    emb_NxD, q_QxD = _varied_rows(rng, 1000, 96), _varied_rows(rng, 12, 96)
    emb_NxD = np.concatenate([emb_NxD, _signs_of_rounding_error(q_QxD)])
    q_QxD = np.concatenate([q_QxD, _signs_of_rounding_error(emb_NxD[:12])])
    t = prescreen.tables(jnp.asarray(emb_NxD))
    approx = np.asarray(prescreen.approximate_scores(jnp.asarray(q_QxD), t), np.float64)[:, : len(emb_NxD)]
    bound = np.asarray(prescreen.error_bounds(jnp.asarray(q_QxD), t), np.float64)
    true = q_QxD.astype(np.float64) @ emb_NxD.astype(np.float64).T
    assert np.all(np.abs(true - approx) <= bound)
    assert np.median(bound / np.abs(true).clip(1e-30)) < 0.05  # and tight enough to leave rows out


@pytest.mark.parametrize("n, k", [(64 * 90, 10), (64 * 90 + 37, 10), (64 * 90 + 37, 1), (64 * 200, 50)])
def test_prescreened_search_equals_numpy_argsort(n, k):
    """The certified pre-selection returns the exact rows (ragged last group included), and certifies most."""
    rng = np.random.default_rng(n + k)
    emb_NxD, q_QxD = _clustered(n, 32, 24, rng), _clustered(24, 32, 24, rng)
    searcher = exact.ExactSearcher(emb_NxD, prescreen=True)
    rows, scores = searcher.search(q_QxD, k)
    ref_rows, ref_scores = _numpy_topk(q_QxD, emb_NxD, k)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
    _, _, certified = prescreen.prescreened_topk(jnp.asarray(q_QxD), jnp.asarray(emb_NxD),
                                                 prescreen.tables(jnp.asarray(emb_NxD)), k)  # fmt: skip
    assert np.mean(certified) > 0.9


def _near_duplicate_rows(rng):
    return (1.0 + 1e-4 * rng.normal(size=(64 * 80, 16))).astype(np.float32), 5


def _near_tied_best_rows_in_many_groups(rng):
    """One best-scoring row per group, all equal in bfloat16, the best of all in the last group: the pre-selected
    groups (the first ones, on a tie) miss it, though their rows alone look conclusive."""
    emb_NxD = 0.01 * rng.normal(size=(64 * 80, 16)).astype(np.float32)
    v = np.linspace(1.0, 2.0, 16, dtype=np.float32)
    emb_NxD[::64] = v * (1.0 + 1e-6 * np.arange(80, dtype=np.float32))[:, None]
    return emb_NxD, 1


def _near_tied_best_rows_in_two_groups(rng):
    """100 equal rows and, after them, the best row: equal to them in bfloat16 and closer to its rounding, so its
    upper bound is the lowest of the 101 and the pre-selected rows (the first C, on a tie) miss it, though the
    groups left out look conclusive."""
    emb_NxD = 0.01 * rng.normal(size=(64 * 80, 16)).astype(np.float32)
    emb_NxD[:100] = np.float32(1.00391)  # just above the midpoint of bfloat16's 1.0 and 1.0078125
    emb_NxD[100] = np.float32(1.00392)
    return emb_NxD, 1


@pytest.mark.parametrize("make_rows", [_near_duplicate_rows, _near_tied_best_rows_in_many_groups,
                                       _near_tied_best_rows_in_two_groups])
def test_uncertified_queries_are_searched_again(make_rows):
    """Where bfloat16 cannot tell the best rows apart the pre-selection is unsure, and those queries are searched
    again the plain way."""
    rng = np.random.default_rng(5)
    emb_NxD, k = make_rows(rng)
    q_QxD = np.linspace(1.0, 2.0, 16, dtype=np.float32)[None] + 0.1 * rng.normal(size=(4, 16)).astype(np.float32)
    _, _, certified = prescreen.prescreened_topk(jnp.asarray(q_QxD), jnp.asarray(emb_NxD),
                                                 prescreen.tables(jnp.asarray(emb_NxD)), k)  # fmt: skip
    assert not np.any(certified)
    rows, _ = exact.ExactSearcher(emb_NxD, prescreen=True).search(q_QxD, k)
    np.testing.assert_array_equal(rows, _numpy_topk(q_QxD, emb_NxD, k)[0])


def test_search_argument_errors():
    searcher = exact.ExactSearcher(np.ones((10, 4), np.float32))
    with pytest.raises(merge.SearchError, match="k=11 is larger than the corpus"):
        searcher.search(np.ones((2, 4), np.float32), 11)
    with pytest.raises(merge.SearchError, match="at least one"):
        searcher.search(np.ones((2, 4), np.float32), 0)
    with pytest.raises(merge.SearchError, match="Q x 4"):
        searcher.search(np.ones((2, 5), np.float32), 1)


def _need_8_devices():
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


@pytest.mark.parametrize("mesh_shape, axes, corpus_axes, query_axes, approximate", [
    ((8,), ("corpus",), "corpus", None, False),
    ((8,), ("corpus",), "corpus", None, True),  # approx_max_k path (exact on CPU, approximate on TPU).
    ((2, 4), ("data", "corpus"), "corpus", "data", False),
    ((2, 4), ("data", "corpus"), ("data", "corpus"), None, False),
])
def test_sharded_equals_single_device(mesh_shape, axes, corpus_axes, query_axes, approximate):
    _need_8_devices()
    rng = np.random.default_rng(1)
    emb_NxD, q_QxD = rng.normal(size=(1003, 32)).astype(np.float32), rng.normal(size=(6, 32)).astype(np.float32)
    mesh = jax.make_mesh(mesh_shape, axes)
    sharded = exact.ShardedExactSearcher(emb_NxD, mesh, corpus_axes=corpus_axes, query_axes=query_axes,
                                         approximate=approximate)
    assert len(sharded.embeddings_NxD.sharding.device_set) == 8
    single = exact.ExactSearcher(emb_NxD)
    for k in (1, 10, 200):  # k=200 > 126 rows per shard: every shard contributes all its rows.
        rows, scores = sharded.search(q_QxD, k)
        ref_rows, ref_scores = single.search(q_QxD, k)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # The whole corpus: same rows, same scores (order may differ between rounding-level near-ties).
    rows, scores = sharded.search(q_QxD, 1003)
    ref_rows, ref_scores = single.search(q_QxD, 1003)
    np.testing.assert_array_equal(np.sort(rows, axis=1), np.sort(ref_rows, axis=1))
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_sharded_topk_inside_user_jit_with_padding():
    _need_8_devices()
    rng = np.random.default_rng(2)
    emb_NxD, q_QxD = rng.normal(size=(61, 8)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32)
    # Padding rows score higher than any real row, so they would win if they were not masked.
    padded = np.concatenate([emb_NxD, 100 * np.ones((3, 8), np.float32)])
    fn = jax.jit(exact.make_sharded_topk(jax.make_mesh((8,), ("corpus",)), 5, num_valid=61))
    rows, _ = fn(jnp.asarray(q_QxD), jnp.asarray(padded))
    np.testing.assert_array_equal(np.asarray(rows), _numpy_topk(q_QxD, emb_NxD, 5)[0])


# ----------------------------------------------------------------------------------------------- index directory


def _embeddings(n, d, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_writer_one_go_and_load(tmp_path, small_passages):
    emb = _embeddings(53, 16)
    writer = IndexWriter(tmp_path, "enc-A", 16, None, 10, small_passages)
    assert writer.rows_done == 0 and writer.num_passages == 53
    for start in range(0, 53, 7):
        writer.write(emb[start:start + 7])
    writer.finalize()
    index = load_index(tmp_path, expected_encoder="enc-A", expected_dim=16)
    assert [s.shape[0] for s in index.shards] == [10, 10, 10, 10, 10, 3]
    np.testing.assert_array_equal(index.embeddings(), emb)
    np.testing.assert_array_equal(index.read_rows(8, 31), emb[8:31])
    assert index.passages[52].id == "53"
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["complete"] and meta["encoder_id"] == "enc-A" and meta["num_passages"] == 53


def test_writer_resume_after_interruption_equals_one_go(tmp_path, small_passages):
    emb = _embeddings(53, 16)
    one_go = tmp_path / "one_go"
    w = IndexWriter(one_go, "enc", 16, 53, 10, small_passages)
    w.write(emb)
    w.finalize()

    resumed = tmp_path / "resumed"
    w = IndexWriter(resumed, "enc", 16, 53, 10, small_passages)
    w.write(emb[:17])
    w.write(emb[17:26])
    del w  # Killed: the 6 rows past the second shard were only in memory.
    (resumed / "embeddings-00002.npy.tmp").write_bytes(b"half-written")  # A write killed before its rename.
    w = IndexWriter(resumed, "enc", 16, 53, 10, small_passages)
    assert w.rows_done == 20
    assert [p.id for p in w.passages.iter_passages(w.rows_done, w.rows_done + 2)] == ["21", "22"]
    w.write(emb[w.rows_done:])
    w.finalize()
    assert not (resumed / "embeddings-00002.npy.tmp").exists()
    for name in sorted(os.listdir(one_go)):
        if name.startswith("embeddings-"):
            assert (one_go / name).read_bytes() == (resumed / name).read_bytes(), name
    np.testing.assert_array_equal(load_index(resumed).embeddings(), emb)


@pytest.mark.parametrize("dtype, np_dtype", [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)])
def test_16bit_storage(tmp_path, small_passages, dtype, np_dtype):
    emb = _embeddings(53, 8)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # Unit vectors: each one's best match is itself.
    w = IndexWriter(tmp_path, "enc", 8, None, 20, small_passages, dtype=dtype)
    w.write(jnp.asarray(emb))
    w.finalize()
    index = load_index(tmp_path)
    assert index.shards[0].dtype == np.dtype(np_dtype)
    np.testing.assert_array_equal(index.embeddings(np.float32), emb.astype(np_dtype).astype(np.float32))
    rows, _ = exact.ExactSearcher(index).search(emb, 1)  # Still true after 16-bit rounding.
    np.testing.assert_array_equal(rows[:, 0], np.arange(53))


@pytest.mark.parametrize("field, kwargs", [
    ("encoder_id", dict(encoder_id="enc-B")),
    ("dim", dict(dim=32)),
    ("dtype", dict(dtype="float16")),
    ("shard_size", dict(shard_size=5)),
])
def test_writer_refuses_to_resume_a_different_index(tmp_path, small_passages, field, kwargs):
    args = dict(output_dir=tmp_path, encoder_id="enc-A", dim=16, num_passages=None, shard_size=10,
                passages_path=small_passages)
    IndexWriter(**args).write(_embeddings(25, 16))
    with pytest.raises(IndexFormatError, match=f"{field}=.*fresh output directory"):
        IndexWriter(**{**args, **kwargs})


def test_writer_refuses_other_passages_and_bad_writes(tmp_path, small_passages):
    w = IndexWriter(tmp_path / "i", "enc", 16, None, 10, small_passages)
    with pytest.raises(IndexFormatError, match="passages_fingerprint"):
        IndexWriter(tmp_path / "i", "enc", 16, None, 10, BUNDLED)
    assert passage_store.PassageStore(small_passages, tmp_path / "i").num_passages == 53  # Refused before touching it.
    with pytest.raises(IndexFormatError, match="num_passages=54"):
        IndexWriter(tmp_path / "j", "enc", 16, 54, 10, small_passages)
    with pytest.raises(IndexFormatError, match=r"shape \(4, 15\)"):
        w.write(np.zeros((4, 15), np.float32))
    with pytest.raises(IndexFormatError, match="past num_passages=53"):
        w.write(np.zeros((54, 16), np.float32))
    bad = np.zeros((4, 16), np.float32)
    bad[2, 3] = np.nan
    with pytest.raises(IndexFormatError, match="non-finite"):
        w.write(bad)
    w.write(np.zeros((30, 16), np.float32))
    with pytest.raises(IndexFormatError, match="only 30 of 53 rows"):
        w.finalize()


@pytest.fixture
def built_index(tmp_path, small_passages):
    w = IndexWriter(tmp_path / "index", "enc-A", 16, None, 10, small_passages)
    w.write(_embeddings(53, 16))
    return pathlib.Path(w.finalize())


def test_load_refuses_mismatches(built_index, tmp_path, small_passages):
    with pytest.raises(IndexFormatError, match="encoder_id='enc-A'.*'enc-B'"):
        load_index(built_index, expected_encoder="enc-B")
    with pytest.raises(IndexFormatError, match="dim=16.*768"):
        load_index(built_index, expected_dim=768)
    with pytest.raises(IndexFormatError, match="not an index directory"):
        load_index(tmp_path / "nowhere")

    partial = tmp_path / "partial"
    IndexWriter(partial, "enc-A", 16, None, 10, small_passages).write(_embeddings(25, 16))
    with pytest.raises(IndexFormatError, match="complete=false.*resume"):
        load_index(partial)

    os.remove(built_index / "embeddings-00003.npy")
    with pytest.raises(IndexFormatError, match="embeddings-00003.npy is missing"):
        load_index(built_index)


def test_load_refuses_changed_passages(built_index, small_passages, tmp_path):
    moved = tmp_path / "moved.tsv"
    moved.write_bytes(small_passages.read_bytes())
    assert load_index(built_index, passages_path=moved).passages[0].id == "1"
    corpus.write_passages_tsv(moved, [corpus.Passage("1", "t", "other")])
    with pytest.raises(IndexFormatError, match="passages file.*differs"):
        load_index(built_index, passages_path=moved)

    meta = json.loads((built_index / "index.json").read_text())
    meta["num_passages"] = 54
    index_io.write_metadata(str(built_index), meta)
    with pytest.raises(IndexFormatError, match="num_passages=54"):
        load_index(built_index)


IDENTITY = {"pooling": "cls", "normalize": False, "max_length": 256, "tokenizer_id": "tok-A"}


@pytest.mark.parametrize("field, value", [("max_length", 128), ("tokenizer_id", "tok-B"), ("pooling", "mean")])
def test_writer_refuses_to_resume_with_another_identity(tmp_path, small_passages, field, value):
    """Vectors made at another length, with another tokenizer or pooling must not join an index's."""
    IndexWriter(tmp_path, "enc-A", 16, None, 10, small_passages, identity=IDENTITY).write(_embeddings(25, 16))
    with pytest.raises(IndexFormatError, match=f"{field}=.*fresh output directory"):
        IndexWriter(tmp_path, "enc-A", 16, None, 10, small_passages, identity={**IDENTITY, field: value})
    assert json.loads((tmp_path / "index.json").read_text())[field] == IDENTITY[field]  # left as it was


def test_an_index_without_identity_loads_but_does_not_resume(built_index, small_passages):
    """Written before the identity was recorded: loading treats it as unknown, resuming refuses (rebuild)."""
    index = load_index(built_index)
    assert index.identity == {"encoder_id": "enc-A", "dtype": "float32"}
    index_io.check_identity(index, {"encoder_id": "enc-A", "max_length": 64}, "the model")  # unknown: not checked
    with pytest.raises(IndexFormatError, match="written before rag_jax recorded pooling.*fresh output directory"):
        IndexWriter(built_index, "enc-A", 16, None, 10, small_passages, identity=IDENTITY)


def test_check_identity_names_the_field_and_the_source(tmp_path, small_passages):
    w = IndexWriter(tmp_path, "enc-A", 16, None, 10, small_passages, identity=IDENTITY)
    w.write(_embeddings(53, 16))
    index = load_index(w.finalize())
    index_io.check_identity(index, {"encoder_id": "enc-A", **IDENTITY, "dtype": "float32"}, "the model")
    with pytest.raises(IndexFormatError, match="max_length=256, but the model M was trained with .*max_length=64"):
        index_io.check_identity(index, {**IDENTITY, "max_length": 64}, "the model M")


def test_writer_refuses_a_directory_that_holds_no_index(tmp_path, small_passages):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(IndexFormatError, match="not empty and holds no index"):
        IndexWriter(tmp_path / "mine", "enc", 16, None, 10, small_passages)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    (tmp_path / "file").write_text("a file")
    with pytest.raises(IndexFormatError, match="is a file"):
        IndexWriter(tmp_path / "file", "enc", 16, None, 10, small_passages)


def test_non_finite_vectors_never_reach_a_search(tmp_path, small_passages, built_index):
    """float16 storage turns values beyond 65504 into inf: refused when written. A damaged shard (a NaN) is refused
    when read, naming the file, the row and its passage."""
    w = IndexWriter(tmp_path / "f16", "enc", 16, None, 10, small_passages, dtype="float16")
    with pytest.raises(IndexFormatError, match="non-finite embeddings .as float16"):
        w.write(np.full((4, 16), 1e6, np.float32))
    shard = np.load(built_index / "embeddings-00002.npy")
    shard[4, 7] = np.nan
    np.save(built_index / "embeddings-00002.npy", shard)
    index = load_index(built_index)
    np.testing.assert_array_equal(index.read_rows(0, 20).shape, (20, 16))  # the rows before it read fine
    for read in (lambda: index.read_rows(0, 53), lambda: index.gather_rows([[3, 24]]),
                 lambda: exact.ExactSearcher(index)):
        with pytest.raises(IndexFormatError, match=r"embeddings-00002.npy: row 24 \(passage 25\) holds non-finite"):
            read()


# ----------------------------------------------------------------------------------------------- merge


def test_merge_topk_of_uneven_shards_equals_global():
    rng = np.random.default_rng(3)
    emb_NxD, q_QxD = rng.normal(size=(100, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    bounds = [0, 13, 14, 60, 100]
    candidates = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        k_local = min(6, hi - lo)
        rows, scores = _numpy_topk(q_QxD, emb_NxD[lo:hi], k_local)
        if k_local < 6:  # A shard with fewer rows than k pads with -1 / -inf.
            rows = np.pad(rows, ((0, 0), (0, 6 - k_local)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, 6 - k_local)), constant_values=-np.inf)
        candidates.append((rows, scores))
    rows, scores = merge.merge_topk(candidates, bounds[:-1], 6)
    ref_rows, ref_scores = _numpy_topk(q_QxD, emb_NxD, 6)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
    assert rows.dtype == np.int32 and scores.dtype == np.float32
    with pytest.raises(merge.SearchError, match="fewer than k"):
        merge.merge_topk([(np.array([[0, -1]]), np.array([[1.0, -np.inf]]))], [0], 2)


# ----------------------------------------------------------------------------------------------- ScaNN


@pytest.fixture(scope="module")
def scann_backend():
    pytest.importorskip("scann")
    from rag_jax.retrieval import scann_backend  # pylint: disable=g-import-not-at-top
    return scann_backend


@pytest.fixture(scope="module")
def clustered_20k():
    rng = np.random.default_rng(4)
    data = _clustered(20_000 + 100, 64, 100, rng)
    return data[100:], data[:100]  # (emb_NxD, held-out queries_QxD from the same distribution)


def test_scann_recall_and_save_load(scann_backend, clustered_20k, tmp_path):
    emb_NxD, q_QxD = clustered_20k
    searcher = scann_backend.ScannSearcher.build(emb_NxD)
    assert not searcher.config.brute_force and searcher.config.num_leaves == 141
    rows, scores = searcher.search(q_QxD, 10)
    ref_rows, _ = _numpy_topk(q_QxD, emb_NxD, 10)
    assert rows.dtype == np.int32 and scores.dtype == np.float32 and rows.shape == (100, 10)
    assert _recall(rows, ref_rows) >= 0.95
    # Scores are exact dot products (reordering), best first.
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q_QxD, emb_NxD[rows]), rtol=1e-4, atol=1e-3)
    assert np.all(np.diff(scores, axis=1) <= 0)

    searcher.save(tmp_path / "s")
    loaded = scann_backend.ScannSearcher.load(tmp_path / "s")
    assert loaded.config == searcher.config
    np.testing.assert_array_equal(loaded.search(q_QxD, 10)[0], rows)


def test_scann_returns_k_rows_even_when_searched_leaves_are_too_small(scann_backend, clustered_20k):
    emb_NxD, q_QxD = clustered_20k
    config = scann_backend.ScannConfig(False, num_leaves=141, leaves_to_search=1, reorder_k=50,
                                       training_sample_size=20_000)
    searcher = scann_backend.ScannSearcher.build(emb_NxD, config)
    rows, scores = searcher.search(q_QxD[:4], 600)  # ~140 rows a leaf: one leaf cannot hold 600.
    assert np.all(np.isfinite(scores)) and all(len(set(r)) == 600 for r in rows)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q_QxD[:4], emb_NxD[rows]), rtol=1e-4, atol=1e-3)


def test_scann_per_host_shards_merge(scann_backend, clustered_20k):
    emb_NxD, q_QxD = clustered_20k
    bounds = [0, 7_000, 20_000]
    searchers = [scann_backend.ScannSearcher.build(emb_NxD[lo:hi], row_offset=lo)
                 for lo, hi in zip(bounds[:-1], bounds[1:])]
    # search() already returns global rows, so the merge offsets are 0.
    rows, _ = merge.merge_topk([s.search(q_QxD, 10) for s in searchers], [0, 0], 10)
    assert _recall(rows, _numpy_topk(q_QxD, emb_NxD, 10)[0]) >= 0.95


def test_bundled_passages_end_to_end(scann_backend, tmp_path):
    """Embed the bundled corpus with seeded random vectors, build both backends, map results to passages."""
    num, dim = 2600, 32
    emb_NxD = _embeddings(num, dim, seed=5)
    writer = IndexWriter(tmp_path, "random-encoder", dim, None, 1000, BUNDLED)
    for passages_start in range(0, num, 512):
        writer.write(emb_NxD[passages_start:passages_start + 512])
    writer.finalize()
    index = load_index(tmp_path, expected_encoder="random-encoder", expected_dim=dim)

    questions = [json.loads(line) for line in open(ASSETS / "questions.jsonl", encoding="utf-8")][:20]
    gold_rows = index.passages.rows_for_ids([q["gold_passage_id"] for q in questions])
    np.testing.assert_array_equal(gold_rows, [int(q["gold_passage_id"]) - 1 for q in questions])
    # Queries near their gold passage: the gold passage must come first.
    q_QxD = emb_NxD[gold_rows] + 0.01 * _embeddings(20, dim, seed=6)

    built = scann_backend.build_scann_index(index)
    assert built.config.brute_force  # 2,600 rows is too few for a tree.
    scann = scann_backend.load_scann_index(load_index(tmp_path))
    exact_rows, exact_scores = exact.ExactSearcher(index).search(q_QxD, 5)
    scann_rows, scann_scores = scann.search(q_QxD, 5)
    np.testing.assert_array_equal(scann_rows, exact_rows)
    np.testing.assert_allclose(scann_scores, exact_scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(exact_rows[:, 0], gold_rows)
    assert [p.id for p in index.passages.get(exact_rows[:, 0])] == [str(q["gold_passage_id"]) for q in questions]
    with pytest.raises(merge.SearchError, match="larger than the corpus"):
        scann.search(q_QxD, 2601)


def test_load_scann_refuses_other_index(scann_backend, built_index, tmp_path):
    other = scann_backend.ScannSearcher.build(_embeddings(40, 16))
    other.save(built_index / scann_backend.SCANN_DIR)
    with pytest.raises(IndexFormatError, match="covers 40 rows"):
        scann_backend.load_scann_index(load_index(built_index))
