"""Hostile but fair use, round two (issue 31), through the real command lines: inputs checked against what the model
and the data can do, damaged weight and tokenizer files, bad JSON shapes, and the operating system failing under a
command (a full disk, a read-only filesystem: injected by tests/faults.py, since tests run as root and mount
nothing). Each case ends as tests/test_cli_hostile.py's do: exit status 1, one `error:` line naming the culprit, no
traceback, no input changed.
"""

import itertools
import json
import os
import shutil

import pytest

from tests.hostile import PASSAGES, QUESTIONS, REAL_VOCAB, refused, run, run_with_fault, snapshot, write_jsonl

pytest_plugins = ["tests.hostile"]  # its session fixtures hf_space and run_dir: one copy for all the tables

TINY = "--config=experiments/configs/nq.py:tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs of the start-up cases: questions good and bad in each way, a directory where a file goes, a task, a
    fake workdir (checkpoints/ only: enough for export's start-up checks), someone's directory."""
    tmp = tmp_path_factory.mktemp("inputs")
    with open(QUESTIONS) as f:
        good = [json.loads(line) for line in itertools.islice(f, 8)]
    write_jsonl(tmp / "questions.jsonl", good)
    write_jsonl(tmp / "array.jsonl", [good[0], [good[1]["question"], good[1]["answers"]]])
    write_jsonl(tmp / "empty_answer.jsonl", [good[0], {"question": "who", "answers": ["x", " "]}])
    write_jsonl(tmp / "unknown_gold.jsonl", [good[0], {**good[1], "gold_passage_id": 99999999}] + good[2:])
    write_jsonl(tmp / "two.jsonl", good[:2])
    with open(tmp / "latin1.jsonl", "wb") as f:
        f.write(json.dumps(good[0]).encode() + b"\n" + '{"question": "caf\xe9", "answers": ["x"]}'.encode("latin-1"))
    (tmp / "qdir").mkdir()
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("not an index")
    (tmp / "an_index").mkdir()
    (tmp / "an_index" / "index.json").write_text("{}")
    (tmp / "task").mkdir()
    for name in ("passages.tsv", "swapped_passages.tsv", "train.jsonl", "dev.jsonl", "swapped_dev.jsonl"):
        (tmp / "task" / name).write_text("an earlier task\n")
    (tmp / "fakerun" / "checkpoints").mkdir(parents=True)
    (tmp / "afile").write_text("a file")
    os.symlink(tmp / "questions.jsonl", tmp / "link.jsonl")
    # task files (rag_jax/data/task_files.py): a KILT line without `input`, a label outside the task's label set, a
    # CuratedTrec answer pattern that does not compile
    write_jsonl(tmp / "no_input.kilt.jsonl", [{"id": "1", "output": [{"answer": "x"}]}])
    write_jsonl(tmp / "bad_label.kilt.jsonl", [{"id": "1", "input": "a claim", "output": [{"answer": "MAYBE"}]}])
    (tmp / "curatedtrec-test.csv").write_text('who\t["(unclosed"]\n')
    return tmp


EVAL = ("experiments.eval_nq", "--model={tmp}/no_model", "--questions={tmp}/questions.jsonl",
        "--output={tmp}/new.jsonl")
TRAIN = ("experiments.train_nq", TINY, "--workdir={tmp}/never", f"--config.data.passages={PASSAGES}",
         "--config.task.dev_file={tmp}/questions.jsonl")
EVALUATE = ("experiments.evaluate", "--model={tmp}/no_model", "--questions={tmp}/questions.jsonl",
            "--output={tmp}/new.jsonl")
MINE = ("experiments.mine_negatives", "--index={tmp}/an_index", "--question_encoder={tmp}/no_encoder",
        "--questions={tmp}/questions.jsonl", "--output={tmp}/negatives.jsonl")
DEMO = ("experiments.knowledge_demo", "--workdir={tmp}/demo", f"--passages={PASSAGES}",
        "--train_file={tmp}/questions.jsonl", "--dev_file={tmp}/questions.jsonl")

START_UP_CASES = [
    # questions files: a directory, a JSON array for an object, bytes that are not UTF-8, an empty answer
    ("eval_questions_is_a_directory", EVAL + ("--questions={tmp}/qdir",), ["--questions=", "is a directory"]),
    ("eval_questions_line_is_an_array", EVAL + ("--questions={tmp}/array.jsonl",),
     ["array.jsonl:2", "JSON object", "array"]),
    ("eval_questions_not_utf8", EVAL + ("--questions={tmp}/latin1.jsonl",), ["latin1.jsonl:2", "not UTF-8"]),
    ("eval_empty_answer_string", EVAL + ("--questions={tmp}/empty_answer.jsonl",),
     ["empty_answer.jsonl:2", "empty string"]),
    # the old name of task.train_file (configs and command lines written before it) still works, and is named
    ("train_questions_line_is_an_array", TRAIN + ("--config.data.train_file={tmp}/array.jsonl",),
     ["data.train_file", "array.jsonl:2", "JSON object"]),
    ("train_questions_is_a_directory", TRAIN + ("--config.task.train_file={tmp}/qdir",),
     ["task.train_file", "is a directory"]),
    ("train_empty_answer_string", TRAIN + ("--config.task.train_file={tmp}/empty_answer.jsonl",),
     ["empty_answer.jsonl:2", "empty string"]),
    ("mine_questions_is_a_directory", MINE + ("--questions={tmp}/qdir",), ["--questions=", "is a directory"]),
    ("build_passages_is_a_directory", ("experiments.build_index", "--encoder={tmp}/no_encoder",
                                       "--passages={tmp}/qdir", "--output={tmp}/index"),
     ["--passages=", "is a directory"]),
    # gold passage ids that name no passage: one rule (training_data.unknown_passage) wherever they are read
    ("train_unknown_gold_id", TRAIN + ("--config.task.train_file={tmp}/unknown_gold.jsonl",),
     ["unknown_gold.jsonl:2", "passage id 99999999", "not in the corpus"]),
    ("train_unknown_dev_gold_id", TRAIN + ("--config.task.train_file={tmp}/questions.jsonl",
                                           "--config.task.dev_file={tmp}/unknown_gold.jsonl"),
     ["task.dev_file", "unknown_gold.jsonl:2", "passage id 99999999", "not in the corpus"]),
    ("demo_unknown_gold_id", DEMO + ("--train_file={tmp}/unknown_gold.jsonl",),
     ["unknown_gold.jsonl:2", "passage id 99999999", "not in the corpus"]),
    ("retriever_unknown_gold_id", ("experiments.train_retriever", "--config=experiments/configs/retriever.py:tiny",
                                   "--workdir={tmp}/never", "--config.data.train_file={tmp}/unknown_gold.jsonl"),
     ["unknown_gold.jsonl:2", "passage id 99999999", "not in the corpus"]),
    # what the model can do
    ("train_too_few_questions", TRAIN + ("--config.task.train_file={tmp}/two.jsonl",),
     ["task.train_file", "2 questions", "train.global_batch_size=8"]),
    ("train_eval_longer_than_positions", TRAIN + ("--config.task.train_file={tmp}/questions.jsonl",
                                                  "--config.eval.max_length=200"),
     ["eval.max_length=200", "max_position_embeddings=128"]),
    ("train_unknown_variant", ("experiments.train_nq", "--config=experiments/configs/nq.py:bogus",
                               "--workdir={tmp}/never"), ["unknown variant 'bogus'", "choose one of"]),
    ("demo_unknown_variant", ("experiments.knowledge_demo", "--config=experiments/configs/nq.py:bogus",
                              "--workdir={tmp}/demo"), ["unknown variant 'bogus'"]),
    # this round's entry points and flags: tasks, readers, retriever losses
    ("evaluate_unknown_task", EVALUATE + ("--task=bogus",), ["--task=bogus", "no such task"]),
    ("evaluate_kilt_line_without_input", EVALUATE + ("--questions={tmp}/no_input.kilt.jsonl",),
     ["no_input.kilt.jsonl:1", "none of the known formats"]),
    ("evaluate_label_outside_the_task", EVALUATE + ("--task=fact_verification",
                                                     "--questions={tmp}/bad_label.kilt.jsonl"),
     ["bad_label.kilt.jsonl:1", "label 'MAYBE'"]),
    ("evaluate_regex_answer_does_not_compile", EVALUATE + ("--questions={tmp}/curatedtrec-test.csv",),
     ["curatedtrec-test.csv:1", "not a regular expression"]),
    ("evaluate_unknown_reader", EVALUATE + ("--reader=bogus",), ["--reader=bogus", "choose one of"]),
    ("train_unknown_reader", TRAIN + ("--config.model.reader=bogus",), ["model.reader='bogus'", "choose one of"]),
    ("train_unknown_task", TRAIN + ("--config.task.name=bogus",), ["task.name='bogus'", "choose one of"]),
    ("train_adist_without_fid", TRAIN + ("--config.train.retriever_loss=adist",),
     ["train.retriever_loss='adist'", "model.reader=fid"]),
    ("demo_unknown_reader", DEMO + ("--reader=bogus",), ["--reader=bogus", "choose one of"]),
    # compute dtypes (issue 30): evaluation's flag and the demo's config field take float32 or bfloat16
    ("evaluate_unknown_compute_dtype", EVALUATE + ("--compute_dtype=float16",),
     ["--compute_dtype=float16", "float32|bfloat16"]),
    ("demo_unknown_compute_dtype", DEMO + ("--config.model.compute_dtype=float16",),
     ["model.compute_dtype='float16'", "choose one of"]),
]


@pytest.mark.parametrize("case,args,culprits", START_UP_CASES, ids=[c[0] for c in START_UP_CASES])
def test_bad_input_is_refused_at_start_up(files, case, args, culprits):
    del case
    before = snapshot(files)
    refused(run(*(a.format(tmp=files) for a in args)), *culprits)
    assert snapshot(files) == before
    for made in ("never", "index", "demo", "new.jsonl", "negatives.jsonl"):
        assert not os.path.exists(files / made), made


# ---------------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def damaged(hf_space, tmp_path_factory):
    """Copies of the fixture's models with damaged files: model.safetensors cut short (a partial copy), a
    tokenizer.json cut short; a question encoder of another width than the index; questions naming no passage."""
    import transformers  # pylint: disable=g-import-not-at-top

    from tests import hf_models  # pylint: disable=g-import-not-at-top

    tmp = tmp_path_factory.mktemp("damaged")
    for name in ("ctx", "rag"):
        shutil.copytree(hf_space / name, tmp / name)
        weights = tmp / name / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    shutil.copytree(os.path.join(os.path.dirname(PASSAGES), "..", "tokenizers", "bert-base-uncased"), tmp / "tok")
    (tmp / "tok" / "tokenizer.json").write_text('{"version": "1.0", "truncation": nu')
    narrow = dict(REAL_VOCAB, hidden_size=24, num_attention_heads=3)
    hf_models.randomize(transformers.DPRQuestionEncoder(hf_models.dpr_config(**narrow)), 3).save_pretrained(
        tmp / "narrow_q")
    with open(hf_space / "questions.jsonl") as f:
        records = [json.loads(line) for line in f]
    write_jsonl(tmp / "unknown_gold.jsonl", [records[0], {**records[1], "gold_passage_id": 99999999}])
    return tmp


def _eval(space, *extra, model=None, questions=None):
    return ("experiments.eval_nq", f"--model={model or space / 'rag'}", f"--index={space}/index",
            f"--questions={questions or space / 'questions.jsonl'}", f"--output={space}/never.jsonl", *extra)


def _build(space, *extra, encoder=None, output=None):
    return ("experiments.build_index", f"--encoder={encoder or space / 'ctx'}", f"--passages={space}/passages.tsv",
            f"--output={output or space / 'never_index'}", "--batch_size=16", "--shard_size=16", "--max_length=64",
            *extra)


MODEL_CASES = [
    # lengths beyond the positions the model has (the fixture's BART: 160; its DPR encoders: 512)
    ("eval_max_length_beyond_positions", lambda s, d: _eval(s, "--max_length=300"),
     ["--max_length=300", "160 positions", "--max_length=160 or less"]),
    ("ask_max_length_beyond_positions", lambda s, d: ("experiments.ask", f"--model={s}/rag", f"--index={s}/index",
                                                      "--max_length=1000", "who wrote it"),
     ["--max_length=1000", "160 positions"]),
    ("build_max_length_beyond_positions", lambda s, d: _build(s, "--max_length=1000"),
     ["--max_length=1000", "512 positions", "--encoder="]),
    # damaged files
    ("build_truncated_safetensors", lambda s, d: _build(s, encoder=d / "ctx"),
     [f"{os.sep}ctx{os.sep}model.safetensors", "truncated", "download the file again"]),
    ("eval_truncated_safetensors", lambda s, d: _eval(s, model=d / "rag"),
     [f"{os.sep}rag{os.sep}model.safetensors", "truncated"]),
    ("build_corrupt_tokenizer_json", lambda s, d: _build(s, f"--tokenizer={d}/tok"),
     ["tok/tokenizer.json", "not valid JSON", "restore the tokenizer files"]),
    # passages and encoders that do not go together
    ("eval_unknown_gold_id", lambda s, d: _eval(s, questions=d / "unknown_gold.jsonl"),
     ["unknown_gold.jsonl:2", "passage id 99999999", "not in the corpus"]),
    ("mine_question_encoder_of_another_width", lambda s, d: (
        "experiments.mine_negatives", f"--index={s}/index", f"--question_encoder={d}/narrow_q",
        f"--questions={s}/questions.jsonl", f"--output={s}/never.jsonl"),
     ["--question_encoder=", "24-d", "--index=", "36-d"]),
]


@pytest.mark.parametrize("case,make_args,culprits", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_what_the_model_cannot_do_is_refused(hf_space, damaged, case, make_args, culprits):
    del case
    before = snapshot(hf_space, damaged)
    refused(run(*make_args(hf_space, damaged)), *culprits)
    assert snapshot(hf_space, damaged) == before
    assert not os.path.exists(hf_space / "never.jsonl") and not os.path.exists(hf_space / "never_index")


# ---------------------------------------------------------------------------------------------------- the OS


def test_a_full_disk_during_build_index_is_one_line_and_the_rerun_completes(hf_space, tmp_path):
    """No space for the embedding shards: one line naming the output and the cause; the rerun resumes from what
    was written and completes."""
    output = tmp_path / "index"
    refused(run_with_fault("enospc:embeddings-", *_build(hf_space, output=output)),
            "writing into", str(output), "No space left on device", "rerun the same command")
    done = run(*_build(hf_space, output=output))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((output / "index.json").read_text())["complete"]


def test_a_read_only_index_directory_is_one_line(hf_space, tmp_path):
    output = tmp_path / "ro_index"
    refused(run_with_fault("erofs:ro_index", *_build(hf_space, output=output)),
            str(output), "Read-only file system", "give a writable path")
    assert not os.path.exists(output)


@pytest.mark.parametrize("fault,culprits", [
    ("enospc:question_encoder_tokenizer", ["writing into", "ro_run", "No space left on device"]),
    ("erofs:ro_run", ["ro_run", "Read-only file system"]),
])
def test_a_full_disk_or_read_only_workdir_at_the_start_of_training_is_one_line(tmp_path, fault, culprits):
    """train_nq saves its tokenizers into the workdir before anything else: a full disk or a read-only workdir
    stops it there, with one line."""
    from tests import train_task  # pylint: disable=g-import-not-at-top

    task = train_task.write_bundled_task(str(tmp_path / "task"), num_questions=8, num_distractors=8)
    refused(run_with_fault(fault, "experiments.train_nq", f"--workdir={tmp_path / 'ro_run'}",
                           *train_task.cli_overrides(task)), *culprits)


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_through_train_nq(run_dir, tmp_path):
    """No space for checkpoint 6 of a resumed run: one line naming it and the last good checkpoint, which stays."""
    workdir = tmp_path / "run"
    shutil.copytree(run_dir["workdir"], workdir, symlinks=True)
    before = snapshot(workdir / "checkpoints")
    done = run_with_fault("enospc-checkpoint:6", "experiments.train_nq", f"--workdir={workdir}", *run_dir["flags"],
                          "--config.train.steps=8", env=run_dir["env"])
    refused(done, f"{workdir}/checkpoints/6", "No space left on device", f"{workdir}/checkpoints/4")
    assert {p: h for p, h in snapshot(workdir / "checkpoints").items() if p in before} == before
