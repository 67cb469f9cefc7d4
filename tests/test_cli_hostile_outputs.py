"""Hostile but fair use, round two (issue 31), through the real command lines: outputs that would replace the
command's inputs or mix with another tool's files, commands stopped by SIGTERM or kill -9 (no debris left, or
removed by the next run), and a preempted training run's exit status.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import process_env
from tests.hostile import QUESTIONS, ROOT, refused, run, snapshot

pytest_plugins = ["tests.hostile"]  # its session fixtures hf_space and run_dir: one copy for all the tables


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs of the start-up cases: questions (and a link to them), someone's directory, an index directory, an
    earlier knowledge task, a fake workdir (checkpoints/ only: enough for export's start-up checks), a file."""
    tmp = tmp_path_factory.mktemp("outputs")
    shutil.copy(QUESTIONS, tmp / "questions.jsonl")
    os.symlink(tmp / "questions.jsonl", tmp / "link.jsonl")
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("not an index")
    (tmp / "an_index").mkdir()
    (tmp / "an_index" / "index.json").write_text("{}")
    (tmp / "task").mkdir()
    for name in ("passages.tsv", "swapped_passages.tsv", "train.jsonl", "dev.jsonl", "swapped_dev.jsonl"):
        (tmp / "task" / name).write_text("an earlier task\n")
    (tmp / "runs" / "fakerun" / "checkpoints").mkdir(parents=True)
    (tmp / "afile").write_text("a file")
    return tmp


EVAL = ("experiments.eval_nq", "--model={tmp}/no_model", "--questions={tmp}/questions.jsonl", "--overwrite")
EXPORT = ("experiments.export", "--workdir={tmp}/runs/fakerun", "--overwrite")
TASK = ("experiments.make_knowledge_task", "--entities=20", "--heldout=5")
TINY = "--config=experiments/configs/nq.py:tiny"

START_UP_CASES = [
    # an output that resolves to an input (or holds one) is refused, --overwrite or not
    ("eval_output_is_the_questions", EVAL + ("--output={tmp}/questions.jsonl",),
     ["--output=", "is the command's input --questions="]),
    ("eval_output_links_to_the_questions", EVAL + ("--output={tmp}/link.jsonl",),
     ["--output=", "link.jsonl", "is the command's input --questions="]),
    ("mine_output_is_the_questions", ("experiments.mine_negatives", "--index={tmp}/an_index",
                                      "--question_encoder={tmp}/no_encoder", "--questions={tmp}/questions.jsonl",
                                      "--output={tmp}/questions.jsonl", "--overwrite"),
     ["--output=", "is the command's input --questions="]),
    ("build_output_holds_the_passages", ("experiments.build_index", "--encoder={tmp}/no_encoder",
                                         "--passages={tmp}/mine/notes.txt", "--output={tmp}/mine"),
     ["--output=", "holds the command's input --passages="]),
    ("eval_overwrite_part_of_the_model", EVAL + ("--model={tmp}/mine", "--output={tmp}/mine/notes.txt"),
     ["--output=", "notes.txt", "is part of the command's input --model="]),
    ("export_overwrite_part_of_the_workdir", EXPORT + ("--output={tmp}/runs/fakerun/checkpoints",),
     ["--output=", "is part of the command's input --workdir="]),
    ("export_output_is_the_workdir", EXPORT + ("--output={tmp}/runs/fakerun",),
     ["--output=", "is the command's input --workdir="]),
    ("export_output_holds_the_workdir", EXPORT + ("--output={tmp}/runs",),
     ["--output=", "holds the command's input --workdir="]),
    # a directory holding another tool's files is not written into, --overwrite or not
    ("export_overwrite_someones_directory", EXPORT + ("--output={tmp}/mine",), ["--output=", "holds no export"]),
    ("train_workdir_holds_an_index", ("experiments.train_nq", TINY, "--workdir={tmp}/an_index"),
     ["--workdir=", "an_index", "holds no training run"]),
    ("retriever_workdir_is_someones", ("experiments.train_retriever", "--workdir={tmp}/mine"),
     ["--workdir=", "holds no training run"]),
    ("demo_workdir_is_someones", ("experiments.knowledge_demo", "--workdir={tmp}/mine"),
     ["--workdir=", "holds no knowledge_demo run"]),
    # make_knowledge_task: an existing task needs --overwrite; never a file, never someone's directory
    ("task_output_is_a_file", TASK + ("--output={tmp}/afile",), ["--output=", "afile", "is a file"]),
    ("task_exists", TASK + ("--output={tmp}/task",), ["--output=", "exists", "--overwrite"]),
    ("task_overwrite_someones_directory", TASK + ("--output={tmp}/mine", "--overwrite"),
     ["--output=", "holds no knowledge task"]),
]


@pytest.mark.parametrize("case,args,culprits", START_UP_CASES, ids=[c[0] for c in START_UP_CASES])
def test_outputs_never_replace_inputs_nor_another_tools_files(files, case, args, culprits):
    del case
    before = snapshot(files)
    names = sorted(os.listdir(files))
    refused(run(*(a.format(tmp=files) for a in args)), *culprits)
    assert snapshot(files) == before and sorted(os.listdir(files)) == names


def test_an_existing_task_is_replaced_with_overwrite(tmp_path):
    output = tmp_path / "task"
    for seed in ("0", "1"):
        done = run(*TASK, f"--output={output}", f"--seed={seed}", *(["--overwrite"] if seed == "1" else []))
        assert done.returncode == 0, done.stderr[-3000:]
        written = snapshot(output)
        assert sorted(os.path.basename(p) for p in written) == sorted(
            ["passages.tsv", "swapped_passages.tsv", "train.jsonl", "dev.jsonl", "swapped_dev.jsonl"])
        if seed == "0":
            first = written
    assert written != first  # another seed, another task


def test_the_workdir_rule_knows_every_entry_of_a_workdir():
    """output_checks.WORKDIR_ENTRIES (which train_nq and train_retriever accept in a --workdir) must name every
    path of rag_jax/training/workdir.py, or a real run would be refused as someone else's directory."""
    from experiments import output_checks  # pylint: disable=g-import-not-at-top
    from rag_jax.runs import workdir  # pylint: disable=g-import-not-at-top

    made = [workdir.checkpoints_dir("w"), workdir.skipped_checkpoints_dir("w"), workdir.index_dir("w"),
            workdir.index_versions_dir("w"), workdir.metrics_file("w"), workdir.tensorboard_dir("w"),
            workdir.export_dir("w"), *workdir.tokenizer_dirs("w").values()]
    assert sorted(os.path.basename(p) for p in made) == sorted(output_checks.WORKDIR_ENTRIES)


# ---------------------------------------------------------------------------------------------------- signals


def _start(*args, env=None):
    full_env = process_env.command_env(**(env or {}))
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env)


def _wait_for(path, process, timeout=240):
    """Waits until `path` exists (the command is writing its output)."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _partial(output, pid):
    return os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.partial-{pid}")


def _stopped(process, sig, output, expected):
    """Sends `sig` once the command's partial output exists; returns (stderr, partial)."""
    partial = _partial(output, process.pid)
    _wait_for(partial, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == expected, (process.returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr, partial


def _others_partials(directory, output):
    """A live process's partial output (this test's own pid) and an unrelated hidden file: never removed."""
    live = _partial(output, os.getpid())
    with open(live, "w") as f:
        f.write("another evaluation, still writing")
    other = os.path.join(directory, ".notes.txt.partial-1")
    with open(other, "w") as f:
        f.write("not ours")
    return [live, other]


@pytest.mark.slow
def test_eval_stopped_by_sigterm_or_kill_leaves_no_debris_after_the_next_run(hf_space, tmp_path):
    """SIGTERM: exit 143, one line, its partial output removed, the earlier output kept. kill -9 leaves the
    partial; the next run removes it (its process is gone), and nothing else."""
    output = str(tmp_path / "out.jsonl")
    with open(output, "w") as f:
        f.write("an earlier evaluation\n")
    args = ("experiments.eval_nq", f"--model={hf_space}/rag", f"--index={hf_space}/index",
            f"--questions={hf_space}/questions.jsonl", f"--output={output}", "--overwrite",
            f"--compilation_cache={tmp_path / 'never_cache'}")  # compiling: a window to stop it in
    stderr, partial = _stopped(_start(*args), signal.SIGTERM, output, 128 + signal.SIGTERM)
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM"), stderr[-3000:]
    assert not os.path.exists(partial)
    assert open(output).read() == "an earlier evaluation\n"
    _, partial = _stopped(_start(*args), signal.SIGKILL, output, -signal.SIGKILL)
    assert os.path.exists(partial) and open(output).read() == "an earlier evaluation\n"
    kept = _others_partials(tmp_path, output)
    done = run(*args[:-1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert not os.path.exists(partial) and all(os.path.exists(p) for p in kept)
    assert open(output).read() != "an earlier evaluation\n"


@pytest.mark.slow
def test_export_stopped_by_sigterm_or_kill_leaves_no_debris_after_the_next_run(run_dir, tmp_path):
    output = str(tmp_path / "hf")
    args = ("experiments.export", f"--workdir={run_dir['workdir']}", f"--output={output}")
    stderr, partial = _stopped(_start(*args), signal.SIGTERM, output, 128 + signal.SIGTERM)
    assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM"), stderr[-3000:]
    assert not os.path.exists(partial) and not os.path.exists(output)
    _, partial = _stopped(_start(*args), signal.SIGKILL, output, -signal.SIGKILL)
    assert os.path.isdir(partial)
    kept = _others_partials(tmp_path, output)
    done = run(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not os.path.exists(partial) and all(os.path.exists(p) for p in kept)
    assert os.path.isfile(os.path.join(output, "model.safetensors"))


@pytest.mark.slow
def test_export_says_which_step_it_exported_past_a_damaged_checkpoint(run_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run_dir["workdir"], workdir, symlinks=True)
    params = workdir / "checkpoints" / "4" / "params"
    next(p for p in sorted(params.rglob("*")) if p.is_file() and p.parent.name == "d").write_bytes(b"\0" * 100)
    done = run("experiments.export", f"--workdir={workdir}", f"--output={tmp_path}/hf", "--format=orbax")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped checkpoint {workdir}/checkpoints/4" in done.stderr, done.stderr[-3000:]
    final = done.stdout.strip().splitlines()[-1]
    assert "step 2" in final and "skipped the newer checkpoint(s) [4]" in final, final


@pytest.mark.slow
def test_a_preempted_run_exits_75_after_its_checkpoint_is_saved(run_dir, tmp_path):
    """SIGTERM during training: the run saves the step it reached and exits with EX_TEMPFAIL (75), which a
    scheduler reads as "rerun me" (docs/pods.md), not 0 ("finished")."""
    workdir = tmp_path / "run"
    shutil.copytree(run_dir["workdir"], workdir, symlinks=True)
    process = _start("experiments.train_nq", f"--workdir={workdir}", *run_dir["flags"], "--config.train.steps=1000",
                     "--config.train.log_every=1", "--config.train.checkpoint_every=1000", env=run_dir["env"])
    lines = []
    for line in process.stdout:  # the loop's SIGTERM handler is in place once the steps log
        lines.append(line)
        if line.startswith("step 6/"):
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 75, (process.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    stopped = [line for line in (lines + out.splitlines()) if line.startswith("preempted (SIGTERM): saved step ")]
    assert stopped, out[-3000:]
    step = stopped[0].split("saved step ")[1].split(";")[0]
    assert os.path.isdir(workdir / "checkpoints" / step)
