"""The paper's task variants (experiments/configs/paper_tasks.py) pass every start-up check of a run config once
their paths are given, and refuse to start without the task's files, naming the fields to set."""

import pytest

from experiments.configs import nq, paper_tasks
from rag_jax.runs import config_check

# the fields `paper` leaves unset (placeholders): directories, and the files beside the task's own
_DIRECTORIES = ("tokenizers.question", "tokenizers.generator", "model.question_encoder.init", "model.doc_encoder.init",
                "model.generator.init")


def _with_paths(config, tmp_path, task_files=True):
    (tmp_path / "checkpoint").mkdir(exist_ok=True)
    (tmp_path / "file.jsonl").write_text("{}\n")
    for field in _DIRECTORIES:
        section, *rest = field.split(".")
        node = config[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = str(tmp_path / "checkpoint")
    config.data.passages = str(tmp_path / "file.jsonl")
    if task_files:
        config.task.train_file = config.task.dev_file = str(tmp_path / "file.jsonl")
    return config


@pytest.mark.parametrize("variant", paper_tasks.VARIANTS)
def test_a_paper_task_variant_passes_the_config_checks(variant, tmp_path):
    config = _with_paths(nq.get_config(variant), tmp_path)
    config_check.check_config(config)


@pytest.mark.parametrize("variant", paper_tasks.VARIANTS)
def test_a_paper_task_variant_without_its_files_names_them(variant, tmp_path):
    config = _with_paths(nq.get_config(variant), tmp_path, task_files=False)
    with pytest.raises(config_check.ConfigError, match=r"task\.train_file and task\.dev_file"):
        config_check.check_config(config)
