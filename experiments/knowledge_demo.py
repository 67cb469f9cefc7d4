"""RAG's whole lifecycle on a laptop, on a knowledge task whose held-out answers can only be read, not remembered.

  python -m experiments.knowledge_demo --workdir=W                     # the bundled task (rag_jax.data.knowledge_task)
  python -m experiments.knowledge_demo --workdir=W --passages=P.tsv --train_file=T.jsonl --dev_file=D.jsonl \\
      [--swapped_passages=P2.tsv --swapped_dev_file=D2.jsonl] [--config.train.steps=...]

1. builds the index of the passages with the pretrained retriever (all-MiniLM-L6-v2) and trains RAG on the training
   questions, exactly as `experiments.train_nq --config=experiments/configs/nq.py:knowledge` does (W/run; a rerun
   resumes);
2. answers the held-out questions (entities the training never asked about): exact match, gold-passage recall@K;
3. closed-book control: the same model given random passages instead of the retrieved ones;
4. index hot-swap (the paper's): the changed corpus is indexed with the same document encoder (W/swapped_index) and
   the same model, not retrained, answers the questions again: how many answers follow the changed facts.
It prints a few answers with the passage each came from and a summary, and writes W/knowledge_demo.json (percents).
Questions are NQ-open JSONL with "gold_passage_id"; passages DPR's TSV layout or JSONL {"id", "title", "text"}.

--task=NAME runs the same lifecycle for another task family (rag_jax/tasks/): the bundled task is then written in
KILT's format by rag_jax/data/knowledge_families.py (or --train_file / --dev_file are any format the task reads), the
run trains with config task.name=NAME, and knowledge_demo.json holds {"task", "heldout", "closed_book", "swapped"},
each the task's metrics (qa keeps its other keys too). The default workdir is workdir/knowledge_NAME.
"""

import json
import os
import sys

import numpy as np

from absl import app, flags
from ml_collections import config_flags

from experiments import cli, input_checks, output_checks
from rag_jax import files as whole_files  # `files` is the task files here
from rag_jax.data import knowledge_families, knowledge_task, nq_open, task_files as task_formats, tokenizers
from rag_jax.retrieval import embed, index_codes, index_io
from rag_jax.retrieval.retriever import RandomPassages, Retriever
from rag_jax.runs import build, config_fields, trained_model, workdir as workdir_lib
from rag_jax.tasks import base as task_base, registry as tasks
from rag_jax.training import dev_eval, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "nq.py") + ":knowledge",
    "Training config (default: the knowledge variant of experiments/configs/nq.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where everything is written; default workdir/knowledge (--task=qa), "
                                "else workdir/knowledge_TASK.")
_TASK = flags.DEFINE_enum("task", "qa", knowledge_families.FAMILIES, "The task family the run learns and is scored "
                          "by (rag_jax/tasks/).")
_PASSAGES = flags.DEFINE_string("passages", None, "Passages file; default: the bundled task's.")
_TRAIN = flags.DEFINE_string("train_file", None, "Training questions (JSONL with gold_passage_id; another --task: "
                             "any format it reads).")
_DEV = flags.DEFINE_string("dev_file", None, "Held-out questions (JSONL with gold_passage_id).")
_SWAPPED_PASSAGES = flags.DEFINE_string("swapped_passages", None, "The changed corpus, for the index hot-swap.")
_SWAPPED_DEV = flags.DEFINE_string("swapped_dev_file", None, "The held-out questions with the changed answers.")
_ENTITIES = flags.DEFINE_integer("task_entities", 1100, "Bundled task: entities (one passage each).")
_HELDOUT = flags.DEFINE_integer("task_heldout", 100, "Bundled task: held-out entities (4 dev questions each).")
_EXAMPLES = flags.DEFINE_integer("examples", 5, "Answers to print.")
_KS = flags.DEFINE_list("n_docs_sweep", ["2", "4", "8"], "Held-out exact match with each of these K (passages per "
                        "question): more passages should not mean worse answers.")

_READER = flags.DEFINE_string("reader", None, "The reader to train and answer with (config model.reader: rag_sequence, "
                              "rag_token, fid); a reader whose contexts put the question first (fid) retrieves on the "
                              "host. Default: the config's.")

FILE_FLAGS = ("passages", "train_file", "dev_file", "swapped_passages", "swapped_dev_file")
# Generator target / decoding lengths of the families whose answers are longer than the knowledge config's one word
# (a sentence of ~12 BART tokens, a clue of ~22), applied where the config keeps the knowledge variant's values.
TARGET_LENGTHS = {"abstractive_qa": (20, 22), "question_generation": (30, 32)}


def workdir_of(task: str) -> str:
    """--workdir, or the task's default."""
    if _WORKDIR.value is not None:
        return _WORKDIR.value
    return os.path.join("workdir", "knowledge" if task == "qa" else f"knowledge_{task}")


def task_files(workdir: str) -> dict[str, str | None]:
    """The user's files when --passages/--train_file/--dev_file are given, else the bundled task (written once)."""
    given = {name: flags.FLAGS[name].value for name in FILE_FLAGS}
    if any(given[name] for name in ("passages", "train_file", "dev_file")):
        missing = [f"--{name}" for name in ("passages", "train_file", "dev_file") if not given[name]]
        if missing or bool(given["swapped_passages"]) != bool(given["swapped_dev_file"]):
            raise cli.UsageError("give --passages, --train_file and --dev_file together (and --swapped_passages "
                                 f"with --swapped_dev_file); missing: {missing or ['the other swapped flag']}")
        return given
    directory = os.path.join(workdir, "task")
    if not os.path.exists(os.path.join(directory, "swapped_dev.jsonl")):
        made = knowledge_families.make_task(_TASK.value, _ENTITIES.value, _HELDOUT.value)
        knowledge_task.write_task(made, directory)
        if _TASK.value != "qa":  # the family's KILT records replace the NQ-open questions
            knowledge_families.write_family(made, _TASK.value, directory)
    return {"passages": os.path.join(directory, "passages.jsonl"), "train_file": os.path.join(directory, "train.jsonl"),
            "dev_file": os.path.join(directory, "dev.jsonl"),
            "swapped_passages": os.path.join(directory, "swapped_passages.jsonl"),
            "swapped_dev_file": os.path.join(directory, "swapped_dev.jsonl")}


def _questions(path: str, task) -> list[dict]:
    if task.name == "qa" and task_formats.detect_format(path) == "nq":
        return [example for _, example in nq_open.read_nq_jsonl(path)]
    return list(task_base.ExampleSource(path, task))


def _summary(metrics: dict[str, float], k: int) -> tuple[float, float | None]:
    return metrics["eval/exact_match"], metrics.get(f"eval/gold_recall@{k}")


def _task_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The task's (and KILT's) metrics of a dev evaluation, without the "eval/" prefix and the count."""
    return {name[5:]: value for name, value in metrics.items() if name != "eval/num_questions"}


def _headline(task) -> str:
    return f"eval/{(task.headline or task.statistics)[0]}"


def gold_prior(record: dict, gold_passage_id) -> float:
    """p(z|x) of the gold passage among the retrieved ones (softmax of their scores), 0 when it was not retrieved."""
    scores = np.asarray(record["doc_scores"], np.float64)
    prior = np.exp(scores - scores.max())
    prior /= prior.sum()
    ids = [str(i) for i in record["doc_ids"]]
    return float(prior[ids.index(str(gold_passage_id))]) if str(gold_passage_id) in ids else 0.0


def _sweep_k(model, params, retriever, dev, config, task,
             evaluated: tuple[dict[str, float], list[dict]]) -> dict[str, dict[str, float]]:
    """Held-out exact match (another task: its headline metric) and the median prior of the gold passage for each K
    of --n_docs_sweep; `evaluated` (metrics, records) is the evaluation at the trained K, not run again."""
    sweep = {}
    trained_k = config.eval.n_docs
    for k in sorted({int(k) for k in _KS.value}):
        if k == int(trained_k):
            metrics, records = evaluated
        else:
            config.eval.n_docs = k
            records = []
            metrics = dev_eval.evaluate(model, params, retriever, dev, config, records)
        priors = [gold_prior(r, e["gold_passage_id"]) for r, e in zip(records, dev) if "gold_passage_id" in e]
        sweep[str(k)] = {_headline(task)[5:]: metrics[_headline(task)],
                         "gold_prior_median": 100 * float(np.median(priors)) if priors else None}
    config.eval.n_docs = trained_k
    return sweep


def _show(title: str, records: list[dict], index: index_io.Index, count: int) -> None:
    print(f"\n{title}")
    for record in records[:count]:
        top = index.passages.get([index.passages.row_for_id(record["doc_ids"][0])])[0]
        mark = "ok" if record["prediction"] in record["answers"] else f"gold {record['answers'][0]!r}"
        print(f"  {record['question']!r} -> {record['prediction']!r} ({mark}; from '{top.title}')")


def _check_inputs(workdir: str, files: dict[str, str | None], config) -> None:
    """The task files against what the run can use (input_checks), before anything trains; the demo's outputs
    neither replace them nor mix with another tool's files."""
    given = {f"--{name}": flags.FLAGS[name].value for name in FILE_FLAGS}
    for flag, path in given.items():
        if path is not None:
            input_checks.require_file(path, flag, "a passages file" if "passages" in flag else "a JSONL questions file")
    for output in ("run", "swapped_index", "knowledge_demo.json"):
        output_checks.refuse_input_as_output(os.path.join(workdir, output), f"--workdir={workdir_of(_TASK.value)}",
                                             given)
    input_checks.check_nq_training_inputs(config)
    if files["swapped_passages"] and task_formats.detect_format(files["swapped_dev_file"]) == "nq":
        from rag_jax.retrieval import training_data  # pylint: disable=g-import-not-at-top

        training_data.check_gold_ids(files["swapped_dev_file"], files["swapped_passages"])


def _use_reader(config, name: str) -> None:
    """config.model.reader = name; on-device context assembly glues passage then question tokens, so a reader
    whose contexts start with the question (FiD's) retrieves on the host."""
    from rag_jax.readers import registry  # pylint: disable=g-import-not-at-top
    from rag_jax.retrieval.contexts import ContextFormat  # pylint: disable=g-import-not-at-top

    if not registry.known(name):
        raise cli.UsageError(f"--reader={name}: choose one of {', '.join(registry.names())}")
    config.model.reader = name
    if registry.get(name).context_format(ContextFormat()).layout != "rag":
        config.retrieval.mode = "host"


def run_demo() -> dict:
    workdir = os.path.abspath(workdir_of(_TASK.value))
    task = tasks.get(_TASK.value)
    output_checks.refuse_foreign_directory(workdir, "--workdir",
                                           output_checks.KNOWLEDGE_DEMO_ENTRIES, "knowledge_demo run (no run/, task/)")
    config = _CONFIG.value
    config_fields.check_fields(config)  # each field's type and range (model.compute_dtype, ...) before anything is written
    if _READER.value is not None:  # before the task is written: a refused flag leaves nothing behind
        _use_reader(config, _READER.value)
    files = task_files(workdir)
    config.data.passages, config.task.train_file, config.task.dev_file = (
        files["passages"], files["train_file"], files["dev_file"])
    config.task.name = task.name
    if task.name in TARGET_LENGTHS and (config.data.max_target_length, config.eval.max_length) == (6, 8):
        config.data.max_target_length, config.eval.max_length = TARGET_LENGTHS[task.name]
    _check_inputs(workdir, files, config)
    cli.declare_outputs(workdir, os.path.join(workdir, "knowledge_demo.json"))
    run_dir = os.path.join(workdir, "run")
    if loop.train_and_evaluate(config, run_dir).get("preempted"):  # saved: rerunning the command resumes
        sys.exit(cli.EXIT_PREEMPTED)

    trained = trained_model.load(run_dir)
    model, params, config = trained.model, trained.params, trained.config
    dirs = workdir_lib.tokenizer_dirs(run_dir)
    question_tok = tokenizers.load_question_tokenizer(dirs["question"])
    generator_tok = tokenizers.load_generator_tokenizer(dirs["generator"])
    index = index_io.load_index(workdir_lib.index_dir(run_dir))
    searcher = config.retrieval.get("host_searcher", "exact")  # "codes" with --config.index.codes (docs/index.md)
    rerank = int(config.retrieval.get("rerank_from_codes", 0))
    retriever = Retriever(index, question_tok, generator_tok, model.config.context, searcher, rerank_from_codes=rerank)
    dev = _questions(files["dev_file"], task)
    config.eval.num_examples = 0
    k = int(config.eval.n_docs)
    results: dict = {}
    records: list[dict] = []
    metrics = dev_eval.evaluate(model, params, retriever, dev, config, records)
    heldout = _task_metrics(metrics)
    if task.name == "qa":
        results["heldout_exact_match"], results["heldout_gold_recall"] = _summary(metrics, k)
    _show("held-out questions (retrieved passages):", records, index, _EXAMPLES.value)
    results["heldout_by_n_docs"] = _sweep_k(model, params, retriever, dev, config, task, (metrics, records))
    metric = _headline(task)[5:]
    print(f"\nheld-out {metric.replace('_', ' ')} by K (passages per question; median prior p(z|x) of the gold "
          "passage):")
    for swept, row in results["heldout_by_n_docs"].items():
        print(f"  K={swept}: {metric.replace('_', ' ')} {row[metric]:.1f} | gold prior "
              f"{row['gold_prior_median'] or 0:.1f}")

    closed: list[dict] = []
    metrics = dev_eval.evaluate(model, params, RandomPassages(retriever, seed=config.seed), dev, config, closed)
    closed_book = _task_metrics(metrics)
    if task.name == "qa":
        results["closed_book_exact_match"] = metrics["eval/exact_match"]
    _show("closed-book control (random passages):", closed, index, min(_EXAMPLES.value, 3))

    swapped_metrics = None
    if files["swapped_passages"]:
        doc_config, doc_params = build.doc_encoder(config)
        swapped_index = embed.build_index(
            doc_config, doc_params, question_tok, files["swapped_passages"], os.path.join(workdir, "swapped_index"),
            batch_size=config.index.batch_size, max_length=config.index.max_length, dtype=config.index.dtype)
        if index.metadata.get("codes"):  # the swapped corpus encoded with the index's own codebooks
            swapped_index = index_codes.write_codes(
                swapped_index, index_codes.spec_of(index.metadata), sample_size=index.metadata["codes"]["sample_size"],
                seed=index.metadata["codes"]["seed"], codebooks=index_codes.load_codebooks(index))
        swapped = Retriever(swapped_index, question_tok, generator_tok, model.config.context, searcher,
                            rerank_from_codes=rerank)
        swapped_records: list[dict] = []
        metrics = dev_eval.evaluate(model, params, swapped, _questions(files["swapped_dev_file"], task), config,
                                    swapped_records)
        swapped_metrics = _task_metrics(metrics)
        _show("after the index hot-swap (changed facts, same model):", swapped_records, swapped_index,
              _EXAMPLES.value)
    if task.name == "qa":
        results["swapped_exact_match"] = swapped_metrics["exact_match"] if swapped_metrics else None
    results["num_heldout_questions"] = len(dev)
    results.update({"task": task.name, "heldout": heldout, "closed_book": closed_book, "swapped": swapped_metrics})
    with whole_files.output(os.path.join(workdir, "knowledge_demo.json")) as f:
        json.dump(results, f, indent=2)
    _print_summary(task, results, k)
    print(f"wrote {os.path.join(workdir, 'knowledge_demo.json')}")
    return results


def _print_summary(task, results: dict, k: int) -> None:
    print("\nsummary (percent of held-out questions):")
    if task.name == "qa":
        print(f"  exact match {results['heldout_exact_match']:.1f} | gold passage in the top {k} "
              f"{results['heldout_gold_recall'] or 0:.1f} | closed-book exact match "
              f"{results['closed_book_exact_match']:.1f}"
              + (f" | after the hot-swap, answers following the changed corpus {results['swapped_exact_match']:.1f}"
                 if results["swapped_exact_match"] is not None else ""))
        return
    for name in ("heldout", "closed_book", "swapped"):
        if results[name] is not None:
            print(f"  {name}: " + " | ".join(f"{metric} {value:.1f}" for metric, value in results[name].items()))


if __name__ == "__main__":
    app.run(cli.main_running(run_demo), flags_parser=cli.parse_flags)
