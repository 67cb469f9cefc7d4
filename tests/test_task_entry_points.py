"""A task other than qa through the real entry points: train_nq with config task.name (dev evaluation reporting the
task's metrics and KILT's) and experiments.evaluate --task, each in its own process, on a KILT-format file."""

import json
import os
import subprocess
import sys

import pytest

from rag_jax.retrieval import corpus
from tests import process_env, train_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")


def _run(*args):
    env = process_env.command_env()
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _kilt_fever_task(directory: str) -> dict[str, str]:
    """8 bundled questions as claims with cycling labels, each with its gold passage's title as provenance."""
    task = train_task.write_bundled_task(directory, num_questions=8, num_distractors=8)
    titles = {p.id: p.title for p in corpus.read_passages(task["passages"])}
    path = os.path.join(directory, "fever-kilt.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, example in enumerate(train_task.bundled_questions(8)):
            page = titles[str(example["gold_passage_id"])]
            f.write(json.dumps({"id": str(i), "input": example["question"], "output": [
                {"answer": LABELS[i % 3], "provenance": [{"wikipedia_id": str(i), "title": page}]}]}) + "\n")
    return {"questions": path, "passages": task["passages"]}


@pytest.mark.slow
def test_fact_verification_trains_and_evaluates_with_kilt_scores(tmp_path):
    task = _kilt_fever_task(str(tmp_path / "task"))
    workdir = str(tmp_path / "run")
    _run("experiments.train_nq", f"--workdir={workdir}", *train_task.cli_overrides(task, **{
        "train.steps": 2, "train.checkpoint_every": 2, "train.async_checkpoints": False, "train.eval_every": 2,
        "task.name": "fact_verification"}))  # fmt: skip
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evaluations = [m for m in map(json.loads, f) if "eval/num_questions" in m]
    assert evaluations
    for name in ("eval/accuracy", "eval/accuracy_2way", "eval/r_precision", "eval/kilt_ac"):
        assert 0.0 <= evaluations[-1][name] <= 100.0, (name, evaluations[-1])
    assert "eval/exact_match" not in evaluations[-1] and "eval/recall@1" not in evaluations[-1]
    assert evaluations[-1]["eval/kilt_ac"] <= evaluations[-1]["eval/accuracy"]

    output = str(tmp_path / "answers.jsonl")
    done = _run("experiments.evaluate", "--task=fact_verification", f"--model={workdir}",
                f"--questions={task['questions']}", f"--output={output}", "--batch_size=4")
    assert "accuracy" in done.stdout and "r_precision" in done.stdout and "kilt_ac" in done.stdout, done.stdout
    with open(output) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 8
    # answers restricted to the label words; the retrieved pages are recorded for R-Precision
    assert {r["prediction"] for r in records} <= {"supports", "refutes", "unknown"}
    assert all(len(r["doc_titles"]) == len(r["doc_ids"]) for r in records)


def test_a_non_qa_task_without_its_files_is_refused_naming_the_fields():
    from rag_jax.runs import config_check

    config = train_task.nq.get_config("tiny")
    config.task.name = "fact_verification"
    with pytest.raises(config_check.ConfigError, match="task.name='fact_verification' reads its examples from "
                                                         "task.train_file and task.dev_file"):
        config_check.check_config(config)


def test_evaluate_refuses_a_bad_label_in_one_line(tmp_path):
    path = tmp_path / "fever.jsonl"
    path.write_text(json.dumps({"claim": "c", "label": "PERHAPS"}) + "\n", encoding="utf-8")
    (tmp_path / "model").mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--task=fact_verification",
                           f"--model={tmp_path / 'model'}", f"--questions={path}", f"--output={tmp_path / 'o.jsonl'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {path}:1: label 'PERHAPS'"), done.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_the_old_entry_point_names_are_aliases_with_the_same_flags():
    """eval_nq is experiments.evaluate and train_nq is experiments.train under their old names: the same flags (and
    config fields), read by tests/entry_point_flags.py as test_docs reads them."""
    modules = ["experiments.evaluate", "experiments.eval_nq", "experiments.train", "experiments.train_nq"]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "entry_point_flags.py")],
                          input=json.dumps({"modules": modules, "commands": []}), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-4000:]
    flags = json.loads(done.stdout.strip().splitlines()[-1])["flags"]
    for new, old in (("experiments.evaluate", "experiments.eval_nq"), ("experiments.train", "experiments.train_nq")):
        assert "error" not in flags[new] and flags[new]["flags"], flags[new]
        assert flags[old] == flags[new], (old, new)
    assert "task" in flags["experiments.evaluate"]["flags"] and "workdir" in flags["experiments.train"]["flags"]
