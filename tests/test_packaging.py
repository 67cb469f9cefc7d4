"""The built wheel holds the whole package: every module and the bundled data (rag_jax/assets: the mini NQ-open
task and the tokenizers the default configs read), with no setuptools warning that a data directory is left out."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files(package: str, keep) -> set[str]:
    found = set()
    for root, dirs, names in os.walk(os.path.join(ROOT, package)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found.update(os.path.relpath(os.path.join(root, n), ROOT).replace(os.sep, "/") for n in names if keep(n))
    return found


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_the_bundled_assets(tmp_path):
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside setup.py
    source.mkdir()
    shutil.copy(os.path.join(ROOT, "setup.py"), source)
    for package in ("rag_jax", "experiments"):
        shutil.copytree(os.path.join(ROOT, package), source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "absent from the `packages` configuration" not in done.stdout + done.stderr, done.stdout + done.stderr
    (wheel,) = os.listdir(tmp_path / "dist")
    inside = set(zipfile.ZipFile(tmp_path / "dist" / wheel).namelist())
    assets = _files(os.path.join("rag_jax", "assets"), lambda name: True)
    assert {"rag_jax/assets/nq_open_mini/passages.tsv", "rag_jax/assets/tokenizers/bart-large/vocab.json"} <= assets
    assert assets <= inside, sorted(assets - inside)
    modules = _files("rag_jax", lambda n: n.endswith(".py")) | _files("experiments", lambda n: n.endswith(".py"))
    assert modules <= inside, sorted(modules - inside)
