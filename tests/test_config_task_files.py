"""A run's files are task.train_file / task.dev_file; their old names data.train_file / data.dev_file (configs saved
before the task section held them, command lines written for them) still work, and both names set to different
files stop the run in one line (rag_jax/runs/config_fields.py task_file)."""

import ml_collections
import pytest

from experiments import input_checks
from rag_jax.runs import build, checkpoint, config_check
from tests import train_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return train_task.write_bundled_task(str(tmp_path_factory.mktemp("task")), num_questions=16, num_distractors=16)


def _old_style(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with its files under their old names, as a config written before task.train_file existed."""
    config.data.train_file, config.data.dev_file = config.task.train_file, config.task.dev_file
    config.task.train_file = config.task.dev_file = None
    return config


def test_the_new_fields_name_the_files(task):
    config = train_task.tiny_config(task)
    assert config_check.task_file(config, "train") == ("task.train_file", task["questions"])
    assert config_check.task_file(config, "dev") == ("task.dev_file", task["questions"])
    config.data.train_file = task["questions"]  # the old name set to the same file as well: no conflict
    assert config_check.task_file(config, "train") == ("task.train_file", task["questions"])


def test_the_old_fields_are_read_where_the_new_are_unset(task, capsys):
    config = _old_style(train_task.tiny_config(task))
    assert config_check.task_file(config, "train") == ("data.train_file", task["questions"])
    assert config_check.task_file(config, "dev") == ("data.dev_file", task["questions"])
    assert "config data.train_file is deprecated; use task.train_file" in capsys.readouterr().err


def test_a_saved_config_without_the_new_fields_reads_the_old_ones(task):
    """A checkpoint's config (JSON) from before task.train_file: its task section lacks the field (or the whole
    section is missing); the run's files are still found, and the config checks pass."""
    saved = checkpoint.config_to_json(_old_style(train_task.tiny_config(task)))
    del saved["task"]["train_file"], saved["task"]["dev_file"]
    config = ml_collections.ConfigDict(saved)
    config_check.check_config(config)
    assert config_check.task_file(config, "dev") == ("data.dev_file", task["questions"])
    del saved["task"]
    assert config_check.task_file(ml_collections.ConfigDict(saved), "train")[1] == task["questions"]


def test_both_names_set_to_different_files_is_refused_in_one_line(task, tmp_path):
    config = train_task.tiny_config(task)
    config.data.dev_file = str(tmp_path / "other.jsonl")
    with pytest.raises(config_check.ConfigError) as error:
        config_check.check_config(config)
    message = str(error.value)
    assert "\n" not in message
    assert "task.dev_file=" in message and "data.dev_file=" in message and "--config.task.dev_file" in message


def _examples(config, split):
    source = build.data_source(config, split)
    return [source[i] for i in range(len(source))]


def test_an_old_style_config_trains_and_evaluates_on_the_same_examples(task):
    """The same files under the old names pass the start-up checks and give the training loop (loop.setup reads
    both splits through build.data_source) the same examples. A full training step each was measured at ~80 s under
    load, for the same property: the step never sees the config's file fields."""
    new, old = train_task.tiny_config(task), _old_style(train_task.tiny_config(task))
    for config in (new, old):
        build.check_config(config)
        input_checks.check_nq_training_inputs(config)
    for split in ("train", "dev"):
        assert _examples(old, split) == _examples(new, split)
    assert len(_examples(old, "dev")) == 16  # the file's questions, not data.source's 200
