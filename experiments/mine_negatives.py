"""Mines hard negatives for train_retriever from an existing index: each question's top passages that contain no
answer (and are not its gold passage).

  python -m experiments.mine_negatives --index=DIR --question_encoder=DIR --questions=FILE.jsonl --output=FILE.jsonl \
      [--negatives=1] [--depth=100]

--index is an experiments.build_index directory, --question_encoder the question encoder that goes with it (a
Hugging Face DPR/BERT/sentence-transformers directory, e.g. a train_retriever export), --questions NQ-open JSONL.
The output ({"question", "negative_ids"} a line) is train_retriever's --config.data.hard_negatives.
"""

from absl import app, flags

from experiments import cli, input_checks, output_checks

_INDEX = flags.DEFINE_string("index", None, "Index directory (experiments.build_index).")
_ENCODER = flags.DEFINE_string("question_encoder", None, "Question encoder directory that goes with the index.")
_QUESTIONS = flags.DEFINE_string("questions", None, "NQ-open JSONL questions (answers; gold_passage_id optional).")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL file to write.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer directory; default: the encoder's own.")
_NEGATIVES = flags.DEFINE_integer("negatives", 1, "Hard negatives per question (DPR: 1).", lower_bound=1)
_DEPTH = flags.DEFINE_integer("depth", 100, "Search this many top passages for them.", lower_bound=1)
_MAX_LENGTH = flags.DEFINE_integer("max_length", 32, "Question tokens.", lower_bound=1)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
flags.mark_flags_as_required(["index", "question_encoder", "questions", "output"])


def mine():
    input_checks.require_file(_QUESTIONS.value, "--questions", "an NQ-open JSONL questions file")
    output_checks.refuse_input_as_output(_OUTPUT.value, "--output", {
        "--questions": _QUESTIONS.value, "--index": _INDEX.value, "--question_encoder": _ENCODER.value,
        "--tokenizer": _TOKENIZER.value}, overwrite=_OVERWRITE.value)
    cli.check_new_output(_OUTPUT.value, "--output", overwrite=_OVERWRITE.value)
    output_checks.remove_partials(_OUTPUT.value)  # of a run killed before it could
    cli.declare_outputs(_OUTPUT.value)
    import json  # pylint: disable=g-import-not-at-top

    from experiments import model_loading  # pylint: disable=g-import-not-at-top (after the flag checks)
    from rag_jax import files  # pylint: disable=g-import-not-at-top
    from rag_jax.data import nq_open  # pylint: disable=g-import-not-at-top
    from rag_jax.models import hf  # pylint: disable=g-import-not-at-top
    from rag_jax.retrieval import index_io  # pylint: disable=g-import-not-at-top
    from rag_jax.training import hard_negatives  # pylint: disable=g-import-not-at-top

    try:
        questions = [q for _, q in nq_open.read_nq_jsonl(_QUESTIONS.value)]
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    encoder = hf.load_encoder(_ENCODER.value)
    input_checks.check_length(_MAX_LENGTH.value, encoder.config, f"--max_length={_MAX_LENGTH.value}",
                              f"the encoder --question_encoder={_ENCODER.value}")
    tokenizer = model_loading.encoder_tokenizer(_ENCODER.value, _TOKENIZER.value)
    index = index_io.load_index(_INDEX.value)
    if index.dim != encoder.config.output_dim:
        raise cli.UsageError(f"--question_encoder={_ENCODER.value} gives {encoder.config.output_dim}-d vectors but "
                             f"--index={_INDEX.value} holds {index.dim}-d ones; give the question encoder that goes "
                             "with the index (trained with its document encoder)")
    count = empty = 0
    with files.output(_OUTPUT.value) as f:
        for record in hard_negatives.mine(index, encoder, tokenizer, questions, negatives=_NEGATIVES.value,
                                          depth=_DEPTH.value, max_length=_MAX_LENGTH.value):
            f.write(json.dumps(record) + "\n")
            count, empty = count + 1, empty + (not record["negative_ids"])
    print(f"{_OUTPUT.value}: hard negatives for {count} questions ({empty} found none in the top {_DEPTH.value})")


if __name__ == "__main__":
    app.run(cli.main_running(mine), flags_parser=cli.parse_flags)
