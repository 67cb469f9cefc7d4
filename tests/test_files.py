"""rag_jax.files: what it writes appears whole or not at all, and a failed write leaves nothing behind."""

import json
import os

import numpy as np
import pytest

from rag_jax import files


def test_json_and_npy_are_replaced_whole(tmp_path):
    path, array_path = str(tmp_path / "meta.json"), str(tmp_path / "rows.npy")
    files.write_json(path, {"b": 1, "a": [1, 2]})
    files.write_json(path, {"c": 3})
    files.save_npy(array_path, np.arange(5))
    assert json.load(open(path)) == {"c": 3}
    np.testing.assert_array_equal(np.load(array_path), np.arange(5))
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "rows.npy"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
    path = str(tmp_path / "out.txt")
    files.write_json(path, "old")
    with pytest.raises(RuntimeError):
        with files.replaced_when_done(path) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".tmp")
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    with pytest.raises(TypeError):  # not JSON: fails half-way through the dump
        files.write_json(path, {"x": object()})
    assert json.load(open(path)) == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_temporary_paths_are_unique_per_writer(tmp_path):
    """Hosts writing the same file at once must each rename their own copy."""
    names = {files.temporary_path(str(tmp_path / "x.npy")) for _ in range(100)}
    assert len(names) == 100 and all(n.startswith(str(tmp_path / "x.npy.")) for n in names)


def test_a_new_directory_replaces_the_old_one_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with files.new_directory(str(out)) as partial:
            open(os.path.join(partial, "half.bin"), "w").write("half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["old.txt"]
    with files.new_directory(str(out)) as partial:
        open(os.path.join(partial, "new.txt"), "w").write("new")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["new.txt"]
    with files.new_directory(str(tmp_path / "fresh")) as partial:
        open(os.path.join(partial, "a"), "w").write("a")
    assert sorted(os.listdir(tmp_path)) == ["fresh", "out"]
