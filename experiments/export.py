"""Exports a rag_jax training run out of training.

  python -m experiments.export --workdir=DIR --format=hf|orbax --output=DIR [--step=N]

hf:    a directory that transformers' RagSequenceForGeneration / RagTokenForGeneration `from_pretrained` loads
       (config.json, generation_config.json, model.safetensors, question_encoder_tokenizer/, generator_tokenizer/);
       the architecture follows the run's loss (RAG-Sequence or RAG-Token). It carries the run's generation settings
       and answer tokenisation, so eval_nq on it answers and scores exactly as eval_nq on the workdir.
orbax: the parameters only (no optimizer state), for serving, with the run's config.json.
Both refuse to write into an existing non-empty directory.
"""

from absl import app, flags

from experiments import cli
from rag_jax.data import tokenizers
from rag_jax.inference import export
from rag_jax.training import checkpoint, trained_model, workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/).")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "orbax"], "Output layout.")
_OUTPUT = flags.DEFINE_string("output", None, "New directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
    del argv

    def run():
        export.refuse_to_overwrite(_OUTPUT.value)  # before the (slow) restore
        trained = trained_model.load(_WORKDIR.value, step=_STEP.value)
        if _FORMAT.value == "orbax":
            export.save_params_orbax(_OUTPUT.value, trained.params, checkpoint.config_to_json(trained.config))
        else:
            dirs = workdir.tokenizer_dirs(_WORKDIR.value)
            question = tokenizers.load_question_tokenizer(dirs["question"])
            generator = tokenizers.load_generator_tokenizer(dirs["generator"])
            defaults = trained.defaults
            export.save_hf_rag(_OUTPUT.value, trained.model, trained.params, defaults.model_type, question, generator,
                               generation=defaults.generation[defaults.model_type],
                               answer_prefix_space=defaults.answer_prefix_space)
        print(f"exported {_WORKDIR.value} ({_FORMAT.value}) to {_OUTPUT.value}")

    cli.run(run)


if __name__ == "__main__":
    app.run(main)
