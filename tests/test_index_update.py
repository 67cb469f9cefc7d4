"""Passages added to and removed from an index without a rebuild: new versions published atomically, searchers that
never return removed rows, compaction, a resumed update, and kill -9 at every step of one (old or new, never a
mix)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from rag_jax.retrieval import code_search, codes, corpus, exact, index_codes, index_io, index_update, retriever
from tests.test_index_codes import clustered, write_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 16


def fake_embed(passages):
    """A deterministic 'encoder': a unit vector drawn from the passage id (so a re-embedding gives the same rows, and
    a passage's own vector is its best match)."""
    vectors = np.stack([np.random.default_rng(int(p.id)).standard_normal(D) for p in passages])
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def write_passages(path, ids):
    with open(path, "w") as f:
        for i in ids:
            f.write(json.dumps({"id": str(i), "title": f"t{i}", "text": f"passage {i}"}) + "\n")
    return str(path)


def identity(index):
    return {k: v for k, v in index.identity.items() if k in index_io.IDENTITY_FIELDS}


@pytest.fixture()
def index_dir(tmp_path):
    """An index of 1,200 rows made by fake_embed (ids 0..1199) with int8 codes."""
    ids = np.arange(1200)
    vectors = fake_embed([corpus.Passage(str(i), "", "") for i in ids])
    index = write_index(str(tmp_path / "index"), vectors, shard_size=500)
    index_codes.write_codes(index, codes.parse_spec("int8"))
    return str(tmp_path / "index")


def test_added_passages_are_found_and_old_readers_keep_their_version(index_dir, tmp_path):
    old = index_io.load_index(index_dir)
    added = write_passages(tmp_path / "new.jsonl", range(5000, 5100))
    new = index_update.add_passages(index_dir, added, fake_embed, identity(old), shard_size=64)
    assert new.num_passages == 1300 and new.identity["index_version"] == 1
    assert open(os.path.join(index_dir, "CURRENT")).read().strip() == "versions/v000001"
    queries = fake_embed([corpus.Passage(str(i), "", "") for i in (5003, 5077, 17)])
    for backend in ("exact", "codes"):
        searcher = retriever.make_searcher(index_io.load_index(index_dir), backend, rerank_from_codes=20)
        rows, _ = searcher.search(queries, 1)
        assert [p.id for p in new.passages.get(rows[:, 0])] == ["5003", "5077", "17"]
    assert old.num_passages == 1200 and len(old.read_rows(0, 1200)) == 1200  # files under the old version unchanged
    again = index_update.add_passages(index_dir, added, fake_embed, identity(old))  # a rerun: nothing to do
    assert again.identity["index_version"] == 1
    with pytest.raises(index_io.IndexFormatError, match="already in"):  # same ids in another file
        index_update.add_passages(index_dir, write_passages(tmp_path / "dup.jsonl", [5001, 9999]), fake_embed,
                                  identity(old))
    with pytest.raises(index_io.IndexFormatError, match="encoder_id"):
        index_update.add_passages(index_dir, write_passages(tmp_path / "x.jsonl", [7777]), fake_embed,
                                  {**identity(old), "encoder_id": "another"})


def test_removed_passages_are_never_retrieved_and_compaction_drops_them(index_dir, tmp_path):
    ids_file = tmp_path / "gone.txt"
    ids_file.write_text("3\n700\n\n1199\n")
    index = index_update.remove_passages(index_dir, str(ids_file))
    np.testing.assert_array_equal(index.removed_rows, [3, 700, 1199])
    queries = fake_embed([corpus.Passage(str(i), "", "") for i in (3, 700, 1199, 5)])
    vectors = index.read_rows(0, index.num_passages)
    live = np.setdiff1d(np.arange(1200), [3, 700, 1199])
    want = live[np.argsort(-(queries @ vectors[live].T), axis=1, kind="stable")[:, :4]]
    for backend in ("exact", "codes"):
        rows, _ = retriever.make_searcher(index, backend, rerank_from_codes=50).search(queries, 4)
        assert not np.isin(rows, [3, 700, 1199]).any()
        np.testing.assert_array_equal(np.sort(rows, 1), np.sort(want, 1))
    bad = tmp_path / "unknown.txt"
    bad.write_text("5\nnot-an-id\n")
    with pytest.raises(index_io.IndexFormatError, match="unknown.txt:2"):
        index_update.remove_passages(index_dir, str(bad))
    compacted = index_update.compact(index_dir)
    assert compacted.num_passages == 1197 and not len(compacted.removed_rows)
    rows, _ = retriever.make_searcher(compacted, "codes", rerank_from_codes=50).search(queries, 4)
    assert [[p.id for p in compacted.passages.get(r)] for r in rows] == [[str(i) for i in r] for r in want]


def test_code_searcher_takes_an_update_without_recompiling(index_dir, tmp_path):
    index = index_io.load_index(index_dir)
    searcher = code_search.CodeSearcher(index, rerank_from_codes=10)
    queries = fake_embed([corpus.Passage(str(i), "", "") for i in (5010, 4)])
    searcher.search(queries, 2)
    compiled = searcher.search_fn(10)._cache_size()  # pylint: disable=protected-access
    new = index_update.add_passages(index_dir, write_passages(tmp_path / "n.jsonl", range(5000, 5020)), fake_embed,
                                    identity(index))
    searcher.swap_index(new)
    rows, _ = searcher.search(queries, 2)
    assert new.passages[int(rows[0, 0])].id == "5010" and searcher.search_fn(10)._cache_size() == compiled


_WORKER = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {root!r})
from rag_jax.retrieval import index_io, index_update
def fake_embed(passages):  # (as the test's, without importing the test module: a quicker start)
    vectors = np.stack([np.random.default_rng(int(p.id)).standard_normal({dim}) for p in passages])
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
kill_at, calls = int(sys.argv[1]), [0]
real_replace = os.replace
def replace(src, dst):  # every rename an update makes: a kill -9 before the k-th
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
index_dir, what, path = sys.argv[2:5]
index = index_io.load_index(index_dir)
identity = {{k: v for k, v in index.identity.items() if k in index_io.IDENTITY_FIELDS}}
if what == "add":
    index_update.add_passages(index_dir, path, fake_embed, identity, shard_size=25)
else:
    index_update.remove_passages(index_dir, path)
"""


def _update(index_dir, what, path):
    if what == "add":
        return index_update.add_passages(index_dir, path, fake_embed, identity(index_io.load_index(index_dir)),
                                         shard_size=25)
    return index_update.remove_passages(index_dir, path)


@pytest.mark.parametrize("what", ["add", "remove"])
def test_kill_9_during_an_update_leaves_the_old_or_the_new_index(index_dir, tmp_path, what, monkeypatch):
    """kill -9 before renames of an update (the first, a shard or store file half-way, index.json, the version
    directory, CURRENT): a reader then loads the old index or the new one, whole; a rerun completes it to the same
    new one."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(root=ROOT, dim=D))
    path = write_passages(tmp_path / "new.jsonl", range(5000, 5050)) if what == "add" else str(tmp_path / "ids")
    if what == "remove":
        (tmp_path / "ids").write_text("1\n2\n1100\n")
    pristine = tmp_path / "pristine"
    shutil.copytree(index_dir, pristine)
    renames, real_replace = [], os.replace
    with monkeypatch.context() as patch:  # the renames this update makes, counted in-process
        patch.setattr(os, "replace", lambda src, dst: (renames.append(dst), real_replace(src, dst)))
        want = _update(index_dir, what, path)
    query = fake_embed([corpus.Passage("5020" if what == "add" else "2", "", "")])
    want_rows, _ = retriever.make_searcher(want, "codes", rerank_from_codes=20).search(query, 3)
    total = len(renames)
    assert renames[-1].endswith("CURRENT") and renames[-2].endswith("v000001"), renames[-3:]
    for kill_at in sorted({1, total // 2, total - 2, total - 1, total}):
        shutil.rmtree(index_dir)
        shutil.copytree(pristine, index_dir)
        done = subprocess.run([sys.executable, str(script), str(kill_at), index_dir, what, path], cwd=ROOT,
                              capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        seen = index_io.load_index(index_dir)
        version = seen.identity.get("index_version", 0)
        assert version == (1 if kill_at > total else 0)  # CURRENT moves last: before it, the old index
        assert seen.num_passages == 1200 and not len(seen.removed_rows)
        retriever.make_searcher(seen, "codes", rerank_from_codes=20).search(query, 3)  # every file it needs is whole
        redone = _update(index_dir, what, path)
        assert redone.identity["index_version"] == 1
        rows, _ = retriever.make_searcher(redone, "codes", rerank_from_codes=20).search(query, 3)
        np.testing.assert_array_equal(rows, want_rows)


def test_device_code_corpus_takes_updates_in_place_without_recompiling(index_dir, tmp_path):
    """The device corpus of codes (capacity rows over 4 devices) gets an --add and a --remove in place: the same
    shapes, the same executable, the new passage found, the removed one never."""
    import jax  # pylint: disable=g-import-not-at-top
    from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top

    index = index_io.load_index(index_dir)
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("corpus",))
    arrays, _ = code_search.sharded_code_arrays(index, mesh)
    corpus = {"codes": arrays.codes, "code_scale": arrays.scale_N, "code_bias": arrays.bias_N}
    search = jax.jit(code_search.make_sharded_code_topk(mesh, "int8", 1))
    top = lambda q: np.asarray(search(q, codes.CodeArrays(corpus["codes"], corpus["code_scale"],
                                                          corpus["code_bias"]), None)[0])[:, 0]
    queries = fake_embed([corpus_lib_passage(i) for i in (5010, 7)])
    top(queries)
    new = index_update.add_passages(index_dir, write_passages(tmp_path / "n.jsonl", range(5000, 5020)), fake_embed,
                                    identity(index))
    code_search.replace_code_arrays(new, corpus)
    assert [new.passages[int(r)].id for r in top(queries)] == ["5010", "7"]
    (tmp_path / "ids").write_text("7\n")
    code_search.replace_code_arrays(index_update.remove_passages(index_dir, str(tmp_path / "ids")), corpus)
    assert new.passages[int(top(queries)[1])].id != "7"
    assert search._cache_size() == 1  # pylint: disable=protected-access


def corpus_lib_passage(i):
    return corpus.Passage(str(i), "", "")


def test_scann_built_before_an_add_is_kept_and_joined_with_the_new_rows(index_dir, tmp_path):
    """ScaNN's searcher of the rows before the first --add stays as it is; the added rows are searched exactly beside
    it and removed rows are filtered out."""
    from rag_jax.retrieval import scann_backend  # pylint: disable=g-import-not-at-top

    index = index_io.load_index(index_dir)
    scann_backend.build_scann_index(index)
    new = index_update.add_passages(index_dir, write_passages(tmp_path / "n.jsonl", range(5000, 5030)), fake_embed,
                                    identity(index))
    (tmp_path / "ids").write_text("9\n")
    new = index_update.remove_passages(index_dir, str(tmp_path / "ids"))
    searcher = retriever.make_searcher(new, "scann")
    rows, _ = searcher.search(fake_embed([corpus.Passage(str(i), "", "") for i in (5012, 40, 9)]), 2)
    assert [new.passages[int(r)].id for r in rows[:2, 0]] == ["5012", "40"] and new.passages[int(rows[2, 0])].id != "9"
    assert 9 not in rows
