"""The package's layout: layers import downward only, no import cycles, modules of a readable size."""

import pathlib

from importlinter import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LINES = 460  # "a few hundred lines"; a longer module says why in its opening docstring (see below)
LONG_MODULE_REASON = "must be one piece"


def test_import_contracts_hold():
    """.importlinter: rag_jax.training > inference > readers > rag > retrieval > data > models | sharding, the same
    inside training, inference, readers and models, and no cycles between siblings anywhere."""
    status = cli.lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True, no_logo=True)
    assert status == cli.EXIT_STATUS_SUCCESS  # the report above names each broken contract and import


def test_modules_are_small_or_say_why():
    long = []
    for package in ("rag_jax", "experiments"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            docstring = text.split('"""')[1] if text.startswith('"""') else ""
            if text.count("\n") > MAX_LINES and LONG_MODULE_REASON not in docstring:
                long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not long, f"modules over {MAX_LINES} lines whose docstring does not say why they {LONG_MODULE_REASON}: {long}"
