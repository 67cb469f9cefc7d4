"""What the hostile tables (tests/test_cli_hostile*.py) share: running an entry point as a user does (or with an
operating-system fault injected: tests/faults.py), the check that it refused with one line, snapshots of what must
not change, and two session fixtures built once for all the tables: a Hugging Face RAG directory with an index,
and a tiny trained workdir. The tables load this module as a plugin (`pytest_plugins`), so that pytest holds one
copy of each fixture however many tables use it.
"""

import hashlib
import itertools
import json
import os
import subprocess
import sys

import pytest

from rag_jax.retrieval import corpus

from tests import process_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSAGES = os.path.join(ROOT, "rag_jax/assets/nq_open_mini/passages.tsv")
QUESTIONS = os.path.join(ROOT, "rag_jax/assets/nq_open_mini/questions.jsonl")
REAL_VOCAB = dict(vocab_size=30522, max_position_embeddings=512)


def run(*args, timeout=300, env=None):
    """`python -m args...` from the repository root on one CPU device, as a user runs it."""
    full_env = process_env.command_env(**(env or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def refused(done, *culprits) -> str:
    """Exit status 1, no traceback, one `error:` line, the last one, naming every culprit; returns it."""
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr[-3000:]
    for culprit in culprits:
        assert culprit in errors[0], (culprit, errors[0])
    return errors[0]


def snapshot(*roots) -> dict[str, str]:
    """{path: content hash} of every file under `roots` (what a refused command must leave as it was)."""
    found = {}
    for root in map(str, roots):
        paths = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for path in paths:
            with open(path, "rb") as f:
                found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)

def run_with_fault(fault: str, *args, timeout=300, env=None):
    """`run(*args)` with `fault` (tests/faults.py: KIND:SUBSTRING) injected into the entry point's process."""
    return run("tests.faults", fault, *args, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def hf_space(tmp_path_factory):
    """A Hugging Face RAG-Token directory, its document encoder and an index of 40 real passages built with it."""
    import transformers  # pylint: disable=g-import-not-at-top (torch: only for the models of the fixture)

    from rag_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    from rag_jax.models import hf  # pylint: disable=g-import-not-at-top
    from rag_jax.retrieval import embed  # pylint: disable=g-import-not-at-top
    from tests import hf_models  # pylint: disable=g-import-not-at-top

    tmp = tmp_path_factory.mktemp("hf")
    corpus.write_passages_tsv(tmp / "passages.tsv", list(itertools.islice(corpus.read_passages(PASSAGES), 40)))
    ctx = hf_models.randomize(transformers.DPRContextEncoder(hf_models.dpr_config(**REAL_VOCAB)), 1, std=0.5)
    ctx.save_pretrained(tmp / "ctx")
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        hf_models.dpr_config(**REAL_VOCAB), hf_models.bart_config(vocab_size=50265, max_position_embeddings=160),
        n_docs=3, max_combined_length=64)
    config.architectures = ["RagTokenForGeneration"]
    hf_models.randomize(transformers.RagTokenForGeneration(config), seed=2, std=0.3).save_pretrained(tmp / "rag")
    with open(QUESTIONS) as f:
        write_jsonl(tmp / "questions.jsonl", [{"question": r["question"], "answers": r["answers"]}
                                              for r in map(json.loads, itertools.islice(f, 3))])
    encoder = hf.load_encoder(str(tmp / "ctx"))
    embed.build_index(encoder.config, encoder.params, tokenizers.load_question_tokenizer(), str(tmp / "passages.tsv"),
                      str(tmp / "index"), batch_size=16, max_length=64, shard_size=16, progress=False)
    return tmp


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A tiny workdir trained by train_nq (checkpoints at steps 2 and 4), its task, its flags, and the compilation
    cache that lets later runs of it skip compiling the step."""
    from tests import train_task  # pylint: disable=g-import-not-at-top

    tmp = tmp_path_factory.mktemp("run")
    task = train_task.write_bundled_task(str(tmp / "task"), num_questions=8, num_distractors=8)
    flags = train_task.cli_overrides(task, **{"train.steps": 4, "train.checkpoint_every": 2, "train.log_every": 2})
    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache")}
    done = run("experiments.train_nq", f"--workdir={tmp / 'run'}", *flags, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"workdir": tmp / "run", "task": task, "flags": flags, "env": env}


