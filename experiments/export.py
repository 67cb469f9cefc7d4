"""Exports a rag_jax training run out of training.

  python -m experiments.export --workdir=DIR --format=hf|orbax --output=DIR [--step=N] [--overwrite]

hf:    a directory that transformers' RagSequenceForGeneration / RagTokenForGeneration `from_pretrained` loads
       (config.json, generation_config.json, model.safetensors, question_encoder_tokenizer/, generator_tokenizer/);
       the architecture follows the run's reader (RAG-Sequence or RAG-Token; a reader without a transformers class is
       refused: use orbax). It carries the run's generation settings,
       answer tokenisation and index identity, so eval_nq on it answers and scores exactly as eval_nq on the workdir.
       Its subfolder ctx_encoder/ holds the run's document encoder with its tokenizer, so that transformers (or
       build_index --encoder) can rebuild the index: the checkpoint's trained one (model.doc_encoder.trainable), else
       the frozen one that embedded the run's index. A DPRContextEncoder for [CLS] pooling; a sentence-transformers
       directory for mean pooling or L2 normalisation, which DPR lacks; left out, with a one-line note on stderr,
       when no Hugging Face layout computes it (BERT-pooler pooling) or a frozen one no longer loads.
       A run whose question encoder transformers' RAG cannot express (mean pooling or L2 normalisation: the local
       configs' all-MiniLM-L6-v2) is exported in pieces instead (rag_jax/inference/export_pieces.py,
       docs/export.md): generator/ as BartForConditionalGeneration / T5ForConditionalGeneration, question_encoder/
       and ctx_encoder/ as sentence-transformers directories, index/ (the run's index and passages), and
       rag_jax_export.json; eval_nq --model=OUTPUT answers from it as from the workdir, from its own index.
orbax: the parameters only (no optimizer state), for serving, with the run's config.json.
Both refuse to write into an existing non-empty directory unless --overwrite, and the directory appears only when
the export is complete (an interrupted export leaves nothing behind, and an overwritten one its old content).
"""

import sys

from absl import app, flags

from experiments import cli, output_checks

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/).")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "orbax"], "Output layout.")
_OUTPUT = flags.DEFINE_string("output", None, "New directory to write.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output (once the export is complete).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest that restores.", lower_bound=0)
flags.mark_flags_as_required(["workdir", "output"])


def _check_flags() -> None:
    """What the flags and paths alone can tell, before anything loads."""
    from rag_jax.runs import workdir  # pylint: disable=g-import-not-at-top (no jax: paths only)

    if not workdir.is_workdir(_WORKDIR.value):
        raise cli.UsageError(f"--workdir={_WORKDIR.value} is not a training workdir (no "
                             f"{workdir.checkpoints_dir(_WORKDIR.value)})")
    output_checks.refuse_input_as_output(_OUTPUT.value, "--output", {"--workdir": _WORKDIR.value},
                                         overwrite=_OVERWRITE.value)
    cli.check_new_output(_OUTPUT.value, "--output", overwrite=_OVERWRITE.value, directory=True)
    # --overwrite replaces an earlier export (config.json beside its weights), never another tool's directory.
    output_checks.refuse_foreign_directory(_OUTPUT.value, "--output", ("config.json", "rag_jax_export.json"),
                                          "export (no config.json or rag_jax_export.json)")
    output_checks.remove_partials(_OUTPUT.value)  # of an export killed before it could
    cli.declare_outputs(_OUTPUT.value)


def export_run():
    _check_flags()  # before the (slow) restore
    from rag_jax.data import tokenizers  # pylint: disable=g-import-not-at-top (after the flag checks)
    from rag_jax.inference import export, export_pieces  # pylint: disable=g-import-not-at-top
    from rag_jax.runs import checkpoint, workdir  # pylint: disable=g-import-not-at-top

    step, trained, skipped = _load(_WORKDIR.value)
    doc_encoder, layout = None, _FORMAT.value
    if _FORMAT.value == "orbax":
        export.save_params_orbax(_OUTPUT.value, trained.params, checkpoint.config_to_json(trained.config),
                                 overwrite=_OVERWRITE.value)
    else:
        doc_encoder = _doc_encoder(trained)
        dirs = workdir.tokenizer_dirs(_WORKDIR.value)
        question = tokenizers.load_question_tokenizer(dirs["question"])
        generator = tokenizers.load_generator_tokenizer(dirs["generator"])
        defaults = trained.defaults
        common = dict(generation=defaults.generation_config(defaults.reader),
                      answer_prefix_space=defaults.answer_prefix_space, index_identity=defaults.index_identity,
                      doc_encoder=doc_encoder, ctx_index_identity=defaults.ctx_encoder_index_identity,
                      overwrite=_OVERWRITE.value)
        from rag_jax.readers import registry as readers  # pylint: disable=g-import-not-at-top

        fits = export_pieces.rag_layout_fits(trained.model)
        rag_class = readers.get(defaults.reader).hf_architecture  # None (fid): pieces, whose spec names the reader
        if fits and rag_class:
            export.save_hf_rag(_OUTPUT.value, trained.model, trained.params, defaults.reader, question, generator,
                               **common)
        else:
            layout = "hf, in pieces: " + ("the question encoder is not DPR's" if not fits else
                                          f"the {defaults.reader} reader has no transformers RAG class")
            export_pieces.save_hf_pieces(_OUTPUT.value, trained.model, trained.params, defaults.reader, question,
                                         generator, question_max_length=trained.config.data.max_question_length,
                                         index_dir=defaults.index, **common)
    print(f"exported {_WORKDIR.value} step {step} ({layout}) to {_OUTPUT.value}"
          + (f" (document encoder in {export.CTX_ENCODER_SUBDIR}/)" if doc_encoder else "")
          + (f"; skipped the newer checkpoint(s) {skipped}, which do not restore" if skipped else ""))


def _load(workdir: str):
    """(step, trained model, newer steps skipped) of --step, else of the newest checkpoint that restores (each
    damaged newer one is named on stderr, and the final line says which step was exported instead)."""
    from rag_jax.runs import checkpoint, trained_model  # pylint: disable=g-import-not-at-top

    if _STEP.value is not None:
        return _STEP.value, trained_model.load(workdir, step=_STEP.value), []
    reader = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        steps = sorted(reader.all_steps(), reverse=True)
    finally:
        reader.close()
    if not steps:
        trained_model.load(workdir)  # raises, naming the remedy
    skipped = []
    for step in steps:
        try:
            return step, trained_model.load(workdir, step=step), skipped
        except checkpoint.CheckpointRestoreError as e:  # damaged files; other errors are not worth another step
            cause = checkpoint.describe(e.__cause__) if e.__cause__ is not None else str(e)
            print(f"skipped checkpoint {reader.step_dir(step)}, which does not restore ({cause})", file=sys.stderr)
            skipped.append(step)
    raise checkpoint.CheckpointRestoreError(f"{reader.directory}: no checkpoint restores (steps {steps}); restore "
                                            "the files from a copy, or train again")


def _doc_encoder(trained):
    """(config, params) of the run's document encoder for ctx_encoder/, or None with a note on stderr."""
    from rag_jax.inference import export  # pylint: disable=g-import-not-at-top
    from rag_jax.models import hf  # pylint: disable=g-import-not-at-top
    from rag_jax.runs import trained_model  # pylint: disable=g-import-not-at-top

    try:
        doc_encoder = trained_model.doc_encoder(trained)
        export.check_hf_encoder(doc_encoder[0])
    except hf.CheckpointError as e:
        print(f"not exporting the document encoder ({export.CTX_ENCODER_SUBDIR}/): {e}", file=sys.stderr)
        return None
    return doc_encoder


if __name__ == "__main__":
    app.run(cli.main_running(export_run), flags_parser=cli.parse_flags)
