"""What the entry points that load models share (eval_nq, ask; build_index and mine_negatives for encoders): a model from a Hugging Face RAG directory or a rag_jax
workdir, its tokenizers, and its index, checked against the index the model was trained with.

Imports of the library happen inside the functions, so that the entry points check their flags before jax loads.
"""

from __future__ import annotations

import os

from experiments import cli


def load_model(path: str):
    """(model, params, model_dir.ModelDefaults) of a Hugging Face RAG directory, an export in pieces or a training
    workdir."""
    from rag_jax.inference import model_dir  # pylint: disable=g-import-not-at-top (after the flag checks)
    from rag_jax.runs import workdir  # pylint: disable=g-import-not-at-top

    if workdir.is_workdir(path):
        # Only here: it imports orbax (a quarter of a second), which a Hugging Face directory does not need.
        from rag_jax.runs import trained_model  # pylint: disable=g-import-not-at-top

        trained = trained_model.load(path)
        return trained.model, trained.params, trained.defaults
    return model_dir.load(path)


def with_compute_dtype(model, name: str | None):
    """`model` computing in `name` ("float32" or "bfloat16", model.compute_dtype's values; None keeps the model's
    own: a workdir's model.compute_dtype, float32 for a Hugging Face directory). Parameters are not converted."""
    if name is None:
        return model
    from rag_jax import rag  # pylint: disable=g-import-not-at-top (after the flag checks)
    from rag_jax.runs import build  # pylint: disable=g-import-not-at-top

    return rag.with_compute_dtype(model, build.DTYPES[name])


def check_answer_length(max_length: int, flag_value: int | None, model, model_flag: str) -> None:
    """The answers' length (start token included: the decoder reads positions 0 .. max_length-1) within the
    generator's positions (experiments/input_checks.py says why, and why T5 has no limit)."""
    from experiments import input_checks  # pylint: disable=g-import-not-at-top

    source = (f"--max_length={flag_value}" if flag_value is not None else
              f"max_length={max_length}, the default of --model={model_flag},")
    input_checks.check_length(max_length, model.generator_config, source, "the generator", flag="--max_length")


def tokenizers_for(model_dir: str, question_vocab: int, generator_vocab: int):
    """The model directory's own tokenizers (its RAG subfolders, or an export's pieces) or the bundled defaults,
    checked against the model's vocabulary sizes."""
    from rag_jax.data import tokenizers  # pylint: disable=g-import-not-at-top (after the flag checks)
    from rag_jax.inference import model_dir as model_dir_lib  # pylint: disable=g-import-not-at-top

    own = os.path.join(model_dir, tokenizers.RAG_QUESTION_SUBDIR)
    pieces = model_dir_lib.tokenizer_dirs(model_dir)
    if pieces is not None:
        pair = tokenizers.RagTokenizers(tokenizers.load_question_tokenizer(pieces["question"]),
                                        tokenizers.load_generator_tokenizer(pieces["generator"]))
    else:
        pair = tokenizers.load_rag_tokenizers(model_dir if os.path.isdir(own) else None)
    for name, tok, vocab, subdir in (("question", pair.question, question_vocab, tokenizers.RAG_QUESTION_SUBDIR),
                                     ("generator", pair.generator, generator_vocab, tokenizers.RAG_GENERATOR_SUBDIR)):
        if len(tok) > vocab:
            raise cli.UsageError(
                f"{model_dir}: the {name} tokenizer has {len(tok)} entries but the model's vocabulary has {vocab}; "
                f"put the model's own tokenizer in {model_dir}/{subdir}"
            )
    return pair


def check_index_identity(index, defaults, model_flag: str, index_arg: str | None) -> None:
    """The model's own index identity, when it knows one, must be the given index's (`model_flag`: the model flag
    as the user wrote it; `index_arg`: the --index the user gave, if any)."""
    from rag_jax.retrieval import index_io  # pylint: disable=g-import-not-at-top

    if defaults.index_identity:
        ctx = defaults.ctx_encoder_index_identity  # an export's ctx_encoder/ makes this one
        if ctx and not index_io.identity_mismatch(index.identity, ctx):
            return
        index_io.check_identity(index, defaults.index_identity, model_flag)
    elif defaults.index and index_arg and os.path.abspath(index_arg) != os.path.abspath(defaults.index):
        raise cli.UsageError(
            f"--index={index_arg} cannot be checked against the index the run was trained with: "
            f"{os.path.join(defaults.index, index_io.METADATA_FILE)} is missing; restore it (rerunning train_nq on "
            "the workdir rebuilds it), or leave --index out")


def load_index(index_arg: str | None, model, defaults, model_flag: str, expected_encoder: str | None = None):
    """(directory, index) to answer from: --index (`index_arg`), else the model's own (a workdir's); checked against
    the model."""
    from rag_jax.retrieval import index_io  # pylint: disable=g-import-not-at-top

    index_dir = index_arg or defaults.index
    if not index_dir:
        raise cli.UsageError("--index is required for a Hugging Face model directory")
    index = index_io.load_index(index_dir, expected_encoder=expected_encoder,
                                expected_dim=model.question_encoder_config.output_dim)  # fmt: skip
    check_index_identity(index, defaults, model_flag, index_arg)
    return index_dir, index


def n_docs_for(n_docs_flag: int | None, model, index, index_dir: str) -> int:
    """--n_docs, else the model's own K; no more than the corpus holds."""
    n_docs = n_docs_flag if n_docs_flag is not None else model.config.n_docs
    if n_docs > index.num_passages:
        raise cli.UsageError(f"--n_docs={n_docs} is larger than the corpus of {index.num_passages} passages in "
                             f"{index_dir}")
    return n_docs


def encoder_tokenizer(encoder_dir: str, override: str | None):
    """An encoder's tokenizer: `override`, else the encoder directory's own, else the bundled bert-base-uncased."""
    from rag_jax.data import tokenizers  # pylint: disable=g-import-not-at-top (after the flag checks)
    from rag_jax.models import sentence_transformers_dir  # pylint: disable=g-import-not-at-top

    if override:
        return tokenizers.load_question_tokenizer(override)
    # A sentence-transformers directory (modules.json) may keep its tokenizer in a module subfolder; the loader
    # finds it there.
    own_files = ("tokenizer.json", "vocab.txt", sentence_transformers_dir.MODULES_FILE)
    has_own = any(os.path.exists(os.path.join(encoder_dir, f)) for f in own_files)
    return tokenizers.load_question_tokenizer(encoder_dir if has_own else tokenizers.QUESTION_TOKENIZER_DIR)


def reader_from_flags(reader_flag, model_type_flag) -> str | None:
    """--reader, or the reader the deprecated --model_type names (saying so once); None: the model's own. Refuses
    the two together, and a name no reader has, before anything loads."""
    from rag_jax.readers import registry  # pylint: disable=g-import-not-at-top (light: names only)

    if reader_flag.value is not None and model_type_flag.value is not None:
        raise cli.UsageError(f"--model_type={model_type_flag.value} is the old name of --reader; give --reader alone")
    if model_type_flag.value is not None:
        reader = registry.ALIASES[model_type_flag.value]
        registry.note_deprecated(f"--model_type={model_type_flag.value}", f"--reader={reader}")
        return reader
    if reader_flag.value is not None and not registry.known(reader_flag.value):
        raise cli.UsageError(f"--reader={reader_flag.value}: choose one of {', '.join(registry.names())}, or "
                             "package.module:name of a module that registers a reader")
    return reader_flag.value
