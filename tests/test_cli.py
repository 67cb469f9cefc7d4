"""The entry points as a user runs them: happy paths, and bad input ending in one clear line and exit status 1."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import transformers

from rag_jax.retrieval import corpus
from tests import hf_models, process_env

REAL_VOCAB = dict(vocab_size=30522, max_position_embeddings=512)
PASSAGES = "rag_jax/assets/nq_open_mini/passages.tsv"
QUESTIONS = "rag_jax/assets/nq_open_mini/questions.jsonl"


def run(*args, expect_ok=True):
    env = process_env.command_env()
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=300)
    if expect_ok:
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    passages = list(itertools.islice(corpus.read_passages(PASSAGES), 40))
    corpus.write_passages_tsv(tmp / "passages.tsv", passages)
    ctx = hf_models.randomize(transformers.DPRContextEncoder(hf_models.dpr_config(**REAL_VOCAB)), 1, std=0.5)
    ctx.save_pretrained(tmp / "ctx")
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        hf_models.dpr_config(**REAL_VOCAB), hf_models.bart_config(vocab_size=50265, max_position_embeddings=160),
        n_docs=3, max_combined_length=64,
    )  # fmt: skip
    config.architectures = ["RagTokenForGeneration"]
    hf_models.randomize(transformers.RagTokenForGeneration(config), seed=2, std=0.3).save_pretrained(tmp / "rag")
    with open(QUESTIONS) as f, open(tmp / "questions.jsonl", "w") as out:
        for line in itertools.islice(f, 3):
            record = json.loads(line)
            record.pop("gold_passage_id")
            out.write(json.dumps(record) + "\n")
    done = run("experiments.build_index", f"--encoder={tmp}/ctx", f"--passages={tmp}/passages.tsv",
               f"--output={tmp}/index", "--batch_size=16")  # fmt: skip
    assert "40 passages x 36" in done.stdout
    return tmp


def test_build_index_reruns_as_a_resume(workspace):
    done = run("experiments.build_index", f"--encoder={workspace}/ctx", f"--passages={workspace}/passages.tsv",
               f"--output={workspace}/index")  # fmt: skip
    assert "40 passages" in done.stdout


def test_build_index_bad_passages_name_the_line(workspace):
    bad = workspace / "bad.tsv"
    bad.write_text("id\ttext\ttitle\n1\tfine text\tTitle\n2\tmissing a field\n")
    done = run("experiments.build_index", f"--encoder={workspace}/ctx", f"--passages={bad}",
               f"--output={workspace}/bad_index", expect_ok=False)  # fmt: skip
    assert "bad.tsv:3" in done.stderr
    empty = workspace / "empty_text.tsv"
    empty.write_text("id\ttext\ttitle\n1\t\tTitle\n")
    done = run("experiments.build_index", f"--encoder={workspace}/ctx", f"--passages={empty}",
               f"--output={workspace}/empty_index", expect_ok=False)  # fmt: skip
    assert "empty_text.tsv:2" in done.stderr and "empty" in done.stderr


def test_eval_writes_one_line_per_question_and_prints_metrics(workspace):
    out = workspace / "predictions.jsonl"
    done = run("experiments.eval_nq", f"--model={workspace}/rag", f"--index={workspace}/index",
               f"--questions={workspace}/questions.jsonl", f"--output={out}", "--max_length=6", "--score")  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert set(record) == {"question", "answers", "prediction", "doc_ids", "doc_scores", "nll_sequence", "nll_token"}
        assert len(record["doc_ids"]) == 3 and record["nll_token"] > 0
    assert "EM " in done.stdout and "R@3" in done.stdout


@pytest.mark.parametrize(
    "case,flags,message",
    [
        ("not_jsonl", ["--questions={tmp}/passages.tsv"], "passages.tsv:1: not valid JSON"),
        ("k_too_large", ["--n_docs=41"], "--n_docs=41 is larger than the corpus of 40 passages"),
        ("other_encoder", ["--doc_encoder_id=0123456789abcdef"], "encoder"),
        ("unknown_gold_id", ["--questions={tmp}/gold.jsonl"], "99999"),
    ],
)
def test_eval_bad_input(workspace, case, flags, message):
    (workspace / "gold.jsonl").write_text(json.dumps({"question": "q", "answers": ["a"], "gold_passage_id": 99999}) + "\n")
    base = {"--questions": f"{workspace}/questions.jsonl"}
    for flag in flags:
        key, value = flag.split("=", 1)
        base[key] = value.format(tmp=workspace)
    args = [f"--model={workspace}/rag", f"--index={workspace}/index", f"--output={workspace}/x.jsonl"]
    done = run("experiments.eval_nq", *args, *(f"{k}={v}" for k, v in base.items()), expect_ok=False)
    assert message in done.stderr, done.stderr


def test_an_output_appears_only_when_complete(tmp_path):
    """eval_nq's --output: an interrupted run leaves an existing file as it was and no partial file beside it."""
    from experiments import cli  # pylint: disable=g-import-not-at-top
    from rag_jax import files  # pylint: disable=g-import-not-at-top

    out = tmp_path / "predictions.jsonl"
    out.write_text("earlier\n")
    with pytest.raises(RuntimeError):
        with files.output(str(out)) as f:
            f.write("half\n")
            raise RuntimeError("killed")
    assert out.read_text() == "earlier\n" and os.listdir(tmp_path) == ["predictions.jsonl"]
    with files.output(str(out)) as f:
        f.write("new\n")
    assert out.read_text() == "new\n" and os.listdir(tmp_path) == ["predictions.jsonl"]
    with pytest.raises(cli.UsageError, match="--overwrite"):
        cli.check_new_output(str(out), "--output", overwrite=False)
    cli.check_new_output(str(out), "--output", overwrite=True)
