"""A generator architecture added from this file alone (rag_jax/models/registry.py): BART with SiLU feed-forward
activations, registered as `bart_silu`. It trains with experiments.train_nq, answers with experiments.eval_nq and
exports with experiments.export, each a separate process that finds the entry from the run config's name
`tests.test_generator_registry:bart_silu` (importing this module registers it); no other file names it."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rag_jax.models import bart, bart_generator, hf, registry
from tests import hf_models, process_env, train_task

NAME = f"{__name__}:bart_silu"

# BART's fields with another default activation. Deliberately not a bart.BartConfig subclass: a place that still
# switched on isinstance(config, BartConfig) instead of asking the registry would not recognise it.
SiluBartConfig = dataclasses.make_dataclass(
    "SiluBartConfig",
    [(f.name, f.type, dataclasses.field(default="silu" if f.name == "activation_function" else f.default))
     for f in dataclasses.fields(bart.BartConfig)],
    frozen=True)


def _silu(config) -> SiluBartConfig:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return SiluBartConfig(**{**fields, "activation_function": "silu"})


def _params_from_hf(tensors, prefix, hf_config, source, used, **overrides):
    cfg = _silu(hf.bart_config_from_hf(hf_config, **overrides))
    return cfg, hf.bart_params(tensors, prefix, cfg, source, used)


BART_SILU = registry.register(dataclasses.replace(
    bart_generator.ENTRY, name="bart_silu", config_class=SiluBartConfig,
    config_from_run=lambda c, dtype: _silu(bart_generator.config_from_run(c, dtype)),
    config_from_hf=lambda hf_config, **overrides: _silu(hf.bart_config_from_hf(hf_config, **overrides)),
    params_from_hf=_params_from_hf,
))  # fmt: skip


def _run(*args):
    env = process_env.command_env()
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _eval(model: str, index: str, questions: str, output: str) -> list[dict]:
    _run("experiments.eval_nq", f"--model={model}", f"--index={index}", f"--questions={questions}",
         f"--output={output}", "--score", "--batch_size=4")
    with open(output) as f:
        return [json.loads(line) for line in f]


def test_the_registry_finds_the_entry_by_its_config_name_and_its_config():
    assert registry.known(NAME) and registry.get(NAME) is BART_SILU
    assert not registry.known("tests.test_generator_registry_missing:x") and not registry.known("nope")
    cfg = SiluBartConfig(vocab_size=40, d_model=8, encoder_layers=1, decoder_layers=1, encoder_heads=2,
                         decoder_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16)
    assert registry.for_config(cfg) is BART_SILU and registry.for_config(bart.BartConfig()) is bart_generator.ENTRY
    assert registry.for_hf("bart") is bart_generator.ENTRY  # a Hugging Face BART stays the built-in


@pytest.mark.slow
def test_a_generator_registered_in_a_test_trains_evaluates_and_exports(tmp_path):
    """train_nq -> eval_nq -> export -> eval_nq on the export, every step in its own process: the run's model is the
    toy's (its config class, SiLU), and the export (a transformers BART with activation_function silu) answers and
    scores as the workdir does."""
    from rag_jax.runs import trained_model

    task = train_task.write_bundled_task(str(tmp_path / "task"), num_questions=8, num_distractors=8)
    workdir, hf_dir = str(tmp_path / "run"), str(tmp_path / "hf")
    _run("experiments.train_nq", f"--workdir={workdir}", *train_task.cli_overrides(task, **{
        "train.steps": 2, "train.checkpoint_every": 2, "train.async_checkpoints": False,
        "model.generator.architecture": NAME}))  # fmt: skip
    model = trained_model.load(workdir).model
    assert type(model.generator_config) is SiluBartConfig and model.generator_config.activation_function == "silu"

    _run("experiments.export", f"--workdir={workdir}", "--format=hf", f"--output={hf_dir}")
    with open(os.path.join(hf_dir, "config.json")) as f:
        assert json.load(f)["generator"]["activation_function"] == "silu"
    index, questions = os.path.join(workdir, "index"), task["questions"]
    ours = _eval(workdir, index, questions, str(tmp_path / "workdir.jsonl"))
    exported = _eval(hf_dir, index, questions, str(tmp_path / "export.jsonl"))
    assert [r["prediction"] for r in exported] == [r["prediction"] for r in ours]
    for key in ("nll_sequence", "nll_token"):
        got, want = np.array([r[key] for r in exported]), np.array([r[key] for r in ours])
        assert hf_models.relative_error(got, want) <= 1e-4, key
