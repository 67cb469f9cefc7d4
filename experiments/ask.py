"""Asks a RAG model questions and shows which retrieved passage each answer came from.

  python -m experiments.ask --model=HF_DIR_OR_WORKDIR [--index=DIR] [--n_docs=K] [--reader=NAME]
      [--plot=FILE.png|.svg|.html] [QUESTION ...]

Answers the questions given as arguments, or else one per line typed on standard input (an empty line is refused
and the prompt goes on; the exit status is then 1). Under each answer: the retrieved passages, highest posterior
p(z|x,y) first, each with its prior p(z|x), its title and a snippet with the answer marked **like this** where it
occurs. --plot draws every answered question's per-token document posteriors (the paper's Figure 2) and the
prior / posterior bars (rag_jax/inference/provenance_plot.py). --model and --index are read as eval_nq reads them.
"""

import os
import sys

from absl import app, flags

from experiments import cli, model_loading, output_checks

_MODEL = flags.DEFINE_string("model", None, "Hugging Face RAG directory or rag_jax training workdir.")
_INDEX = flags.DEFINE_string("index", None, "Index directory (build_index output); default for a workdir: its index.")
_N_DOCS = flags.DEFINE_integer("n_docs", None, "Passages retrieved per question; default: the model's n_docs.",
                               lower_bound=1)
_READER = flags.DEFINE_string("reader", None, "How the model reads its passages (rag_jax/readers/): rag_sequence, "
                              "rag_token, fid or package.module:name of a registered reader; default: the model's.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", None, ["sequence", "token"], "Deprecated: --reader=rag_<model_type>.")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", None, "Beam size; default: the model's.", lower_bound=1)
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Maximum answer length, start token included.", lower_bound=2)
_PLOT = flags.DEFINE_string("plot", None, "Also draw the document posteriors to this .png, .svg or .html file.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --plot file.")
_SNIPPET = flags.DEFINE_integer("snippet_chars", 200, "Characters of each passage shown.", lower_bound=20)
flags.mark_flags_as_required(["model"])

_BATCH = 8  # questions answered together when given as arguments


def _check_flags(questions: list[str]) -> None:
    """What the flags and arguments alone can tell, before anything loads."""
    if not os.path.isdir(_MODEL.value):
        raise cli.UsageError(f"--model={_MODEL.value}: no such directory (a Hugging Face RAG directory or a rag_jax "
                             "training workdir)")
    if _INDEX.value is not None and not os.path.isdir(_INDEX.value):
        raise cli.UsageError(f"--index={_INDEX.value}: no such directory (an index built by experiments.build_index)")
    model_loading.reader_from_flags(_READER, _MODEL_TYPE)
    if _PLOT.value is not None:
        if os.path.splitext(_PLOT.value)[1].lower() not in (".png", ".svg", ".html"):  # provenance_plot.FORMATS
            raise cli.UsageError(f"--plot={_PLOT.value}: name a .png, .svg or .html file")
        cli.check_new_output(_PLOT.value, "--plot", overwrite=_OVERWRITE.value)
        output_checks.remove_partials(_PLOT.value)  # of a run killed before it could
        cli.declare_outputs(_PLOT.value)
    for number, question in enumerate(questions, 1):
        if not question.strip():
            raise cli.UsageError(f"question {number} is empty; give each question as one non-empty argument")


def _show(record: dict, texts: list[str]) -> None:
    from rag_jax.inference import provenance  # pylint: disable=g-import-not-at-top (after the flag checks)

    print(f"question: {record['question']}\nanswer:   {record['prediction']}")
    print("passages, highest posterior first (posterior p(z|x,y), prior p(z|x)):")
    for place, (rank, doc) in enumerate(provenance.ranked_documents(record["provenance"]), 1):
        print(f"  {place}. posterior {doc['posterior']:.3f}  prior {doc['prior']:.3f}  {doc['title']}  "
              f"[id {doc['id']}, retrieved #{rank + 1}]")
        print(f"     {provenance.snippet(texts[rank], record['prediction'], _SNIPPET.value)}")
    print(flush=True)


def _typed_questions():
    """Questions typed on standard input, one a line, with a prompt when a person is typing."""
    prompt = sys.stdin.isatty()
    while True:
        if prompt:
            print("question> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.strip()


def ask(questions: list[str]) -> None:
    _check_flags(questions)
    from rag_jax import files  # pylint: disable=g-import-not-at-top
    from rag_jax.inference import answering, provenance_plot  # pylint: disable=g-import-not-at-top
    from rag_jax.retrieval import retriever  # pylint: disable=g-import-not-at-top

    model, params, defaults = model_loading.load_model(_MODEL.value)
    index_dir, index = model_loading.load_index(_INDEX.value, model, defaults, f"--model={_MODEL.value}")
    n_docs = model_loading.n_docs_for(_N_DOCS.value, model, index, index_dir)
    reader = model_loading.reader_from_flags(_READER, _MODEL_TYPE) or defaults.reader
    overrides = {k: v for k, v in (("num_beams", _NUM_BEAMS.value), ("max_length", _MAX_LENGTH.value)) if v}
    generation = defaults.generation_config(reader, **overrides)
    model_loading.check_answer_length(generation.max_length, _MAX_LENGTH.value, model, _MODEL.value)
    pair = model_loading.tokenizers_for(_MODEL.value, model.question_encoder_config.vocab_size,
                                        model.generator_config.vocab_size)
    from rag_jax.readers import registry  # pylint: disable=g-import-not-at-top

    fmt = registry.get(reader).context_format(model.config.context)  # FiD's passages read `question: ... title: ...`
    searcher = retriever.Retriever(index, pair.question, pair.generator, fmt)
    settings = answering.AnswerSettings(n_docs=n_docs, reader=reader, provenance=True,
                                        batch_size=min(_BATCH, len(questions)) if questions else 1)  # fmt: skip

    def answer(batch: list[str]):
        examples = [{"question": q, "answers": []} for q in batch]
        return list(answering.answer_questions(model, params, searcher, examples, settings, generation))

    answered, refused = [], 0
    if questions:
        answered = answer(questions)
        for record, texts in answered:
            _show(record, texts)
    else:
        for question in _typed_questions():
            if not question:  # the session goes on: one bad line should not lose the loaded model
                refused += 1
                print("error: an empty question; type a question (end with Ctrl-D)", file=sys.stderr, flush=True)
                continue
            for record, texts in answer([question]):
                answered.append((record, texts))
                _show(record, texts)
    if _PLOT.value and answered:
        with files.output(_PLOT.value, binary=True) as f:  # whole or not at all, as every output
            provenance_plot.write([record for record, _ in answered], f, os.path.splitext(_PLOT.value)[1].lower())
        print(f"wrote {_PLOT.value}")
    if refused:
        raise cli.UsageError(f"{refused} of {refused + len(answered)} questions were refused (empty lines)")
    if not answered:
        raise cli.UsageError("no question given: pass questions as arguments or type them one per line")


def main(argv):
    cli.run(lambda: ask(list(argv[1:])))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
