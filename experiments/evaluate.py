"""Evaluates a RAG model on a task's questions: retrieval, generation, the task's metrics (rag_jax/tasks/), KILT's
R-Precision and KILT-* scores where the questions name their pages, answer recall@k (short-answer tasks).

  python -m experiments.evaluate --task=NAME --model=DIR --index=DIR --questions=FILE --output=FILE
      [--n_docs=K] [--reader=rag_sequence|rag_token|fid] [--num_beams=N] [--max_length=N] [--min_length=N] [--score]
      [--provenance]

--model is a Hugging Face RAG directory (RagSequenceForGeneration / RagTokenForGeneration layout, with its
question_encoder_tokenizer/ and generator_tokenizer/ subfolders when it has them) or a rag_jax training workdir; for
a workdir, --index and the other settings default to the run's own, and an export of a run (experiments.export)
answers as the run's workdir does (rag_jax/inference/model_dir.py). --questions is JSONL with {"question",
"answers"} per line (NQ-open), or for any task a file rag_jax/data/task_files.py reads (KILT JSON-lines, FEVER,
MS-MARCO, SearchQA, DPR CSV / JSON). Writes one JSON line per question and prints the task's metrics (--task=qa, the
default: EM, F1 and retrieval recall@k; experiments.eval_nq is this command with --task=qa). --output appears
only when the evaluation completes, and replaces an existing file only with --overwrite.

A model that knows the index it was trained with (a workdir's own index, or an export of a run) refuses an --index
of another identity (another document encoder, tokenizer, length or dtype: index_io.IDENTITY_FIELDS).
"""

import json
import os

from absl import app, flags

from experiments import cli, input_checks, model_loading, output_checks
from rag_jax.tasks import registry as tasks

_TASK = flags.DEFINE_string("task", "qa", "What the questions ask and how answers are scored (rag_jax/tasks/): qa, "
                            "abstractive_qa, question_generation, fact_verification or package.module:name.")
_MODEL = flags.DEFINE_string("model", None, "Hugging Face RAG directory or rag_jax training workdir.")
_INDEX = flags.DEFINE_string("index", None, "Index directory (build_index output); default for a workdir: its index.")
_QUESTIONS = flags.DEFINE_string("questions", None, "JSONL questions file: {\"question\", \"answers\": [...]}.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write one JSON line per question.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output (once the evaluation completes).")
_N_DOCS = flags.DEFINE_integer("n_docs", None, "Documents retrieved per question; default: the model's n_docs.",
                               lower_bound=1)
_READER = flags.DEFINE_string("reader", None, "How the model reads its passages (rag_jax/readers/): rag_sequence, "
                              "rag_token, fid or package.module:name of a registered reader; default: the model's.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", None, ["sequence", "token"], "Deprecated: --reader=rag_<model_type>.")
_DECODING = flags.DEFINE_enum("decoding", "thorough", ["thorough", "fast"], "RAG-Sequence decoding.")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", None, "Beam size; default: the checkpoint's generation config.",
                                  lower_bound=1)
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Maximum output length, start token included (as generate).",
                                   lower_bound=1)
_MIN_LENGTH = flags.DEFINE_integer("min_length", None, "Minimum output length, start token included.", lower_bound=0)
_SCORE = flags.DEFINE_bool("score", False, "Also write the reader's scores of the first gold answer (RAG readers: "
                           "nll_sequence / nll_token).")
_PROVENANCE = flags.DEFINE_bool(
    "provenance", False, "Also write which passage supported each answer: per document its id, title, prior and "
    "posterior, and the document posteriors of every generated token (rag_jax/inference/provenance.py).")
_COMPUTE_DTYPE = flags.DEFINE_enum(
    "compute_dtype", None, ["float32", "bfloat16"], "Activations and matmuls while answering (parameters stay "
    "float32; softmaxes and log-likelihoods float32; docs/bfloat16_agreement.md); default: the model's own (a "
    "workdir's model.compute_dtype, float32 for a Hugging Face directory).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Questions per batch.", lower_bound=1)
# The environment's cache where it names one (JAX's own variable: what the user chose for every JAX program, and how
# the test suite keeps its commands' caches out of the home directory).
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rag_jax", "xla"),
    "Directory of XLA's persistent compilation cache (a rerun with the same shapes skips compiling; default: "
    "$JAX_COMPILATION_CACHE_DIR where set, else ~/.cache/rag_jax/xla); '' disables.")
_RETRIEVAL = flags.DEFINE_enum("retrieval", "exact", ["exact", "scann", "codes"],
                                "Search backend ('codes': the index's build_index --codes, re-ranked exactly).")
_RERANK_FROM_CODES = flags.DEFINE_integer("rerank_from_codes", 100, "--retrieval=codes: candidates re-ranked with the "
                                          "full-precision vectors (0: the codes' own top K).", lower_bound=0)
_CONTEXTS = flags.DEFINE_enum(
    "contexts", "auto", ["auto", "table", "strings"],
    "How the generator inputs are formed, the same ids either way: 'strings' tokenises each question-passage string "
    "(as the reference); 'table' glues them from the passage token table cached in the index directory (built on "
    "first use; a fifth of the host time); 'auto': the table when it is built, or when building it tokenises no "
    "more passages than the contexts it saves, and the generator tokenizer allows it.")
_DOC_ENCODER_ID = flags.DEFINE_string("doc_encoder_id", None, "Refuse an index not built by this encoder id.")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N questions.", lower_bound=1)
_ANSWER_PREFIX_SPACE = flags.DEFINE_bool(
    "answer_prefix_space", None, "With --score: tokenise gold answers as ' answer' (rag_jax training labels) or not; "
    "default: as the model directory records (a workdir or an export of one), else not.")
flags.mark_flags_as_required(["model", "questions", "output"])
flags.register_multi_flags_validator(
    ["min_length", "max_length"],
    lambda f: f["min_length"] is None or f["max_length"] is None or f["min_length"] <= f["max_length"],
    message="--min_length must not exceed --max_length")

RECALL_KS = (1, 5, 20, 100)


def _check_flags() -> None:
    """What the flags and paths alone can tell, before anything loads."""
    output_checks.refuse_input_as_output(_OUTPUT.value, "--output", {
        "--questions": _QUESTIONS.value, "--model": _MODEL.value, "--index": _INDEX.value}, overwrite=_OVERWRITE.value)
    cli.check_new_output(_OUTPUT.value, "--output", overwrite=_OVERWRITE.value)
    input_checks.require_file(_QUESTIONS.value, "--questions", "a JSONL questions file")
    if _INDEX.value is not None and not os.path.isdir(_INDEX.value):
        raise cli.UsageError(f"--index={_INDEX.value}: no such directory (an index built by experiments.build_index)")
    model_loading.reader_from_flags(_READER, _MODEL_TYPE)
    if not tasks.known(_TASK.value):
        raise cli.UsageError(f"--task={_TASK.value}: no such task; known: {', '.join(tasks.names())}")
    output_checks.remove_partials(_OUTPUT.value)  # of an evaluation killed before it could
    cli.declare_outputs(_OUTPUT.value)


def _read_questions(path: str, limit: int | None, task) -> tuple[list[dict], list[int]]:
    """The questions (the first `limit`) and their line numbers: NQ-open JSONL for qa ({"question", "answers"}), any
    format rag_jax/data/task_files.py reads for the other tasks (and for qa files of those formats)."""
    from rag_jax.data import nq_jsonl, task_files  # pylint: disable=g-import-not-at-top (after the flag checks)
    from rag_jax.tasks import base  # pylint: disable=g-import-not-at-top

    try:
        if task.name == "qa" and task_files.detect_format(path) == "nq":
            numbered = [(index + 1, example) for index, example in nq_jsonl.read_nq_jsonl(path)]
        else:
            numbered = [(line, base.to_example(task, record, f"{path}:{line}"))
                        for line, record in task_files.read_records(path)]
    except task_files.TaskFileError as e:
        raise cli.UsageError(str(e)) from None
    except base.TaskDataError as e:
        raise cli.UsageError(f"{e} (task {task.name})") from None
    except ValueError as e:
        raise cli.UsageError(f"{e} The questions file must be JSONL: one {{\"question\", \"answers\"}} object a line.")
    if not numbered:
        raise cli.UsageError(f"{path}: no questions")
    numbered = numbered[:limit] if limit else numbered
    return [example for _, example in numbered], [line for line, _ in numbered]


def _check_gold_ids(examples: list[dict], lines: list[int], index, index_dir: str) -> None:
    """Every gold passage id names a passage of the index (the rule of training_data.unknown_passage)."""
    from rag_jax.retrieval import corpus, training_data  # pylint: disable=g-import-not-at-top

    for example, line in zip(examples, lines):
        if example.get("gold_passage_id", -1) >= 0:
            try:
                index.passages.row_for_id(example["gold_passage_id"])
            except corpus.UnknownPassageIdError:
                raise training_data.unknown_passage(f"{_QUESTIONS.value}:{line}", example["gold_passage_id"],
                                                    f"{index.passages.path} (the corpus of --index={index_dir})",
                                                    index.num_passages) from None


def _passage_table(index, generator_tokenizer, fmt, contexts_to_form: int):
    """--contexts: the passage token table the retriever glues contexts from, or None (strings)."""
    from rag_jax.retrieval import contexts  # pylint: disable=g-import-not-at-top

    # --contexts=table on a tokenizer that joins tokens at the passage/question boundary: SplitTokenizationError.
    table = contexts.host_context_table(index, generator_tokenizer, fmt, _CONTEXTS.value, contexts_to_form,
                                        remedy="use --contexts=strings")
    print("contexts: " + ("glued from the passage token table" if table is not None else
                          "question-passage strings through the generator tokenizer"))
    return table


def evaluate() -> None:
    _check_flags()
    import tqdm  # pylint: disable=g-import-not-at-top (after the flag checks)

    from rag_jax import files  # pylint: disable=g-import-not-at-top
    from rag_jax.inference import answering, metrics  # pylint: disable=g-import-not-at-top
    from rag_jax.readers import registry  # pylint: disable=g-import-not-at-top
    from rag_jax.retrieval import retriever  # pylint: disable=g-import-not-at-top

    if _COMPILATION_CACHE.value:
        import jax  # pylint: disable=g-import-not-at-top

        # Compiling decoding takes seconds per shape, a large share of a short evaluation; loading it back, ~0.1 s.
        # Every executable is kept, the small ones too (question encoder, search, doc scores: each compiles in
        # well under 0.5 s, but together they delayed the first answer by ~0.3-0.5 s on a warm cache).
        jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from rag_jax.tasks import base  # pylint: disable=g-import-not-at-top

    task = tasks.get(_TASK.value)
    examples, lines = _read_questions(_QUESTIONS.value, _LIMIT.value, task)
    with_pages = any(example.get("pages") for example in examples)
    model, params, defaults = model_loading.load_model(_MODEL.value)
    model = model_loading.with_compute_dtype(model, _COMPUTE_DTYPE.value)
    reader = model_loading.reader_from_flags(_READER, _MODEL_TYPE) or defaults.reader
    overrides = {k: v for k, v in (("num_beams", _NUM_BEAMS.value), ("max_length", _MAX_LENGTH.value),
                                   ("min_length", _MIN_LENGTH.value)) if v is not None}  # fmt: skip
    generation = defaults.generation_config(reader, **overrides)
    model_loading.check_answer_length(generation.max_length, _MAX_LENGTH.value, model, _MODEL.value)
    index_dir, index = model_loading.load_index(
        _INDEX.value, model, defaults, f"--model={_MODEL.value}", expected_encoder=_DOC_ENCODER_ID.value)
    n_docs = model_loading.n_docs_for(_N_DOCS.value, model, index, index_dir)
    _check_gold_ids(examples, lines, index, index_dir)  # before any work
    prefix_space = defaults.answer_prefix_space if _ANSWER_PREFIX_SPACE.value is None else _ANSWER_PREFIX_SPACE.value
    pair = model_loading.tokenizers_for(_MODEL.value, model.question_encoder_config.vocab_size,
                                        model.generator_config.vocab_size)
    fmt = registry.get(reader).context_format(model.config.context)  # FiD's passages read `question: ... title: ...`
    table = _passage_table(index, pair.generator, fmt, len(examples) * n_docs)
    searcher = retriever.Retriever(index, pair.question, pair.generator, fmt, _RETRIEVAL.value,
                                   passage_table=table, rerank_from_codes=_RERANK_FROM_CODES.value)
    settings = answering.AnswerSettings(n_docs=n_docs, reader=reader, decoding=_DECODING.value,
                                        batch_size=_BATCH_SIZE.value, score=_SCORE.value,
                                        answer_prefix_space=prefix_space, provenance=_PROVENANCE.value,
                                        pages=with_pages, choices=task.labels)  # fmt: skip
    print(f"evaluating {len(examples)} questions: reader {reader}, K={n_docs}, beams={generation.num_beams}, "
          f"max_length={generation.max_length}, index {index_dir} ({index.num_passages} passages)")  # fmt: skip
    answered = []
    with files.output(_OUTPUT.value) as out, tqdm.tqdm(total=len(examples), unit="q", desc="answering") as bar:
        for record, texts in answering.answer_questions(model, params, searcher, examples, settings, generation, bar):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            answered.append((record, texts))
    print(f"wrote {_OUTPUT.value}")
    legacy = task.name == "qa" and not any(example.get("answers_are_regex") for example in examples)
    if legacy:  # EM, F1 and answer recall@k, as eval_nq has always printed them
        summary = answering.summarize(answered, sorted({k for k in RECALL_KS if k < n_docs} | {n_docs}))
        print(metrics.format_summary(summary))
    if not legacy or with_pages:
        predictions = [record["prediction"] for record, _ in answered]
        pages = [record["doc_titles"] for record, _ in answered] if with_pages else None
        print(base.format_metrics(task, base.evaluate(task, predictions, examples, pages)))


if __name__ == "__main__":
    app.run(cli.main_running(evaluate), flags_parser=cli.parse_flags)
