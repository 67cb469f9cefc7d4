"""Exports a rag_jax training run out of training.

  python -m experiments.export --workdir=DIR --format=hf|orbax --output=DIR [--step=N]

hf:    a directory that transformers' RagSequenceForGeneration / RagTokenForGeneration `from_pretrained` loads
       (config.json, model.safetensors, question_encoder_tokenizer/, generator_tokenizer/); the architecture follows
       the run's loss (RAG-Sequence or RAG-Token).
orbax: the parameters only (no optimizer state), for serving, with the run's config.json.
Both refuse to write into an existing non-empty directory.
"""

import os

from absl import app, flags

from experiments import cli
from rag_jax import checkpoint, export, tokenizers

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/).")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "orbax"], "Output layout.")
_OUTPUT = flags.DEFINE_string("output", None, "New directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
    del argv

    def run():
        export.refuse_to_overwrite(_OUTPUT.value)  # before the (slow) restore
        model, params, config = checkpoint.load_for_inference(_WORKDIR.value, step=_STEP.value)
        if _FORMAT.value == "orbax":
            export.save_params_orbax(_OUTPUT.value, params, checkpoint.config_to_json(config))
        else:
            pair = tokenizers.load_rag_tokenizers(os.path.abspath(_WORKDIR.value))
            generation = {"max_length": int(config.eval.max_length)}
            export.save_hf_rag(_OUTPUT.value, model, params, config.model.loss, pair.question, pair.generator,
                               generation)  # fmt: skip
        print(f"exported {_WORKDIR.value} ({_FORMAT.value}) to {_OUTPUT.value}")

    cli.run(run)


if __name__ == "__main__":
    app.run(main)
