"""Index refresh (rag_jax/training/index_refresh.py): the refreshed index is build_index's for the document encoder of
that step, host and device retrieval move to it without recompiling the step, checkpoints record their version,
unneeded versions go, eval reads the latest one, and a run killed during a refresh resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from rag_jax import sharding
from rag_jax.retrieval import embed, index_io
from rag_jax.runs import build, checkpoint, config_check, trained_model, workdir as workdir_lib
from rag_jax.training import index_refresh, loop
from tests import local_processes, process_env, train_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return train_task.write_bundled_task(str(tmp_path_factory.mktemp("task")), num_questions=16, num_distractors=16)


def _noisy(params, seed):
    """Other document-encoder weights: the frozen ones plus noise (a trained encoder's stand-in)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.5 * np.std(x) * rng.standard_normal(np.shape(x))
                                  .astype(np.float32), params)


def _embeddings(index_dir):
    return index_io.load_index(index_dir).embeddings(np.float32)


def test_refresh_schedule_reads_atlas_notation():
    assert config_check.refresh_schedule("0") == [(0, None, 0)]
    schedule = config_check.refresh_schedule("0-4:2,4-:3")
    assert [s for s in range(1, 13) if index_refresh.due(schedule, s)] == [2, 6, 9, 12]
    assert not any(index_refresh.due(config_check.refresh_schedule(0), s) for s in range(10))
    for bad in ("often", "0-4:2", "0-4:2,5-:3", "2-:3"):
        with pytest.raises(config_check.ConfigError, match="index.refresh_every"):
            config_check.refresh_schedule(bad)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["host", "device"])
def test_refresh_equals_build_index_without_recompiling(task, tmp_path, mode):
    """A refresh after step s with state.params["doc_encoder"] = W gives the index build_index makes with W (1e-5),
    and the searcher (host) or the step's corpus (device) holds it; the step does not compile again."""
    config = train_task.tiny_config(task, **{"retrieval.mode": mode, "index.refresh_every": "3",
                                             "index.shard_size": 8, "train.eval_every": 0})
    run = loop.setup(config, str(tmp_path / "run"))
    checkpointer = checkpoint.Checkpointer(run.workdir, async_save=False)
    refresher = index_refresh.IndexRefresher(run, checkpointer)
    pipeline = loop.make_pipeline(run)
    state = run.initial_state()
    rng = jax.random.PRNGKey(0)

    def step(state):
        with sharding.use(run.mesh):
            batch = run.batches(state.params, next(pipeline))
            return run.train_step(state, batch, rng, run.corpus)[0]

    state = step(state)
    assert run.train_step._cache_size() == 1
    doc_config, frozen = build.doc_encoder(config)
    trained = _noisy(frozen, 3)
    # What part A's state holds: the trained document encoder, placed on the devices.
    stand_in = types.SimpleNamespace(step=state.step, params={**state.params,
                                                              "doc_encoder": jax.device_put(trained)})
    assert not refresher.maybe_refresh(2, stand_in), "refresh_every=3 refreshed after step 2"
    assert refresher.maybe_refresh(3, stand_in)

    reference = embed.build_index(doc_config, trained, run.tokenizers.question, config.data.passages,
                                  str(tmp_path / "reference"), batch_size=config.index.batch_size,
                                  max_length=config.index.max_length, progress=False)
    want = reference.embeddings(np.float32)
    version_dir = workdir_lib.index_version_dir(run.workdir, 3)
    assert refresher.version == 3 and run.retriever.index.index_dir == version_dir
    got = _embeddings(version_dir)
    old = _embeddings(workdir_lib.index_dir(run.workdir))
    assert np.abs(want - old).max() > 1e-2, "the stand-in encoder embeds like the frozen one: nothing is tested"
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(run.retriever.searcher.embeddings_NxD), want, atol=1e-5, rtol=0)
    if mode == "device":
        np.testing.assert_allclose(np.asarray(run.corpus["embeddings"])[: len(want)], want, atol=1e-5, rtol=0)
    q = np.random.default_rng(0).standard_normal((4, want.shape[1])).astype(np.float32)
    rows, _ = run.retriever.searcher.search(q, 3)
    np.testing.assert_array_equal(rows, np.argsort(-(q @ want.T), axis=1, kind="stable")[:, :3])

    step(state)
    assert run.train_step._cache_size() == 1, "the step compiled again after the refresh"
    checkpointer.close()


def _metrics(workdir):
    path = workdir_lib.metrics_file(workdir)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_run_records_prunes_and_evaluates_its_index_versions(task, tmp_path, monkeypatch):
    """Refreshes on a schedule inside train_and_evaluate: checkpoints record their version, a version no kept
    checkpoint needs is deleted, metrics carry the index age, the step compiles once, eval loads the latest."""
    noisy = lambda self, state: _noisy(self.frozen_doc_params, int(jax.device_get(state.step)))
    monkeypatch.setattr(index_refresh.IndexRefresher, "doc_encoder_params", noisy)
    runs = []
    setup = loop.setup
    monkeypatch.setattr(loop, "setup", lambda *a, **k: runs.append(setup(*a, **k)) or runs[-1])
    config = train_task.tiny_config(task, **{"train.steps": 7, "train.checkpoint_every": 2, "train.log_every": 1,
                                             "train.keep_checkpoints": 2, "index.refresh_every": "0-4:2,4-:5",
                                             "train.eval_every": 0})
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)
    assert runs[0].train_step._cache_size() == 1
    # Refreshes after steps 2 and 5 (not 4: from step 4 on, every 5); checkpoints 6 and 7 are kept, both saved
    # with version 5, so version 2 is gone.
    assert workdir_lib.index_versions(workdir) == [0, 5]
    checkpointer = checkpoint.Checkpointer(workdir, read_only=True)
    assert {s: checkpointer.index_version(s) for s in checkpointer.all_steps()} == {6: 5, 7: 5}
    checkpointer.close()
    assert [m["index_age"] for m in _metrics(workdir)] == [1, 0, 1, 2, 0, 1, 2]
    assert workdir_lib.latest_complete_version(workdir) == 5
    assert trained_model.load(workdir).defaults.index == workdir_lib.index_version_dir(workdir, 5)


def _train(task, workdir, overrides, env_extra=None):
    env = process_env.command_env(
        devices=1, JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(workdir), "jax_cache"), **(env_extra or {}))
    command = [sys.executable, "-m", "tests.refresh_worker", f"--workdir={workdir}",
               *train_task.cli_overrides(task, **overrides)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_during_refresh_then_resume_is_exact(task, tmp_path):
    """SIGKILL while the refresh after step 6 has written its shards but not its index.json; the same command
    resumes from checkpoint 4 (which searched version 3), redoes the refresh and ends with the parameters and
    metrics of an uninterrupted run."""
    overrides = {"train.steps": 8, "train.checkpoint_every": 2, "train.log_every": 1, "index.refresh_every": "3",
                 "index.shard_size": 8, "train.eval_every": 0, "train.async_checkpoints": False}
    reference, workdir = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    marker = str(tmp_path / "paused")
    uninterrupted = _train(task, reference, overrides)
    process = _train(task, workdir, overrides, {"RAG_JAX_TEST_PAUSE_REFRESH": f"6:{marker}"})
    deadline = time.time() + 400
    while not os.path.exists(marker):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "timed out waiting for the refresh after step 6"
        time.sleep(0.05)
    half_written = workdir_lib.index_version_dir(workdir, 6)
    assert any(n.startswith("embeddings-") for n in os.listdir(half_written))
    with pytest.raises(index_io.IndexFormatError, match="complete=false"):
        index_io.load_index(half_written)
    process.send_signal(signal.SIGKILL)
    process.wait()

    output, _ = _train(task, workdir, overrides).communicate(timeout=400)
    assert "done: step 8" in output, output
    reference_output, _ = uninterrupted.communicate(timeout=400)
    assert "done: step 8" in reference_output, reference_output
    for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(trained_model.load(workdir).params)),
                    jax.tree_util.tree_leaves(jax.device_get(trained_model.load(reference).params))):
        np.testing.assert_array_equal(x, y)
    assert [m["loss"] for m in _metrics(workdir)] == [m["loss"] for m in _metrics(reference)]
    assert _metrics(workdir) == _metrics(reference)  # the index age included
    np.testing.assert_array_equal(_embeddings(half_written), _embeddings(workdir_lib.index_version_dir(reference, 6)))
    assert "searching index version 3" in output and "index refreshed after step 6" in output, output


def test_refresh_cost_on_paper_is_the_corpus_through_the_encoder():
    """compile_nq's refresh figure: the encoder's FLOPs for each passage, and the smallest interval within 10%."""
    from rag_jax.models import bert
    from rag_jax.training import flops
    cfg = bert.BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          max_position_embeddings=64)
    assert flops.index_refresh_flops(cfg, 1000, 64) == 1000 * flops.bert_forward_flops(cfg, 1, 64) > 0
    refresh_s, step_s = 438.0, 0.113
    every = flops.refresh_interval_for_share(refresh_s, step_s, 0.1)
    share = lambda n: refresh_s / (n * step_s + refresh_s)
    assert share(every) <= 0.1 < share(every - 1)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_refresh_their_own_rows_into_build_index_s_index(task, tmp_path):
    """2 processes x 2 CPU devices (jax.distributed on 127.0.0.1): each host embeds its rows of the refresh after
    step 2; the version they make together is build_index's with the document encoder of step 2 (1e-5)."""
    overrides = {"train.steps": 3, "train.checkpoint_every": 3, "train.log_every": 1, "mesh.model": 2,
                 "index.refresh_every": "2", "index.shard_size": 8, "train.eval_every": 0}
    workdir = str(tmp_path / "two")
    port = local_processes.free_port()
    env = process_env.command_env(devices=2)
    processes = [subprocess.Popen(
        [sys.executable, "-m", "tests.refresh_worker", f"--workdir={workdir}",
         *train_task.cli_overrides(task, **overrides), f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output
    assert "2 processes" in outputs[0] and "index refreshed after step 2" in outputs[0], outputs[0]

    config = train_task.tiny_config(task, **overrides)
    doc_config, frozen = build.doc_encoder(config)
    version = workdir_lib.index_version_dir(workdir, 2)
    meta = index_io.read_metadata(version)
    assert meta["num_hosts"] == 2 and meta["complete"]
    from rag_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    reference = embed.build_index(doc_config, _noisy(frozen, 2), tokenizers.load_question_tokenizer(
        config.tokenizers.question), config.data.passages, str(tmp_path / "reference"),
        batch_size=config.index.batch_size, max_length=config.index.max_length, progress=False)
    np.testing.assert_allclose(_embeddings(version), reference.embeddings(np.float32), atol=1e-5, rtol=0)
