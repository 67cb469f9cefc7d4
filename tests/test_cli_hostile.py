"""Hostile but fair use of the entry points, through their real command lines: bad flags and config fields, damaged
and mismatched files, interrupted and failing jobs. Each case must end with exit status 1 and one `error:` line (the
last on stderr) naming the culprit, no traceback, and no existing file changed; what recovers must recover.

Start-up cases need no model and fail in a fraction of a second (the entry points check flags before jax loads);
the others share two session fixtures (tests/hostile.py): a Hugging Face RAG directory with a built index, and a
tiny trained workdir. More cases: tests/test_cli_hostile_inputs.py (inputs against what the model and the data can
do, damaged files, OS errors) and tests/test_cli_hostile_outputs.py (outputs and inputs, debris, preemption).
"""

import errno
import itertools
import json
import os
import shutil

import numpy as np
import pytest

from rag_jax.retrieval import corpus
from tests.hostile import PASSAGES, QUESTIONS, refused, run, snapshot, write_jsonl

pytest_plugins = ["tests.hostile"]  # its session fixtures hf_space and run_dir: one copy for all the tables


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs of the start-up cases: questions (good, and one without answers), an existing output, someone's
    directory, a plain file."""
    tmp = tmp_path_factory.mktemp("files")
    with open(QUESTIONS) as f:
        write_jsonl(tmp / "questions.jsonl", [json.loads(line) for line in itertools.islice(f, 3)])
    write_jsonl(tmp / "no_answers.jsonl", [{"question": "who wrote it", "answers": ["me"]},
                                           {"question": "who else", "answers": []}])
    (tmp / "old.jsonl").write_text("results of an earlier evaluation\n")
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("not an index")
    (tmp / "afile").write_text("a file")
    (tmp / "outdir").mkdir()
    (tmp / "outdir" / "keep.txt").write_text("an earlier export")
    return tmp


TRAIN = ("experiments.train_nq", "--config=experiments/configs/nq.py:tiny", "--workdir={tmp}/never")
EVAL = ("experiments.eval_nq", "--model={tmp}/no_model", "--questions={tmp}/questions.jsonl",
        "--output={tmp}/new.jsonl")
BUILD = ("experiments.build_index", "--encoder={tmp}/no_encoder", f"--passages={PASSAGES}", "--output={tmp}/index")
EXPORT = ("experiments.export", "--workdir={tmp}/mine", "--output={tmp}/export")
ASK = ("experiments.ask", "--model={tmp}/mine")

START_UP_CASES = [
    # eval_nq: impossible values, outputs that would lose data, missing inputs, a question without answers
    ("eval_n_docs_0", EVAL + ("--n_docs=0",), ["--n_docs=0"]),
    ("eval_num_beams_0", EVAL + ("--num_beams=0",), ["--num_beams=0"]),
    ("eval_batch_size_0", EVAL + ("--batch_size=0",), ["--batch_size=0"]),
    ("eval_max_length_0", EVAL + ("--max_length=0",), ["--max_length=0"]),
    ("eval_min_over_max", EVAL + ("--min_length=9", "--max_length=3"), ["--min_length", "--max_length"]),
    ("eval_limit_0", EVAL + ("--limit=0",), ["--limit=0"]),
    ("eval_output_exists", EVAL + ("--output={tmp}/old.jsonl",), ["--output=", "old.jsonl", "--overwrite"]),
    ("eval_output_is_a_dir", EVAL + ("--output={tmp}/mine", "--overwrite"), ["--output=", "is a directory"]),
    ("eval_output_dir_missing", EVAL + ("--output={tmp}/nowhere/out.jsonl",), ["nowhere", "does not exist"]),
    ("eval_questions_missing", EVAL + ("--questions={tmp}/nothing.jsonl",), ["--questions=", "no such file"]),
    ("eval_index_missing", EVAL + ("--index={tmp}/no_index",), ["--index=", "no such directory"]),
    ("eval_empty_answers", EVAL + ("--questions={tmp}/no_answers.jsonl", "--score"),
     ["no_answers.jsonl:2", "non-empty list"]),
    ("eval_unknown_flag", EVAL + ("--n_doc=3",), ["n_doc"]),
    ("eval_positional_argument", EVAL + ("n_docs=3",), ["unexpected arguments: n_docs=3"]),
    # build_index
    ("build_batch_size_0", BUILD + ("--batch_size=0",), ["--batch_size=0"]),
    ("build_max_length_0", BUILD + ("--max_length=0",), ["--max_length=0"]),
    ("build_shard_size_0", BUILD + ("--shard_size=0",), ["--shard_size=0"]),
    ("build_host_index_too_big", BUILD + ("--host_index=2", "--num_hosts=2"), ["--host_index=2", "--num_hosts=2"]),
    ("build_host_index_alone", BUILD + ("--host_index=0",), ["--host_index", "--num_hosts"]),
    ("build_output_is_a_file", BUILD + ("--output={tmp}/afile",), ["afile", "is a file"]),
    ("build_output_is_someones_dir", BUILD + ("--output={tmp}/mine",), ["mine", "holds no index"]),
    ("build_passages_missing", BUILD + ("--passages={tmp}/nothing.tsv",), ["--passages=", "no such file"]),
    ("build_positional_argument", BUILD + ("psgs.tsv",), ["unexpected arguments: psgs.tsv"]),
    ("build_codes_unknown", BUILD + ("--codes=pq:x",), ["--codes='pq:x'", "pq:M"]),
    ("build_codes_int4", BUILD + ("--codes=int4",), ["--codes='int4'", "int8"]),
    ("build_add_to_missing_index", ("experiments.build_index", "--output={tmp}/never", "--encoder={tmp}/no_encoder",
                                    "--add={tmp}/questions.jsonl"), ["--output=", "never", "no complete index"]),
    ("build_remove_from_missing_index", ("experiments.build_index", "--output={tmp}/never",
                                         "--remove={tmp}/old.jsonl"), ["--output=", "never", "no complete index"]),
    ("build_add_with_passages", BUILD + ("--add={tmp}/questions.jsonl",), ["--passages and --add", "separate runs"]),
    ("build_nothing_to_do", ("experiments.build_index", "--output={tmp}/never"), ["give --passages", "--add"]),
    # train_nq: every config field's type and range, combinations, the workdir, the process flags
    ("train_negative_lr", TRAIN + ("--config.optim.learning_rate=-0.001",), ["optim.learning_rate=-0.001", "> 0"]),
    ("train_zero_steps", TRAIN + ("--config.train.steps=0",), ["train.steps=0", ">= 1"]),
    ("train_steps_not_a_number", TRAIN + ("--config.train.steps=abc",), ["--config.train.steps=abc"]),
    ("train_label_smoothing", TRAIN + ("--config.model.label_smoothing=1.5",), ["model.label_smoothing=1.5"]),
    ("train_beta_1", TRAIN + ("--config.optim.b2=1.0",), ["optim.b2=1.0", "< 1.0"]),
    ("train_mesh_data_0", TRAIN + ("--config.mesh.data=0",), ["mesh.data=0", "-1"]),
    ("train_keep_0", TRAIN + ("--config.train.keep_checkpoints=0",), ["train.keep_checkpoints=0"]),
    ("train_recall_ks", TRAIN + ("--config.eval.recall_ks=(0,)",), ["eval.recall_ks"]),
    ("train_index_dtype", TRAIN + ("--config.index.dtype=float64",), ["index.dtype='float64'", "bfloat16"]),
    ("train_seed", TRAIN + ("--config.seed=-1",), ["seed=-1"]),
    ("train_index_codes", TRAIN + ("--config.index.codes=pq:0",), ["config index.codes='pq:0'", "pq:M"]),
    ("train_codes_searcher_without_codes", TRAIN + ("--config.retrieval.host_searcher=codes",),
     ["host_searcher='codes'", "index.codes"]),
    ("train_heads_split", TRAIN + ("--config.model.generator.d_model=31",), ["model.generator.d_model=31",
                                                                            "model.generator.heads"]),
    ("train_longer_than_positions", TRAIN + ("--config.data.max_question_length=1000",),
     ["data.max_question_length=1000", "max_position_embeddings"]),
    ("train_missing_passages", TRAIN + ("--config.data.passages={tmp}/nothing.tsv",), ["data.passages"]),
    ("train_workdir_is_a_file", ("experiments.train_nq", "--workdir={tmp}/afile"), ["--workdir=", "is a file"]),
    ("train_process_id", TRAIN + ("--num_processes=2", "--process_id=2"), ["--process_id", "--num_processes"]),
    # export
    ("export_not_a_workdir", EXPORT, ["--workdir=", "not a training workdir"]),
    ("export_negative_step", EXPORT + ("--step=-1",), ["--step=-1"]),
    ("export_positional_argument", EXPORT + ("hf",), ["unexpected arguments: hf"]),
    # ask
    ("ask_model_missing", ("experiments.ask", "--model={tmp}/no_model", "who"), ["--model=", "no such directory"]),
    ("ask_empty_question", ASK + ("who wrote it", " "), ["question 2 is empty"]),
    ("ask_plot_format", ASK + ("--plot={tmp}/why.pdf", "who"), ["--plot=", ".png"]),
    ("ask_index_missing", ASK + ("--index={tmp}/no_index", "who"), ["--index=", "no such directory"]),
]


@pytest.mark.parametrize("case,args,culprits", START_UP_CASES, ids=[c[0] for c in START_UP_CASES])
def test_bad_input_is_refused_at_start_up(files, case, args, culprits):
    del case
    before = snapshot(files)
    done = run(*(a.format(tmp=files) for a in args))
    refused(done, *culprits)
    assert snapshot(files) == before
    assert not os.path.exists(files / "never") and not os.path.exists(files / "index")


# ---------------------------------------------------------------------------------------------------- an index


def _build_args(space, output, *extra):
    return ("experiments.build_index", f"--encoder={space}/ctx", f"--passages={space}/passages.tsv",
            f"--output={output}", "--batch_size=16", "--shard_size=16", "--max_length=64", *extra)


@pytest.mark.parametrize("flag,culprit", [("--max_length=32", "--max_length=32"), ("--dtype=float16", "--dtype"),
                                          ("--shard_size=8", "--shard_size=8")])
def test_build_index_resumed_with_other_settings_is_refused(hf_space, flag, culprit):
    """A rerun with another maximum length (or dtype, or shard size) would mix vectors made two ways."""
    before = snapshot(hf_space / "index")
    args = [a for a in _build_args(hf_space, hf_space / "index") if not a.startswith(flag.split("=")[0] + "=")]
    refused(run(*args, flag), culprit, "to resume it")
    assert snapshot(hf_space / "index") == before


def test_index_of_another_identity_is_not_resumed(hf_space, tmp_path):
    """An index written before its identity was recorded loads (identity unknown) but is not resumed: its vectors
    cannot be matched to the run's settings. One built with another tokenizer is not resumed either."""
    from rag_jax.retrieval import index_io  # pylint: disable=g-import-not-at-top

    for name, edit in (("old", lambda m: [m.pop(f) for f in index_io.RECORDED_IDENTITY]),
                       ("other_tokenizer", lambda m: m.update(tokenizer_id="0" * 16))):
        index = tmp_path / name
        shutil.copytree(hf_space / "index", index)
        meta = json.loads((index / "index.json").read_text())
        edit(meta)
        (index / "index.json").write_text(json.dumps(meta))
        if name == "old":
            assert index_io.load_index(str(index)).identity.keys() == {"encoder_id", "dtype"}
        before = snapshot(index)
        message = refused(run(*_build_args(hf_space, index)), str(index / "index.json"))
        assert ("written before" in message) if name == "old" else ("tokenizer_id" in message), message
        assert snapshot(index) == before


def test_non_finite_rows_never_reach_a_search_and_the_output_survives(hf_space, tmp_path):
    """A damaged shard (a NaN) is refused naming the file, row and remedy; an --overwrite of an earlier output keeps
    that output until a run completes, so the failed run leaves it as it was, with no partial file beside it."""
    index = tmp_path / "index"
    shutil.copytree(hf_space / "index", index)
    shard = np.load(index / "embeddings-00001.npy")
    shard[3, 5] = np.nan
    np.save(index / "embeddings-00001.npy", shard)
    output = tmp_path / "predictions.jsonl"
    output.write_text("an earlier evaluation\n")
    done = run("experiments.eval_nq", f"--model={hf_space}/rag", f"--index={index}",
               f"--questions={hf_space}/questions.jsonl", f"--output={output}", "--overwrite")
    refused(done, "embeddings-00001.npy", "row 19", "non-finite", "build_index")
    assert output.read_text() == "an earlier evaluation\n"
    assert sorted(os.listdir(tmp_path)) == ["index", "predictions.jsonl"]


def _updated_copy(hf_space, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(hf_space / "index", index)
    return index


def test_bad_updates_of_an_index_are_refused_and_change_nothing(hf_space, tmp_path):
    """--codes that do not divide the dimension, --add of a passage id the index has (or with another encoder),
    --remove of an id it lacks, --add of a missing file: one error line each, the index as it was."""
    index = _updated_copy(hf_space, tmp_path)
    first = next(corpus.read_passages(hf_space / "passages.tsv"))
    write_jsonl(tmp_path / "dup.jsonl", [{"id": "new-1", "title": "t", "text": "a new passage"},
                                         {"id": first.id, "title": first.title, "text": first.text}])
    (tmp_path / "ids.txt").write_text(f"{first.id}\nno-such-passage\n")
    other = tmp_path / "other_ctx"
    shutil.copytree(hf_space / "ctx", other)
    with open(other / "config.json") as f:
        config = json.load(f)
    (other / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-5}))
    before = snapshot(index)
    update = ("experiments.build_index", f"--output={index}")
    for args, culprits in (
            (("--codes=pq:7",), ["--codes=pq:7", "does not divide"]),
            ((f"--encoder={hf_space}/ctx", f"--add={tmp_path}/dup.jsonl"), ["dup.jsonl", "passage 2", first.id]),
            ((f"--encoder={other}", f"--add={tmp_path}/dup.jsonl"), ["encoder_id"]),
            ((f"--remove={tmp_path}/ids.txt",), ["ids.txt:2", "no-such-passage"]),
            ((f"--encoder={hf_space}/ctx", f"--add={tmp_path}/nothing.jsonl"), ["--add=", "no such file"])):
        refused(run(*update, *args), *culprits)
        assert snapshot(index) == before, args


def test_codes_add_and_remove_through_the_command_line(hf_space, tmp_path):
    """build_index --codes, --add, --remove, --compact on a built index, then eval_nq searching the codes: the
    added passage is retrievable, the removed one never is."""
    from rag_jax.retrieval import index_io, retriever  # pylint: disable=g-import-not-at-top

    index = _updated_copy(hf_space, tmp_path)
    update = ("experiments.build_index", f"--output={index}", f"--encoder={hf_space}/ctx", "--batch_size=16")
    assert run(*update, "--codes=int8").returncode == 0
    write_jsonl(tmp_path / "new.jsonl", [{"id": "new-1", "title": "Zorblat", "text": "Zorblat was born in Quito."}])
    done = run(*update, f"--add={tmp_path}/new.jsonl")
    assert done.returncode == 0 and "41 passages" in done.stdout, done.stderr[-2000:]
    first = next(corpus.read_passages(hf_space / "passages.tsv"))
    (tmp_path / "ids.txt").write_text(f"{first.id}\n")
    assert run(*update, f"--remove={tmp_path}/ids.txt").returncode == 0
    loaded = index_io.load_index(str(index))
    assert loaded.identity["index_version"] == 2 and loaded.passages[40].id == "new-1"
    vectors = loaded.read_rows(0, 41)
    rows, _ = retriever.make_searcher(loaded, "codes", 41).search(vectors[[0, 40]], 3)  # every row re-ranked
    want = 1 + np.argsort(-(vectors[[0, 40]] @ vectors[1:].T), axis=1, kind="stable")[:, :3]  # the live rows' best
    np.testing.assert_array_equal(rows, want)
    output = tmp_path / "predictions.jsonl"
    done = run("experiments.eval_nq", f"--model={hf_space}/rag", f"--index={index}", "--retrieval=codes",
               f"--questions={hf_space}/questions.jsonl", f"--output={output}", "--n_docs=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(first.id not in json.loads(line)["doc_ids"] for line in output.read_text().splitlines())
    assert run(*update, "--compact").returncode == 0
    assert index_io.load_index(str(index)).num_passages == 40


# ---------------------------------------------------------------------------------------------------- a run


def _index_with(run_dir, tmp_path, **fields):
    """A copy of the run's index whose index.json says it was built another way."""
    index = tmp_path / "index"
    shutil.copytree(os.path.realpath(run_dir["workdir"] / "index"), index)
    meta = json.loads((index / "index.json").read_text())
    meta.update(fields)
    (index / "index.json").write_text(json.dumps(meta))
    return index


@pytest.mark.parametrize("field,value", [("encoder_id", "0123456789abcdef"), ("max_length", 32)])
def test_eval_of_a_run_refuses_an_index_of_another_identity(run_dir, tmp_path, field, value):
    """Same dimension, other vectors: a run's own index says what its question encoder was trained against."""
    index = _index_with(run_dir, tmp_path, **{field: value})
    done = run("experiments.eval_nq", f"--model={run_dir['workdir']}", f"--index={index}",
               f"--questions={run_dir['task']['questions']}", f"--output={tmp_path}/out.jsonl")
    refused(done, f"{field}=", f"--model={run_dir['workdir']}")
    assert not os.path.exists(tmp_path / "out.jsonl")
    refused(run("experiments.ask", f"--model={run_dir['workdir']}", f"--index={index}", "who wrote it"), f"{field}=")


@pytest.mark.slow
def test_an_export_carries_the_identity_of_its_index(run_dir, tmp_path):
    """The Hugging Face export of a run refuses another index as the run does; --overwrite replaces it whole."""
    export = tmp_path / "hf"
    assert run("experiments.export", f"--workdir={run_dir['workdir']}", f"--output={export}").returncode == 0
    before = snapshot(export)
    refused(run("experiments.export", f"--workdir={run_dir['workdir']}", f"--output={export}"), "--overwrite")
    assert snapshot(export) == before
    index = _index_with(run_dir, tmp_path, encoder_id="0123456789abcdef")
    done = run("experiments.eval_nq", f"--model={export}", f"--index={index}",
               f"--questions={run_dir['task']['questions']}", f"--output={tmp_path}/out.jsonl")
    refused(done, "encoder_id=", f"--model={export}")
    done = run("experiments.export", f"--workdir={run_dir['workdir']}", f"--output={export}", "--format=orbax",
               "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(export)) == ["config.json", "params"]
    assert sorted(os.listdir(tmp_path)) == ["hf", "index"]  # no partial or old copy left beside it


def test_export_of_a_missing_step_or_onto_a_file_is_refused(run_dir, tmp_path):
    refused(run("experiments.export", f"--workdir={run_dir['workdir']}", f"--output={tmp_path}/x", "--step=3"),
            "checkpoints/3", "no such checkpoint", "[2, 4]")
    assert not os.path.exists(tmp_path / "x")
    (tmp_path / "afile").write_text("a file")
    refused(run("experiments.export", f"--workdir={run_dir['workdir']}", f"--output={tmp_path}/afile", "--overwrite"),
            "afile", "is a file")
    assert (tmp_path / "afile").read_text() == "a file"


@pytest.mark.parametrize("override,culprits", [
    ("--config.model.generator.d_model=64", ["checkpoints/4", "model.generator.d_model=32 there, 64 now"]),
    ("--config.model.doc_encoder.initializer_range=0.3", ["encoder_id=", "model.doc_encoder"]),
    ("--config.index.max_length=32", ["max_length=64", "index.max_length"]),
])
def test_resuming_with_another_model_is_refused(run_dir, override, culprits):
    """The run's checkpoints and index fix its model: a rerun with other sizes, another document encoder or other
    index settings is refused naming the config field, with nothing written."""
    workdir = run_dir["workdir"]
    before = snapshot(workdir / "checkpoints", os.path.realpath(workdir / "index"))
    done = run("experiments.train_nq", f"--workdir={workdir}", *run_dir["flags"], "--config.train.steps=6", override,
               env=run_dir["env"])
    refused(done, *culprits)
    assert snapshot(workdir / "checkpoints", os.path.realpath(workdir / "index")) == before


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped(run_dir, tmp_path):
    """A damaged data file in the newest checkpoint: evaluation and a resumed run use the previous one, saying
    which they skipped and why; the run moves it aside (kept) and carries on."""
    workdir = tmp_path / "run"
    shutil.copytree(run_dir["workdir"], workdir, symlinks=True)
    params = workdir / "checkpoints" / "4" / "params"
    data_file = next(p for p in sorted(params.rglob("*")) if p.is_file() and p.parent.name == "d")
    data_file.write_bytes(b"\0" * 100)
    done = run("experiments.eval_nq", f"--model={workdir}", f"--questions={run_dir['task']['questions']}",
               f"--output={tmp_path}/out.jsonl", "--limit=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped checkpoint {workdir}/checkpoints/4" in done.stderr and "Traceback" not in done.stderr
    done = run("experiments.train_nq", f"--workdir={workdir}", *run_dir["flags"], "--config.train.steps=6",
               env=run_dir["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"skipped checkpoint {workdir}/checkpoints/4" in done.stdout, done.stdout
    assert f"resumed from {workdir}/checkpoints/2" in done.stdout and "done: step 6" in done.stdout, done.stdout
    assert (workdir / "checkpoints_skipped" / "4" / "params").is_dir()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]


@pytest.mark.slow
def test_a_failed_background_save_stops_the_run_at_once(run_dir, tmp_path, monkeypatch):
    """No space left for checkpoint 6 of a resumed run (its data item's background write fails): the run stops
    with a user error naming the path and the cause, and checkpoint 4 stays the last good one."""
    import jax  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    from experiments import cli  # pylint: disable=g-import-not-at-top
    from rag_jax import sharding  # pylint: disable=g-import-not-at-top
    from rag_jax.runs import checkpoint  # pylint: disable=g-import-not-at-top
    from rag_jax.training import loop  # pylint: disable=g-import-not-at-top
    from tests import train_task  # pylint: disable=g-import-not-at-top

    original = ocp.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_6(self, x, directory):
        if f"{os.sep}checkpoints{os.sep}6" in str(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full_at_step_6)
    workdir = tmp_path / "run"
    shutil.copytree(run_dir["workdir"], workdir, symlinks=True)
    config = train_task.tiny_config(run_dir["task"], **{"train.steps": 12, "train.checkpoint_every": 2,
                                                        "train.log_every": 1})
    with pytest.raises(checkpoint.CheckpointSaveError) as error:
        loop.train_and_evaluate(config, str(workdir), mesh=sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
    message = str(error.value)
    assert cli.is_user_error(error.value)
    assert f"{workdir}/checkpoints/6" in message and "No space left on device" in message, message
    assert f"last good checkpoint is {workdir}/checkpoints/4" in message, message
    with open(workdir / "metrics.jsonl") as f:
        logged = [json.loads(line)["step"] for line in f]
    assert max(logged) <= 8, logged  # stopped within a step or two of the failure, not at the end
    assert checkpoint.Checkpointer(str(workdir), read_only=True).all_steps() == [2, 4]
